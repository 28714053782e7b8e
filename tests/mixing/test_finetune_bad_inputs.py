"""scripts/finetune.py on bad inputs: each one fails with its exit status (2: usage, 1: failure), one message naming
the argument or file, no traceback (unless --debug), and nothing written — no model is loaded for any of them."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from moepatch.data.synthetic import synthetic_records
from moepatch.errors import MoePatchWarning
from moepatch.mixing.finetune import _split_debug
from moepatch.mixing.finetune import check_inputs
from moepatch.mixing.finetune import main
from moepatch.mixing.finetune import parse_arguments
from moepatch.testing import tiny

REPO = Path(__file__).resolve().parents[2]
SOURCES = ("chat", "code", "math")


@pytest.fixture(autouse=True)
def _no_debug_from_the_environment(monkeypatch):
    monkeypatch.delenv("MOEPATCH_DEBUG", raising=False)


def _jsonl(path: Path, records: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(record) + "\n" for record in records))
    return path


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Path:
    """A tiny checkpoint, a valid three-source data folder, and one broken input of every kind."""
    root = tmp_path_factory.mktemp("bad_inputs")
    tiny.save_tiny_checkpoint(root / "ckpt", "qwen2_moe", seed=0)
    for name in SOURCES:
        _jsonl(root / "data" / "train" / f"{name}.jsonl", synthetic_records(name, 12, seed=1))
        _jsonl(root / "data" / "dev" / f"{name}.jsonl", synthetic_records(name, 4, seed=2))
    _jsonl(root / "one" / "train" / "chat.jsonl", synthetic_records("chat", 12))
    _jsonl(root / "two" / "train" / "chat.jsonl", synthetic_records("chat", 12))
    _jsonl(root / "two" / "train" / "code.jsonl", synthetic_records("code", 12))
    (root / "notrain").mkdir()
    (root / "emptytrain" / "train").mkdir(parents=True)
    (root / "noconfig").mkdir()
    (root / "file.txt").write_text("not a folder\n")
    (root / "notjson.json").write_text('{"update_every": 5,\n')
    (root / "list.json").write_text("[1, 2]\n")
    (root / "recipe_unknown.json").write_text(json.dumps({"_comment": "ok", "update_every": 5, "updte_every": 3}))
    (root / "block_invalid.json").write_text(json.dumps({"moepatch": {"routing_stats": {"layers": "last"}}}))
    weights = {"w_negative": {"chat": 1, "code": -1, "math": 1}, "w_missing": {"chat": 1, "code": 1},
               "w_extra": {"chat": 1, "code": 1, "math": 1, "poetry": 1}, "w_text": {"chat": "a", "code": 1, "math": 1},
               "w_zero": {"chat": 0, "code": 1, "math": 1}}
    for name, mapping in weights.items():
        (root / f"{name}.json").write_text(json.dumps(mapping))
    (root / "w_nan.json").write_text('{"chat": NaN, "code": 1, "math": 1}')
    good = [json.dumps(record) for record in synthetic_records("chat", 4)]
    for folder, bad_line in (("badjson", '{"conversations": ['), ("badrecord", json.dumps({"text": "plain"}))):
        (root / folder / "train").mkdir(parents=True)
        (root / folder / "train" / "chat.jsonl").write_text("\n".join(good[:2] + [bad_line] + good[2:]) + "\n")
        for name in ("code", "math"):
            _jsonl(root / folder / "train" / f"{name}.jsonl", synthetic_records(name, 12))
    _jsonl(root / "small" / "train" / "chat.jsonl", synthetic_records("chat", 3))
    for name in ("code", "math"):
        _jsonl(root / "small" / "train" / f"{name}.jsonl", synthetic_records(name, 12))
    for folder, name, content in (("blockdir", "block.json", {"moepatch": {"routing_stats": True}}),
                                  ("recipedir", "recipe.json", {"update_every": 2}),
                                  ("weightsdir", "w.json", {"chat": 1, "code": 1, "math": 1})):
        (root / folder).mkdir()
        (root / folder / name).write_text(json.dumps(content))
    (root / "used_output" / "sampling_info").mkdir(parents=True)
    (root / "used_output" / "sampling_info" / "rounds.jsonl").write_text('{"step": 2}\n')
    # broken checkpoints: copies of ckpt with a file removed or config.json edited
    for name, removed in (("noweights", ("model.safetensors",)),
                          ("notok", ("tokenizer.json", "tokenizer_config.json"))):
        shutil.copytree(root / "ckpt", root / name)
        for file in removed:
            (root / name / file).unlink()
    for name, edit in (("topk9", {"num_experts_per_tok": 9}),  # 8 experts
                       ("ownblock", {"moepatch": {"c2r": {"top_t": 3, "collaborative_list": [[0]]}}})):
        shutil.copytree(root / "ckpt", root / name)
        config = json.loads((root / name / "config.json").read_text())
        (root / name / "config.json").write_text(json.dumps({**config, **edit}))
    _save_dense_checkpoint(root / "dense")
    (root / "block_c2r.json").write_text(json.dumps({"c2r": {"top_t": 3, "collaborative_list": [[0]]}}))
    number_turn = {"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": 3}]}
    for folder, bad in (("badtypes", {"instruction": None, "output": 3}), ("badturn", number_turn)):
        (root / folder / "train").mkdir(parents=True)
        (root / folder / "train" / "chat.jsonl").write_text("\n".join(good[:2] + [json.dumps(bad)] + good[2:]) + "\n")
        for name in ("code", "math"):
            _jsonl(root / folder / "train" / f"{name}.jsonl", synthetic_records(name, 12))
    return root


def _save_dense_checkpoint(path: Path) -> None:
    """A tiny dense LlamaForCausalLM with the tiny tokenizer: a model moepatch cannot patch."""
    from transformers import LlamaConfig
    from transformers import LlamaForCausalLM

    tokenizer = tiny.tiny_tokenizer()
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=2)
    LlamaForCausalLM(config).save_pretrained(path)
    tokenizer.save_pretrained(path)


def _argv(world: Path, out: Path, drop: tuple[str, ...] = (), extra: tuple[str, ...] = ()) -> list[str]:
    """The valid base command without ``drop`` and without the flags ``extra`` gives (a flag given twice is itself
    refused; a row that wants a repeat gives it twice in ``extra``).  Without dynamic mixing the base leaves out
    ``--update_every`` (refused there: it would be ignored)."""
    base = {"--model_name_or_path": str(world / "ckpt"), "--data_dir": str(world / "data"), "--output_dir": str(out),
            "--max_steps": "4", "--update_every": "2", "--probe_size": "2", "--max_length": "96",
            "--report_to": "none"}
    neighbours = zip(extra, extra[1:], strict=False)
    if "--no_dynamic_sampling" in extra or ("--dynamic_sampling", "false") in neighbours:
        drop = (*drop, "--update_every")
    argv = [token for flag, value in base.items() if flag not in drop and flag not in extra
            for token in (flag, value)]
    return [*argv, "--use_cpu", *(token.format(world=world, out=out) for token in extra)]


def _snapshot(*roots: Path) -> dict[str, tuple[str | None, int]]:
    """Every file and folder under ``roots``: a file's bytes (as a digest), and the modification time of both."""
    import hashlib

    result = {}
    for root in roots:
        for dirpath, dirnames, filenames in os.walk(root):
            for name in dirnames + filenames:
                path = Path(dirpath) / name
                digest = hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else None
                result[str(path)] = (digest, path.stat().st_mtime_ns)
    return result


