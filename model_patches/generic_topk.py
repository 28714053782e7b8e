"""Any other transformers 5 MoE whose router follows the Qwen-style top-k router contract.

Covers (tested) Qwen3-MoE and OLMoE, and by the same rule e.g. FlexOlmo, Qwen3-Next, Qwen3-VL-MoE text layers.
A layer's ``mlp`` is a sparse block when its class name ends in ``SparseMoeBlock`` and it has a ``gate`` router
(2-D ``weight [E, H]``, integer ``top_k``, ``num_experts``, ``hidden_dim`` and a boolean ``norm_topk_prob``) and
an ``experts`` module.  Before a model is accepted every router is **probed** on random tokens and must equal
float32 softmax → top-k → (renormalise iff ``norm_topk_prob``) → cast to the logits' dtype; routers with another
rule (GPT-OSS: top-k of logits then softmax over k; sigmoid / grouped routers) are rejected, never guessed.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from model_patches.registry import register
from model_patches.routing_rule import probe_router
from model_patches.spec import FamilySpec
from model_patches.spec import RoutingRule

_ROUTER_INT_ATTRS = ("top_k", "num_experts", "hidden_dim")


@dataclass(frozen=True, kw_only=True)
class GenericTopKRouterSpec(FamilySpec):
    """Structural match plus a numeric probe instead of a class-name list."""

    def is_sparse_block(self, module: nn.Module) -> bool:
        if not type(module).__name__.endswith("SparseMoeBlock"):
            return False
        router = getattr(module, self.router_attr, None)
        if not isinstance(router, nn.Module) or not isinstance(getattr(module, self.experts_attr, None), nn.Module):
            return False
        weight = getattr(router, "weight", None)
        return (
            isinstance(weight, nn.Parameter)
            and all(isinstance(getattr(router, attr, None), int) for attr in _ROUTER_INT_ATTRS)
            and isinstance(getattr(router, "norm_topk_prob", None), bool)
        )

    def check_router(self, router: nn.Module, block: nn.Module, *, top_k: int) -> str | None:
        return probe_router(router, top_k=top_k, hidden_dim=router.hidden_dim, renormalize=router.norm_topk_prob)


GENERIC_TOPK = register(
    GenericTopKRouterSpec(
        name="generic_topk",
        model_types=(),
        block_classes=(),
        routing=RoutingRule(renormalize="norm_topk_prob", weights_dtype="logits"),
        gate_substring_note="router mlp.gate.weight; fused experts mlp.experts.gate_up_proj (gate AND up halves)",
    ),
    fallback=True,
)
