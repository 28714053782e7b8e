"""Plain epochs: ``--dynamic_sampling false`` without ``--initial_weights``; the Trainer shuffles the sources'
examples together and runs ``--num_train_epochs`` (or ``--max_steps``) over them."""

from __future__ import annotations

from typing import Any

from moepatch.mixing.callback import ResumingTrainer
from moepatch.routing.bias_update import bias_update_callbacks
from moepatch.training.arguments import RunArguments
from moepatch.training.modes.base import PreparedRun
from moepatch.training.modes.base import RunMode
from moepatch.training.modes.base import check_epochs
from moepatch.training.modes.base import check_seed_and_resume
from moepatch.training.modes.base import train_and_save


class PlainMode(RunMode):
    """Every source's examples concatenated, as one dataset; the fallback when no other mode applies."""

    name = "plain epochs"

    @classmethod
    def applies(cls, args: RunArguments) -> bool:
        return True

    def check(self, args: RunArguments, names: list[str], config: Any) -> list[str]:
        check_epochs(args.training)
        check_seed_and_resume(args.training)
        return []

    def train(self, run: PreparedRun) -> dict[str, Any]:
        train = [example for source in run.sources for example in source.train]
        trainer = ResumingTrainer(model=run.model, args=run.args.training, train_dataset=train,
                                  data_collator=run.collator, callbacks=bias_update_callbacks(run.model))
        return train_and_save(run, trainer)


__all__ = ["PlainMode"]
