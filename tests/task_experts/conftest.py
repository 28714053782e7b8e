"""A tiny Qwen2-MoE with one trained task expert per embedded task, shared by the task-expert tests."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from moepatch.mixing.finetune import main
from moepatch.testing import tiny


def finetune_argv(checkpoint: Path, output: Path, *extra: str) -> list[str]:
    return ["--model_name_or_path", str(checkpoint), "--output_dir", str(output), "--use_cpu", "--report_to", "none",
            "--per_device_train_batch_size", "4", "--learning_rate", "5e-3", "--max_length", "64", "--seed", "0",
            "--save_strategy", "no", "--synthetic_data", "--task_experts", "true", *extra]


@pytest.fixture(scope="session")
def base_checkpoint(tmp_path_factory) -> Path:
    """Patched base: frozen routers, as a user fine-tuning experts on an MoE would have them."""
    return tiny.save_tiny_checkpoint(tmp_path_factory.mktemp("te_base") / "qwen2_moe", "qwen2_moe", seed=0,
                                     moepatch={"freeze_gate": "router"})


@pytest.fixture(scope="session")
def experts_run(base_checkpoint, tmp_path_factory) -> Path:
    """``finetune --task_experts``: four experts (chat, code, letters, math), 6 steps each."""
    output = tmp_path_factory.mktemp("te_run") / "out"
    assert main(finetune_argv(base_checkpoint, output, "--max_steps", "6")) == 0
    return output


def copy_run(experts_run: Path, folder: Path, *, data: bool = True) -> Path:
    """A private copy of the trained run (its experts and, with ``data``, its data) for tests that write into it."""
    copy = folder / "out"
    shutil.copytree(experts_run / "experts", copy / "experts")
    if data:
        shutil.copytree(experts_run / "data", copy / "data")
    return copy
