"""Training a model loaded under transformers' expert parallelism with parameters moepatch added after the load."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any
from typing import cast

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.tensor import DTensor

from moepatch.lora_experts.routed import RoutedExpertSets


def expert_sharded_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The parameters of the routed-expert LoRA sets split over processes by expert parallelism (each process holds
    its own experts' sets: :class:`~moepatch.lora_experts.routed.RoutedExpertSets` with ``held`` set)."""

    return [parameter for module in model.modules() if isinstance(module, RoutedExpertSets)
            and module.held is not None for parameter in module.parameters()]


def replicate_added_parameters(model: nn.Module) -> int:
    """Make the trainable parameters FSDP2 does not manage (LoRA experts, anything moepatch added after the load)
    train as the weights transformers loaded do; returns how many parameters got hooks.  Call it on every rank after
    ``moepatch.apply`` on a model loaded with a ``DistributedConfig`` (``scripts/finetune.py --ep_size`` does).

    * Replicated parameters (LoRA experts on attention, dense and shared-expert projections, routers): start equal to
      rank 0's, and their gradients are averaged over all ranks, as FSDP2 does for the dense weights.
    * LoRA sets of routed experts, which expert parallelism splits (each process holds only its experts' sets): their
      gradient already sums every batch whose tokens reached the expert, through the dispatch's all-to-all, so they
      are **not** averaged over the ranks (which hold other experts); as transformers does for the expert weights,
      the sum is divided by the number of distinct batches (``dp_size``), and where several processes hold the same
      experts (``efsdp_size`` or ``dp_replicate_size`` > 1) the copies start equal and their gradients are summed
      over them first.

    Why: ``from_pretrained(distributed_config=...)`` shards (and later reduces gradients of) only the weights it
    loaded; adapters created by ``apply`` are plain tensors drawn from each rank's own RNG stream, so without this
    the ranks would start from different adapters and each train its own on its own batches.

    A no-op returning 0 where there is nothing to replicate over: ``torch.distributed`` is unavailable or not
    initialised (a single-process run), or its world has one process.
    """

    if not dist.is_available() or not dist.is_initialized() or dist.get_world_size() == 1:
        return 0
    world = dist.get_world_size()

    def average(parameter: nn.Parameter) -> None:
        grad = cast(torch.Tensor, parameter.grad)  # a post-accumulate-grad hook: the gradient is there
        dist.all_reduce(grad)
        grad.div_(world)

    added = [p for p in model.parameters() if p.requires_grad and not isinstance(p, DTensor)]
    sharded = {id(p) for p in expert_sharded_parameters(model)}
    for parameter in added:
        if id(parameter) not in sharded:
            dist.broadcast(parameter.data, src=0)
            parameter.register_post_accumulate_grad_hook(average)
    experts = [p for p in added if id(p) in sharded]
    if experts:
        hook = _expert_gradient_hook(model, experts)
        if hook is not None:
            for parameter in experts:
                parameter.register_post_accumulate_grad_hook(hook)
    return len(added)


def _expert_gradient_hook(model: nn.Module, parameters: list[nn.Parameter]
                          ) -> Callable[[nn.Parameter], None] | None:
    """The gradient hook of expert-sharded parameters (``None``: a single batch, one copy, nothing to do); makes
    the copies of each expert's sets equal first (broadcast from the first process of their group)."""

    config = getattr(model.config, "distributed_config", None)
    batches = getattr(config, "dp_size", 1) or 1
    replicas = getattr(config, "dp_replicate_size", 1) or 1
    copies = (getattr(config, "efsdp_size", 1) or 1) * replicas
    group = None
    if copies > 1:
        mesh_manager: Any = model._mesh_manager  # transformers' (a model loaded with a DistributedConfig)
        mesh = mesh_manager.get_mesh(("dp_replicate", "efsdp") if replicas > 1 else "efsdp")
        group = (mesh if mesh.ndim == 1 else mesh._flatten()).get_group()
        for parameter in parameters:
            dist.broadcast(parameter.data, group=group, group_src=0)
    if batches == 1 and group is None:
        return None

    def reduce(parameter: nn.Parameter) -> None:
        grad = cast(torch.Tensor, parameter.grad)  # a post-accumulate-grad hook: the gradient is there
        if group is not None:
            dist.all_reduce(grad, group=group)
        if batches > 1:
            grad.div_(batches)

    return reduce
