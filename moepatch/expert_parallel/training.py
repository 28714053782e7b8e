"""Training a model loaded under transformers' expert parallelism with parameters moepatch added after the load."""

from __future__ import annotations

from torch import nn


def replicate_added_parameters(model: nn.Module) -> int:
    """Keep the trainable parameters FSDP2 does not manage (LoRA experts, anything moepatch added after the load)
    data-parallel: start them equal to rank 0's and average their gradients over the ranks; returns how many.
    Call it on every rank after ``moepatch.apply`` on a model loaded with a ``DistributedConfig``
    (``scripts/finetune.py --ep_size`` does).

    Why: ``from_pretrained(distributed_config=...)`` shards (and later reduces gradients of) only the weights it
    loaded; adapters created by ``apply`` are plain tensors drawn from each rank's own RNG stream, so without this
    the ranks would start from different adapters and each train its own on its own batches.
    """
    import torch.distributed as dist
    from torch.distributed.tensor import DTensor

    world = dist.get_world_size()

    def average(parameter: nn.Parameter) -> None:
        dist.all_reduce(parameter.grad)
        parameter.grad.div_(world)

    added = [p for p in model.parameters() if p.requires_grad and not isinstance(p, DTensor)]
    for parameter in added:
        dist.broadcast(parameter.data, src=0)
        parameter.register_post_accumulate_grad_hook(average)
    return len(added)
