"""Run under torchrun (gloo, CPU): moepatch's features applied to a tiny Qwen2-MoE loaded under expert parallelism,
against the single-process model with the same block.

Usage: ``features_worker.py CHECKPOINT OUTPUT LAYOUT[,LAYOUT...] IMPLEMENTATION[,IMPLEMENTATION...]``

LAYOUT ``shared`` (``tp_size = ep_size = N``, ``tp_plan={}``: every rank holds the same batch) or ``separate``
(``tp_size=1, fsdp_size = ep_size = N``: each rank its own batch), as in ``ep_worker.py``. IMPLEMENTATION is an
``ep_implementation`` (``"moepatch_dedup"``, ``"all_to_all"``). One EP model and one reference per layout and
implementation; each feature is applied with :func:`moepatch.apply`, measured and removed again, so the launch pays
the start-up once for every feature.

Per feature the rank writes figures the test asserts on (``rank{r}.json``):

- ``freeze``: the names frozen on the EP model and on the reference; after one SGD step whether every router is
  unchanged (gathered) and whether some other weight moved;
- ``stats``: this rank's ``RoutingRecorder`` counts and the reference's counts of this rank's batch; after
  ``recorder.all_reduce()`` the summed counts and the reference's counts of every batch summed;
- ``c2r_top_t_<t>``: max abs logits difference to the single-process C2R model;
- ``balance_loss``: C2R (top_t 2) with ``output_router_logits``: the aux loss and the loss, both models;
- ``lora``: MoLoRA experts on attention: fresh logits against the unpatched EP model (bit identical expected),
  then with the adapter weights made non-zero (copied from the reference, so both hold the same adapters) the max
  abs difference of logits and of every adapter weight's gradient, and the smallest reference gradient norm.
"""

from __future__ import annotations

import json
import os
import sys

import torch
import torch.distributed as dist
from transformers import AutoModelForCausalLM
from transformers import DistributedConfig

import moepatch
from moepatch.testing import tiny

TEXTS = list(tiny.DEMO_TEXTS) + list(tiny.CORPUS[:4])
ATTENTION = ["q_proj", "k_proj", "v_proj", "o_proj"]


def full(tensor: torch.Tensor) -> torch.Tensor:
    """A gathered copy of a (possibly DTensor) tensor."""
    return (tensor.full_tensor() if hasattr(tensor, "full_tensor") else tensor).detach().clone()


def batch_of(index: int, num_batches: int) -> dict[str, torch.Tensor]:
    """Batch ``index`` of ``num_batches`` (one per data-parallel rank), with labels (padding ignored)."""
    texts = tuple(TEXTS[:4]) if num_batches == 1 else tuple(TEXTS[index::num_batches])
    batch = tiny.demo_batch(texts=texts)
    return {**batch, "labels": batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)}


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.detach().float() - b.detach().float()).abs().max())


def logits(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    with torch.no_grad():
        return model(**batch).logits


def check_freeze(model: torch.nn.Module, reference: torch.nn.Module, batch: dict) -> dict:
    """``freeze_gate: "router"``: which parameters freeze, and one SGD step leaves the routers where they were."""
    block = {"freeze_gate": "router"}
    handle, ref_handle = moepatch.apply(model, block), moepatch.apply(reference, block)
    try:
        frozen = sorted(n for n, p in model.named_parameters() if not p.requires_grad)
        expected = sorted(n for n, p in reference.named_parameters() if not p.requires_grad)
        before = {n: full(p) for n, p in model.named_parameters()}
        model.train()
        trainable = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.SGD(trainable, lr=0.1)
        model(**batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        model.eval()
        after = {n: full(p) for n, p in model.named_parameters()}
        return {"frozen": frozen, "expected": expected,
                "routers_unchanged": all(torch.equal(before[n], after[n]) for n in frozen),
                "others_moved": sum(not torch.equal(before[n], after[n]) for n in before if n not in frozen)}
    finally:
        handle.remove()
        ref_handle.remove()


def check_stats(model: torch.nn.Module, reference: torch.nn.Module, batches: list[dict], own: int,
                group_sizes: int) -> dict:
    """``routing_stats: true``: per-rank counts against the reference's counts of this rank's batch; all-reduced."""
    block = {"routing_stats": True}
    handle, ref_handle = moepatch.apply(model, block), moepatch.apply(reference, block)
    try:
        logits(model, batches[own])
        local = handle.recorder.counts.tolist()
        per_batch = []
        for batch in batches:
            ref_handle.recorder.reset()
            logits(reference, batch)
            per_batch.append(ref_handle.recorder.counts)
        handle.recorder.all_reduce()
        return {"local": local, "expected_local": per_batch[own].tolist(),
                "reduced": handle.recorder.counts.tolist(),
                # every batch is held by group_sizes ranks (the TP group): summed over all ranks, counted that often
                "expected_reduced": (torch.stack(per_batch).sum(dim=0) * group_sizes).tolist()}
    finally:
        handle.remove()
        ref_handle.remove()


def check_c2r(model: torch.nn.Module, reference: torch.nn.Module, batch: dict, top_t: int) -> float:
    """C2R with ``top_t``: logits against the single-process C2R model."""
    block = {"c2r": {"top_t": top_t, "collaborative_list": tiny.random_collaborative_list(4, 8, seed=3)}}
    handle, ref_handle = moepatch.apply(model, block), moepatch.apply(reference, block)
    try:
        return max_diff(logits(model, batch), logits(reference, batch))
    finally:
        handle.remove()
        ref_handle.remove()


def check_balance_loss(model: torch.nn.Module, reference: torch.nn.Module, batch: dict) -> dict:
    """C2R's balance loss on the actual choice (``output_router_logits=True``): EP against single process."""
    block = {"c2r": {"top_t": 2, "collaborative_list": tiny.random_collaborative_list(4, 8, seed=3)}}
    handle, ref_handle = moepatch.apply(model, block), moepatch.apply(reference, block)
    try:
        with torch.no_grad():
            got = model(**batch, output_router_logits=True)
            want = reference(**batch, output_router_logits=True)
        return {"aux_loss": float(got.aux_loss), "expected_aux_loss": float(want.aux_loss),
                "loss": float(got.loss), "expected_loss": float(want.loss)}
    finally:
        handle.remove()
        ref_handle.remove()


def lora_weights(model: torch.nn.Module) -> dict[str, torch.nn.Parameter]:
    return {n: p for n, p in model.named_parameters() if ".lora_experts." in n}


def check_lora(model: torch.nn.Module, reference: torch.nn.Module, batch: dict) -> dict:
    """MoLoRA experts on attention: fresh injection changes nothing; with equal non-zero adapters the logits and
    every adapter weight's gradient equal the single-process model's."""
    block = {"lora_experts": {"method": "molora", "num_experts": 3, "r": 4, "target_modules": ATTENTION}}
    plain = logits(model, batch)
    handle, ref_handle = moepatch.apply(model, block), moepatch.apply(reference, block)
    try:
        fresh = logits(model, batch)
        ours, theirs = lora_weights(model), lora_weights(reference)
        # apply() draws the adapters from each rank's own RNG stream: without a common seed they differ per rank
        first = {name: p.detach().clone() for name, p in ours.items()}
        for tensor in first.values():
            dist.broadcast(tensor, src=0)
        same_init = all(torch.equal(first[name], p) for name, p in ours.items())
        generator = torch.Generator().manual_seed(5)
        with torch.no_grad():
            for name, parameter in theirs.items():  # B starts at zero: make every adapter matter, equal on all ranks
                parameter.copy_(0.1 * torch.randn(parameter.shape, generator=generator))
                ours[name].copy_(parameter)
        adapted = max_diff(logits(model, batch), logits(reference, batch))
        model.train()
        reference.train()
        out, ref_out = model(**batch), reference(**batch)
        out.loss.backward()
        ref_out.loss.backward()
        grads = {n: max_diff(p.grad, theirs[n].grad) for n, p in ours.items()}
        return {"same_names": sorted(ours) == sorted(theirs), "same_init_on_every_rank": same_init,
                "count": len(ours), "fresh_equal": bool(torch.equal(fresh, plain)), "adapted_logits": adapted,
                "logits": max_diff(out.logits, ref_out.logits),
                "loss": abs(float(out.loss.detach()) - float(ref_out.loss.detach())), "grads": max(grads.values()),
                "min_grad_norm": min(float(p.grad.norm()) for p in theirs.values())}
    finally:
        model.eval()
        reference.eval()
        model.zero_grad(set_to_none=True)
        reference.zero_grad(set_to_none=True)
        handle.remove()
        ref_handle.remove()


def check_data_parallel_lora(model: torch.nn.Module, reference: torch.nn.Module, batches: list[dict],
                             own: int) -> dict:
    """The fine-tune script's adapter handling in the ``separate`` layout (each rank its own batch):
    ``replicate_added_parameters`` makes adapters that differ per rank equal to rank 0's, and their gradients the
    average over the ranks' batches, as FSDP2 does for the weights it manages."""
    from moepatch.expert_parallel.training import replicate_added_parameters

    block = {"lora_experts": {"method": "molora", "num_experts": 3, "r": 4, "target_modules": ATTENTION}}
    handle, ref_handle = moepatch.apply(model, block), moepatch.apply(reference, block)
    try:
        ours, theirs = lora_weights(model), lora_weights(reference)
        generator = torch.Generator().manual_seed(11 + dist.get_rank())  # a different start on every rank
        with torch.no_grad():
            for parameter in ours.values():
                parameter.copy_(0.1 * torch.randn(parameter.shape, generator=generator))
        count = replicate_added_parameters(model)
        with torch.no_grad():
            for name, parameter in theirs.items():
                parameter.copy_(ours[name])  # rank 0's adapters, as broadcast
        model.train()
        reference.train()
        model(**batches[own]).loss.backward()
        expected = {name: torch.zeros_like(p) for name, p in theirs.items()}
        for batch in batches:
            reference.zero_grad(set_to_none=True)
            reference(**batch).loss.backward()
            for name, parameter in theirs.items():
                expected[name] += parameter.grad / len(batches)
        return {"count": count, "grads": max(max_diff(p.grad, expected[n]) for n, p in ours.items()),
                "min_grad_norm": min(float(g.norm()) for g in expected.values())}
    finally:
        model.eval()
        reference.eval()
        model.zero_grad(set_to_none=True)
        reference.zero_grad(set_to_none=True)
        handle.remove()
        ref_handle.remove()


def run(checkpoint: str, layout: str, implementation: str, rank: int, world: int) -> dict:
    """Every feature on one layout and implementation."""
    tp_size = world if layout == "shared" else 1
    num_batches = world // tp_size
    config = DistributedConfig(tp_size=tp_size, fsdp_size=num_batches, ep_size=world, tp_plan={},
                               ep_implementation=implementation)
    model = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32, distributed_config=config).eval()
    reference = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32).eval()
    batches = [batch_of(index, num_batches) for index in range(num_batches)]
    own = rank // tp_size
    batch = batches[own]
    extra = {} if num_batches == 1 else {"data_parallel_lora": check_data_parallel_lora(model, reference, batches,
                                                                                         own)}
    return {
        **extra,
        "plain_logits": max_diff(logits(model, batch), logits(reference, batch)),
        "stats": check_stats(model, reference, batches, own, tp_size),
        "c2r_top_t_1": check_c2r(model, reference, batch, 1),
        "c2r_top_t_7": check_c2r(model, reference, batch, 7),
        "balance_loss": check_balance_loss(model, reference, batch),
        "lora": check_lora(model, reference, batch),
        "freeze": check_freeze(model, reference, batch),  # last: its training step moves the EP model's weights
    }


def main(checkpoint: str, output_dir: str, layouts: list[str], implementations: list[str]) -> None:
    world, rank = int(os.environ["WORLD_SIZE"]), int(os.environ["RANK"])
    result = {f"{layout}/{name}": run(checkpoint, layout, name, rank, world)
              for layout in layouts for name in implementations}
    with open(os.path.join(output_dir, f"rank{rank}.json"), "w") as handle:
        json.dump(result, handle)
    dist.barrier()
    dist.destroy_process_group()
    print(f"rank {rank} done", flush=True)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], sys.argv[3].split(","), sys.argv[4].split(","))
