"""The moepatch command: inspect, demo, env (run as a real subprocess)."""

from __future__ import annotations

import importlib.metadata
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
from transformers import AutoModelForCausalLM
from transformers import LlamaConfig

from moepatch.testing import tiny


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "moepatch.cli", *args], capture_output=True, text=True, timeout=300)


@pytest.fixture()
def inspect_cli(capsys):
    """``moepatch inspect`` in this process (a fresh interpreter per call costs seconds; the console exit path is
    tested by ``test_console_errors_are_short_and_debug_shows_the_traceback``)."""
    from moepatch.cli import main

    def run(*args: str) -> subprocess.CompletedProcess:
        capsys.readouterr()
        code = main(list(args))
        captured = capsys.readouterr()
        return subprocess.CompletedProcess(["moepatch", *args], code, captured.out, captured.err)

    return run


def test_console_script_is_declared():
    scripts = {ep.name: ep.value for ep in importlib.metadata.entry_points(group="console_scripts")}
    assert scripts.get("moepatch") == "moepatch.cli:main"


def test_inspect_reports_structure_and_config(tmp_path: Path, inspect_cli):
    path = tiny.save_tiny_checkpoint(tmp_path, "qwen2_moe", moepatch={"freeze_gate": True, "routing_stats": True})
    result = inspect_cli("inspect", str(path))
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "family:     qwen2_moe" in out
    assert "MoE layers [0, 2, 3]; dense layers [1]" in out
    assert "8 routed, top-2" in out and "renormalised: no" in out
    assert "freeze_gate='router': 3 parameters" in out and "config: OK" in out


def test_inspect_reports_official_c2r_fields(tmp_path: Path, inspect_cli):
    from moepatch.testing.tiny import random_collaborative_list as random_list

    path = tiny.save_tiny_checkpoint(tmp_path, "qwen2_moe")
    config = json.loads((path / "config.json").read_text())
    config["top_t"], config["collaborative_list"] = 3, random_list(4, 8, 0)
    (path / "config.json").write_text(json.dumps(config))
    result = inspect_cli("inspect", str(path))
    assert result.returncode == 0, result.stderr
    assert "c2r (official top-level fields): top_t=3 on MoE layers [0, 2, 3]" in result.stdout
    config["top_t"] = 8
    (path / "config.json").write_text(json.dumps(config))
    result = inspect_cli("inspect", str(path))
    assert result.returncode == 1 and "top_t = 8 = number of experts" in result.stdout


def test_inspect_generic_family(tmp_path: Path, inspect_cli):
    path = tiny.save_tiny_checkpoint(tmp_path, "olmoe")
    result = inspect_cli("inspect", str(path))
    assert result.returncode == 0, result.stderr
    assert "family:     generic_topk" in result.stdout and "no feature enabled" in result.stdout


def test_inspect_lists_what_is_wrong(tmp_path: Path, inspect_cli):
    path = tiny.save_tiny_checkpoint(tmp_path, "mixtral")
    config_file = path / "config.json"
    config = json.loads(config_file.read_text())
    config["moepatch"] = {"freeze_gate": "maybe", "routing_stats": {"layers": [5]}, "future_key": 1}
    config_file.write_text(json.dumps(config))
    result = inspect_cli("inspect", str(path))
    assert result.returncode == 1
    assert "moepatch.freeze_gate" in result.stdout
    assert "warning: moepatch.future_key: unknown key" in result.stdout
    config["moepatch"] = {"routing_stats": {"layers": [5]}}
    config_file.write_text(json.dumps(config))
    result = inspect_cli("inspect", str(path))
    assert result.returncode == 1
    assert "moepatch.routing_stats.layers[0]: layer 5 does not exist" in result.stdout


def test_inspect_unsupported_model(tmp_path: Path, inspect_cli):
    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2)
    AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path)
    result = inspect_cli("inspect", str(tmp_path))
    assert result.returncode == 2 and "cannot patch LlamaForCausalLM" in result.stdout


