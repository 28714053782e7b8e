"""Per-family facts the tests need, written from each model's published definition (not from moepatch's specs).

Tests compare moepatch against these: where each family keeps its routers, how a router scores experts, which
config keys set E / k / depth, and which parameters each freeze rule must touch.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator

import torch

HF_FAMILIES = ("qwen2_moe", "mixtral", "qwen3_moe", "olmoe")
"""Families whose causal LM adds transformers' load-balancing loss (router_aux_loss_coef)."""

ROUTER_NAME = {
    "moduleformer": re.compile(r"^transformer\.h\.(\d+)\.mlpf\.gate$"),
    "jamba": re.compile(r"^model\.layers\.(\d+)\.feed_forward\.router$"),  # JambaSparseMoeBlock.router
    "dbrx": re.compile(r"^transformer\.blocks\.(\d+)\.ffn\.router$"),  # DbrxFFN.router (a DbrxRouter)
}
_HF_ROUTER = re.compile(r"^model\.layers\.(\d+)\.mlp\.gate$")

ROUTER_PARAMETER = {
    "moduleformer": re.compile(r"transformer\.h\.\d+\.(mlpf|attn\.q_proj)\.gate\.w_gate\.\d+\.(weight|bias)$"),
    "llama_moe": re.compile(r"layers\.\d+\.mlp\.gate\.(gate_network\.\d+|weight_noise)\.weight$"),
    "jamba": re.compile(r"layers\.\d+\.feed_forward\.router\.weight$"),
    "hunyuan_v1_moe": re.compile(r"layers\.\d+\.mlp\.gate\.wg\.weight$"),  # HunYuanMoEV1Gate.wg (nn.Linear)
    "dbrx": re.compile(r"blocks\.\d+\.ffn\.router\.layer\.weight$"),  # DbrxRouter.layer (nn.Linear)
}
_HF_ROUTER_PARAMETER = re.compile(r"layers\.\d+\.mlp\.gate\.weight$")


def router_name_pattern(family: str) -> re.Pattern:
    return ROUTER_NAME.get(family, _HF_ROUTER)


def router_parameter_pattern(family: str) -> re.Pattern:
    """Parameters that freeze_gate='router' must freeze (MoLM: the MLP and the attention-expert gates)."""
    return ROUTER_PARAMETER.get(family, _HF_ROUTER_PARAMETER)


def family_of(model: torch.nn.Module) -> str:
    return model.config.model_type


def moe_routers(model: torch.nn.Module) -> dict[int, torch.nn.Module]:
    """Absolute layer index → router of that layer's MLP mixture."""
    pattern = router_name_pattern(family_of(model))
    found = {}
    for name, module in model.named_modules():
        match = pattern.match(name)
        if match:
            found[int(match.group(1))] = module
    return found


def router_logits(model: torch.nn.Module, router: torch.nn.Module, hidden: torch.Tensor) -> torch.Tensor:
    """Router scores [N, E] before any softmax, from the router's parameters (eval mode: no noise).

    transformers 5 routers: h · Wᵀ (DeepSeek-V2 in float32; HunYuan-MoE's weight is ``wg.weight``, DBRX's
    ``layer.weight``).  ModuleFormer: the gating MLP w_gate = Linear(+bias) → GELU → Dropout → Linear.
    LLaMA-MoE: gate_network = Linear → Tanh → Linear (no biases).
    """
    with torch.no_grad():
        if family_of(model) == "llama_moe":
            first, last = router.gate_network[0], router.gate_network[2]
            return torch.nn.functional.linear(torch.tanh(torch.nn.functional.linear(hidden, first.weight)),
                                              last.weight)
        if family_of(model) == "moduleformer":
            first, last = router.w_gate[0], router.w_gate[3]
            inner = torch.nn.functional.gelu(torch.nn.functional.linear(hidden, first.weight, first.bias))
            return torch.nn.functional.linear(inner, last.weight)
        if family_of(model) == "hunyuan_v1_moe":
            return torch.nn.functional.linear(hidden, router.wg.weight)
        if family_of(model) == "dbrx":
            return torch.nn.functional.linear(hidden, router.layer.weight)
        if family_of(model) == "deepseek_v2":
            return torch.nn.functional.linear(hidden.float(), router.weight.float())
        return torch.nn.functional.linear(hidden, router.weight)


def selection_probabilities(model: torch.nn.Module, router: torch.nn.Module, hidden: torch.Tensor) -> torch.Tensor:
    """float64 softmax over all experts of the router scores: what the top-k (or top-1) is taken over."""
    return torch.softmax(router_logits(model, router, hidden).double(), dim=-1)


def router_probabilities(model: torch.nn.Module, router: torch.nn.Module, hidden: torch.Tensor) -> torch.Tensor:
    """The router probabilities [N, E] (float64) that routing statistics sum.

    Softmax over all experts, except LLaMA-MoE: softmax over the k chosen logits, 0 for the other experts (its
    published ``importance`` sums exactly these).
    """
    probs = selection_probabilities(model, router, hidden)
    if family_of(model) == "llama_moe":
        logits = router_logits(model, router, hidden)
        chosen = torch.topk(logits, model.config.num_selects, dim=-1).indices
        sparse = torch.zeros_like(probs)
        return sparse.scatter_(1, chosen, torch.softmax(logits.gather(1, chosen).double(), dim=-1))
    return probs


