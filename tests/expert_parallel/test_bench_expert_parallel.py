"""``benchmarks/bench_expert_parallel.py``: it runs end to end under torchrun on the CPU and its figures reach
``--json``; where expert parallelism over NCCL cannot run (fewer than 2 GPUs) it says so instead of figures.

One launch of 4 gloo processes (EP 4) also checks bytes on real routing: the LLaMA-MoE routing sampled from the
published co-activation counts (vanilla, C2R, C2R + placement, C2R within the planned groups) and a Qwen1.5-MoE-sized
layer (60 experts, top-4) routing under the official C2R lists. Per MoE layer and rank, the rows and bytes each
dispatch counted must equal a count made here from the routing it saw, and ``place``'s prediction
(:func:`~moepatch.tools.c2r.traffic.predict_dispatch` with those source ranks, on the original expert ids under the
groups ``place`` planned).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from moepatch import cli
from moepatch.c2r.matrices import load_matrices
from moepatch.tools.c2r.traffic import predict_dispatch

REPO = Path(__file__).resolve().parents[2]
BENCHMARK = REPO / "benchmarks" / "bench_expert_parallel.py"
DATA = REPO / "data" / "c2r-moe"
LLAMA_MATRICES = DATA / "llama-moe-v1-3_5b-2_8.collaboration.json"
QWEN_CONFIG = DATA / "qwen1.5-moe-a2.7b.topt30.config.json"
EP_SIZE = 4
SEQUENCE = 61
"""Tokens per sequence: 2 x 61 = 122 tokens do not split evenly over 4 ranks (31, 31, 31, 29)."""
NUM_EXPERTS = {"llama": 8, "qwen": 60}
ROUTINGS = ("vanilla", "c2r", "c2r+placement", "c2r in groups")
DISPATCHES = ("per pair", "dedup")
PLAN_OF = {"c2r+placement": ("permuted", "topt_5_collaboration"), "c2r in groups": ("grouped", "base_collaboration")}
"""LLaMA-MoE: the renumbered copy each routing loads, and the published matrix its groups were planned on."""


def _run(*argv: str, timeout: int = 300) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join([str(REPO), *sys.path]))
    return subprocess.run([sys.executable, str(BENCHMARK), *argv], capture_output=True, text=True, timeout=timeout,
                          cwd=REPO, env=env)


@pytest.mark.skipif(torch.cuda.device_count() >= 2, reason="this machine can run the benchmark on NCCL")
def test_without_two_gpus_it_writes_a_note_instead_of_figures(tmp_path: Path) -> None:
    done = _run("--device", "cuda", "--json", str(tmp_path / "figures.json"), timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "skipped: expert parallelism over NCCL needs one GPU per process, at least 2" in done.stdout
    payload = json.loads((tmp_path / "figures.json").read_text())
    assert payload["figures"] == [] and payload["note"].startswith("skipped:")


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[subprocess.CompletedProcess, dict, dict]:
    """One ``--quick`` run on 4 processes, both cases, 2 MoE layers, hidden 64: its output, figures and raw counts."""
    root = tmp_path_factory.mktemp("bench-ep")
    done = _run("--quick", "--processes", str(EP_SIZE), "--cases", "llama", "qwen", "--layers", "2",
                "--hidden-size", "64", "--seq", str(SEQUENCE), "--json", str(root / "figures.json"),
                "--raw-json", str(root / "raw.json"), timeout=500)
    assert done.returncode == 0, (done.stdout + done.stderr)[-6000:]
    figures = json.loads((root / "figures.json").read_text())["figures"]
    return done, {(figure["setting"], figure["label"]): figure for figure in figures}, json.loads(
        (root / "raw.json").read_text())


@pytest.mark.slow
def test_quick_run_on_four_processes_reports_exact_bytes(quick_run: tuple) -> None:
    done, figures, _ = quick_run
    assert "LLaMA-MoE-v1-3.5B layer (8 experts, top-2, hidden 64" in done.stdout
    assert f"EP {EP_SIZE} (2 experts per rank)" in done.stdout and f"EP {EP_SIZE} (15 experts per rank)" in done.stdout
    setting = f"llama EP{EP_SIZE}"
    best = figures[(setting, "dedup + c2r+placement bytes / per pair + vanilla")]
    assert best["goal_max"] is not None and 0 < best["value"] < 1  # the goal is stated at EP 4 on real routing
    assert "goal: C2R (published top_t 5) + placement + dedup <=" in done.stdout
    # dedup never sends more rows than per pair on the same routing
    assert figures[(setting, "dedup + vanilla bytes / per pair + vanilla")]["value"] <= 1
    # C2R within the planned groups: one copy per token, fewer bytes than the published lists + placement
    grouped = figures[(setting, "dedup + c2r in groups bytes / per pair + vanilla")]["value"]
    assert 0 < grouped < best["value"]
    assert "C2R in groups keeps the vanilla expert pair of" in done.stdout
    for case in ("llama", "qwen"):  # the benchmark's own three-way check, per layer
        assert figures[(f"{case} EP{EP_SIZE}", "bytes check: lines where dispatch, independent count and place "
                                                "differ")]["value"] == 0
    assert "bytes check: every line agrees" in done.stdout and "DIFFER" not in done.stdout


# ---------------------------------------------------------------------------------------- bytes on real routing
def counted_from_routing(routing: list[list[int]], experts_per_rank: int, per_pair: bool) -> list[dict[str, int]]:
    """Per rank, from the routing alone: rank ``r`` dispatches tokens ``r·c .. (r+1)·c - 1`` (``c = ceil(T / D)``, a
    ``torch.chunk`` of the shared batch); each token sends one row per expert (per pair) or per distinct rank of its
    experts (dedup), remote when that rank is not its own; every remote row comes back from the rank it went to."""
    chunk = -(-len(routing) // EP_SIZE)
    counts = [dict(tokens=0, pairs_remote=0, pairs_local=0, rows_remote=0, rows_local=0, returned_rows_remote=0)
              for _ in range(EP_SIZE)]
    for position, experts in enumerate(routing):
        source = position // chunk
        ranks = [expert // experts_per_rank for expert in experts]
        counts[source]["tokens"] += 1
        counts[source]["pairs_local"] += ranks.count(source)
        counts[source]["pairs_remote"] += len(ranks) - ranks.count(source)
        destinations = ranks if per_pair else list(set(ranks))
        for destination in destinations:
            if destination == source:
                counts[source]["rows_local"] += 1
            else:
                counts[source]["rows_remote"] += 1
                counts[destination]["returned_rows_remote"] += 1
    return counts


def placement_of(case: dict, checkpoint: str | None, slot: int, llama_reports: dict) -> tuple[list[int], list]:
    """The renumbering of the copy a routing loads (new id ``n`` is the original expert ``order[n]``; the identity for
    the original checkpoint) and the groups ``place`` planned for that layer (contiguous for the original): ``place``
    run here on the published LLaMA-MoE matrices, the Qwen case's ``place`` report (on its profiled C2R routing)."""
    experts_per_rank = NUM_EXPERTS[case["name"]] // EP_SIZE
    if checkpoint is None:
        order = list(range(NUM_EXPERTS[case["name"]]))
        return order, [order[r * experts_per_rank:(r + 1) * experts_per_rank] for r in range(EP_SIZE)]
    order = case["orders"][checkpoint][str(EP_SIZE)][slot]
    if case["name"] == "llama":
        planned_on = dict(PLAN_OF.values())[checkpoint]
        return order, llama_reports[planned_on]["layers"][case["real_layers"][slot]]["groups"]
    return order, case["place_reports"][str(EP_SIZE)]["layers"][slot]["groups"]


