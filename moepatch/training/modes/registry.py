"""Which run mode trains a run: every mode, in the order they are tried."""

from __future__ import annotations

from moepatch.training.arguments import RunArguments
from moepatch.training.modes.base import RunMode
from moepatch.training.modes.dynamic import DynamicMixingMode
from moepatch.training.modes.plain import PlainMode
from moepatch.training.modes.static import StaticMixtureMode
from moepatch.training.modes.task_experts import TaskExpertsMode

MODES: tuple[type[RunMode], ...] = (TaskExpertsMode, DynamicMixingMode, StaticMixtureMode, PlainMode)
"""Every run mode, in the order they are tried: the first that applies trains the run (:class:`PlainMode` always
applies, so it comes last)."""


def select_mode(args: RunArguments) -> RunMode:
    """A fresh object of the first mode of :data:`MODES` the arguments ask for (one per run: it keeps what its
    checks find for its training)."""
    mode_class = next(mode for mode in MODES if mode.applies(args))
    return mode_class()


__all__ = ["MODES", "select_mode"]
