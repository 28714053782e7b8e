"""Fine-tune a MoE checkpoint with moepatch's options: the engine behind ``scripts/finetune.py``.

Arguments are four dataclasses read by ``HfArgumentParser`` — :class:`ModelArguments`, :class:`DataArguments`,
:class:`~moepatch.mixing.callback.DynamicSamplingArguments` and transformers' ``TrainingArguments`` (so
``--deepspeed CONFIG``, ``--bf16``, ``--use_cpu``, ``--resume_from_checkpoint`` ... are the Trainer's own).  A
``--recipe FILE.json`` supplies defaults for any of them (the files in ``configs/``); command-line flags win.

Every input is checked before a model is loaded or a file is written: each argument's value when it is parsed
(the dataclasses' ``__post_init__``, transformers' own checks and the values it accepts but fails on late, the
recipe, a flag given twice, the output folder), then :func:`check_inputs` — the files and folders the arguments
name (a checkpoint folder with weights, an output folder that is not the checkpoint), the model and its moepatch
block planned on a weightless skeleton (:func:`check_model_structure`), the sources they add up to, and
combinations (dynamic mixing needs ``--max_steps`` and at least two sources).  :func:`run` then loads the tokenizer
and tokenises every source (a source whose examples ``--max_length`` leaves without a label is refused) before the
model is loaded.  A bad input exits with status 2 and one line naming the argument; a failure found while
running (a malformed data record, ...) exits with status 1 naming the file and line.  ``--debug`` (or
``MOEPATCH_DEBUG=1``) shows the traceback instead (:func:`moepatch.errors.run_guarded`).

The run: read the checkpoint's config, apply the overrides (a moepatch block from ``--moepatch_config``,
``--freeze_gate``, gate noise / balance loss / aux coefficient), tokenise the sources, load through
:func:`moepatch.loading.pretrained.load_for_command` (:func:`moepatch.from_pretrained`, so the config.json's
C2R, freeze and
statistics settings are applied and under ZeRO-3 the weights load partitioned; missing or unreadable weights are
refused, naming the folder), then train with dynamic mixing (:class:`~moepatch.mixing.callback.MixtureTrainer` and
:class:`~moepatch.mixing.callback.DynamicSamplingCallback`), a static mixture, or plain epochs over the concatenated
sources.  The final model is saved with its moepatch block, ready for ``moepatch.apply`` / ``AutoModelForCausalLM``.
Runs under ``python``, ``torchrun``, ``deepspeed`` and ``accelerate launch``.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import re
import sys
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from dataclasses import field
from pathlib import Path
from typing import TYPE_CHECKING
from typing import Any
from typing import cast

from moepatch.compat import distributed_ready
from moepatch.errors import CommandError
from moepatch.errors import FieldError
from moepatch.errors import MoePatchWarning
from moepatch.errors import UsageError
from moepatch.errors import debug_requested
from moepatch.errors import run_guarded
from moepatch.staged_output import write_text_atomically

if TYPE_CHECKING:
    from transformers import PreTrainedModel
    from transformers.hf_argparser import DataClassType

logger = logging.getLogger("moepatch.finetune")  # the name of earlier releases: logging configs keep working

PROG = "finetune"
FREEZE_CHOICES = ("router", "gate_substring", "none")
PROMPT_FORMAT_CHOICES = ("auto", "chat_template", "vicuna")
_DESCRIPTION = (
    "Fine-tune a MoE checkpoint with moepatch: dynamic data mixing (Dynamic Data Mixing, Zhu et al., 2024), frozen "
    "gates, C2R routing (C2R, Zhang et al., NAACL 2025) from the checkpoint's config.json.  Besides the arguments "
    "below: --recipe FILE.json supplies defaults for any of them (command-line flags win; see configs/), and --debug "
    "(or MOEPATCH_DEBUG=1) shows the traceback of a failure instead of a one-line message."
)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


@dataclass
class ModelArguments:
    """Which checkpoint, and the moepatch options that override its config.json."""

    model_name_or_path: str | None = field(
        default=None, metadata={"help": "Checkpoint folder holding config.json (required; nothing is downloaded)."}
    )
    moepatch_config: str | None = field(
        default=None, metadata={"help": "JSON file holding a moepatch block (or a config.json with one); replaces the "
                                        "checkpoint's block."}
    )
    freeze_gate: str | None = field(
        default=None,
        metadata={"help": "'router' (the top-k routers' weights), 'gate_substring' (every parameter whose name "
                          "contains 'gate', as in Dynamic Data Mixing, Zhu et al., 2024) or 'none'; default: the "
                          "config.json's setting."},
    )
    gate_noise: bool | None = field(default=None, metadata={"help": "Gate noise in training (LLaMA-MoE)."})
    balance_loss: bool | None = field(default=None, metadata={"help": "Add the family's balance loss to the loss."})
    aux_loss_coef: float | None = field(default=None, metadata={"help": "Coefficient of the balance loss (>= 0)."})
    ep_size: int | None = field(
        default=None,
        metadata={"help": "Expert parallelism over this many processes (launch with torchrun --nproc_per_node "
                          "EP_SIZE): each rank holds num_experts / EP_SIZE routed experts and the same batch "
                          "(transformers' DistributedConfig(tp_size=EP_SIZE, ep_size=EP_SIZE, tp_plan={}))."},
    )
    ep_implementation: str = field(
        default="auto",
        metadata={"help": "How tokens reach the experts under --ep_size: 'moepatch_dedup' (one row per token and "
                          "destination rank), 'all_to_all' (transformers: one row per token and expert), 'auto' "
                          "(transformers' choice)."},
    )

    def __post_init__(self) -> None:
        if not self.model_name_or_path:
            raise UsageError("--model_name_or_path", "required: the checkpoint folder (holding config.json) to "
                                                     "fine-tune")
        if self.moepatch_config is not None and not self.moepatch_config:
            raise UsageError("--moepatch_config", "expected a JSON file, got an empty path")
        if self.freeze_gate is not None and self.freeze_gate not in FREEZE_CHOICES:
            raise UsageError("--freeze_gate", f"expected one of {', '.join(FREEZE_CHOICES)}, got {self.freeze_gate!r}")
        coef = self.aux_loss_coef
        if coef is not None and not (_is_number(coef) and math.isfinite(coef) and coef >= 0):
            raise UsageError("--aux_loss_coef", f"expected a finite number >= 0, got {coef!r}")
        if self.ep_size is not None and not (_is_int(self.ep_size) and self.ep_size >= 1):
            raise UsageError("--ep_size", f"expected an integer >= 1, got {self.ep_size!r}")
        if self.ep_implementation not in EP_IMPLEMENTATIONS:
            raise UsageError("--ep_implementation",
                             f"expected one of {', '.join(EP_IMPLEMENTATIONS)}, got {self.ep_implementation!r}")
        if self.ep_size is None and self.ep_implementation != "auto":
            raise UsageError("--ep_implementation", "only takes effect with --ep_size")

    @property
    def checkpoint(self) -> str:
        """``model_name_or_path``, which ``__post_init__`` requires (``None`` is only its parser default)."""
        assert self.model_name_or_path, "ModelArguments.__post_init__ refuses a missing --model_name_or_path"
        return self.model_name_or_path


EP_IMPLEMENTATIONS = ("auto", "moepatch_dedup", "all_to_all")
"""``--ep_implementation`` choices: transformers' dispatches that train, and moepatch's (``all_reduce`` is
inference-only, so it is not offered for fine-tuning)."""

_EXPERT_COUNT_FIELDS = ("num_experts", "num_local_experts", "n_routed_experts", "moe_num_experts")


def expert_parallel_config(model_args: ModelArguments, config: Any) -> Any:
    """The ``DistributedConfig`` ``--ep_size`` asks for (``None`` without it), checked before any weight is read.

    Why here and not in ``from_pretrained``: transformers only finds an unfit EP size while sharding (a rank count
    that does not divide the experts) or not at all (a launch with another number of processes hangs or shards
    wrongly), after the data is read; the run refuses both by name first.

    The layout is expert parallelism over data-parallel ranks (``tp_size=1, fsdp_size = ep_size``: each rank trains
    on its own batches, FSDP2 shards the dense weights and averages their gradients, the experts are split over the
    ranks and tokens travel to them). Not ``tp_size = ep_size`` (every rank the same batch): the Trainer hands that
    layout to accelerate as a ``ParallelismConfig``, which accelerate refuses on CPU processes. The launch must have
    exactly ``ep_size`` processes.

    Raises:
        UsageError: naming ``--ep_size``.
    """
    if model_args.ep_size is None:
        return None
    import os

    from transformers import DistributedConfig

    size = model_args.ep_size
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world != size:
        raise UsageError("--ep_size", f"{size} but this launch has {world} process(es): launch with torchrun "
                                      f"--nproc_per_node {size} (every process holds num_experts / {size} experts)")
    experts = next((getattr(config, name) for name in _EXPERT_COUNT_FIELDS
                    if isinstance(getattr(config, name, None), int)), None)
    if experts is None:
        raise UsageError("--ep_size", f"the {config.model_type} config names no routed-expert count "
                                      f"({', '.join(_EXPERT_COUNT_FIELDS)}): cannot shard its experts")
    if experts % size:
        raise UsageError("--ep_size", f"{size} does not divide the model's {experts} routed experts")
    return DistributedConfig(tp_size=1, fsdp_size=size, ep_size=size, ep_implementation=model_args.ep_implementation)


@dataclass
class DataArguments:
    """Training sources (named jsonl files or folders) and their fixed probe splits."""

    data_dir: str | None = field(
        default=None,
        metadata={"help": "Folder with train/<name>.jsonl (or train/<name>/*.jsonl) and optional dev/<name>.jsonl "
                          "(the probe set of source <name>)."},
    )
    train_files: list[str] | None = field(default=None, metadata={"help": "name=path entries (jsonl or folder)."})
    probe_files: list[str] | None = field(default=None, metadata={"help": "name=path probe (dev) files of sources "
                                                                          "named by --train_files or --data_dir."})
    probe_size: int = field(
        default=80,
        metadata={"help": "Probe examples per source (>= 1; Dynamic Data Mixing, Zhu et al., 2024, probes about 80). "
                          "With a dev/<name>.jsonl or --probe_files entry: a fixed subset of that file drawn with "
                          "--sampling_seed (all of it when it is smaller; the official dev sets hold 1,000 per "
                          "source); without one: a fixed, seeded sample held out of the source's train records."},
    )
    prompt_format: str = field(
        default="auto",
        metadata={"help": "'chat_template', 'vicuna', or 'auto' (the tokenizer's chat template when it has one)."},
    )
    max_length: int = field(default=2048, metadata={"help": "Truncate examples to this many tokens (>= 1)."})
    initial_weights: str | None = field(
        default=None,
        metadata={"help": "JSON file {source: weight} (the official prob_map): one finite weight >= 0 per source "
                          "(> 0 with dynamic mixing); default uniform."},
    )
    dynamic_sampling: bool = field(
        default=True,
        metadata={"help": "Re-weight the sources from routing statistics (needs --max_steps and at least two "
                          "sources; with exactly two the weights cannot move apart)."},
    )
    synthetic_data: bool = field(
        default=False, metadata={"help": "Generate the embedded four-task data into <output_dir>/data and use it."}
    )

    def __post_init__(self) -> None:
        if self.data_dir is not None and not self.data_dir:
            raise UsageError("--data_dir", "expected a folder, got an empty path")
        if self.synthetic_data and (self.data_dir or self.train_files or self.probe_files):
            given = "--data_dir" if self.data_dir else "--train_files" if self.train_files else "--probe_files"
            raise UsageError("--synthetic_data", f"writes and uses its own four sources; do not combine it with "
                                                 f"{given}")
        if not (self.data_dir or self.train_files or self.synthetic_data):
            raise UsageError("--data_dir", "no training data given: pass --data_dir DIR, --train_files name=path ... "
                                           "or --synthetic_data")
        from moepatch.data.sources import named_paths

        for field_name in ("train_files", "probe_files"):
            try:
                named_paths(getattr(self, field_name), field_name)
            except FieldError as error:
                raise error.as_usage_error(SOURCE_FLAGS) from None
        if not (_is_int(self.probe_size) and self.probe_size >= 1):
            raise UsageError("--probe_size", f"expected an integer >= 1 (probe examples per source), got "
                                             f"{self.probe_size!r}")
        if self.prompt_format not in PROMPT_FORMAT_CHOICES:
            raise UsageError("--prompt_format", f"expected one of {', '.join(PROMPT_FORMAT_CHOICES)}, got "
                                                f"{self.prompt_format!r}")
        if not (_is_int(self.max_length) and self.max_length >= 1):
            raise UsageError("--max_length", f"expected an integer >= 1 (tokens per example), got {self.max_length!r}")
        if self.initial_weights is not None and not self.initial_weights:
            raise UsageError("--initial_weights", "expected a JSON file, got an empty path")


# ---------------------------------------------------------------------------------------------- arguments
def _recipe_argv(recipe: dict[str, Any]) -> list[str]:
    argv = []
    for key, value in recipe.items():
        if key.startswith("_") or value is None:  # "_comment" and friends; null keeps the default
            continue
        values = value if isinstance(value, list) else [value]
        argv.append(f"--{key}")
        argv.extend("true" if v is True else "false" if v is False else json.dumps(v) if isinstance(v, dict)
                    else str(v) for v in values)
    return argv


def _split_debug(argv: Sequence[str]) -> tuple[bool, list[str]]:
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


def _recipe_file(argv: list[str]) -> tuple[str | None, list[str]]:
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


def _expand_recipe(argv: list[str], known: set[str]) -> list[str]:
    """``argv`` with ``--recipe FILE``'s settings put first (so the command line wins)."""
    value, rest = _recipe_file(argv)
    if value is None:
        return argv
    recipe = _read_json(value, "--recipe", "a JSON object of argument: value settings")
    if not isinstance(recipe, dict):  # the file's content is wrong: exit 1, the file and the flag named
        raise CommandError(f"{value} (--recipe): expected a JSON object of argument: value settings, got "
                           f"{type(recipe).__name__}")
    unknown = sorted(key for key in recipe if not key.startswith("_") and key not in known)
    if unknown:
        raise CommandError(f"{value} (--recipe): unknown key{'s' if len(unknown) > 1 else ''} "
                           f"{', '.join(map(repr, unknown))} (not arguments of finetune or transformers' "
                           "TrainingArguments; keys starting with '_' are comments)")
    return _recipe_argv(recipe) + rest


