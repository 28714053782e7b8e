"""The expert-storage adapters in model_patches: routed deltas reach fused experts through transformers' own
experts-implementation interface, only on the adapted modules, and every change is undone."""

from __future__ import annotations

import json

import pytest
import torch
from helpers import logits_of
from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS

import moepatch
from model_patches.expert_storage import STORAGES
from model_patches.expert_storage import storage_of
from model_patches.expert_storage.base import DELTAS_ATTRIBUTE
from model_patches.expert_storage.fused import IMPLEMENTATION
from moepatch.testing import tiny

ROUTED = {"lora_experts": {"method": "molora", "num_experts": 2, "r": 2, "top_k": 1,
                           "target_modules": ["re:model\\.layers\\.0\\.mlp\\.experts\\.(gate|down)_proj"]}}


def test_fused_experts_dispatch_through_transformers_interface_on_adapted_modules_only(tmp_path, batch):
    model = tiny.tiny_model("qwen2_moe")  # MoE layers 0, 2, 3; only layer 0's experts are adapted
    reference = logits_of(model, batch)
    base_implementation = model.config._experts_implementation
    handle = moepatch.apply(model, ROUTED)
    adapted, other = model.model.layers[0].mlp.experts, model.model.layers[2].mlp.experts
    assert IMPLEMENTATION in ALL_EXPERTS_FUNCTIONS
    assert adapted.config._experts_implementation == IMPLEMENTATION
    assert "forward" not in adapted.__dict__  # the class's own dispatching forward runs
    assert set(adapted.__dict__[DELTAS_ATTRIBUTE]) == {"gate_proj", "down_proj"}
    assert other.config is model.config and model.config._experts_implementation == base_implementation
    assert torch.equal(logits_of(model, batch), reference)  # fresh deltas are exactly zero

    model.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert not any("routed_deltas" in json.dumps(value) for value in saved.values())

    handle.remove()
    assert adapted.config is model.config and DELTAS_ATTRIBUTE not in adapted.__dict__
    assert "lora_experts" not in dict(adapted.named_children())
    assert torch.equal(logits_of(model, batch), reference)


def test_an_implementation_switched_after_attaching_is_named(batch):
    model = tiny.tiny_model("mixtral")
    moepatch.apply(model, ROUTED)
    model.config._experts_implementation_internal = "batched_mm"
    with pytest.raises(ValueError, match="experts implementation 'batched_mm' was set after moepatch attached"):
        model(**batch)


@pytest.mark.parametrize(("attribute", "value", "message"), [
    ("is_transposed", True, r"down_proj \(8, 32, 16\) does not fit gate_up_proj"),  # flags the tensors contradict
    ("has_bias", True, "has no gate_up_proj_bias"),
    ("_is_expert_parallel", True, "split by expert parallelism, but which experts this process holds cannot be"),
])
def test_fused_layouts_it_cannot_run_are_refused_by_name(attribute, value, message):
    model = tiny.tiny_model("qwen3_moe")
    experts = model.model.layers[0].mlp.experts
    setattr(experts, attribute, value)
    with pytest.raises(ValueError, match=message):
        moepatch.apply(model, ROUTED)
    assert "lora_experts" not in dict(experts.named_children())


@pytest.mark.parametrize("family", ["qwen2_moe", "llama_moe", "moduleformer", "dbrx"])
def test_each_family_resolves_to_its_storage_and_lists_every_expert(family):
    model = tiny.tiny_model(family)
    structure = moepatch.describe(model)
    storage = storage_of(structure)
    assert storage is STORAGES[structure.family.expert_storage]
    projections = storage.projections(structure)
    assert projections and all(len(p.in_dims) == len(p.out_dims) for p in projections)
    blocks = [layer.name for layer in structure.layers]
    in_moe_blocks = [p for p in projections if any(p.path.startswith(block + ".") for block in blocks)]
    assert len(in_moe_blocks) == (2 if family == "moduleformer" else 3) * len(blocks)
    assert all(len(p.in_dims) == structure.num_experts for p in in_moe_blocks)
    paths = {name for name, _ in model.named_modules()}
    assert all(p.path.rsplit(".", 1)[0] in paths or p.path in paths for p in projections)


