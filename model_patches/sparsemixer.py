"""PhiMoE's sparsemixer (Liu et al., 2024, "GRIN: GRadient-INformed MoE"), as transformers 5.25 computes it, with one
seam: the second pick may be restricted to an allowed set (C2R).

The first expert is the best logit (in training: a Gumbel sample among the logits within a relative threshold of the
best); its weight is the softmax over those logits at the pick.  The second is the best of the rest (in training: a
sample), weighted the same way around it.  In training the weights carry the Heun-method gradient of
``PhimoeMultiplier``.  Every random draw is made in the order and shape of ``modeling_phimoe.sparsemixer`` so that,
with nothing restricted, the result equals PhiMoE's router bit for bit under the same seed, in eval and in training.

With ``allowed_for`` (C2R), the second pick is the best (in training: a sample among the near-best) of the first
expert's allowed experts; its weight follows the family's rule from the unrestricted logits — the softmax over the
logits within the threshold of the pick, the first expert masked — so that a full list changes nothing.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from transformers.models.phimoe.modeling_phimoe import PhimoeMultiplier

AllowedFor = Callable[[torch.Tensor], torch.Tensor]
"""``allowed_for(first [N]) -> [N, E]`` bool: the experts a token whose first expert is ``first`` may also use."""


def _within_threshold(scores: torch.Tensor, threshold: torch.Tensor, jitter_eps: float) -> torch.Tensor:
    """``[N, E]`` True where a logit is farther than ``2·jitter_eps`` (relative) below the threshold."""
    with torch.no_grad():
        factor = scores.abs().clamp(min=threshold)
        return ((threshold - scores) / factor) > (2 * jitter_eps)


def _gumbel_pick(gates: torch.Tensor) -> torch.Tensor:
    noise = torch.empty_like(gates, memory_format=torch.legacy_contiguous_format).exponential_().log()
    return (gates - noise).max(dim=-1)[1].unsqueeze(-1)


def _heun(scores: torch.Tensor, multiplier: torch.Tensor, selected: torch.Tensor, gates: torch.Tensor,
          uniform: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:

    max_scores, max_ind = gates.max(dim=-1, keepdim=True)
    mask_for_one = torch.logical_or(selected == max_ind, uniform(max_scores) > 0.75)
    mask_for_one = torch.add(0.3333, mask_for_one, alpha=0.6667).type_as(gates)
    return PhimoeMultiplier.apply(scores, multiplier, selected, gates, mask_for_one)


def sparsemixer(scores: torch.Tensor, jitter_eps: float, training: bool,
                allowed_for: AllowedFor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(multipliers [N, 2], experts [N, 2])`` from the router logits ``scores [N, E]``."""
    with torch.no_grad():
        threshold, max_ind = scores.max(dim=-1, keepdim=True)
    masked_gates = scores.masked_fill(_within_threshold(scores, threshold, jitter_eps), float("-inf"))
    selected = _gumbel_pick(masked_gates) if training else max_ind
    masked_gates = torch.softmax(masked_gates, dim=-1)
    multiplier = masked_gates.gather(dim=-1, index=selected)
    if training:
        multiplier = _heun(scores, multiplier, selected, masked_gates, torch.rand_like)

    masked_scores = torch.scatter(scores, -1, selected, float("-inf"))
    candidates = masked_scores
    if allowed_for is not None:  # C2R: the second expert among the first one's collaborators only
        candidates = masked_scores.masked_fill(~allowed_for(selected.squeeze(-1)), float("-inf"))
    with torch.no_grad():
        threshold, max_ind = candidates.max(dim=-1, keepdim=True)
    far = _within_threshold(scores, threshold, jitter_eps)
    gates_top2 = masked_scores.masked_fill(far, float("-inf"))
    selected_top2 = _gumbel_pick(candidates.masked_fill(far, float("-inf"))) if training else max_ind
    gates_top2 = torch.softmax(gates_top2, dim=-1)
    multiplier_top2 = gates_top2.gather(dim=-1, index=selected_top2)
    if training:
        multiplier_top2 = _heun(scores, multiplier_top2, selected_top2, gates_top2,
                                lambda like: torch.rand_like(like).uniform_())
    return torch.concat((multiplier, multiplier_top2), dim=-1), torch.concat((selected, selected_top2), dim=-1)