def _run_main(argv: list[str], capsys) -> tuple[int, str, str]:
    try:
        code = main(argv)
    except SystemExit as stop:  # argparse-style exits
        code = stop.code
    captured = capsys.readouterr()
    return code, captured.out, captured.err


USAGE, FAILURE = 2, 1

# (id, flags dropped from the valid base command, extra tokens ({world}, {out} filled in), exit status,
#  fragments the message must contain)
CASES = [
    # dynamic mixing options
    ("update_every_zero", (), ("--update_every", "0"), USAGE, ["--update_every", "got 0"]),
    ("update_every_negative", (), ("--update_every", "-3"), USAGE, ["--update_every", "got -3"]),
    ("update_every_not_int", (), ("--update_every", "often"), USAGE, ["--update_every", "invalid int value"]),
    ("eta_nan", (), ("--eta", "nan"), USAGE, ["--eta", "finite"]),
    ("eta_inf", (), ("--eta", "inf"), USAGE, ["--eta", "finite"]),
    ("eta_negative", (), ("--eta", "-1"), USAGE, ["--eta", ">= 0"]),
    ("c_above_one", (), ("--c", "1.5"), USAGE, ["--c", "[0, 1]"]),
    ("c_negative", (), ("--c", "-0.1"), USAGE, ["--c", "[0, 1]"]),
    ("distance_unknown", (), ("--distance", "manhattan"), USAGE, ["--distance", "l2, cos", "manhattan"]),
    ("criterion_unknown", (), ("--criterion", "median"), USAGE, ["--criterion", "mean, max, min", "median"]),
    ("probe_batch_size_zero", (), ("--probe_batch_size", "0"), USAGE, ["--probe_batch_size", ">= 1"]),
    ("probe_layers_empty", (), ("--probe_layers",), USAGE, ["--probe_layers", "expected at least one"]),
    ("probe_layers_twice", (), ("--probe_layers", "-1", "-1"), USAGE, ["--probe_layers", "twice"]),
    # data options
    ("probe_size_zero", (), ("--probe_size", "0"), USAGE, ["--probe_size", ">= 1", "got 0"]),
    ("probe_size_negative", (), ("--probe_size", "-5"), USAGE, ["--probe_size", "got -5"]),
    ("max_length_zero", (), ("--max_length", "0"), USAGE, ["--max_length", ">= 1"]),
    ("prompt_format_unknown", (), ("--prompt_format", "chatml"), USAGE,
     ["--prompt_format", "auto, chat_template, vicuna", "chatml"]),
    ("chat_template_without_template", ("--data_dir",), ("--synthetic_data", "--prompt_format", "chat_template"),
     USAGE, ["--prompt_format", "no chat template"]),  # refused before <output_dir>/data is written
    ("no_data_source", ("--data_dir",), (), USAGE, ["--data_dir", "--train_files", "--synthetic_data"]),
    ("synthetic_with_data_dir", (), ("--synthetic_data",), USAGE, ["--synthetic_data", "--data_dir"]),
    ("data_dir_missing", ("--data_dir",), ("--data_dir", "{world}/nowhere"), USAGE, ["--data_dir", "nowhere"]),
    ("data_dir_is_file", ("--data_dir",), ("--data_dir", "{world}/file.txt"), USAGE, ["--data_dir", "is a file"]),
    ("data_dir_without_train", ("--data_dir",), ("--data_dir", "{world}/notrain"), USAGE,
     ["--data_dir", "no train/ folder"]),
    ("data_dir_empty_train", ("--data_dir",), ("--data_dir", "{world}/emptytrain"), USAGE,
     ["--data_dir", "holds no source"]),
    ("train_files_malformed", ("--data_dir",), ("--train_files", "chat"), USAGE, ["--train_files", "name=path"]),
    ("train_files_missing_file", ("--data_dir",), ("--train_files", "a={world}/data/train/chat.jsonl",
                                                   "b={world}/data/train/code.jsonl", "c={world}/gone.jsonl"),
     USAGE, ["--train_files", "gone.jsonl", "no such file"]),
    ("train_files_duplicate", ("--data_dir",), ("--train_files", "a={world}/data/train/chat.jsonl",
                                                "a={world}/data/train/code.jsonl"), USAGE, ["--train_files", "twice"]),
    ("probe_files_unknown_source", (), ("--probe_files", "poetry={world}/data/dev/chat.jsonl"), USAGE,
     ["--probe_files", "poetry", "no training source"]),
    ("probe_files_missing_file", (), ("--probe_files", "chat={world}/gone.jsonl"), USAGE,
     ["--probe_files", "gone.jsonl"]),
    ("probe_files_malformed", (), ("--probe_files", "=x.jsonl"), USAGE, ["--probe_files", "name=path"]),
    ("initial_weights_missing", (), ("--initial_weights", "{world}/gone.json"), USAGE,
     ["--initial_weights", "gone.json", "no such file"]),
    ("initial_weights_not_json", (), ("--initial_weights", "{world}/notjson.json"), FAILURE,
     ["--initial_weights", "not JSON"]),
    ("initial_weights_not_object", (), ("--initial_weights", "{world}/list.json"), FAILURE,
     ["--initial_weights", "got list"]),
    ("initial_weights_negative", (), ("--initial_weights", "{world}/w_negative.json"), FAILURE,
     ["--initial_weights", ">= 0", "'code': -1"]),
    ("initial_weights_nan", (), ("--initial_weights", "{world}/w_nan.json"), FAILURE, ["--initial_weights", "finite"]),
    ("initial_weights_text", (), ("--initial_weights", "{world}/w_text.json"), FAILURE,
     ["--initial_weights", "'chat': 'a'"]),
    ("initial_weights_unknown_source", (), ("--initial_weights", "{world}/w_extra.json"), FAILURE,
     ["--initial_weights", "poetry", "name no source"]),
    ("initial_weights_source_left_out", (), ("--initial_weights", "{world}/w_missing.json"), FAILURE,
     ["--initial_weights", "no weight for ['math']"]),
    ("initial_weights_zero_dynamic", (), ("--initial_weights", "{world}/w_zero.json"), FAILURE,
     ["--initial_weights", "> 0", "chat"]),
    ("dynamic_one_source", ("--data_dir",), ("--data_dir", "{world}/one"), USAGE,
     ["--dynamic_sampling", "found one ('chat')"]),
    ("dynamic_without_max_steps", ("--max_steps",), (), USAGE, ["--max_steps", "got -1"]),
    ("dynamic_max_steps_zero", (), ("--max_steps", "0"), USAGE, ["--max_steps", "got 0"]),
    # a dynamic-mixing option without dynamic mixing would be ignored (a recipe's values are defaults: not refused)
    ("update_every_without_dynamic_sampling", (), ("--no_dynamic_sampling", "--update_every", "3"), USAGE,
     ["--update_every", "only applies with dynamic mixing", "--dynamic_sampling false"]),
    ("no_plot_without_dynamic_sampling", (), ("--dynamic_sampling", "false", "--no_plot"), USAGE,
     ["--no_plot", "only applies with dynamic mixing"]),
    # --max_steps 0 would train --num_train_epochs instead (the Trainer's reading of any value <= 0)
    ("task_experts_max_steps_zero", ("--data_dir",), ("--synthetic_data", "--task_experts", "true", "--max_steps",
                                                      "0"), USAGE, ["--max_steps", ">= 1, or -1", "got 0"]),
    ("static_max_steps_negative", (), ("--dynamic_sampling", "false", "--max_steps", "-5"), USAGE,
     ["--max_steps", "got -5"]),
    ("expert_target_modules_twice", ("--data_dir", "--update_every"),
     ("--synthetic_data", "--task_experts", "true", "--expert_target_modules", "q_proj", "q_proj"), USAGE,
     ["--expert_target_modules", "['q_proj'] given twice"]),
    # model options
    ("model_missing", ("--model_name_or_path",), (), USAGE, ["--model_name_or_path", "required"]),
    ("model_path_missing", ("--model_name_or_path",), ("--model_name_or_path", "{world}/no_ckpt"), USAGE,
     ["--model_name_or_path", "no_ckpt", "no checkpoint folder"]),
    ("model_path_is_file", ("--model_name_or_path",), ("--model_name_or_path", "{world}/file.txt"), USAGE,
     ["--model_name_or_path", "is a file"]),
    ("model_folder_without_config", ("--model_name_or_path",), ("--model_name_or_path", "{world}/noconfig"), USAGE,
     ["--model_name_or_path", "has no config.json"]),
    ("freeze_gate_unknown", (), ("--freeze_gate", "all"), USAGE, ["--freeze_gate", "router, gate_substring, none"]),
    ("aux_loss_coef_negative", (), ("--aux_loss_coef", "-1"), USAGE, ["--aux_loss_coef", ">= 0"]),
    ("moepatch_config_missing", (), ("--moepatch_config", "{world}/gone.json"), USAGE,
     ["--moepatch_config", "gone.json", "no such file"]),
    ("moepatch_config_not_json", (), ("--moepatch_config", "{world}/notjson.json"), FAILURE,
     ["--moepatch_config", "not JSON", "line 2"]),
    # a file whose content is wrong: exit 1 naming the file and its flag (as --initial_weights)
    ("moepatch_config_not_object", (), ("--moepatch_config", "{world}/list.json"), FAILURE,
     ["list.json (--moepatch_config)", "got list"]),
    ("moepatch_config_invalid_block", (), ("--moepatch_config", "{world}/block_invalid.json"), FAILURE,
     ["block_invalid.json (--moepatch_config)", "routing_stats.layers"]),
    # recipe
    ("recipe_missing", (), ("--recipe", "{world}/gone.json"), USAGE, ["--recipe", "gone.json", "no such file"]),
    ("recipe_not_json", (), ("--recipe", "{world}/notjson.json"), FAILURE, ["--recipe", "not JSON"]),
    ("recipe_not_object", (), ("--recipe", "{world}/list.json"), FAILURE, ["list.json (--recipe)", "got list"]),
    ("recipe_unknown_key", (), ("--recipe", "{world}/recipe_unknown.json"), FAILURE,
     ["recipe_unknown.json (--recipe)", "'updte_every'"]),
    ("recipe_without_value", (), ("--recipe",), USAGE, ["--recipe", "expected a JSON file"]),
    # the Trainer's own arguments and the command line itself
    ("output_dir_missing", ("--output_dir",), (), USAGE, ["--output_dir", "required"]),
    ("output_dir_is_file", ("--output_dir",), ("--output_dir", "{world}/file.txt"), USAGE,
     ["--output_dir", "is a file"]),
    ("output_dir_holds_a_run", ("--output_dir",), ("--output_dir", "{world}/used_output"), USAGE,
     ["--output_dir", "rounds.jsonl"]),
    ("unknown_argument", (), ("--update_evry", "3"), USAGE, ["--update_evry", "unknown argument"]),
    ("lr_scheduler_unknown", (), ("--lr_scheduler_type", "zigzag"), USAGE, ["--lr_scheduler_type", "zigzag"]),
    ("eval_steps_zero", (), ("--eval_strategy", "steps", "--eval_steps", "0", "--logging_steps", "0"), USAGE,
     ["--eval_steps"]),
    ("deepspeed_config_missing", (), ("--deepspeed", "{world}/gone_ds.json"), USAGE, ["--deepspeed", "gone_ds.json"]),
    ("seed_negative", (), ("--seed", "-1"), USAGE, ["--seed", "got -1"]),
    ("resume_missing", (), ("--resume_from_checkpoint", "{world}/no_checkpoint"), USAGE,
     ["--resume_from_checkpoint", "no_checkpoint"]),
    ("resume_without_sampler_state", (), ("--resume_from_checkpoint", "{world}/noconfig"), USAGE,
     ["--resume_from_checkpoint", "dynamic_sampling.json"]),
    # found while reading the data (exit 1, file and line named), still before the model is loaded
    ("data_line_not_json", ("--data_dir",), ("--data_dir", "{world}/badjson"), FAILURE,
     ["badjson/train/chat.jsonl:3", "not JSON"]),
    ("data_record_unknown_format", ("--data_dir",), ("--data_dir", "{world}/badrecord"), FAILURE,
     ["badrecord/train/chat.jsonl:3", "unknown record format"]),
    ("probe_size_leaves_no_train", ("--data_dir",), ("--data_dir", "{world}/small", "--probe_size", "3"), FAILURE,
     ["probe_size", "small/train/chat.jsonl"]),
    ("data_record_null_instruction", ("--data_dir",), ("--data_dir", "{world}/badtypes"), FAILURE,
     ["badtypes/train/chat.jsonl:3", "'instruction' must be a string, got null"]),
    ("data_record_number_in_conversation", ("--data_dir",), ("--data_dir", "{world}/badturn"), FAILURE,
     ["badturn/train/chat.jsonl:3", "conversations[1]", "a string 'value'"]),
    # the output folder: never the checkpoint (it would be overwritten), always a folder that can be written
    ("output_dir_is_the_checkpoint", ("--output_dir",), ("--output_dir", "{world}/ckpt"), USAGE,
     ["--output_dir", "ckpt is the command's input (--model_name_or_path)", "would replace it"]),
    ("output_dir_is_the_checkpoint_synthetic", ("--output_dir", "--data_dir"),
     ("--output_dir", "{world}/ckpt", "--synthetic_data"), USAGE,
     ["--output_dir", "is the command's input (--model_name_or_path)"]),
    ("output_dir_inside_the_checkpoint", ("--output_dir",), ("--output_dir", "{world}/ckpt/run"), USAGE,
     ["--output_dir", "lies inside the command's input", "(--model_name_or_path)"]),
    ("output_dir_holds_the_checkpoint", ("--output_dir",), ("--output_dir", "{world}"), USAGE,
     ["--output_dir", "holds the command's input", "ckpt (--model_name_or_path)"]),
    ("output_dir_is_the_data", ("--output_dir",), ("--output_dir", "{world}/data"), USAGE,
     ["--output_dir", "is the command's input (--data_dir)"]),
    ("output_dir_inside_the_data", ("--output_dir",), ("--output_dir", "{world}/data/run"), USAGE,
     ["--output_dir", "lies inside the command's input", "(--data_dir)"]),
    ("output_dir_holds_the_data", ("--output_dir", "--data_dir"),
     ("--output_dir", "{world}/one", "--train_files", "chat={world}/one/train/chat.jsonl",
      "code={world}/two/train/code.jsonl"), USAGE, ["--output_dir", "holds the command's input", "(--train_files)"]),
    # issue #21, round three: every input of the run, one check (moepatch.staged_output.refuse_output_in_inputs)
    ("output_dir_holds_the_probe_files", ("--output_dir",),
     ("--output_dir", "{world}/two", "--probe_files", "chat={world}/two/train/chat.jsonl"), USAGE,
     ["--output_dir", "holds the command's input", "(--probe_files)"]),
    ("output_dir_holds_the_moepatch_config", ("--output_dir",),
     ("--output_dir", "{world}/blockdir", "--moepatch_config", "{world}/blockdir/block.json"), USAGE,
     ["--output_dir", "holds the command's input", "(--moepatch_config)"]),
    ("output_dir_holds_the_recipe", ("--output_dir",),
     ("--output_dir", "{world}/recipedir", "--recipe", "{world}/recipedir/recipe.json"), USAGE,
     ["--output_dir", "holds the command's input", "(--recipe)"]),
    ("output_dir_is_the_recipe", ("--output_dir",),
     ("--output_dir", "{world}/recipedir/recipe.json", "--recipe", "{world}/recipedir/recipe.json"), USAGE,
     ["--output_dir", "is a file"]),
    ("output_dir_holds_the_initial_weights", ("--output_dir",),
     ("--output_dir", "{world}/weightsdir", "--initial_weights", "{world}/weightsdir/w.json"), USAGE,
     ["--output_dir", "holds the command's input", "(--initial_weights)"]),
    # an output folder nothing can be written into: refused naming the flag (exit 2), never a raw PermissionError
    ("output_dir_in_sys", ("--output_dir",), ("--output_dir", "/sys/moepatch-run"), USAGE,
     ["--output_dir: /sys/moepatch-run cannot be written"]),
    ("output_dir_in_proc", ("--output_dir",), ("--output_dir", "/proc/moepatch-run"), USAGE,
     ["--output_dir: /proc/moepatch-run cannot be written"]),
    ("output_dir_under_a_file", ("--output_dir",), ("--output_dir", "{world}/file.txt/run"), USAGE,
     ["--output_dir", "under the file"]),
    ("output_dir_empty", ("--output_dir",), ("--output_dir", ""), USAGE, ["--output_dir", "empty path"]),
    # the checkpoint: weights, a tokenizer, a model moepatch can patch, a moepatch block that fits it — all checked
    # before a weight is read (the skeleton is built on the meta device) and before <output_dir>/data is written
    ("model_without_weights", ("--model_name_or_path", "--data_dir"),
     ("--model_name_or_path", "{world}/noweights", "--synthetic_data"), USAGE,
     ["--model_name_or_path", "noweights", "holds no weights"]),
    ("model_without_tokenizer", ("--model_name_or_path", "--data_dir"),
     ("--model_name_or_path", "{world}/notok", "--synthetic_data"), FAILURE, ["notok", "no usable tokenizer"]),
    ("dense_model", ("--model_name_or_path",), ("--model_name_or_path", "{world}/dense"), USAGE,
     ["--model_name_or_path", "cannot patch LlamaForCausalLM"]),
    ("top_k_above_num_experts", ("--model_name_or_path",), ("--model_name_or_path", "{world}/topk9"), USAGE,
     ["--model_name_or_path", "top-9", "8 experts"]),
    ("moepatch_config_misfits_the_model", (), ("--moepatch_config", "{world}/block_c2r.json"), FAILURE,
     ["block_c2r.json (--moepatch_config)", "collaborative_list", "4 decoder layers"]),
    ("checkpoint_block_misfits_the_model", ("--model_name_or_path",), ("--model_name_or_path", "{world}/ownblock"),
     FAILURE, ["ownblock/config.json", "collaborative_list", "4 decoder layers"]),
    ("probe_layers_out_of_range", (), ("--probe_layers", "99"), USAGE, ["--probe_layers", "layer 99 does not exist"]),
    ("probe_layers_dense_layer", (), ("--probe_layers", "1"), USAGE, ["--probe_layers", "dense layer", "[0, 2, 3]"]),
    ("probe_layers_hyphenated", (), ("--probe-layers", "99"), USAGE,  # named as typed, without a field path
     ["finetune: error: --probe-layers: layer 99 does not exist"]),
    ("gate_noise_hyphenated_without_a_switch", (), ("--gate-noise", "true"), USAGE,
     ["finetune: error: --gate-noise: family 'qwen2_moe' has no such switch"]),
    # --max_length: examples left without a label token are dropped; a source left with none is refused
    ("max_length_cuts_every_label", (), ("--max_length", "2"), USAGE,
     ["--max_length", "no assistant (label) token", "'chat'", "data/train/chat.jsonl"]),
    ("max_length_cuts_every_label_synthetic", ("--data_dir",), ("--synthetic_data", "--max_length", "2"), USAGE,
     ["--max_length", "'letters' (synthetic"]),
    # TrainingArguments values transformers accepts but fails on (or trains nonsense with) after the model load
    ("learning_rate_nan", (), ("--learning_rate", "nan"), USAGE, ["--learning_rate", "finite", "got nan"]),
    ("learning_rate_negative", (), ("--learning_rate", "-1"), USAGE, ["--learning_rate", ">= 0", "got -1.0"]),
    ("batch_size_zero", (), ("--per_device_train_batch_size", "0"), USAGE,
     ["--per_device_train_batch_size", ">= 1", "got 0"]),
    ("gradient_accumulation_zero", (), ("--gradient_accumulation_steps", "0"), USAGE,
     ["--gradient_accumulation_steps", ">= 1", "got 0"]),
    ("epochs_inf", ("--max_steps",), ("--dynamic_sampling", "false", "--num_train_epochs", "inf"), USAGE,
     ["--num_train_epochs", "finite", "got inf"]),
    ("epochs_nan", ("--max_steps",), ("--dynamic_sampling", "false", "--num_train_epochs", "nan"), USAGE,
     ["--num_train_epochs", "got nan"]),
    ("epochs_negative", ("--max_steps",), ("--dynamic_sampling", "false", "--num_train_epochs", "-2"), USAGE,
     ["--num_train_epochs", ">= 0", "got -2.0"]),
    ("weight_decay_negative", (), ("--weight_decay", "-0.1"), USAGE, ["--weight_decay", ">= 0"]),
    ("adam_beta2_one", (), ("--adam_beta2", "1"), USAGE, ["--adam_beta2", "[0, 1)"]),
    ("save_steps_zero", (), ("--save_strategy", "steps", "--save_steps", "0"), USAGE, ["--save_steps", "> 0"]),
    ("report_to_unknown", (), ("--report_to", "bogus"), USAGE,
     ["--report_to", "'bogus'", "none, all, or one of", "tensorboard"]),
    # a flag given twice: argparse would keep the last silently
    ("flag_given_twice", (), ("--max_steps", "5", "--max_steps", "1"), USAGE,
     ["--max_steps", "given twice; give it once"]),
    ("flag_given_twice_spelt_differently", (), ("--max_steps", "5", "--max-steps=1"), USAGE,
     ["--max-steps", "given twice (as --max_steps and --max-steps)"]),
    ("bool_flag_given_twice", (), ("--dynamic_sampling", "false", "--no_dynamic_sampling"), USAGE,
     ["--no_dynamic_sampling", "given twice"]),
    ("list_flag_given_twice", ("--data_dir",), ("--train_files", "a={world}/data/train/chat.jsonl",
                                                "--train_files", "b={world}/data/train/code.jsonl"), USAGE,
     ["--train_files", "given twice"]),
    # a check that would warn (two sources, no probe round) never prints before a later check's error
    ("two_sources_then_a_bad_seed", ("--data_dir",), ("--data_dir", "{world}/two", "--seed", "-1"), USAGE,
     ["--seed", "got -1"]),
    ("no_probe_round_then_a_missing_file", (), ("--update_every", "10", "--initial_weights", "{world}/gone.json"),
     USAGE, ["--initial_weights", "gone.json"]),
]


