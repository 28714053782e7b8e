"""The expert-parallel layout a load asks for, checked against the checkpoint before anything is loaded.

transformers finds an unfit layout late or not at all: an ``ep_size`` that does not divide the routed experts fails
while the experts are sharded (after the process group and the device mesh exist, on every rank), an
``ep_implementation`` it does not know fails when the experts' forward is installed, and a checkpoint renumbered by
``moepatch place --write-permuted`` for another EP size loads silently with its planned groups split over ranks.
The checks here say each by its field from the checkpoint's config.json alone, so :func:`moepatch.from_pretrained`
(and the loader ``moepatch install`` writes, which goes through it) and ``scripts/finetune.py`` refuse before a
weight is read, and :func:`moepatch.apply` refuses a model that was loaded around them.

The moepatch block's ``ep_implementation`` field chooses the dispatch where the caller left
``DistributedConfig.ep_implementation`` at transformers' default ``"auto"`` (:func:`resolve_ep_implementation`).
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from transformers.distributed.expert_parallel import EPImplementationInterface

from moepatch.errors import FieldError
from moepatch.expert_parallel.placement import check_placement
from moepatch.expert_parallel.placement import distributed_ep_size

EXPERT_COUNT_FIELDS = ("num_experts", "num_local_experts", "n_routed_experts", "moe_num_experts")
"""Config fields that hold a family's routed-expert count (the first one present is read)."""

AUTO_EP_IMPLEMENTATION = "auto"
"""transformers' default ``ep_implementation``: its own choice (``all_reduce`` at inference on a shared batch,
``all_to_all`` otherwise). Left at this, the moepatch block's ``ep_implementation`` is used instead."""


def routed_expert_count(config: Any) -> int | None:
    """The routed-expert count of a model config (the first of :data:`EXPERT_COUNT_FIELDS` that is an integer);
    ``None`` when it names none."""
    return next((getattr(config, name) for name in EXPERT_COUNT_FIELDS
                 if isinstance(getattr(config, name, None), int) and not isinstance(getattr(config, name), bool)),
                None)


def ep_size_problem(config: Any, ep_size: int) -> str | None:
    """Why ``ep_size`` ranks cannot shard the routed experts of ``config`` (``None`` when they can): transformers
    gives each rank ``num_experts / ep_size`` whole experts, so the size must divide the count."""
    experts = routed_expert_count(config)
    if experts is None:
        return (f"the {getattr(config, 'model_type', type(config).__name__)} config names no routed-expert count "
                f"({', '.join(EXPERT_COUNT_FIELDS)}): cannot shard its experts")
    if experts % ep_size:
        return f"{ep_size} does not divide the model's {experts} routed experts"
    return None


def known_ep_implementations() -> tuple[str, ...]:
    """The names transformers' ``EPImplementationInterface`` knows: its own and moepatch's ``"moepatch_dedup"``
    (registered by ``import moepatch``, which every caller of this module has run)."""
    return tuple(EPImplementationInterface())


def ep_implementation_problem(name: Any) -> str | None:
    """Why ``name`` cannot be an ``ep_implementation`` (``None`` when transformers knows it)."""
    known = known_ep_implementations()
    if isinstance(name, str) and name in known:
        return None
    return (f"expected a name EPImplementationInterface knows ({', '.join(repr(item) for item in known)}), got "
            f"{name!r} (a custom dispatch is registered with EPImplementationInterface.register before loading)")


def distributed_field(distributed_config: Any, name: str, default: Any = None) -> Any:
    """A field of a transformers ``DistributedConfig`` or of a dict of its fields (``from_pretrained`` takes
    either)."""
    if isinstance(distributed_config, Mapping):
        return distributed_config.get(name, default)
    return getattr(distributed_config, name, default)


def check_expert_parallel_load(path: str | Path, config: Any, distributed_config: Any) -> None:
    """Refuse a ``distributed_config`` that does not fit the checkpoint at ``path`` (with its loaded ``config``),
    before any weight is read or any process group is needed.

    Raises:
        FieldError: ``ep_implementation`` is a name transformers does not know (``"auto"`` is fine); ``ep_size``
            does not divide the routed experts, or the config names no expert count.
        ValueError: the checkpoint was renumbered for another EP size (naming ``expert_placement.json`` and both
            sizes; :func:`~moepatch.expert_parallel.placement.check_placement`).
    """
    if distributed_config is None:
        return
    implementation = distributed_field(distributed_config, "ep_implementation", AUTO_EP_IMPLEMENTATION)
    problem = ep_implementation_problem(implementation)
    if problem is not None:
        raise FieldError("ep_implementation", problem)
    ep_size = distributed_ep_size(distributed_config)
    if ep_size <= 1:
        return
    check_placement(path, ep_size)
    problem = ep_size_problem(config, ep_size)
    if problem is not None:
        raise FieldError("ep_size", f"{problem} ({Path(path) / 'config.json'}): each expert-parallel rank holds "
                                    "num_experts / ep_size whole experts")


def resolve_ep_implementation(distributed_config: Any, block_choice: str | None) -> Any:
    """``distributed_config`` with the moepatch block's ``ep_implementation`` where the caller left transformers'
    default ``"auto"`` (a copy: the caller's object is not changed); as given when the caller chose one, the block
    chooses none, or there is no expert parallelism (``ep_size`` 1)."""
    if (block_choice is None or distributed_config is None or distributed_ep_size(distributed_config) <= 1
            or distributed_field(distributed_config, "ep_implementation", AUTO_EP_IMPLEMENTATION)
            != AUTO_EP_IMPLEMENTATION):
        return distributed_config
    if isinstance(distributed_config, Mapping):
        return {**distributed_config, "ep_implementation": block_choice}
    resolved = copy.copy(distributed_config)
    resolved.ep_implementation = block_choice
    return resolved


def loaded_ep_size(model: Any) -> int:
    """The expert-parallel size a loaded model was sharded with (``from_pretrained`` keeps its
    ``DistributedConfig`` as ``config.distributed_config``); 1 when it was not."""
    return distributed_ep_size(getattr(getattr(model, "config", None), "distributed_config", None))


def check_loaded_placement(model: Any, folder: str | Path | None) -> None:
    """Refuse a model sharded for expert parallelism at a size other than the one its checkpoint ``folder``
    (where it was loaded from) was renumbered for: the load itself, through plain ``from_pretrained``, did not
    check.

    Raises:
        ValueError: naming ``expert_placement.json`` and both EP sizes.
    """
    ep_size = loaded_ep_size(model)
    if ep_size > 1 and folder is not None:
        check_placement(folder, ep_size)


__all__ = ["AUTO_EP_IMPLEMENTATION", "EXPERT_COUNT_FIELDS", "check_expert_parallel_load", "check_loaded_placement",
           "distributed_field", "ep_implementation_problem", "ep_size_problem", "known_ep_implementations",
           "loaded_ep_size", "resolve_ep_implementation", "routed_expert_count"]
