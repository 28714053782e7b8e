"""Task experts (MELD, Yan et al., KDD 2024): ``--task_experts true`` trains one peft LoRA per source on the patched
base (:mod:`moepatch.task_experts.training`) instead of one model on a mixture, and records them in a manifest."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from transformers import PreTrainedModel

from moepatch.errors import FieldError
from moepatch.errors import UsageError
from moepatch.staged_output import write_text_atomically
from moepatch.task_experts.manifest import EXPERTS_FOLDER
from moepatch.task_experts.manifest import MANIFEST_NAME
from moepatch.task_experts.training import TaskExpertArguments
from moepatch.task_experts.training import linear_targets
from moepatch.task_experts.training import peft_remapped
from moepatch.task_experts.training import routed_target_parameters
from moepatch.task_experts.training import train_task_experts
from moepatch.training.arguments import FLAGS
from moepatch.training.arguments import RunArguments
from moepatch.training.distributed import barrier
from moepatch.training.modes.base import SUMMARY_FILE
from moepatch.training.modes.base import PreparedRun
from moepatch.training.modes.base import RunMode
from moepatch.training.modes.base import check_epochs
from moepatch.training.modes.base import check_seed_and_resume
from moepatch.training.toolkit import changed_fields

logger = logging.getLogger("moepatch.finetune")  # the name of earlier releases: logging configs keep working

EXPERT_FLAGS = {**FLAGS, "source_names": "--data_dir"}
"""How the task-expert checks' fields are spelled: the run's flags, and the source names, which come from the data
(``--data_dir``)."""


def refuse_unused_task_expert_flags(expert_args: TaskExpertArguments) -> None:
    """A task-expert flag in a run without ``--task_experts true`` would be silently ignored."""
    given = [f"--{name}" for name in changed_fields(expert_args) if name != "task_experts"]
    if given:
        raise UsageError(given[0], "only applies with --task_experts true")


def check_earlier_experts(output: Path, checkpoint: Path) -> None:
    """Experts of an earlier run in ``--output_dir`` must share the base (this run adds or replaces tasks)."""
    path = output / EXPERTS_FOLDER / MANIFEST_NAME
    if not path.is_file():
        return
    try:
        base = json.loads(path.read_text()).get("base")
    except (json.JSONDecodeError, UnicodeDecodeError, AttributeError):
        raise UsageError("--output_dir", f"{path} is not a task-experts manifest; choose another folder") from None
    if base != str(checkpoint.resolve()):
        raise UsageError("--output_dir", f"{output} holds task experts of another base ({base}); choose another "
                                         "folder")


class TaskExpertsMode(RunMode):
    """One adapter per source: no mixture, no resume, no dynamic-mixing option (each would be silently ignored)."""

    name = "task experts"

    def __init__(self) -> None:
        self.modules: list[str] = []
        """The linear projections the adapters reach (found on the loaded model)."""
        self.parameters: list[str] = []
        """The routed experts' fused parameters they reach (``--expert_routed_experts``)."""

    @classmethod
    def applies(cls, args: RunArguments) -> bool:
        return args.experts is not None and args.experts.task_experts

    def check(self, args: RunArguments, names: list[str], config: Any) -> list[str]:
        experts = args.experts
        assert experts is not None, "TaskExpertsMode.applies needs the task-expert arguments"
        if experts.expert_routed_experts and args.model.ep_size is not None:
            raise UsageError("--expert_routed_experts", "peft's LoRA on the fused routed experts (target_parameters) "
                                                        "does not run under expert parallelism (--ep_size): it adds a "
                                                        "LoRA delta of every expert to each rank's shard of the "
                                                        "experts (a DTensor), which torch refuses (mixed Tensor and "
                                                        "DTensor); under --ep_size adapt the linear projections only")
        self._check_arguments(args, names)
        block = getattr(config, "moepatch", None)
        if isinstance(block, dict) and block.get("bias_update"):
            raise UsageError("--task_experts", "the moepatch block has bias_update, which moves the base model's "
                                               "selection biases; a task expert is a LoRA adapter that does not save "
                                               "them, so its expert would not reproduce. Drop bias_update (e.g. "
                                               "with --moepatch_config) for --task_experts")
        check_earlier_experts(args.output_dir, Path(args.model.checkpoint))
        check_epochs(args.training)
        check_seed_and_resume(args.training)
        return []

    @staticmethod
    def _check_arguments(args: RunArguments, names: list[str]) -> None:
        """The other modes' options are refused (they would be ignored), then the task-expert flags themselves."""
        experts = args.experts
        assert experts is not None
        if args.data.initial_weights:
            raise UsageError("--initial_weights", "--task_experts trains one expert per source, not a weighted "
                                                  "mixture")
        changed = changed_fields(args.sampling)
        if changed:
            raise UsageError(f"--{changed[0]}", "a dynamic-mixing option; --task_experts trains one expert per "
                                                "source and runs no mixing, so it would be ignored")
        if args.training.resume_from_checkpoint:
            raise UsageError("--resume_from_checkpoint", "not supported with --task_experts (each task's run is "
                                                         "short: train the missing tasks with --tasks)")
        targets = list(experts.expert_target_modules or ())
        repeated = sorted({name for name in targets if targets.count(name) > 1})
        if repeated:
            raise UsageError("--expert_target_modules", f"{repeated} given twice; list each name once")
        try:
            experts.check(names)
        except FieldError as error:
            raise error.as_usage_error(EXPERT_FLAGS) from None

    def check_model(self, args: RunArguments, model: PreTrainedModel, model_type: str) -> None:
        """The linear modules and routed-expert parameters peft can reach, before anything is written; projections
        peft would rename into routed experts' target_parameters are left out (warned), and none left is refused."""
        experts = args.experts
        assert experts is not None
        try:
            modules = linear_targets(model, experts.expert_target_modules)
            self.parameters = routed_target_parameters(model) if experts.expert_routed_experts else []
        except FieldError as error:
            raise error.as_usage_error(EXPERT_FLAGS) from None
        remapped = peft_remapped(model, modules)
        if remapped:
            names = sorted({path.rsplit(".", 1)[-1] for path in remapped})
            kept = [path for path in modules if path not in remapped]
            if not kept:
                raise UsageError("--expert_target_modules", f"peft turns {names} of this {model_type} model into "
                                                            "its routed experts (target_parameters): nothing left to "
                                                            "adapt; name attention projections")
            logger.warning("task experts: leaving out %d %s projections (%s...): peft rewrites these names on %s into "
                           "target_parameters of the routed experts (its transformers-4 adapter conversion), so their "
                           "LoRA would not load back; use --expert_routed_experts for the experts",
                           len(remapped), "/".join(names), remapped[0], model_type)
            modules = kept
        self.modules = modules

    def train(self, run: PreparedRun) -> dict[str, Any]:
        """One peft LoRA per source.  A source without a dev file trains on all its records (its probe split exists
        for dynamic mixing, which task experts do not run); the router then has no held-out examples of it
        (``fit-router`` says so)."""
        args, output_dir = run.args, run.output_dir
        assert args.experts is not None
        training_args = args.training
        without_dev = {name for name, (_, probe) in run.paths.items() if probe is None}
        train_on = {source.name: source.train + source.probe for source in run.sources if source.name in without_dev}
        try:
            tasks = args.experts.check(run.names)
            manifest = train_task_experts(run.model, run.sources, tasks, run.collator, training_args, args.experts,
                                          str(Path(args.model.checkpoint).resolve()), self.modules, self.parameters,
                                          train_on)
        except FieldError as error:  # found while training: a failure (exit 1), named by its flag
            raise error.as_command_error(EXPERT_FLAGS) from error
        if training_args.process_index == 0:
            run.tokenizer.save_pretrained(str(output_dir / EXPERTS_FOLDER))
        summary = {"sources": run.names, "prompt_format": run.prompt_format,
                   "task_experts": manifest.to_dict()["experts"], "global_step": 0, "rounds": []}
        if training_args.process_index == 0:
            write_text_atomically(output_dir / SUMMARY_FILE, json.dumps(summary, indent=1))
            manifest.complete = True  # recorded last: every expert, the tokenizer and the summary are on disk
            manifest.write()
        barrier()  # under torchrun every rank returns once rank 0 has written the whole run folder
        return summary


__all__ = ["EXPERT_FLAGS", "TaskExpertsMode", "check_earlier_experts", "refuse_unused_task_expert_flags"]