def test_the_table_is_large_enough():
    assert len(CASES) >= 35 and len({case[0] for case in CASES}) == len(CASES)


def _no_model_load(monkeypatch) -> list:
    """Record (and stop) any attempt to load weights."""
    import moepatch.loading.pretrained
    from moepatch.errors import CommandError

    attempts = []

    def refuse(*args, **kwargs):
        attempts.append(args)
        raise CommandError("the model was loaded")

    monkeypatch.setattr(moepatch.loading.pretrained, "from_pretrained", refuse)
    return attempts


@pytest.mark.parametrize("case", CASES, ids=[case[0] for case in CASES])
def test_bad_input_fails_clearly_and_writes_nothing(case, world, tmp_path, capsys, monkeypatch):
    _, drop, extra, expected_code, fragments = case
    out = tmp_path / "out"
    argv = _argv(world, out, drop, extra)
    before = _snapshot(world, tmp_path)
    attempts = _no_model_load(monkeypatch)
    code, stdout, stderr = _run_main(argv, capsys)
    assert not attempts, "refused only after loading the model"
    assert code == expected_code, stderr
    assert "finetune: error:" in stderr
    for fragment in fragments:
        assert fragment in stderr, (fragment, stderr)
    assert "Traceback" not in stdout + stderr and "Errno" not in stderr and "PermissionError" not in stderr
    assert "finetune: warning" not in stderr and "MoePatchWarning" not in stderr  # the error alone
    assert _snapshot(world, tmp_path) == before  # nothing written, nothing touched
    assert not out.exists()


