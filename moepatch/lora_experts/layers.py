"""LoRA experts and (IA)³ vector experts behind a per-token router, attached to an existing projection.

Both modules are *added* beside a base projection (``<projection>.lora_experts``) and joined to it with a forward
hook, so the base parameters keep their names (checkpoints stay loadable without moepatch) and the module's return
type never changes.  Each is called as a module so DeepSpeed ZeRO-3 gathers its parameters like any other.

* :class:`LoraExperts` (MoLoRA, MoLA): ``Δ(x) = Σ_e w_e(x) · (α / r_e) · B_e A_e dropout(x)`` with ``w`` the router's
  float32 softmax — all experts (dense soft merge, MoLoRA) or the renormalised top-k (MoLA).  Experts may have
  different ranks (GuiLoMo); the A's and B's are concatenated along the rank axis so the whole mixture is two matrix
  products — ``ΔW`` is never formed — and an unselected expert's columns are multiplied by an exact zero.
* :class:`VectorExperts` (MoV): ``t ← t ⊙ Σ_e p_e(t) · v_e`` on a projection's output (keys, values) or input
  (``down_proj``).  The vectors are stored as ``v_e = 1 + δ_e`` with ``δ`` initialised to zero, computed as
  ``t + t ⊙ (Σ_e p_e δ_e)``: the same function (the p's sum to one), but a fresh model is *bit*-identical to the base
  (``Σ_e p_e · 1`` is not exactly one in floating point).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn


def _init_router(weight: torch.Tensor, scheme: str) -> None:
    if scheme == "kaiming":
        nn.init.kaiming_uniform_(weight, a=math.sqrt(5))  # MoLA / peft: torch.nn.Linear's default
    else:
        nn.init.normal_(weight, std=0.02)  # MoV / MoLoRA / MixLoRA


class ExpertRouter(nn.Module):
    """Per-token linear router (no bias), float32 logits; remembers the last logits for the balance loss."""

    def __init__(self, in_features: int, num_experts: int, *, top_k: int | None, init: str = "normal_0.02") -> None:
        super().__init__()
        if top_k is not None and not 1 <= top_k <= num_experts:
            raise ValueError(f"top_k: expected 1..{num_experts}, got {top_k}")
        self.weight = nn.Parameter(torch.empty(num_experts, in_features, dtype=torch.float32))
        _init_router(self.weight, init)
        self.num_experts, self.top_k = num_experts, top_k
        self.last_logits: torch.Tensor | None = None
        self.last_indices: torch.Tensor | None = None
        self.last_tokens: torch.Tensor | None = None  # token index of each row when rows are not all tokens

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``[..., E]`` float32 mixing weights: softmax, or the renormalised top-k (zeros elsewhere)."""
        return self.mixing_weights(F.linear(x.float(), self.weight.float()))

    def mixing_weights(self, logits: torch.Tensor) -> torch.Tensor:
        """Mixing weights from (possibly masked) logits; keeps logits and choices for the balance loss."""
        probs = logits.softmax(dim=-1)
        self.last_logits = logits
        if self.top_k is None:
            self.last_indices = None
            return probs
        values, indices = probs.topk(self.top_k, dim=-1)
        self.last_indices = indices
        values = values / values.sum(dim=-1, keepdim=True)
        return torch.zeros_like(probs).scatter(-1, indices, values)

    def extra_repr(self) -> str:
        return f"in={self.weight.shape[1]}, experts={self.num_experts}, top_k={self.top_k}"


