"""Task experts (``scripts/finetune.py --task_experts``) under transformers' expert parallelism, and the README's EP
fine-tune recipe run as written.

Two torchrun launches (gloo processes on CPU): the task-experts run on 4 processes (``--ep_size 4``: 2 of the tiny
model's 8 routed experts per rank) and the README recipe as written (2 processes).

What the task-experts run is compared with, and why: under ``--ep_size N`` each rank trains on its own batches (data
parallelism over the ranks; the routed experts are split between them) and the Trainer averages the adapters'
gradients, so one optimizer step sees batches ``Ns`` to ``Ns + N - 1`` of the same seeded sampler.  A single process
with ``--gradient_accumulation_steps N`` and the same per-device batch size takes exactly those N batches (same
padding, the loss normalised by the tokens of all of them), from the same LoRA initialisation (rank 0's, broadcast).
So each expert's adapter tensors and its recorded train loss must equal that run's up to float32 summation order, with
every ``lora_B`` moved well away from its zero start.  Both runs use SGD: Adam's first step is ``lr · g / |g|`` per
element, which turns float noise in a near-zero gradient component into a difference of up to ``lr`` (seen: 4e-6 on
values of 7e-3 with lr 5e-3), so it would hide what is compared.

The deadlock this replaces: rank 0 alone called peft's ``save_pretrained``, which gathers every sharded weight of the
whole model (``DTensor.full_tensor``, a collective) while rank 1 had gone on to the next task's Trainer (whose first
collective is a broadcast of the new adapter): two different collectives, both waiting forever.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import free_port
from helpers import torchrun_command
from safetensors.torch import load_file

from moepatch.cli import main as cli
from moepatch.data.synthetic import synthetic_records
from moepatch.mixing.finetune import main as finetune
from moepatch.staged_output import STAGING_MARK
from moepatch.task_experts.run_folder import read_run
from moepatch.testing import tiny

REPO = Path(__file__).resolve().parents[2]
TASKS = ["chat", "code", "letters", "math"]
EP_PROCESSES = 4
"""Processes (= ``--ep_size``) of the task-experts run: each rank holds 2 of the tiny model's 8 routed experts."""
EP_BATCH = 2
"""Per-device batch of the task-experts run and of the single process it is compared with (8 examples a step)."""


def _env(**extra: str) -> dict[str, str]:
    return dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join([str(REPO), *sys.path]), **extra)


def _argv(checkpoint: Path, output: Path, *extra: str, batch_size: int = 4) -> list[str]:
    return ["--model_name_or_path", str(checkpoint), "--output_dir", str(output), "--use_cpu", "--report_to", "none",
            "--per_device_train_batch_size", str(batch_size), "--optim", "sgd", "--learning_rate", "0.5",
            "--max_length", "64", "--seed", "0", "--save_strategy", "no", "--synthetic_data", "--task_experts", "true",
            "--expert_r", "4", "--max_steps", "2", *extra]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Frozen routers, as a user fine-tuning task experts on an MoE would have them."""
    return tiny.save_tiny_checkpoint(tmp_path_factory.mktemp("te-ep") / "qwen2_moe", "qwen2_moe", seed=0,
                                     moepatch={"freeze_gate": "router"})


@pytest.fixture(scope="module")
def ep_run(checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """``--task_experts`` under ``torchrun --nproc_per_node 4 ... --ep_size 4``: (output folder, stdout)."""
    output = tmp_path_factory.mktemp("te-ep-run") / "out"
    command = torchrun_command(str(REPO / "scripts" / "finetune.py"),
                               *_argv(checkpoint, output, "--ep_size", str(EP_PROCESSES), "--ep_implementation",
                                      "moepatch_dedup", batch_size=EP_BATCH), processes=EP_PROCESSES)
    result = subprocess.run(command, env=_env(), capture_output=True, text=True, timeout=400)
    assert "moepatch finetune: done, 4 task experts" in result.stdout, (result.stdout + result.stderr)[-6000:]
    return output, result.stdout


@pytest.fixture(scope="module")
def single_run(checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The same run in one process, N accumulated batches per step (the batches the N ranks see together)."""
    output = tmp_path_factory.mktemp("te-ep-single") / "out"
    assert finetune(_argv(checkpoint, output, "--gradient_accumulation_steps", str(EP_PROCESSES),
                          batch_size=EP_BATCH)) == 0
    return output


@pytest.mark.slow
def test_every_task_expert_trains_under_ep_into_one_readable_run_folder(ep_run: tuple[Path, str]) -> None:
    output, stdout = ep_run
    manifest = read_run(output)  # every file of the run checked: manifest, each adapter's config and weights
    assert manifest.complete and manifest.tasks == TASKS
    assert stdout.count("moepatch finetune: done") == 1  # rank 0 reports, once
    assert all(expert.train_loss is not None and expert.train_loss > 0 for expert in manifest.experts)
    leftovers = [path for path in output.rglob("*") if STAGING_MARK in path.name or path.name == "task_runs"]
    assert not leftovers  # every expert moved into place whole, no per-task Trainer folder left
    summary = json.loads((output / "moepatch_finetune_summary.json").read_text())
    assert [expert["task"] for expert in summary["task_experts"]] == TASKS


def _adapter_config(run: Path, task: str) -> dict:
    config = json.loads((run / "experts" / task / "adapter_config.json").read_text())
    return {**config, "target_modules": sorted(config["target_modules"])}  # peft writes a set, in any order


