"""Task experts on every family the README claims: train, merge, mixed batches, reload through peft alone."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import finetune_argv

from moepatch.cli import main as cli
from moepatch.mixing.finetune import main
from moepatch.task_experts.manifest import read_manifest
from moepatch.task_experts.serving import TaskExpertModel
from moepatch.testing import tiny

REPO = Path(__file__).resolve().parents[2]
FAMILIES = ["mixtral", "qwen3_moe", "olmoe", "llama_moe", "qwen3_5_moe", "jamba", "deepseek_v2", "hunyuan_v1_moe",
            *tiny.KIND_FAMILIES]
TEXTS = ["Compute 3 + 4 and give the number.", "Write a Python function that returns 7.", "Say hello.",
         "List the letters of ROUTER."]


def _train(family: str, root: Path, *extra: str) -> Path:
    checkpoint = tiny.save_tiny_checkpoint(root / "ckpt", family)
    output = root / "out"
    assert main(finetune_argv(checkpoint, output, "--max_steps", "1", "--tasks", "code", "math",
                              "--disable_tqdm", "true", *extra)) == 0
    return output


@pytest.mark.parametrize("family", FAMILIES)
def test_task_experts_train_merge_serve_and_reload_with_peft(family, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    output = _train(family, tmp_path)
    manifest = read_manifest(output)
    assert manifest.model_type == tiny.tiny_model(family).config.model_type
    config = json.loads((manifest.expert_path("code") / "adapter_config.json").read_text())
    assert not config.get("target_parameters")  # the routed experts only when asked
    assert cli(["experts", "merge", str(output), "--tasks", "code", "math"]) == 0
    serving = TaskExpertModel.from_experts(output, with_router=False)
    adapters = ["code", "math", "code+math", "__base__"]
    mixed = serving.generate_with(TEXTS, adapters, max_new_tokens=4)
    assert mixed == [serving.generate_with([text], [name], max_new_tokens=4)[0]
                     for text, name in zip(TEXTS, adapters, strict=True)]
    # peft alone, on the unpatched base, loads each adapter to the same function (nothing renamed on the way)
    batch = serving.tokenizer(TEXTS[:1], return_tensors="pt")
    for name, folder in (("code", manifest.expert_path("code")),
                         ("code+math", manifest.folder / "merged" / "code+math")):
        alone = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(manifest.base), str(folder)).eval()
        with torch.no_grad():
            expected = alone(**batch).logits[:, -1].float()
        torch.testing.assert_close(serving.logits(TEXTS[:1], [name]), expected, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("family", ["qwen3_moe", "olmoe", "mixtral"])
def test_routed_experts_are_adapted_when_asked_served_by_adapter_group_and_merged(family, tmp_path):
    output = _train(family, tmp_path, "--expert_routed_experts", "true", "--expert_r", "4")
    manifest = read_manifest(output)
    assert manifest.experts[0].target_parameters
    serving = TaskExpertModel.from_experts(output, with_router=False)
    assert not serving.mixed_batches  # peft's ParamWrapper has no mixed batches: grouped by adapter instead
    adapters = ["code", "math", "code", "__base__"]
    grouped = serving.generate_with(TEXTS, adapters, max_new_tokens=3)
    assert grouped == [serving.generate_with([text], [name], max_new_tokens=3)[0]
                       for text, name in zip(TEXTS, adapters, strict=True)]
    # the fused experts merge too (peft refuses them; moepatch merges them in peft's layout): the merge with
    # weights 1, 1 is the two experts active together, as peft computes it
    assert cli(["experts", "merge", str(output), "--tasks", "code", "math", "--weights", "1", "1",
                "--name", "both"]) == 0
    serving = TaskExpertModel.from_experts(output, with_router=False)
    merged = serving.logits(TEXTS, ["both"] * len(TEXTS))
    serving.model.base_model.set_adapter(["code", "math"])
    with torch.no_grad():
        together = serving.model(**serving._encode(TEXTS)).logits[:, -1].float()
    torch.testing.assert_close(merged, together, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(("family", "message"), [
    ("moduleformer", "no nn.Linear projection of ModuleFormerForCausalLM is named"),
    ("dbrx", "no nn.Linear projection of DbrxForCausalLM is named"),
])
def test_families_without_named_linear_projections_are_refused_before_writing(family, message, tmp_path):
    checkpoint = tiny.save_tiny_checkpoint(tmp_path / "ckpt", family)
    output = tmp_path / "out"
    done = subprocess.run([sys.executable, str(REPO / "scripts" / "finetune.py"),
                           *finetune_argv(checkpoint, output, "--max_steps", "1")],
                          capture_output=True, text=True, cwd=REPO)
    assert done.returncode == 2 and f"--expert_target_modules: {message}" in done.stderr
    assert not output.exists()


def test_dense_and_shared_mlp_names_peft_would_rewrite_are_left_out_with_a_warning(tmp_path, caplog):
    """DeepSeek-V2: peft maps gate/up/down_proj onto the fused routed experts for this model type."""
    import logging

    with caplog.at_level(logging.WARNING, logger="moepatch.finetune"):
        output = _train("deepseek_v2", tmp_path)
    assert "peft rewrites these names on deepseek_v2 into target_parameters" in caplog.text
    assert read_manifest(output).experts[0].target_modules == ["o_proj", "q_proj"]


@pytest.mark.parametrize(("family", "architecture"), [("mixtral", "MixtralForCausalLM"),
                                                      ("qwen3_moe", "Qwen3MoeForCausalLM"),
                                                      ("olmoe", "OlmoeForCausalLM")])
def test_router_routes_svd_merge_serve_check_and_vllm_export_on_the_family(family, architecture, tmp_path, capsys):
    """The steps after training, end to end on families other than Qwen2-MoE (same code, now run)."""
    import re

    output = _train(family, tmp_path)
    assert cli(["experts", "fit-router", str(output), "--holdout", "0.25"]) == 0
    requests = tmp_path / "requests.jsonl"
    requests.write_text("".join(json.dumps({"text": text}) + "\n" for text in TEXTS))
    assert cli(["experts", "route", str(output), "--input", str(requests), "--top-k", "2"]) == 0
    routes = output / "experts" / "routes.jsonl"
    assert all(sorted(json.loads(line)["tasks"]) == ["code", "math"] for line in routes.read_text().splitlines())
    assert cli(["experts", "merge", str(output), "--from-routes", str(routes)]) == 0
    assert cli(["experts", "merge", str(output), "--tasks", "code", "math", "--method", "svd", "--rank", "4"]) == 0
    out = capsys.readouterr().out
    errors = [float(value) for value in re.findall(r"max relative error ([\d.e+-]+)", out)]
    assert errors[0] < 1e-6 and errors[1] > 1e-4  # cat exact; svd at half the summed rank truncates
    assert cli(["experts", "serve-check", str(output), "--input", str(requests), "--batch-size", "4",
                "--max-new-tokens", "3", "--compare", "4"]) == 0
    assert "4/4 requests generate the same greedy tokens as alone" in capsys.readouterr().out
    assert cli(["experts", "export-vllm", str(output), "--max-lora-rank", "64", "--routes", str(routes)]) == 0
    exported = json.loads((output / "experts" / "vllm" / "vllm.json").read_text())
    assert exported["architecture"] == architecture
    assert [entry["lora_name"] for entry in exported["lora_requests"]][:3] == ["code", "math", "code+math"]


def test_vllm_export_follows_deepseek_s_mla_attention(tmp_path, capsys):
    """vLLM's DeepSeek-V2 takes LoRA on q_proj / kv_a_proj_with_mqa / o_proj, not on kv_b_proj (MLA absorbs it)."""
    output = _train("deepseek_v2", tmp_path, "--expert_target_modules", "q_proj", "kv_a_proj_with_mqa",
                    "kv_b_proj", "o_proj")
    assert cli(["experts", "export-vllm", str(output), "--max-lora-rank", "64"]) == 2
    err = capsys.readouterr().err
    assert "code: kv_b_proj: vLLM's MLA attention absorbs kv_b_proj" in err
    assert "DeepseekV2ForCausalLM takes LoRA on" in err
    assert "kv_a_proj_with_mqa:" not in err and "q_proj:" not in err  # only kv_b_proj is refused
    assert not (output / "experts" / "vllm").exists()
    again = _train("deepseek_v2", tmp_path / "again", "--expert_target_modules", "q_proj", "kv_a_proj_with_mqa",
                   "o_proj")
    assert cli(["experts", "export-vllm", str(again), "--max-lora-rank", "64"]) == 0
    assert json.loads((again / "experts" / "vllm" / "vllm.json").read_text())["architecture"] == "DeepseekV2ForCausalLM"
