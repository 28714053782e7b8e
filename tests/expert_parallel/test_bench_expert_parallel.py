"""``benchmarks/bench_expert_parallel.py``: it runs end to end under torchrun on the CPU and its figures reach
``--json``; where expert parallelism over NCCL cannot run (fewer than 2 GPUs) it says so instead of figures."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[2]
BENCHMARK = REPO / "benchmarks" / "bench_expert_parallel.py"


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


@pytest.mark.slow
def test_quick_run_on_two_processes_reports_exact_bytes(tmp_path: Path) -> None:
    done = _run("--quick", "--processes", "2", "--cases", "llama", "--json", str(tmp_path / "figures.json"))
    assert done.returncode == 0, (done.stdout + done.stderr)[-6000:]
    assert "LLaMA-MoE-v1-3.5B layer" in done.stdout and "EP 2 (4 experts per rank)" in done.stdout
    assert "not measured (run with --processes 4)" in done.stdout  # the goal is stated at EP 4 only
    figures = {figure["label"]: figure for figure in json.loads((tmp_path / "figures.json").read_text())["figures"]}
    best = figures["dedup + c2r+placement bytes / per pair + vanilla"]
    assert best["setting"] == "llama EP2" and best["goal_max"] is None and 0 < best["value"] < 1
    # dedup never sends more rows than per pair on the same routing
    assert figures["dedup + vanilla bytes / per pair + vanilla"]["value"] <= 1
    # C2R within the planned groups: one copy per token, fewer bytes than the published lists + placement
    grouped = figures["dedup + c2r in groups bytes / per pair + vanilla"]["value"]
    assert 0 < grouped < best["value"]
    assert "C2R in groups keeps the vanilla expert pair of" in done.stdout