def _make_parser(types: tuple[type, ...]) -> Any:
    """An ``HfArgumentParser`` whose own errors (a bad int, a missing value) raise :class:`UsageError`."""
    from transformers import HfArgumentParser

    class _Parser(HfArgumentParser):
        def error(self, message: str):  # argparse: "argument --x/--y: invalid int value: 'a'"
            match = re.match(r"argument (\S+?): (.*)", message, re.S)
            if match:
                raise UsageError(match.group(1).split("/")[0], match.group(2))
            raise UsageError("arguments", message)

    return _Parser(cast("tuple[DataClassType, ...]", types), description=_DESCRIPTION)


def _blamed_argument(error: BaseException, argv: Sequence[str]) -> str:
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


def _parse(argv: Sequence[str] | None) -> tuple[Any, Any, Any, Any, Any]:
    """The five argument objects; raises :class:`UsageError` naming the argument for any bad value."""
    from transformers import TrainingArguments

    from moepatch.mixing.callback import DynamicSamplingArguments
    from moepatch.staged_output import refuse_output_in_inputs
    from moepatch.task_experts.training import TaskExpertArguments
    from moepatch.validation import check_output_folder

    _, argv = _split_debug(list(sys.argv[1:] if argv is None else argv))
    types = (ModelArguments, DataArguments, DynamicSamplingArguments, TrainingArguments, TaskExpertArguments)
    known = {f.name for kind in types for f in dataclasses.fields(kind) if f.init}
    parser = _make_parser(types)
    given = _refuse_repeated_flags(argv, parser)  # the user's own command line; a recipe's value may be overridden
    recipe = _recipe_file(argv)[0]
    argv = _expand_recipe(argv, known)
    namespace, unknown = parser.parse_known_args(argv)  # argparse's own checks, nothing built yet
    if unknown:
        flag = next((token for token in unknown if token.startswith("-")), unknown[0])
        raise UsageError(flag.partition("=")[0], f"unknown argument (not given a value, or not an argument of "
                                                 f"finetune or TrainingArguments; see --help): {' '.join(unknown)}")
    if getattr(namespace, "output_dir", None) is None:
        raise UsageError("--output_dir", "required: the folder the fine-tuned model is saved to")
    check_output_folder(namespace.output_dir, "--output_dir")  # empty, a file, under a file, not writable
    refuse_output_in_inputs(namespace.output_dir, "--output_dir", {"--recipe": recipe})  # the other inputs: below
    try:
        parsed = parser.parse_args_into_dataclasses(args=argv)
    except UsageError:
        raise
    except (ValueError, NotImplementedError, TypeError, OSError) as error:  # TrainingArguments' own checks
        raise UsageError(_blamed_argument(error, argv), str(error)) from error
    _check_training_arguments(parsed[3])
    if parsed[4].task_experts:  # one expert per source: no mixture to re-weight
        parsed[1].dynamic_sampling = False
    elif not parsed[1].dynamic_sampling:  # a recipe's dynamic-mixing values are defaults; the user's own flags are not
        flag = next((flag for dest, flag in given.items() if dest in _DYNAMIC_ONLY), None)
        if flag is not None:
            raise UsageError(flag, "only applies with dynamic mixing, and this run has --dynamic_sampling false: it "
                                   "would be ignored; drop it or turn dynamic mixing on")
    return tuple(parsed[:5])


