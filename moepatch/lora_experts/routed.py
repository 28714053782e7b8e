"""LoRA / (IA)³ experts on the *routed* experts' projections, whatever their storage.

Each routed expert ``e`` of an adapted projection gets its own expert set (``RoutedExpertSets.sets[e]``, a
:class:`~moepatch.lora_experts.layers.LoraExperts` or :class:`~moepatch.lora_experts.layers.VectorExperts`) that runs
on exactly the rows the base router dispatched to ``e`` — inside the experts' own computation, never as a dense
pass over all tokens.  Three storages:

Under ``grouped_mm`` (transformers' default) and for MoLM every expert set runs each step — on zero rows when its
expert got no token — so all ranks build the same autograd graph (DeepSpeed ZeRO-1/2 buckets gradients in the
order they become ready); the ``eager`` implementation only runs the sets of the experts it visits.

* ``"fused"`` (transformers 5 ``*Experts``: ``gate_up_proj [E, 2I, H]``, ``down_proj [E, H, I]``): the experts'
  ``forward`` is replaced on the instance by :func:`fused_forward`, which performs the same operations as
  transformers' ``grouped_mm`` / ``eager`` implementations (through transformers' own grouped linear) and adds the
  deltas between them — so a fresh injection (deltas exactly zero) is bit-identical.  Targets: ``gate_proj`` /
  ``up_proj`` (the two halves of ``gate_up_proj``) and ``down_proj``.
* ``"parameter_list"`` (LLaMA-MoE ``LinearGLUExperts``: ``weight_{gate,up,down}.{e}``): ``forward(x, e)`` is
  replaced by :func:`glu_forward`, the same expression plus the deltas.
* ``"parallel"`` (MoLM ``ParallelExperts``, ``weight [E, in, out]``, inputs grouped by ``expert_size``): the
  projection is linear, so a forward hook adds the per-expert deltas (a pre-hook scales the input for MoV).
"""

from __future__ import annotations

import types
from typing import Any

import torch
from torch import nn
from transformers.integrations.moe import _grouped_linear  # the same grouped GEMM transformers' experts use

FUSED_IMPLEMENTATIONS = ("grouped_mm", "eager", None)


class RoutedExpertSets(nn.Module):
    """One expert set per routed expert; ``grouped`` runs each on its contiguous rows."""

    def __init__(self, sets: list[nn.Module], placement: str) -> None:
        super().__init__()
        self.sets = nn.ModuleList(sets)
        self.placement = placement  # "output": a LoRA delta; "input": MoV scaling of the projection's input

    def grouped(self, rows: torch.Tensor, counts: list[int], tokens: torch.Tensor | None = None,
                only: int | None = None) -> torch.Tensor:
        """``rows`` grouped by routed expert (``counts[e]`` rows of expert e, in order) → the per-row result: the
        LoRA delta (``placement == "output"``) or the scaled rows (``"input"``).  ``tokens`` (optional): the token
        index of every row, kept on the routers so the balance loss can leave padding out."""
        if only is not None:  # every row belongs to routed expert `only`
            self.sets[only].router.last_tokens = tokens
            return self.sets[only](rows)
        pieces, start = [], 0
        for expert, count in enumerate(counts):
            # every set runs, on zero rows if the router sent it nothing: the autograd graph then has the same shape
            # on every rank, which DeepSpeed ZeRO-1/2 gradient bucketing relies on
            chunk = rows[start : start + count]
            expert_set = self.sets[expert]
            expert_set.router.last_tokens = None if tokens is None else tokens[start : start + count]
            pieces.append(expert_set(chunk))
            start += count
        return torch.cat(pieces, dim=0)


# ---------------------------------------------------------------------------------------------- fused (v5)
def fused_forward(self: nn.Module, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                  top_k_weights: torch.Tensor) -> torch.Tensor:
    """transformers' fused-experts computation with the routed LoRA experts in between (instance ``forward``)."""
    implementation = getattr(getattr(self, "config", None), "_experts_implementation", None)
    if implementation == "eager":
        return _fused_eager(self, hidden_states, top_k_index, top_k_weights)
    return _fused_grouped(self, hidden_states, top_k_index, top_k_weights)


