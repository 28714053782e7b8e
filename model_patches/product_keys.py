"""Product-key expert retrieval as transformers 5.25's ``DogeCDMoE.forward`` computes it, with one seam: the experts
after the first may be restricted to an allowed set (C2R).

The router (``router_gate``, a bias-free linear) scores ``2·K`` keys per token, ``K = ⌊√E⌋``; the block views those
scores as ``[2, N, K]`` and, for row ``n`` of the view, scores expert ``i·K + j`` by ``x_i + y_j`` (``x`` = row ``n`` of
the first half, ``y`` = row ``n`` of the second).  Each half is sorted first (``topk(K)`` of ``K``), so the ``K²`` pair
sums are laid out in the order of the sorted keys, not of the expert ids; the block takes ``topk(k)`` of that layout
(ties therefore break by the sorted keys' order), gathers the expert ids, and weights the ``k`` experts by a softmax
over their ``k`` pair sums, divided in place by its sum when ``norm_topk_prob`` is set.

**The view mixes tokens.**  ``router_gate(h)`` is ``[B, S, 2K]``; ``.view(2, B·S, K)`` splits the *flat memory*, not
each token: chunk ``c`` of ``K`` consecutive scores is token ``c // 2``'s first half (``c`` even) or second half
(``c`` odd), the view's first half holds chunks ``0 .. N-1`` and its second chunks ``N .. 2N-1``.  Row ``n`` — which
routes token ``n`` — therefore pairs chunk ``n`` (token ``n // 2``, half ``n % 2``) with chunk ``N + n`` (token
``(N + n) // 2``, half ``(N + n) % 2``), across the sequences of a batch and padding included.  Token ``n``'s own
key scores enter its row only for ``n = 0`` (its first half, as ``x``) and ``n = N - 1`` (its second half, as
``y``); every other token is routed by other tokens' keys alone.  Only a call with one token (cached generation at
batch size 1) pairs a token's own two halves.  transformers keeps this for checkpoint compatibility (its comment in
``modeling_doge.py``); moepatch reproduces it bit for bit and never "fixes" it — a token's routing depends on the
other tokens of the call, in vanilla and under C2R alike.

Under C2R (``allowed_for``): the first expert is the family's own first choice (column 0 of its ``topk(k)``); the
others are the best allowed experts by the family's own ordering — the same ``topk(k)`` call on the pair sums with
every expert the first one does not allow masked to ``-inf`` in place (same layout, dtype and shape, so a row that
allows every expert is the family's vector bit for bit and ``top_t = E - 1`` is vanilla, ties included).  Where more
allowed experts than ``k`` tie with the first and the call leaves it out, it is put first and the last one dropped.
The weights follow the family's rule from the unmasked pair sums of the chosen experts.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

AllowedFor = Callable[[torch.Tensor], torch.Tensor]
"""``allowed_for(first [N]) -> [N, E]`` bool: the experts a token whose first expert is ``first`` may also use."""


def pair_scores(router_logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(all_scores [N, K²], all_indices [N, K²])`` from the block's ``[2, N, K]`` view, by ``DogeCDMoE.forward``'s own
    calls: both halves sorted, pair sums and expert ids laid out in the sorted keys' order."""
    num_keys = router_logits.shape[-1]
    (scores_x, scores_y), (indices_x, indices_y) = router_logits.topk(num_keys, dim=-1)
    all_scores = scores_x.unsqueeze(-1) + scores_y.unsqueeze(-2)
    all_indices = indices_x.unsqueeze(-1) * num_keys + indices_y.unsqueeze(-2)
    all_scores = all_scores.view(*all_scores.shape[:-2], -1)
    all_indices = all_indices.view(*all_indices.shape[:-2], -1)
    return all_scores, all_indices


def key_view(router_output: torch.Tensor) -> torch.Tensor:
    """The block's ``[2, N, K]`` view of the router's ``[..., 2K]`` output (the token-mixing view, see above)."""
    return router_output.view(2, -1, router_output.shape[-1] // 2)


def expert_scores(router_output: torch.Tensor, num_experts: int) -> torch.Tensor:
    """``[N, E]``: each expert's pair sum, from the router's ``[..., 2K]`` output (what statistics read); ``-inf`` for
    ids from ``K²`` on, which no row can reach.  Row ``n`` scores the experts of token ``n`` (whose keys it mixes)."""
    all_scores, all_indices = pair_scores(key_view(router_output))
    return all_scores.new_full((all_scores.shape[0], num_experts), float("-inf")).scatter(1, all_indices, all_scores)


def constrained_positions(
    all_scores: torch.Tensor, all_indices: torch.Tensor, positions: torch.Tensor, top_k: int, allowed_for: AllowedFor,
) -> torch.Tensor:
    """C2R's ``[N, k]`` positions in the pair-sum layout, from the family's own ``positions`` (its ``topk(k)``).

    The first expert is the family's column 0; every pair whose expert it does not allow is masked to ``-inf`` in place
    and the family's very call picks the ``k`` best that are left (see the module docstring)."""
    first = positions[:, :1]  # [N, 1]: the family's own first choice, as a position
    allowed = allowed_for(all_indices.gather(-1, first).squeeze(-1))  # [N, E] by expert id
    masked = all_scores.masked_fill(~allowed.gather(-1, all_indices), float("-inf"))  # [N, K²], the family's layout
    _, chosen = masked.topk(top_k, dim=-1)  # [N, k]: the family's call, the family's tie order
    lost = (chosen != first).all(dim=-1, keepdim=True)  # only where more than k allowed pairs tie with the first
    return torch.where(lost, torch.cat([first, chosen[:, :-1]], dim=-1), chosen)


def product_key_choice(
    router_logits: torch.Tensor, top_k: int, renormalize: bool, allowed_for: AllowedFor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(routing_weights [N, k], indices [N, k])`` from the block's ``[2, N, K]`` view of the key scores.

    Without ``allowed_for`` these are ``DogeCDMoE.forward``'s own lines (bit for bit, autograd included: the
    renormalisation divides in place, as the block does, which autograd refuses in training); with it, C2R's choice
    (see the module docstring), weighted by the same rule from the unmasked pair sums.
    """
    all_scores, all_indices = pair_scores(router_logits)
    scores, position_indices = all_scores.topk(top_k, dim=-1)
    if allowed_for is not None:
        position_indices = constrained_positions(all_scores, all_indices, position_indices, top_k, allowed_for)
        scores = all_scores.gather(-1, position_indices)
    indices = all_indices.gather(-1, position_indices)
    routing_weights = F.softmax(scores, dim=-1)
    if renormalize:
        routing_weights /= routing_weights.sum(dim=-1, keepdim=True)
    return routing_weights, indices