class LoraExperts(nn.Module):
    """N LoRA experts ``A_e [r_e, in]``, ``B_e [out, r_e]`` of one projection and their router."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        ranks: Sequence[int],
        *,
        top_k: int | None,
        alpha: float = 16.0,
        dropout: float = 0.0,
        router_init: str = "normal_0.02",
        a_init: str = "kaiming",
        scaling: str = "per_expert",
    ) -> None:
        super().__init__()
        if not ranks or min(ranks) < 1:
            raise ValueError(f"ranks: expected one rank >= 1 per expert, got {list(ranks)}")
        self.in_features, self.out_features, self.ranks = in_features, out_features, [int(r) for r in ranks]
        self.router = ExpertRouter(in_features, len(ranks), top_k=top_k, init=router_init)
        self.lora_A = nn.ParameterList(nn.Parameter(torch.empty(r, in_features)) for r in self.ranks)
        self.lora_B = nn.ParameterList(nn.Parameter(torch.zeros(out_features, r)) for r in self.ranks)
        for a in self.lora_A:
            if a_init == "kaiming":
                nn.init.kaiming_uniform_(a, a=math.sqrt(5))
            else:
                nn.init.normal_(a, std=0.02)
        # α / r_e per expert; "last_expert_rank": GuiLoMo stage 2's α / r_last shared by all experts (parity only)
        self.scaling = [alpha / (self.ranks[-1] if scaling == "last_expert_rank" else r) for r in self.ranks]
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        expert_of_column = torch.repeat_interleave(torch.arange(len(ranks)), torch.tensor(self.ranks))
        self.register_buffer("_expert_of_column", expert_of_column, persistent=False)
        column_scale = torch.tensor(self.scaling, dtype=torch.float32)[expert_of_column]
        self.register_buffer("_column_scale", column_scale, persistent=False)

    @property
    def num_experts(self) -> int:
        return len(self.ranks)

    def _per_column(self, weights: torch.Tensor) -> torch.Tensor:
        """Each expert's weight repeated over its rank columns (an expand when the ranks are equal: its backward is a
        cheap sum, where an index gather's backward is a scatter-add)."""
        if len(set(self.ranks)) == 1:
            rank = self.ranks[0]
            columns = weights.shape[-1] * rank
            return weights.unsqueeze(-1).expand(*weights.shape, rank).reshape(*weights.shape[:-1], columns)
        return weights[..., self._expert_of_column]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``Δ(x)``, shaped like the base projection's output, in ``x``'s dtype."""
        return self.mix(x, self.router(x))

    def mix(self, x: torch.Tensor, weights: torch.Tensor, a: torch.Tensor | None = None) -> torch.Tensor:
        """``Σ_e w_e·(α/r_e)·B_e A_e dropout(x)`` for mixing weights ``[..., E]``; ``a``: the experts' A matrices
        concatenated along the rank axis (default: ``lora_A`` as stored)."""
        a = torch.cat(list(self.lora_A), dim=0) if a is None else a  # [Σr, in]
        b = torch.cat(list(self.lora_B), dim=1)  # [out, Σr]
        column_weights = self._per_column(weights) * self._column_scale  # [..., Σr]
        hidden = F.linear(self.dropout(x).to(a.dtype), a)  # [..., Σr]
        return F.linear(hidden * column_weights.to(hidden.dtype), b).to(x.dtype)

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, ranks={self.ranks}"


class VectorExperts(nn.Module):
    """MoV: E (IA)³ vectors ``1 + δ_e`` over a tensor of width ``features``, mixed by a router on that tensor."""

    def __init__(self, features: int, num_experts: int, *, top_k: int | None = None,
                 router_init: str = "normal_0.02") -> None:
        super().__init__()
        self.features = features
        self.router = ExpertRouter(features, num_experts, top_k=top_k, init=router_init)
        self.delta = nn.Parameter(torch.zeros(num_experts, features))

    @property
    def num_experts(self) -> int:
        return self.router.num_experts

    def vectors(self) -> torch.Tensor:
        """The published parametrisation ``[E, features]`` (ones at initialisation)."""
        return 1 + self.delta

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        weights = self.router(t)  # [..., E]
        scale = weights @ self.delta.to(weights.dtype)  # Σ_e p_e δ_e
        return t + t * scale.to(t.dtype)

    def extra_repr(self) -> str:
        return f"features={self.features}, experts={self.num_experts}"


__all__ = ["ExpertRouter", "LoraExperts", "VectorExperts"]