def _gate_up_delta(sets: nn.ModuleDict, rows: torch.Tensor, counts: list[int] | None, tokens: torch.Tensor | None,
                   intermediate: int, only: int | None = None) -> torch.Tensor | None:
    gate = sets["gate_proj"].grouped(rows, counts, tokens, only) if "gate_proj" in sets else None
    up = sets["up_proj"].grouped(rows, counts, tokens, only) if "up_proj" in sets else None
    if gate is None and up is None:
        return None
    zeros = rows.new_zeros(rows.shape[0], intermediate)
    return torch.cat([zeros if gate is None else gate.to(rows.dtype), zeros if up is None else up.to(rows.dtype)],
                     dim=-1)


def _fused_grouped(self: nn.Module, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                   top_k_weights: torch.Tensor) -> torch.Tensor:
    sets: nn.ModuleDict = self.lora_experts
    device = hidden_states.device
    num_top_k, num_tokens, hidden_dim = top_k_index.size(-1), hidden_states.size(0), hidden_states.size(-1)
    sample_weights = top_k_weights.reshape(-1)
    expert_ids = top_k_index.reshape(-1)
    expert_ids_g, perm = torch.sort(expert_ids)
    tokens = perm // num_top_k
    rows = hidden_states[tokens]
    sample_weights_g = sample_weights[perm]
    histc_input = expert_ids_g.float() if device.type in ("cpu", "mps") else expert_ids_g.int()
    tokens_per_expert = torch.histc(histc_input, bins=self.num_experts, min=0, max=self.num_experts - 1)
    offsets = torch.cumsum(tokens_per_expert, dim=0, dtype=torch.int32)
    counts = [int(c) for c in tokens_per_expert.tolist()]

    projected = _grouped_linear(rows, self.gate_up_proj, offsets, bias=None, is_transposed=self.is_transposed)
    delta = _gate_up_delta(sets, rows, counts, tokens, projected.shape[-1] // 2)
    if delta is not None:
        projected = projected + delta.to(projected.dtype)
    projected = self._apply_gate(projected)
    if "down_proj" in sets and sets["down_proj"].placement == "input":
        projected = sets["down_proj"].grouped(projected, counts, tokens)
    out = _grouped_linear(projected, self.down_proj, offsets, bias=None, is_transposed=self.is_transposed)
    if "down_proj" in sets and sets["down_proj"].placement == "output":
        out = out + sets["down_proj"].grouped(projected, counts, tokens).to(out.dtype)
    weighted = out * sample_weights_g.unsqueeze(-1)
    inverse = torch.empty_like(perm)
    inverse[perm] = torch.arange(perm.size(0), device=device)
    weighted = weighted[inverse]
    return weighted.view(num_tokens, num_top_k, hidden_dim).sum(dim=1).to(hidden_states.dtype)


def _fused_eager(self: nn.Module, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                 top_k_weights: torch.Tensor) -> torch.Tensor:
    sets: nn.ModuleDict = self.lora_experts
    final = torch.zeros_like(hidden_states)
    with torch.no_grad():
        expert_mask = torch.nn.functional.one_hot(top_k_index, num_classes=self.num_experts + 1).permute(2, 1, 0)
        expert_hit = torch.greater(expert_mask.sum(dim=(-1, -2)), 0).nonzero()
    for hit in expert_hit:
        expert = int(hit[0])
        if expert == self.num_experts:
            continue
        top_k_pos, token_idx = torch.where(expert_mask[expert])
        rows = hidden_states[token_idx]
        projected = nn.functional.linear(rows, self.gate_up_proj[expert])
        delta = _gate_up_delta(sets, rows, None, token_idx, projected.shape[-1] // 2, only=expert)
        if delta is not None:
            projected = projected + delta.to(projected.dtype)
        gate, up = projected.chunk(2, dim=-1)
        current = self.act_fn(gate) * up
        if "down_proj" in sets and sets["down_proj"].placement == "input":
            current = sets["down_proj"].grouped(current, None, token_idx, only=expert)
        out = nn.functional.linear(current, self.down_proj[expert])
        if "down_proj" in sets and sets["down_proj"].placement == "output":
            out = out + sets["down_proj"].grouped(current, None, token_idx, only=expert).to(out.dtype)
        out = out * top_k_weights[token_idx, top_k_pos, None]
        final.index_add_(0, token_idx, out.to(final.dtype))
    return final


def fused_problem(experts: nn.Module) -> str | None:
    """Why :func:`fused_forward` cannot stand in for this experts module, or ``None``."""
    for name in ("gate_up_proj", "down_proj", "num_experts", "_apply_gate"):
        if not hasattr(experts, name):
            return f"{type(experts).__name__} has no {name}"
    if getattr(experts, "has_bias", False) or not getattr(experts, "has_gate", True):
        return f"{type(experts).__name__}: biased or gate-less fused experts are not supported"
    if getattr(experts, "has_post_expert_norm", False) or getattr(experts, "_is_expert_parallel", False):
        return f"{type(experts).__name__}: post-expert norms / expert parallelism are not supported"
    implementation = getattr(getattr(experts, "config", None), "_experts_implementation", None)
    if implementation not in FUSED_IMPLEMENTATIONS:
        return (f"experts implementation {implementation!r}: LoRA experts on routed experts run with 'grouped_mm' "
                "or 'eager' (set config._experts_implementation)")
    return None


# ---------------------------------------------------------------------------------------------- LLaMA-MoE
def glu_forward(self: nn.Module, x: torch.Tensor, i: int) -> torch.Tensor:
    """``LinearGLUExperts.forward(x, i)`` plus expert i's LoRA experts (instance ``forward``)."""
    sets: nn.ModuleDict = self.lora_experts
    functional = nn.functional
    row_tokens = getattr(self, "row_tokens", None)
    tokens = row_tokens[i] if row_tokens is not None and len(row_tokens) > i else None
    for expert_sets in sets.values():
        expert_sets.sets[i].router.last_tokens = tokens
    gate = functional.linear(x, self.weight_gate[i], self.bias_gate[i] if self.bias_gate is not None else None)
    up = functional.linear(x, self.weight_up[i], self.bias_up[i] if self.bias_up is not None else None)
    if "gate_proj" in sets:
        gate = gate + sets["gate_proj"].sets[i](x).to(gate.dtype)
    if "up_proj" in sets:
        up = up + sets["up_proj"].sets[i](x).to(up.dtype)
    hidden = self.act_fn(gate) * up
    down = sets["down_proj"] if "down_proj" in sets else None
    if down is not None and down.placement == "input":
        hidden = down.sets[i](hidden)
    out = functional.linear(hidden, self.weight_down[i], self.bias_down[i] if self.bias_down is not None else None)
    if down is not None and down.placement == "output":
        out = out + down.sets[i](hidden).to(out.dtype)
    return out


# ---------------------------------------------------------------------------------------------- MoLM
def _row_tokens(owner: nn.Module | None, rows: int) -> torch.Tensor | None:
    """The token of each expert-grouped row: MoLM's mixture keeps it as ``batch_index``."""
    tokens = getattr(owner, "batch_index", None)
    return tokens if isinstance(tokens, torch.Tensor) and tokens.shape[0] == rows else None


def parallel_output_hook(module: nn.Module, args: tuple, output: torch.Tensor, owner: nn.Module | None = None
                         ) -> torch.Tensor:
    inputs, expert_size = args[0], args[1]
    tokens = _row_tokens(owner, inputs.shape[0])
    return output + module.lora_experts.grouped(inputs, [int(s) for s in expert_size], tokens).to(output.dtype)


def parallel_input_hook(module: nn.Module, args: tuple, owner: nn.Module | None = None) -> tuple:
    inputs, expert_size = args[0], args[1]
    tokens = _row_tokens(owner, inputs.shape[0])
    return (module.lora_experts.grouped(inputs, [int(s) for s in expert_size], tokens), expert_size, *args[2:])


def bind(module: nn.Module, function: Any) -> types.MethodType:
    return types.MethodType(function, module)
