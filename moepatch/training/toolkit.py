"""Tools for a command whose arguments are ``HfArgumentParser`` dataclasses (transformers' ``TrainingArguments``
among them): recipes, ``--debug``, the argument an error is about, repeated flags, and the ``TrainingArguments``
values transformers accepts but fails on late.

None of this knows what the fine-tuning run does with its arguments (:mod:`moepatch.training.parsing` applies it to
them): transformers' own parser silently keeps the last of a repeated flag, raises bare ``ValueError`` naming no
flag, and accepts values that only fail once a model is loaded, so every command built on it needs the same fixes.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
from collections.abc import Callable
from collections.abc import Sequence
from typing import TYPE_CHECKING
from typing import Any
from typing import cast

from transformers import HfArgumentParser
from transformers import TrainingArguments
from transformers.integrations import integration_utils

from moepatch.errors import CommandError
from moepatch.errors import UsageError
from moepatch.validation import is_int
from moepatch.validation import is_number
from moepatch.validation import read_json_argument

if TYPE_CHECKING:
    from transformers.hf_argparser import DataClassType


def split_debug(argv: Sequence[str]) -> tuple[bool, list[str]]:
    """``(--debug given, argv without it)``.  ``--debug VALUE`` is left alone: it is the Trainer's own ``--debug``
    option (``underflow_overflow``, ``tpu_metrics_debug``)."""
    kept, debug = [], False
    for position, token in enumerate(argv):
        following = argv[position + 1] if position + 1 < len(argv) else None
        if token == "--debug" and (following is None or following.startswith("-")):
            debug = True
            continue
        kept.append(token)
    return debug, kept


def recipe_argv(recipe: dict[str, Any]) -> list[str]:
    """A recipe's ``{argument: value}`` settings as command-line tokens (``true`` / ``false`` for booleans, a list as
    several values, an object as JSON); keys starting with ``_`` are comments and ``null`` keeps the default."""
    argv = []
    for key, value in recipe.items():
        if key.startswith("_") or value is None:
            continue
        values = value if isinstance(value, list) else [value]
        argv.append(f"--{key}")
        argv.extend("true" if v is True else "false" if v is False else json.dumps(v) if isinstance(v, dict)
                    else str(v) for v in values)
    return argv


def recipe_file(argv: list[str]) -> tuple[str | None, list[str]]:
    """``(FILE of --recipe FILE, argv without it)``; ``(None, argv)`` without ``--recipe``."""
    positions = [i for i, token in enumerate(argv) if token == "--recipe" or token.startswith("--recipe=")]
    if not positions:
        return None, argv
    if len(positions) > 1:
        raise UsageError("--recipe", "given more than once; one recipe per run (override its settings with flags)")
    at = positions[0]
    if argv[at].startswith("--recipe="):
        value, rest = argv[at].partition("=")[2], argv[:at] + argv[at + 1 :]
    elif at + 1 < len(argv) and not argv[at + 1].startswith("--"):
        value, rest = argv[at + 1], argv[:at] + argv[at + 2 :]
    else:
        raise UsageError("--recipe", "expected a JSON file after --recipe (see configs/)")
    if not value:
        raise UsageError("--recipe", "expected a JSON file, got an empty path")
    return value, rest


def expand_recipe(argv: list[str], known: set[str], prog: str) -> list[str]:
    """``argv`` with ``--recipe FILE``'s settings put first (so the command line wins).

    Raises:
        UsageError: naming ``--recipe``: given twice, no file.  CommandError, naming the file: not a JSON object, or
            a key that names no argument of ``known``.
    """
    value, rest = recipe_file(argv)
    if value is None:
        return argv
    recipe = read_json_argument(value, "--recipe", "a JSON object of argument: value settings")
    if not isinstance(recipe, dict):  # the file's content is wrong: exit 1, the file and the flag named
        raise CommandError(f"{value} (--recipe): expected a JSON object of argument: value settings, got "
                           f"{type(recipe).__name__}")
    unknown = sorted(key for key in recipe if not key.startswith("_") and key not in known)
    if unknown:
        raise CommandError(f"{value} (--recipe): unknown key{'s' if len(unknown) > 1 else ''} "
                           f"{', '.join(map(repr, unknown))} (not arguments of {prog} or transformers' "
                           "TrainingArguments; keys starting with '_' are comments)")
    return recipe_argv(recipe) + rest


def argument_names(types: Sequence[type]) -> set[str]:
    """The names of every field the parser reads from ``types`` (the keys a recipe may set)."""
    return {option.name for kind in types for option in dataclasses.fields(cast(Any, kind)) if option.init}


class UsageErrorParser(HfArgumentParser):
    """An ``HfArgumentParser`` whose own errors (a bad int, a missing value) raise :class:`UsageError` naming the
    flag, instead of printing argparse's usage and exiting: every error of the command then reads the same."""

    def error(self, message: str):  # argparse: "argument --x/--y: invalid int value: 'a'"
        match = re.match(r"argument (\S+?): (.*)", message, re.S)
        if match:
            raise UsageError(match.group(1).split("/")[0], match.group(2))
        raise UsageError("arguments", message)


