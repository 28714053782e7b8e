"""The demo writes into a staged copy of ``--output``: a failure at any step leaves the folder exactly as it was,
and a success leaves no trace of the staged copy's path in what it wrote."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from moepatch.demo import run as demo
from moepatch.errors import CommandError
from moepatch.staged_output import STAGING_MARK


def _tree(folder: Path) -> dict[str, bytes | None]:
    """Every entry under ``folder`` (and the entries beside it) with its bytes; folders as ``None``."""
    entries: dict[str, bytes | None] = {}
    for path in sorted(folder.parent.rglob("*")):
        entries[str(path.relative_to(folder.parent))] = path.read_bytes() if path.is_file() else None
    return entries


def _fail_at_task_experts(checkpoint: Path, output: Path, **kwargs: object) -> None:
    output.mkdir(parents=True)
    (output / "half-written.json").write_text("{}")
    raise CommandError("step 8 failed on purpose")


@pytest.mark.parametrize("earlier", [False, True])
def test_a_failing_demo_leaves_the_output_exactly_as_it_was(earlier: bool, tmp_path: Path,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    output = tmp_path / "demo"
    if earlier:  # an earlier demo's outputs, and a file of the user's
        demo.run_demo(output, finetune_steps=0, expert_steps=0, log=lambda line: None)
        (output / "notes.txt").write_text("mine")
    before = _tree(output)
    monkeypatch.setattr(demo, "task_experts_demo", _fail_at_task_experts)
    lines: list[str] = []
    with pytest.raises(CommandError, match="failed on purpose"):
        demo.run_demo(output, finetune_steps=2, expert_steps=2, log=lines.append)
    assert any(line.startswith("[7/8]") for line in lines)  # it failed after writing a fine-tune
    assert _tree(output) == before


def test_a_finished_demo_names_only_its_final_folder(tmp_path: Path) -> None:
    output = tmp_path / "demo"
    lines: list[str] = []
    assert demo.run_demo(output, finetune_steps=2, expert_steps=2, log=lines.append) == output
    assert not any(STAGING_MARK in line for line in lines) and any(str(output) in line for line in lines)
    assert sorted(path.name for path in tmp_path.iterdir()) == ["demo"]  # no staged copy left beside it
    for path in output.rglob("*"):
        if path.is_file():
            assert STAGING_MARK.encode() not in path.read_bytes(), path
    manifest = json.loads((output / "task_experts" / "experts" / "manifest.json").read_text())
    expert = output / "task_experts" / "experts" / manifest["experts"][0]["path"]
    base = json.loads((expert / "adapter_config.json").read_text())["base_model_name_or_path"]
    assert Path(base) == output / "checkpoint" and (Path(base) / "config.json").is_file()
    arguments = torch.load(output / "finetune" / "training_args.bin", weights_only=False)  # written by this test
    assert Path(arguments.output_dir) == output / "finetune"


def test_a_terminated_demo_leaves_nothing_behind(tmp_path: Path) -> None:
    """``timeout`` / ``kill`` send SIGTERM: the command stops like on Ctrl-C, and the staged copy goes with it."""
    output = tmp_path / "demo"
    process = subprocess.Popen([sys.executable, "-m", "moepatch.cli", "demo", "--output", str(output),
                                "--finetune-steps", "2", "--expert-steps", "2"],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               env=dict(os.environ, OMP_NUM_THREADS="1"))
    deadline = time.monotonic() + 120
    while not list(tmp_path.glob(f".demo{STAGING_MARK}*/checkpoint/config.json")):
        assert process.poll() is None and time.monotonic() < deadline, process.communicate()
        time.sleep(0.05)
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 143 and "moepatch demo: terminated" in stderr, stderr
    assert list(tmp_path.iterdir()) == []
