"""Fine-tune a MoE checkpoint with moepatch's options: the engine behind ``scripts/finetune.py``.

Arguments are five dataclasses read by ``HfArgumentParser`` (:mod:`moepatch.training.arguments`; transformers'
``TrainingArguments`` among them, so ``--deepspeed CONFIG``, ``--bf16``, ``--use_cpu``,
``--resume_from_checkpoint`` ... are the Trainer's own).  A ``--recipe FILE.json`` supplies defaults for any of
them (the files in ``configs/``); command-line flags win.

Every input is checked before a model is loaded or a file is written: each value when it is parsed
(:mod:`moepatch.training.parsing`), then what they name (:func:`~moepatch.training.preflight.check_inputs`).
:func:`run` then loads the tokenizer and tokenises every source (a source whose examples ``--max_length`` leaves
without a label is refused) before the model is loaded, and hands the loaded run to its mode
(:mod:`moepatch.training.modes`: dynamic mixing, a static mixture, plain epochs or task experts).  A bad input exits
with status 2 and one line naming the argument; a failure found while running (a malformed data record, ...) exits
with status 1 naming the file and line.  ``--debug`` (or ``MOEPATCH_DEBUG=1``) shows the traceback instead
(:func:`moepatch.errors.run_guarded`).  Runs under ``python``, ``torchrun``, ``deepspeed`` and ``accelerate
launch``.

The names of the earlier ``moepatch.mixing.finetune`` module (``moepatch.finetune`` before it) resolve here
(:data:`moepatch.MOVED_MODULES`), so ``moepatch.finetune.check_model_structure`` is this module's: the runner checks
the model through that name.
"""

from __future__ import annotations

import dataclasses
import logging
import shutil
import sys
import tempfile
from collections.abc import Sequence
from typing import Any
from typing import cast

import torch
from transformers import DataCollatorForSeq2Seq
from transformers import PreTrainedModel
from transformers import TrainingArguments
from transformers import set_seed

from moepatch.data import instruction
from moepatch.data.instruction import DataSource
from moepatch.data.synthetic import write_synthetic_sources
from moepatch.errors import UsageError
from moepatch.errors import debug_requested
from moepatch.errors import run_guarded
from moepatch.expert_parallel.training import replicate_added_parameters
from moepatch.loading.pretrained import load_for_command
from moepatch.mixing.callback import DynamicSamplingArguments
from moepatch.task_experts.training import TaskExpertArguments
from moepatch.tools.report import format_table
from moepatch.training.arguments import DataArguments
from moepatch.training.arguments import ModelArguments
from moepatch.training.arguments import RunArguments
from moepatch.training.distributed import barrier
from moepatch.training.distributed import end_process_group
from moepatch.training.distributed import expert_parallel_config
from moepatch.training.distributed import init_deepspeed_comm
from moepatch.training.modes.base import PreparedRun
from moepatch.training.modes.base import RunMode
from moepatch.training.modes.base import SourcePaths
from moepatch.training.modes.registry import select_mode
from moepatch.training.parsing import PROG
from moepatch.training.parsing import parse
from moepatch.training.parsing import parse_arguments
from moepatch.training.preflight import check_inputs
from moepatch.training.preflight import check_model_structure
from moepatch.training.preflight import load_tokenizer
from moepatch.training.preflight import prepare_config
from moepatch.training.preflight import resolve_prompt_format
from moepatch.training.sources import read_initial_weights
from moepatch.training.sources import source_names
from moepatch.training.sources import source_paths
from moepatch.training.toolkit import spelled_as_typed
from moepatch.training.toolkit import split_debug

_split_debug = split_debug
"""The earlier module's private name, which code written against it (its tests among them) still imports."""


