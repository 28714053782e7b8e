"""moepatch's deduplicating expert-parallel dispatch (``ep_implementation="moepatch_dedup"``).

Under torchrun (gloo, CPU) a tiny Qwen2-MoE (8 experts, top-2) loads with transformers' expert parallelism and runs
through both ``"moepatch_dedup"`` and transformers' ``"all_to_all"``; ``ep_worker.py`` compares logits and gradients
(inputs' embeddings, the routing weights handed to the experts, expert weights, router weights) with the
single-process model and records the dedup dispatch's traffic and the routing. Here the traffic is checked against a
count made independently from that routing.

Layouts: ``shared`` (tp = ep = 2, one batch the dispatch slices over the TP group), ``separate`` (tp = 1, fsdp = ep = 2,
each rank its own batch), ``mixed`` on 4 ranks (tp = 2, fsdp = 2, ep = 4: pairs share a batch, 2 experts per rank);
each in float32, and in bfloat16 with the router's own routing.
Routings: the router's own, all to rank 0's experts (the other ranks receive nothing), all to the dispatching rank's
own experts (nothing leaves a rank), and (``shared``, ``mixed``) one token per batch, sent to the last rank's experts:
the other ranks of a TP group dispatch nothing at all, and the last rank, sending nothing, receives and computes.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import torchrun_command
from transformers.distributed.expert_parallel import EPImplementationInterface

import moepatch.expert_parallel
from moepatch.expert_parallel import DedupAllToAllEP
from moepatch.testing import tiny

WORKER = Path(__file__).with_name("ep_worker.py")
ROUTINGS = ("natural", "rank0", "local", "one_token")
RUNS = {"2 ranks": (2, ("shared", "separate", "shared:bfloat16", "separate:bfloat16")),
        "4 ranks": (4, ("mixed", "mixed:bfloat16"))}
"""Each run is one torchrun launch: processes and the layouts it loads."""
GRADIENTS = ("embeddings", "routing_weights", "experts", "gate")
"""The gradients compared: the inputs' embeddings', the routing weights' handed to each experts module (the tensor the
dispatch sends the weights of), the expert weights' and the router weights'."""
FLOAT32_BYTES = 4
ID_BYTES = 4  # the dispatch sends local expert ids as int32


def test_registered_when_moepatch_is_imported() -> None:
    assert EPImplementationInterface()["moepatch_dedup"] is DedupAllToAllEP
    EPImplementationInterface._global_mapping.pop("moepatch_dedup")
    try:
        assert "moepatch_dedup" not in EPImplementationInterface()
        assert moepatch.expert_parallel.register() is True
        assert moepatch.expert_parallel.register() is True  # idempotent
    finally:
        EPImplementationInterface.register("moepatch_dedup", DedupAllToAllEP)
    assert EPImplementationInterface()["moepatch_dedup"] is DedupAllToAllEP


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """The tiny Qwen2-MoE (8 experts), and one with 6 experts, which 4 expert-parallel ranks cannot split evenly."""
    root = tmp_path_factory.mktemp("ep-checkpoints")
    even = tiny.save_tiny_checkpoint(root / "qwen2_moe", "qwen2_moe")
    tiny.tiny_model("qwen2_moe", num_experts=6).save_pretrained(root / "qwen2_moe_6")
    return even, root / "qwen2_moe_6"


@pytest.fixture(scope="module")
def runs(checkpoints: tuple[Path, Path], tmp_path_factory: pytest.TempPathFactory) -> dict[str, list[dict]]:
    """Run name → each rank's ``rank{r}.json`` (launched once for the module)."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join(sys.path))
    results = {}
    for name, (processes, layouts) in RUNS.items():
        output = tmp_path_factory.mktemp(f"ep-{processes}")
        args = [str(checkpoints[0]), str(output), ",".join(layouts), ",".join(ROUTINGS)]
        if processes == 4:
            args.append(str(checkpoints[1]))
        result = subprocess.run(torchrun_command(str(WORKER), *args, processes=processes), env=env,
                                capture_output=True, text=True, timeout=400)
        log = result.stdout + result.stderr
        assert all(f"rank {r} done" in result.stdout for r in range(processes)), log[-6000:]
        results[name] = [json.loads((output / f"rank{r}.json").read_text()) for r in range(processes)]
    return results