def test_probe_layers_checked_after_the_load_too_write_nothing(world, tmp_path, capsys, monkeypatch):
    """--probe_layers is checked on the skeleton (the table above); the check on the loaded model that follows it
    still comes before anything is written — <output_dir>/data of --synthetic_data included."""
    import moepatch.finetune

    monkeypatch.setattr(moepatch.finetune, "check_model_structure", lambda *args, **kwargs: None)
    out = tmp_path / "out"
    before = _snapshot(world, tmp_path)
    code, stdout, stderr = _run_main(_argv(world, out, ("--data_dir",), ("--synthetic_data", "--probe_layers", "1")),
                                     capsys)
    assert code == USAGE and "--probe_layers" in stderr and "layer 1 is a dense layer" in stderr
    assert "Traceback" not in stdout + stderr
    assert _snapshot(world, tmp_path) == before and not out.exists()


@pytest.mark.parametrize("damage, message", [("truncated", "model.safetensors: not a complete safetensors file"),
                                             ("lacks_a_key", "model.safetensors: the weights hold")])
def test_unloadable_weights_are_named_and_nothing_is_written(damage, message, world, tmp_path, capsys, monkeypatch):
    """Truncated weights, or weights without a key the model needs (which would otherwise be trained from random
    values): found from the safetensors headers before the model is loaded (transformers would print its load
    report first), refused naming the file, before anything is written (<output_dir>/data of --synthetic_data
    included)."""
    from safetensors.torch import load_file
    from safetensors.torch import save_file

    checkpoint = tmp_path / damage
    shutil.copytree(world / "ckpt", checkpoint)
    weights = checkpoint / "model.safetensors"
    if damage == "truncated":
        weights.write_bytes(weights.read_bytes()[:1000])
    else:
        tensors = load_file(str(weights))
        del tensors["model.layers.0.self_attn.q_proj.weight"]
        save_file(tensors, str(weights), metadata={"format": "pt"})
    out = tmp_path / "out"
    before = _snapshot(world, tmp_path)
    attempts = _no_model_load(monkeypatch)
    code, stdout, stderr = _run_main(_argv(world, out, ("--model_name_or_path", "--data_dir"),
                                           ("--model_name_or_path", str(checkpoint), "--synthetic_data")), capsys)
    assert code == FAILURE and f"finetune: error: {checkpoint}/{message}" in stderr, stderr
    assert not attempts and "LOAD REPORT" not in stdout + stderr and "Traceback" not in stdout + stderr
    assert _snapshot(world, tmp_path) == before and not out.exists()


