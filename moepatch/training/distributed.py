"""What a fine-tuning run needs from its launcher (``torchrun``, ``deepspeed``, ``accelerate launch``): the expert
parallel layout ``--ep_size`` asks for, DeepSpeed's view of the process group, barriers, and the ZeRO stage it ran
with.  Every function is a no-op in a plain single-process run.
"""

from __future__ import annotations

import os
from typing import Any

import torch.distributed as dist
from transformers import DistributedConfig
from transformers import TrainingArguments

from moepatch.compat import distributed_ready
from moepatch.config import MoePatchConfig
from moepatch.errors import CommandError
from moepatch.errors import UsageError
from moepatch.expert_parallel.layout import AUTO_EP_IMPLEMENTATION
from moepatch.expert_parallel.layout import EXPERT_COUNT_FIELDS
from moepatch.expert_parallel.layout import ep_plan_problem
from moepatch.expert_parallel.layout import ep_size_problem
from moepatch.expert_parallel.placement import config_expert_facts
from moepatch.expert_parallel.placement import placement_mismatch
from moepatch.training.arguments import EP_IMPLEMENTATIONS
from moepatch.training.arguments import ModelArguments


def expert_parallel_config(model_args: ModelArguments, config: Any) -> DistributedConfig | None:
    """The ``DistributedConfig`` ``--ep_size`` asks for (``None`` without it), checked before any weight is read.

    Why here and not in ``from_pretrained``: transformers only finds an unfit EP size while sharding (a rank count
    that does not divide the experts) or not at all (a launch with another number of processes hangs or shards
    wrongly; a checkpoint renumbered by ``moepatch place --write-permuted`` for another EP size loads with its
    planned groups split over ranks), after the data is read; the run refuses each by name first.

    The layout is expert parallelism over data-parallel ranks (``tp_size=1, fsdp_size = ep_size``: each rank trains
    on its own batches, FSDP2 shards the dense weights and averages their gradients, the experts are split over the
    ranks and tokens travel to them). Not ``tp_size = ep_size`` (every rank the same batch): the Trainer hands that
    layout to accelerate as a ``ParallelismConfig``, which accelerate refuses on CPU processes. The launch must have
    exactly ``ep_size`` processes.

    The dispatch is ``--ep_implementation``; left at ``auto`` (not given), the ``ep_implementation`` of the moepatch
    block in ``config`` (the checkpoint's config.json, or ``--moepatch_config``'s block) when it has one.

    The checks run in this order: the checkpoint's ``expert_placement.json``, the model (``--ep_size`` divides its
    routed experts; it has an expert-parallel plan), then the launch's world size.

    Raises:
        UsageError: naming ``--ep_size`` (a checkpoint renumbered for another EP size, with
            ``expert_placement.json``; an expert count it does not divide; a model without an expert-parallel plan;
            a world size it does not fit) or ``--ep_implementation`` (the block's dispatch cannot train).
        CommandError: the checkpoint's ``expert_placement.json`` is malformed or not this checkpoint's (exit status
            1, naming the file and the field).
    """
    if model_args.ep_size is None:
        return None
    size = model_args.ep_size
    num_experts, layers = config_expert_facts(config)
    try:  # the copy's own planned size says the most: checked first
        problem = placement_mismatch(model_args.checkpoint, size, num_experts=num_experts, layers=layers)
    except ValueError as error:  # a malformed record, or another checkpoint's: a file's content, named with it
        raise CommandError(f"{error} (--model_name_or_path)") from None
    if problem is not None:
        raise UsageError("--ep_size", problem)
    problem = ep_size_problem(config, size)  # what the model allows, before the launch is blamed
    if problem is not None:
        raise UsageError("--ep_size", problem)
    layout = DistributedConfig(tp_size=1, fsdp_size=size, ep_size=size)
    problem = ep_plan_problem(config, layout)
    if problem is not None:
        raise UsageError("--ep_size", f"{size}: {problem}; leave --ep_size out")
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world != size:
        raise UsageError("--ep_size", f"{size} but this launch has {world} process(es): launch with torchrun "
                                      f"--nproc_per_node {size} (every process holds num_experts / {size} experts)")
    implementation = model_args.ep_implementation
    if implementation == AUTO_EP_IMPLEMENTATION:
        chosen = _block_ep_implementation(config)
        if chosen is not None and chosen not in EP_IMPLEMENTATIONS:
            raise UsageError("--ep_implementation", f"not given, and the moepatch block's ep_implementation "
                                                    f"{chosen!r} cannot train (expected one of "
                                                    f"{', '.join(EP_IMPLEMENTATIONS)}): give --ep_implementation")
        implementation = chosen or implementation
    layout.ep_implementation = implementation
    return layout


def _block_ep_implementation(config: Any) -> str | None:
    """The ``ep_implementation`` of the moepatch block in ``config``, as the block's own parser reads it (``None``:
    none, or a block that does not parse, which :func:`~moepatch.training.preflight.check_model_structure` refuses
    with its problems, naming its file)."""
    try:
        return MoePatchConfig.from_model(config).ep_implementation
    except ValueError:
        return None


def init_deepspeed_comm(training_args: TrainingArguments) -> None:
    """Make DeepSpeed's communication layer see the process group before the model is built.

    Under ZeRO-3 ``from_pretrained`` builds the model inside ``deepspeed.zero.Init``, which sizes batches with
    DeepSpeed's own world size — 1 unless ``deepspeed.init_distributed`` ran.  With ``use_cpu`` the Trainer's set-up
    initialises torch.distributed (gloo) but not DeepSpeed's view of it, and the batch-size check then fails.
    """
    if not training_args.deepspeed:
        return
    _ = training_args.device  # the Trainer's distributed set-up (torch.distributed, gloo on CPU)
    import deepspeed  # optional and slow to import: only runs given --deepspeed need it

    if distributed_ready():
        deepspeed.init_distributed(dist_backend=dist.get_backend())


def barrier() -> None:
    """Wait for every process of the launch (nothing to wait for in a single process)."""
    if distributed_ready():
        dist.barrier()


def end_process_group() -> None:
    """Let every process finish, then destroy the process group (cleaner exits than leaving it to interpreter
    shutdown)."""
    if distributed_ready():
        dist.barrier()
        dist.destroy_process_group()


def zero_stage(trainer: Any) -> int | None:
    """The ZeRO stage DeepSpeed ran with (``None`` without DeepSpeed): proof a launcher did not drop it."""
    if not getattr(trainer, "is_deepspeed_enabled", False):
        return None
    return int(trainer.accelerator.state.deepspeed_plugin.zero_stage)


__all__ = ["EXPERT_COUNT_FIELDS", "barrier", "end_process_group", "expert_parallel_config", "init_deepspeed_comm",
           "zero_stage"]
