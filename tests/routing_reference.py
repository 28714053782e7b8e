"""Routing computed from scratch in the tests, independent of moepatch's code.

Captures the hidden states fed to every router with the test's own hooks and recomputes the family's rule from the
router weights: logits = h · Wᵀ, p = softmax_fp32(logits), top-k of p.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch


def moe_routers(model: torch.nn.Module) -> dict[int, torch.nn.Module]:
    """Absolute layer index → router, found by walking the HF module tree (``layers.{i}.mlp.gate`` with a weight)."""
    routers = {}
    for name, module in model.named_modules():
        parts = name.split(".")
        if len(parts) >= 4 and parts[-4] == "layers" and parts[-2:] == ["mlp", "gate"] and hasattr(module, "weight"):
            routers[int(parts[-3])] = module
    return routers


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
    hidden: torch.Tensor, weight: torch.Tensor, top_k: int, keep: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Hard top-k counts [E] and probability sums [E] (float64) over the kept tokens."""
    logits = hidden.double() @ weight.detach().double().T
    probs = torch.softmax(logits, dim=-1)
    fp32_logits = torch.nn.functional.linear(hidden, weight.detach())
    chosen = torch.topk(torch.softmax(fp32_logits, dim=-1, dtype=torch.float), top_k, dim=-1).indices
    if keep is not None:
        chosen, probs = chosen[keep], probs[keep]
    counts = torch.bincount(chosen.reshape(-1), minlength=weight.shape[0])
    return counts, probs.sum(dim=0)
