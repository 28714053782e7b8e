"""The data sources a fine-tuning run trains on, and their initial mixture weights.

Where the files are is :func:`moepatch.data.sources.discover_sources`'s (a library function that names its fields);
this module turns its :class:`~moepatch.errors.FieldError` into the flag the user gave (:data:`SOURCE_FLAGS`) and
checks ``--initial_weights`` against the sources found.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

from moepatch.data.sources import discover_sources
from moepatch.data.synthetic import TASKS
from moepatch.errors import CommandError
from moepatch.errors import FieldError
from moepatch.training.arguments import SOURCE_FLAGS
from moepatch.training.arguments import DataArguments
from moepatch.validation import is_number
from moepatch.validation import read_json_argument


def source_paths(data_args: DataArguments) -> dict[str, tuple[Path, Path | None]]:
    """``{name: (train, probe or None)}`` in sorted name order (the official order of matrices and weights), from
    :func:`moepatch.data.sources.discover_sources`.

    Raises:
        UsageError: naming the argument: a malformed or repeated ``name=path``, a probe file of no source, a missing
            file or folder, a data folder without ``train/`` or without any source.
    """
    try:
        return discover_sources(data_args.data_dir, data_args.train_files, data_args.probe_files)
    except FieldError as error:
        raise error.as_usage_error(SOURCE_FLAGS) from None


def source_names(data_args: DataArguments) -> list[str]:
    """The sources a run trains on, in order (the synthetic tasks for ``--synthetic_data``); checks their paths."""
    if data_args.generates_synthetic:
        return sorted(TASKS)
    return list(source_paths(data_args))


def read_initial_weights(path: str, names: Sequence[str], *, positive: bool = False) -> list[float]:
    """``--initial_weights``: the weight of every source, in ``names`` order.

    Args:
        path (`str`): a JSON file ``{source: weight}``.
        names (`Sequence[str]`): the sources, every one of which needs a weight.
        positive (`bool`, *optional*, defaults to `False`): every weight must be > 0 (dynamic mixing updates the
            weights in log space).

    Raises:
        UsageError: naming ``--initial_weights``: a missing file.  CommandError, naming the file and the flag: not
            JSON, not an object, names that do not match
            the sources, a weight that is not a finite number >= 0 (> 0 with ``positive``), or all weights zero.
    """
    flag, expected = "--initial_weights", f"an object mapping each source {list(names)} to its weight"
    given = read_json_argument(path, flag, expected)
    if not isinstance(given, dict):
        raise CommandError(f"{path} ({flag}): expected {expected}, got {type(given).__name__}")
    missing, extra = sorted(set(names) - set(given)), sorted(set(given) - set(names))
    if missing or extra:
        parts = ([f"no weight for {missing}"] if missing else []) + ([f"{extra} name no source"] if extra else [])
        raise CommandError(f"{path} ({flag}): {'; '.join(parts)} (sources: {list(names)})")
    bad = {name: given[name] for name in names
           if not (is_number(given[name]) and math.isfinite(given[name]) and given[name] >= 0)}
    if bad:
        raise CommandError(f"{path} ({flag}): every weight must be a finite number >= 0, got {bad}")
    if positive and any(given[name] == 0 for name in names):
        zero = [name for name in names if given[name] == 0]
        raise CommandError(f"{path} ({flag}): dynamic mixing needs every weight > 0 (it updates them in log space); "
                           f"{zero} are 0 (or pass --dynamic_sampling false)")
    if not sum(given[name] for name in names) > 0:
        raise CommandError(f"{path} ({flag}): the weights sum to 0; at least one source needs a positive weight")
    return [float(given[name]) for name in names]


__all__ = ["SOURCE_FLAGS", "read_initial_weights", "source_names", "source_paths"]