_DYNAMIC_ONLY = ("update_every", "eta", "c", "distance", "criterion", "probe_layers", "probe_batch_size", "plot")
"""Options of :class:`~moepatch.mixing.callback.DynamicSamplingArguments` that only the probe rounds read
(``sampling_seed`` also seeds a static mixture's draws and the probe subsets)."""


def _refuse_repeated_flags(argv: Sequence[str], parser: Any) -> dict[str, str]:
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
        action = options.get(flag)
        if action is None:  # an abbreviation (argparse's allow_abbrev) resolves to one argument, or to none
            matches = {option_action.dest: option_action for option, option_action in options.items()
                       if option.startswith(flag)}
            action = next(iter(matches.values())) if len(matches) == 1 else None
        if action is None or action.dest == "help":
            continue  # unknown flags are reported by the parser
        if action.dest in seen:
            earlier = seen[action.dest]
            same = earlier == flag
            raise UsageError(flag, f"given twice{'' if same else f' (as {earlier} and {flag})'}; give it once "
                                   "(argparse would silently keep the last value)")
        seen[action.dest] = flag
    return seen


def _check_training_arguments(training_args: Any) -> None:
    """Values of transformers' ``TrainingArguments`` it accepts but that fail (or train nonsense) only once the model
    is loaded: the optimizer's own checks, a zero batch, endless epochs, an unknown ``--report_to`` integration."""

    def finite(value: Any) -> bool:
        return _is_number(value) and math.isfinite(value)

    checks = [
        ("--learning_rate", training_args.learning_rate, lambda v: finite(v) and v >= 0, "a finite number >= 0"),
        ("--per_device_train_batch_size", training_args.per_device_train_batch_size,
         lambda v: _is_int(v) and v >= 1, "an integer >= 1"),
        ("--gradient_accumulation_steps", training_args.gradient_accumulation_steps,
         lambda v: _is_int(v) and v >= 1, "an integer >= 1"),
        ("--num_train_epochs", training_args.num_train_epochs, lambda v: finite(v) and v >= 0, "a finite number >= 0"),
        ("--weight_decay", training_args.weight_decay, lambda v: finite(v) and v >= 0, "a finite number >= 0"),
        ("--adam_beta1", training_args.adam_beta1, lambda v: finite(v) and 0 <= v < 1, "a number in [0, 1)"),
        ("--adam_beta2", training_args.adam_beta2, lambda v: finite(v) and 0 <= v < 1, "a number in [0, 1)"),
        ("--adam_epsilon", training_args.adam_epsilon, lambda v: finite(v) and v >= 0, "a finite number >= 0"),
        ("--max_grad_norm", training_args.max_grad_norm, lambda v: v is None or not math.isnan(v),
         "a number (<= 0: no clipping)"),
        ("--warmup_steps", training_args.warmup_steps, lambda v: finite(v) and v >= 0, "a finite number >= 0"),
        ("--label_smoothing_factor", training_args.label_smoothing_factor, lambda v: finite(v) and 0 <= v <= 1,
         "a number in [0, 1]"),
        ("--dataloader_num_workers", training_args.dataloader_num_workers, lambda v: _is_int(v) and v >= 0,
         "an integer >= 0"),
        ("--max_steps", training_args.max_steps, lambda v: _is_int(v) and (v >= 1 or v == -1),
         "an integer >= 1, or -1 (the default: train --num_train_epochs)"),  # the Trainer runs epochs for 0
    ]
    if str(getattr(training_args.save_strategy, "value", training_args.save_strategy)) == "steps":
        checks.append(("--save_steps", training_args.save_steps, lambda v: finite(v) and v > 0,
                       "a number > 0 with --save_strategy steps"))
    if str(getattr(training_args.logging_strategy, "value", training_args.logging_strategy)) == "steps":
        checks.append(("--logging_steps", training_args.logging_steps, lambda v: finite(v) and v > 0,
                       "a number > 0 with --logging_strategy steps"))
    for flag, value, valid, expected in checks:
        if not valid(value):
            raise UsageError(flag, f"expected {expected}, got {value!r}")
    _check_report_to(training_args.report_to)


