"""The attention mask of a model call, read one way by every feature that leaves padding out (routing
statistics, the model's balance loss, the LoRA-expert routers' balance loss)."""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

import torch

ARGUMENT = "attention_mask"


class AttentionMaskReader:
    """Reads ``attention_mask`` from the ``(args, kwargs)`` of calls to one ``forward``, by its signature (given
    by keyword or at its own position — never guessed)."""

    def __init__(self, forward: Callable[..., Any]) -> None:
        self._position = _argument_position(forward, ARGUMENT)

    def __call__(self, args: tuple, kwargs: dict[str, Any]) -> torch.Tensor | None:
        """The call's attention mask, or ``None`` when it has none (or not a tensor)."""
        mask = kwargs.get(ARGUMENT)
        if mask is None and self._position is not None and len(args) > self._position:
            mask = args[self._position]
        return mask if isinstance(mask, torch.Tensor) else None


def _argument_position(function: Callable[..., Any], name: str) -> int | None:
    """Positional index of argument ``name`` of a bound ``forward``, or ``None``."""
    try:
        parameters = list(inspect.signature(function).parameters.values())
    except (TypeError, ValueError):
        return None
    for position, parameter in enumerate(parameters):
        if parameter.name == name and parameter.kind in (parameter.POSITIONAL_ONLY, parameter.POSITIONAL_OR_KEYWORD):
            return position
    return None