def _load_sources(args: RunArguments, tokenizer: Any, prompt_format: str, paths: SourcePaths,
                  synthetic: bool) -> list[DataSource]:
    """Every source tokenised (read through :mod:`moepatch.data.instruction`); a source that ``--max_length``
    leaves without any labelled example is refused."""
    data_args = args.data
    sources = [
        instruction.load_source(name, train, tokenizer, probe_path=probe, probe_size=data_args.probe_size,
                                seed=args.sampling.sampling_seed, prompt_format=prompt_format,
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
    return sources


def _load_model(args: RunArguments, config: Any, distributed: Any) -> PreTrainedModel:
    """The checkpoint through :func:`moepatch.loading.pretrained.load_for_command` (patched from its block, under
    ZeRO-3 partitioned while it loads), its added parameters replicated under expert parallelism."""
    extra = {} if distributed is None else {"distributed_config": distributed}
    # a transformers causal LM (load_for_command is annotated with its base class)
    model = cast("PreTrainedModel", load_for_command(args.model.checkpoint, config=config, dtype=torch.float32,
                                                      **extra))
    if distributed is not None:
        replicate_added_parameters(model)
    model.config.use_cache = False
    return model


def _prepare(args: RunArguments, mode: RunMode, scratch: str) -> PreparedRun:
    """Tokenizer, sources and model, each checked (by the mode too), before anything is written; then the
    synthetic sources (generated into ``scratch``) are copied next to the model."""
    training_args = args.training
    config = prepare_config(args.model)
    distributed = expert_parallel_config(args.model, config)
    tokenizer = load_tokenizer(args.model.checkpoint)  # before anything is written
    prompt_format = resolve_prompt_format(args.data.prompt_format, tokenizer, args.model.checkpoint)
    synthetic = args.data.generates_synthetic
    if synthetic:  # every process generates the same sources (seeded); <output_dir>/data is written later
        write_synthetic_sources(scratch, seed=training_args.seed)
        args = dataclasses.replace(args, data=dataclasses.replace(args.data, data_dir=scratch, synthetic_data=False))
    paths = source_paths(args.data)  # validated before the model is loaded
    sources = _load_sources(args, tokenizer, prompt_format, paths, synthetic)
    mode.check_sources(args, sources, paths)
    model = _load_model(args, config, distributed)
    mode.check_model(args, model, config.model_type)
    if synthetic and training_args.process_index == 0:  # what the run trains on, next to the model
        shutil.copytree(scratch, args.output_dir / "data", dirs_exist_ok=True)
    collator = DataCollatorForSeq2Seq(tokenizer, label_pad_token_id=-100, return_tensors="pt")
    return PreparedRun(args, model, tokenizer, sources, paths, collator, prompt_format)


def run(model_args: ModelArguments, data_args: DataArguments, sampling_args: DynamicSamplingArguments,
        training_args: TrainingArguments, expert_args: TaskExpertArguments | None = None) -> dict[str, Any]:
    """Train and save; returns a summary (sources, rounds, final weights, output folder).

    Nothing is written before the tokenizer is loaded, the data is read and tokenised and the model is loaded:
    ``--synthetic_data``'s sources are generated into a temporary folder and copied to ``<output_dir>/data`` only
    then.  Training examples whose assistant tokens are all cut by ``--max_length`` are left out (and counted);
    a source left without any is refused, naming ``--max_length``.  The run mode
    (:func:`~moepatch.training.modes.select_mode`) trains.
    """
    args = RunArguments(model_args, data_args, sampling_args, training_args, expert_args)
    mode = select_mode(args)
    set_seed(training_args.seed)
    init_deepspeed_comm(training_args)
    with tempfile.TemporaryDirectory(prefix="moepatch_synthetic_") as scratch:
        prepared = _prepare(args, mode, scratch)
    barrier()
    return mode.train(prepared)


def rounds_table(rounds: list[dict]) -> tuple[list[str], list[list[str]]]:
    """Header and rows of a weights-per-round table (initial weights first)."""
    if not rounds:
        return [], []
    names = rounds[0]["sources"]
    rows = [["0 (initial)"] + [f"{w:.3f}" for w in rounds[0]["old_weights"]]]
    rows += [[str(r["step"])] + [f"{w:.3f}" for w in r["new_weights"]] for r in rounds]
    return ["step"] + names, rows


def print_summary(summary: dict[str, Any], output_dir: str) -> None:
    """What the run did, on stdout: the weights per probe round, or the task experts trained; where it went."""
    header, rows = rounds_table(summary["rounds"])
    if rows:
        print("\n".join(format_table(header, rows, rule=False)))
    if summary.get("task_experts"):
        rows = [[e["task"], str(e["examples"]), f"{e['train_loss']:.4f}", e["path"]]
                for e in summary["task_experts"]]
        print("\n".join(format_table(["task", "examples", "train loss", "expert"], rows, rule=False)))
        print(f"moepatch finetune: done, {len(rows)} task experts in {output_dir}/experts (manifest.json)")
    else:
        print(f"moepatch finetune: done, {summary['global_step']} steps, model saved to {output_dir}")


def finetune(argv: Sequence[str] | None) -> int:
    """Parse, check, run and report; the process group is destroyed at the end (cleaner exits)."""
    model_args, data_args, sampling_args, training_args, expert_args = parse(argv)
    # check_model_structure looked up here, at call time: moepatch.finetune.check_model_structure is this module's
    check_inputs(model_args, data_args, sampling_args, training_args, expert_args,
                 check_structure=check_model_structure)
    summary = run(model_args, data_args, sampling_args, training_args, expert_args)
    if training_args.process_index == 0:
        print_summary(summary, training_args.output_dir)
    end_process_group()
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Parse and check every input, train, print the weights per round; returns the exit status.

    A bad argument returns 2 and a failure 1, each with a one-line message on stderr naming the argument or file
    (:func:`moepatch.errors.run_guarded`); ``--debug`` or ``MOEPATCH_DEBUG=1`` re-raises instead.  The process
    group is destroyed at the end (cleaner exits).
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = split_debug(argv)[0] or debug_requested()
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")

    def body() -> int:
        try:
            return finetune(argv)
        except UsageError as error:
            raise spelled_as_typed(error, argv) from error

    return run_guarded(PROG, body, debug=debug)


__all__ = ["DataArguments", "ModelArguments", "check_inputs", "check_model_structure", "expert_parallel_config",
           "finetune", "load_tokenizer", "main", "parse_arguments", "prepare_config", "print_summary",
           "read_initial_weights", "rounds_table", "run", "source_names", "source_paths"]