def _check_report_to(report_to: Any) -> None:
    """``--report_to``: ``none``, ``all`` or integrations transformers knows and that are installed (the Trainer
    would refuse an unknown one, or fail to start an uninstalled one, only after the model is loaded)."""
    from transformers.integrations import integration_utils

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


def parse_arguments(argv: Sequence[str] | None = None) -> tuple[Any, ...]:
    """``(model_args, data_args, sampling_args, training_args, expert_args)`` from ``argv`` (``--recipe`` defaults
    first).

    Every value is checked here (the files the arguments name are checked by :func:`check_inputs`).  A bad one
    prints ``finetune: error: --flag: what was expected, got X`` on stderr and raises ``SystemExit(2)``.
    """
    parsed: list[Any] = []

    def body() -> int:
        parsed.extend(_parse(argv))
        return 0

    status = run_guarded(PROG, body, debug=debug_requested())
    if status:
        raise SystemExit(status)
    return tuple(parsed)


SOURCE_FLAGS = {"data_dir": "--data_dir", "train_files": "--train_files", "probe_files": "--probe_files"}
"""How this script spells the fields of :func:`moepatch.data.sources.discover_sources`."""


def source_paths(data_args: DataArguments) -> dict[str, tuple[Path, Path | None]]:
    """``{name: (train, probe or None)}`` in sorted name order (the official order of matrices and weights), from
    :func:`moepatch.data.sources.discover_sources`.

    Raises:
        UsageError: naming the argument: a malformed or repeated ``name=path``, a probe file of no source, a missing
            file or folder, a data folder without ``train/`` or without any source.
    """
    from moepatch.data.sources import discover_sources

    try:
        return discover_sources(data_args.data_dir, data_args.train_files, data_args.probe_files)
    except FieldError as error:
        raise error.as_usage_error(SOURCE_FLAGS) from None


def _read_json(path_text: str, flag: str, expected: str) -> Any:
    """The JSON value of the file an argument names; :class:`UsageError` naming ``flag`` otherwise."""
    path = Path(path_text)
    if not path.exists():
        raise UsageError(flag, f"{path}: no such file (expected {expected})")
    if path.is_dir():
        raise UsageError(flag, f"{path} is a folder (expected a JSON file: {expected})")
    try:  # the file exists but its content is broken: a malformed file (exit 1), named with the flag
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as error:
        raise CommandError(f"{path} ({flag}) cannot be read ({error})") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as error:
        raise CommandError(f"{path} ({flag}) is not JSON ({error.msg} at line {error.lineno}, column "
                           f"{error.colno}); expected {expected}") from None


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
    given = _read_json(path, flag, expected)
    if not isinstance(given, dict):
        raise CommandError(f"{path} ({flag}): expected {expected}, got {type(given).__name__}")
    missing, extra = sorted(set(names) - set(given)), sorted(set(given) - set(names))
    if missing or extra:
        parts = ([f"no weight for {missing}"] if missing else []) + ([f"{extra} name no source"] if extra else [])
        raise CommandError(f"{path} ({flag}): {'; '.join(parts)} (sources: {list(names)})")
    bad = {name: given[name] for name in names
           if not (_is_number(given[name]) and math.isfinite(given[name]) and given[name] >= 0)}
    if bad:
        raise CommandError(f"{path} ({flag}): every weight must be a finite number >= 0, got {bad}")
    if positive and any(given[name] == 0 for name in names):
        zero = [name for name in names if given[name] == 0]
        raise CommandError(f"{path} ({flag}): dynamic mixing needs every weight > 0 (it updates them in log space); "
                               f"{zero} are 0 (or pass --dynamic_sampling false)")
    if not sum(given[name] for name in names) > 0:
        raise CommandError(f"{path} ({flag}): the weights sum to 0; at least one source needs a positive weight")
    return [float(given[name]) for name in names]


def _mixture_run(data_args: DataArguments) -> bool:
    """Drawn from a weighted mixture (dynamic, or static with ``--initial_weights``) rather than plain epochs."""
    return bool(data_args.dynamic_sampling or data_args.initial_weights)


def source_names(data_args: DataArguments) -> list[str]:
    """The sources a run trains on, in order (the synthetic tasks for ``--synthetic_data``); checks their paths."""
    if data_args.synthetic_data and not (data_args.data_dir or data_args.train_files):
        from moepatch.data.synthetic import TASKS

        return sorted(TASKS)
    return list(source_paths(data_args))


