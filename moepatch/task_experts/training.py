"""Train one peft LoRA per task (MELD's experts) on a patched MoE base, one task after another.

The base is loaded once, with moepatch's patches from its config.json active (frozen routers, C2R, statistics): each
task wraps it in a fresh peft LoRA, trains on that task's examples with the HF Trainer, saves the adapter to
``OUT/experts/<task>/`` and unwraps it again (``unload``: the base modules come back untouched), so every expert
starts from the same base.  LoRA reaches attention, dense and shared projections by name (MELD's "all linear":
q, k, v, o, gate, up, down) — never a router — and, with ``routed_experts``, the fused routed experts through peft's
``target_parameters`` (one LoRA per routed expert).

Under ``torchrun`` (data parallelism, or transformers' expert parallelism with ``scripts/finetune.py --ep_size``)
every rank runs every step of every task, since each forward of an expert-parallel model is a collective; the
adapter is gathered on every rank (peft's own save gathers the whole model's sharded weights, a collective that
rank 0 alone would wait in forever) and rank 0 alone writes the run folder, each expert through a staged folder.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from dataclasses import field
from pathlib import Path
from typing import TYPE_CHECKING
from typing import Any

import torch
import torch.distributed as dist
from peft import LoraConfig
from peft import get_peft_model
from torch import nn
from torch.distributed.tensor import DTensor
from transformers import Trainer

from model_patches.expert_storage import storage_of
from model_patches.structure import describe
from model_patches.structure import router_modules
from moepatch.compat import distributed_ready
from moepatch.errors import FieldError
from moepatch.errors import FieldProblems
from moepatch.expert_parallel.training import replicate_added_parameters
from moepatch.staged_output import staged_folder
from moepatch.task_experts.adapter_files import quiet_peft
from moepatch.task_experts.manifest import EXPERTS_FOLDER
from moepatch.task_experts.manifest import MANIFEST_NAME
from moepatch.task_experts.manifest import TASK_NAME
from moepatch.task_experts.manifest import ExpertManifest
from moepatch.task_experts.manifest import TaskExpert
from moepatch.task_experts.manifest import read_manifest

if TYPE_CHECKING:
    from transformers import PreTrainedModel

logger = logging.getLogger("moepatch.task_experts")
MELD_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass
class TaskExpertArguments:
    """``scripts/finetune.py`` flags of per-task expert training (MELD: r 16, α 32, dropout 0, all linear)."""

    task_experts: bool = field(default=False, metadata={
        "help": "Train one peft LoRA per data source (task) instead of one model on the mixture; writes "
                "OUT/experts/<task>/ and OUT/experts/manifest.json."})
    tasks: list[str] | None = field(default=None, metadata={"help": "Only these sources (default: every source)."})
    expert_r: int = field(default=16, metadata={"help": "LoRA rank of each expert (MELD: 16)."})
    expert_alpha: float = field(default=32.0, metadata={"help": "LoRA alpha (MELD: 32)."})
    expert_dropout: float = field(default=0.0, metadata={"help": "LoRA dropout (MELD: 0)."})
    expert_target_modules: list[str] = field(default_factory=lambda: list(MELD_TARGETS), metadata={
        "help": "Projection names (module path suffixes); routers are never adapted."})
    expert_routed_experts: bool = field(default=False, metadata={
        "help": "Also adapt the fused routed experts (peft target_parameters, one LoRA per routed expert)."})

    def check(self, source_names: Sequence[str]) -> list[str]:
        """The tasks to train, every field checked (:class:`~moepatch.errors.FieldError` naming it; a bad source
        name is ``source_names``'s)."""
        problems = []  # every bad value of the adapter at once
        if self.expert_r < 1:
            problems.append(("expert_r", f"expected an integer >= 1, got {self.expert_r}"))
        if not (math.isfinite(self.expert_alpha) and self.expert_alpha > 0):
            problems.append(("expert_alpha", f"expected a number > 0, got {self.expert_alpha}"))
        if not (math.isfinite(self.expert_dropout) and 0 <= self.expert_dropout < 1):
            problems.append(("expert_dropout", f"expected a number in [0, 1), got {self.expert_dropout}"))
        if not self.expert_target_modules or not all(name.strip() for name in self.expert_target_modules):
            problems.append(("expert_target_modules", "expected one or more projection names"))
        if len(problems) == 1:
            raise FieldError(*problems[0])
        if problems:
            raise FieldProblems("task expert arguments", problems)
        bad = [name for name in source_names if not TASK_NAME.fullmatch(name)]
        if bad:
            raise FieldError("source_names", f"source names {bad}: a task name is a folder and a peft adapter name "
                                             "(letters, digits, '_', '-'; no dot)")
        tasks = list(self.tasks) if self.tasks else list(source_names)
        unknown = [task for task in tasks if task not in source_names]
        if unknown:
            raise FieldError("tasks", f"unknown task(s) {unknown}; the data has {list(source_names)}")
        if len(set(tasks)) != len(tasks):
            raise FieldError("tasks", f"a task is given twice in {tasks}")
        return tasks


def routed_target_parameters(model: nn.Module) -> list[str]:
    """peft ``target_parameters`` reaching the routed experts' fused tensors (``mlp.experts.gate_up_proj``...), from
    the family's storage adapter; :class:`~moepatch.errors.FieldError` on ``expert_routed_experts`` when peft has
    no layout for this family's experts."""
    moe = describe(model)
    storage = storage_of(moe)
    names = {id(module): path for path, module in model.named_modules()}
    found: list[str] = []
    for projection in storage.projections(moe):
        layout = storage.peft_parameter(projection.module, projection.projection)
        if layout is None:
            raise FieldError("expert_routed_experts", f"peft has no target_parameters layout for "
                                                      f"{type(projection.module).__name__} routed experts "
                                                      f"({storage.kind})")
        path = names[id(projection.module)]
        suffix = ".".join(part for part in path.split(".") if not part.isdigit() and part not in ("model", "layers"))
        name = f"{suffix}.{layout[0]}"
        if name not in found:
            found.append(name)
    if not found:
        raise FieldError("expert_routed_experts", "the model has no routed experts peft can reach")
    return found


def linear_targets(model: nn.Module, names: Sequence[str]) -> list[str]:
    """Full paths of the ``nn.Linear`` projections whose path ends with one of ``names``, routers left out.

    Given to peft as paths, not names: a name alone would also reach modules peft refuses (MoLM's attention
    experts) and, on families whose routed experts were per-expert ``nn.Linear`` before transformers 5 fused them
    (Qwen3-MoE, OLMoE), peft turns ``gate_proj`` / ``up_proj`` / ``down_proj`` into ``target_parameters`` on the
    routed experts — which moepatch adapts only when asked (``expert_routed_experts``).  None found is a
    :class:`~moepatch.errors.FieldError` on ``expert_target_modules``."""
    routers = {id(module) for module in router_modules(describe(model))}
    found = [path for path, module in model.named_modules()
             if isinstance(module, nn.Linear) and id(module) not in routers
             and any(path == name or path.endswith("." + name) for name in names)]
    if not found:
        raise FieldError("expert_target_modules", f"no nn.Linear projection of {type(model).__name__} is named "
                                                  f"{list(names)}")
    return found


def peft_remapped(model: PreTrainedModel, modules: Sequence[str]) -> list[str]:
    """The ``modules`` peft would not keep as ``target_modules`` on this model.

    peft (≥ 0.18, transformers 5) rewrites every target ending in ``gate_proj`` / ``up_proj`` / ``down_proj`` into
    ``target_parameters`` on the fused routed experts for the model types whose experts transformers 5 fused (its
    conversion for adapters trained on transformers 4) — also dense and shared-expert MLP projections of those names
    (DeepSeek-V2's first dense layers, HunYuan's shared expert), whose LoRA would then neither train as asked nor load
    back.  Asked of peft's own conversion, on a copy of the config."""
    try:
        from peft.utils.transformers_weight_conversion import convert_peft_config_for_transformers
        from peft.utils.transformers_weight_conversion import get_model_conversion_mapping
    except ImportError:  # a peft without the conversion keeps what it is given
        return []
    config = LoraConfig(target_modules=list(modules))
    convert_peft_config_for_transformers(config, model=model, conversions=get_model_conversion_mapping(model))
    kept = set(config.target_modules or [])
    return [module for module in modules if module not in kept]


def lora_config(args: TaskExpertArguments, target_modules: list[str], target_parameters: list[str]) -> Any:
    return LoraConfig(r=args.expert_r,
                      lora_alpha=args.expert_alpha,  # type: ignore[arg-type]  # peft annotates int; any α > 0 (α/r)
                      lora_dropout=args.expert_dropout, target_modules=target_modules,
                      target_parameters=target_parameters or None, bias="none", task_type="CAUSAL_LM")


def train_task_experts(model: PreTrainedModel, sources: Sequence[Any], tasks: Sequence[str], collator: Any,
                       training_args: Any, args: TaskExpertArguments, base: str, modules: list[str] | None = None,
                       parameters: list[str] | None = None, train_on: dict[str, list[Any]] | None = None
                       ) -> ExpertManifest:
    """Train the experts of ``tasks`` (``sources``: :class:`moepatch.data.instruction.DataSource`) one after
    another and write the manifest, still marked incomplete (the caller marks it complete after its last file);
    returns it.

    A first run into ``OUT/experts`` writes as it goes: the manifest (incomplete) first, then each expert and the
    manifest after it, so a run killed half-way keeps what it finished and is named as unfinished.  A run into a
    folder that already holds a run (retraining some tasks, or finishing a killed run) changes nothing of it until
    every expert is trained: each new expert waits in a staged folder beside its target; then the manifest is
    written (incomplete), the earlier router, merges and vLLM export — which no longer describe the experts — are
    removed, and the new experts move into place.  A re-run that fails (or is interrupted) while training leaves
    the folder exactly as it was.

    ``modules``: the linear projections (default
    :func:`linear_targets` of ``args.expert_target_modules``); ``parameters``: peft ``target_parameters`` (routed
    experts; default: :func:`routed_target_parameters` when ``args.expert_routed_experts``); ``train_on``: the
    examples of a task where they are not its source's ``train`` split."""
    output = Path(training_args.output_dir) / EXPERTS_FOLDER
    by_name = {source.name: source for source in sources}
    if parameters is None:
        parameters = routed_target_parameters(model) if args.expert_routed_experts else []
    writer = training_args.process_index == 0  # the one process that writes the run folder
    manifest = ExpertManifest(base, model.config.model_type, model.config.hidden_size, [], output, complete=False)
    rerun = (output / MANIFEST_NAME).is_file()  # an earlier run's folder: untouched until every expert is trained
    _earlier_experts(output, manifest, tasks)  # other tasks' experts of an earlier run stay
    manifest.planned = sorted({expert.task for expert in manifest.experts} | set(tasks))
    _barrier()  # every rank read the earlier manifest before rank 0 replaces it
    if writer and not rerun:
        manifest.write()  # incomplete from the start: a run killed from here on is named as unfinished
    train_on = train_on or {}
    if modules is None:
        modules = linear_targets(model, args.expert_target_modules)
    names = sorted({path.rsplit(".", 1)[-1] for path in modules})
    runs = output.parent / "task_runs"  # the Trainer's own output_dir of each task (nothing is saved there)
    runs_existed = runs.exists()
    try:
        with contextlib.ExitStack() as staged:  # a re-run's experts, moved into place when the block ends well
            _train_each(model, by_name, tasks, collator, training_args, args, modules, parameters, train_on, manifest,
                        names, staged if rerun else None, writer)
            if writer and rerun:
                manifest.write()  # incomplete, listing the new experts: from here a kill is named as unfinished
                _remove_stale(output, tasks)
    finally:
        if writer:
            for task in tasks:
                shutil.rmtree(runs / task, ignore_errors=True)
            if runs.is_dir() and not any(runs.iterdir()) and not runs_existed:
                runs.rmdir()
    return manifest


def _train_each(model: nn.Module, by_name: dict[str, Any], tasks: Sequence[str], collator: Any, training_args: Any,
                args: TaskExpertArguments, modules: list[str], parameters: list[str], train_on: dict[str, list[Any]],
                manifest: ExpertManifest, names: list[str], staged: contextlib.ExitStack | None,
                writer: bool) -> nn.Module:
    """Train and save each task's expert (see :func:`train_task_experts`); ``staged``: a re-run, whose experts wait
    in staged folders entered on it (and whose manifest is written once, at the end).  Returns the base model."""
    output = manifest.folder
    for task in tasks:
        source = by_name[task]
        try:
            with quiet_peft():
                peft_model = get_peft_model(model, lora_config(args, modules, parameters))
        except ValueError as error:
            raise FieldError("expert_target_modules", str(error)) from None
        folder = output / task
        task_args = dataclasses.replace(training_args, output_dir=str(output.parent / "task_runs" / task))
        examples = train_on.get(task, source.train)
        logger.info("task expert %r: %d examples", task, len(examples))
        trainer = Trainer(model=peft_model, args=task_args, train_dataset=examples, data_collator=collator)
        _replicate_adapter(peft_model, Trainer)
        result = trainer.train()
        state = adapter_state(peft_model)  # on every rank: gathering a sharded adapter is a collective
        loss = _mean_over_ranks(result.training_loss)  # each rank's batches; also: every rank is done training
        if writer and staged is not None:  # a re-run: moved into place once every expert is trained
            peft_model.save_pretrained(str(staged.enter_context(staged_folder(folder))), state_dict=state)
        elif writer:
            with staged_folder(folder) as scratch:
                peft_model.save_pretrained(str(scratch), state_dict=state)
        model = peft_model.unload()  # the base modules back, without the LoRA: the next task starts from the base
        manifest.experts.append(TaskExpert(task, task, args.expert_r, args.expert_alpha, names, parameters, loss,
                                           len(examples)))
        manifest.experts.sort(key=lambda expert: expert.task)
        if writer and staged is None:
            manifest.write()  # after each task: a run stopped half-way keeps what it finished
            shutil.rmtree(output.parent / "task_runs" / task, ignore_errors=True)  # nothing saved there
    return model


def adapter_state(peft_model: nn.Module) -> dict[str, Any]:
    """The LoRA tensors of ``peft_model`` (its state-dict keys), whole, for ``save_pretrained(state_dict=...)``.

    On a model loaded under transformers' expert parallelism peft's own ``save_pretrained`` gathers every sharded
    weight of the *whole* model (``DTensor.full_tensor``, a collective) before picking the adapter's: called on rank
    0 alone it waits forever for the others, and called everywhere it gathers every routed expert on every rank.
    Here only the adapter's own tensors are gathered, on every rank (call it on all of them), so rank 0 then saves
    without any collective.  Without a process group it is just the adapter's tensors."""
    state = {}
    for key, tensor in peft_model.state_dict().items():
        if "lora_" in key:  # peft's LoRA tensors (lora_A / lora_B / lora_embedding_* / lora_magnitude_vector)
            state[key] = (tensor.full_tensor() if isinstance(tensor, DTensor) else tensor).detach()
    return state


def _replicate_adapter(peft_model: nn.Module, trainer_class: type) -> None:
    """A transformers whose Trainer does not keep adapters added to a distributed-loaded model data-parallel
    (``_sync_replicated_trainable_parameters``, transformers >= 5.2x) gets moepatch's own: equal start, gradients
    averaged over the ranks."""
    if (distributed_ready() and getattr(peft_model.config, "distributed_config", None) is not None
            and not hasattr(trainer_class, "_sync_replicated_trainable_parameters")):
        replicate_added_parameters(peft_model)


def _mean_over_ranks(value: float) -> float:
    """``value`` averaged over the processes (the Trainer's ``training_loss`` is partly this rank's own batches)."""
    if not distributed_ready():
        return value
    total = torch.tensor([float(value)], dtype=torch.float64)
    dist.all_reduce(total)
    return float(total.item() / dist.get_world_size())


def _barrier() -> None:
    if distributed_ready():
        dist.barrier()


def _earlier_experts(output: Path, manifest: ExpertManifest, tasks: Sequence[str]) -> list[TaskExpert]:
    """Experts an earlier run wrote into ``output`` for other tasks (kept in ``manifest``), when they were trained on
    the same base.  Nothing is removed here: the earlier router, merges and vLLM export go only once the new experts
    are trained (:func:`_remove_stale`)."""
    if not (output / MANIFEST_NAME).is_file():
        return []
    earlier = read_manifest(output, check_files=False, allow_incomplete=True)
    if (earlier.base, earlier.model_type) != (manifest.base, manifest.model_type):
        raise FieldError("output_dir", f"{output} holds experts of another base ({earlier.base}); choose another "
                                       "folder")
    kept = [expert for expert in earlier.experts if expert.task not in tasks]
    manifest.experts.extend(kept)
    return kept


def _remove_stale(output: Path, tasks: Sequence[str]) -> None:
    """The router, merges and vLLM export of an earlier run in ``output``: they no longer describe the retrained
    experts ``tasks``.  Called once the new experts are trained and the manifest names the run as unfinished."""
    stale = [output / name for name in ("router", "merged", "vllm") if (output / name).exists()]
    for folder in stale:
        shutil.rmtree(folder)
    if stale:
        logger.warning("task experts: removed %s of the earlier run (retrained experts %s); fit the router and "
                       "merge again", ", ".join(folder.name for folder in stale), list(tasks))
