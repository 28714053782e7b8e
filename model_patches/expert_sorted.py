"""The expert-sorted router → experts hand-off (JetMoE's ``JetMoeTopKGating``, ScatterMoE's convention).

Such a router does not hand its experts ``(logits, weights [N, k], indices [N, k])`` but the ``N·k`` (token, slot)
pairs sorted by expert: ``(index_sorted_experts, batch_index, batch_gates, expert_size, logits)``, where
``index_sorted_experts`` are the flat slot positions ``t·k + j`` in expert order, ``batch_index`` their tokens,
``batch_gates`` their weights and ``expert_size`` (a Python list) the rows of each expert.  :func:`pack` builds it from
a routing decision exactly as the family does (so a re-routed router hands over the same structure, bit for bit with
the family's own choice), and :func:`read` gives the decision back as ``[N, k]`` for readers such as the routing
statistics.
"""

from __future__ import annotations

from typing import Any

import torch


def pack(logits: torch.Tensor, weights: torch.Tensor, indices: torch.Tensor
         ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, list[int], torch.Tensor]:
    """``(index_sorted_experts, batch_index, batch_gates, expert_size, logits)`` of the choice ``indices [N, k]``
    with ``weights [N, k]``: the tail of ``JetMoeTopKGating.forward`` (transformers 5.25), call for call, so that the
    same choice gives the same (unstable) sort."""
    num_experts, top_k = logits.shape[-1], indices.shape[-1]
    zeros = torch.zeros([weights.size(0), num_experts], dtype=weights.dtype, device=weights.device)
    gates = zeros.scatter(1, indices, 1)
    expert_size = gates.long().sum(0).tolist()
    top_k_experts = indices.flatten()
    _, index_sorted_experts = top_k_experts.sort(0)
    batch_index = index_sorted_experts.div(top_k, rounding_mode="trunc")
    batch_gates = weights.flatten()[index_sorted_experts]
    return index_sorted_experts, batch_index, batch_gates, expert_size, logits


def read(output: Any, top_k: int, num_experts: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(logits [N, E], chosen [N, k])`` from an expert-sorted hand-off: the expert of sorted row ``p`` is the one
    whose ``expert_size`` block holds ``p``, written back to slot ``index_sorted_experts[p]``."""
    index_sorted_experts, _, _, expert_size, logits = output[:5]
    device = index_sorted_experts.device
    sizes = torch.as_tensor(expert_size, dtype=torch.int64, device=device)
    expert_of_row = torch.repeat_interleave(torch.arange(num_experts, device=device), sizes,
                                            output_size=index_sorted_experts.shape[0])
    chosen = torch.empty_like(index_sorted_experts).scatter_(0, index_sorted_experts, expert_of_row)
    return logits, chosen.view(-1, top_k)
