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
from moepatch.errors import UsageError
from moepatch.training.arguments import ModelArguments

EXPERT_COUNT_FIELDS = ("num_experts", "num_local_experts", "n_routed_experts", "moe_num_experts")
"""Config fields that hold a family's routed-expert count (the first one present is read)."""


def expert_parallel_config(model_args: ModelArguments, config: Any) -> DistributedConfig | None:
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
    size = model_args.ep_size
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world != size:
        raise UsageError("--ep_size", f"{size} but this launch has {world} process(es): launch with torchrun "
                                      f"--nproc_per_node {size} (every process holds num_experts / {size} experts)")
    experts = next((getattr(config, name) for name in EXPERT_COUNT_FIELDS
                    if isinstance(getattr(config, name, None), int)), None)
    if experts is None:
        raise UsageError("--ep_size", f"the {config.model_type} config names no routed-expert count "
                                      f"({', '.join(EXPERT_COUNT_FIELDS)}): cannot shard its experts")
    if experts % size:
        raise UsageError("--ep_size", f"{size} does not divide the model's {experts} routed experts")
    return DistributedConfig(tp_size=1, fsdp_size=size, ep_size=size, ep_implementation=model_args.ep_implementation)


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
