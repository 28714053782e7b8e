"""A log of every change moepatch makes to a model, undone in reverse order.

Reversibility is by construction: nothing is changed except through an :class:`UndoLog`, which records the exact
original object (an instance attribute or its absence, a ``requires_grad`` flag, a hook handle) and restores it.
No ``importlib.reload``, no class attribute is ever touched.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch.utils.hooks import RemovableHandle

_MISSING = object()


class UndoLog:
    """Records changes and undoes them last-first."""

    def __init__(self) -> None:
        self._steps: list[Callable[[], object]] = []  # what a step returns is ignored

    def __len__(self) -> int:
        return len(self._steps)

    def set_attribute(self, obj: Any, name: str, value: Any) -> None:
        """Set ``obj.<name>`` in the instance ``__dict__``; undo restores the previous instance value or its absence."""
        previous = obj.__dict__.get(name, _MISSING)
        obj.__dict__[name] = value

        def undo() -> None:
            if previous is _MISSING:
                obj.__dict__.pop(name, None)
            else:
                obj.__dict__[name] = previous

        self._steps.append(undo)

    def set_requires_grad(self, parameter: torch.nn.Parameter, flag: bool) -> None:
        """Set ``parameter.requires_grad``; undo restores the previous flag."""
        previous = parameter.requires_grad
        parameter.requires_grad_(flag)
        self._steps.append(lambda: parameter.requires_grad_(previous))

    def add_buffer(self, module: torch.nn.Module, name: str, tensor: torch.Tensor) -> None:
        """Register a non-persistent buffer (moves with ``.to()``, never saved); undo unregisters it."""
        if name in module._buffers or hasattr(module, name):
            raise ValueError(f"{type(module).__name__} already has an attribute {name!r}")
        module.register_buffer(name, tensor, persistent=False)

        def undo() -> None:
            module._buffers.pop(name, None)
            module._non_persistent_buffers_set.discard(name)

        self._steps.append(undo)

    def add_module(self, parent: torch.nn.Module, name: str, module: torch.nn.Module) -> None:
        """Register ``module`` as ``parent.<name>`` (its parameters join the model); undo unregisters it."""
        if name in parent._modules or hasattr(parent, name):
            raise ValueError(f"{type(parent).__name__} already has an attribute {name!r}")
        parent.add_module(name, module)
        self._steps.append(lambda: parent._modules.pop(name, None))

    def add_hook(self, handle: RemovableHandle) -> None:
        """Take ownership of a hook handle; undo removes the hook."""
        self._steps.append(handle.remove)

    def add_callback(self, callback: Callable[[], None]) -> None:
        """Run ``callback`` when undoing (for objects with their own stop method)."""
        self._steps.append(callback)

    def undo(self) -> None:
        """Undo every recorded change, newest first; the log is empty afterwards."""
        while self._steps:
            self._steps.pop()()