def test_row_stacked_experts_are_reached_by_their_own_names(batch):
    """DBRX keeps gate / up / down as ``mlp.w1`` / ``mlp.v1`` / ``mlp.w2``: those names (and the short ``w1``) target
    the routed projections, whose adapted forward runs only while the patch is on."""
    model = tiny.tiny_model("dbrx")
    reference = logits_of(model, batch)
    handle = moepatch.apply(model, {"lora_experts": {"method": "molora", "num_experts": 2, "r": 2,
                                                     "target_modules": ["mlp.w1", "v1"], "routed_experts": True}})
    assert sorted(handle.lora_targets) == [f"transformer.blocks.{i}.ffn.experts.{p}" for i in range(2)
                                           for p in ("gate_proj", "up_proj")]
    experts = model.transformer.blocks[0].ffn.experts
    assert set(experts.__dict__[DELTAS_ATTRIBUTE]) == {"gate_proj", "up_proj"} and "forward" in experts.__dict__
    assert torch.equal(logits_of(model, batch), reference)
    handle.remove()
    assert DELTAS_ATTRIBUTE not in experts.__dict__ and "forward" not in experts.__dict__


class _LinearDelta:
    """A fixed ``ΔW`` on every routed expert, as a :class:`RoutedDeltas` (``rows @ ΔWᵀ``)."""

    placement = "output"

    def __init__(self, delta: torch.Tensor) -> None:
        self.delta = delta

    def grouped(self, rows, expert_ids=None, ends=None, tokens=None, only=None):
        return rows @ self.delta.T


@pytest.mark.parametrize("implementation", ["grouped_mm", "eager"])
def test_post_expert_norm_layout_runs_the_norm_after_the_deltas(implementation):
    """``has_post_expert_norm`` (MuseSpark's experts): a zero delta is bit-identical and a delta ``ΔW`` on
    ``down_proj`` equals the unpatched experts with ``W + ΔW``, the norm applied after both."""
    from transformers.models.muse_spark.configuration_muse_spark import MuseSparkTextConfig
    from transformers.models.muse_spark.modeling_muse_spark import MuseSparkExperts

    from model_patches.expert_storage import FusedExperts
    from moepatch.undo import UndoLog

    config = MuseSparkTextConfig(hidden_size=32, moe_hidden_size=32, moe_intermediate_size=16, num_local_experts=4,
                                 num_attention_heads=4, num_key_value_heads=2, head_dim=8)
    config._experts_implementation = implementation
    experts = MuseSparkExperts(config)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for parameter in experts.parameters():
            parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.2)
    hidden, index = torch.randn(7, 32, generator=generator), torch.randint(0, 4, (7, 2), generator=generator)
    weights = torch.rand(7, 2, generator=generator)
    with torch.no_grad():
        reference = experts(hidden, index, weights)
    delta = torch.randn(32, 16, generator=generator) * 0.3
    log = UndoLog()
    FusedExperts().attach(experts, {"down_proj": _LinearDelta(torch.zeros_like(delta))}, [], log)
    with torch.no_grad():
        assert torch.equal(experts(hidden, index, weights), reference)
        experts.__dict__[DELTAS_ATTRIBUTE] = {"down_proj": _LinearDelta(delta)}
        patched = experts(hidden, index, weights)
        log.undo()  # the class's own implementation again
        assert DELTAS_ATTRIBUTE not in experts.__dict__ and experts.config is config
        experts.down_proj.add_(delta)
        folded = experts(hidden, index, weights)
    torch.testing.assert_close(patched, folded, atol=1e-5, rtol=1e-5)
