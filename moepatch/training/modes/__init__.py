"""The run modes of a fine-tuning run, one module each, behind :class:`~moepatch.training.modes.base.RunMode`.

* :class:`TaskExpertsMode` — ``--task_experts true``: one LoRA adapter per source;
* :class:`DynamicMixingMode` — the default: a mixture whose weights move with the probe rounds;
* :class:`StaticMixtureMode` — ``--dynamic_sampling false --initial_weights FILE``: a fixed mixture;
* :class:`PlainMode` — ``--dynamic_sampling false``: epochs over the concatenated sources.

Adding a mode is a module with a :class:`RunMode` subclass and one entry in :data:`MODES`
(:mod:`~moepatch.training.modes.registry`).  The runner imports the modules themselves, not this package.
"""

from __future__ import annotations

from moepatch.training.modes.base import PreparedRun
from moepatch.training.modes.base import RunMode
from moepatch.training.modes.dynamic import DynamicMixingMode
from moepatch.training.modes.plain import PlainMode
from moepatch.training.modes.registry import MODES
from moepatch.training.modes.registry import select_mode
from moepatch.training.modes.static import StaticMixtureMode
from moepatch.training.modes.task_experts import TaskExpertsMode
from moepatch.training.modes.task_experts import refuse_unused_task_expert_flags

__all__ = ["MODES", "DynamicMixingMode", "PlainMode", "PreparedRun", "RunMode", "StaticMixtureMode",
           "TaskExpertsMode", "refuse_unused_task_expert_flags", "select_mode"]
