"""LoRA experts on the routed experts of every expert layout transformers 5 has besides the plain fused one: gpt-oss
(``gate_up_proj [E, H, 2I]``, gate / up interleaved over the columns, biases, clamped SwiGLU), Aria (transposed,
concatenated), Llama 4 (transposed, every expert run on every token, inputs scaled by the dense routing weights),
Ergo (gate-less and transposed, each route normed by its expert's RMSNorm) and Nemotron-H (gate-less ``[E, out, in]``,
here with a latent projection around the experts).

Each layout is checked against a computation written here from the published modeling file (never through moepatch):
a trained single-expert LoRA set on routed expert ``e`` is the weight ``W_e + (α/r)·B A`` in the slice of the stored
tensor that holds the targeted projection — so a delta in the wrong columns, rows or orientation fails.  A fresh set
leaves the logits bit-identical, ``remove()`` restores them bit for bit, the sets see exactly the tokens the router
sent each expert, gradient reaches them, and merging folds them into the right slice.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from helpers import model_state

import moepatch
from moepatch.lora_experts.routed import RoutedExpertSets
from moepatch.testing import tiny_kinds
from moepatch.tools.lora_experts.merge import merge_into_base

TYPES = ("gpt_oss", "aria_text", "llama4_text", "ergo", "nemotron_h")
GATED = {"gpt_oss", "aria_text", "llama4_text"}
FUSED_TYPES = ("gpt_oss", "aria_text", "ergo", "nemotron_h")
"""The types whose experts dispatch through transformers' experts interface (Llama 4's run their own forward)."""


def _nemotron_h() -> torch.nn.Module:
    """A tiny Nemotron-H (not among ``tiny_kinds``): attention, then two MoE layers, with a latent projection so
    that the experts' width differs from the hidden size."""
    from transformers import AutoModelForCausalLM
    from transformers import NemotronHConfig

    config = NemotronHConfig(vocab_size=tiny_kinds.TINY_VOCAB_SIZE, hidden_size=32, moe_intermediate_size=16,
                             moe_shared_expert_intermediate_size=16, moe_latent_size=24, n_routed_experts=8,
                             num_experts_per_tok=2, n_group=1, topk_group=1, num_attention_heads=4,
                             num_key_value_heads=2, head_dim=8, layers_block_type=["attention", "moe", "moe"],
                             num_hidden_layers=3, mlp_hidden_act="relu2", routed_scaling_factor=2.5)
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()


def _model(model_type: str) -> torch.nn.Module:
    return _nemotron_h() if model_type == "nemotron_h" else tiny_kinds.tiny_kind_model(model_type).eval()