def check_inputs(model_args: ModelArguments, data_args: DataArguments, sampling_args: Any,
                 training_args: Any, expert_args: Any = None) -> list[str]:
    """Check everything the arguments name before anything is loaded or written; return the source names.

    The checkpoint folder and its config with every override (:func:`prepare_config`), the sources' files and
    folders, ``--initial_weights`` against the sources, ``--resume_from_checkpoint``, the output folder, and the
    combinations: dynamic mixing needs at least two sources and ``--max_steps`` (a weighted mixture is an infinite
    stream).  Two sources only warn (:class:`~moepatch.errors.MoePatchWarning`): their routing distances cannot tell
    them apart, so the update can only smooth the weights towards uniform.

    Raises:
        UsageError: naming the argument.
    """
    from moepatch.mixing.callback import ROUNDS_FILE
    from moepatch.mixing.callback import STATE_FILE
    from moepatch.staged_output import refuse_output_in_inputs

    config = prepare_config(model_args)
    checkpoint, output = Path(model_args.checkpoint), Path(training_args.output_dir)
    # the model being fine-tuned, its sources and the files naming its settings: never the output, inside it or
    # around it (--resume_from_checkpoint is not an input here: it lies inside the output by design)
    def paths(entries: list[str] | None) -> list[str]:  # name=path entries
        return [entry.partition("=")[2] for entry in entries or [] if entry.partition("=")[2]]

    refuse_output_in_inputs(output, "--output_dir", {
        "--model_name_or_path": checkpoint, "--data_dir": data_args.data_dir or None,
        "--train_files": paths(data_args.train_files), "--probe_files": paths(data_args.probe_files),
        "--moepatch_config": model_args.moepatch_config or None,
        "--initial_weights": data_args.initial_weights or None})
    expert_parallel_config(model_args, config)
    check_model_structure(model_args, config,
                          probe_layers=list(sampling_args.probe_layers) if data_args.dynamic_sampling else None)
    names = source_names(data_args)
    _check_synthetic_target(data_args, output, training_args.seed)
    if expert_args is not None and expert_args.task_experts and expert_args.expert_routed_experts \
            and model_args.ep_size is not None:
        raise UsageError("--expert_routed_experts", "peft's LoRA on the fused routed experts (target_parameters) "
                                                    "does not run under expert parallelism (--ep_size): it adds a "
                                                    "LoRA delta of every expert to each rank's shard of the experts (a "
                                                    "DTensor), which torch refuses (mixed Tensor and DTensor); under "
                                                    "--ep_size adapt the linear projections only")
    if expert_args is not None:
        _check_task_expert_inputs(expert_args, data_args, names, training_args.resume_from_checkpoint, sampling_args)
        block = getattr(config, "moepatch", None)
        if expert_args.task_experts and isinstance(block, dict) and block.get("bias_update"):
            raise UsageError("--task_experts", "the moepatch block has bias_update, which moves the base model's "
                                               "selection biases; a task expert is a LoRA adapter that does not save "
                                               "them, so its expert would not reproduce. Drop bias_update (e.g. "
                                               "with --moepatch_config) for --task_experts")
        _check_earlier_experts(expert_args, output, checkpoint)
    dynamic, mixture = data_args.dynamic_sampling, _mixture_run(data_args)
    if dynamic and len(names) < 2:
        raise UsageError("--dynamic_sampling", f"dynamic mixing re-weights several sources; found one ({names[0]!r}). "
                                               "Give more sources, or pass --dynamic_sampling false to train on it")
    notes = []  # warned once every check has passed: a refused run prints its error alone
    if dynamic and len(names) == 2:
        notes.append(
            f"dynamic mixing with two sources ({names[0]!r}, {names[1]!r}): the weights cannot move apart — both "
            "sources are at the same distance from each other, so every update only smooths the weights towards "
            "uniform (c).  Use three or more sources, or --dynamic_sampling false with --initial_weights.")
    if mixture and training_args.max_steps <= 0:
        reason = "dynamic mixing" if dynamic else "a weighted mixture (--initial_weights)"
        raise UsageError("--max_steps", f"{reason} draws an endless stream; give the number of optimizer steps "
                                        f"(> 0), got {training_args.max_steps}")
    if not mixture and training_args.max_steps <= 0 and not training_args.num_train_epochs > 0:
        raise UsageError("--num_train_epochs", f"expected > 0 (or --max_steps > 0), got "
                                               f"{training_args.num_train_epochs}")
    if dynamic and training_args.max_steps < sampling_args.update_every:
        notes.append(f"--update_every {sampling_args.update_every} > --max_steps {training_args.max_steps}: no probe "
                     "round will run, so the sources keep their initial weights")
    if data_args.initial_weights:
        read_initial_weights(data_args.initial_weights, names, positive=dynamic)
    if not 0 <= training_args.seed < 2**32:
        raise UsageError("--seed", f"expected an integer in [0, 2**32), got {training_args.seed}")
    resume = training_args.resume_from_checkpoint
    if resume:
        folder = Path(resume)
        if not folder.is_dir():
            raise UsageError("--resume_from_checkpoint", f"{folder}: no such checkpoint folder")
        if mixture and not (folder / STATE_FILE).is_file():
            raise UsageError("--resume_from_checkpoint", f"{folder} has no {STATE_FILE}: not a checkpoint of a "
                                                         "mixture run (its sampler state is needed to resume)")
    if dynamic and not resume and (output / ROUNDS_FILE).exists():
        raise UsageError("--output_dir", f"{output} already holds a dynamic-mixing run ({ROUNDS_FILE}); this run's "
                                         "rounds would be appended to it. Choose a new folder, remove it, or pass "
                                         "--resume_from_checkpoint")
    for note in notes:
        warnings.warn(note, MoePatchWarning, stacklevel=2)
    return names


def _check_synthetic_target(data_args: DataArguments, output: Path, seed: int) -> None:
    """``--synthetic_data`` copies its sources to ``<output_dir>/data``: files already there that this run would not
    write byte for byte (a user's data, another seed's) are refused instead of overwritten.  The same command run
    again (finishing a killed run) writes the same files, so it passes."""
    if not (data_args.synthetic_data and not (data_args.data_dir or data_args.train_files)):
        return
    target = output / "data"
    if not target.exists():
        return
    import tempfile

    from moepatch.data.synthetic import write_synthetic_sources

    with tempfile.TemporaryDirectory(prefix="moepatch_synthetic_check_") as scratch:
        write_synthetic_sources(scratch, seed=seed)
        for existing in sorted(path for path in target.rglob("*") if path.is_file()):
            fresh = Path(scratch) / existing.relative_to(target)
            if not fresh.is_file() or fresh.read_bytes() != existing.read_bytes():
                raise UsageError("--output_dir", f"{existing} exists and is not what --synthetic_data writes there "
                                                 "(it would be overwritten): choose another --output_dir, or move "
                                                 f"{target} away")


def _check_earlier_experts(expert_args: Any, output: Path, checkpoint: Path) -> None:
    """Experts of an earlier run in ``--output_dir`` must share the base (this run adds or replaces tasks)."""
    from moepatch.task_experts.manifest import EXPERTS_FOLDER
    from moepatch.task_experts.manifest import MANIFEST_NAME

    if not expert_args.task_experts:
        return
    path = output / EXPERTS_FOLDER / MANIFEST_NAME
    if path.is_file():
        try:
            base = json.loads(path.read_text()).get("base")
        except (json.JSONDecodeError, UnicodeDecodeError, AttributeError):
            raise UsageError("--output_dir", f"{path} is not a task-experts manifest; choose another folder") from None
        if base != str(checkpoint.resolve()):
            raise UsageError("--output_dir", f"{output} holds task experts of another base ({base}); choose another "
                                             "folder")


def _changed_fields(arguments: Any) -> list[str]:
    """The fields of an arguments dataclass whose value differs from the field's default (lists and tuples equal)."""
    changed = []
    for option in dataclasses.fields(arguments):
        if option.default_factory is not dataclasses.MISSING:
            default = option.default_factory()
        elif option.default is not dataclasses.MISSING:
            default = option.default
        else:
            continue
        value = getattr(arguments, option.name)
        as_list = (lambda item: list(item) if isinstance(item, (list, tuple)) else item)  # noqa: E731
        if as_list(value) != as_list(default):
            changed.append(option.name)
    return changed


def _check_task_expert_inputs(expert_args: Any, data_args: DataArguments, names: list[str], resume: Any,
                              sampling_args: Any = None) -> None:
    """``--task_experts`` trains one adapter per source: no mixture, no resume, no dynamic-mixing option (each would
    be silently ignored); its own flags checked."""
    if not expert_args.task_experts:
        given = [f"--{name}" for name in _changed_fields(expert_args) if name != "task_experts"]
        if given:
            raise UsageError(given[0], "only applies with --task_experts true")
        return
    if data_args.initial_weights:
        raise UsageError("--initial_weights", "--task_experts trains one expert per source, not a weighted mixture")
    changed = _changed_fields(sampling_args) if sampling_args is not None else []
    if changed:
        raise UsageError(f"--{changed[0]}", "a dynamic-mixing option; --task_experts trains one expert per source and "
                                            "runs no mixing, so it would be ignored")
    if resume:
        raise UsageError("--resume_from_checkpoint", "not supported with --task_experts (each task's run is short: "
                                                     "train the missing tasks with --tasks)")
    targets = list(expert_args.expert_target_modules or ())
    repeated = sorted({name for name in targets if targets.count(name) > 1})
    if repeated:
        raise UsageError("--expert_target_modules", f"{repeated} given twice; list each name once")
    try:
        expert_args.check(names)
    except ValueError as error:
        flag, _, message = str(error).partition(": ")
        raise UsageError(flag if flag.startswith("--") else "--task_experts",
                         message if flag.startswith("--") else str(error)) from None


# ---------------------------------------------------------------------------------------------- model
def _check_checkpoint_folder(path_text: str) -> Path:
    """The checkpoint folder: config.json and weights (checked before anything is tokenised or written)."""
    from moepatch.validation import check_checkpoint_folder

    return check_checkpoint_folder(path_text, "--model_name_or_path")


