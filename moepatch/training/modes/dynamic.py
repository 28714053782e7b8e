"""Dynamic data mixing (Zhu et al., 2024): the mixture's weights move every ``--update_every`` steps from the routing
statistics of each source's probe examples (:class:`~moepatch.mixing.callback.DynamicSamplingCallback`)."""

from __future__ import annotations

from typing import Any

from transformers import PreTrainedModel
from transformers import TrainerCallback

from model_patches.structure import describe
from model_patches.structure import resolve_layer_indices
from moepatch.data.instruction import DataSource
from moepatch.errors import CommandError
from moepatch.errors import UsageError
from moepatch.mixing.callback import ROUNDS_FILE
from moepatch.mixing.callback import DynamicSamplingCallback
from moepatch.mixing.sampler import DynamicMixtureSampler
from moepatch.training.arguments import RunArguments
from moepatch.training.modes.base import PreparedRun
from moepatch.training.modes.base import SourcePaths
from moepatch.training.modes.base import check_seed_and_resume
from moepatch.training.modes.mixture import MixtureMode
from moepatch.training.modes.mixture import check_endless_stream
from moepatch.training.modes.mixture import check_mixture_resume
from moepatch.training.sources import read_initial_weights


class DynamicMixingMode(MixtureMode):
    """Re-weights at least two sources from their routing distances; every weight stays > 0 (log-space update)."""

    name = "dynamic mixing"

    @classmethod
    def applies(cls, args: RunArguments) -> bool:
        return args.data.dynamic_sampling

    def check(self, args: RunArguments, names: list[str], config: Any) -> list[str]:
        training_args, sampling_args = args.training, args.sampling
        if len(names) < 2:
            raise UsageError("--dynamic_sampling", f"dynamic mixing re-weights several sources; found one "
                                                   f"({names[0]!r}). Give more sources, or pass --dynamic_sampling "
                                                   "false to train on it")
        notes = []
        if len(names) == 2:
            notes.append(
                f"dynamic mixing with two sources ({names[0]!r}, {names[1]!r}): the weights cannot move apart — both "
                "sources are at the same distance from each other, so every update only smooths the weights towards "
                "uniform (c).  Use three or more sources, or --dynamic_sampling false with --initial_weights.")
        check_endless_stream(training_args, "dynamic mixing")
        if training_args.max_steps < sampling_args.update_every:
            notes.append(f"--update_every {sampling_args.update_every} > --max_steps {training_args.max_steps}: no "
                         "probe round will run, so the sources keep their initial weights")
        if args.data.initial_weights:
            read_initial_weights(args.data.initial_weights, names, positive=True)
        resume = check_seed_and_resume(training_args)
        check_mixture_resume(resume)
        output = args.output_dir
        if resume is None and (output / ROUNDS_FILE).exists():
            raise UsageError("--output_dir", f"{output} already holds a dynamic-mixing run ({ROUNDS_FILE}); this "
                                             "run's rounds would be appended to it. Choose a new folder, remove it, "
                                             "or pass --resume_from_checkpoint")
        return notes

    def check_sources(self, args: RunArguments, sources: list[DataSource], paths: SourcePaths) -> None:
        empty = [f"{paths[s.name][1] or paths[s.name][0]}" for s in sources if not s.probe]
        if empty:
            raise CommandError(f"dynamic mixing: no probe examples in {', '.join(empty)}")
        super().check_sources(args, sources, paths)

    def check_model(self, args: RunArguments, model: PreTrainedModel, model_type: str) -> None:
        try:  # checked on the skeleton already (check_inputs); the loaded model is what the rounds record
            resolve_layer_indices(describe(model), list(args.sampling.probe_layers), "probe_layers")
        except ValueError as error:
            raise UsageError("--probe_layers", str(error)) from error

    def callbacks(self, run: PreparedRun, sampler: DynamicMixtureSampler) -> list[TrainerCallback]:
        return [DynamicSamplingCallback(sampler, run.names, [s.probe for s in run.sources], run.collator,
                                        run.args.sampling)]


__all__ = ["DynamicMixingMode"]
