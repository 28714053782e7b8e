"""LoRA / (IA)³ experts on the *routed* experts' projections, whatever their storage.

Each routed expert ``e`` of an adapted projection gets its own expert set (``RoutedExpertSets.sets[e]``, a
:class:`~moepatch.lora_experts.layers.LoraExperts` or :class:`~moepatch.lora_experts.layers.VectorExperts`) that runs
on exactly the rows the base router dispatched to ``e`` — inside the experts' own computation, never as a dense
pass over all tokens.  :class:`RoutedExpertSets` is the feature's side (the
:class:`~model_patches.expert_storage.RoutedDeltas` of one projection); the family's storage adapter in
:mod:`model_patches.expert_storage` runs it inside the experts' computation.  Three storages:

Under ``grouped_mm`` (transformers' default) and for MoLM every expert set runs each step — on zero rows when its
expert got no token — so all ranks build the same autograd graph (DeepSpeed ZeRO-1/2 buckets gradients in the
order they become ready); the ``eager`` implementation only runs the sets of the experts it visits.

* fused transformers-5 experts: reached through transformers' experts-implementation interface (a registered
  implementation performing the same operations as ``grouped_mm`` / ``eager`` with the deltas in between, so a
  fresh injection — deltas exactly zero — is bit-identical); targets ``gate_proj`` / ``up_proj`` (the halves of
  ``gate_up_proj``) and ``down_proj``;
* per-expert ``ParameterList`` experts: their ``forward(x, e)`` replaced by the same expression plus the deltas;
* expert-grouped linear expert modules: a forward hook adds the per-expert deltas (a pre-hook scales the input
  for MoV).
"""

from __future__ import annotations

import torch
from torch import nn


class RoutedExpertSets(nn.Module):
    """One expert set per routed expert; ``grouped`` runs each on its contiguous rows."""

    def __init__(self, sets: list[nn.Module], placement: str) -> None:
        super().__init__()
        self.sets = nn.ModuleList(sets)
        self.placement = placement  # "output": a LoRA delta; "input": MoV scaling of the projection's input

    def grouped(self, rows: torch.Tensor, counts: list[int] | None, tokens: torch.Tensor | None = None,
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
