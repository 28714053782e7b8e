"""The LoRA-expert layers against independent computations: MoV per head and on the hidden state (MoV, Zadouri et
al., 2023), top-k with and without renormalisation, the sparse top-k path (its output, gradients and FLOPs), and
per-expert dropout masks (MoLA, Gao et al., 2024)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode
from torch.utils.flop_counter import flop_registry
from torch.utils.flop_counter import register_flop_formula

import moepatch
from moepatch.lora_experts.config import LoraExpertsConfig
from moepatch.lora_experts.layers import LoraExperts
from moepatch.lora_experts.layers import VectorExperts
from moepatch.testing import tiny
from moepatch.validation import Problems


def _probs(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    return torch.softmax(x.double() @ weight.double().T, dim=-1)


def _top_k_weights(probs: torch.Tensor, k: int | None, renormalize: bool) -> torch.Tensor:
    """Dense ``[..., E]`` weights: all probabilities, or the top-k's (renormalised or not), zeros elsewhere."""
    if k is None:
        return probs
    values, indices = probs.topk(k, dim=-1)
    if renormalize:
        values = values / values.sum(-1, keepdim=True)
    return torch.zeros_like(probs).scatter(-1, indices, values)


def _lora_reference(layer: LoraExperts, x: torch.Tensor, weights: torch.Tensor, alpha: float) -> torch.Tensor:
    """``Σ_e w_e (α/r_e) B_e A_e x`` token by token, expert by expert, in float64."""
    flat, w = x.reshape(-1, x.shape[-1]).double(), weights.reshape(-1, weights.shape[-1])
    out = torch.zeros(flat.shape[0], layer.out_features, dtype=torch.float64)
    for t in range(flat.shape[0]):
        for e, rank in enumerate(layer.ranks):
            if w[t, e] != 0:
                a, b = layer.lora_A[e].double(), layer.lora_B[e].double()
                out[t] += w[t, e] * (alpha / rank) * (b @ (a @ flat[t]))
    return out.reshape(*x.shape[:-1], layer.out_features)


def _trained(layer: torch.nn.Module) -> torch.nn.Module:
    for name, parameter in layer.named_parameters():
        if "lora_B" in name or name == "delta":
            torch.nn.init.normal_(parameter, std=0.5)  # B = 0 / δ = 0 at init: make every expert count
    return layer


# --- MoV -------------------------------------------------------------------------------------------------------------


