"""Renumbered checkpoints under expert parallelism: the EP size a renumbering places planned groups for.

``moepatch place CHECKPOINT --ep-size D --write-permuted DIR`` renumbers each MoE layer's experts so that the
contiguous shard transformers' expert parallelism gives rank ``d`` (experts ``d·E/D .. (d+1)·E/D - 1``, ``Shard(0)``
of the stacked expert weights) is exactly planned group ``d``. That holds for ``ep_size = D`` only: under another EP
size each rank's contiguous shard straddles planned groups, and the locality the plan bought is lost without any
error. So the copy records ``D`` in :data:`PLACEMENT_FILE`, and :func:`check_placement` refuses another EP size by
name before anything is loaded (:func:`moepatch.from_pretrained` calls it when given a ``distributed_config`` with
``ep_size > 1``, and ``moepatch place`` when its SOURCE records a placement).
"""

from __future__ import annotations

import json
from collections.abc import Collection
from collections.abc import Mapping
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from transformers import AutoConfig

from moepatch.errors import FieldError

PLACEMENT_FILE = "expert_placement.json"
"""Written next to ``expert_permutation.json`` by a renumbering made for an EP size: ``{"ep_size": D,
"num_experts": E, "experts_per_rank": E / D, "layers": [renumbered decoder layers]}``."""

EXPERT_COUNT_FIELDS = ("num_experts", "num_local_experts", "n_routed_experts", "moe_num_experts")
"""Config fields that hold a family's routed-expert count (the first one present is read)."""

PERMUTATION_FILE = "expert_permutation.json"
"""The renumbering itself (``moepatch.tools.c2r.permutation.PERMUTATION_FILE``)."""


def _positive_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


def write_placement_record(folder: str | Path, ep_size: int, permutations: Mapping[int, Sequence[int]]) -> Path:
    """Write :data:`PLACEMENT_FILE` into ``folder`` for ``permutations`` (layer → new-to-old permutation) planned for
    ``ep_size`` ranks.

    Raises:
        ValueError: ``ep_size`` is not a positive integer, there is no permutation, the layers do not all have the
            same number of experts, or ``ep_size`` does not divide it.
    """
    if not _positive_int(ep_size):
        raise ValueError(f"ep_size must be a positive integer, got {ep_size!r}")
    sizes = {len(permutation) for permutation in permutations.values()}
    if len(sizes) != 1:
        raise ValueError(f"expected permutations of one expert count for every layer, got sizes {sorted(sizes)}")
    num_experts = sizes.pop()
    if num_experts % ep_size:
        raise ValueError(f"ep_size={ep_size} does not divide the {num_experts} experts")
    record = {"ep_size": ep_size, "num_experts": num_experts, "experts_per_rank": num_experts // ep_size,
              "layers": sorted(int(layer) for layer in permutations)}
    path = Path(folder) / PLACEMENT_FILE
    path.write_text(json.dumps(record, indent=1) + "\n")
    return path


def read_placement_record(folder: str | Path, *, num_experts: int | None,
                          layers: Collection[int] | None) -> dict[str, Any] | None:
    """The :data:`PLACEMENT_FILE` of a checkpoint folder, checked against the checkpoint; ``None`` when the folder
    has none.

    Args:
        folder (`str` or `Path`): checkpoint folder.
        num_experts (`int` or `None`): the checkpoint's routed-expert count (its config.json's, or its structure's);
            ``None`` when its config names none, which is refused: such a record cannot be checked.
        layers (`Collection[int]` or `None`): the layer indices a renumbering may list (``range(num_hidden_layers)``,
            or the MoE layers where the structure is known); ``None``: the entries are only checked to be distinct
            indices >= 0.

    Raises:
        ValueError: the file is not JSON, or a field is missing, of the wrong type, inconsistent, or not this
            checkpoint's (``num_experts``, ``layers``), naming the file and the field.
    """
    path = Path(folder) / PLACEMENT_FILE
    if not path.is_file():
        return None
    try:
        record = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ValueError(f"{path}: not a readable JSON file ({error})") from None
    if not isinstance(record, dict):
        raise ValueError(f"{path}: expected a JSON object, got {type(record).__name__}")
    for field in ("ep_size", "num_experts", "experts_per_rank"):
        if not _positive_int(record.get(field)):
            raise ValueError(f"{path}: field {field!r} must be a positive integer, got {record.get(field)!r}")
    if record["ep_size"] * record["experts_per_rank"] != record["num_experts"]:
        raise ValueError(f"{path}: ep_size {record['ep_size']} x experts_per_rank {record['experts_per_rank']} is not "
                         f"num_experts {record['num_experts']}")
    if num_experts is None:
        raise ValueError(f"{path}: field 'num_experts' cannot be checked: the checkpoint's config names no "
                         "routed-expert count")
    if record["num_experts"] != num_experts:
        raise ValueError(f"{path}: field 'num_experts' is {record['num_experts']}, but the checkpoint has "
                         f"{num_experts} routed experts: this record was not written for this checkpoint")
    listed = record.get("layers")
    if not (isinstance(listed, list) and listed and all(_index(entry) for entry in listed)
            and len(set(listed)) == len(listed) and (layers is None or set(listed) <= set(layers))):
        allowed = "indices >= 0" if layers is None else _describe_layers(layers)
        raise ValueError(f"{path}: field 'layers' must be a non-empty list of the distinct renumbered layer "
                         f"indices of this checkpoint ({allowed}), got {listed!r}")
    return record


