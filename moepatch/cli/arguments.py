"""Argument types of the ``moepatch`` command: every value is checked when it is parsed.

Each type raises :class:`argparse.ArgumentTypeError` with a short message, so argparse reports
``moepatch CMD: error: argument --flag: <message>`` and exits with status 2, before any work starts.
"""

from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Callable
from pathlib import Path
from typing import NoReturn
from typing import TypeVar

from moepatch.errors import UsageError

Number = TypeVar("Number", int, float)
Checked = TypeVar("Checked")


class CommandParser(argparse.ArgumentParser):
    """argparse with two-line errors (what is wrong, where to look) instead of the whole usage block."""

    def error(self, message: str) -> NoReturn:
        print(f"{self.prog}: error: {message}", file=sys.stderr)
        print(f"{self.prog}: see `{self.prog} --help`", file=sys.stderr)
        raise SystemExit(2)


def _number_type(
    name: str,
    convert: Callable[[str], Number],
    accepts: Callable[[Number], bool],
    *,
    unparsable: str,
    out_of_range: str | None = None,
    doc: str,
) -> Callable[[str], Number]:
    """An argparse type for a number in a range: one body instead of a near-copy per range.

    ``unparsable`` is the message's "expected …" for text that is not a number, ``out_of_range`` (default: the
    same) for a number outside the range; both are followed by ``, got 'TEXT'``.
    """
    range_message = out_of_range if out_of_range is not None else unparsable

    def parse(text: str) -> Number:
        try:
            value = convert(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{unparsable}, got {text!r}") from None
        if not accepts(value):
            raise argparse.ArgumentTypeError(f"{range_message}, got {text!r}")
        return value

    parse.__name__ = parse.__qualname__ = name
    parse.__doc__ = doc
    return parse


positive_int: Callable[[str], int] = _number_type(
    "positive_int", int, lambda value: value >= 1, unparsable="expected a positive integer", doc="An integer >= 1.")
non_negative_int: Callable[[str], int] = _number_type(
    "non_negative_int", int, lambda value: value >= 0, unparsable="expected a non-negative integer",
    doc="An integer >= 0.")
positive_float: Callable[[str], float] = _number_type(
    "positive_float", float, lambda value: math.isfinite(value) and value > 0,
    unparsable="expected a positive number", out_of_range="expected a positive finite number",
    doc="A finite number > 0.")
non_negative_float: Callable[[str], float] = _number_type(
    "non_negative_float", float, lambda value: math.isfinite(value) and value >= 0,
    unparsable="expected a non-negative number", out_of_range="expected a finite number >= 0",
    doc="A finite number >= 0.")
fraction: Callable[[str], float] = _number_type(
    "fraction", float, lambda value: 0 <= value < 1, unparsable="expected a number in [0, 1)",
    doc="A number in [0, 1): a probability that is not certain, an Adam beta.")
seed: Callable[[str], int] = _number_type(
    "seed", int, lambda value: 0 <= value < 2**32, unparsable="expected an integer seed",
    out_of_range="expected a seed in [0, 2**32)",
    doc="A random seed: an integer in [0, 2**32) (what torch, numpy and Python's random all accept).")


def _as_type_error(check: Callable[[], Checked]) -> Checked:
    """Run a validation helper inside an argparse type: its :class:`UsageError` becomes argparse's message."""
    try:
        return check()
    except UsageError as error:
        raise argparse.ArgumentTypeError(error.message) from None


def checkpoint_config(text: str) -> Path:
    """An existing folder holding config.json (structure only: ``inspect``); moepatch never downloads."""
    from moepatch.validation import check_checkpoint_folder

    return _as_type_error(lambda: check_checkpoint_folder(text, "path", weights=False))


def checkpoint_folder(text: str) -> Path:
    """An existing folder holding config.json and weights (commands that run the model)."""
    from moepatch.validation import check_checkpoint_folder

    return _as_type_error(lambda: check_checkpoint_folder(text, "path"))


def existing_file(text: str) -> Path:
    """An existing, readable file."""
    path = Path(text)
    try:
        if not path.is_file():
            raise argparse.ArgumentTypeError(f"no file at {text!r}" if not path.exists() else f"{text!r} is not a file")
        with path.open("rb"):
            pass
    except OSError as error:
        raise argparse.ArgumentTypeError(f"{text[:80]}: {error.strerror or error}") from None
    return path


def output_folder(text: str) -> Path:
    """A folder to write into: a writable folder, or one that can be created (never a file or a path under one)."""
    from moepatch.validation import check_output_folder

    return _as_type_error(lambda: check_output_folder(text, "output"))


def non_empty_text(text: str) -> str:
    """A non-empty string."""
    if not text.strip():
        raise argparse.ArgumentTypeError("expected a non-empty value")
    return text


def place_source(text: str) -> Path:
    """``place``'s SOURCE: a matrix file or a checkpoint folder (checked as such)."""
    path = Path(text)
    try:
        is_folder = path.is_dir()
    except OSError as error:
        raise argparse.ArgumentTypeError(f"{text[:80]}: {error.strerror or error}") from None
    return checkpoint_folder(text) if is_folder else existing_file(text)



class DistinctValues(argparse.Action):
    """A list option (``nargs="+"``) whose values must differ: a value given twice (``--target-modules q_proj
    q_proj``, the same ``--data`` file twice) is a slip that would count it twice or be silently merged, so it is
    refused, naming the option.  Paths are compared resolved."""

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values: object,
                 option_string: str | None = None) -> None:
        seen: dict[object, object] = {}
        for value in values if isinstance(values, list) else [values]:
            key = value.resolve() if isinstance(value, Path) else value
            if key in seen:
                shown = str(value) if value == seen[key] else f"{seen[key]} and {value}"
                raise argparse.ArgumentError(self, f"{shown} given twice; list each value once")
            seen[key] = value
        setattr(namespace, self.dest, values)


REPEATABLE_OPTIONS = frozenset({"--group"})
"""Options meant to be given several times (``action="append"``: ``fit-router --group a=x,y --group b=z``)."""


def repeated_option(argv: list[str]) -> str | None:
    """The first option given twice (argparse silently keeps the last value, so a typo'd re-run is refused); the
    :data:`REPEATABLE_OPTIONS` are collected by argparse and checked by their command."""
    seen: set[str] = set()
    for token in argv:
        if token == "--":
            break
        if token.startswith("--"):
            name = token.partition("=")[0]
            if name in seen and name not in REPEATABLE_OPTIONS:
                return name
            seen.add(name)
    return None


def check_repeated_options(argv: list[str]) -> None:
    """Refuse an option given twice, naming it (``--data`` takes every value after one flag)."""
    repeated = repeated_option(argv)
    if repeated is not None:
        hint = " (list every value after one flag)" if repeated == "--data" else ""
        raise UsageError(repeated, f"given twice; give it once{hint}")