def independent_traffic(routing: list[list[int]], rank: int, tp_size: int, num_local: int) -> dict[str, int]:
    """What ``rank`` dispatches for one layer, from the routing alone: its TP slice of the batch (``torch.chunk``
    sizes), one row per token and distinct rank of its experts (dedup), one per (token, expert) pair (per-pair)."""
    chunk = math.ceil(len(routing) / tp_size)
    start = (rank % tp_size) * chunk
    counts = dict(tokens=0, rows_remote=0, rows_local=0, pairs_remote=0, pairs_local=0)
    for experts in routing[start:start + chunk]:
        ranks = {expert // num_local for expert in experts}
        counts["tokens"] += 1
        counts["rows_remote"] += len(ranks - {rank})
        counts["rows_local"] += rank in ranks
        counts["pairs_remote"] += sum(expert // num_local != rank for expert in experts)
        counts["pairs_local"] += sum(expert // num_local == rank for expert in experts)
    return counts


def cases(runs: dict[str, list[dict]], dtype: str = "torch.float32"):
    """(run, layout, routing, per-rank results of that case, per-rank layout results) of the layouts run in
    ``dtype``."""
    for run, ranks in runs.items():
        for layout in ranks[0]["layouts"]:
            layouts = [r["layouts"][layout] for r in ranks]
            if layouts[0]["dtype"] != dtype:
                continue
            for routing in layouts[0]["cases"]:
                yield run, layout, routing, [result["cases"][routing] for result in layouts], layouts


@pytest.mark.slow
def test_dedup_equals_all_to_all_and_the_single_process_model(runs: dict[str, list[dict]]) -> None:
    for run, layout, routing, per_rank, _ in cases(runs):
        where = f"{run}, {layout}, {routing}"
        for rank, case in enumerate(per_rank):
            for name in ("moepatch_dedup", "all_to_all"):
                figures = case[name]
                assert figures["same_routing_as_reference"], where
                assert figures["vs_reference"]["logits"] <= 1e-5, (where, rank, name, figures)
                assert figures["inference_logits"] <= 1e-5, (where, rank, name, figures)
                for kind in GRADIENTS:
                    assert figures["vs_reference"][kind] <= 1e-6, (where, rank, name, kind, figures)
            assert case["dedup_vs_all_to_all"]["logits"] <= 1e-5, (where, rank, case["dedup_vs_all_to_all"])
            for kind in GRADIENTS:
                assert case["dedup_vs_all_to_all"][kind] <= 1e-6, (where, rank, case["dedup_vs_all_to_all"])
            # the gradients compared are real ones (not all zero), the routing weights' and router weights' included
            assert set(case["reference_norms"]) == {"logits", *GRADIENTS}, where
            assert min(case["reference_norms"].values()) > 1e-3, (where, case["reference_norms"])


BF16_EPSILON = 2.0**-8
"""bfloat16's unit roundoff (8 significand bits)."""


@pytest.mark.slow
def test_in_bfloat16_dedup_equals_all_to_all_and_the_single_process_model_within_rounding(
        runs: dict[str, list[dict]]) -> None:
    """The same comparison in bfloat16: the dispatches and the single-process model add the experts' outputs in
    different orders (dedup sums a rank's experts before the return trip), so they agree within a few roundings of
    the largest value compared, not bit for bit."""
    found = list(cases(runs, "torch.bfloat16"))
    assert found, "no bfloat16 layout ran"
    for run, layout, routing, per_rank, _ in found:
        where = f"{run}, {layout}, {routing}"
        for rank, case in enumerate(per_rank):
            scale = case["reference_max"]
            for name in ("moepatch_dedup", "all_to_all"):
                figures = case[name]
                assert figures["same_routing_as_reference"], where
                for kind, difference in figures["vs_reference"].items():
                    assert difference <= 16 * BF16_EPSILON * scale[kind], (where, rank, name, kind, figures, scale)
            for kind, difference in case["dedup_vs_all_to_all"].items():
                assert difference <= 16 * BF16_EPSILON * scale[kind], (where, rank, kind, difference, scale)
            assert min(case["reference_norms"].values()) > 1e-3, (where, case["reference_norms"])


@pytest.mark.slow
def test_dedup_bytes_equal_an_independent_count_from_the_routing(runs: dict[str, list[dict]]) -> None:
    totals = {}
    for run, layout, routing, per_rank, layouts in cases(runs):
        where = f"{run}, {layout}, {routing}"
        hidden, num_local, tp_size = (layouts[0][key] for key in ("hidden_size", "num_local_experts", "tp_size"))
        num_layers = len(layouts[0]["dispatch_layers"])
        assert num_layers == 3, layouts[0]["dispatch_layers"]  # tiny Qwen2-MoE: layer 1 is dense
        returned_remote = pair_rows = dedup_rows = 0
        for rank, case in enumerate(per_rank):
            assert len(case["traffic"]) == len(case["routing"]) == num_layers, where
            for traffic, routing_of_layer in zip(case["traffic"], case["routing"], strict=True):
                top_k = layouts[0]["top_k"]
                assert {len(experts) for experts in routing_of_layer} == {top_k}, where
                expected = independent_traffic(routing_of_layer, rank, tp_size, num_local)
                assert traffic["calls"] == 1, (where, traffic)
                assert {key: traffic[key] for key in expected} == expected, (where, rank)
                assert traffic["hidden_bytes_remote"] == expected["rows_remote"] * hidden * FLOAT32_BYTES
                assert traffic["hidden_bytes_local"] == expected["rows_local"] * hidden * FLOAT32_BYTES
                assert traffic["metadata_bytes_remote"] == expected["rows_remote"] * top_k * (ID_BYTES + FLOAT32_BYTES)
                # never more than the per-pair dispatch (AllToAllEP: one row per remote (token, expert) pair)
                assert traffic["rows_remote"] <= traffic["pairs_remote"], (where, rank, traffic)
                returned_remote += traffic["returned_rows_remote"]
                dedup_rows += traffic["rows_remote"]
                pair_rows += traffic["pairs_remote"]
                if routing == "rank0" and rank != 0:
                    assert traffic["returned_rows_remote"] + traffic["returned_rows_local"] == 0  # received nothing
                if routing == "local":
                    assert traffic["rows_remote"] == traffic["returned_rows_remote"] == 0
                if routing == "one_token":  # one token per batch, dispatched by its TP group's first rank
                    sent = traffic["rows_remote"] + traffic["rows_local"]
                    assert (traffic["tokens"], sent) == ((1, 1) if rank % tp_size == 0 else (0, 0)), (where, rank)
                    received = traffic["returned_rows_remote"] + traffic["returned_rows_local"]
                    # to the last rank's experts: it receives every batch's token, sending none; no other receives
                    assert received == (len(per_rank) // tp_size if rank == len(per_rank) - 1 else 0), (where, rank)
        assert returned_remote == dedup_rows, where  # one row back per row out, summed over the group
        # model_traffic sums a rank's layers, DispatchTraffic.all_reduce the group's ranks
        for case in per_rank:
            assert case["model_traffic"] == {key: sum(t[key] for t in case["traffic"]) for key in case["traffic"][0]}
        assert per_rank[0]["group_traffic"] == {
            key: sum(case["model_traffic"][key] for case in per_rank) for key in per_rank[0]["model_traffic"]}
        totals[where] = (dedup_rows, pair_rows)
    for where, (dedup_rows, pair_rows) in totals.items():
        if "natural" in where:
            assert dedup_rows < pair_rows, (where, dedup_rows, pair_rows)  # top-2 on 2-4 ranks: some tokens dedup
    print({where: f"{dedup} vs {pairs} remote rows" for where, (dedup, pairs) in totals.items()})


@pytest.mark.slow
def test_an_ep_size_that_does_not_divide_the_experts_is_refused_before_loading(runs: dict[str, list[dict]]) -> None:
    for result in runs["4 ranks"]:
        assert result["uneven_refusal"] == "Cannot evenly shard 6 experts across 4 expert-parallel ranks."