def make_parser(types: Sequence[type], description: str) -> UsageErrorParser:
    """The parser of ``types`` (:class:`UsageErrorParser`)."""
    return UsageErrorParser(cast("tuple[DataClassType, ...]", tuple(types)), description=description)


def spelled_as_typed(error: UsageError, argv: Sequence[str]) -> UsageError:
    """``error`` naming its flag as the user typed it: HfArgumentParser accepts ``--gate-noise`` for
    ``--gate_noise``, and the checks name the underscore spelling."""
    flag = error.argument
    typed = flag.replace("_", "-")
    if not flag.startswith("--") or typed == flag:
        return error
    given = {token.partition("=")[0] for token in argv if token.startswith("--")}
    return UsageError(typed, error.message) if typed in given and flag not in given else error


def blamed_argument(error: BaseException, argv: Sequence[str]) -> str:
    """The argument a (transformers) error is about: a ``--flag`` it names, a given argument whose name or value it
    quotes; ``TrainingArguments`` when none can be told."""
    text = str(error)
    named = re.findall(r"--[A-Za-z][\w-]*", text)
    if named:
        return named[0]
    flags = [(position, token.partition("=")[0]) for position, token in enumerate(argv) if token.startswith("--")]
    for _, flag in flags:
        if re.search(rf"(?<![\w-]){re.escape(flag[2:])}(?![\w-])", text):
            return flag
    for value in re.findall(r"'([^']+)'", text):
        for position, flag in flags:
            if argv[position] == f"{flag}={value}" or (position + 1 < len(argv) and argv[position + 1] == value):
                return flag
    return "TrainingArguments"


def _action_of(flag: str, options: dict[str, Any]) -> Any:
    """The argparse action ``flag`` selects: its own, or the one argument an abbreviation resolves to (argparse's
    ``allow_abbrev``); ``None`` for an unknown flag."""
    action = options.get(flag)
    if action is None:
        matches = {option_action.dest: option_action for option, option_action in options.items()
                   if option.startswith(flag)}
        action = next(iter(matches.values())) if len(matches) == 1 else None
    return action


def refuse_repeated_flags(argv: Sequence[str], parser: HfArgumentParser) -> dict[str, str]:
    """A flag given twice on the command line (``--max_steps 5 ... --max_steps 1``): argparse silently keeps the
    last, which is rarely what was meant.  Spellings of one argument count as the same flag (``--max-steps``,
    ``--no_plot`` / ``--plot``, an abbreviation argparse accepts).  Returns ``{dest: flag as given}`` of the flags on
    the command line, in order."""
    options = parser._option_string_actions  # option string -> action (argparse's own table)
    seen: dict[str, str] = {}
    for token in argv:
        if not token.startswith("--") or token == "--":
            continue
        flag = token.partition("=")[0]
        action = _action_of(flag, options)
        if action is None or action.dest == "help":
            continue  # unknown flags are reported by the parser
        if action.dest in seen:
            earlier = seen[action.dest]
            same = earlier == flag
            raise UsageError(flag, f"given twice{'' if same else f' (as {earlier} and {flag})'}; give it once "
                                   "(argparse would silently keep the last value)")
        seen[action.dest] = flag
    return seen


def _finite(value: Any) -> bool:
    return is_number(value) and math.isfinite(value)


def _strategy(value: Any) -> str:
    """A ``*_strategy`` argument as its text (transformers gives an enum member after parsing)."""
    return str(getattr(value, "value", value))


TrainingCheck = tuple[str, Callable[[Any], Any], Callable[[Any], bool], str]
"""``(flag, how to read its value from TrainingArguments, whether the value is fine, what was expected)``."""

