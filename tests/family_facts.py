"""Per-family facts the tests need, written from each model's published definition (not from moepatch's specs).

Tests compare moepatch against these: where each family keeps its routers, how a router scores experts, which
config keys set E / k / depth, and which parameters each freeze rule must touch.
"""

from __future__ import annotations

import re

import torch

HF_FAMILIES = ("qwen2_moe", "mixtral", "qwen3_moe", "olmoe")
"""Families whose causal LM adds transformers' load-balancing loss (router_aux_loss_coef)."""

ROUTER_NAME = {
    "moduleformer": re.compile(r"^transformer\.h\.(\d+)\.mlpf\.gate$"),
}
_HF_ROUTER = re.compile(r"^model\.layers\.(\d+)\.mlp\.gate$")

ROUTER_PARAMETER = {
    "moduleformer": re.compile(r"transformer\.h\.\d+\.(mlpf|attn\.q_proj)\.gate\.w_gate\.\d+\.(weight|bias)$"),
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


def router_probabilities(model: torch.nn.Module, router: torch.nn.Module, hidden: torch.Tensor) -> torch.Tensor:
    """Router probabilities [N, E] in float64 from the router's parameters.

    transformers 5 routers: softmax(h · Wᵀ).  ModuleFormer: softmax over all experts of the gating MLP
    w_gate = Linear(+bias) → GELU → Dropout → Linear (no bias), in eval mode.
    """
    with torch.no_grad():
        if family_of(model) == "moduleformer":
            first, last = router.w_gate[0], router.w_gate[3]
            inner = torch.nn.functional.gelu(torch.nn.functional.linear(hidden, first.weight, first.bias))
            logits = torch.nn.functional.linear(inner, last.weight)
        else:
            logits = torch.nn.functional.linear(hidden, router.weight)
    return torch.softmax(logits.double(), dim=-1)


def router_output_probabilities(model: torch.nn.Module, output: tuple) -> torch.Tensor:
    """float32 [N, E] probabilities as the router itself produced them (logits → softmax, or returned as is)."""
    if family_of(model) == "moduleformer":
        return output[2].float()
    return torch.softmax(output[0], dim=-1, dtype=torch.float32)


def router_choice(model: torch.nn.Module, output: tuple) -> tuple[torch.Tensor, torch.Tensor]:
    """(weights [N, k], indices [N, k]) from a router's output tuple."""
    if family_of(model) == "moduleformer":  # (top_k_indices, top_k_gates, probs)
        return output[1], output[0]
    return output[1], output[2]  # (logits, weights, indices)


def renormalizes(model: torch.nn.Module) -> bool:
    family = family_of(model)
    if family == "mixtral":
        return True
    if family == "moduleformer":
        return False
    return bool(model.config.norm_topk_prob)


def size_overrides(family: str, num_experts: int, top_k: int, layers: int) -> dict:
    """Config keys that set E, k and depth (dense layers off)."""
    if family == "moduleformer":
        return {"n_mlp_experts": num_experts, "k_mlp": top_k, "n_layer": layers}
    overrides = {"num_hidden_layers": layers, "num_experts_per_tok": top_k}
    overrides["num_local_experts" if family == "mixtral" else "num_experts"] = num_experts
    if family == "qwen2_moe":
        overrides["mlp_only_layers"] = []
    return overrides


def experts_and_top_k(model: torch.nn.Module) -> tuple[int, int]:
    config = model.config
    if family_of(model) == "moduleformer":
        return config.n_mlp_experts, config.k_mlp
    return getattr(config, "num_experts", None) or config.num_local_experts, config.num_experts_per_tok


def num_layers(model: torch.nn.Module) -> int:
    config = model.config
    return config.n_layer if family_of(model) == "moduleformer" else config.num_hidden_layers