def router_output_probabilities(model: torch.nn.Module, output: tuple) -> torch.Tensor:
    """float32 [N, E] probabilities as the router itself produced them (logits → softmax, or returned as is)."""
    if family_of(model) == "moduleformer":
        return output[2].float()
    if family_of(model) == "llama_moe":  # dict; the chosen experts' probabilities only
        dense = torch.zeros(output["topK_indices"].shape[0], model.config.num_experts)
        return dense.scatter_(1, output["topK_indices"], output["topK_scores"].float())
    return torch.softmax(output[0], dim=-1, dtype=torch.float32)


def router_choice(model: torch.nn.Module, output: tuple) -> tuple[torch.Tensor, torch.Tensor]:
    """(weights [N, k], indices [N, k]) from a router's output tuple."""
    if family_of(model) == "moduleformer":  # (top_k_indices, top_k_gates, probs)
        return output[1], output[0]
    if family_of(model) == "llama_moe":
        return output["topK_scores"], output["topK_indices"]
    return output[1], output[2]  # (logits, weights, indices)


def renormalizes(model: torch.nn.Module) -> bool:
    family = family_of(model)
    # LLaMA-MoE: softmax over the k chosen logits; Qwen3.5-MoE, MiniMax and HunYuan divide by the sum unconditionally
    if family in ("mixtral", "llama_moe", "qwen3_5_moe_text", "qwen3_5_moe", "minimax", "hunyuan_v1_moe"):
        return True
    if family in ("moduleformer", "jamba", "deepseek_v2"):  # DeepSeek-V2's router ignores norm_topk_prob
        return False
    if family == "dbrx":  # division by the moe_normalize_expert_weights-norm: L1 = the sum, None = none
        return model.config.ffn_config.moe_normalize_expert_weights == 1
    return bool(model.config.norm_topk_prob)


def size_overrides(family: str, num_experts: int, top_k: int, layers: int) -> dict:
    """Config keys that set E, k and depth (dense layers off)."""
    if family == "moduleformer":
        return {"n_mlp_experts": num_experts, "k_mlp": top_k, "n_layer": layers}
    if family == "llama_moe":
        return {"num_experts": num_experts, "num_selects": top_k, "num_hidden_layers": layers,
                "intermediate_size": 8 * num_experts}
    overrides = {"num_hidden_layers": layers, "num_experts_per_tok": top_k}
    overrides["num_local_experts" if family == "mixtral" else "num_experts"] = num_experts
    if family == "qwen2_moe":
        overrides["mlp_only_layers"] = []
    return overrides


def experts_and_top_k(model: torch.nn.Module) -> tuple[int, int]:
    config = model.config
    if family_of(model) == "dbrx":
        return config.ffn_config.moe_num_experts, config.ffn_config.moe_top_k
    if family_of(model) == "hunyuan_v1_moe":
        return config.num_experts, config.moe_topk
    if family_of(model) == "deepseek_v2":
        return config.n_routed_experts, config.num_experts_per_tok
    if family_of(model) == "moduleformer":
        return config.n_mlp_experts, config.k_mlp
    if family_of(model) == "llama_moe":
        return config.num_experts, config.num_selects
    return getattr(config, "num_experts", None) or config.num_local_experts, config.num_experts_per_tok


def num_layers(model: torch.nn.Module) -> int:
    config = model.config
    if family_of(model) == "dbrx":
        return config.n_layers
    return config.n_layer if family_of(model) == "moduleformer" else config.num_hidden_layers


def dense_layers(model: torch.nn.Module) -> list[int]:
    """Decoder layers whose MLP is dense, per each model's published layer rule."""
    config, family = model.config, family_of(model)
    if family == "qwen2_moe":
        return list(config.mlp_only_layers or [])
    if family == "deepseek_v2":  # DeepseekV2Moe from layer first_k_dense_replace on
        return list(range(config.first_k_dense_replace))
    if family == "jamba":  # JambaSparseMoeBlock where layers_num_experts[i] > 1
        return [i for i, experts in enumerate(config.layers_num_experts) if experts <= 1]
    return []


@contextlib.contextmanager
def capture_choices(model: torch.nn.Module) -> Iterator[dict[int, torch.Tensor]]:
    """Absolute layer → the ``[N, k]`` experts that received the tokens in the last call, read where each published
    model hands them over: the router output's indices (transformers 5 routers), or the ``top_k_index`` argument of
    DBRX's experts module (``DbrxFFN.forward`` calls ``self.experts(hidden, top_k_index, top_k_weights)``)."""
    captured: dict[int, torch.Tensor] = {}
    handles = []
    for index, router in moe_routers(model).items():
        if family_of(model) == "dbrx":
            experts = model.transformer.blocks[index].ffn.experts
            handles.append(experts.register_forward_pre_hook(
                lambda m, args, index=index: captured.__setitem__(index, args[1].detach().clone())))
        else:
            handles.append(router.register_forward_hook(
                lambda m, args, out, index=index: captured.__setitem__(index, router_choice(model, out)[1].detach())))
    try:
        yield captured
    finally:
        for handle in handles:
            handle.remove()