TRAINING_CHECKS: tuple[TrainingCheck, ...] = (
    ("--learning_rate", lambda a: a.learning_rate, lambda v: _finite(v) and v >= 0, "a finite number >= 0"),
    ("--per_device_train_batch_size", lambda a: a.per_device_train_batch_size, lambda v: is_int(v) and v >= 1,
     "an integer >= 1"),
    ("--gradient_accumulation_steps", lambda a: a.gradient_accumulation_steps, lambda v: is_int(v) and v >= 1,
     "an integer >= 1"),
    ("--num_train_epochs", lambda a: a.num_train_epochs, lambda v: _finite(v) and v >= 0, "a finite number >= 0"),
    ("--weight_decay", lambda a: a.weight_decay, lambda v: _finite(v) and v >= 0, "a finite number >= 0"),
    ("--adam_beta1", lambda a: a.adam_beta1, lambda v: _finite(v) and 0 <= v < 1, "a number in [0, 1)"),
    ("--adam_beta2", lambda a: a.adam_beta2, lambda v: _finite(v) and 0 <= v < 1, "a number in [0, 1)"),
    ("--adam_epsilon", lambda a: a.adam_epsilon, lambda v: _finite(v) and v >= 0, "a finite number >= 0"),
    ("--max_grad_norm", lambda a: a.max_grad_norm, lambda v: v is None or not math.isnan(v),
     "a number (<= 0: no clipping)"),
    ("--warmup_steps", lambda a: a.warmup_steps, lambda v: _finite(v) and v >= 0, "a finite number >= 0"),
    ("--label_smoothing_factor", lambda a: a.label_smoothing_factor, lambda v: _finite(v) and 0 <= v <= 1,
     "a number in [0, 1]"),
    ("--dataloader_num_workers", lambda a: a.dataloader_num_workers, lambda v: is_int(v) and v >= 0,
     "an integer >= 0"),
    ("--max_steps", lambda a: a.max_steps, lambda v: is_int(v) and (v >= 1 or v == -1),
     "an integer >= 1, or -1 (the default: train --num_train_epochs)"),  # the Trainer runs epochs for 0
    ("--save_steps", lambda a: a.save_steps if _strategy(a.save_strategy) == "steps" else 1,
     lambda v: _finite(v) and v > 0, "a number > 0 with --save_strategy steps"),
    ("--logging_steps", lambda a: a.logging_steps if _strategy(a.logging_strategy) == "steps" else 1,
     lambda v: _finite(v) and v > 0, "a number > 0 with --logging_strategy steps"),
)
"""Values of ``TrainingArguments`` transformers accepts but that fail (or train nonsense) only once the model is
loaded: the optimizer's own checks, a zero batch, endless epochs.  ``--save_steps`` / ``--logging_steps`` only
count with their ``steps`` strategy (otherwise they read as a valid 1)."""


def check_training_arguments(training_args: TrainingArguments) -> None:
    """:data:`TRAINING_CHECKS` and an unknown or uninstalled ``--report_to`` integration, before anything is loaded.

    Raises:
        UsageError: naming the flag.
    """
    for flag, read, valid, expected in TRAINING_CHECKS:
        value = read(training_args)
        if not valid(value):
            raise UsageError(flag, f"expected {expected}, got {value!r}")
    check_report_to(training_args.report_to)


def check_report_to(report_to: Any) -> None:
    """``--report_to``: ``none``, ``all`` or integrations transformers knows and that are installed (the Trainer
    would refuse an unknown one, or fail to start an uninstalled one, only after the model is loaded)."""
    known = integration_utils.INTEGRATION_TO_CALLBACK
    names = [] if report_to is None else [report_to] if isinstance(report_to, str) else list(report_to)
    unknown = [name for name in names if name not in known and name not in ("none", "all")]
    if unknown:
        raise UsageError("--report_to", f"{unknown[0]!r} is not an integration transformers knows; expected none, "
                                        f"all, or one of {', '.join(known)}")
    available = set(integration_utils.get_available_reporting_integrations())
    if integration_utils.is_azureml_available():
        available.add("azure_ml")  # left out of "all" when mlflow is installed, usable when named
    missing = [name for name in names if name in known and name not in available]
    if missing:
        raise UsageError("--report_to", f"{missing[0]!r} is not installed (pip install it, or pass --report_to "
                                        "none)")


def changed_fields(arguments: Any) -> list[str]:
    """The fields of an arguments dataclass whose value differs from the field's default (lists and tuples equal):
    the flags a user (or a recipe) gave."""
    changed = []
    for option in dataclasses.fields(arguments):
        if option.default_factory is not dataclasses.MISSING:
            default = option.default_factory()
        elif option.default is not dataclasses.MISSING:
            default = option.default
        else:
            continue
        value = getattr(arguments, option.name)
        if _as_list(value) != _as_list(default):
            changed.append(option.name)
    return changed


def _as_list(value: Any) -> Any:
    return list(value) if isinstance(value, (list, tuple)) else value


def flags_of(types: Sequence[type]) -> dict[str, str]:
    """``{field: flag}`` of every field of ``types``, spelled as ``HfArgumentParser`` spells it (``--<field>``): the
    mapping that turns a library's :class:`~moepatch.errors.FieldError` about one of them into the user's flag."""
    return {name: f"--{name}" for name in sorted(argument_names(types))}


__all__ = ["TRAINING_CHECKS", "UsageErrorParser", "argument_names", "blamed_argument", "changed_fields",
           "check_report_to", "check_training_arguments", "expand_recipe", "flags_of", "make_parser",
           "recipe_argv", "recipe_file", "refuse_repeated_flags", "split_debug"]
