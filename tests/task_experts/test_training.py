"""``scripts/finetune.py --task_experts``: one peft LoRA per task on the patched base, a manifest, clear errors."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import finetune_argv
from safetensors.torch import load_file

from moepatch.mixing.finetune import main
from moepatch.task_experts.manifest import read_manifest
from moepatch.testing import tiny

REPO = Path(__file__).resolve().parents[2]
MELD_TARGETS = {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}


def test_one_expert_per_task_with_melds_recipe(experts_run, base_checkpoint):
    manifest = read_manifest(experts_run)
    assert manifest.tasks == ["chat", "code", "letters", "math"]
    assert manifest.base == str(base_checkpoint.resolve()) and manifest.model_type == "qwen2_moe"
    for expert in manifest.experts:
        config = json.loads((manifest.expert_path(expert.task) / "adapter_config.json").read_text())
        assert (config["r"], config["lora_alpha"], config["lora_dropout"]) == (16, 32.0, 0.0)  # MELD's recipe
        assert set(config["target_modules"]) == MELD_TARGETS == set(expert.target_modules)
        assert expert.examples > 0 and expert.train_loss > 0
        tensors = load_file(str(manifest.expert_path(expert.task) / "adapter_model.safetensors"))
        assert not any(".mlp.gate." in key or "shared_expert_gate" in key for key in tensors)  # routers untouched
        assert any(value.abs().sum() > 0 for key, value in tensors.items() if "lora_B" in key)  # it trained


def test_experts_differ_and_load_on_the_unpatched_base(experts_run, base_checkpoint):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    manifest = read_manifest(experts_run)
    batch = tiny.demo_batch()
    base = AutoModelForCausalLM.from_pretrained(str(base_checkpoint)).eval()
    with torch.no_grad():
        reference = base(**batch).logits
    outputs = {}
    for task in ("chat", "math"):
        model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(str(base_checkpoint)),
                                          str(manifest.expert_path(task))).eval()
        with torch.no_grad():
            outputs[task] = model(**batch).logits
        assert not torch.allclose(outputs[task], reference, atol=1e-4)
    assert not torch.allclose(outputs["chat"], outputs["math"], atol=1e-4)


def test_tasks_selects_and_routed_experts_use_target_parameters(base_checkpoint, tmp_path):
    output = tmp_path / "out"
    assert main(finetune_argv(base_checkpoint, output, "--max_steps", "2", "--tasks", "code", "math",
                              "--expert_routed_experts", "true", "--expert_r", "4", "--expert_alpha", "8")) == 0
    manifest = read_manifest(output)
    assert manifest.tasks == ["code", "math"]
    assert manifest.experts[0].target_parameters == ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]
    config = json.loads((manifest.expert_path("code") / "adapter_config.json").read_text())
    assert config["target_parameters"] == ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]
    keys = load_file(str(manifest.expert_path("code") / "adapter_model.safetensors"))
    assert any("mlp.experts" in key for key in keys)


def _run_script(*argv: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(REPO / "scripts" / "finetune.py"), *argv], capture_output=True,
                          text=True, cwd=REPO)


def _run(capsys, *argv: str) -> tuple[int, str]:
    """``main`` in this process (the script's own exit path is checked once, below): status and stderr."""
    capsys.readouterr()
    code = main(list(argv))
    return code, capsys.readouterr().err


def test_the_script_refuses_with_status_2_and_no_traceback(base_checkpoint, tmp_path):
    output = tmp_path / "out"
    done = _run_script(*finetune_argv(base_checkpoint, output, "--max_steps", "1", "--expert_r", "0"))
    assert done.returncode == 2 and "--expert_r: expected an integer >= 1" in done.stderr
    assert "Traceback" not in done.stderr and not output.exists()


@pytest.mark.parametrize(("extra", "message"), [
    (("--tasks", "nope"), r"--tasks: unknown task\(s\) \['nope'\]"),
    (("--tasks", "code", "code"), r"--tasks: a task is given twice"),
    (("--expert_r", "0"), r"--expert_r: expected an integer >= 1"),
    (("--expert_dropout", "1.5"), r"--expert_dropout: expected a number in \[0, 1\)"),
    (("--expert_r", "0", "--expert_alpha", "-1", "--expert_dropout", "2"),  # every bad value at once, each by its flag
     r"--expert_r: expected an integer >= 1, got 0; --expert_alpha: expected a number > 0, got -1.0; "
     r"--expert_dropout: expected a number in \[0, 1\), got 2.0"),
    (("--initial_weights", "w.json"), r"--initial_weights: --task_experts trains one expert per source"),
    (("--update_every", "5"), r"--update_every: a dynamic-mixing option; --task_experts .* would be ignored"),
])
def test_bad_task_expert_arguments_are_refused_before_anything_is_written(base_checkpoint, tmp_path, capsys, extra,
                                                                         message):
    import re

    output = tmp_path / "out"
    code, err = _run(capsys, *finetune_argv(base_checkpoint, output, "--max_steps", "1", *extra))
    assert code == 2, err
    assert re.search(message, err)
    assert not output.exists() or not any(output.iterdir())


@pytest.mark.parametrize("flag", [("--tasks", "code"), ("--expert_r", "8"), ("--expert_alpha", "8")])
def test_task_flags_need_task_experts(base_checkpoint, tmp_path, capsys, flag):
    argv = [a for a in finetune_argv(base_checkpoint, tmp_path / "out", *flag, "--max_steps", "1")
            if a not in ("--task_experts", "true")]
    code, err = _run(capsys, *argv)
    assert code == 2 and f"{flag[0]}: only applies with --task_experts true" in err


def test_routed_experts_without_a_peft_layout_are_refused(tmp_path, capsys):
    checkpoint = tiny.save_tiny_checkpoint(tmp_path / "llama_moe", "llama_moe")
    output = tmp_path / "out"
    code, err = _run(capsys, *finetune_argv(checkpoint, output, "--max_steps", "1", "--expert_routed_experts", "true"))
    assert code == 2, err
    assert "--expert_routed_experts: peft has no target_parameters layout" in err
    assert not (output / "experts").exists()


def test_synthetic_data_never_overwrites_a_users_data_folder(base_checkpoint, tmp_path, capsys):
    """``--synthetic_data`` writes OUT/data: a file there it would not write byte for byte is refused, untouched."""
    output = tmp_path / "out"
    mine = output / "data" / "train" / "chat.jsonl"
    mine.parent.mkdir(parents=True)
    mine.write_text('{"conversations": []}\n')
    code, err = _run(capsys, *finetune_argv(base_checkpoint, output, "--max_steps", "1"))
    assert code == 2, err
    assert "chat.jsonl exists and is not what --synthetic_data writes there" in err
    assert mine.read_text() == '{"conversations": []}\n'
    assert sorted(output.rglob("*")) == [mine.parent.parent, mine.parent, mine]


def test_bias_update_is_refused_for_task_experts(tmp_path, capsys):
    """The bias update moves the base's selection biases, which a LoRA expert does not save."""
    checkpoint = tiny.save_tiny_checkpoint(tmp_path / "dsv3", "deepseek_v3", moepatch={"bias_update": {"rate": 1e-3}})
    output = tmp_path / "out"
    code, err = _run(capsys, *finetune_argv(checkpoint, output, "--max_steps", "1"))
    assert code == 2, err
    assert "--task_experts: the moepatch block has bias_update" in err
    assert not output.exists() or not any(output.iterdir())


def test_manifest_errors_name_the_problem(experts_run, tmp_path):
    import shutil

    copy = tmp_path / "experts"
    shutil.copytree(experts_run / "experts", copy)
    shutil.rmtree(copy / "code")
    with pytest.raises(ValueError, match=r"experts\[1\]: the expert of task 'code' is missing"):
        read_manifest(copy)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match=r"no manifest\.json here"):
        read_manifest(tmp_path / "empty")
    manifest = read_manifest(experts_run)
    with pytest.raises(ValueError, match=r"unknown task\(s\) \['nope'\]"):
        manifest.check_tasks(["chat", "nope"])
    with pytest.raises(ValueError, match=r"a mixtral model with hidden size"):
        manifest.check_base(tiny.tiny_model("mixtral").config, "--base")


