"""Shared validation helpers: every config block and argument check uses these (a leaf module: imports no feature).

Config blocks collect all their problems in a :class:`Problems` and raise one ``ValueError`` naming every bad field;
unknown keys (written by a newer moepatch) warn and are ignored.  Commands check their paths with
:func:`check_checkpoint_folder` and :func:`check_output_folder` before any work.
"""

from __future__ import annotations

import json
import math
import os
import warnings
from pathlib import Path
from typing import Any

from safetensors import safe_open

from moepatch.errors import CommandError
from moepatch.errors import FieldProblems
from moepatch.errors import MoePatchWarning
from moepatch.errors import UsageError
from moepatch.staged_output import check_writable_target


class Problems:
    """Collects every problem of one config so a user fixes them all in one go."""

    def __init__(self) -> None:
        self.messages: list[str] = []
        self.fields: list[tuple[str, str]] = []

    def add(self, path: str, message: str) -> None:
        """Record ``message`` about the field at ``path`` (``moepatch.c2r.top_t``)."""
        self.messages.append(f"{path}: {message}")
        self.fields.append((path, message))

    def raise_if_any(self) -> None:
        """Raise one :class:`~moepatch.errors.FieldProblems` (a ``ValueError``) naming every recorded field."""
        if self.fields:
            raise FieldProblems("invalid moepatch config", self.fields, one_line=True)


def warn_unknown(data: dict[str, Any], known: set[str], path: str, *, stacklevel: int = 4) -> None:
    """Warn (and ignore) each key of ``data`` that is not in ``known``: forward compatibility with newer versions.

    ``stacklevel`` points the warning at the code that read the block (``MoePatchConfig.from_dict``), through the
    parsers between.
    """
    for key in data:
        if key not in known:
            warnings.warn(
                f"{path}.{key}: unknown key, ignored (written by a newer moepatch? upgrade to use it)",
                MoePatchWarning,
                stacklevel=stacklevel,
            )


def is_int(value: Any) -> bool:
    """An ``int`` that is not a ``bool`` (JSON's ``true`` is not a count)."""
    return isinstance(value, int) and not isinstance(value, bool)


def is_number(value: Any) -> bool:
    """An ``int`` or ``float`` that is not a ``bool``."""
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def is_finite_number(value: Any) -> bool:
    """A number (not a bool) that is neither NaN nor infinite."""
    return is_number(value) and math.isfinite(value)


def check_output_folder(path: str | os.PathLike[str], argument: str) -> Path:
    """A folder a command will write into: existing and writable, or creatable (its nearest existing ancestor is a
    writable folder that accepts new files: tried, so ``/proc`` or ``/sys`` are refused too).  Checked before any
    work, so a command never fails at its last step for want of a folder
    (:func:`moepatch.staged_output.check_writable_target`).

    Raises:
        UsageError: naming ``argument``: an empty path, a file, a path under a file, or a folder where no file can
            be created.
    """

    return check_writable_target(path, argument, folder=True)


def check_checkpoint_folder(path: str | os.PathLike[str], argument: str, *, weights: bool = True) -> Path:
    """A local checkpoint folder: config.json and (with ``weights``) a weights file; moepatch never downloads.

    Raises:
        UsageError: naming ``argument`` and what is missing.
    """
    text = os.fspath(path)
    if not text.strip():
        raise UsageError(argument, "expected a checkpoint folder, got an empty path")
    folder = Path(text)
    try:
        if not folder.exists():
            raise UsageError(argument, f"no checkpoint folder at {text!r} (moepatch reads local folders only)")
        if not folder.is_dir():
            raise UsageError(argument, f"{text!r} is a file; expected a checkpoint folder with config.json")
        if not (folder / "config.json").is_file():
            raise UsageError(argument, f"{text!r} has no config.json; expected a checkpoint folder")
        if weights and not has_weights(folder):
            raise UsageError(argument, f"{text!r} holds no weights (no *.safetensors or pytorch_model*.bin)")
    except OSError as error:
        raise UsageError(argument, f"{text[:80]}{'…' if len(text) > 80 else ''}: {error.strerror or error}") from None
    return folder


WEIGHT_PATTERNS = ("*.safetensors", "pytorch_model*.bin")
"""Files one of which a loadable checkpoint folder holds."""


def has_weights(folder: str | os.PathLike[str]) -> bool:
    """``folder`` holds a weights file (:data:`WEIGHT_PATTERNS`)."""
    return any(next(Path(folder).glob(pattern), None) is not None for pattern in WEIGHT_PATTERNS)


def is_inside(path: str | os.PathLike[str], folder: str | os.PathLike[str]) -> bool:
    """``path`` is ``folder`` or lies inside it (after resolving links)."""
    resolved, root = Path(path).resolve(), Path(folder).resolve()
    return resolved == root or root in resolved.parents


def read_json_beside(value: str | Path, base_dir: str | Path | None, field: str) -> Any:
    """The JSON content of a file named in a config field; a relative name is looked up beside the checkpoint
    (``base_dir``) first, then as given.  ``ValueError`` naming the field and the file otherwise."""
    file = Path(value)
    if not file.is_absolute() and base_dir is not None and (Path(base_dir) / file).exists():
        file = Path(base_dir) / file
    if not file.is_file():
        raise ValueError(f"{field}: file {str(file)!r} not found")
    try:
        return json.loads(file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as error:
        raise ValueError(f"{field}: {file} is not readable ({error})") from None
    except json.JSONDecodeError as error:
        raise ValueError(f"{field}: {file} is not JSON ({error.msg}, line {error.lineno})") from None


def read_json_object(path: Path) -> dict[str, Any]:
    """The JSON object in ``path`` (a checkpoint's config.json, a backup); ``ValueError`` naming the file."""
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ValueError(f"{path}: not a readable JSON file ({error})") from None
    if not isinstance(value, dict):
        raise ValueError(f"{path}: expected a JSON object, got {type(value).__name__}")
    return value


def read_json_argument(path_text: str, flag: str, expected: str) -> Any:
    """The JSON value of the file a command-line argument names (a recipe, ``--initial_weights``, a moepatch block).

    A missing file or a folder is the argument's fault (:class:`UsageError` naming ``flag``); a file that exists but
    cannot be read or is not JSON is a malformed input (:class:`CommandError`, exit 1), named with the flag.
    """
    path = Path(path_text)
    if not path.exists():
        raise UsageError(flag, f"{path}: no such file (expected {expected})")
    if path.is_dir():
        raise UsageError(flag, f"{path} is a folder (expected a JSON file: {expected})")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as error:
        raise CommandError(f"{path} ({flag}) cannot be read ({error})") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as error:
        raise CommandError(f"{path} ({flag}) is not JSON ({error.msg} at line {error.lineno}, column "
                           f"{error.colno}); expected {expected}") from None


def safetensors_shapes(path: str | os.PathLike[str]) -> dict[str, tuple[int, ...]]:
    """``{key: shape}`` from a safetensors file's header alone (no tensor is read, never a pickle).

    Raises:
        ValueError: naming the file when it is missing, truncated or not a safetensors file.
    """

    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{path}: missing")
    try:
        with safe_open(str(path), framework="pt") as tensors:
            return {key: tuple(tensors.get_slice(key).get_shape()) for key in tensors.keys()}
    except Exception as error:  # safetensors raises its own error types for a bad header or a short file
        text = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise ValueError(f"{path}: not a complete safetensors file ({text})") from None

