"""moepatch under transformers' expert parallelism: the deduplicating dispatch ``"moepatch_dedup"``.

``import moepatch`` calls :func:`register`, so ``DistributedConfig(..., ep_implementation="moepatch_dedup")`` selects
:class:`~moepatch.expert_parallel.dispatch.DedupAllToAllEP` with no further step; calling :func:`register` again is
harmless (for code that imports only this sub-package, or re-registers after a test replaced the entry).

:func:`check_placement` refuses a checkpoint renumbered by ``moepatch place --write-permuted`` for another EP size
(:mod:`moepatch.expert_parallel.placement`); :func:`check_expert_parallel_load` refuses, before anything is loaded,
a layout that does not fit a checkpoint (a ``distributed_config`` of the wrong type, renumbered for another EP size,
an ``ep_size`` that does not divide its routed experts, a model without an EP plan, an ``ep_implementation``
transformers does not know or whose layout condition is not met), and :func:`resolve_ep_implementation` applies
the moepatch block's ``ep_implementation`` (:mod:`moepatch.expert_parallel.layout`).
"""

from __future__ import annotations

from typing import Any

import torch.distributed
from transformers.distributed.expert_parallel import EPImplementationInterface

from moepatch.expert_parallel import dispatch
from moepatch.expert_parallel.dispatch import DedupAllToAllEP
from moepatch.expert_parallel.layout import check_expert_parallel_load
from moepatch.expert_parallel.layout import check_loaded_placement
from moepatch.expert_parallel.layout import known_ep_implementations
from moepatch.expert_parallel.layout import resolve_ep_implementation
from moepatch.expert_parallel.placement import PLACEMENT_FILE
from moepatch.expert_parallel.placement import check_placement
from moepatch.expert_parallel.training import replicate_added_parameters

IMPLEMENTATION_NAME = "moepatch_dedup"
"""The ``ep_implementation`` name that selects the dedup dispatch."""

_DISPATCH_NAMES = ("DedupAllToAllEP", "DispatchTraffic", "dedup_dispatches", "model_traffic", "reset_traffic")


def register() -> bool:
    """Register :class:`~moepatch.expert_parallel.dispatch.DedupAllToAllEP` in transformers'
    ``EPImplementationInterface`` as ``"moepatch_dedup"``. Returns False (and registers nothing) where this torch build
    has no ``torch.distributed``, since expert parallelism cannot run there anyway.

    Cheap at import: transformers' ``expert_parallel`` module is already loaded by ``transformers.modeling_utils``,
    so this only adds the small dispatch module.
    """

    if not torch.distributed.is_available():
        return False

    EPImplementationInterface.register(IMPLEMENTATION_NAME, DedupAllToAllEP)
    return True


def __getattr__(name: str) -> Any:
    """The dispatch's public names, imported on first use (this package imports where torch.distributed is absent)."""
    if name in _DISPATCH_NAMES:
        return getattr(dispatch, name)
    raise AttributeError(f"module 'moepatch.expert_parallel' has no attribute {name!r}")


__all__ = ["IMPLEMENTATION_NAME", "PLACEMENT_FILE", "check_expert_parallel_load", "check_loaded_placement",
           "check_placement", "known_ep_implementations", "register", "replicate_added_parameters",
           "resolve_ep_implementation", *_DISPATCH_NAMES]