@pytest.mark.slow
def test_bytes_on_real_routing_agree_with_the_routing_and_place_per_layer(quick_run: tuple, capsys) -> None:
    _, _, raw = quick_run
    cases = {case["name"]: case for case in raw["plan"]["cases"]}
    ranks = raw["runs"][str(EP_SIZE)]
    assert [data["rank"] for data in ranks] == list(range(EP_SIZE))
    assert cli.main(["place", str(LLAMA_MATRICES), "--ep-size", str(EP_SIZE), "--json"]) == 0
    llama_reports = json.loads(capsys.readouterr().out)["reports"]
    published = load_matrices(LLAMA_MATRICES)  # read here, not from the run
    official = json.loads(QWEN_CONFIG.read_text())
    element_bytes = torch.finfo(torch.float32).bits // 8

    for name, case in cases.items():
        experts_per_rank, hidden = NUM_EXPERTS[name] // EP_SIZE, raw["hidden_sizes"][name]
        real_layers = case["real_layers"]
        for routing_name in ROUTINGS:
            checkpoint = {"c2r+placement": "permuted", "c2r in groups": "grouped"}.get(routing_name)
            for dispatch in DISPATCHES:
                measured = [data["cases"][name][f"{routing_name}|{dispatch}"] for data in ranks]
                layers = measured[0]["routing"]
                assert len(layers) == len(real_layers) == 2 and layers[0] != layers[1]  # two layers, two routings
                for slot, routing in enumerate(layers):
                    where = f"{name} {routing_name} {dispatch} layer {slot}"
                    assert all(run["routing"][slot] == routing for run in measured), where  # one shared batch
                    order, groups = placement_of(case, checkpoint, slot, llama_reports)
                    assert [sorted(order[r * experts_per_rank:(r + 1) * experts_per_rank]) for r in range(EP_SIZE)
                            ] == [sorted(group) for group in groups], where  # each rank's shard is place's group
                    original = np.asarray(order)[np.asarray(routing)]  # the routing in the original expert ids

                    # real routing: LLaMA-MoE pairs drawn from the published counts, Qwen under the official lists
                    if name == "llama" and routing_name in ("vanilla", "c2r", "c2r+placement"):
                        counts = "base_collaboration" if routing_name == "vanilla" else "topt_5_collaboration"
                        matrix = published[counts][real_layers[slot]]
                        assert all(matrix[i, j] > 0 for i, j in original), where
                    if name == "llama" and routing_name == "c2r+placement":  # the C2R tokens, renumbered
                        assert original.tolist() == ranks[0]["cases"][name][f"c2r|{dispatch}"]["routing"][slot], where
                    if name == "qwen" and routing_name in ("c2r", "c2r+placement"):
                        lists = official["collaborative_list"][real_layers[slot]]
                        for experts in original.tolist():
                            assert any(set(experts) <= {top, *lists[top][:official["top_t"]]} for top in experts), where
                    if routing_name == "c2r in groups":  # every token's experts on one rank
                        assert all(len({e // experts_per_rank for e in experts}) == 1 for experts in routing), where

                    independent = counted_from_routing(routing, experts_per_rank, dispatch == "per pair")
                    chunk = -(-len(routing) // EP_SIZE)
                    for rank, run in enumerate(measured):
                        counters = run["layers"][slot]
                        mine = original[rank * chunk:(rank + 1) * chunk]
                        predicted = predict_dispatch(mine, groups, source_ranks=np.full(len(mine), rank))
                        rows = ((predicted.pair_rows_remote, predicted.pair_rows_local) if dispatch == "per pair"
                                else (predicted.dedup_rows_remote, predicted.dedup_rows_local))
                        assert counters["calls"] == 1, where  # the one counted forward
                        assert {key: counters[key] for key in independent[rank]} == independent[rank], (where, rank)
                        assert (counters["rows_remote"], counters["rows_local"]) == rows, (where, rank)
                        assert (counters["pairs_remote"], counters["pairs_local"]) == (
                            predicted.pair_rows_remote, predicted.pair_rows_local), (where, rank)
                        bytes_remote = independent[rank]["rows_remote"] * hidden * element_bytes
                        assert counters["hidden_bytes_remote"] == bytes_remote == rows[0] * hidden * element_bytes
                    # every remote row comes back: what the group sent is what it returned
                    assert sum(run["layers"][slot]["rows_remote"] for run in measured) == sum(
                        run["layers"][slot]["returned_rows_remote"] for run in measured), where