def test_mov_per_head_equals_an_independent_per_head_computation():
    """MoVAttention: each head's vector is scaled by the mixture its own head_dim slice chose."""
    torch.manual_seed(0)
    heads, experts, head_dim = 3, 4, 5
    layer = _trained(VectorExperts(heads * head_dim, experts, heads=heads))
    assert layer.delta.shape == (heads, experts, head_dim) and layer.router.weight.shape == (experts, head_dim)
    t = torch.randn(2, 6, heads * head_dim)
    expected = torch.empty(2, 6, heads * head_dim, dtype=torch.float64)
    vectors = layer.vectors().double()  # [heads, E, head_dim]
    for b in range(2):
        for s in range(6):
            for h in range(heads):
                piece = t[b, s, h * head_dim : (h + 1) * head_dim].double()
                p = torch.softmax(layer.router.weight.double() @ piece, dim=0)
                expected[b, s, h * head_dim : (h + 1) * head_dim] = piece * (p @ vectors[h])
    torch.testing.assert_close(layer(t).double(), expected, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("heads", [None, 2])
def test_mov_router_on_the_hidden_state_equals_an_independent_computation(heads):
    """``router_input: "hidden"``: one mixture per token from the projection's input, used by every head."""
    torch.manual_seed(0)
    layer = _trained(VectorExperts(8, 3, heads=heads, router_features=6))
    t, hidden = torch.randn(5, 8), torch.randn(5, 6)
    p = _probs(hidden, layer.router.weight)  # [5, E]
    vectors = layer.vectors().double()
    if heads is None:
        scale = p @ vectors
    else:
        scale = torch.cat([p @ vectors[h] for h in range(heads)], dim=-1)
    torch.testing.assert_close(layer(t, hidden).double(), t.double() * scale, atol=1e-6, rtol=1e-6)
    with pytest.raises(ValueError, match="router_input 'hidden'"):
        layer(t)


@pytest.mark.parametrize("renormalize", [True, False])
def test_mov_top_k_with_and_without_renormalisation(renormalize):
    """Without renormalisation the code's ``t ⊙ Σ_{e∈top-k} p_e v_e`` (the mask shrinks the scale); with it, MoLA's."""
    torch.manual_seed(0)
    layer = _trained(VectorExperts(6, 4, top_k=2, renormalize=renormalize))
    t = torch.randn(7, 6)
    weights = _top_k_weights(_probs(t, layer.router.weight), 2, renormalize)
    expected = t.double() * (weights @ layer.vectors().double())
    torch.testing.assert_close(layer(t).double(), expected, atol=1e-6, rtol=1e-6)


def _k_proj_reference(model: torch.nn.Module, path: str, x: torch.Tensor, heads: int) -> torch.Tensor:
    """The adapted key projection recomputed from the base weight, the router and the vectors (per head)."""
    projection = model.get_submodule(path)
    base = F.linear(x.double(), projection.weight.double(),
                    None if projection.bias is None else projection.bias.double())
    experts = projection.lora_experts
    per_head = base.unflatten(-1, (heads, -1))  # [..., heads, head_dim]
    p = _probs(per_head, experts.router.weight)  # [..., heads, E]
    return (per_head * torch.einsum("...he,hed->...hd", p, experts.vectors().double())).flatten(-2)


def test_mov_on_a_model_runs_per_head_on_keys_and_values_and_flat_on_down_proj():
    model = tiny.tiny_model("qwen2_moe")
    moepatch.apply(model, {"lora_experts": {"method": "mov", "num_experts": 3}})
    heads = model.config.num_key_value_heads
    attention = model.model.layers[0].self_attn
    for name in ("k_proj", "v_proj"):
        experts = getattr(attention, name).lora_experts
        assert experts.delta.shape == (heads, 3, 16 // heads) and experts.router.weight.shape == (3, 16 // heads)
    down = model.model.layers[0].mlp.shared_expert.down_proj.lora_experts
    assert down.heads is None and down.delta.shape == (3, down.features)
    _trained(attention.k_proj.lora_experts)
    x = torch.randn(2, 5, 32)
    with torch.no_grad():
        got = attention.k_proj(x)
    torch.testing.assert_close(got.double(), _k_proj_reference(model, "model.layers.0.self_attn.k_proj", x, heads),
                               atol=1e-5, rtol=1e-5)


def test_mov_flat_and_hidden_router_through_the_model_hook():
    model = tiny.tiny_model("qwen2_moe")
    moepatch.apply(model, {"lora_experts": {"method": "mov", "num_experts": 3, "per_head": False,
                                            "router_input": "hidden", "target_modules": ["k_proj"]}})
    projection = model.model.layers[1].self_attn.k_proj
    experts = _trained(projection.lora_experts)
    assert experts.delta.shape == (3, 16) and experts.router.weight.shape == (3, 32)
    x = torch.randn(4, 32)
    base = F.linear(x.double(), projection.weight.double(), projection.bias.double())
    expected = base * (_probs(x, experts.router.weight) @ experts.vectors().double())
    with torch.no_grad():
        torch.testing.assert_close(projection(x).double(), expected, atol=1e-5, rtol=1e-5)


def test_mov_per_head_balance_loss_rows_name_their_tokens():
    """Per-head routing gives heads × tokens logits rows; each names its token so padding stays out of the loss."""
    layer = VectorExperts(8, 4, top_k=2, heads=2)
    layer(torch.randn(2, 3, 8))
    assert layer.router.last_logits.shape == (2, 3, 2, 4)
    assert torch.equal(layer.router.last_tokens, torch.tensor([0, 0, 1, 1, 2, 2, 3, 3, 4, 4, 5, 5]))


def test_mov_per_head_needs_whole_heads():
    model = tiny.tiny_model("qwen2_moe")
    model.config.num_key_value_heads = 3  # the 16-wide keys do not split into 3 heads
    with pytest.raises(ValueError, match=r"lora_experts\.per_head: model\.layers\.0\.self_attn\.k_proj \(16 wide\)"):
        moepatch.apply(model, {"lora_experts": {"method": "mov", "target_modules": ["k_proj"]}})
    assert moepatch.apply(model, {"lora_experts": {"method": "mov", "target_modules": ["k_proj"],
                                                   "per_head": False}}).lora_targets


# --- LoRA experts: top-k, sparse path, FLOPs, dropout ----------------------------------------------------------------


@pytest.mark.parametrize("renormalize", [True, False])
@pytest.mark.parametrize(("ranks", "width"), [([2, 5, 3, 4], (12, 7)), ([4, 4, 4, 4, 4], (16, 24))])
def test_top_k_equals_the_dense_formula_with_zero_weights(renormalize, ranks, width):
    """The sparse path (odd widths: the per-expert loop; aligned ones: the grouped GEMM) equals the per-token sum
    over the chosen experts, weights renormalised (MoLA) or not (MoV's mask); gradients too."""
    torch.manual_seed(0)
    layer = _trained(LoraExperts(*width, ranks, top_k=2, renormalize=renormalize, alpha=8.0))
    x = torch.randn(3, 5, width[0], requires_grad=True)
    weights = _top_k_weights(_probs(x.detach(), layer.router.weight), 2, renormalize)
    got = layer(x)
    torch.testing.assert_close(got.double(), _lora_reference(layer, x.detach(), weights, 8.0), atol=1e-5, rtol=1e-5)
    got.sum().backward()  # an expanded gradient, as a plain sum gives
    dense = LoraExperts(*width, ranks, top_k=None, alpha=8.0)
    dense.load_state_dict(layer.state_dict())
    x2 = x.detach().clone().requires_grad_()
    dense.mix(x2, _top_k_weights(_probs(x2, dense.router.weight), 2, renormalize).float()).sum().backward()
    torch.testing.assert_close(x.grad, x2.grad, atol=1e-5, rtol=1e-5)
    for mine, reference in zip(layer.lora_B, dense.lora_B, strict=True):
        torch.testing.assert_close(mine.grad, reference.grad, atol=1e-5, rtol=1e-5)


def test_top_k_in_float64_and_on_no_rows():
    torch.manual_seed(0)
    layer = _trained(LoraExperts(16, 16, [4, 4, 4], top_k=1)).double()
    x = torch.randn(6, 16, dtype=torch.float64)
    weights = _top_k_weights(_probs(x, layer.router.weight), 1, True)
    torch.testing.assert_close(layer(x), _lora_reference(layer, x, weights, 16.0))
    assert layer(torch.empty(0, 16, dtype=torch.float64)).shape == (0, 16)  # a routed expert that got no token


def test_fresh_top_k_experts_add_exact_zeros():
    layer = LoraExperts(16, 24, [8, 4], top_k=1)
    assert torch.equal(layer(torch.randn(9, 16)), torch.zeros(9, 24))


def _grouped_mm_flops(a_shape, b_shape, *args, out_shape=None, **kwargs) -> int:
    """``[S, K] @ groups of [K, N]``: every row meets one group's matrix, ``2·S·K·N``."""
    return 2 * a_shape[0] * a_shape[1] * b_shape[-1]


def _flops(layer: torch.nn.Module, x: torch.Tensor) -> int:
    if torch.ops.aten._grouped_mm not in flop_registry:  # torch does not count grouped GEMMs (yet)
        register_flop_formula(torch.ops.aten._grouped_mm)(_grouped_mm_flops)
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        layer(x)
    return counter.get_total_flops()


def test_top_k_costs_about_k_over_n_of_the_dense_merge():
    torch.manual_seed(0)
    tokens, width, rank, experts, k = 256, 512, 8, 16, 2
    x = torch.randn(tokens, width)
    dense = _flops(LoraExperts(width, width, [rank] * experts, top_k=None), x)
    sparse = _flops(LoraExperts(width, width, [rank] * experts, top_k=k), x)
    router = 2 * tokens * width * experts
    assert dense == router + 2 * tokens * experts * rank * 2 * width  # x·A and h·B over all Σr columns
    assert sparse == router + 2 * tokens * k * rank * 2 * width  # only the k chosen experts' columns
    assert sparse <= 0.4 * dense


def test_dense_dropout_draws_one_mask_per_expert():
    torch.manual_seed(0)
    layer = _trained(LoraExperts(10, 6, [2, 3, 2], top_k=None, dropout=0.5, alpha=4.0)).train()
    x = torch.randn(4, 10)
    torch.manual_seed(7)
    got = layer(x)
    torch.manual_seed(7)
    masks = [F.dropout(torch.ones(4, 10), 0.5) for _ in layer.ranks]  # expert by expert, in order
    p = _probs(x, layer.router.weight)
    expected = sum(p[:, e : e + 1] * (4.0 / r) * ((x * masks[e]).double() @ layer.lora_A[e].double().T
                                                  @ layer.lora_B[e].double().T) for e, r in enumerate(layer.ranks))
    torch.testing.assert_close(got.double(), expected, atol=1e-5, rtol=1e-5)
    assert not torch.equal(masks[0], masks[1])
    layer.eval()
    torch.testing.assert_close(layer(x).double(), _lora_reference(layer, x, p, 4.0), atol=1e-5, rtol=1e-5)


def test_top_k_dropout_draws_one_mask_per_token_and_chosen_expert():
    torch.manual_seed(0)
    layer = _trained(LoraExperts(16, 8, [4, 4, 4, 4], top_k=2, dropout=0.3)).train()
    x = torch.randn(5, 16)
    torch.manual_seed(3)
    got = layer(x)
    torch.manual_seed(3)
    masks = F.dropout(torch.ones(5, 2, 16), 0.3)  # [token, choice, in], drawn in token order
    probs = _probs(x, layer.router.weight)
    values, indices = probs.topk(2, dim=-1)
    values = values / values.sum(-1, keepdim=True)
    expected = torch.zeros(5, 8, dtype=torch.float64)
    for t in range(5):
        for slot in range(2):
            e = int(indices[t, slot])
            hidden = layer.lora_A[e].double() @ (x[t] * masks[t, slot]).double()
            expected[t] += values[t, slot] * 4.0 * (layer.lora_B[e].double() @ hidden)
    torch.testing.assert_close(got.double(), expected, atol=1e-5, rtol=1e-5)


# --- config ----------------------------------------------------------------------------------------------------------


def _parse(block: dict) -> tuple[LoraExpertsConfig | None, list[str]]:
    problems = Problems()
    config = LoraExpertsConfig.parse(block, "moepatch.lora_experts", problems)
    return config, problems.messages


def test_method_defaults_follow_the_published_configs():
    mov, _ = _parse({"method": "mov"})
    molora, _ = _parse({"method": "molora"})
    mola, _ = _parse({"method": "mola"})
    assert (mov.num_experts, mov.per_head, mov.router_input) == (30, True, "scaled")  # configs/mov.gin; the code
    assert (molora.num_experts, molora.r, molora.dropout) == (10, 4, 0.0)  # configs/molora.gin
    assert (mola.dropout, mola.renormalize, mola.top_k) == (0.05, True, 2)  # MoLA's --lora_dropout, top-k
    again, problems = _parse(mov.to_dict())
    assert not problems and again.to_dict() == mov.to_dict()
    assert _parse(mola.to_dict())[0].to_dict() == mola.to_dict()


@pytest.mark.parametrize(
    ("block", "message"),
    [
        ({"method": "mola", "renormalize": "yes"}, "moepatch.lora_experts.renormalize: expected true or false"),
        ({"method": "molora", "renormalize": False}, "moepatch.lora_experts.renormalize: only top-k routing"),
        ({"method": "molora", "router_input": "hidden"}, "moepatch.lora_experts.router_input: only MoV"),
        ({"method": "mola", "per_head": True}, "moepatch.lora_experts.per_head: only MoV"),
        ({"method": "mov", "router_input": "x"}, "moepatch.lora_experts.router_input: expected one of"),
        ({"method": "mov", "per_head": 1}, "moepatch.lora_experts.per_head: expected true or false"),
    ],
)
def test_bad_routing_fields_name_the_field(block, message):
    _, problems = _parse(block)
    assert any(problem.startswith(message) for problem in problems), problems


def test_experts_follow_the_models_mode_so_eval_has_no_dropout():
    model = tiny.tiny_model("qwen2_moe").eval()
    moepatch.apply(model, {"lora_experts": {"method": "mola", "num_experts": 2, "target_modules": ["q_proj"]}})
    sets = [m for m in model.modules() if isinstance(m, LoraExperts)]
    assert sets and all(not m.training and m.dropout.p == 0.05 for m in sets)
