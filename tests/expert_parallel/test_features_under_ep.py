"""moepatch's features on a model loaded under transformers' expert parallelism (gloo, CPU, torchrun).

``features_worker.py`` loads a tiny Qwen2-MoE (8 experts, top-2) with ``DistributedConfig(..., ep_size=N)`` and
dispatch ``"moepatch_dedup"`` or ``"all_to_all"``, applies each feature with :func:`moepatch.apply` next to the
single-process model with the same block, and writes the figures asserted here: frozen routers, routing statistics
per rank and all-reduced, C2R logits (``top_t`` 1 and E-1), C2R's balance loss on the actual choice, MoLoRA experts
on attention (fresh and trained a step). Two launches: 2 ranks in both layouts (``shared``: tp = ep = 2, one batch;
``separate``: tp = 1, fsdp = ep = 2, a batch per rank) with both dispatches, and 4 ranks (``separate``, dedup).

Then ``scripts/finetune.py --ep_size 2`` under torchrun trains frozen routers + MoLoRA experts on attention to the
end, and ``--ep_size`` values that cannot work are refused before anything loads.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import torchrun_command
from safetensors.torch import load_file

import moepatch
from moepatch.errors import UsageError
from moepatch.mixing.finetune import ModelArguments
from moepatch.mixing.finetune import expert_parallel_config
from moepatch.testing import tiny

WORKER = Path(__file__).with_name("features_worker.py")
REPO = Path(__file__).resolve().parents[2]
RUNS = {"2 ranks": (2, ("shared", "separate"), ("moepatch_dedup", "all_to_all")),
        "4 ranks": (4, ("separate",), ("moepatch_dedup",))}
"""Each run is one torchrun launch: processes, layouts, dispatches."""
ROUTERS = {f"model.layers.{i}.mlp.gate.weight" for i in (0, 2, 3)}  # tiny Qwen2-MoE: layer 1 is dense


def _env() -> dict[str, str]:
    return dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join([str(REPO), *sys.path]))


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny.save_tiny_checkpoint(tmp_path_factory.mktemp("ep-features") / "qwen2_moe", "qwen2_moe")


@pytest.fixture(scope="module")
def runs(checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, list[dict]]:
    """Run name → each rank's results (layout/dispatch → feature → figures)."""
    results = {}
    for name, (processes, layouts, implementations) in RUNS.items():
        output = tmp_path_factory.mktemp(f"ep-features-{processes}")
        command = torchrun_command(str(WORKER), str(checkpoint), str(output), ",".join(layouts),
                                   ",".join(implementations), processes=processes)
        result = subprocess.run(command, env=_env(), capture_output=True, text=True, timeout=400)
        log = result.stdout + result.stderr
        assert all(f"rank {r} done" in result.stdout for r in range(processes)), log[-6000:]
        results[name] = [json.loads((output / f"rank{r}.json").read_text()) for r in range(processes)]
    return results


def cases(runs: dict[str, list[dict]]):
    """(where, figures of one rank, one layout and dispatch)."""
    for run, ranks in runs.items():
        for rank, result in enumerate(ranks):
            for case, figures in result.items():
                yield f"{run}, rank {rank}, {case}", figures


@pytest.mark.slow
def test_freeze_gate_freezes_exactly_the_routers_and_a_step_leaves_them(runs: dict[str, list[dict]]) -> None:
    for where, figures in cases(runs):
        freeze = figures["freeze"]
        assert set(freeze["frozen"]) == set(freeze["expected"]) == ROUTERS, where
        assert freeze["routers_unchanged"] and freeze["others_moved"] > 0, (where, freeze["others_moved"])


@pytest.mark.slow
def test_routing_statistics_per_rank_and_all_reduced(runs: dict[str, list[dict]]) -> None:
    for where, figures in cases(runs):
        stats = figures["stats"]
        assert stats["local"] == stats["expected_local"], where  # this rank's tokens, as one process counts them
        assert stats["reduced"] == stats["expected_reduced"], where  # recorder.all_reduce(): the group's total
        assert sum(stats["local"][0]) > 0, where


@pytest.mark.slow
def test_c2r_and_its_balance_loss_equal_the_single_process_model(runs: dict[str, list[dict]]) -> None:
    for where, figures in cases(runs):
        assert figures["plain_logits"] <= 1e-5, where
        assert figures["c2r_top_t_1"] <= 1e-5 and figures["c2r_top_t_7"] <= 1e-5, where
        balance = figures["balance_loss"]
        assert balance["aux_loss"] == pytest.approx(balance["expected_aux_loss"], abs=1e-6), where
        assert balance["loss"] == pytest.approx(balance["expected_loss"], abs=1e-5), where


