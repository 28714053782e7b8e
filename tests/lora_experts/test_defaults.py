"""What LoRA experts adapt by default, and the trainable-parameter report (apply log, ``inspect``).

Routed experts are adapted only when asked (``routed_experts: true``) or named explicitly; the reported counts are
checked against the ``numel`` of the modules actually created and against the closed-form count at Qwen3-30B-A3B
size, both computed here.
"""

from __future__ import annotations

import json
import logging
import re

import pytest
import torch

import moepatch
from moepatch.lora_experts.inject import names_storage
from moepatch.lora_experts.layers import LoraExperts
from moepatch.lora_experts.layers import VectorExperts
from moepatch.lora_experts.routed import RoutedExpertSets
from moepatch.testing import tiny

MOLORA = {"method": "molora", "num_experts": 3, "r": 4}


def _has_routed_sets(model: torch.nn.Module) -> bool:
    return any(isinstance(m, RoutedExpertSets) for m in model.modules())


def test_broad_default_names_leave_routed_experts_out(family):
    """MoLoRA's default names (q … down_proj) adapt attention, dense MLPs and shared experts only; asked for, the
    routed experts join, and the model stays bit-identical either way."""
    model = tiny.tiny_model(family)
    batch = tiny.demo_batch()
    with torch.no_grad():
        reference = model(**batch).logits
    for routed in (False, True):
        try:
            handle = moepatch.apply(model, {"lora_experts": {**MOLORA, "routed_experts": routed}})
        except ValueError as error:  # a family whose default names exist only inside routed experts
            assert not routed and "reach only routed experts: set moepatch.lora_experts.routed_experts" in str(error)
            assert not any(isinstance(m, (LoraExperts, VectorExperts)) for m in model.modules())
            continue
        assert _has_routed_sets(model) is routed
        with torch.no_grad():
            assert torch.equal(model(**batch).logits, reference)
        handle.remove()


@pytest.mark.parametrize(("entries", "routed"), [
    (["down_proj"], False),  # broad: the shared expert and dense layers only
    (["re:.*_proj"], False),  # a regex matching any module name there is broad too
    (["experts.down_proj"], True),
    (["mlp.experts.down_proj"], True),
    (["re:.*\\.experts\\..*"], True),
    (["model.layers.0.mlp.experts.down_proj"], True),
])
def test_what_names_the_routed_experts_explicitly(entries, routed):
    model = tiny.tiny_model("qwen2_moe")
    handle = moepatch.apply(model, {"lora_experts": {**MOLORA, "target_modules": entries}})
    experts = [p for p in handle.lora_targets if re.fullmatch(r"model\.layers\.\d+\.mlp\.experts\.\w+", p)]
    assert bool(experts) is routed
    if entries == ["model.layers.0.mlp.experts.down_proj"]:
        assert handle.lora_targets == entries
    if entries == ["down_proj"]:
        assert sorted(handle.lora_targets) == sorted(
            name for name, m in model.named_modules() if name.endswith("down_proj") and isinstance(m, torch.nn.Linear)
            and ".experts." not in name)


@pytest.mark.parametrize(("entry", "alias", "storage", "expected"), [
    ("gate_proj", "model.layers.0.mlp.experts.gate_proj", "model.layers.0.mlp.experts", False),
    ("w1", "model.layers.0.mlp.experts.w1", "model.layers.0.mlp.experts", False),
    ("experts.w1", "model.layers.0.mlp.experts.w1", "model.layers.0.mlp.experts", True),
    ("mlp.w1", "blocks.0.ffn.experts.mlp.w1", "blocks.0.ffn.experts", False),  # "mlp" is inside the storage
    ("experts.mlp.w1", "blocks.0.ffn.experts.mlp.w1", "blocks.0.ffn.experts", True),
    ("experts", "h.0.mlpf.experts", "h.0.mlpf.experts", True),  # a storage module that is the projection itself
    ("mlpf", "h.0.mlpf", "h.0.mlpf.experts", False),  # the mixture around it: not the storage's own name
    ("re:.*experts.*", "model.layers.0.mlp.experts.gate_proj", "model.layers.0.mlp.experts", True),
    ("re:.*\\.\\w+\\.gate_proj", "model.layers.0.mlp.experts.gate_proj", "model.layers.0.mlp.experts", False),
    ("up_proj", "model.layers.0.mlp.experts.gate_proj", "model.layers.0.mlp.experts", False),  # no match at all
])
def test_names_storage(entry, alias, storage, expected):
    assert names_storage(entry, alias, storage) is expected