def _index(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _describe_layers(layers: Collection[int]) -> str:
    if isinstance(layers, range) and layers.step == 1:
        return f"its decoder layers {layers.start} .. {layers.stop - 1}" if len(layers) else "it has no layers"
    return f"its MoE layers {sorted(layers)}"


def placement_mismatch(folder: str | Path, ep_size: int, *, num_experts: int | None,
                       layers: Collection[int] | None) -> str | None:
    """Why ``folder`` must not run under ``ep_size`` expert-parallel ranks (None when it may: no record, or the
    record's EP size); the record is checked first (:func:`read_placement_record`, a ``ValueError``)."""
    record = read_placement_record(folder, num_experts=num_experts, layers=layers)
    if record is None or record["ep_size"] == ep_size:
        return None
    planned, per_rank = record["ep_size"], record["experts_per_rank"]
    return (f"{Path(folder) / PLACEMENT_FILE}: the experts of this checkpoint were renumbered so that each of "
            f"{planned} expert-parallel ranks holds one planned group of {per_rank} experts; with ep_size={ep_size} "
            f"each rank's contiguous shard of experts would not be a planned group. "
            f"Use ep_size={planned}, or renumber the original checkpoint for {ep_size} ranks (`moepatch place "
            f"ORIGINAL --ep-size {ep_size} --write-permuted DIR`)")


def config_expert_facts(config: Any) -> tuple[int | None, range | None]:
    """What a model config says a placement record must fit: its routed-expert count (the first of
    :data:`EXPERT_COUNT_FIELDS` that is an integer, ``None`` when it names none) and its decoder layers
    (``range(num_hidden_layers)``, ``None`` when it has no such integer)."""
    layers = getattr(config, "num_hidden_layers", None)
    return (routed_expert_count(config),
            range(layers) if isinstance(layers, int) and not isinstance(layers, bool) else None)


def routed_expert_count(config: Any) -> int | None:
    """The routed-expert count of a model config (the first of :data:`EXPERT_COUNT_FIELDS` that is an integer);
    ``None`` when it names none."""
    return next((getattr(config, name) for name in EXPERT_COUNT_FIELDS
                 if isinstance(getattr(config, name, None), int) and not isinstance(getattr(config, name), bool)),
                None)


def check_placement(path: str | Path, ep_size: int, config: Any = None) -> dict[str, Any] | None:
    """Refuse a renumbered checkpoint whose planned groups are not ``ep_size``'s contiguous shards, before loading.

    Args:
        path (`str` or `Path`): checkpoint folder.
        ep_size (`int`): the expert-parallel size it is about to be loaded with.
        config (*optional*): the checkpoint's model config, which the record must fit (its routed-expert count and
            decoder layers, :func:`config_expert_facts`); read from ``path``'s config.json when not given and the
            folder has a record.

    Returns:
        The checked :data:`PLACEMENT_FILE` record when the folder has one (its ``ep_size`` equals ``ep_size``: each
        rank's contiguous shard is one planned group), else ``None`` (not renumbered for an EP size: a renumbering
        written without one, by :func:`moepatch.tools.c2r.permutation.write_permuted_checkpoint` without ``ep_size``,
        cannot be checked and loads as it is).

    Raises:
        ValueError: ``ep_size`` is not a positive integer, the record is malformed or not this checkpoint's, or it
            was planned for another EP size (naming the file, the field or both sizes, and what to do).
    """
    if not _positive_int(ep_size):
        raise ValueError(f"ep_size must be a positive integer, got {ep_size!r}")
    if not (Path(path) / PLACEMENT_FILE).is_file():
        return None
    if config is None:  # by its model_type (transformers' or a family moepatch registers), never the folder's code
        config = AutoConfig.from_pretrained(path, trust_remote_code=False)
    num_experts, layers = config_expert_facts(config)
    problem = placement_mismatch(path, ep_size, num_experts=num_experts, layers=layers)
    if problem is not None:
        raise ValueError(problem)
    return read_placement_record(path, num_experts=num_experts, layers=layers)


def distributed_ep_size(distributed_config: Any) -> int:
    """The ``ep_size`` of a transformers ``DistributedConfig`` (or a mapping of its fields); 1 when none is set.

    Raises:
        FieldError: naming ``distributed_config.ep_size``: a value that is not an integer >= 1 (``"2"``, ``2.5``,
            ``True`` are refused, never converted).
    """
    if distributed_config is None:
        return 1
    value = (distributed_config.get("ep_size") if isinstance(distributed_config, Mapping)
             else getattr(distributed_config, "ep_size", None))
    if value is None:
        return 1
    if not _positive_int(value):
        raise FieldError("distributed_config.ep_size", f"expected an integer >= 1, got {value!r}")
    return int(value)