@pytest.mark.skipif(os.geteuid() == 0, reason="root may write into a folder without write permission")
def test_read_only_output_parent_is_refused_before_anything(world, tmp_path, capsys, monkeypatch):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    try:
        attempts = _no_model_load(monkeypatch)
        code, stdout, stderr = _run_main(_argv(world, locked / "out", ("--output_dir",),
                                               ("--output_dir", str(locked / "out"))), capsys)
        assert code == USAGE and "--output_dir" in stderr and "not writable" in stderr, stderr
        assert "Traceback" not in stdout + stderr and not attempts
        assert not (locked / "out").exists()
    finally:
        locked.chmod(0o755)


def test_report_to_an_integration_that_is_not_installed(world, tmp_path, capsys):
    from transformers.integrations import integration_utils

    installed = set(integration_utils.get_available_reporting_integrations())
    missing = [name for name in integration_utils.INTEGRATION_TO_CALLBACK if name not in installed
               and name != "azure_ml"]
    if not missing:
        pytest.skip("every reporting integration is installed")
    out = tmp_path / "out"
    code, stdout, stderr = _run_main(_argv(world, out, extra=("--report_to", missing[0])), capsys)
    assert code == USAGE and f"--report_to: {missing[0]!r} is not installed" in stderr, stderr
    assert "Traceback" not in stdout + stderr and not out.exists()