def _moepatch_block(path: str, flag: str = "--moepatch_config") -> Any:
    """``--moepatch_config``: the block, validated (a whole config.json-like file or just the block); errors name
    ``flag`` (``moepatch eval`` passes ``--model_args moepatch_config``) and the file."""
    from moepatch.config import CONFIG_KEY
    from moepatch.config import MoePatchConfig

    expected = "a moepatch block (see configs/moepatch/)"
    block = _read_json(path, flag, expected)
    if isinstance(block, dict):
        block = block.get(CONFIG_KEY, block)
    if not isinstance(block, dict):  # a malformed file (exit 1), named with the flag, like --initial_weights
        raise CommandError(f"{path} ({flag}): expected a JSON object holding {expected}, got {type(block).__name__}")
    try:
        return MoePatchConfig.from_dict(block)
    except ValueError as error:
        raise CommandError(f"{path} ({flag}): {error}") from None


def prepare_config(model_args: ModelArguments) -> Any:
    """The checkpoint's config with every override validated and applied (nothing is loaded yet).

    Raises:
        UsageError: naming the argument: no checkpoint folder or config.json, an unreadable config, no
            ``--moepatch_config`` file, a training option the family has no switch for.
        CommandError: naming the file and ``--moepatch_config``: its content is not JSON or not a valid block.
    """
    from moepatch.config import CONFIG_KEY
    from moepatch.config import MoePatchConfig
    from moepatch.config import write_config
    from moepatch.loading.pretrained import load_config
    from moepatch.routing.training_options import apply_training_options

    folder = _check_checkpoint_folder(model_args.checkpoint)
    block = _moepatch_block(model_args.moepatch_config) if model_args.moepatch_config else None
    try:
        config = load_config(str(folder))
    except (ValueError, OSError, KeyError) as error:
        raise UsageError("--model_name_or_path", f"{folder / 'config.json'} cannot be read as a model config: "
                                                 f"{error}") from error
    if block is not None:
        write_config(config, block)
    if model_args.freeze_gate is not None:
        try:
            settings = MoePatchConfig.from_dict(getattr(config, CONFIG_KEY, None)).to_dict()  # block only
        except ValueError as error:
            raise UsageError("--model_name_or_path", f"{folder / 'config.json'}: {error}") from error
        settings["freeze_gate"] = None if model_args.freeze_gate == "none" else model_args.freeze_gate
        write_config(config, MoePatchConfig.from_dict(settings))
    try:
        apply_training_options(config, gate_noise=model_args.gate_noise, balance_loss=model_args.balance_loss,
                               aux_loss_coef=model_args.aux_loss_coef)
    except ValueError as error:  # "training options:\n  gate_noise: family 'x' has no such switch ..."
        named = re.findall(r"^\s+(\w+):", str(error), re.M) or ["gate_noise"]
        detail = " ".join(line.strip() for line in str(error).splitlines()[1:]) or str(error)
        raise UsageError(f"--{named[0]}", detail) from error
    return config


def check_model_structure(model_args: ModelArguments, config: Any, *, probe_layers: list[int] | None = None) -> Any:
    """Check the model the run will load on a weightless (meta-device) skeleton built from ``config``; returns its
    :class:`~model_patches.structure.MoEModel`.

    A model moepatch cannot patch (a dense model, top-k outside ``[1, num_experts]``), a moepatch block that does not
    fit the model (a C2R list of the wrong shape, ...) and ``probe_layers`` that are no MoE layers are found here,
    before any weight is read.

    Raises:
        UnsupportedModelError: naming ``--model_name_or_path`` (exit status 2).
        UsageError: ``--freeze_gate`` does not fit; a bad ``--probe_layers``.
        CommandError: the checkpoint's own config.json (its moepatch block, official C2R fields) or the block of
            ``--moepatch_config`` (a file's content: named with the flag) does not fit; its weights are truncated or
            another model's (from the safetensors headers).
    """
    from model_patches.structure import describe
    from model_patches.structure import resolve_layer_indices
    from moepatch.config import MoePatchConfig
    from moepatch.errors import UnsupportedModelError
    from moepatch.loading.skeleton import causal_lm_class
    from moepatch.loading.skeleton import weightless_model
    from moepatch.patch import plan_patch

    folder = Path(model_args.checkpoint)
    config_file = folder / "config.json"
    block_file = model_args.moepatch_config

    def misfit(error: BaseException, *, official_c2r: bool = False) -> Exception:
        text = str(error)
        if model_args.freeze_gate is not None and "freeze_gate" in text:
            return UsageError("--freeze_gate", text)
        if block_file and not official_c2r:  # the file's block replaced the checkpoint's: its content misfits
            return CommandError(f"{block_file} (--moepatch_config): {text}")
        return CommandError(f"{config_file}: {text}")

    try:
        settings = MoePatchConfig.from_model(config)
    except ValueError as error:
        raise misfit(error) from None
    model_class = causal_lm_class(config)
    if model_class is None:
        raise UnsupportedModelError(f"--model_name_or_path: {config_file}: no causal-LM class for model_type "
                                    f"{config.model_type!r} ({type(config).__name__})")
    try:
        skeleton = weightless_model(config)
    except Exception as error:
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise CommandError(f"{config_file}: cannot build {model_class.__name__} from it ({first})") from None
    try:
        moe = describe(skeleton, family=settings.family, verify=False)
    except UnsupportedModelError as error:
        raise UnsupportedModelError(f"--model_name_or_path: {folder}: {error}") from None
    except ValueError as error:  # an unknown "family" in the block
        raise misfit(error) from None
    if not 1 <= moe.top_k <= moe.num_experts:
        raise UnsupportedModelError(f"--model_name_or_path: {config_file}: its routers choose top-{moe.top_k} of "
                                    f"{moe.num_experts} experts; expected 1 <= top-k <= experts")
    official = settings.c2r is not None and settings.c2r.source == "official"
    if official:  # the checkpoint's top-level C2R fields, which a --moepatch_config block without "c2r" keeps
        try:
            plan_patch(moe, settings.only("c2r"))
        except ValueError as error:
            raise misfit(error, official_c2r=True) from None
    try:
        plan_patch(moe, settings)
    except ValueError as error:
        raise misfit(error) from None
    if probe_layers is not None:
        try:
            resolve_layer_indices(moe, probe_layers, "probe_layers")
        except ValueError as error:
            raise UsageError("--probe_layers", str(error)) from None
    from moepatch.loading.skeleton import weights_problem

    problem = weights_problem(folder, skeleton)  # the headers alone: truncated or foreign weights, before the load
    if problem is not None:
        raise CommandError(problem)
    return moe


def load_tokenizer(path: str) -> Any:
    """The checkpoint's tokenizer; pad = unk, else eos when it has none (as the official scripts do).

    Raises:
        CommandError: naming the folder: no tokenizer can be built from it, or it encodes text to nothing (a
            folder without tokenizer.json / tokenizer_config.json still gives a tokenizer without a vocabulary).
    """
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
        encoded = tokenizer("moepatch checks its tokenizer", add_special_tokens=False)["input_ids"]
    except Exception as error:
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise CommandError(f"{path}: no usable tokenizer ({first})") from None
    if not encoded:
        raise CommandError(f"{path}: no usable tokenizer (it encodes text to nothing: are tokenizer.json / "
                           "tokenizer_config.json there?)")
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.unk_token or tokenizer.eos_token
    return tokenizer