def test_meld_recipe_parses_into_the_task_expert_arguments(tmp_path):
    from moepatch.mixing.finetune import parse_arguments

    _, data, _, training, experts = parse_arguments([
        "--recipe", str(REPO / "configs" / "meld_task_experts.json"), "--model_name_or_path", "ckpt", "--data_dir",
        "d", "--output_dir", str(tmp_path / "out"), "--use_cpu"])
    assert experts.task_experts and (experts.expert_r, experts.expert_alpha, experts.expert_dropout) == (16, 32, 0.0)
    assert training.lr_scheduler_type == "cosine" and training.learning_rate == 1e-4 and not data.dynamic_sampling


def test_recipe_run_end_to_end_with_flag_overrides(base_checkpoint, tmp_path):
    output = tmp_path / "out"
    assert main(["--recipe", str(REPO / "configs" / "meld_task_experts.json"), *finetune_argv(
        base_checkpoint, output, "--max_steps", "1", "--tasks", "chat")]) == 0
    assert read_manifest(output).tasks == ["chat"]


def test_an_empty_task_is_named_and_nothing_is_written(base_checkpoint, tmp_path, capsys):
    from moepatch.data.synthetic import synthetic_records

    data = tmp_path / "data" / "train"
    data.mkdir(parents=True)
    (data / "code.jsonl").write_text("".join(json.dumps(r) + "\n" for r in synthetic_records("code", 10)))
    (data / "empty.jsonl").write_text("")
    output = tmp_path / "out"
    argv = [a for a in finetune_argv(base_checkpoint, output, "--max_steps", "1", "--probe_size", "2",
                                     "--data_dir", str(tmp_path / "data")) if a != "--synthetic_data"]
    code, err = _run(capsys, *argv)
    assert code == 1 and "source 'empty':" in err and "holds no record" in err
    assert not output.exists()