def test_a_recipe_value_overridden_once_is_not_a_repeat(world, tmp_path):
    recipe = tmp_path / "recipe.json"
    recipe.write_text(json.dumps({"update_every": 5, "max_steps": 10}))
    args = parse_arguments(["--recipe", str(recipe), *_argv(world, tmp_path / "out")])
    assert (args[2].update_every, args[3].max_steps) == (2, 4)  # the command line wins, once


def test_a_recipes_dynamic_option_is_a_default_that_dynamic_sampling_false_leaves_alone(world, tmp_path):
    """--dynamic_sampling false on the command line over a dynamic recipe: the recipe's update_every is a default,
    not the user's flag, so it is not refused (the user's own --update_every is: see the table)."""
    recipe = tmp_path / "recipe.json"
    recipe.write_text(json.dumps({"dynamic_sampling": True, "update_every": 5}))
    args = parse_arguments(["--recipe", str(recipe), *_argv(world, tmp_path / "out", extra=("--dynamic_sampling",
                                                                                              "false"))])
    assert not args[1].dynamic_sampling and args[2].update_every == 5


def test_truncation_drops_unlabelled_examples_and_trains_on_the_rest(world, tmp_path, capsys, monkeypatch, caplog):
    """A source whose long examples lose every label to --max_length keeps its short ones (logged, counted)."""
    import moepatch.data.instruction

    data = tmp_path / "data"
    short = [{"instruction": "Hi", "output": "Hello there."}] * 6
    long = [{"instruction": " ".join(["word"] * 200), "output": "Fine."}] * 6  # its answer starts past 96 tokens
    for name in SOURCES:
        _jsonl(data / "train" / f"{name}.jsonl", short + long if name == "chat" else short)
        _jsonl(data / "dev" / f"{name}.jsonl", long[:2])  # probes are only routed: kept whatever their labels
    loaded = []
    original = moepatch.data.instruction.load_source
    monkeypatch.setattr(moepatch.data.instruction, "load_source",
                        lambda *a, **k: loaded.append(original(*a, **k)) or loaded[-1])
    attempts = _no_model_load(monkeypatch)
    with caplog.at_level("WARNING", logger="moepatch.data"):
        code, _, stderr = _run_main(_argv(world, tmp_path / "out", ("--data_dir",), ("--data_dir", str(data))), capsys)
    assert code == FAILURE and "the model was loaded" in stderr and attempts  # got as far as the load
    assert [(source.name, len(source.train), source.dropped, len(source.probe)) for source in loaded] == [
        ("chat", 6, 6, 2), ("code", 6, 0, 2), ("math", 6, 0, 2)]
    assert "source 'chat': 6 of its 12 training examples" in caplog.text and "'code'" not in caplog.text
    assert not (tmp_path / "out").exists()


