"""``benchmarks/run_all.py`` (the one call a GPU session makes) refuses bad arguments before running anything, and
runs a benchmark end to end on the CPU, reading its figures from the benchmark's own ``--json`` output."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
RUNNER = REPO / "benchmarks" / "run_all.py"


def _run(*argv: str, timeout: int = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(RUNNER), *argv], capture_output=True, text=True, timeout=timeout,
                          cwd=REPO, env={"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"})


@pytest.mark.parametrize(("argv", "named"), [
    (["--device", "cuda"], "--device cuda: CUDA is not available"),
    (["--only", "nope"], "--only"),
    (["--budget", "5"], "--budget: expected more than 20 seconds"),
])
def test_bad_arguments_exit_2_naming_the_flag(argv, named, tmp_path):
    done = _run(*argv, "--output", str(tmp_path / "out"))
    assert done.returncode == 2, done.stderr
    assert named in done.stderr and "Traceback" not in done.stderr
    assert not (tmp_path / "out").exists()


def test_one_benchmark_runs_and_its_figures_reach_the_summary(tmp_path):
    output = tmp_path / "out"
    done = _run("--device", "cpu", "--quick", "--only", "placement", "--output", str(output))
    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads((output / "summary.json").read_text())
    text = json.dumps(summary)
    assert "placement" in text and "copies/token" in done.stdout
