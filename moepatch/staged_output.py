"""Writes that cannot half-happen, and outputs that cannot overwrite their own inputs.

Every command that writes files goes through this module:

* :func:`refuse_output_in_inputs` before any work: an output that *is* one of the command's inputs, or lies inside
  an input folder, or is a folder holding an input, is refused naming both flags (``experts route --input r.jsonl
  --routes r.jsonl`` used to replace the user's requests by the routes);
* :func:`check_writable_target` before any work too: the output can be written at all (not under a file, not on a
  file system that refuses new files such as ``/proc`` or ``/sys``), found by creating and removing a file where the
  staged write will create its own — so a command never fails for want of a writable folder after its long work;
* :func:`staged_file` and :func:`staged_folder` for the writing itself: everything is written into a temporary
  file or folder *beside* the target (same file system, so the final move is one ``rename``) and moved into place
  only when the block finished without an error.  A command that fails, or is killed, at any point leaves the
  target exactly as it was; at worst a hidden ``.<name>.writing-*`` entry is left beside it by a kill, which the
  next staged write of that target removes.  A failing write (a full disk, a folder that vanished) is reported as
  a :class:`~moepatch.errors.CommandError` naming the target and the reason in words, never the temporary name or
  an ``[Errno N]`` prefix.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Collection
from collections.abc import Iterator
from collections.abc import Mapping
from collections.abc import Sequence
from pathlib import Path

from moepatch.errors import CommandError
from moepatch.errors import UsageError

STAGING_MARK = ".writing-"
"""Part of the name of every temporary file or folder a staged write creates beside its target."""


def _resolved(path: str | os.PathLike[str]) -> Path:
    return Path(path).expanduser().resolve()


def _contains(folder: Path, path: Path) -> bool:
    return path == folder or folder in path.parents


InputPaths = str | os.PathLike[str] | Sequence[str | os.PathLike[str]] | None
"""An input of :func:`refuse_output_in_inputs`: one path, several (``--data a.txt b.txt``) or ``None`` (not given)."""


def refuse_output_in_inputs(output: str | os.PathLike[str] | None, output_flag: str,
                            inputs: Mapping[str, InputPaths], *, output_may_lie_inside: Collection[str] = (),
                            blame_input: bool = False) -> None:
    """Refuse an output that would overwrite, sit inside or hold one of the command's inputs: the one check every
    command that writes runs before any work.

    Args:
        output: the file or folder the command will write (``None``: nothing to check).
        output_flag: its flag (or, for a folder the command always writes, its name), named in the error.
        inputs: flag → the input file or folder, or a list of them (``None`` entries are skipped).
        output_may_lie_inside: flags of input folders the output may lie inside (``profile``'s default output is
            ``CHECKPOINT/c2r_profile``); it still may not be them, nor hold them.
        blame_input: name the input's flag in the error instead of ``output_flag`` (a folder the command always
            writes, such as ``fit-router``'s ``router/``: the input is what the user can change).

    Raises:
        UsageError: when the output is an input, lies inside an input folder, or is a folder that holds an input
            (a staged folder replaces it as a whole: ``profile CK --output PARENT`` copied the parent, wrote the
            fields into CK/config.json and swapped the old copy back over them).
    """
    if output is None:
        return
    target = _resolved(output)
    for flag, given in inputs.items():
        values = [given] if isinstance(given, (str, os.PathLike)) else list(given or ())
        for value in values:
            if value is None:
                continue
            source = _resolved(value)
            if target == source:
                relation = "is"
            elif source.is_dir() and _contains(source, target):
                if flag in output_may_lie_inside:
                    continue
                relation = "inside"
            elif _contains(target, source):
                relation = "holds"
            else:
                continue
            if blame_input:
                message = {"is": f"{value} is {output}, which the command writes (replacing it)",
                           "inside": f"{value} holds {output}, which the command writes",
                           "holds": f"{value} lies inside {output}, which the command replaces as a whole"}[relation]
                raise UsageError(flag, f"{message}; give an input outside it (copy it elsewhere first)")
            message = {"is": f"{output} is the command's input ({flag}); writing there would replace it",
                       "inside": f"{output} lies inside the command's input {value} ({flag})",
                       "holds": f"{output} holds the command's input {value} ({flag}); writing it would replace "
                                "the input"}[relation]
            raise UsageError(output_flag, f"{message}: choose a path outside it" if relation == "inside"
                             else f"{message}: choose another path")


def _reason(error: OSError) -> str:
    """An ``OSError`` in words: its ``strerror`` (``No space left on device``), never ``[Errno 28] ...``."""
    return error.strerror or str(error) or type(error).__name__


def _writable_problem(directory: Path) -> str | None:
    """Why new files cannot be created in ``directory`` (``None`` when they can): one is created and removed, as
    the staged write will (``os.access`` says yes to root on ``/proc`` and ``/sys``).  The folder's modification
    time is put back, so the check changes nothing a later comparison could see."""
    try:
        before = directory.stat()
    except OSError as error:
        return f"{directory}: {_reason(error)}"
    try:
        handle, name = tempfile.mkstemp(prefix=f".moepatch{STAGING_MARK}check-", dir=directory)
    except OSError as error:
        return f"{directory} does not accept new files ({_reason(error)})"
    os.close(handle)
    try:
        os.unlink(name)
    except OSError as error:
        return f"{directory} does not let a file be removed again ({_reason(error)})"
    with contextlib.suppress(OSError):
        os.utime(directory, ns=(before.st_atime_ns, before.st_mtime_ns))
    return None


def check_writable_target(path: str | os.PathLike[str], flag: str, *, folder: bool = True) -> Path:
    """An output a command can write, checked before any work (so it never fails for want of one at its end).

    Args:
        path: the folder (``folder=True``) or file the command will write.
        flag: the argument named in the error.
        folder: whether ``path`` is a folder (else a file).

    Returns:
        ``path`` as a :class:`~pathlib.Path`.

    Raises:
        UsageError: naming ``flag``: an empty path, a file where a folder is expected (or the reverse), a path
            under a file, or a place where no file can be created (no write permission, a read-only or virtual
            file system such as ``/proc`` or ``/sys``): tried by creating and removing a file where the staged
            write creates its own (beside the target) and, for an existing folder, inside it.
    """
    text = os.fspath(path)
    kind = "folder" if folder else "file"
    if not text.strip():
        raise UsageError(flag, f"expected a {kind}, got an empty path")
    shown = f"{text[:80]}{'…' if len(text) > 80 else ''}"
    target = Path(text)
    try:
        absolute = target.expanduser().absolute()
        if absolute.exists():
            if folder and not absolute.is_dir():
                raise UsageError(flag, f"{target} is a file; expected a folder to write into")
            if not folder and absolute.is_dir():
                raise UsageError(flag, f"{target} is a folder; expected a file to write")
        ancestor = absolute.parent
        while not ancestor.exists():
            ancestor = ancestor.parent
        if not ancestor.is_dir():
            raise UsageError(flag, f"{target} lies under the file {ancestor}; expected a "
                                   f"{'folder to write into' if folder else 'file to write'}")
        if not os.access(ancestor, os.W_OK | os.X_OK):
            raise UsageError(flag, f"{target} cannot be written: {ancestor} is not writable")
        places = [ancestor] + ([absolute] if folder and absolute.is_dir() else [])
        if folder and absolute.is_dir() and not os.access(absolute, os.W_OK | os.X_OK):
            raise UsageError(flag, f"{target} is not writable")
        for place in places:
            problem = _writable_problem(place)
            if problem is not None:
                raise UsageError(flag, f"{target} cannot be written: {problem}")
    except OSError as error:  # a name too long, a folder that cannot be searched
        raise UsageError(flag, f"{shown}: {_reason(error)}") from None
    return target


def _write_failed(target: Path, error: OSError) -> CommandError:
    """A failure while writing ``target`` as a :class:`CommandError`: the target and the reason in words; the file
    the error is about only when it is not the temporary copy (whose name means nothing to the user)."""
    about = ""
    for name in (error.filename, getattr(error, "filename2", None)):
        if name is not None and STAGING_MARK not in os.fspath(name) and Path(os.fspath(name)) != target:
            about = f": {os.fspath(name)}"
            break
    return CommandError(f"{target}: could not be written ({_reason(error)}{about}); it was left as it was")


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
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        _clear_leftovers(target)
        handle, name = tempfile.mkstemp(prefix=f".{target.name}{STAGING_MARK}", suffix=target.suffix,
                                        dir=target.parent)
        os.close(handle)
    except OSError as error:
        raise _write_failed(target, error) from None
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
    except OSError as error:
        _remove(scratch)
        raise _write_failed(target, error) from None
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
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        _clear_leftovers(target)
        scratch = Path(tempfile.mkdtemp(prefix=f".{target.name}{STAGING_MARK}", dir=target.parent))
    except OSError as error:
        raise _write_failed(target, error) from None
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
    except OSError as error:
        _remove(scratch)
        raise _write_failed(target, error) from None
    except BaseException:
        _remove(scratch)
        raise


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask
