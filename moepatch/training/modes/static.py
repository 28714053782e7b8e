"""Static mixture: ``--dynamic_sampling false`` with ``--initial_weights``; batches are drawn from the sources with
fixed weights (the official ``prob_map`` without the probe rounds)."""

from __future__ import annotations

from typing import Any

from moepatch.training.arguments import RunArguments
from moepatch.training.modes.base import check_seed_and_resume
from moepatch.training.modes.mixture import MixtureMode
from moepatch.training.modes.mixture import check_endless_stream
from moepatch.training.modes.mixture import check_mixture_resume
from moepatch.training.sources import read_initial_weights


class StaticMixtureMode(MixtureMode):
    """Draws from fixed weights; a zero weight leaves a source out of the draws."""

    name = "static mixture"

    @classmethod
    def applies(cls, args: RunArguments) -> bool:
        return bool(args.data.initial_weights) and not args.data.dynamic_sampling

    def check(self, args: RunArguments, names: list[str], config: Any) -> list[str]:
        check_endless_stream(args.training, "a weighted mixture (--initial_weights)")
        if args.data.initial_weights:
            read_initial_weights(args.data.initial_weights, names, positive=False)
        check_mixture_resume(check_seed_and_resume(args.training))
        return []


__all__ = ["StaticMixtureMode"]
