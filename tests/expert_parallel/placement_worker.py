"""Run under torchrun (gloo, CPU): a checkpoint renumbered by ``moepatch place --ep-size N --write-permuted`` loaded
under expert parallelism with ``ep_size = N`` and the dedup dispatch, next to the original checkpoint in one process.

Usage: ``placement_worker.py ORIGINAL PERMUTED OUTPUT [CHECKS]``

Each rank loads PERMUTED with ``moepatch.from_pretrained(..., distributed_config=DistributedConfig(tp_size=N,
ep_size=N, tp_plan={}, ep_implementation="moepatch_dedup"))`` (which checks ``expert_placement.json`` first and
applies the checkpoint's C2R fields) and ORIGINAL without expert parallelism, runs one seeded batch without padding
through both with a :class:`~moepatch.routing.recorder.RoutingRecorder` keeping every token's experts, and writes
``rank{r}.json``: this rank's local expert weights against the original's (per layer, which original experts they
are), the routing of both models, the dispatch's traffic per layer and the group's total.

With CHECKS (a folder holding ``misplaced``: a renumbered copy whose ``expert_placement.json`` records another EP
size, and ``chosen``: a checkpoint prepared by ``moepatch install`` whose moepatch block names
``"ep_implementation": "moepatch_dedup"``), each rank also records :func:`layout_checks`: what ``moepatch.apply``
says of ``misplaced`` loaded by plain ``AutoModelForCausalLM.from_pretrained`` under this EP size, and which dispatch
``chosen`` gets through ``moepatch.from_pretrained`` and through the installed loader with ``ep_implementation`` left
at ``"auto"``, and with ``"all_to_all"`` given.
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
from moepatch.expert_parallel import dedup_dispatches
from moepatch.expert_parallel import model_traffic
from moepatch.routing.recorder import RoutingRecorder

BATCH, SEQUENCE = 4, 12


def routed(model: torch.nn.Module, input_ids: torch.Tensor) -> dict[int, list[list[int]]]:
    """Every token's chosen experts per MoE layer (no padding: every token of the batch, in order)."""
    with RoutingRecorder(model, keep_choices=True) as recorder, torch.no_grad():
        model(input_ids=input_ids)
    return {layer: choices.tolist() for layer, choices in recorder.choices.items()}


def shard_sources(permuted: torch.nn.Module, original: torch.nn.Module) -> dict[int, list[int] | None]:
    """Per MoE layer, the original experts this rank's local expert weights are (``None`` if they match none)."""
    found = {}
    for index, layer in enumerate(permuted.model.layers):
        experts = getattr(layer.mlp, "experts", None)
        if experts is None:
            continue
        local = experts.gate_up_proj.to_local().detach()
        full = original.model.layers[index].mlp.experts.gate_up_proj.detach()
        matches = []
        for row in local:
            same = [old for old in range(full.shape[0]) if torch.equal(full[old], row)]
            matches.append(same[0] if len(same) == 1 else None)
        found[index] = None if None in matches else matches
    return found


def layout_checks(checks_dir: str, world: int) -> dict:
    """``apply``'s refusal of a copy renumbered for another EP size that plain ``from_pretrained`` loaded, and the
    dispatch each load of a checkpoint whose block chooses ``moepatch_dedup`` gets (dedup-dispatched experts modules,
    and the ``ep_implementation`` the model was sharded with)."""
    misplaced = AutoModelForCausalLM.from_pretrained(
        os.path.join(checks_dir, "misplaced"), dtype=torch.float32,
        distributed_config=DistributedConfig(tp_size=world, ep_size=world, tp_plan={}))
    try:
        moepatch.apply(misplaced)
        refusal = None
    except ValueError as error:
        refusal = str(error)
    chosen = os.path.join(checks_dir, "chosen")

    def dispatch(model: torch.nn.Module) -> dict:
        return {"dedup_layers": len(list(dedup_dispatches(model))),
                "ep_implementation": model.config.distributed_config.ep_implementation}

    auto = DistributedConfig(tp_size=world, ep_size=world, tp_plan={})
    given = DistributedConfig(tp_size=world, ep_size=world, tp_plan={}, ep_implementation="all_to_all")
    return {
        "apply_refusal": refusal,
        "misplaced_patched": moepatch.get_handle(misplaced) is not None,
        "by_moepatch": dispatch(moepatch.from_pretrained(chosen, dtype=torch.float32, distributed_config=auto)),
        "by_installed_loader": dispatch(AutoModelForCausalLM.from_pretrained(
            chosen, trust_remote_code=True, dtype=torch.float32, distributed_config=auto)),
        "given": dispatch(moepatch.from_pretrained(chosen, dtype=torch.float32, distributed_config=given)),
        "auto_left_as_given": auto.ep_implementation,
    }


def main(original_path: str, permuted_path: str, output_dir: str, checks_dir: str | None = None) -> None:
    world, rank = int(os.environ["WORLD_SIZE"]), int(os.environ["RANK"])
    config = DistributedConfig(tp_size=world, ep_size=world, tp_plan={}, ep_implementation="moepatch_dedup")
    permuted = moepatch.from_pretrained(permuted_path, dtype=torch.float32, distributed_config=config).eval()
    original = moepatch.from_pretrained(original_path, dtype=torch.float32).eval()
    generator = torch.Generator().manual_seed(0)
    input_ids = torch.randint(3, permuted.config.vocab_size, (BATCH, SEQUENCE), generator=generator)

    routing_original = routed(original, input_ids)
    for _, implementation in dedup_dispatches(permuted):
        implementation.traffic.reset()
    routing_permuted = routed(permuted, input_ids)
    result = {
        "rank": rank, "world": world, "hidden_size": permuted.config.hidden_size,
        "c2r_routers": len(moepatch.get_handle(permuted).c2r_routers),
        "shard_sources": {str(k): v for k, v in shard_sources(permuted, original).items()},
        "routing_original": {str(k): v for k, v in routing_original.items()},
        "routing_permuted": {str(k): v for k, v in routing_permuted.items()},
        "dispatch_layers": [name for name, _ in dedup_dispatches(permuted)],
        "traffic": [implementation.traffic.to_dict() for _, implementation in dedup_dispatches(permuted)],
        "group_traffic": model_traffic(permuted).all_reduce().to_dict(),
    }
    if checks_dir is not None:
        result["layout_checks"] = layout_checks(checks_dir, world)
    with open(os.path.join(output_dir, f"rank{rank}.json"), "w") as handle:
        json.dump(result, handle)
    dist.barrier()
    dist.destroy_process_group()
    print(f"rank {rank} done", flush=True)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4] if len(sys.argv) > 4 else None)
