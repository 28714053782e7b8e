"""Helpers shared by the test modules (fixtures stay in conftest.py)."""

from __future__ import annotations

import torch


def logits_of(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """The model's logits for ``batch``, without gradients."""
    with torch.no_grad():
        return model(**batch).logits
