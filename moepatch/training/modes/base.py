"""The interface of a run mode, what a mode is handed to train, and the checks and steps several modes share.

A run mode is one way the fine-tuning runner trains on its sources (dynamic mixing, a static mixture, plain epochs,
task experts).  The runner owns everything the modes have in common — parsing, the checkpoint and its block, the
tokenizer, reading and tokenising the sources, loading the model, the synthetic data — and asks the mode, at fixed
points, what only it knows: its own argument checks before anything is loaded (:meth:`RunMode.check`), its checks of
the tokenised sources (:meth:`RunMode.check_sources`) and of the loaded model (:meth:`RunMode.check_model`) before
anything is written, and how it trains and what it reports (:meth:`RunMode.train`).
"""

from __future__ import annotations

import json
from abc import ABC
from abc import abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from typing import ClassVar

from transformers import DataCollatorForSeq2Seq
from transformers import PreTrainedModel
from transformers import TrainingArguments

from moepatch.data.instruction import DataSource
from moepatch.errors import UsageError
from moepatch.mixing.callback import ROUNDS_FILE
from moepatch.mixing.callback import ResumingTrainer
from moepatch.mixing.sampler import DynamicMixtureSampler
from moepatch.staged_output import write_text_atomically
from moepatch.training.arguments import RunArguments
from moepatch.training.distributed import zero_stage

SUMMARY_FILE = "moepatch_finetune_summary.json"
"""What every run writes into its output folder last: the sources, the losses, the rounds, the final weights."""

SourcePaths = dict[str, tuple[Path, Path | None]]
"""``{source name: (train file or folder, probe file or None)}``, as :func:`~moepatch.training.source_paths` gives."""


@dataclass
class PreparedRun:
    """Everything loaded and checked before a mode trains: nothing of the run has been written yet but the
    synthetic data (when the run generates it)."""

    args: RunArguments
    model: PreTrainedModel
    tokenizer: Any
    sources: list[DataSource]
    paths: SourcePaths
    collator: DataCollatorForSeq2Seq
    prompt_format: str

    @property
    def output_dir(self) -> Path:
        return self.args.output_dir

    @property
    def names(self) -> list[str]:
        """The sources' names, in the order of every per-source list (weights, matrices, summary)."""
        return [source.name for source in self.sources]

    def summary(self) -> dict[str, Any]:
        """The part of the summary every trainer-based mode shares: what it trained on."""
        return {"sources": self.names, "prompt_format": self.prompt_format,
                "train_examples": [len(s.train) for s in self.sources],
                "dropped_train_examples": [s.dropped for s in self.sources],
                "probe_examples": [len(s.probe) for s in self.sources]}


class RunMode(ABC):
    """One way of training a run's sources; the runner picks the first of :data:`~moepatch.training.modes.MODES`
    whose :meth:`applies` is true.  A mode object lives for one run, so a check may keep what it found for
    :meth:`train` (the initial weights read, the modules an adapter reaches)."""

    name: ClassVar[str]
    """How the mode is called in messages and docs (``dynamic mixing``)."""

    @classmethod
    @abstractmethod
    def applies(cls, args: RunArguments) -> bool:
        """Whether the arguments ask for this mode."""

    @abstractmethod
    def check(self, args: RunArguments, names: list[str], config: Any) -> list[str]:
        """The mode's own checks of the arguments, before anything is loaded (``config``: the checkpoint's, with
        every override); returns notes to warn once every check has passed.

        Raises:
            UsageError: naming the argument.
        """

    def check_sources(self, args: RunArguments, sources: list[DataSource], paths: SourcePaths) -> None:
        """Checks of the tokenised sources, before the model is loaded (none by default)."""
        return None

    def check_model(self, args: RunArguments, model: PreTrainedModel, model_type: str) -> None:
        """Checks of the loaded model, before anything is written (none by default)."""
        return None

    @abstractmethod
    def train(self, run: PreparedRun) -> dict[str, Any]:
        """Train, save what the mode produces into the output folder, and return the run's summary."""


def check_epochs(training_args: TrainingArguments) -> None:
    """A run of epochs (no weighted mixture) needs a number of them, or a number of steps."""
    if training_args.max_steps <= 0 and not training_args.num_train_epochs > 0:
        raise UsageError("--num_train_epochs", f"expected > 0 (or --max_steps > 0), got "
                                               f"{training_args.num_train_epochs}")


def check_seed_and_resume(training_args: TrainingArguments) -> Path | None:
    """``--seed`` fits the generators it seeds, and ``--resume_from_checkpoint`` (when given) is a folder; returns
    that folder."""
    if not 0 <= training_args.seed < 2**32:
        raise UsageError("--seed", f"expected an integer in [0, 2**32), got {training_args.seed}")
    resume = training_args.resume_from_checkpoint
    if not resume:
        return None
    folder = Path(resume)
    if not folder.is_dir():
        raise UsageError("--resume_from_checkpoint", f"{folder}: no such checkpoint folder")
    return folder


def train_and_save(run: PreparedRun, trainer: ResumingTrainer,
                   sampler: DynamicMixtureSampler | None = None) -> dict[str, Any]:
    """Train with ``trainer`` (resuming where asked), save the model and the tokenizer, and write the summary: the
    losses, the world size and ZeRO stage it ran with, the probe rounds and, for a mixture, the final weights."""
    training_args, output_dir = run.args.training, run.output_dir
    result = trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
    trainer.save_model(str(output_dir))
    if trainer.is_world_process_zero():
        run.tokenizer.save_pretrained(str(output_dir))
    summary = run.summary()
    summary["train_loss"] = result.training_loss
    summary["loss_history"] = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    summary["world_size"] = training_args.world_size
    summary["deepspeed_zero_stage"] = zero_stage(trainer)
    summary["global_step"] = trainer.state.global_step
    rounds_path = output_dir / ROUNDS_FILE
    summary["rounds"] = (
        [json.loads(line) for line in rounds_path.read_text().splitlines() if line.strip()]
        if rounds_path.exists() else []
    )
    if sampler is not None:
        summary["final_weights"] = sampler.weights
    if trainer.is_world_process_zero():
        write_text_atomically(output_dir / SUMMARY_FILE, json.dumps(summary, indent=1))
    return summary


__all__ = ["SUMMARY_FILE", "PreparedRun", "RunMode", "SourcePaths", "check_epochs", "check_seed_and_resume",
           "train_and_save"]
