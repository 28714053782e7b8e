"""Library errors name fields, never command-line flags; commands map fields to flags and parse no message back."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

from moepatch.errors import CommandError
from moepatch.errors import FieldError
from moepatch.errors import UsageError

PACKAGE = Path(__file__).resolve().parents[1] / "moepatch"
FLAG = re.compile(r"--[a-z]")
COMMAND_LINE = re.compile(r"`[^`]*`")
"""A flag inside backticks is part of a whole command line the user is told to run (`moepatch uninstall --force`),
not the name of the value that is wrong."""
FLAG_LAYERS = ("cli/", "training/", "demo/", "testing/")
"""Where flags belong: the commands, the fine-tuning runner (whose arguments are its flags) and the other entry
points; everything else in moepatch is library code."""
PARSED_MESSAGE = re.compile(r"(?:str\((?:error|exc|err|e)\)|\b(?:error|exc|err|e)\.message)"
                            r"\.(?:partition|rpartition|split|splitlines|startswith|endswith)\(|re\.\w+\([^)]*str\((?:error|exc|err|e)\)")
"""Splitting an error's text (``str(error).partition(": ")``, ``error.message.splitlines()``) or searching it with
a regular expression: reading a structured fact back out of a message."""


def _modules(excluded: tuple[str, ...]) -> list[Path]:
    return [path for path in sorted(PACKAGE.rglob("*.py"))
            if not path.relative_to(PACKAGE).as_posix().startswith(excluded)]


def _texts(node: ast.AST) -> list[tuple[int, str]]:
    """The literal text of every string expression under ``node``, an f-string's values shown as ``{}``."""
    found, inside = [], set()
    for child in ast.walk(node):
        if isinstance(child, ast.JoinedStr):
            inside.update(id(part) for part in ast.walk(child) if part is not child)
            text = "".join(part.value if isinstance(part, ast.Constant) else "{}" for part in child.values)
            found.append((child.lineno, text))
    for child in ast.walk(node):
        if isinstance(child, ast.Constant) and isinstance(child.value, str) and id(child) not in inside:
            found.append((child.lineno, child.value))
    return found


def flags_in_raises(path: Path, shown: str) -> list[str]:
    """``shown:line: text`` of every raise in ``path`` whose message names a ``--flag`` outside a command line."""
    offenders = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Raise) and node.exc is not None:
            offenders += [f"{shown}:{line}: {text[:80]!r}" for line, text in _texts(node.exc)
                          if FLAG.search(COMMAND_LINE.sub("", text))]
    return offenders


def test_library_errors_name_no_flag():
    """A library error names the field it is about (FieldError); the command that knows the flag says it."""
    offenders = [offender for path in _modules(FLAG_LAYERS)
                 for offender in flags_in_raises(path, str(path.relative_to(PACKAGE.parent)))]
    assert offenders == [], "\n".join(offenders)


def test_the_scan_sees_flags_in_messages(tmp_path):
    """The scan finds a flag at the start of a message, inside an f-string and inside a message's wording, and lets
    a backticked command line pass."""
    module = tmp_path / "module.py"
    module.write_text('def f(x):\n'
                      '    raise ValueError(f"--tasks: got {x}")\n'
                      '    raise FieldError("rank", lambda name: f"use {x} --method svd")\n'
                      '    raise ValueError(f"run `moepatch experts merge OUT --from-routes {x}` first")\n')
    found = [offender.split(":")[1] for offender in flags_in_raises(module, "module.py")]
    assert found == ["2", "3"]


def test_no_error_message_is_parsed_back():
    """Commands map a FieldError's field (or read a UsageError's ``message``), never split ``str(error)``."""
    offenders = [f"{path.relative_to(PACKAGE.parent)}:{number}" for path in _modules(())
                 for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1)
                 if PARSED_MESSAGE.search(line)]
    assert offenders == [], "\n".join(offenders)


def test_a_field_error_is_worded_by_the_command():
    """The field and every field the message names become the command's flags; unmapped fields stay as they are."""
    error = FieldError("max_lora_rank", lambda name: f"rank 48, more than {name('max_lora_rank')} 32; use "
                                                     f"{name('method')} svd")
    assert str(error) == "max_lora_rank: rank 48, more than max_lora_rank 32; use method svd"
    flags = {"max_lora_rank": "--max-lora-rank", "method": "--method"}
    usage = error.as_usage_error(flags)
    assert isinstance(usage, UsageError) and isinstance(usage, ValueError)
    assert (usage.argument, usage.message) == ("--max-lora-rank", "rank 48, more than --max-lora-rank 32; use "
                                                                  "--method svd")
    failed = FieldError("paths", "no documents found").as_command_error({"paths": "--data"})
    assert isinstance(failed, CommandError) and str(failed) == "--data: no documents found"
    assert str(FieldError("tasks", "no task given").as_usage_error({})) == "tasks: no task given"
    with pytest.raises(ValueError, match="^weights: "):  # callers that catch ValueError keep working
        raise FieldError("weights", "expected finite numbers")
