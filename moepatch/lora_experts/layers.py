"""LoRA experts and (IA)³ vector experts behind a per-token router, attached to an existing projection.

Both modules are *added* beside a base projection (``<projection>.lora_experts``) and joined to it with a forward
hook, so the base parameters keep their names (checkpoints stay loadable without moepatch) and the module's return
type never changes.  Each is called as a module so DeepSpeed ZeRO-3 gathers its parameters like any other.

* :class:`ExpertRouter`: float32 logits and softmax (MoV / MoLoRA / MoLA) over all experts (dense soft merge), or
  the top-k — renormalised over the k (MoLA, ``renormalize=True``) or the raw probabilities under a top-k mask (the
  optional ``top_k`` of MoV's code, ``renormalize=False``).
* :class:`LoraExperts` (MoLoRA, MoLA): ``Δ(x) = Σ_e w_e(x) · (α / r_e) · B_e A_e dropout_e(x)``.  Experts may have
  different ranks (GuiLoMo).  The dense soft merge (MoLoRA) concatenates the A's and B's along the rank axis, so the
  whole mixture is two matrix products and ``ΔW`` is never formed; the top-k (MoLA) runs only the chosen experts on
  their own tokens, as two grouped matrix products (≈ k/N of the dense FLOPs).  Dropout draws one mask per expert
  (per token and chosen expert in the top-k), as MoLA's ``B_e(A_e(dropout(x)))``.
* :class:`VectorExperts` (MoV): ``t ← t ⊙ Σ_e p_e · v_e`` on a projection's output (keys, values), on a gated
  feed-forward block's ``act(gate x)`` before its product with ``up x`` (the official fork's ``intermediate_conv``
  on ``act(wi_0 x)``, the router reading that tensor; a hook on the block's activation module) or on the down
  projection's input (a non-gated block's ``act(wi x)``, routed experts, or ``ffn_scaled: "down_input"``: the product
  ``act(gate x)·(up x)``, which the same mixture scales identically but the router then reads the product); on keys
  and values per head (MoV's ``MoVAttention``: vectors ``[heads, E, head_dim]`` and one ``head_dim → E`` router
  shared by the heads).  The vectors are stored as ``v_e = 1 + δ_e`` with ``δ`` initialised
  to zero, computed as ``t + t ⊙ (Σ_e p_e δ_e)``: the same function (the p's sum to one), but a fresh model is
  *bit*-identical to the base (``Σ_e p_e · 1`` is not exactly one in floating point).  Under a top-k mask without
  renormalisation the p's sum to ``m < 1`` and the code's ``t ⊙ Σ_e p_e v_e`` is ``t ⊙ (m + Σ_e p_e δ_e)``, computed
  as such (a fresh model then scales ``t`` by ``m``, as MoV's code does).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from moepatch.lora_experts.grouped import exact_grouped_matmul


def _init_router(weight: torch.Tensor, scheme: str) -> None:
    if scheme == "kaiming":
        nn.init.kaiming_uniform_(weight, a=math.sqrt(5))  # MoLA / peft: torch.nn.Linear's default
    else:
        nn.init.normal_(weight, std=0.02)  # MoV / MoLoRA / MixLoRA


class ExpertRouter(nn.Module):
    """Per-token linear router (no bias), float32 logits; remembers the last logits and choices for the balance
    loss (``last_tokens``: the token of each logits row when the rows are not the tokens in order)."""

    def __init__(self, in_features: int, num_experts: int, *, top_k: int | None, renormalize: bool = True,
                 init: str = "normal_0.02") -> None:
        super().__init__()
        if top_k is not None and not 1 <= top_k <= num_experts:
            raise ValueError(f"top_k: expected 1..{num_experts}, got {top_k}")
        self.weight = nn.Parameter(torch.empty(num_experts, in_features, dtype=torch.float32))
        _init_router(self.weight, init)
        self.num_experts, self.top_k, self.renormalize = num_experts, top_k, renormalize
        self.last_logits: torch.Tensor | None = None
        self.last_indices: torch.Tensor | None = None
        self.last_tokens: torch.Tensor | None = None
        self.last_rows: torch.Tensor | None = None
        """Routed-expert sets (:mod:`~moepatch.lora_experts.routed`): the mask of the grouped rows that were this
        router's own (``None``: every row)."""

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x.float(), self.weight.float())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``[..., E]`` float32 mixing weights: softmax, or the top-k's weights (zeros elsewhere)."""
        return self.mixing_weights(self.logits(x))

    def select(self, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(indices, weights)`` ``[..., k]`` of the top-k experts (``top_k`` must be set): the probabilities
        renormalised over the k, or left as they are (``renormalize=False``).  Keeps logits and choices."""
        if self.top_k is None:
            raise ValueError("ExpertRouter.select: the router has no top_k (dense softmax: use mixing_weights)")
        probs = logits.softmax(dim=-1)
        values, indices = probs.topk(self.top_k, dim=-1)
        self.last_logits, self.last_indices = logits, indices
        if self.renormalize:
            values = values / values.sum(dim=-1, keepdim=True)
        return indices, values

    def mixing_weights(self, logits: torch.Tensor) -> torch.Tensor:
        """Dense ``[..., E]`` mixing weights from (possibly masked) logits; keeps logits and choices."""
        if self.top_k is None:
            self.last_logits, self.last_indices = logits, None
            return logits.softmax(dim=-1)
        indices, values = self.select(logits)
        return torch.zeros_like(logits).scatter(-1, indices, values)

    def extra_repr(self) -> str:
        return (f"in={self.weight.shape[1]}, experts={self.num_experts}, top_k={self.top_k}"
                + ("" if self.top_k is None or self.renormalize else ", renormalize=False"))


class LoraExperts(nn.Module):
    """N LoRA experts ``A_e [r_e, in]``, ``B_e [out, r_e]`` of one projection and their router."""

    _expert_of_column: torch.Tensor
    _expert_scale: torch.Tensor
    _column_scale: torch.Tensor

    def __init__(
        self,
        in_features: int,
        out_features: int,
        ranks: Sequence[int],
        *,
        top_k: int | None,
        renormalize: bool = True,
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
        self.router = ExpertRouter(in_features, len(ranks), top_k=top_k, renormalize=renormalize, init=router_init)
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
        expert_scale = torch.tensor(self.scaling, dtype=torch.float32)
        self.register_buffer("_expert_scale", expert_scale, persistent=False)
        self.register_buffer("_column_scale", expert_scale[expert_of_column], persistent=False)

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

    def _drops(self) -> bool:
        return self.training and isinstance(self.dropout, nn.Dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``Δ(x)``, shaped like the base projection's output, in ``x``'s dtype."""
        logits = self.router.logits(x)
        if self.router.top_k is None:
            return self.mix(x, self.router.mixing_weights(logits))
        return self.mix_top_k(x, *self.router.select(logits))

    def mix(self, x: torch.Tensor, weights: torch.Tensor, a: torch.Tensor | None = None) -> torch.Tensor:
        """Dense soft merge ``Σ_e w_e·(α/r_e)·B_e A_e dropout_e(x)`` for mixing weights ``[..., E]`` (every expert
        runs); ``a``: the experts' A matrices concatenated along the rank axis (default: ``lora_A`` as stored)."""
        a = torch.cat(list(self.lora_A), dim=0) if a is None else a  # [Σr, in]
        b = torch.cat(list(self.lora_B), dim=1)  # [out, Σr]
        column_weights = self._per_column(weights) * self._column_scale  # [..., Σr]
        hidden = self._dense_hidden(x.to(a.dtype), a)  # [..., Σr]
        return F.linear(hidden * column_weights.to(hidden.dtype), b).to(x.dtype)

    def _dense_hidden(self, x: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
        """``A_e dropout_e(x)`` of every expert, concatenated.  Training with dropout draws one mask per expert (E
        masks and E products of the same total FLOPs as the single one, at E times ``x``'s activation memory)."""
        if not self._drops():
            return F.linear(x, a)
        return torch.cat([F.linear(self.dropout(x), a_e) for a_e in a.split(self.ranks)], dim=-1)

    def mix_top_k(self, x: torch.Tensor, indices: torch.Tensor, weights: torch.Tensor,
                  a: torch.Tensor | None = None) -> torch.Tensor:
        """``Σ_{e ∈ top-k} w_e·(α/r_e)·B_e A_e dropout_e(x)`` running only the chosen experts: the (token, choice)
        rows sorted by expert (``torch.sort``; group ends by ``searchsorted``, no host sync), A and B of each expert
        on its rows as grouped matrix products, back to the tokens through the inverse permutation and a sum over
        the k choices (deterministic: no ``index_add_`` atomics).  ``indices`` / ``weights``: ``[..., k]``."""
        k = indices.shape[-1]
        a_stack, b_stack = self._stacked(a)  # [E, in, R], [E, R, out]
        experts, order = torch.sort(indices.reshape(-1), stable=True)
        ends = torch.searchsorted(experts, torch.arange(self.num_experts, device=experts.device), right=True)
        ends = ends.to(torch.int32)
        rows = self._expert_rows(x.reshape(-1, self.in_features).to(a_stack.dtype), k, order)
        out = exact_grouped_matmul(exact_grouped_matmul(rows, a_stack, ends), b_stack, ends)  # [T·k, out], by expert
        row_scale = weights.reshape(-1)[order].float() * self._expert_scale[experts]
        out = out * row_scale.unsqueeze(-1).to(out.dtype)  # after B: its gradient is then never an expanded one
        by_token = torch.empty_like(out).index_copy(0, order, out)
        return by_token.view(*x.shape[:-1], k, self.out_features).sum(dim=-2, dtype=torch.float32).to(x.dtype)

    def _expert_rows(self, tokens: torch.Tensor, k: int, order: torch.Tensor) -> torch.Tensor:
        """The input row of every (token, choice) in expert order; in training with dropout each (token, choice)
        gets its own mask, drawn in token order (so it does not depend on how other tokens were routed)."""
        if not self._drops():
            return tokens[order // k]
        dropped = self.dropout(tokens.unsqueeze(1).expand(-1, k, -1)).reshape(-1, self.in_features)
        return dropped[order]

    def _stacked(self, a: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """A as ``[E, in, R]`` and B as ``[E, R, out]`` for the grouped products, ``R`` the largest rank rounded up
        to 16 bytes (the grouped GEMM's stride alignment); smaller ranks are padded with zero columns (exact; they
        cost ``R``'s FLOPs)."""
        pieces = list(self.lora_A) if a is None else list(a.split(self.ranks))
        multiple = max(1, 16 // pieces[0].element_size())
        width = -(-max(self.ranks) // multiple) * multiple
        a_stack = torch.stack([F.pad(p, (0, 0, 0, width - p.shape[0])) if p.shape[0] < width else p for p in pieces])
        b_stack = torch.stack([F.pad(b, (0, width - b.shape[1])) if b.shape[1] < width else b for b in self.lora_B])
        return a_stack.transpose(1, 2), b_stack.transpose(1, 2)

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, ranks={self.ranks}"


class VectorExperts(nn.Module):
    """MoV: E (IA)³ vectors ``1 + δ_e`` over a tensor of width ``features``, mixed per token by a router.

    ``heads`` (keys / values, MoV's ``MoVAttention``): vectors ``[heads, E, head_dim]`` and one ``head_dim → E``
    router shared by the heads, run on each head's slice — each head of each token gets its own mixture.  ``None``:
    vectors ``[E, features]`` and one mixture per token.  ``router_features`` (``router_input: "hidden"``, the
    paper's figure): the router reads the projection's input (that width, passed to ``forward``) instead of the
    tensor being scaled (MoV's code), one mixture per token used by every head.
    """

    def __init__(self, features: int, num_experts: int, *, top_k: int | None = None, renormalize: bool = True,
                 router_init: str = "normal_0.02", heads: int | None = None,
                 router_features: int | None = None) -> None:
        super().__init__()
        if heads is not None and (heads < 1 or features % heads):
            raise ValueError(f"heads: {features} features do not split into {heads} heads")
        self.features, self.heads = features, heads
        self.head_dim = features // heads if heads else features
        self.routes_hidden = router_features is not None
        router_in = router_features if router_features is not None else self.head_dim
        self.router = ExpertRouter(router_in, num_experts, top_k=top_k, renormalize=renormalize, init=router_init)
        shape = (num_experts, features) if heads is None else (heads, num_experts, self.head_dim)
        self.delta = nn.Parameter(torch.zeros(shape))

    @property
    def num_experts(self) -> int:
        return self.router.num_experts

    def vectors(self) -> torch.Tensor:
        """The published parametrisation, ``[E, features]`` or ``[heads, E, head_dim]`` (ones at initialisation)."""
        return 1 + self.delta

    def forward(self, t: torch.Tensor, hidden: torch.Tensor | None = None) -> torch.Tensor:
        """``t`` scaled; ``hidden``: the projection's input, read by the router when it routes on it."""
        source = t
        if self.routes_hidden:
            if hidden is None:
                raise ValueError("VectorExperts: the router reads the projection's input (router_input 'hidden'); "
                                 "pass it as `hidden`")
            source = hidden
        if self.heads is None:
            weights = self.router(source)  # [..., E]
            scale = weights @ self.delta.to(weights.dtype)  # Σ_e p_e δ_e
        else:
            weights = self._head_weights(t, source, self.heads)  # [..., heads, E]
            scale = torch.einsum("...he,hed->...hd", weights, self.delta.to(weights.dtype))
        if self.router.top_k is not None and not self.router.renormalize:  # Σ_e p_e = m < 1: t ⊙ (m + Σ_e p_e δ_e)
            return t * (scale + weights.sum(dim=-1, keepdim=True)).reshape(t.shape).to(t.dtype)
        return t + t * scale.reshape(t.shape).to(t.dtype)

    def _head_weights(self, t: torch.Tensor, source: torch.Tensor, heads: int) -> torch.Tensor:
        """Mixing weights ``[..., heads, E]``: per head from the head's slice of ``t``, or the token's, repeated."""
        if self.routes_hidden:
            weights = self.router(source)
            return weights.unsqueeze(-2).expand(*weights.shape[:-1], heads, self.num_experts)
        weights = self.router(t.unflatten(-1, (heads, self.head_dim)))
        tokens = weights.shape[:-2].numel()  # the balance loss reads heads × tokens rows: name each row's token
        self.router.last_tokens = torch.arange(tokens, device=t.device).repeat_interleave(heads)
        return weights

    def extra_repr(self) -> str:
        heads = f", heads={self.heads}" if self.heads else ""
        return f"features={self.features}, experts={self.num_experts}{heads}"


__all__ = ["ExpertRouter", "LoraExperts", "VectorExperts"]
