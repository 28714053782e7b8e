"""Writes that cannot half-happen, and outputs that cannot overwrite their own inputs.

Every command that writes files goes through this module:

* :func:`refuse_output_in_inputs` before any work: an output that *is* one of the command's inputs, or lies inside
  an input folder, or is a folder holding an input, is refused naming both flags (``experts route --input r.jsonl
  --routes r.jsonl`` used to replace the user's requests by the routes);
* :func:`staged_file` and :func:`staged_folder` for the writing itself: everything is written into a temporary
  file or folder *beside* the target (same file system, so the final move is one ``rename``) and moved into place
  only when the block finished without an error.  A command that fails, or is killed, at any point leaves the
  target exactly as it was; at worst a hidden ``.<name>.writing-*`` entry is left beside it by a kill, which the
  next staged write of that target removes.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from collections.abc import Mapping
from pathlib import Path

from moepatch.errors import UsageError

STAGING_MARK = ".writing-"
"""Part of the name of every temporary file or folder a staged write creates beside its target."""


def _resolved(path: str | os.PathLike[str]) -> Path:
    return Path(path).expanduser().resolve()


def _contains(folder: Path, path: Path) -> bool:
    return path == folder or folder in path.parents


def refuse_output_in_inputs(output: str | os.PathLike[str] | None, output_flag: str,
                            inputs: Mapping[str, str | os.PathLike[str] | None]) -> None:
    """Refuse an output that would overwrite or sit inside one of the command's inputs.

    Args:
        output: the file or folder the command will write (``None``: nothing to check).
        output_flag: its flag, named in the error.
        inputs: flag → input file or folder (``None`` entries are skipped).

    Raises:
        UsageError: naming ``output_flag`` and the input's flag when the output is the input, lies inside an input
            folder, or is a folder that holds the input (replacing it would delete the input).
    """
    if output is None:
        return
    target = _resolved(output)
    for flag, value in inputs.items():
        if value is None:
            continue
        source = _resolved(value)
        if target == source:
            raise UsageError(output_flag, f"{output} is the command's input ({flag}); writing there would replace "
                                          "it: choose another path")
        if source.is_dir() and _contains(source, target):
            raise UsageError(output_flag, f"{output} lies inside the command's input {value} ({flag}); choose a "
                                          "path outside it")
        if _contains(target, source):
            raise UsageError(output_flag, f"{output} holds the command's input {value} ({flag}); writing it would "
                                          "replace the input: choose another path")


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


def _clear_leftovers(target: Path) -> None:
    """Temporary entries an earlier, killed staged write of ``target`` left beside it.  A write killed between its
    two moves left the old folder aside and no target: the old folder is put back first, never deleted."""
    aside = sorted(target.parent.glob(f".{target.name}{STAGING_MARK}old-*"))
    if aside and not target.exists():
        os.replace(aside[0], target)
    for leftover in target.parent.glob(f".{target.name}{STAGING_MARK}*"):
        _remove(leftover)


@contextlib.contextmanager
def staged_file(target: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path beside ``target`` (with its suffix, so writers that go by the extension, such as
    matplotlib's, write the same format); on success it replaces ``target`` in one ``rename``.

    On an exception (or ``KeyboardInterrupt``) the temporary file is removed and ``target`` is untouched.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    _clear_leftovers(target)
    handle, name = tempfile.mkstemp(prefix=f".{target.name}{STAGING_MARK}", suffix=target.suffix, dir=target.parent)
    os.close(handle)
    scratch = Path(name)
    try:
        yield scratch
        if target.exists() and target.is_dir():
            raise IsADirectoryError(f"{target} is a folder; a file cannot replace it")
        if target.exists():
            shutil.copymode(target, scratch)
        else:
            os.chmod(scratch, 0o666 & ~_umask())
        os.replace(scratch, target)
    except BaseException:
        _remove(scratch)
        raise


def write_text_atomically(target: str | os.PathLike[str], text: str) -> Path:
    """``target.write_text(text)`` through :func:`staged_file`: a reader never sees a half-written file."""
    with staged_file(target) as scratch:
        scratch.write_text(text)
    return Path(target)


@contextlib.contextmanager
def staged_folder(target: str | os.PathLike[str], *, start_from_existing: bool = False) -> Iterator[Path]:
    """Yield a temporary folder beside ``target``; on success it replaces ``target`` as a whole.

    Args:
        target: the folder the command writes.
        start_from_existing: the temporary folder starts as a copy of ``target`` (a command that adds to a folder,
            e.g. another merged adapter beside the earlier ones), so the swap keeps what was there.

    The swap moves the old folder aside, moves the new one in and then deletes the old one; if the second move
    fails the old folder is put back.  On an exception nothing of ``target`` changed.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    _clear_leftovers(target)
    scratch = Path(tempfile.mkdtemp(prefix=f".{target.name}{STAGING_MARK}", dir=target.parent))
    try:
        if start_from_existing and target.is_dir():
            scratch.rmdir()
            shutil.copytree(target, scratch, symlinks=True)
        else:
            os.chmod(scratch, 0o777 & ~_umask())
        yield scratch
        if target.exists() and not target.is_dir():
            raise NotADirectoryError(f"{target} is a file; a folder cannot replace it")
        old = None
        if target.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{target.name}{STAGING_MARK}old-", dir=target.parent))
            old.rmdir()
            os.replace(target, old)
        try:
            os.replace(scratch, target)
        except BaseException:
            if old is not None:
                os.replace(old, target)
            raise
        if old is not None:
            _remove(old)
    except BaseException:
        _remove(scratch)
        raise


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask
