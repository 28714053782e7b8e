"""Run under torchrun (gloo, CPU): moepatch's features applied to a tiny Qwen2-MoE loaded under expert parallelism,
against the single-process model with the same block.

Usage: ``features_worker.py CHECKPOINT OUTPUT LAYOUT[,LAYOUT...] IMPLEMENTATION[,IMPLEMENTATION...]``

LAYOUT ``shared`` (``tp_size = ep_size = N``, ``tp_plan={}``: every rank holds the same batch) or ``separate``
(``tp_size=1, fsdp_size = ep_size = N``: each rank its own batch), as in ``ep_worker.py``, or ``replicated``
(``tp_size=1, fsdp_size=N, ep_size=N/2``: each rank its own batch, two copies of every expert, ``efsdp_size`` 2;
only ``routed_lora`` runs there). IMPLEMENTATION is an ``ep_implementation`` (``"moepatch_dedup"``,
``"all_to_all"``). One EP model and one reference per layout and implementation; each feature is applied with
:func:`moepatch.apply`, measured and removed again, so the launch pays the start-up once for every feature.

Per feature the rank writes figures the test asserts on (``rank{r}.json``):

- ``freeze``: the names frozen on the EP model and on the reference; after one SGD step whether every router is
  unchanged (gathered) and whether some other weight moved;
- ``stats``: this rank's ``RoutingRecorder`` counts and the reference's counts of this rank's batch; after
  ``recorder.all_reduce()`` the summed counts and the reference's counts of every batch summed;
- ``c2r_top_t_<t>``: max abs logits difference to the single-process C2R model;
- ``balance_loss``: C2R (top_t 2) with ``output_router_logits``: the aux loss and the loss, both models;
- ``c2r_backward``: C2R (top_t 2) trained: for the language-model loss and for it plus the balance loss, the max
  abs differences of the loss, the input embeddings' gradient and the routers' and experts' gradients to the
  single-process model's, the reference's gradient norms, and how far the balance term moves the router gradients;
- ``lora``: MoLoRA experts on attention: fresh logits against the unpatched EP model (bit identical expected),
  then with the adapter weights made non-zero (copied from the reference, so both hold the same adapters) the max
  abs difference of logits and of every adapter weight's gradient, and the smallest reference gradient norm;
- ``routed_lora``: MoLoRA experts on the routed experts' gate / up / down projections: which routed experts' sets
  this rank holds, fresh logits, then with the reference's non-zero weights the logits, loss, input-embedding
  gradients and every set's gradient (the reference's summed over the batches of the rank's EP group, whose tokens
  reach its experts) under the experts' ``grouped_mm`` and ``eager`` implementations; after
  ``replicate_added_parameters`` the gradients (the mean over every batch); the ``lora_experts.safetensors`` that
  ``save_pretrained`` (dedup cases; ``save_lora_experts`` otherwise) writes (every expert's sets, equal to the
  reference's) loaded back into a fresh EP patch (this rank's shard) and into the single-process model, and after
  ``save_pretrained`` the whole saved checkpoint through ``moepatch.from_pretrained``.
"""

from __future__ import annotations

import json
import os
import re
import sys
from typing import Any

import torch
import torch.distributed as dist
from transformers import AutoModelForCausalLM
from transformers import DistributedConfig

import moepatch
from moepatch.testing import tiny

TEXTS = list(tiny.DEMO_TEXTS) + list(tiny.CORPUS[:4])
LAYOUTS = {"shared": lambda world: (world, 1, world), "separate": lambda world: (1, world, world),
           "replicated": lambda world: (1, world, world // 2)}
"""Layout → (tp_size, fsdp_size = the number of batches, ep_size) on ``world`` ranks."""
ATTENTION = ["q_proj", "k_proj", "v_proj", "o_proj"]
ROUTED = ["mlp.experts.gate_proj", "mlp.experts.up_proj", "mlp.experts.down_proj"]


def _restore(model: torch.nn.Module, reference: torch.nn.Module, *handles: Any) -> None:
    """Back to eval mode without gradients, the patches removed: what every training check leaves behind."""
    for each in (model, reference):
        each.eval()
        each.zero_grad(set_to_none=True)
    for handle in handles:
        handle.remove()


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


def _grads_by_kind(model: torch.nn.Module) -> dict[str, dict[str, torch.Tensor]]:
    """The gathered gradients of the routers and the routed experts' weights (zeros where none reached one)."""
    kinds: dict[str, dict[str, torch.Tensor]] = {"router": {}, "experts": {}}
    for name, parameter in model.named_parameters():
        kind = "router" if name.endswith(".mlp.gate.weight") else "experts" if ".mlp.experts." in name else None
        if kind is not None:
            kinds[kind][name] = full(_grad(parameter))
    return kinds


def check_c2r_backward(model: torch.nn.Module, reference: torch.nn.Module, batches: list[dict], own: int) -> dict:
    """C2R (top_t 2) in training, for two losses: the language-model loss (``"loss"``: C2R's backward through the
    dispatch) and the loss with C2R's balance loss on the actual choice (``"balance"``: ``output_router_logits=True``,
    the balance term weighted 1 (``router_aux_loss_coef``) so its gradient weighs as much as the language model's; it
    reaches the routers directly and, through the hidden states the later routers read, the experts of the earlier
    layers). Per loss the max abs difference to the single-process C2R model of the loss, of the input embeddings'
    gradient (this rank's batch) and of the routers' and experts' gradients (gathered; the reference's averaged over
    the batches, as FSDP averages them), and the reference's gradient norms (each kind's over every layer); and how far
    the balance term moves the reference's router gradients (``balance_effect``).

    The balance loss alone is not back-propagated: under FSDP2 (the ``separate`` layout) the router logits it reads
    are no output of a sharded module, so no pre-backward hook gathers the router weight again and autograd finds it
    freed (``setStorage ... storage of size 0``, with either dispatch); added to the language-model loss, as training
    uses it, it runs."""
    block = {"c2r": {"top_t": 2, "collaborative_list": tiny.random_collaborative_list(4, 8, seed=3)}}
    handle, ref_handle = moepatch.apply(model, block), moepatch.apply(reference, block)
    coefficients = model.router_aux_loss_coef, reference.router_aux_loss_coef
    results: dict = {}
    routers: dict[str, dict[str, torch.Tensor]] = {}
    try:
        model.train()
        reference.train()
        model.router_aux_loss_coef = reference.router_aux_loss_coef = 1.0
        for target in ("loss", "balance"):
            def backward(net: torch.nn.Module, index: int, balance: bool = target == "balance") -> dict:
                batch = batches[index]
                with torch.no_grad():
                    embeds = reference.get_input_embeddings()(batch["input_ids"])
                embeds.requires_grad_(True)
                net.zero_grad(set_to_none=True)
                out = net(inputs_embeds=embeds, attention_mask=batch["attention_mask"], labels=batch["labels"],
                          output_router_logits=balance)
                out.loss.backward()
                return {"value": out.loss.detach(), "input_grad": embeds.grad, **_grads_by_kind(net)}

            per_batch = [backward(reference, index) for index in range(len(batches))]
            got = backward(model, own)
            want = per_batch[own]
            figures = {"value": max_diff(got["value"], want["value"]),
                       "input_grad": max_diff(got["input_grad"], want["input_grad"])}
            norms = {"input_grad": float(want["input_grad"].norm())}
            for kind in ("router", "experts"):
                mean = {n: torch.stack([b[kind][n] for b in per_batch]).mean(dim=0) for n in want[kind]}
                figures[kind] = max(max_diff(got[kind][n], mean[n]) for n in mean)
                norms[kind] = float(torch.stack([g.norm() for g in mean.values()]).norm())
                if kind == "router":
                    routers[target] = mean
            results[target] = {**figures, "reference_norms": norms}
        results["balance_effect"] = max(max_diff(routers["balance"][n], routers["loss"][n]) for n in routers["loss"])
        return results
    finally:
        model.router_aux_loss_coef, reference.router_aux_loss_coef = coefficients
        _restore(model, reference, handle, ref_handle)


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
        _restore(model, reference, handle, ref_handle)


def _set_experts_implementation(model: torch.nn.Module, implementation: str) -> None:
    """The base experts implementation the routed deltas run with (``eager`` loop or ``grouped_mm``)."""
    from model_patches.expert_storage.fused import BASE_CONFIG

    for module in model.modules():
        if BASE_CONFIG in module.__dict__:
            module.__dict__[BASE_CONFIG]._experts_implementation_internal = implementation


def _grad(parameter: torch.nn.Parameter) -> torch.Tensor:
    """The gradient, zeros where autograd never reached the parameter."""
    return torch.zeros_like(parameter) if parameter.grad is None else parameter.grad


def _forward_backward(model: torch.nn.Module, reference: torch.nn.Module, batches: list[dict], own: int) -> dict:
    """One training forward and backward of this rank's batch on ``model`` (from the reference's input embeddings,
    which need gradients); its logits, loss and the embeddings' gradient."""
    batch = batches[own]
    with torch.no_grad():
        embeds = reference.get_input_embeddings()(batch["input_ids"])
    embeds.requires_grad_(True)
    out = model(inputs_embeds=embeds, attention_mask=batch["attention_mask"], labels=batch["labels"])
    out.loss.backward()
    return {"logits": out.logits.detach(), "loss": out.loss.detach(), "input_grad": embeds.grad}


def check_routed_lora(model: torch.nn.Module, reference: torch.nn.Module, batches: list[dict], own: int,
                      group_batches: list[int], save_dir: str, whole_checkpoint: bool) -> dict:
    """MoLoRA on the routed experts under EP: each rank holds its experts' sets; with the reference's weights the
    forward and backward equal the single-process model's, each set's gradient the sum over ``group_batches`` (the
    batches of the rank's EP group, whose tokens reach its experts); the saved file holds every expert's sets
    (``whole_checkpoint``: written by ``save_pretrained`` and reloaded whole, else by ``save_lora_experts``)."""
    from safetensors.torch import load_file

    from moepatch.expert_parallel.training import replicate_added_parameters
    from moepatch.lora_experts import save_lora_experts
    from moepatch.lora_experts.inject import load_lora_weights

    block = {"lora_experts": {"method": "molora", "num_experts": 3, "r": 4, "target_modules": ROUTED}}
    batch = batches[own]
    plain = logits(model, batch)
    handle, ref_handle = moepatch.apply(model, block), moepatch.apply(reference, block)
    results: dict = {}
    try:
        ours, theirs = lora_weights(model), lora_weights(reference)
        held = sorted({int(re.search(r"\.sets\.(\d+)\.", name).group(1)) for name in ours})
        results.update(held=held, count=len(ours), total=len(theirs), names_known=set(ours) <= set(theirs),
                       fresh=max_diff(logits(model, batch), plain))
        generator = torch.Generator().manual_seed(7)
        with torch.no_grad():
            for name, parameter in theirs.items():  # B starts at zero: make every set matter, equal on all ranks
                parameter.copy_(0.1 * torch.randn(parameter.shape, generator=generator))
                if name in ours:
                    ours[name].copy_(parameter)
        adapted = logits(reference, batch)
        results["adapted_logits"] = max_diff(logits(model, batch), adapted)

        model.train()
        reference.train()
        expected = None
        summed = {name: torch.zeros_like(p) for name, p in theirs.items()}  # over the EP group's batches
        mean = {name: torch.zeros_like(p) for name, p in theirs.items()}  # over all batches
        for index in range(len(batches)):
            reference.zero_grad(set_to_none=True)
            result = _forward_backward(reference, reference, batches, index)
            expected = result if index == own else expected
            for name, parameter in theirs.items():
                summed[name] += parameter.grad if index in group_batches else 0
                mean[name] += parameter.grad / len(batches)
        for implementation in ("grouped_mm", "eager"):
            _set_experts_implementation(model, implementation)
            model.zero_grad(set_to_none=True)
            got = _forward_backward(model, reference, batches, own)
            results[implementation] = {
                "logits": max_diff(got["logits"], expected["logits"]), "loss": max_diff(got["loss"], expected["loss"]),
                "input_grad": max_diff(got["input_grad"], expected["input_grad"]),
                "grads": max(max_diff(_grad(p), summed[n]) for n, p in ours.items()),
                "no_grad": sum(p.grad is None for p in ours.values())}  # eager: experts no row reached
        _set_experts_implementation(model, "grouped_mm")
        results["nonzero_grads"] = sum(bool(summed[n].abs().max() > 0) for n in ours)  # experts some token reached
        results["grad_norm"] = float(torch.stack([summed[n].norm() for n in ours]).norm())

        model.zero_grad(set_to_none=True)
        results["replicated_count"] = replicate_added_parameters(model)
        _forward_backward(model, reference, batches, own)
        results["replicated_grads"] = max(max_diff(p.grad, mean[n]) for n, p in ours.items())
        model.eval()
        reference.eval()

        if whole_checkpoint:  # every rank: the LoRA experts of all ranks gathered, rank 0 writes them
            model.save_pretrained(save_dir)
        else:  # the adapter-only file, gathered the same way
            save_lora_experts(model, save_dir)
        saved = load_file(os.path.join(save_dir, "lora_experts.safetensors"))
        results["saved_keys"] = sorted(saved) == sorted(theirs)
        results["saved_values"] = max(max_diff(saved[n], p) for n, p in theirs.items())
        handle.remove()
        handle = moepatch.apply(model, block)  # fresh sets again; then the file's: this rank's shard
        load_lora_weights(model, saved)
        results["loaded_ep"] = max(max_diff(p, theirs[n]) for n, p in lora_weights(model).items())
        results["loaded_ep_logits"] = max_diff(logits(model, batch), adapted)
        ref_handle.remove()
        ref_handle = moepatch.apply(reference, block)
        load_lora_weights(reference, saved)  # the whole file into the single-process model
        results["loaded_single_logits"] = max_diff(logits(reference, batch), adapted)
        if whole_checkpoint:
            reloaded = moepatch.from_pretrained(save_dir).eval()  # the saved checkpoint, its block naming the file
            results["reloaded_logits"] = max_diff(logits(reloaded, batch), adapted)
        return results
    finally:
        _restore(model, reference, handle, ref_handle)


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
        _restore(model, reference, handle, ref_handle)


def run(checkpoint: str, layout: str, implementation: str, rank: int, world: int, output_dir: str) -> dict:
    """Every feature on one layout and implementation (``replicated``: the routed experts' LoRA only)."""
    tp_size, num_batches, ep_size = LAYOUTS[layout](world)
    config = DistributedConfig(tp_size=tp_size, fsdp_size=num_batches, ep_size=ep_size, tp_plan={},
                               ep_implementation=implementation)
    model = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32, distributed_config=config).eval()
    reference = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32).eval()
    batches = [batch_of(index, num_batches) for index in range(num_batches)]
    own = rank // tp_size
    batch = batches[own]
    # the batches whose tokens reach this rank's experts: those of the ranks of its EP group
    ep_group = dist.get_process_group_ranks(model._mesh_manager.get_mesh("ep").get_group())
    routed = {"routed_lora": check_routed_lora(model, reference, batches, own, sorted({r // tp_size for r in ep_group}),
                                               os.path.join(output_dir, f"saved-{layout}-{implementation}"),
                                               whole_checkpoint=implementation == "moepatch_dedup")}
    if layout == "replicated":
        return routed
    extra = {} if num_batches == 1 else {"data_parallel_lora": check_data_parallel_lora(model, reference, batches,
                                                                                         own)}
    return {
        **extra,
        **routed,
        "plain_logits": max_diff(logits(model, batch), logits(reference, batch)),
        "stats": check_stats(model, reference, batches, own, tp_size),
        "c2r_top_t_1": check_c2r(model, reference, batch, 1),
        "c2r_top_t_7": check_c2r(model, reference, batch, 7),
        "balance_loss": check_balance_loss(model, reference, batch),
        "c2r_backward": check_c2r_backward(model, reference, batches, own),
        "lora": check_lora(model, reference, batch),
        "freeze": check_freeze(model, reference, batch),  # last: its training step moves the EP model's weights
    }


def main(checkpoint: str, output_dir: str, layouts: list[str], implementations: list[str]) -> None:
    world, rank = int(os.environ["WORLD_SIZE"]), int(os.environ["RANK"])
    result = {f"{layout}/{name}": run(checkpoint, layout, name, rank, world, output_dir)
              for layout in layouts for name in implementations}
    with open(os.path.join(output_dir, f"rank{rank}.json"), "w") as handle:
        json.dump(result, handle)
    dist.barrier()
    dist.destroy_process_group()
    print(f"rank {rank} done", flush=True)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], sys.argv[3].split(","), sys.argv[4].split(","))