# ---------------------------------------------------------------------------------------------- run
def run(model_args: ModelArguments, data_args: DataArguments, sampling_args: Any, training_args: Any,
        expert_args: Any = None) -> dict:
    """Train and save; returns a summary (sources, rounds, final weights, output folder).

    Nothing is written before the tokenizer is loaded, the data is read and tokenised and the model is loaded:
    ``--synthetic_data``'s sources are generated into a temporary folder and copied to ``<output_dir>/data`` only
    then.  Training examples whose assistant tokens are all cut by ``--max_length`` are left out (and counted);
    a source left without any is refused, naming ``--max_length``.
    """
    import shutil
    import tempfile

    import torch
    from transformers import DataCollatorForSeq2Seq
    from transformers import set_seed

    from model_patches.structure import describe
    from model_patches.structure import resolve_layer_indices
    from moepatch.data.instruction import load_source
    from moepatch.loading.pretrained import load_for_command
    from moepatch.mixing.callback import ROUNDS_FILE
    from moepatch.mixing.callback import DynamicSamplingCallback
    from moepatch.mixing.callback import MixtureTrainer
    from moepatch.mixing.callback import ResumingTrainer
    from moepatch.mixing.callback import sampling_horizon
    from moepatch.mixing.sampler import DynamicMixtureSampler
    from moepatch.mixing.sampler import MixtureDataset
    from moepatch.routing.bias_update import bias_update_callbacks

    set_seed(training_args.seed)
    _init_deepspeed_comm(training_args)
    output_dir = Path(training_args.output_dir)
    config = prepare_config(model_args)
    distributed = expert_parallel_config(model_args, config)
    tokenizer = load_tokenizer(model_args.checkpoint)  # before anything is written
    prompt_format = _prompt_format(data_args.prompt_format, tokenizer, model_args.checkpoint)
    with tempfile.TemporaryDirectory(prefix="moepatch_synthetic_") as scratch:
        synthetic = bool(data_args.synthetic_data and not (data_args.data_dir or data_args.train_files))
        if synthetic:  # every process generates the same sources (seeded); <output_dir>/data is written later
            from moepatch.data.synthetic import write_synthetic_sources

            write_synthetic_sources(scratch, seed=training_args.seed)
            data_args = dataclasses.replace(data_args, data_dir=scratch, synthetic_data=False)
        paths = source_paths(data_args)  # validated before the model is loaded
        sources = [
            load_source(name, train, tokenizer, probe_path=probe, probe_size=data_args.probe_size,
                        seed=sampling_args.sampling_seed, prompt_format=prompt_format,
                        max_length=data_args.max_length)
            for name, (train, probe) in paths.items()
        ]
        shown = {name: "synthetic" if synthetic else str(train) for name, (train, _) in paths.items()}
        empty = [f"{source.name!r} ({shown[source.name]}, {source.dropped} examples)" for source in sources
                 if not source.train]
        if empty:
            raise UsageError("--max_length", f"truncation to {data_args.max_length} tokens leaves no assistant "
                                             f"(label) token in any training example of source{'s' * (len(empty) > 1)}"
                                             f" {', '.join(empty)}: nothing to train on; raise --max_length")
        names = [source.name for source in sources]
        if data_args.dynamic_sampling:
            empty = [f"{paths[s.name][1] or paths[s.name][0]}" for s in sources if not s.probe]
            if empty:
                raise CommandError(f"dynamic mixing: no probe examples in {', '.join(empty)}")
        initial = (read_initial_weights(data_args.initial_weights, names, positive=data_args.dynamic_sampling)
                   if data_args.initial_weights else None)

        extra = {} if distributed is None else {"distributed_config": distributed}
        # a transformers causal LM (load_for_command is annotated with its base class)
        model = cast("PreTrainedModel", load_for_command(model_args.checkpoint, config=config, dtype=torch.float32,
                                                          **extra))
        if distributed is not None:
            from moepatch.expert_parallel.training import replicate_added_parameters

            replicate_added_parameters(model)
        model.config.use_cache = False
        task_experts = expert_args is not None and expert_args.task_experts
        if task_experts:  # peft can reach what is asked: checked before anything is written
            expert_modules, expert_parameters = _task_expert_targets(model, expert_args, config.model_type)
        if data_args.dynamic_sampling:
            try:  # checked on the skeleton already (check_inputs); the loaded model is what the rounds record
                resolve_layer_indices(describe(model), list(sampling_args.probe_layers), "probe_layers")
            except ValueError as error:
                raise UsageError("--probe_layers", str(error)) from error
        if synthetic and training_args.process_index == 0:  # what the run trains on, next to the model
            shutil.copytree(scratch, output_dir / "data", dirs_exist_ok=True)
    _barrier()
    collator = DataCollatorForSeq2Seq(tokenizer, label_pad_token_id=-100, return_tensors="pt")
    if task_experts:
        return _train_task_experts(model, tokenizer, sources, collator, model_args, training_args, expert_args,
                                   expert_modules, expert_parameters, prompt_format,
                                   {s.name for s in sources if paths[s.name][1] is None})
    summary: dict[str, Any] = {"sources": names, "prompt_format": prompt_format,
                               "train_examples": [len(s.train) for s in sources],
                               "dropped_train_examples": [s.dropped for s in sources],
                               "probe_examples": [len(s.probe) for s in sources]}
    if data_args.dynamic_sampling or initial is not None:
        if training_args.max_steps <= 0:
            raise UsageError("--max_steps", "a weighted mixture is an infinite stream; give the number of steps")
        sampler = DynamicMixtureSampler([len(s.train) for s in sources], initial, seed=sampling_args.sampling_seed,
                                        horizon=sampling_horizon(training_args))
        callbacks = bias_update_callbacks(model)  # the block's bias_update: biases move after every step
        if data_args.dynamic_sampling:
            callbacks.append(DynamicSamplingCallback(sampler, names, [s.probe for s in sources], collator,
                                                     sampling_args))
        trainer: ResumingTrainer = MixtureTrainer(
            model=model, args=training_args, train_dataset=MixtureDataset([s.train for s in sources]),
            data_collator=collator, callbacks=callbacks, mixture_sampler=sampler)
    else:
        train = [example for source in sources for example in source.train]
        trainer = ResumingTrainer(model=model, args=training_args, train_dataset=train, data_collator=collator,
                                  callbacks=bias_update_callbacks(model))
        sampler = None
    result = trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
    trainer.save_model(str(output_dir))
    if trainer.is_world_process_zero():
        tokenizer.save_pretrained(str(output_dir))
    summary["train_loss"] = result.training_loss
    summary["loss_history"] = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    summary["world_size"] = training_args.world_size
    summary["deepspeed_zero_stage"] = _zero_stage(trainer)
    summary["global_step"] = trainer.state.global_step
    rounds_path = output_dir / ROUNDS_FILE
    summary["rounds"] = (
        [json.loads(line) for line in rounds_path.read_text().splitlines() if line.strip()]
        if rounds_path.exists() else []
    )
    if sampler is not None:
        summary["final_weights"] = sampler.weights
    if trainer.is_world_process_zero():
        write_text_atomically(output_dir / "moepatch_finetune_summary.json", json.dumps(summary, indent=1))
    return summary


