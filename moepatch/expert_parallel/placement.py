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
from collections.abc import Mapping
from collections.abc import Sequence
from pathlib import Path
from typing import Any

PLACEMENT_FILE = "expert_placement.json"
"""Written next to ``expert_permutation.json`` by a renumbering made for an EP size: ``{"ep_size": D,
"num_experts": E, "experts_per_rank": E / D, "layers": [renumbered decoder layers]}``."""

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


def read_placement_record(folder: str | Path) -> dict[str, Any] | None:
    """The :data:`PLACEMENT_FILE` of a checkpoint folder, checked; ``None`` when the folder has none.

    Raises:
        ValueError: the file is not JSON or a field is missing or inconsistent, naming the file and the field.
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
    return record


def placement_mismatch(folder: str | Path, ep_size: int) -> str | None:
    """Why ``folder`` must not run under ``ep_size`` expert-parallel ranks (None when it may: no record, or the
    record's EP size)."""
    record = read_placement_record(folder)
    if record is None or record["ep_size"] == ep_size:
        return None
    planned, per_rank = record["ep_size"], record["experts_per_rank"]
    return (f"{Path(folder) / PLACEMENT_FILE}: the experts of this checkpoint were renumbered so that each of "
            f"{planned} expert-parallel ranks holds one planned group of {per_rank} experts; with ep_size={ep_size} "
            f"each rank's contiguous shard of experts would not be a planned group. "
            f"Use ep_size={planned}, or renumber the original checkpoint for {ep_size} ranks (`moepatch place "
            f"ORIGINAL --ep-size {ep_size} --write-permuted DIR`)")


def check_placement(path: str | Path, ep_size: int) -> dict[str, Any] | None:
    """Refuse a renumbered checkpoint whose planned groups are not ``ep_size``'s contiguous shards, before loading.

    Args:
        path (`str` or `Path`): checkpoint folder.
        ep_size (`int`): the expert-parallel size it is about to be loaded with.

    Returns:
        The checked :data:`PLACEMENT_FILE` record when the folder has one (its ``ep_size`` equals ``ep_size``: each
        rank's contiguous shard is one planned group), else ``None`` (not renumbered for an EP size: a renumbering
        written without one, by :func:`moepatch.tools.c2r.permutation.write_permuted_checkpoint` without ``ep_size``,
        cannot be checked and loads as it is).

    Raises:
        ValueError: ``ep_size`` is not a positive integer, the record is malformed, or it was planned for another EP
            size (naming the file, both sizes and what to do).
    """
    if not _positive_int(ep_size):
        raise ValueError(f"ep_size must be a positive integer, got {ep_size!r}")
    problem = placement_mismatch(path, ep_size)
    if problem is not None:
        raise ValueError(problem)
    return read_placement_record(path)


def distributed_ep_size(distributed_config: Any) -> int:
    """The ``ep_size`` of a transformers ``DistributedConfig`` (or a dict of its fields); 1 when none is set."""
    if distributed_config is None:
        return 1
    value = (distributed_config.get("ep_size") if isinstance(distributed_config, Mapping)
             else getattr(distributed_config, "ep_size", None))
    return 1 if value is None else int(value)
