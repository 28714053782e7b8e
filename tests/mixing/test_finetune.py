"""scripts/finetune.py's engine in one process: recipes, sources, freeze through training, the saved model."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from helpers import FAMILIES
from helpers import ROUTED_NEW_FAMILIES
from safetensors.torch import load_file

import moepatch
from moepatch.data.synthetic import synthetic_records
from moepatch.data.synthetic import write_synthetic_sources
from moepatch.mixing.finetune import main
from moepatch.mixing.finetune import parse_arguments
from moepatch.mixing.finetune import rounds_table
from moepatch.mixing.finetune import source_paths
from moepatch.testing import tiny

REPO = Path(__file__).resolve().parents[2]
ROUTERS = [f"model.layers.{i}.mlp.gate.weight" for i in (0, 2, 3)]  # tiny Qwen2-MoE: layer 1 is dense


def _common(checkpoint: Path, output: Path, *extra: str) -> list[str]:
    """The shared flags, each left out where ``extra`` gives it (finetune refuses a flag given twice)."""
    base = {"--report_to": "none", "--per_device_train_batch_size": "4", "--learning_rate": "5e-3",
            "--max_length": "64", "--probe_size": "8", "--seed": "0", "--save_strategy": "no"}
    shared = [token for flag, value in base.items() if flag not in extra for token in (flag, value)]
    return ["--model_name_or_path", str(checkpoint), "--output_dir", str(output), "--use_cpu", *shared, *extra]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    return tiny.save_tiny_checkpoint(tmp_path_factory.mktemp("ckpt") / "qwen2_moe", "qwen2_moe", seed=0)


def _weights(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(str(folder / "model.safetensors"))


def test_dynamic_run_with_frozen_routers(checkpoint, tmp_path, capsys):
    output = tmp_path / "run"
    main(_common(checkpoint, output, "--synthetic_data", "--max_steps", "8", "--update_every", "4",
                 "--freeze_gate", "router"))
    before, after = _weights(checkpoint), _weights(output)
    for name in ROUTERS:
        assert torch.equal(before[name], after[name]), name  # frozen: bit-identical after 8 AdamW steps
    trained = "model.layers.0.self_attn.q_proj.weight"
    assert not torch.equal(before[trained], after[trained])
    rounds = [json.loads(line) for line in (output / "sampling_info" / "rounds.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rounds] == [4, 8] and rounds[0]["sources"] == ["chat", "code", "letters", "math"]
    assert rounds[0]["new_weights"] != pytest.approx([0.25] * 4, abs=1e-6)
    assert (output / "sampling_info" / "rounds.png").stat().st_size > 0
    assert (output / "data" / "train" / "letters.jsonl").is_file()  # the synthetic sources, kept with the model
    summary = json.loads((output / "moepatch_finetune_summary.json").read_text())
    assert summary["dropped_train_examples"] == [0, 0, 0, 0] and summary["train_examples"] == [200] * 4
    printed = capsys.readouterr().out
    assert "0 (initial)" in printed and "letters" in printed
    saved = json.loads((output / "config.json").read_text())
    assert saved["moepatch"]["freeze_gate"] == "router"
    reloaded = moepatch.from_pretrained(output)  # ready for moepatch.apply / AutoModelForCausalLM
    assert len(moepatch.get_handle(reloaded).frozen_parameters) == 3


def test_routers_change_without_freeze(checkpoint, tmp_path):
    output = tmp_path / "run"
    main(_common(checkpoint, output, "--synthetic_data", "--max_steps", "4", "--update_every", "2"))
    before, after = _weights(checkpoint), _weights(output)
    assert all(not torch.equal(before[name], after[name]) for name in ROUTERS)


def test_plain_epochs_over_one_source_keep_c2r(tmp_path):
    """The C2R recipe's shape (Zhang et al., NAACL 2025): one source, no dynamic mixing, epochs; the C2R fields
    survive into the saved model."""
    listed = tiny.random_collaborative_list(4, 8, seed=1)
    checkpoint = tiny.save_tiny_checkpoint(tmp_path / "ckpt", "qwen2_moe",
                                           moepatch={"c2r": {"top_t": 3, "collaborative_list": listed}})
    data = tmp_path / "lima.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in synthetic_records("chat", 24)))
    output = tmp_path / "run"
    main(_common(checkpoint, output, "--train_files", f"lima={data}", "--dynamic_sampling", "false",
                 "--num_train_epochs", "1", "--probe_size", "4"))
    trainer_state = json.loads((output / "moepatch_finetune_summary.json").read_text())
    assert trainer_state["global_step"] == 5  # 20 training examples / batch 4, one epoch
    model = moepatch.from_pretrained(output)
    assert len(moepatch.get_handle(model).c2r_routers) == 3
    assert model.config.moepatch["c2r"]["top_t"] == 3


def test_static_mixture_follows_initial_weights(checkpoint, tmp_path):
    data = tmp_path / "data"
    write_synthetic_sources(data, train_per_source=40, probe_per_source=4)
    weights = tmp_path / "prob_map.json"
    weights.write_text(json.dumps({"chat": 0.7, "code": 0.1, "letters": 0.1, "math": 0.1}))
    output = tmp_path / "run"
    main(_common(checkpoint, output, "--data_dir", str(data), "--dynamic_sampling", "false",
                 "--initial_weights", str(weights), "--max_steps", "10"))
    summary = json.loads((output / "moepatch_finetune_summary.json").read_text())
    assert summary["final_weights"] == pytest.approx([0.7, 0.1, 0.1, 0.1])
    assert summary["rounds"] == [] and not (output / "sampling_info" / "rounds.jsonl").exists()


def test_recipe_defaults_and_command_line_override(tmp_path):
    recipe = REPO / "configs" / "llama_moe_dynamic.json"
    model_args, data_args, sampling, training, _ = parse_arguments(
        ["--recipe", str(recipe), "--model_name_or_path", "ckpt", "--data_dir", "data", "--output_dir",
         str(tmp_path), "--deepspeed", str(REPO / "configs" / "deepspeed" / "zero1_cpu.json"), "--bf16", "false",
         "--use_cpu", "--update_every", "50"])
    assert model_args.freeze_gate == "gate_substring" and model_args.gate_noise is True
    assert (sampling.update_every, sampling.eta, sampling.c, sampling.probe_layers) == (50, 10.0, 0.05, [-1])
    assert (training.per_device_train_batch_size, training.gradient_accumulation_steps, training.max_steps) == (4, 8,
                                                                                                                 2000)
    assert training.learning_rate == 2e-5 and training.lr_scheduler_type == "cosine" and not training.bf16


@pytest.mark.parametrize("name", ["llama_moe_dynamic.json", "molm_dynamic.json", "qwen_c2r.json"])
def test_shipped_recipes_name_real_arguments(name, tmp_path):
    recipe = json.loads((REPO / "configs" / name).read_text())
    assert (REPO / recipe["deepspeed"]).is_file()
    parse_arguments(["--recipe", str(REPO / "configs" / name), "--model_name_or_path", "ckpt", "--data_dir", "d",
                     "--output_dir", str(tmp_path), "--deepspeed", str(REPO / "configs/deepspeed/zero2_cpu.json"),
                     "--bf16", "false", "--use_cpu"])


def test_deepspeed_configs_are_valid_json_with_their_stage():
    for path in sorted((REPO / "configs" / "deepspeed").glob("*.json")):
        config = json.loads(path.read_text())
        assert config["zero_optimization"]["stage"] == int(path.name[4]), path.name
        assert config["train_micro_batch_size_per_gpu"] == "auto"


def test_argument_errors(tmp_path):
    with pytest.raises(SystemExit):
        parse_arguments(["--output_dir", str(tmp_path), "--synthetic_data"])  # no model
    with pytest.raises(SystemExit):
        parse_arguments(["--model_name_or_path", "x", "--output_dir", str(tmp_path)])  # no data
    with pytest.raises(SystemExit):
        parse_arguments(["--model_name_or_path", "x", "--synthetic_data", "--freeze_gate", "all",
                         "--output_dir", str(tmp_path)])


def test_source_discovery_official_layout_and_errors(tmp_path):
    root = tmp_path / "data"
    for name in ("orca", "code"):
        (root / "train" / name).mkdir(parents=True)
        (root / "train" / name / "fschat_0.jsonl").write_text("{}\n")
    (root / "dev").mkdir()
    (root / "dev" / "code.jsonl").write_text("{}\n")
    _, data_args, _, _, _ = parse_arguments(["--model_name_or_path", "x", "--data_dir", str(root),
                                          "--output_dir", str(tmp_path / "o")])
    found = source_paths(data_args)
    assert list(found) == ["code", "orca"]  # sorted, as the official code orders sources
    assert found["code"] == (root / "train" / "code", root / "dev" / "code.jsonl") and found["orca"][1] is None
    data_args.probe_files = ["math=x.jsonl"]
    with pytest.raises(ValueError, match="--probe_files: \\['math'\\] name no training source"):
        source_paths(data_args)
    data_args.probe_files, data_args.train_files = None, ["broken"]
    with pytest.raises(ValueError, match="--train_files: expected name=path"):
        source_paths(data_args)


def test_rounds_table():
    rounds = [{"sources": ["a", "b"], "step": 4, "old_weights": [0.5, 0.5], "new_weights": [0.25, 0.75]}]
    assert rounds_table(rounds) == (["step", "a", "b"], [["0 (initial)", "0.500", "0.500"], ["4", "0.250", "0.750"]])


@pytest.mark.parametrize("family", [*FAMILIES, *ROUTED_NEW_FAMILIES, *tiny.KIND_FAMILIES])
def test_dynamic_mixing_and_freeze_on_every_family(family, tmp_path):
    """The same run on each family: probe rounds move the weights, frozen routers stay bit-identical, rest trains."""
    checkpoint = tiny.save_tiny_checkpoint(tmp_path / "ckpt", family, seed=0)
    output = tmp_path / "run"
    main(_common(checkpoint, output, "--synthetic_data", "--max_steps", "4", "--update_every", "2",
                 "--freeze_gate", "router"))
    rounds = [json.loads(line) for line in (output / "sampling_info" / "rounds.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rounds] == [2, 4]
    assert rounds[0]["new_weights"] != pytest.approx([0.25] * 4, abs=1e-6)
    base, tuned = moepatch.from_pretrained(checkpoint), moepatch.from_pretrained(output)
    frozen = moepatch.get_handle(tuned).frozen_parameters
    before, after = dict(base.named_parameters()), dict(tuned.named_parameters())
    assert frozen and all(torch.equal(before[name], after[name]) for name in frozen)
    assert sum(not torch.equal(before[name], after[name]) for name in before if name not in frozen) > 0


def test_lora_experts_with_gradient_checkpointing(checkpoint, tmp_path):
    output = tmp_path / "run"
    main(_common(checkpoint, output, "--synthetic_data", "--max_steps", "4", "--update_every", "2",
                 "--moepatch_config", str(REPO / "configs" / "moepatch" / "lora_experts_mola.json"),
                 "--gradient_checkpointing", "true", "--logging_steps", "1"))
    base, trained = _weights(checkpoint), _weights(output)
    assert base.keys() == trained.keys() and all(torch.equal(base[k], trained[k]) for k in base)  # base frozen
    experts = load_file(str(output / "lora_experts.safetensors"))
    assert any(value.abs().sum() > 0 for key, value in experts.items() if "lora_B" in key)
    reloaded = moepatch.from_pretrained(output)
    assert moepatch.get_handle(reloaded).lora_targets


@pytest.mark.parametrize("dynamic", ["true", "false"])
def test_resume_restores_lora_experts_exactly(checkpoint, tmp_path, dynamic):
    """A run resumed from step 2 ends with the same experts as the uninterrupted run (plain Trainer resume).

    With dynamic sampling the resumed run's random stream differs from the uninterrupted one, so MoLA's expert
    dropout (0.05 by default) is switched off there: this test is about restoring the experts, not the stream."""
    block = json.loads((REPO / "configs" / "moepatch" / "lora_experts_mola.json").read_text())
    if dynamic == "true":
        block["moepatch"]["lora_experts"]["dropout"] = 0.0
    (tmp_path / "lora.json").write_text(json.dumps(block))
    extra = ("--synthetic_data", "--max_steps", "4", "--dynamic_sampling", dynamic,
             *(("--update_every", "2") if dynamic == "true" else ()),  # refused without dynamic mixing (ignored)
             "--moepatch_config", str(tmp_path / "lora.json"),
             "--save_strategy", "steps", "--save_steps", "2")
    full, resumed = tmp_path / "full", tmp_path / "resumed"
    main(_common(checkpoint, full, *extra))
    assert (full / "checkpoint-2" / "lora_experts.safetensors").is_file()
    main(_common(checkpoint, resumed, *extra, "--resume_from_checkpoint", str(full / "checkpoint-2")))
    a, b = load_file(str(full / "lora_experts.safetensors")), load_file(str(resumed / "lora_experts.safetensors"))
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], atol=1e-6, rtol=1e-5)
