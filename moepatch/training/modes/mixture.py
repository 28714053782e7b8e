"""What the two mixture modes share: batches drawn from a weighted mixture of the sources
(:class:`~moepatch.mixing.sampler.DynamicMixtureSampler`, :class:`~moepatch.mixing.callback.MixtureTrainer`),
which is an endless stream, so the run needs ``--max_steps``, and resumes only from a checkpoint holding the
sampler's state.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from transformers import TrainerCallback
from transformers import TrainingArguments

from moepatch.data.instruction import DataSource
from moepatch.errors import UsageError
from moepatch.mixing.callback import STATE_FILE
from moepatch.mixing.callback import MixtureTrainer
from moepatch.mixing.callback import sampling_horizon
from moepatch.mixing.sampler import DynamicMixtureSampler
from moepatch.mixing.sampler import MixtureDataset
from moepatch.routing.bias_update import bias_update_callbacks
from moepatch.training.arguments import RunArguments
from moepatch.training.modes.base import PreparedRun
from moepatch.training.modes.base import RunMode
from moepatch.training.modes.base import SourcePaths
from moepatch.training.modes.base import train_and_save
from moepatch.training.sources import read_initial_weights


def check_endless_stream(training_args: TrainingArguments, reason: str) -> None:
    """A mixture never runs out of examples: the run needs its number of optimizer steps."""
    if training_args.max_steps <= 0:
        raise UsageError("--max_steps", f"{reason} draws an endless stream; give the number of optimizer steps "
                                        f"(> 0), got {training_args.max_steps}")


def check_mixture_resume(resume: Path | None) -> None:
    """A mixture resumes its draws from the sampler state its checkpoints hold (:data:`STATE_FILE`)."""
    if resume is not None and not (resume / STATE_FILE).is_file():
        raise UsageError("--resume_from_checkpoint", f"{resume} has no {STATE_FILE}: not a checkpoint of a "
                                                     "mixture run (its sampler state is needed to resume)")


class MixtureMode(RunMode):
    """Train on draws from a weighted mixture of the sources; subclasses say how (and whether) the weights move."""

    def __init__(self) -> None:
        self.initial: list[float] | None = None
        """``--initial_weights`` read against the tokenised sources (``None``: uniform)."""

    def check_sources(self, args: RunArguments, sources: list[DataSource], paths: SourcePaths) -> None:
        if args.data.initial_weights:
            self.initial = read_initial_weights(args.data.initial_weights, [source.name for source in sources],
                                                positive=args.data.dynamic_sampling)

    def callbacks(self, run: PreparedRun, sampler: DynamicMixtureSampler) -> list[TrainerCallback]:
        """Callbacks the mode adds to the Trainer besides the block's ``bias_update`` (none by default)."""
        return []

    def train(self, run: PreparedRun) -> dict[str, Any]:
        training_args = run.args.training
        if training_args.max_steps <= 0:  # checked by check_inputs; run() may be called without it
            raise UsageError("--max_steps", "a weighted mixture is an infinite stream; give the number of steps")
        sampler = DynamicMixtureSampler([len(s.train) for s in run.sources], self.initial,
                                        seed=run.args.sampling.sampling_seed, horizon=sampling_horizon(training_args))
        callbacks = bias_update_callbacks(run.model)  # the block's bias_update: biases move after every step
        callbacks.extend(self.callbacks(run, sampler))
        trainer = MixtureTrainer(
            model=run.model, args=training_args, train_dataset=MixtureDataset([s.train for s in run.sources]),
            data_collator=run.collator, callbacks=callbacks, mixture_sampler=sampler)
        return train_and_save(run, trainer, sampler)


__all__ = ["MixtureMode", "check_endless_stream", "check_mixture_resume"]
