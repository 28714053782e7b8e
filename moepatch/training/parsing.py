"""The command line of a fine-tuning run: the five argument objects from ``argv``, every value checked.

The generic work (recipes, ``--debug``, repeated flags, transformers' own errors and late failures) is
:mod:`moepatch.training.toolkit`'s; this module applies it to :data:`~moepatch.training.arguments.ARGUMENT_TYPES`
and adds the rules that tie the objects together (``--task_experts`` runs no mixture; a dynamic-mixing option given
without dynamic mixing would be ignored; ``--ep_size`` does not run under ``--deepspeed``).
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from typing import Any

from transformers import HfArgumentParser

from moepatch.errors import FieldError
from moepatch.errors import UsageError
from moepatch.errors import debug_requested
from moepatch.errors import run_guarded
from moepatch.staged_output import refuse_output_in_inputs
from moepatch.training.arguments import ARGUMENT_TYPES
from moepatch.training.arguments import DYNAMIC_ONLY
from moepatch.training.arguments import FLAGS
from moepatch.training.toolkit import argument_names
from moepatch.training.toolkit import blamed_argument
from moepatch.training.toolkit import check_training_arguments
from moepatch.training.toolkit import expand_recipe
from moepatch.training.toolkit import make_parser
from moepatch.training.toolkit import recipe_file
from moepatch.training.toolkit import refuse_repeated_flags
from moepatch.training.toolkit import split_debug
from moepatch.validation import check_output_folder

PROG = "finetune"
"""The prefix of every message (``finetune: error: ...``)."""

DESCRIPTION = (
    "Fine-tune a MoE checkpoint with moepatch: dynamic data mixing (Dynamic Data Mixing, Zhu et al., 2024), frozen "
    "gates, C2R routing (C2R, Zhang et al., NAACL 2025) from the checkpoint's config.json.  Besides the arguments "
    "below: --recipe FILE.json supplies defaults for any of them (command-line flags win; see configs/), and --debug "
    "(or MOEPATCH_DEBUG=1) shows the traceback of a failure instead of a one-line message."
)


def _check_namespace(parser: HfArgumentParser, argv: list[str], recipe: str | None) -> None:
    """argparse's own checks and the output folder, before any argument object is built."""
    namespace, unknown = parser.parse_known_args(argv)
    if unknown:
        flag = next((token for token in unknown if token.startswith("-")), unknown[0])
        raise UsageError(flag.partition("=")[0], f"unknown argument (not given a value, or not an argument of "
                                                 f"{PROG} or TrainingArguments; see --help): {' '.join(unknown)}")
    if getattr(namespace, "output_dir", None) is None:
        raise UsageError("--output_dir", "required: the folder the fine-tuned model is saved to")
    check_output_folder(namespace.output_dir, "--output_dir")  # empty, a file, under a file, not writable
    refuse_output_in_inputs(namespace.output_dir, "--output_dir", {"--recipe": recipe})  # the other inputs: later


def parse(argv: Sequence[str] | None) -> tuple[Any, Any, Any, Any, Any]:
    """``(model_args, data_args, sampling_args, training_args, expert_args)``; raises :class:`UsageError` naming
    the argument for any bad value (``--debug`` is left out first)."""
    _, tokens = split_debug(list(sys.argv[1:] if argv is None else argv))
    parser = make_parser(ARGUMENT_TYPES, DESCRIPTION)
    given = refuse_repeated_flags(tokens, parser)  # the user's own command line; a recipe's value may be overridden
    recipe = recipe_file(tokens)[0]
    tokens = expand_recipe(tokens, argument_names(ARGUMENT_TYPES), PROG)
    _check_namespace(parser, tokens, recipe)
    try:
        parsed = parser.parse_args_into_dataclasses(args=tokens)
    except UsageError:
        raise
    except FieldError as error:  # an argument class of the library (DynamicSamplingArguments) names its field
        raise error.as_usage_error(FLAGS) from None
    except (ValueError, NotImplementedError, TypeError, OSError) as error:  # TrainingArguments' own checks
        raise UsageError(blamed_argument(error, tokens), str(error)) from error
    model_args, data_args, sampling_args, training_args, expert_args = parsed[:5]
    check_training_arguments(training_args)
    if model_args.ep_size is not None and training_args.deepspeed:
        raise UsageError("--ep_size", "not with --deepspeed: expert parallelism is transformers' own (its device mesh, "
                                      "FSDP2 for the dense weights), which DeepSpeed's ZeRO cannot wrap; drop one "
                                      "of --ep_size and --deepspeed")
    if expert_args.task_experts:  # one expert per source: no mixture to re-weight
        data_args.dynamic_sampling = False
    elif not data_args.dynamic_sampling:  # a recipe's dynamic-mixing values are defaults; the user's own flags are not
        flag = next((flag for dest, flag in given.items() if dest in DYNAMIC_ONLY), None)
        if flag is not None:
            raise UsageError(flag, "only applies with dynamic mixing, and this run has --dynamic_sampling false: it "
                                   "would be ignored; drop it or turn dynamic mixing on")
    return model_args, data_args, sampling_args, training_args, expert_args


def parse_arguments(argv: Sequence[str] | None = None) -> tuple[Any, ...]:
    """``(model_args, data_args, sampling_args, training_args, expert_args)`` from ``argv`` (``--recipe`` defaults
    first).

    Every value is checked here (the files the arguments name are checked by
    :func:`~moepatch.training.check_inputs`).  A bad one prints ``finetune: error: --flag: what was expected, got X``
    on stderr and raises ``SystemExit(2)``.
    """
    parsed: list[Any] = []

    def body() -> int:
        parsed.extend(parse(argv))
        return 0

    status = run_guarded(PROG, body, debug=debug_requested())
    if status:
        raise SystemExit(status)
    return tuple(parsed)


__all__ = ["DESCRIPTION", "PROG", "parse", "parse_arguments"]