@pytest.mark.parametrize("family", ["qwen2_moe", "mixtral"])
def test_demo_runs_the_whole_pipeline(tmp_path: Path, family: str):
    result = run_cli("demo", "--family", family, "--output", str(tmp_path))
    assert result.returncode == 0, result.stderr
    batch = tiny.demo_batch()
    real_tokens = int(batch["attention_mask"].sum())
    assert f"{real_tokens} tokens" in result.stdout and "padding tokens excluded" in result.stdout
    for routing in ("vanilla", "c2r"):
        stats = json.loads((tmp_path / f"routing_stats.{routing}.json").read_text())
        assert stats["tokens"] == [real_tokens] * len(stats["layers"])
        assert all(sum(row) == real_tokens * 2 for row in stats["counts"])
        assert (tmp_path / f"routing_counts.{routing}.png").stat().st_size > 1000
    config = json.loads((tmp_path / "checkpoint" / "config.json").read_text())
    assert config["top_t"] == 2 and "collaborative_list" in config
    assert "reloaded: C2R on" in result.stdout and "expert placement over 2 devices" in result.stdout
    assert (tmp_path / "coactivation.vanilla.png").stat().st_size > 1000
    # step 7: fine-tune with dynamic mixing, C2R routing and frozen routers
    rounds = (tmp_path / "finetune" / "sampling_info" / "rounds.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in rounds] == [10, 20, 30, 40]
    assert "routers:    3/3 bit-identical after training (frozen)" in result.stdout
    assert (tmp_path / "finetune" / "sampling_info" / "rounds.png").stat().st_size > 1000
    assert json.loads((tmp_path / "finetune" / "config.json").read_text())["top_t"] == 2  # C2R kept
    # step 8: task experts, the default router on new requests, routed cat merges, answer losses
    out = result.stdout
    routing = out[out.index("routing of 32 new requests"):out.index("answer loss on the held-out")]
    accuracies = [float(v) for v in re.findall(r"^\s*(?:chat|code|letters|math)\s+8\s+([\d.]+)", routing, re.M)]
    assert len(accuracies) == 4 and sum(accuracies) / 4 >= 0.9  # no model but the base: >= 90%
    losses = re.findall(r"^\s*(chat|code|letters|math)\s+([\d.]+)\s+([\d.]+)\s+([\d.]+)\s*$",
                        out[out.index("answer loss on the held-out"):], re.M)
    assert len(losses) == 4
    for task, base, own, routed in losses:
        assert float(own) < float(base) and float(routed) < float(base), task  # the experts learned their tasks
    manifest = json.loads((tmp_path / "task_experts" / "experts" / "manifest.json").read_text())
    assert [expert["task"] for expert in manifest["experts"]] == ["chat", "code", "letters", "math"]


def test_env_report():
    result = run_cli("env")
    assert result.returncode == 0 and "transformers: 5." in result.stdout


def test_inspect_reports_lora_expert_targets(tmp_path: Path, inspect_cli):
    """The targets and the trainable parameters per group, checked against the modules a real patch creates."""
    import re

    import moepatch

    block = {"lora_experts": {"method": "mola", "num_experts": [2, 4, 6, 8], "top_k": 2, "routed_experts": True}}
    tiny.save_tiny_checkpoint(tmp_path, "qwen2_moe", moepatch=block)
    result = inspect_cli("inspect", str(tmp_path))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "lora_experts (mola): 37 projections; " in result.stdout
    assert "model.layers.*.mlp.experts.down_proj: 3x (8 routed experts each), experts [2, 6, 8]" in result.stdout
    assert "model.layers.*.self_attn.q_proj: 4x (linear), experts [2, 4, 6, 8]" in result.stdout
    model = tiny.tiny_model("qwen2_moe")
    base = sum(p.numel() for p in model.parameters())
    moepatch.apply(model, block)
    created = {name: p.numel() for name, p in model.named_parameters() if p.requires_grad}
    routed = sum(n for name, n in created.items() if ".mlp.experts." in name)
    line = re.search(r"; ([\d,]+) LoRA-expert parameters \(trainable, base frozen\) = [\d.]+% of the model's ([\d,]+)"
                     r":.* routed experts ([\d,]+)", result.stdout)
    assert line, result.stdout
    assert [int(g.replace(",", "")) for g in line.groups()] == [sum(created.values()), base, routed]
    down = sum(n for name, n in created.items() if re.search(r"\.mlp\.experts\.lora_experts\.down_proj\.", name))
    assert f"model.layers.*.mlp.experts.down_proj: 3x (8 routed experts each), experts [2, 6, 8], ranks [8], " \
           f"top-k [2], output, {down:,} parameters" in result.stdout


def test_demo_runs_twice_into_the_same_folder(tmp_path: Path):
    """The README's main command may be run again: the demo replaces its own earlier outputs."""
    for _ in range(2):
        result = run_cli("demo", "--output", str(tmp_path), "--finetune-steps", "4", "--expert-steps", "2")
        assert result.returncode == 0, result.stderr
    rounds = (tmp_path / "finetune" / "sampling_info" / "rounds.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in rounds] == [1, 2, 3, 4]