def test_two_sources_warn_that_the_weights_cannot_move(world, tmp_path):
    args = parse_arguments(_argv(world, tmp_path / "out", ("--data_dir",), ("--data_dir", str(world / "two"))))
    with pytest.warns(MoePatchWarning, match="two sources .*cannot move apart"):
        assert check_inputs(*args) == ["chat", "code"]
    static = parse_arguments(_argv(world, tmp_path / "out", ("--data_dir",),
                                   ("--data_dir", str(world / "two"), "--dynamic_sampling", "false")))
    assert check_inputs(*static) == ["chat", "code"]  # no warning: pytest turns MoePatchWarning into an error
    assert not (tmp_path / "out").exists()


def test_no_probe_round_before_max_steps_warns(world, tmp_path):
    args = parse_arguments(_argv(world, tmp_path / "out", extra=("--update_every", "10")))
    with pytest.warns(MoePatchWarning, match="no probe round will run"):
        check_inputs(*args)


def test_valid_inputs_pass_every_check(world, tmp_path):
    args = parse_arguments(_argv(world, tmp_path / "out", extra=("--initial_weights", str(world / "w_zero.json"),
                                                                 "--dynamic_sampling", "false")))
    assert check_inputs(*args) == list(SOURCES)  # a zero weight is fine for a static mixture
    assert not (tmp_path / "out").exists()
    beside = world / "ckpt_tuned"  # a sibling whose name starts with the checkpoint's is not inside it
    args = parse_arguments(_argv(world, beside, extra=("--report_to", "all", "--num_train_epochs", "0")))
    assert check_inputs(*args) == list(SOURCES) and not beside.exists()