@pytest.mark.slow
def test_each_expert_equals_the_single_process_run_on_the_same_batches(ep_run: tuple[Path, str],
                                                                      single_run: Path) -> None:
    """See the module docstring: same batches per step, same start, so equal up to float32 summation order."""
    output = ep_run[0]
    ep_manifest, single_manifest = read_run(output), read_run(single_run)
    for ep_expert, single_expert in zip(ep_manifest.experts, single_manifest.experts, strict=True):
        assert ep_expert.task == single_expert.task and ep_expert.examples == single_expert.examples
        assert ep_expert.train_loss == pytest.approx(single_expert.train_loss, rel=1e-5)  # the ranks' mean
        assert _adapter_config(output, ep_expert.task) == _adapter_config(single_run, ep_expert.task)
        ep_weights = load_file(str(output / "experts" / ep_expert.task / "adapter_model.safetensors"))
        single_weights = load_file(str(single_run / "experts" / ep_expert.task / "adapter_model.safetensors"))
        assert ep_weights.keys() == single_weights.keys() and len(ep_weights) == 56  # 4 layers x 7 projections x A, B
        for key, value in ep_weights.items():
            torch.testing.assert_close(value, single_weights[key], atol=1e-6, rtol=1e-5, msg=key)
        trained = [value for key, value in ep_weights.items() if "lora_B" in key]
        assert min(float(value.abs().max()) for value in trained) > 1e-3  # every B moved from its zero start


@pytest.mark.slow
def test_router_and_routes_on_the_ep_run_folder(ep_run: tuple[Path, str], tmp_path: Path) -> None:
    run = tmp_path / "out"
    shutil.copytree(ep_run[0], run)
    assert cli(["experts", "fit-router", str(run), "--max-examples", "8"]) == 0
    requests = tmp_path / "requests.jsonl"
    requests.write_text("".join(json.dumps({**record, "task": task}) + "\n" for task in TASKS
                                for record in synthetic_records(task, 2, seed=5)))
    assert cli(["experts", "route", str(run), "--input", str(requests), "--top-k", "2"]) == 0
    routes = [json.loads(line) for line in (run / "experts" / "routes.jsonl").read_text().splitlines()]
    assert len(routes) == 8 and all(set(route["tasks"]) <= set(TASKS) for route in routes)
    read_run(run)  # the router written beside the EP-trained experts reads back with them


def readme_ep_recipe() -> str:
    """The fine-tune code block of the README's expert-parallelism section, as a user copies it."""
    readme = (REPO / "README.md").read_text()
    section = readme[readme.index("## Expert parallelism"):]
    section = section[:section.index("\n## ", 1)]
    blocks = re.findall(r"```bash\n(.*?)```", section, flags=re.S)
    recipe = [block for block in blocks if "torchrun" in block and "scripts/finetune.py" in block]
    assert len(recipe) == 1, blocks
    return recipe[0]


@pytest.mark.slow
def test_the_readme_ep_finetune_recipe_runs_as_written(tmp_path: Path) -> None:
    """The block runs verbatim in a folder holding ``./ckpt`` (a tiny checkpoint, as the README says to make one)
    and the repository's ``scripts/``; torchrun's port comes from its own ``PET_MASTER_PORT`` variable (tests run
    side by side), and ``torchrun`` is this environment's."""
    recipe = readme_ep_recipe()
    tiny.save_tiny_checkpoint(tmp_path / "ckpt", "qwen2_moe")
    (tmp_path / "scripts").symlink_to(REPO / "scripts")
    env = _env(PET_MASTER_ADDR="127.0.0.1", PET_MASTER_PORT=str(free_port()),
               PATH=os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")]))
    result = subprocess.run(["bash", "-e", "-c", recipe], cwd=tmp_path, env=env, capture_output=True, text=True,
                            timeout=400)
    log = result.stdout + result.stderr
    assert result.returncode == 0 and "moepatch finetune: done, 2 steps" in result.stdout, log[-6000:]
    summary = json.loads((tmp_path / "out" / "moepatch_finetune_summary.json").read_text())
    assert summary["global_step"] == 2 and summary["world_size"] == 2
    experts = load_file(str(tmp_path / "out" / "lora_experts.safetensors"))  # the block's LoRA experts trained
    assert any(value.abs().sum() > 0 for key, value in experts.items() if "lora_B" in key)


def test_task_experts_on_the_routed_experts_under_ep_are_refused_before_loading(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """peft's ``target_parameters`` LoRA adds a delta of every expert to a rank's DTensor shard (torch refuses the
    mix): refused by name before anything loads or is written. The arguments are parsed in this single process, then
    checked with ``WORLD_SIZE`` as torchrun sets it for ``--ep_size 2`` (its launch check passes; ``--ep_size 1``,
    no expert parallelism, is refused when parsed)."""
    from moepatch.errors import UsageError
    from moepatch.training.parsing import parse
    from moepatch.training.preflight import check_inputs

    checkpoint = tiny.save_tiny_checkpoint(tmp_path / "ckpt", "qwen2_moe")
    output = tmp_path / "out"
    parsed = parse(_argv(checkpoint, output, "--expert_routed_experts", "true", "--ep_size", "2"))
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(UsageError, match=r"--expert_routed_experts: .* under expert parallelism \(--ep_size\)"):
        check_inputs(*parsed)
    assert not output.exists()
