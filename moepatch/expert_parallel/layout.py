"""The expert-parallel layout a load asks for, checked against the checkpoint before anything is loaded.

transformers finds an unfit layout late or not at all: an ``ep_size`` that does not divide the routed experts fails
while the experts are sharded (after the process group and the device mesh exist, on every rank), an
``ep_implementation`` it does not know, or whose layout condition is not met (``all_reduce`` without ``ep_size ==
tp_size``), fails when the experts' forward is installed, a model without an EP plan fails while its plans are
resolved, and a checkpoint renumbered by ``moepatch place --write-permuted`` for another EP size loads silently with
its planned groups split over ranks.
The checks here say each by its field from the checkpoint's config.json alone, so :func:`moepatch.from_pretrained`
(and the loader ``moepatch install`` writes, which goes through it) and ``scripts/finetune.py`` refuse before a
weight is read, and :func:`moepatch.apply` refuses a model that was loaded around them.

The moepatch block's ``ep_implementation`` field chooses the dispatch where the caller left
``DistributedConfig.ep_implementation`` at transformers' default ``"auto"`` (:func:`resolve_ep_implementation`).
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from transformers import AutoModel
from transformers import AutoModelForCausalLM
from transformers import DistributedConfig
from transformers.distributed.expert_parallel import EPImplementationInterface

from moepatch.errors import FieldError
from moepatch.expert_parallel.placement import EXPERT_COUNT_FIELDS
from moepatch.expert_parallel.placement import check_placement
from moepatch.expert_parallel.placement import distributed_ep_size
from moepatch.expert_parallel.placement import routed_expert_count

AUTO_EP_IMPLEMENTATION = "auto"
"""transformers' default ``ep_implementation``: its own choice (``all_reduce`` at inference on a shared batch,
``all_to_all`` otherwise). Left at this, the moepatch block's ``ep_implementation`` is used instead."""


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


SIZE_FIELDS = ("tp_size", "fsdp_size", "ep_size", "dp_replicate_size", "pp_size")
"""The parallel sizes of a transformers ``DistributedConfig``: each an integer >= 1 (or unset)."""


def checked_distributed_config(distributed_config: Any) -> DistributedConfig:
    """``distributed_config`` (a transformers ``DistributedConfig``, or a mapping of its fields) as the
    ``DistributedConfig`` transformers' load resolves it to, every size checked first: nothing is converted.

    Raises:
        FieldError: naming ``distributed_config`` (neither a ``DistributedConfig`` nor a mapping; a layout
            transformers refuses, in its words) or ``distributed_config.<size>`` (not an integer >= 1: a string, a
            float or a bool).
    """
    if not isinstance(distributed_config, DistributedConfig | Mapping):
        raise FieldError("distributed_config", f"expected a transformers DistributedConfig or a dict of its fields, "
                                               f"got {type(distributed_config).__name__} {distributed_config!r}")
    for name in SIZE_FIELDS:
        value = distributed_field(distributed_config, name)
        if value is not None and not (isinstance(value, int) and not isinstance(value, bool) and value >= 1):
            raise FieldError(f"distributed_config.{name}", f"expected an integer >= 1, got {value!r}")
    if isinstance(distributed_config, DistributedConfig):
        return distributed_config
    try:
        with warnings.catch_warnings():  # transformers warns again when it builds its own
            warnings.simplefilter("ignore")
            return DistributedConfig.from_dict(dict(distributed_config))
    except (ValueError, TypeError) as error:
        raise FieldError("distributed_config", str(error)) from None


def ep_plan_problem(config: Any, distributed_config: DistributedConfig) -> str | None:
    """Why transformers cannot shard the model ``config`` builds over ``ep_size`` ranks for want of an
    expert-parallel plan (``None`` when it has one): as ``from_pretrained`` resolves it, the causal-LM class's and its
    base model's ``_ep_plan``, the config's ``base_model_ep_plan`` (its text config's for a composite one) and the
    ``DistributedConfig``'s own ``ep_plan``; all empty is refused during the load (``has no `ep_plan```)."""
    plans: list[Any] = [distributed_config.ep_plan, getattr(config, "base_model_ep_plan", None)]
    text_config = config.get_text_config() if hasattr(config, "get_text_config") else None
    if text_config is not None:
        plans.append(getattr(text_config, "base_model_ep_plan", None))
    names = []
    for mapping in (AutoModelForCausalLM._model_mapping, AutoModel._model_mapping):
        model_class: Any = mapping[type(config)] if type(config) in mapping else None
        if model_class is not None:
            plans.append(getattr(model_class, "_ep_plan", None))
            names.append(model_class.__name__)
    if any(isinstance(plan, dict) and plan for plan in plans):
        return None
    shown = names[0] if names else type(config).__name__
    return (f"the {getattr(config, 'model_type', type(config).__name__)!r} model ({shown}) has no expert-parallel "
            "plan (transformers' base_model_ep_plan), so transformers cannot split its experts over ranks")