def test_probe_size_subsets_the_dev_files_in_a_run(world, tmp_path, monkeypatch, capsys):
    """Through the finetune engine: dev/<name>.jsonl of 4 examples, --probe_size 2 → 2 probe examples per source,
    the same ones on every run; the whole train file is trained on.  The model load is stubbed to stop the run."""
    import moepatch.data
    import moepatch.loading.pretrained
    from moepatch.errors import CommandError

    loaded = []

    def recording_load_source(*args, **kwargs):
        loaded.append(original(*args, **kwargs))
        return loaded[-1]

    def stop(*args, **kwargs):
        raise CommandError("stopped before the model load")

    original = moepatch.data.instruction.load_source
    monkeypatch.setattr(moepatch.data.instruction, "load_source", recording_load_source)
    monkeypatch.setattr(moepatch.loading.pretrained, "from_pretrained", stop)
    for _ in range(2):
        code, _, stderr = _run_main(_argv(world, tmp_path / "out"), capsys)
        assert code == FAILURE and "stopped before the model load" in stderr
    first, second = loaded[:3], loaded[3:]
    assert [len(source.probe) for source in first] == [2, 2, 2]
    assert [len(source.train) for source in first] == [12, 12, 12]
    assert [source.probe for source in first] == [source.probe for source in second]


def test_debug_flag_is_split_from_the_trainers_own():
    assert _split_debug(["--a", "1", "--debug"]) == (True, ["--a", "1"])
    assert _split_debug(["--debug", "--a", "1"]) == (True, ["--a", "1"])
    assert _split_debug(["--debug", "underflow_overflow", "--a"]) == (False, ["--debug", "underflow_overflow", "--a"])


def _script(*args: str) -> subprocess.CompletedProcess:
    environment = {key: value for key, value in os.environ.items() if key != "MOEPATCH_DEBUG"}
    environment["TOKENIZERS_PARALLELISM"] = "false"
    return subprocess.run([sys.executable, str(REPO / "scripts" / "finetune.py"), *args], capture_output=True,
                          text=True, cwd=REPO, env=environment, timeout=300)


def test_script_bad_argument_exits_2_without_traceback(world, tmp_path):
    out = tmp_path / "out"
    done = _script(*_argv(world, out, extra=("--update_every", "0")))
    assert done.returncode == 2, done.stderr
    assert "finetune: error: --update_every: expected an integer >= 1" in done.stderr
    assert "Traceback" not in done.stdout + done.stderr
    assert not out.exists()


def test_script_prints_moepatch_warnings_in_one_line_of_its_own(world, tmp_path):
    """A warning from the checks (two sources) is printed as ``finetune: warning: ...`` — not Python's
    ``file:line: MoePatchWarning`` with the source line — and a later error still ends the run alone."""
    out = tmp_path / "out"
    done = _script(*_argv(world, out, ("--data_dir",), ("--data_dir", str(world / "two"), "--max_length", "2")))
    assert done.returncode == 2, done.stderr
    assert "finetune: warning: dynamic mixing with two sources" in done.stderr
    assert "MoePatchWarning" not in done.stderr and "warnings.warn" not in done.stderr
    assert "finetune: error: --max_length" in done.stderr and "Traceback" not in done.stderr
    assert not out.exists()


def test_script_debug_shows_the_traceback(world, tmp_path):
    out = tmp_path / "out"
    done = _script(*_argv(world, out, ("--model_name_or_path",), ("--model_name_or_path", str(world / "no_ckpt"),
                                                                   "--debug")))
    assert done.returncode == 1  # an uncaught exception
    assert "Traceback" in done.stderr and "UsageError: --model_name_or_path" in done.stderr
    assert not out.exists()