def test_retraining_some_tasks_keeps_the_others_and_drops_the_stale_router(base_checkpoint, tmp_path, caplog):
    import logging

    output = tmp_path / "out"
    assert main(finetune_argv(base_checkpoint, output, "--max_steps", "1", "--tasks", "code", "math")) == 0
    (output / "experts" / "router").mkdir()
    before = load_file(str(output / "experts" / "code" / "adapter_model.safetensors"))
    with caplog.at_level(logging.WARNING, logger="moepatch.task_experts"):
        assert main(finetune_argv(base_checkpoint, output, "--max_steps", "1", "--tasks", "math")) == 0
    assert read_manifest(output).tasks == ["code", "math"]
    after = load_file(str(output / "experts" / "code" / "adapter_model.safetensors"))
    assert all(torch.equal(before[key], after[key]) for key in before)  # untouched
    assert not (output / "experts" / "router").exists() and "removed router of the earlier run" in caplog.text
    assert not (output / "task_runs").exists()


def test_a_source_without_a_dev_file_trains_on_all_its_records(base_checkpoint, tmp_path):
    from moepatch.data.synthetic import synthetic_records

    data = tmp_path / "data" / "train"
    data.mkdir(parents=True)
    for task in ("code", "math"):
        (data / f"{task}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in synthetic_records(task, 12)))
    output = tmp_path / "out"
    argv = [a for a in finetune_argv(base_checkpoint, output, "--max_steps", "1", "--probe_size", "4",
                                     "--data_dir", str(tmp_path / "data")) if a != "--synthetic_data"]
    assert main(argv) == 0
    assert [expert.examples for expert in read_manifest(output).experts] == [12, 12]


@pytest.mark.parametrize("value", ["inf", "nan"])
def test_non_finite_alpha_is_refused(base_checkpoint, tmp_path, capsys, value):
    code, err = _run(capsys, *finetune_argv(base_checkpoint, tmp_path / "out", "--max_steps", "1", "--expert_alpha",
                                            value))
    assert code == 2 and "--expert_alpha: expected a number > 0" in err
