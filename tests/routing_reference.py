"""Routing computed from scratch in the tests, independent of moepatch's code.

Captures the hidden states fed to every router with the test's own hooks and recomputes the family's rule from the
router parameters (family_facts.router_probabilities), then top-k of the probabilities.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from family_facts import moe_routers
from family_facts import router_probabilities

__all__ = ["capture_router_inputs", "independent_switch_loss", "moe_routers", "reference_counts"]


@contextlib.contextmanager
def capture_router_inputs(model: torch.nn.Module) -> Iterator[dict[int, list[torch.Tensor]]]:
    """Record (a detached copy of) the input of every router call, per absolute layer index."""
    captured: dict[int, list[torch.Tensor]] = {}
    handles = []
    for index, router in moe_routers(model).items():
        def hook(module, args, index=index):
            captured.setdefault(index, []).append(args[0].detach().reshape(-1, args[0].shape[-1]).clone())
        handles.append(router.register_forward_pre_hook(hook))
    try:
        yield captured
    finally:
        for handle in handles:
            handle.remove()


def reference_counts(
    model: torch.nn.Module, router: torch.nn.Module, hidden: torch.Tensor, top_k: int, keep: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Hard top-k counts [E] and probability sums [E] (float64) over the kept tokens."""
    probs = router_probabilities(model, router, hidden)  # float64 [N, E]
    chosen = torch.topk(probs.float(), top_k, dim=-1).indices  # the family chooses on float32 probabilities
    if keep is not None:
        chosen, probs = chosen[keep], probs[keep]
    counts = torch.bincount(chosen.reshape(-1), minlength=probs.shape[-1])
    return counts, probs.sum(dim=0)


def independent_switch_loss(router_logits, chosen, num_experts, mask):
    """Switch loss E·Σ f·P with f from the given choices, in float64, written out directly."""
    keep = mask.reshape(-1).double()
    fraction = torch.zeros(num_experts, dtype=torch.float64)
    probability = torch.zeros(num_experts, dtype=torch.float64)
    for logits, indices in zip(router_logits, chosen, strict=True):
        probs = torch.softmax(logits.detach().double(), dim=-1)
        for slot in range(indices.shape[1]):
            fraction += torch.zeros(num_experts, dtype=torch.float64).index_add_(0, indices[:, slot], keep)
        probability += (probs * keep[:, None]).sum(0)
    total = keep.sum() * len(chosen)
    return float((fraction / total * probability / total).sum() * num_experts)