def ep_layout_problem(distributed_config: DistributedConfig, implementation: str) -> str | None:
    """Why the ``ep_implementation`` named ``implementation`` cannot run on ``distributed_config``'s layout
    (``None`` when it can): transformers' implementations that set ``needs_shared_batch`` (``all_reduce``,
    ``deepgemm_megamoe``) need every rank of the expert group to hold the same batch, which is ``ep_size ==
    tp_size``; transformers refuses any other layout while the experts' forward is installed."""
    implementations = EPImplementationInterface()
    ep_size, tp_size = distributed_config.ep_size or 1, distributed_config.tp_size or 1  # set by __post_init__
    if implementation not in implementations or ep_size <= 1:
        return None
    if getattr(implementations[implementation], "needs_shared_batch", False) and ep_size != tp_size:
        return (f"{implementation!r} needs every rank of the expert group to hold the same batch (ep_size == "
                f"tp_size), got ep_size={ep_size}, tp_size={tp_size}, fsdp_size={distributed_config.fsdp_size}; "
                "choose another ep_implementation (e.g. 'all_to_all', 'moepatch_dedup') or tp_size = ep_size")
    return None


def check_expert_parallel_load(path: str | Path, config: Any, distributed_config: Any) -> None:
    """Refuse a ``distributed_config`` that does not fit the checkpoint at ``path`` (with its loaded ``config``),
    before any weight is read or any process group is needed.

    Raises:
        FieldError: ``distributed_config`` is not a ``DistributedConfig`` or a mapping, or a size in it is not an
            integer >= 1 (:func:`checked_distributed_config`); ``ep_implementation`` is a name transformers does not
            know (``"auto"`` is fine) or one whose layout condition this layout does not meet
            (:func:`ep_layout_problem`); ``ep_size`` does not divide the routed experts, the config names no expert
            count, or the model has no expert-parallel plan (:func:`ep_plan_problem`).
        ValueError: the checkpoint's ``expert_placement.json`` is malformed or not this checkpoint's, or it was
            renumbered for another EP size (naming the file and the field, or both sizes;
            :func:`~moepatch.expert_parallel.placement.check_placement`).
    """
    if distributed_config is None:
        return
    resolved = checked_distributed_config(distributed_config)
    implementation = resolved.ep_implementation
    problem = ep_implementation_problem(implementation)
    if problem is not None:
        raise FieldError("ep_implementation", problem)
    ep_size = resolved.ep_size or 1  # set by DistributedConfig.__post_init__
    if ep_size <= 1:
        return
    check_placement(path, ep_size, config)
    problem = ep_size_problem(config, ep_size)
    if problem is not None:
        raise FieldError("ep_size", f"{problem} ({Path(path) / 'config.json'}): each expert-parallel rank holds "
                                    "num_experts / ep_size whole experts")
    problem = ep_plan_problem(config, resolved)
    if problem is not None:
        raise FieldError("ep_size", f"{ep_size}: {problem}; load it without expert parallelism (ep_size 1), or give "
                                    "DistributedConfig(ep_plan=...)")
    problem = ep_layout_problem(resolved, implementation)
    if problem is not None:
        raise FieldError("ep_implementation", problem)


def check_chosen_ep_implementation(distributed_config: Any, source: str) -> None:
    """Refuse the ``ep_implementation`` another place than the caller chose (``source``: the moepatch block of a
    config.json) where ``distributed_config``'s layout does not meet its condition (:func:`ep_layout_problem`).

    Raises:
        FieldError: naming ``ep_implementation`` and ``source``.
    """
    resolved = checked_distributed_config(distributed_config)
    problem = ep_layout_problem(resolved, resolved.ep_implementation)
    if problem is not None:
        raise FieldError("ep_implementation", f"{problem} (chosen by {source})")


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
        check_placement(folder, ep_size, getattr(model, "config", None))


__all__ = ["AUTO_EP_IMPLEMENTATION", "EXPERT_COUNT_FIELDS", "SIZE_FIELDS", "check_chosen_ep_implementation",
           "check_expert_parallel_load", "check_loaded_placement", "checked_distributed_config", "distributed_field",
           "ep_implementation_problem", "ep_layout_problem", "ep_plan_problem", "ep_size_problem",
           "known_ep_implementations", "loaded_ep_size", "resolve_ep_implementation", "routed_expert_count"]
