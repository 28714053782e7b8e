"""LoRA experts leaving moepatch: exact merges into the base, peft adapters, official MoLA / GuiLoMo checkpoints.

Every expectation is computed here independently: merged weights from ``W + (α / r)·B A`` / ``W·diag(1 + δ)``, peft
adapters through peft itself on the unpatched model, official checkpoints through the official layer's forward
(``W x + Σ_{top-k} w_e · B_e A_e x · α / r``) written below as hooks on the unpatched model.
"""

from __future__ import annotations

import json
import warnings

import pytest
import torch

import moepatch
from moepatch.testing import tiny
from moepatch.tools.lora_experts import export_peft
from moepatch.tools.lora_experts import guilomo_allocation
from moepatch.tools.lora_experts import import_guilomo
from moepatch.tools.lora_experts import import_mola
from moepatch.tools.lora_experts import merge_into_base
from moepatch.tools.lora_experts import write_guilomo_allocation
from tests.helpers import logits_of
from tests.helpers import model_state

ALL_FAMILIES = tiny.TINY_FAMILIES + tiny.NEW_FAMILIES
FUSED_FAMILIES = ("qwen2_moe", "mixtral", "qwen3_moe", "olmoe")


def _train_like(model: torch.nn.Module, seed: int = 1) -> None:
    """Give every LoRA B and (IA)³ δ a non-zero value, as training would."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if ".lora_B." in name or name.endswith(".delta"):
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.1)


def _single_expert(method: str, family: str) -> dict:
    block = {"method": method, "num_experts": 1, "routed_experts": True}
    if method == "molora":
        block["r"] = 4
    if method == "mov" and family == "moduleformer":
        block["target_modules"] = ["down_proj"]  # its keys / values are identities: no weight to fold into
    return block


# ---------------------------------------------------------------- merge_into_base


@pytest.mark.parametrize("method", ["molora", "mov"])
@pytest.mark.parametrize("family", ALL_FAMILIES)
def test_merge_equals_the_patched_model_and_leaves_no_trace(family, method):
    model = tiny.tiny_model(family)
    batch = tiny.demo_batch()
    logits_of(model, batch)  # some families keep per-call state (LLaMA-MoE's row_tokens): compare like with like
    before = model_state(model)
    moepatch.apply(model, {"lora_experts": _single_expert(method, family)})
    _train_like(model)
    patched = logits_of(model, batch)
    assert merge_into_base(model) is None
    assert model_state(model) == before  # no module, hook, forward, flag or config entry left
    assert not any(".lora_experts." in name for name, _ in model.named_parameters())
    torch.testing.assert_close(logits_of(model, batch), patched, atol=5e-5, rtol=1e-5)


def test_merged_weights_equal_the_lora_fold():
    model = tiny.tiny_model("mixtral")
    base = {name: p.detach().clone().double() for name, p in model.named_parameters()}
    moepatch.apply(model, {"lora_experts": {"method": "molora", "num_experts": 1, "r": 4, "alpha": 6.0,
                                            "routed_experts": True}})
    _train_like(model)
    attention = model.model.layers[1].self_attn.q_proj.lora_experts
    gate = model.model.layers[1].mlp.experts.lora_experts["gate_proj"].sets[5]
    down = model.model.layers[1].mlp.experts.lora_experts["down_proj"].sets[5]
    expected_q = base["model.layers.1.self_attn.q_proj.weight"] + 6.0 / 4 * (
        attention.lora_B[0].double() @ attention.lora_A[0].double())
    expected_gate = base["model.layers.1.mlp.experts.gate_up_proj"][5, :16] + 1.5 * (
        gate.lora_B[0].double() @ gate.lora_A[0].double())
    expected_down = base["model.layers.1.mlp.experts.down_proj"][5] + 1.5 * (
        down.lora_B[0].double() @ down.lora_A[0].double())
    merge_into_base(model)
    layer = model.model.layers[1]
    torch.testing.assert_close(layer.self_attn.q_proj.weight.double(), expected_q, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(layer.mlp.experts.gate_up_proj[5, :16].double(), expected_gate, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(layer.mlp.experts.down_proj[5].double(), expected_down, atol=1e-6, rtol=1e-6)


def test_merged_ia3_scales_rows_bias_and_columns():
    model = tiny.tiny_model("qwen2_moe")  # biased v_proj: (IA)³ on its output scales the bias too
    v_proj = model.model.layers[0].self_attn.v_proj
    shared_down = model.model.layers[0].mlp.shared_expert.down_proj
    weight, bias, down = v_proj.weight.detach().clone(), v_proj.bias.detach().clone(), shared_down.weight.clone()
    moepatch.apply(model, {"lora_experts": {"method": "mov", "num_experts": 1}})
    _train_like(model)
    v_scale = 1 + v_proj.lora_experts.delta[:, 0].detach().reshape(-1)  # per head [heads, 1, head_dim], in order
    down_scale = 1 + shared_down.lora_experts.delta[0].detach().clone()
    merge_into_base(model)
    torch.testing.assert_close(v_proj.weight, weight * v_scale[:, None], atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(v_proj.bias, bias * v_scale, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(shared_down.weight, down * down_scale[None, :], atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize(
    ("family", "block", "message"),
    [
        ("mixtral", {"method": "mola", "num_experts": 4, "top_k": 2},
         r"model\.layers\.0\.self_attn\.q_proj: 4 experts mixed per token \(top_k=2\) — token-dependent routing"),
        ("llama_moe", {"method": "molora", "num_experts": 3, "routed_experts": True,
                       "target_modules": ["gate_proj"]}, r"experts\.gate_proj: 3 experts mixed per token"),
        ("moduleformer", {"method": "mov", "num_experts": 1}, r"attn\.k_proj: an \(IA\)³ scale of a projection"),
    ],
)
def test_merge_refuses_what_cannot_be_folded_and_changes_nothing(family, block, message):
    model = tiny.tiny_model(family)
    handle = moepatch.apply(model, {"lora_experts": block})
    _train_like(model)
    batch = tiny.demo_batch()
    reference = logits_of(model, batch)
    weights = {name: p.detach().clone() for name, p in model.named_parameters()}
    with pytest.raises(ValueError, match=message):
        merge_into_base(model)
    assert handle.active and all(torch.equal(p, weights[name]) for name, p in model.named_parameters())
    assert torch.equal(logits_of(model, batch), reference)


def test_merge_keeps_the_other_features_and_needs_experts():
    model = tiny.tiny_model("olmoe")
    moepatch.apply(model, {"freeze_gate": "router", "lora_experts": {"method": "molora", "num_experts": 1}})
    _train_like(model)
    reference = logits_of(model, tiny.demo_batch())
    handle = merge_into_base(model)
    assert handle is not None and handle.active and handle.frozen_parameters and not handle.lora_targets
    assert "lora_experts" not in model.config.moepatch and "freeze_gate" in model.config.moepatch
    torch.testing.assert_close(logits_of(model, tiny.demo_batch()), reference, atol=5e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="carries no LoRA experts"):
        merge_into_base(model)


def test_merged_checkpoint_from_a_config_block_loads_as_a_plain_model(tmp_path):
    checkpoint = tiny.save_tiny_checkpoint(tmp_path / "ckpt", "qwen3_moe",
                                           moepatch={"lora_experts": {"method": "molora", "num_experts": 1}})
    model = moepatch.from_pretrained(checkpoint)
    _train_like(model)
    reference = logits_of(model, tiny.demo_batch())
    merge_into_base(model)
    assert "lora_experts" not in (model.config.moepatch or {})
    model.save_pretrained(tmp_path / "merged")
    reloaded = moepatch.from_pretrained(tmp_path / "merged")
    assert not any(".lora_experts." in name for name, _ in reloaded.named_parameters())
    torch.testing.assert_close(logits_of(reloaded, tiny.demo_batch()), reference, atol=5e-5, rtol=1e-5)


# ---------------------------------------------------------------- export_peft

MIXTRAL_GATE_UP_RANKS = {f"model.layers.{i}.mlp.experts.{p}": (2 if p == "gate_proj" else 4)
                         for i in range(3) for p in ("gate_proj", "up_proj")}


@pytest.mark.parametrize(
    ("family", "block"),
    [(family, block) for family in FUSED_FAMILIES for block in (
        {"method": "molora", "num_experts": 1, "r": 4, "target_modules": ["q_proj", "v_proj"], "dropout": 0.1},
        {"method": "molora", "num_experts": 1, "r": 4, "alpha": 8.0, "routed_experts": True},
    )] + [("mixtral", {"method": "mola", "num_experts": 1, "top_k": 1, "target_modules": ["experts.w1", "experts.w3"],
                       "r": MIXTRAL_GATE_UP_RANKS, "alpha": 5.0}),
          ("mixtral", {"method": "molora", "num_experts": 1, "r": 2, "target_modules": ["gate_proj", "o_proj"],
                       "routed_experts": True})],
)
def test_peft_adapter_reproduces_the_patched_model(tmp_path, family, block):
    from peft import PeftModel

    model = tiny.tiny_model(family)
    moepatch.apply(model, {"lora_experts": block})
    _train_like(model)
    batch = tiny.demo_batch()
    patched = logits_of(model, batch)
    export_peft(model, tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and (tmp_path / "adapter_model.safetensors").is_file()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        peft_model = PeftModel.from_pretrained(tiny.tiny_model(family), tmp_path).eval()
    assert not [w for w in caught if "missing" in str(w.message).lower() or "unexpected" in str(w.message).lower()]
    torch.testing.assert_close(logits_of(peft_model, batch), patched, atol=5e-5, rtol=1e-5)
    assert not torch.allclose(patched, logits_of(tiny.tiny_model(family), batch), atol=1e-3)  # the adapter counts


@pytest.mark.parametrize(
    ("family", "block", "message"),
    [
        ("mixtral", {"method": "molora", "num_experts": 2}, r"q_proj: 2 experts mixed per token by a router"),
        ("olmoe", {"method": "mov", "num_experts": 1}, r"MoV experts are \(IA\)³ scales"),
        ("llama_moe", {"method": "molora", "num_experts": 1, "routed_experts": True},
         r"no layout for 'parameter_list' routed experts"),
        ("dbrx", {"method": "molora", "num_experts": 1, "routed_experts": True},
         r"no layout for 'stacked_rows' routed experts"),
    ],
)
def test_export_refuses_what_peft_cannot_express(tmp_path, family, block, message):
    model = tiny.tiny_model(family)
    moepatch.apply(model, {"lora_experts": block})
    with pytest.raises(ValueError, match=message):
        export_peft(model, tmp_path / "adapter")
    assert not (tmp_path / "adapter").exists()


# ---------------------------------------------------------------- official MoLA / GuiLoMo checkpoints

ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")


def _official_tensors(model: torch.nn.Module, experts: dict[str, int], ranks: dict[str, list[int]], seed: int = 3
                      ) -> dict[str, torch.Tensor]:
    """Random trained-looking weights in the official key layout (peft's ``.default`` already stripped)."""
    generator = torch.Generator().manual_seed(seed)
    tensors = {}
    for path, count in experts.items():
        linear = model.get_submodule(path)
        tensors[f"base_model.model.{path}.router.router.weight"] = torch.randn(count, linear.in_features,
                                                                               generator=generator)
        for e in range(count):
            rank = ranks[path][e]
            tensors[f"base_model.model.{path}.lora_A_{e}.weight"] = torch.randn(rank, linear.in_features,
                                                                                generator=generator) * 0.1
            tensors[f"base_model.model.{path}.lora_B_{e}.weight"] = torch.randn(linear.out_features, rank,
                                                                                generator=generator) * 0.1
    return tensors


def _official_forward(model: torch.nn.Module, tensors: dict[str, torch.Tensor], experts: dict[str, int],
                      top_k: dict[str, int], scaling: dict[str, float]) -> list:
    """Hooks giving each targeted linear the official ``Linear_MoE`` output, from the official tensors."""

    def hook(module, inputs, output, path):
        x = inputs[0].reshape(-1, inputs[0].shape[-1]).double()
        probs = torch.softmax(x @ tensors[f"base_model.model.{path}.router.router.weight"].double().T, dim=-1)
        weights, chosen = probs.topk(top_k[path], dim=-1)
        weights = weights / weights.sum(-1, keepdim=True)
        delta = torch.zeros(x.shape[0], output.shape[-1], dtype=torch.float64)
        for slot in range(top_k[path]):
            for e in range(experts[path]):
                rows = chosen[:, slot] == e
                a = tensors[f"base_model.model.{path}.lora_A_{e}.weight"].double()
                b = tensors[f"base_model.model.{path}.lora_B_{e}.weight"].double()
                delta[rows] += weights[rows, slot, None] * ((x[rows] @ a.T) @ b.T) * scaling[path]
        return output + delta.reshape(output.shape).to(output.dtype)

    return [model.get_submodule(path).register_forward_hook(
        lambda m, i, o, path=path: hook(m, i, o, path)) for path in experts]


def test_import_mola_matches_the_official_layer(tmp_path):
    number_experts, lora_r, top_k = [2, 3, 4], [4, 2, 8], [1, 2, 2]
    reference_model = tiny.tiny_model("mixtral")
    paths = {f"model.layers.{i}.self_attn.{p}": i for i in range(3) for p in ATTENTION}
    experts = {path: number_experts[i] for path, i in paths.items()}
    ranks = {path: [lora_r[i]] * number_experts[i] for path, i in paths.items()}
    tensors = _official_tensors(reference_model, experts, ranks)
    torch.save(tensors, tmp_path / "adapter_model.bin")
    hooks = _official_forward(reference_model, tensors, experts, {p: top_k[i] for p, i in paths.items()},
                              {path: 16.0 / lora_r[i] for path, i in paths.items()})
    batch = tiny.demo_batch()
    expected = logits_of(reference_model, batch)
    for hook in hooks:
        hook.remove()
    model = tiny.tiny_model("mixtral")
    handle = import_mola(model, tmp_path, number_experts="2,3,4", lora_r="4,2,8", top_k="1,2,2",
                         target_modules="q_proj,k_proj,v_proj,o_proj")
    assert sorted(handle.lora_targets) == sorted(paths)
    torch.testing.assert_close(logits_of(model, batch), expected, atol=1e-4, rtol=1e-4)  # float32 vs float64
    assert not torch.allclose(expected, logits_of(tiny.tiny_model("mixtral"), batch), atol=1e-3)


def test_import_guilomo_stage2_with_per_expert_ranks_and_the_shared_scaling(tmp_path):
    from safetensors.torch import save_file

    reference_model = tiny.tiny_model("qwen2_moe")
    paths = [f"model.layers.{i}.self_attn.{p}" for i in range(4) for p in ("q_proj", "v_proj")]
    experts = {path: 2 + index % 3 for index, path in enumerate(paths)}
    all_ranks = {path: [1 + (index + e) % 4 for e in range(4)] for index, path in enumerate(paths)}  # N_max = 4
    rank_json = {f"{path}.expertlora_E_vector_{e}": r for path, rs in all_ranks.items() for e, r in enumerate(rs)}
    tensors = _official_tensors(reference_model, experts, all_ranks)
    save_file(tensors, str(tmp_path / "adapter_model.safetensors"))
    # the official stage-2 layer: scaling = α / r of the module's *last* expert, for every expert
    scaling = {path: 16.0 / all_ranks[path][experts[path] - 1] for path in paths}
    hooks = _official_forward(reference_model, tensors, experts, dict.fromkeys(paths, 2), scaling)
    batch = tiny.demo_batch()
    expected = logits_of(reference_model, batch)
    for hook in hooks:
        hook.remove()
    (tmp_path / "expert.json").write_text(json.dumps(experts))
    model = tiny.tiny_model("qwen2_moe")
    import_guilomo(model, tmp_path, experts=tmp_path / "expert.json", ranks=rank_json, top_k=2,
                   target_modules=["q_proj", "v_proj"])
    torch.testing.assert_close(logits_of(model, batch), expected, atol=1e-4, rtol=1e-4)  # float32 vs float64


def test_guilomo_stage1_allocation_as_the_official_script(tmp_path):
    modules = ["model.layers.0.self_attn.q_proj", "model.layers.1.mlp.down_proj"]
    peaks = {modules[0]: 0, modules[1]: 5}  # argmax 0 → max(2, 1) = 2 experts; argmax 5 → 6
    rank_peaks = {(modules[0], 0): 7, (modules[0], 1): 2, (modules[1], 0): 0, (modules[1], 3): 4}
    state = {}
    for module, peak in peaks.items():
        vector = torch.full((8,), 0.1)
        vector[peak] = 0.9
        state[f"base_model.model.{module}.router_expert_vector.router_expert_vector"] = vector
        state[f"base_model.model.{module}.router.router.weight"] = torch.randn(8, 4)
        state[f"base_model.model.{module}.lora_E_0"] = torch.ones(8, 1)
    for (module, expert), peak in rank_peaks.items():
        vector = torch.linspace(0.0, 0.1, 8)
        vector[peak] = 1.0
        state[f"base_model.model.{module}.expertlora_E_vector_{expert}"] = vector
    torch.save(state, tmp_path / "adapter_model.bin")
    experts, ranks = guilomo_allocation(tmp_path)
    assert experts == {modules[0]: 2, modules[1]: 6}
    assert ranks == {f"{module}.expertlora_E_vector_{expert}": peak + 1
                     for (module, expert), peak in rank_peaks.items()}
    expert_file, rank_file = write_guilomo_allocation(tmp_path, tmp_path / "allocation")
    assert expert_file.read_text() == json.dumps(experts, indent=4)
    assert json.loads(rank_file.read_text()) == ranks


def test_importers_refuse_foreign_keys_bad_shapes_and_code(tmp_path):
    model = tiny.tiny_model("mixtral")
    flags = dict(number_experts=2, lora_r=4, top_k=1, target_modules=["q_proj"])
    paths = {f"model.layers.{i}.self_attn.q_proj": 2 for i in range(3)}
    tensors = _official_tensors(model, paths, {path: [4, 4] for path in paths})
    torch.save({**tensors, "base_model.model.model.layers.0.self_attn.q_proj.lora_E_0": torch.ones(4, 1)},
               tmp_path / "adapter_model.bin")
    with pytest.raises(ValueError, match="not a MoLA-layout checkpoint"):
        import_mola(model, tmp_path, **flags)
    torch.save(tensors, tmp_path / "adapter_model.bin")
    with pytest.raises(ValueError, match="shape mismatch"):
        import_mola(model, tmp_path, **{**flags, "lora_r": 8})
    assert moepatch.get_handle(model) is None and not any(".lora_experts." in n for n, _ in model.named_parameters())
    with pytest.raises(ValueError, match="lora_r: expected comma-separated integers"):
        import_mola(model, tmp_path, **{**flags, "lora_r": "4,x,4"})
    torch.save({"weights": _NotATensor()}, tmp_path / "adapter_model.bin")
    import pickle

    with pytest.raises(pickle.UnpicklingError):
        import_mola(model, tmp_path, **flags)


class _NotATensor:
    """A pickled object that ``weights_only`` loading must not construct."""