def _batch(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Three right-padded rows of random tokens."""
    generator = torch.Generator().manual_seed(1)
    input_ids = torch.randint(3, model.config.vocab_size, (3, 11), generator=generator)
    attention_mask = torch.ones_like(input_ids)
    attention_mask[1, 8:] = 0
    attention_mask[2, 5:] = 0
    return {"input_ids": input_ids, "attention_mask": attention_mask}


def _logits(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    with torch.no_grad():
        return model(**batch).logits


def _projections(model_type: str) -> tuple[str, ...]:
    return ("gate_proj", "up_proj", "down_proj") if model_type in GATED else ("up_proj", "down_proj")


def _lora(projections: tuple[str, ...], **extra: object) -> dict:
    """One LoRA expert of rank 2 per routed expert on ``projections`` (named through the experts' module)."""
    return {"lora_experts": {"method": "molora", "num_experts": 1, "r": 2,
                             "target_modules": [f"experts.{p}" for p in projections], **extra}}


def _experts(model: torch.nn.Module) -> list[torch.nn.Module]:
    return [layer.experts for layer in moepatch.describe(model).layers]


def _randomise(model: torch.nn.Module, seed: int = 3) -> None:
    """Trained-looking LoRA weights (B is zero when fresh)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if ".lora_experts." in name and ("lora_A" in name or "lora_B" in name):
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.1)


def _deltas(experts: torch.nn.Module, projection: str) -> torch.Tensor:
    """``[E, out, in]``: ``ΔW_e = (α/r)·B A`` of each routed expert's single LoRA expert."""
    sets = experts.lora_experts[projection].sets
    return torch.stack([s.scaling[0] * (s.lora_B[0] @ s.lora_A[0]) for s in sets]).detach().double()


# ---------------------------------------------------------------- the published layouts, written out by hand
def _weights_with_deltas(model_type: str, experts: torch.nn.Module, deltas: dict[str, torch.Tensor]
                         ) -> dict[str, torch.Tensor]:
    """The experts' tensors (float64) with each ``ΔW [E, out, in]`` added where the modeling file keeps that
    projection."""
    weights = {name: p.detach().double().clone() for name, p in experts.named_parameters(recurse=False)}
    zero = {name: 0.0 for name in ("gate_proj", "up_proj", "down_proj")}
    d = {**zero, **deltas}
    t = {name: (value.transpose(1, 2) if isinstance(value, torch.Tensor) else value) for name, value in d.items()}
    if model_type == "gpt_oss":  # gate_up_proj [E, H, 2I]: gate at even columns, up at odd; down_proj [E, I, H]
        weights["gate_up_proj"][:, :, 0::2] += t["gate_proj"]
        weights["gate_up_proj"][:, :, 1::2] += t["up_proj"]
        weights["down_proj"] += t["down_proj"]
    elif model_type in ("aria_text", "llama4_text"):  # gate_up_proj [E, H, 2I]: gate columns, then up; [E, I, H]
        half = weights["gate_up_proj"].shape[-1] // 2
        weights["gate_up_proj"][:, :, :half] += t["gate_proj"]
        weights["gate_up_proj"][:, :, half:] += t["up_proj"]
        weights["down_proj"] += t["down_proj"]
    elif model_type == "ergo":  # up_proj [E, H, I], down_proj [E, I, H]
        weights["up_proj"] += t["up_proj"]
        weights["down_proj"] += t["down_proj"]
    else:  # nemotron_h: up_proj [E, I, H], down_proj [E, H, I] (applied with F.linear)
        weights["up_proj"] += d["up_proj"]
        weights["down_proj"] += d["down_proj"]
    return weights


def _relu2(x: torch.Tensor) -> torch.Tensor:
    return F.relu(x) ** 2


def _published_experts(model_type: str, config: object, weights: dict[str, torch.Tensor], hidden: torch.Tensor,
                       top_k_index: torch.Tensor, top_k_weights: torch.Tensor, norm: torch.Tensor | None = None
                       ) -> torch.Tensor:
    """The experts' output from the modeling file's formulas, one route at a time, in float64 (``norm``: Ergo's
    per-expert RMSNorm weights ``[E, H]``)."""
    x = hidden.double()
    out = torch.zeros_like(x)
    for t in range(x.shape[0]):
        for slot in range(top_k_index.shape[1]):
            e, w = int(top_k_index[t, slot]), top_k_weights[t, slot].double()
            if model_type == "gpt_oss":  # GptOssExperts.forward / _apply_gate
                gate_up = x[t] @ weights["gate_up_proj"][e] + weights["gate_up_proj_bias"][e]
                gate, up = gate_up[::2], gate_up[1::2]
                gate = gate.clamp(max=config.swiglu_limit)
                up = up.clamp(min=-config.swiglu_limit, max=config.swiglu_limit)
                inner = (up + 1) * (gate * torch.sigmoid(gate * config.swiglu_alpha))
                route = inner @ weights["down_proj"][e] + weights["down_proj_bias"][e]
            elif model_type == "aria_text":  # AriaExperts.forward: SiLU-gated whatever hidden_act says
                gate, up = (x[t] @ weights["gate_up_proj"][e]).chunk(2)
                route = (F.silu(gate) * up) @ weights["down_proj"][e]
            elif model_type == "ergo":  # ErgoExpertProjections + the per-expert RMSNorm of ErgoExperts
                route = _relu2(x[t] @ weights["up_proj"][e]) @ weights["down_proj"][e]
                route = route * torch.rsqrt(route.pow(2).mean() + config.rms_norm_eps) * norm[e]
            else:  # NemotronHExperts.forward
                route = F.linear(_relu2(F.linear(x[t], weights["up_proj"][e])), weights["down_proj"][e])
            out[t] += w * route
    return out


def _input_width(model_type: str, experts: torch.nn.Module) -> int:
    """The experts' input width as each modeling file stores it."""
    if model_type in ("gpt_oss", "aria_text"):
        return experts.gate_up_proj.shape[1]  # [E, H, 2I]
    return experts.up_proj.shape[1 if model_type == "ergo" else 2]  # Ergo [E, H, I]; Nemotron-H [E, I, latent]


# ---------------------------------------------------------------- tests
@pytest.mark.parametrize("model_type", TYPES)
def test_fresh_experts_are_bit_identical_and_remove_restores_everything(model_type):
    model = _model(model_type)
    batch = _batch(model)
    reference, state = _logits(model, batch), model_state(model)
    handle = moepatch.apply(model, _lora(_projections(model_type), routed_experts=True))
    assert handle.lora_targets and all(any(p in t for p in _projections(model_type)) for t in handle.lora_targets)
    assert any(isinstance(module, RoutedExpertSets) for module in model.modules())
    assert torch.equal(_logits(model, batch), reference)
    _randomise(model)
    assert not torch.allclose(_logits(model, batch), reference, atol=1e-4)  # the routed deltas count
    handle.remove()
    assert torch.equal(_logits(model, batch), reference)
    assert model_state(model) == state


@pytest.mark.parametrize("implementation", ["grouped_mm", "eager"])
@pytest.mark.parametrize("model_type", FUSED_TYPES)
def test_fused_layouts_under_each_implementation(model_type, implementation):
    """Bit-identical fresh under the model's own implementation, then each projection on its own: the experts'
    output equals the published formulas with ``W_e + ΔW_e`` in exactly that projection's slice."""
    model = _model(model_type)
    model.set_experts_implementation(implementation)
    batch = _batch(model)
    reference = _logits(model, batch)
    for projection in _projections(model_type):
        handle = moepatch.apply(model, _lora((projection,)))
        assert torch.equal(_logits(model, batch), reference)
        _randomise(model)
        experts = _experts(model)[0]
        generator = torch.Generator().manual_seed(5)
        tokens, num, k = 13, experts.num_experts, 2
        hidden = torch.randn(tokens, _input_width(model_type, experts), generator=generator)
        top_k_index = torch.stack([torch.randperm(num, generator=generator)[:k] for _ in range(tokens)])
        top_k_weights = torch.rand(tokens, k, generator=generator)
        with torch.no_grad():
            got = experts(hidden, top_k_index, top_k_weights)
        weights = _weights_with_deltas(model_type, experts, {projection: _deltas(experts, projection)})
        norm = experts.post_expert_norm.weight.detach().double() if model_type == "ergo" else None
        expected = _published_experts(model_type, model.config, weights, hidden, top_k_index, top_k_weights, norm)
        torch.testing.assert_close(got.double(), expected, atol=2e-5, rtol=1e-4)
        handle.remove()
        assert torch.equal(_logits(model, batch), reference)


def test_llama4_experts_run_every_expert_with_the_deltas_on_the_rows_the_router_sent():
    """``Llama4TextExperts`` gets ``[E·T, H]`` rows, token t scaled by its routing weight for expert e (zero unless
    chosen); the output equals the published batched products with ``W_e + ΔW_e`` on every row."""
    model = _model("llama4_text")
    handle = moepatch.apply(model, _lora(_projections("llama4_text")))
    _randomise(model)
    experts = _experts(model)[0]
    generator = torch.Generator().manual_seed(5)
    num, tokens, hidden_size, k = experts.num_experts, 13, experts.hidden_size, 2
    hidden = torch.randn(tokens, hidden_size, generator=generator)
    scores = torch.zeros(tokens, num)
    for t in range(tokens):
        scores[t, torch.randperm(num, generator=generator)[:k]] = torch.rand(k, generator=generator) + 0.1
    routed_in = hidden.repeat(num, 1) * scores.transpose(0, 1).reshape(-1, 1)  # Llama4TextMoe.forward
    with torch.no_grad():
        got = experts(routed_in)
    deltas = {p: _deltas(experts, p) for p in _projections("llama4_text")}
    weights = _weights_with_deltas("llama4_text", experts, deltas)
    x = routed_in.double().view(num, tokens, hidden_size)
    gate, up = torch.bmm(x, weights["gate_up_proj"]).chunk(2, dim=-1)
    expected = torch.bmm(up * F.silu(gate), weights["down_proj"]).view(-1, hidden_size)
    torch.testing.assert_close(got.double(), expected, atol=2e-5, rtol=1e-4)
    handle.remove()


@pytest.mark.parametrize("model_type", TYPES)
def test_trained_model_equals_the_model_with_the_deltas_folded_by_hand(model_type):
    """The whole model, routing included: the patched logits equal those of an unpatched copy whose expert tensors
    were changed by hand to ``W_e + ΔW_e`` in each projection's slice."""
    model = _model(model_type)
    batch = _batch(model)
    folded = copy.deepcopy(model)
    moepatch.apply(model, _lora(_projections(model_type)))
    _randomise(model)
    with torch.no_grad():
        for experts, target in zip(_experts(model), _experts(folded), strict=True):
            deltas = {p: _deltas(experts, p) for p in _projections(model_type)}
            weights = _weights_with_deltas(model_type, experts, deltas)
            for name, parameter in target.named_parameters(recurse=False):
                parameter.copy_(weights[name].to(parameter.dtype))
    torch.testing.assert_close(_logits(model, batch), _logits(folded, batch), atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("model_type", TYPES)
def test_sets_see_exactly_the_tokens_the_router_sent_and_gradient_reaches_them(model_type):
    """Every (routed expert, token) pair the router chose reaches that expert's set once, with the row the expert's
    projection receives (Ergo repeats each token per route: its rows still carry their token); a training step with
    the balance loss over padded rows sends gradient to the sets' LoRA weights."""
    model = _model(model_type).train()
    block = _lora(("up_proj",))
    block["lora_experts"] |= {"method": "mola", "num_experts": 2, "top_k": 1, "dropout": 0.0, "balance_loss": True}
    moepatch.apply(model, block)
    batch = _batch(model)
    structure = moepatch.describe(model)
    chosen: dict[int, torch.Tensor] = {}
    seen: dict[int, list[tuple]] = {}
    handles = []
    for index, layer in enumerate(structure.layers):
        if model_type == "llama4_text":  # the router's dense [T, E] weights: the chosen experts are non-zero
            handles.append(layer.router.register_forward_hook(
                lambda m, a, out, i=index: chosen.__setitem__(i, out[0].detach() != 0)))
        else:  # the experts' own call: top_k_index [T, k]
            handles.append(layer.experts.register_forward_pre_hook(
                lambda m, a, i=index: chosen.__setitem__(i, F.one_hot(a[1], m.num_experts).sum(1).bool())))
        sets = layer.experts.lora_experts["up_proj"]
        handles.append(sets.register_forward_pre_hook(lambda m, a, i=index: seen.setdefault(i, []).append(a)))
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    loss = model(**batch, labels=labels).loss
    for handle in handles:
        handle.remove()
    for index in chosen:
        pairs = []
        for _rows, expert_ids, _, tokens, only in seen[index]:
            experts_of_rows = torch.full_like(tokens, only) if only is not None else expert_ids
            pairs += list(zip(experts_of_rows.tolist(), tokens.tolist(), strict=True))
        expected = [(e, t) for t, e in chosen[index].nonzero().tolist()]
        assert sorted(pairs) == sorted(expected), index
    assert model.lora_experts_aux["balance_loss"] > 0
    loss.backward()
    grads = [p.grad for name, p in model.named_parameters() if ".sets." in name and "lora_B" in name]
    assert grads and all(g is not None and torch.isfinite(g).all() for g in grads)
    assert sum(bool(g.abs().sum() > 0) for g in grads) > len(grads) // 2


@pytest.mark.parametrize("model_type", TYPES)
def test_merge_folds_each_layout_into_its_slice(model_type):
    model = _model(model_type)
    batch = _batch(model)
    moepatch.apply(model, _lora(_projections(model_type)))
    _randomise(model)
    patched = _logits(model, batch)
    merge_into_base(model)
    assert not any(".lora_experts." in name for name, _ in model.named_parameters())
    torch.testing.assert_close(_logits(model, batch), patched, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("model_type", TYPES)
def test_mov_scales_the_routed_intermediate(model_type):
    """MoV on ``down_proj`` scales the routed experts' intermediate: fresh bit-identical, trained different."""
    model = _model(model_type)
    batch = _batch(model)
    reference = _logits(model, batch)
    handle = moepatch.apply(model, {"lora_experts": {"method": "mov", "num_experts": 2,
                                                     "target_modules": ["experts.down_proj"]}})
    assert torch.equal(_logits(model, batch), reference)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if ".sets." in name and name.endswith("delta"):
                parameter.normal_(0, 0.5)
    assert not torch.equal(_logits(model, batch), reference)  # (tiny: Nemotron-H's routed outputs are small)
    handle.remove()
    assert torch.equal(_logits(model, batch), reference)


@pytest.mark.parametrize("model_type", TYPES)
def test_peft_export_where_peft_has_the_layout(tmp_path, model_type):
    """peft's ``target_parameters`` covers a contiguous range of a fused tensor's out axis (``is_transposed`` read
    from the module, as here): Aria, Ergo and Nemotron-H export and reproduce the patched model; gpt-oss's interleaved
    gate / up and Llama 4's unflagged transposed tensors are refused, naming the storage."""
    from peft import PeftModel

    from moepatch.tools.lora_experts.export import export_peft

    model = _model(model_type)
    base = copy.deepcopy(model)
    batch = _batch(model)
    reference = _logits(base, batch)
    moepatch.apply(model, _lora(_projections(model_type)))
    _randomise(model)
    patched = _logits(model, batch)
    if model_type in ("gpt_oss", "llama4_text"):
        storage = "scaled_dense" if model_type == "llama4_text" else "fused"
        with pytest.raises(ValueError, match=f"no layout for '{storage}' routed experts"):
            export_peft(model, tmp_path)
        return
    export_peft(model, tmp_path)
    adapted = PeftModel.from_pretrained(base, tmp_path).eval()
    torch.testing.assert_close(_logits(adapted, batch), patched, atol=2e-5, rtol=1e-5)
    assert not torch.allclose(patched, reference, atol=1e-3)  # the adapter counts