def _prompt_format(asked: str, tokenizer: Any, model_path: str) -> str:
    """``--prompt_format`` resolved against the tokenizer: ``auto`` is its chat template when it has one."""
    has_template = bool(getattr(tokenizer, "chat_template", None))
    if asked == "auto":
        return "chat_template" if has_template else "vicuna"
    if asked == "chat_template" and not has_template:
        raise UsageError("--prompt_format", f"'chat_template' but the tokenizer of {model_path} has no chat template; "
                                            "use 'vicuna' or 'auto'")
    return asked


def _task_expert_targets(model: Any, expert_args: Any, model_type: str) -> tuple[list[str], list[str]]:
    """The linear modules and routed-expert parameters the task experts' peft LoRA adapts; projections peft would
    rename into routed experts' target_parameters are left out (warned), and none left is refused."""
    from moepatch.task_experts.training import linear_targets
    from moepatch.task_experts.training import peft_remapped
    from moepatch.task_experts.training import routed_target_parameters

    try:
        expert_modules = linear_targets(model, expert_args.expert_target_modules)
        expert_parameters = routed_target_parameters(model) if expert_args.expert_routed_experts else []
    except ValueError as error:
        flag, _, message = str(error).partition(": ")
        raise UsageError(flag, message) from None
    remapped = peft_remapped(model, expert_modules)
    if remapped:
        names = sorted({path.rsplit(".", 1)[-1] for path in remapped})
        kept = [path for path in expert_modules if path not in remapped]
        if not kept:
            raise UsageError("--expert_target_modules", f"peft turns {names} of this {model_type} model into its "
                                                        "routed experts (target_parameters): nothing left to adapt; "
                                                        "name attention projections")
        logger.warning("task experts: leaving out %d %s projections (%s...): peft rewrites these names on %s into "
                       "target_parameters of the routed experts (its transformers-4 adapter conversion), so their "
                       "LoRA would not load back; use --expert_routed_experts for the experts",
                       len(remapped), "/".join(names), remapped[0], model_type)
        expert_modules = kept
    return expert_modules, expert_parameters


def _train_task_experts(model: Any, tokenizer: Any, sources: list[Any], collator: Any, model_args: ModelArguments,
                        training_args: Any, expert_args: Any, modules: list[str], parameters: list[str],
                        prompt_format: str, without_dev: set[str]) -> dict:
    """``--task_experts``: one peft LoRA per source (see :mod:`moepatch.task_experts.training`).  A source without a
    dev file trains on all its records (its probe split exists for dynamic mixing, which task experts do not run);
    the router then has no held-out examples of it (``fit-router`` says so)."""
    from moepatch.task_experts.training import train_task_experts

    output_dir = Path(training_args.output_dir)
    tasks = expert_args.check([source.name for source in sources])
    train_on = {source.name: source.train + source.probe for source in sources if source.name in without_dev}
    manifest = train_task_experts(model, sources, tasks, collator, training_args, expert_args,
                                  str(Path(model_args.checkpoint).resolve()), modules, parameters, train_on)
    if training_args.process_index == 0:
        tokenizer.save_pretrained(str(output_dir / "experts"))
    summary = {"sources": [source.name for source in sources], "prompt_format": prompt_format,
               "task_experts": manifest.to_dict()["experts"], "global_step": 0, "rounds": []}
    if training_args.process_index == 0:
        write_text_atomically(output_dir / "moepatch_finetune_summary.json", json.dumps(summary, indent=1))
        manifest.complete = True  # recorded last: every expert, the tokenizer and the summary are on disk
        manifest.write()
    _barrier()  # under torchrun every rank returns once rank 0 has written the whole run folder
    return summary


def _zero_stage(trainer: Any) -> int | None:
    """The ZeRO stage DeepSpeed ran with (``None`` without DeepSpeed): proof a launcher did not drop it."""
    if not getattr(trainer, "is_deepspeed_enabled", False):
        return None
    return int(trainer.accelerator.state.deepspeed_plugin.zero_stage)


def _init_deepspeed_comm(training_args: Any) -> None:
    """Make DeepSpeed's communication layer see the process group before the model is built.

    Under ZeRO-3 ``from_pretrained`` builds the model inside ``deepspeed.zero.Init``, which sizes batches with
    DeepSpeed's own world size — 1 unless ``deepspeed.init_distributed`` ran.  With ``use_cpu`` the Trainer's set-up
    initialises torch.distributed (gloo) but not DeepSpeed's view of it, and the batch-size check then fails.
    """
    if not training_args.deepspeed:
        return
    _ = training_args.device  # the Trainer's distributed set-up (torch.distributed, gloo on CPU)
    import deepspeed
    import torch.distributed as dist

    if distributed_ready():
        deepspeed.init_distributed(dist_backend=dist.get_backend())


def _barrier() -> None:
    import torch.distributed as dist

    if distributed_ready():
        dist.barrier()


def rounds_table(rounds: list[dict]) -> tuple[list[str], list[list[str]]]:
    """Header and rows of a weights-per-round table (initial weights first)."""
    if not rounds:
        return [], []
    names = rounds[0]["sources"]
    rows = [["0 (initial)"] + [f"{w:.3f}" for w in rounds[0]["old_weights"]]]
    rows += [[str(r["step"])] + [f"{w:.3f}" for w in r["new_weights"]] for r in rounds]
    return ["step"] + names, rows


def _finetune(argv: Sequence[str] | None) -> int:
    model_args, data_args, sampling_args, training_args, expert_args = _parse(argv)
    check_inputs(model_args, data_args, sampling_args, training_args, expert_args)
    summary = run(model_args, data_args, sampling_args, training_args, expert_args)
    if training_args.process_index == 0:
        header, rows = rounds_table(summary["rounds"])
        if rows:
            from moepatch.tools.report import format_table

            print("\n".join(format_table(header, rows, rule=False)))
        if summary.get("task_experts"):
            from moepatch.tools.report import format_table

            rows = [[e["task"], str(e["examples"]), f"{e['train_loss']:.4f}", e["path"]]
                    for e in summary["task_experts"]]
            print("\n".join(format_table(["task", "examples", "train loss", "expert"], rows, rule=False)))
            print(f"moepatch finetune: done, {len(rows)} task experts in {training_args.output_dir}/experts "
                  "(manifest.json)")
        else:
            print(f"moepatch finetune: done, {summary['global_step']} steps, model saved to "
                  f"{training_args.output_dir}")
    import torch.distributed as dist

    if distributed_ready():
        dist.barrier()
        dist.destroy_process_group()
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Parse and check every input, train, print the weights per round; returns the exit status.

    A bad argument returns 2 and a failure 1, each with a one-line message on stderr naming the argument or file
    (:func:`moepatch.errors.run_guarded`); ``--debug`` or ``MOEPATCH_DEBUG=1`` re-raises instead.  The process
    group is destroyed at the end (cleaner exits).
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = _split_debug(argv)[0] or debug_requested()
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    return run_guarded(PROG, lambda: _finetune(argv), debug=debug)


__all__ = ["DataArguments", "ModelArguments", "check_inputs", "check_model_structure", "load_tokenizer", "main",
           "parse_arguments", "prepare_config", "read_initial_weights", "rounds_table", "run", "source_names",
           "source_paths"]