def test_an_entry_reaching_only_routed_experts_is_refused_with_the_fix_named():
    """Mixtral has no dense ``w1``: the entry would silently adapt nothing (or, before, 8 experts per layer)."""
    model = tiny.tiny_model("mixtral")
    before = {name: p.detach().clone() for name, p in model.state_dict().items()}
    with pytest.raises(ValueError, match=r"'w1' reaches only routed experts \(model\.layers\.0\.mlp\.experts\.gate_proj"
                                         r", \.\.\.\), .*routed_experts to true or name the experts' module "
                                         r"\('experts\.w1'\)"):
        moepatch.apply(model, {"lora_experts": {**MOLORA, "target_modules": ["w1", "q_proj"]}})
    assert all(torch.equal(before[name], value) for name, value in model.state_dict().items())
    assert not any(isinstance(m, LoraExperts) for m in model.modules())
    handle = moepatch.apply(model, {"lora_experts": {**MOLORA, "target_modules": ["experts.w1"]}})
    assert handle.lora_targets == [f"model.layers.{i}.mlp.experts.gate_proj" for i in range(3)]


def test_routed_experts_field_is_checked_and_saved(tmp_path):
    model = tiny.tiny_model("qwen2_moe")
    with pytest.raises(ValueError, match=r"moepatch\.lora_experts\.routed_experts: expected true or false, got 'yes'"):
        moepatch.apply(model, {"lora_experts": {**MOLORA, "routed_experts": "yes"}})
    moepatch.apply(model, {"lora_experts": {**MOLORA, "routed_experts": True}})
    model.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())["moepatch"]["lora_experts"]
    assert saved["routed_experts"] is True


# ---- the parameter report -----------------------------------------------------------------------------------------

def _independent_groups(model: torch.nn.Module) -> dict[str, int]:
    """``numel`` of every created expert set, grouped by where its projection sits (Qwen2-MoE's own layout)."""
    dense_layers = {i for i, layer in enumerate(model.model.layers) if not hasattr(layer.mlp, "experts")}
    groups: dict[str, int] = {}
    for name, module in model.named_modules():
        if not isinstance(module, (LoraExperts, VectorExperts)):
            continue
        if ".mlp.experts." in name:
            group = "routed experts"
        elif ".mlp.shared_expert." in name:
            group = "shared experts"
        elif ".mlp." in name and int(name.split(".")[2]) in dense_layers:
            group = "dense MLPs"
        else:
            group = "attention and other"
        groups[group] = groups.get(group, 0) + sum(p.numel() for p in module.parameters())
    return groups


def _reported(line: str) -> tuple[int, dict[str, int], float, int]:
    """(total, per group, share in %, model parameters) from a summary line."""
    total = int(re.search(r"; ([\d,]+) LoRA-expert parameters", line).group(1).replace(",", ""))
    share, base = re.search(r"= ([\d.e+-]+)% of the model's ([\d,]+)", line).groups()
    groups = {name: int(count.replace(",", "")) for name, count in
              re.findall(r"(attention and other|dense MLPs|shared experts|routers|routed experts) ([\d,]+)",
                         line.split(": ", 1)[1])}
    return total, groups, float(share), int(base.replace(",", ""))


