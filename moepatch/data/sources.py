"""Where a run's data sources are: one ``train`` file (or folder of files) per named source and an optional ``dev`` file
for probing, from a data folder and ``name=path`` entries — read by fine-tuning, task experts and their requests."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from moepatch.errors import FieldError


def named_paths(entries: Sequence[str] | None, field: str) -> dict[str, Path]:
    """``{name: path}`` of ``name=path`` entries; :class:`FieldError` naming ``field`` for a malformed or repeated
    one."""
    result: dict[str, Path] = {}
    for entry in entries or ():
        name, sep, path = entry.partition("=")
        if not sep or not name or not path:
            raise FieldError(field, f"expected name=path, got {entry!r}")
        if name in result:
            raise FieldError(field, f"source {name!r} given twice")
        result[name] = Path(path)
    return result


def _check_data_path(path: Path, field: str, name: str, *, folder_ok: bool = True) -> None:
    if not path.exists():
        raise FieldError(field, f"source {name!r}: {path}: no such file")
    if path.is_dir():
        if not folder_ok:
            raise FieldError(field, f"source {name!r}: {path} is a folder; expected a jsonl file")
        if not any(path.glob("*.jsonl")):
            raise FieldError(field, f"source {name!r}: folder {path} has no *.jsonl file")


def discover_sources(data_dir: str | Path | None, train_files: Sequence[str] | None = None,
                     probe_files: Sequence[str] | None = None) -> dict[str, tuple[Path, Path | None]]:
    """``{name: (train, probe or None)}`` in sorted name order (the official order of matrices and weights): the
    sources of ``data_dir`` (``train/<name>.jsonl`` or ``train/<name>/*.jsonl``, optional ``dev/<name>.jsonl``) and
    the ``name=path`` entries of ``train_files`` / ``probe_files``, which take precedence.

    Raises:
        FieldError: naming the field (``data_dir``, ``train_files``, ``probe_files``): a malformed or repeated
            ``name=path``, a probe file of no source, a missing file or folder, a data folder without ``train/`` or
            without any source.
    """
    train = named_paths(train_files, "train_files")
    probe = named_paths(probe_files, "probe_files")
    origin = dict.fromkeys(train, "train_files")
    dev_origin = dict.fromkeys(probe, "probe_files")
    if data_dir:
        root = Path(data_dir)
        if not root.is_dir():
            raise FieldError("data_dir", f"{root}: no such folder" if not root.exists() else
                             f"{root} is a file; expected a folder with train/<name>.jsonl")
        if not (root / "train").is_dir():
            raise FieldError("data_dir", f"{root} has no train/ folder (expected train/<name>.jsonl or "
                                           "train/<name>/*.jsonl, and optionally dev/<name>.jsonl)")
        for entry in sorted((root / "train").iterdir()):
            name = entry.stem if entry.suffix == ".jsonl" else entry.name
            if entry.is_dir() or entry.suffix == ".jsonl":
                if name not in train:
                    train[name], origin[name] = entry, "data_dir"
                dev = root / "dev" / f"{name}.jsonl"
                if dev.is_file() and name not in probe:
                    probe[name], dev_origin[name] = dev, "data_dir"
        if not train:
            raise FieldError("data_dir", f"{root / 'train'} holds no source (no <name>.jsonl file or <name>/ "
                                           "folder)")
    unknown = sorted(set(probe) - set(train))
    if unknown:
        raise FieldError("probe_files", f"{unknown} name no training source (sources: {sorted(train)})")
    for name, path in train.items():
        _check_data_path(path, origin[name], name)
    for name, path in probe.items():
        _check_data_path(path, dev_origin[name], name)
    return {name: (train[name], probe.get(name)) for name in sorted(train)}


__all__ = ["discover_sources", "named_paths"]