@pytest.mark.slow
def test_lora_experts_on_attention_fresh_and_trained(runs: dict[str, list[dict]]) -> None:
    for where, figures in cases(runs):
        lora = figures["lora"]
        assert lora["same_names"] and lora["count"] == 112, where  # 4 layers x q, k, v, o x (3 A + 3 B + router)
        assert lora["fresh_equal"], where  # a fresh injection changes nothing, bit for bit
        assert lora["adapted_logits"] <= 1e-5 and lora["logits"] <= 1e-5 and lora["loss"] <= 1e-6, (where, lora)
        assert lora["grads"] <= 1e-6 and lora["min_grad_norm"] > 1e-3, (where, lora)


@pytest.mark.slow
def test_finetune_keeps_added_adapters_data_parallel(runs: dict[str, list[dict]]) -> None:
    """Each rank its own batch: adapters start as rank 0's and their gradients are the ranks' average."""
    checked = 0
    for where, figures in cases(runs):
        if "data_parallel_lora" in figures:
            figures = figures["data_parallel_lora"]
            assert figures["count"] == 112 and figures["min_grad_norm"] > 1e-3, (where, figures)
            assert figures["grads"] <= 1e-6, (where, figures)
            checked += 1
    assert checked == 2 * 2 + 4  # the separate layout: 2 ranks x 2 dispatches, 4 ranks x 1


@pytest.mark.slow
def test_finetune_script_under_torchrun_with_expert_parallelism(checkpoint: Path, tmp_path: Path) -> None:
    block = tmp_path / "block.json"
    block.write_text(json.dumps({"freeze_gate": "router", "lora_experts": {
        "method": "molora", "num_experts": 3, "r": 4, "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj"]}}))
    output = tmp_path / "run"
    command = torchrun_command(
        str(REPO / "scripts" / "finetune.py"), "--model_name_or_path", str(checkpoint), "--output_dir", str(output),
        "--use_cpu", "--report_to", "none", "--per_device_train_batch_size", "4", "--learning_rate", "5e-3",
        "--max_length", "64", "--seed", "0", "--save_strategy", "no", "--synthetic_data", "--max_steps", "2",
        "--logging_steps", "1", "--moepatch_config", str(block), "--ep_size", "2",
        "--ep_implementation", "moepatch_dedup")
    result = subprocess.run(command, env=_env(), capture_output=True, text=True, timeout=400)
    log = result.stdout + result.stderr
    assert "moepatch finetune: done, 2 steps" in result.stdout, log[-6000:]
    summary = json.loads((output / "moepatch_finetune_summary.json").read_text())
    assert summary["global_step"] == 2 and summary["world_size"] == 2
    base, trained = load_file(str(checkpoint / "model.safetensors")), load_file(str(output / "model.safetensors"))
    assert base.keys() == trained.keys()  # the LoRA experts are kept out of the model's own file
    assert all(torch.equal(base[key], trained[key]) for key in base)  # every expert gathered back, base frozen
    experts = load_file(str(output / "lora_experts.safetensors"))
    assert any(value.abs().sum() > 0 for key, value in experts.items() if "lora_B" in key)  # the adapters trained
    assert moepatch.get_handle(moepatch.from_pretrained(output)).lora_targets


@pytest.mark.parametrize(("size", "world", "message"), [
    (2, "1", "2 but this launch has 1 process"),
    (3, "3", "3 does not divide the model's 8 routed experts"),
])
def test_an_unfit_ep_size_is_refused_by_name(size: int, world: str, message: str,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WORLD_SIZE", world)
    arguments = ModelArguments(model_name_or_path="unused", ep_size=size)
    with pytest.raises(UsageError, match="--ep_size") as error:
        expert_parallel_config(arguments, tiny.tiny_config("qwen2_moe"))
    assert message in str(error.value)


def test_ep_arguments_are_checked_when_parsed() -> None:
    with pytest.raises(UsageError, match="--ep_size"):
        ModelArguments(model_name_or_path="unused", ep_size=0)
    with pytest.raises(UsageError, match="--ep_implementation"):
        ModelArguments(model_name_or_path="unused", ep_size=2, ep_implementation="all_reduce")
    with pytest.raises(UsageError, match="--ep_implementation"):
        ModelArguments(model_name_or_path="unused", ep_implementation="moepatch_dedup")  # no --ep_size
    config = expert_parallel_config(ModelArguments(model_name_or_path="unused"), tiny.tiny_config("qwen2_moe"))
    assert config is None


def test_task_experts_under_ep_are_refused_before_loading(checkpoint: Path, tmp_path: Path,
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    from moepatch.mixing.finetune import main

    argv = ["--model_name_or_path", str(checkpoint), "--output_dir", str(tmp_path / "out"), "--use_cpu",
            "--report_to", "none", "--synthetic_data", "--task_experts", "true", "--max_steps", "1", "--ep_size", "1"]
    assert main(argv) == 2
    assert "--ep_size" in capsys.readouterr().err and not (tmp_path / "out").exists()