@pytest.mark.parametrize("block", [
    {"method": "molora"},
    {"method": "molora", "routed_experts": True},
    {"method": "mov", "routed_experts": True},
    {"method": "mov", "router_input": "hidden"},
    {"method": "mov", "per_head": False},
    {"method": "mola", "routed_experts": True, "top_k": 1,
     "num_experts": {"model.layers.0.mlp.experts.1.down_proj": 3, "model.layers.0.mlp.experts.down_proj": 2},
     "r": {"model.layers.0.mlp.experts.1.down_proj": 5, "model.layers.0.mlp.experts.down_proj": 4},
     "target_modules": ["model.layers.0.mlp.experts.down_proj"]},
    {"method": "mola", "num_experts": [2, 4, 6, 8], "r": {"model.layers.0.self_attn.q_proj": 3}, "top_k": 2,
     "target_modules": ["model.layers.0.self_attn.q_proj"]},
])
def test_apply_log_reports_parameters_per_group(caplog, block):
    model = tiny.tiny_model("qwen2_moe")
    base = sum(p.numel() for p in model.parameters())
    with caplog.at_level(logging.INFO, logger="moepatch"):
        moepatch.apply(model, {"lora_experts": block})
    (line,) = [record.getMessage() for record in caplog.records if "lora_experts (" in record.getMessage()]
    total, groups, share, reported_base = _reported(line)
    expected = _independent_groups(model)
    assert groups == expected
    assert total == sum(expected.values()) == sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert reported_base == base
    assert share == pytest.approx(100 * total / base, rel=1e-2)


def test_default_targets_cut_the_tiny_models_lora_parameters():
    """Figures of the report: the tiny Qwen2-MoE, MoLoRA defaults, before (routed too) and now."""
    counts = {}
    for routed in (True, False):
        model = tiny.tiny_model("qwen2_moe")
        moepatch.apply(model, {"lora_experts": {"method": "molora", "routed_experts": routed}})
        counts[routed] = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert counts[True] == 169_120 and counts[False] == 65_440  # 61% of the routed count was in the routed experts


def _molora_closed_form(fan_in: int, fan_out: int, experts: int = 10, rank: int = 4) -> int:
    """MoLoRA defaults (Zadouri et al., 2023): router [E, in] + E × (A [r, in] + B [out, r])."""
    return experts * fan_in + experts * rank * (fan_in + fan_out)


def test_qwen3_30b_a3b_molora_default_count_on_a_weightless_model():
    """At Qwen3-30B-A3B size (published config) MoLoRA's defaults (q, k, v, o, gate, down) train 38 M parameters,
    1.6 B with the routed experts."""
    from transformers import Qwen3MoeConfig

    from model_patches.structure import describe
    from moepatch.config import MoePatchConfig
    from moepatch.loading.skeleton import weightless_model
    from moepatch.patch import plan_patch

    hidden, heads, kv_heads, head_dim, layers, experts, width = 2048, 32, 4, 128, 48, 128, 768
    config = Qwen3MoeConfig(vocab_size=151936, hidden_size=hidden, intermediate_size=6144,
                            moe_intermediate_size=width, num_hidden_layers=layers, num_attention_heads=heads,
                            num_key_value_heads=kv_heads, head_dim=head_dim, num_experts=experts,
                            num_experts_per_tok=8, tie_word_embeddings=False)
    moe = describe(weightless_model(config), verify=False)
    attention = layers * (_molora_closed_form(hidden, heads * head_dim) + 2 * _molora_closed_form(
        hidden, kv_heads * head_dim) + _molora_closed_form(heads * head_dim, hidden))
    routed = layers * experts * (_molora_closed_form(hidden, width) + _molora_closed_form(width, hidden))  # gate, down
    for flag, expected in ((False, attention), (True, attention + routed)):
        plan = plan_patch(moe, MoePatchConfig.from_dict({"lora_experts": {"method": "molora", "routed_experts": flag}}))
        total, groups, _, base = _reported(plan.describe()[0].splitlines()[0])
        assert total == expected and groups.get("routed experts", 0) == (routed if flag else 0)
        assert round(base / 1e9, 1) == 30.5  # the published 30.5 B
    assert attention == 38_338_560 and attention + routed == 1_595_473_920
