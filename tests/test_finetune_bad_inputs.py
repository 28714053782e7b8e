"""scripts/finetune.py on bad inputs: each one fails with its exit status (2: usage, 1: failure), one message naming
the argument or file, no traceback (unless --debug), and nothing written — no model is loaded for any of them."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from moepatch import tiny
from moepatch.errors import MoePatchWarning
from moepatch.finetune import _split_debug
from moepatch.finetune import check_inputs
from moepatch.finetune import main
from moepatch.finetune import parse_arguments
from moepatch.synthetic import synthetic_records

REPO = Path(__file__).resolve().parents[1]
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
    (root / "used_output" / "sampling_info").mkdir(parents=True)
    (root / "used_output" / "sampling_info" / "rounds.jsonl").write_text('{"step": 2}\n')
    return root


def _argv(world: Path, out: Path, drop: tuple[str, ...] = (), extra: tuple[str, ...] = ()) -> list[str]:
    base = {"--model_name_or_path": str(world / "ckpt"), "--data_dir": str(world / "data"), "--output_dir": str(out),
            "--max_steps": "4", "--update_every": "2", "--probe_size": "2", "--max_length": "32",
            "--report_to": "none"}
    argv = [token for flag, value in base.items() if flag not in drop for token in (flag, value)]
    return [*argv, "--use_cpu", *(token.format(world=world, out=out) for token in extra)]


def _snapshot(*roots: Path) -> dict[str, tuple[int, int]]:
    """Every file and folder under ``roots`` with its size and modification time."""
    result = {}
    for root in roots:
        for dirpath, dirnames, filenames in os.walk(root):
            for name in dirnames + filenames:
                path = Path(dirpath) / name
                stat = path.stat()
                result[str(path)] = (stat.st_size if path.is_file() else -1, stat.st_mtime_ns)
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
    ("initial_weights_not_json", (), ("--initial_weights", "{world}/notjson.json"), USAGE,
     ["--initial_weights", "not JSON"]),
    ("initial_weights_not_object", (), ("--initial_weights", "{world}/list.json"), USAGE,
     ["--initial_weights", "got list"]),
    ("initial_weights_negative", (), ("--initial_weights", "{world}/w_negative.json"), USAGE,
     ["--initial_weights", ">= 0", "'code': -1"]),
    ("initial_weights_nan", (), ("--initial_weights", "{world}/w_nan.json"), USAGE, ["--initial_weights", "finite"]),
    ("initial_weights_text", (), ("--initial_weights", "{world}/w_text.json"), USAGE,
     ["--initial_weights", "'chat': 'a'"]),
    ("initial_weights_unknown_source", (), ("--initial_weights", "{world}/w_extra.json"), USAGE,
     ["--initial_weights", "poetry", "name no source"]),
    ("initial_weights_source_left_out", (), ("--initial_weights", "{world}/w_missing.json"), USAGE,
     ["--initial_weights", "no weight for ['math']"]),
    ("initial_weights_zero_dynamic", (), ("--initial_weights", "{world}/w_zero.json"), USAGE,
     ["--initial_weights", "> 0", "chat"]),
    ("dynamic_one_source", ("--data_dir",), ("--data_dir", "{world}/one"), USAGE,
     ["--dynamic_sampling", "found one ('chat')"]),
    ("dynamic_without_max_steps", ("--max_steps",), (), USAGE, ["--max_steps", "got -1"]),
    ("dynamic_max_steps_zero", (), ("--max_steps", "0"), USAGE, ["--max_steps", "got 0"]),
    # model options
    ("model_missing", ("--model_name_or_path",), (), USAGE, ["--model_name_or_path", "required"]),
    ("model_path_missing", ("--model_name_or_path",), ("--model_name_or_path", "{world}/no_ckpt"), USAGE,
     ["--model_name_or_path", "no_ckpt", "no such folder"]),
    ("model_path_is_file", ("--model_name_or_path",), ("--model_name_or_path", "{world}/file.txt"), USAGE,
     ["--model_name_or_path", "is a file"]),
    ("model_folder_without_config", ("--model_name_or_path",), ("--model_name_or_path", "{world}/noconfig"), USAGE,
     ["--model_name_or_path", "has no config.json"]),
    ("freeze_gate_unknown", (), ("--freeze_gate", "all"), USAGE, ["--freeze_gate", "router, gate_substring, none"]),
    ("aux_loss_coef_negative", (), ("--aux_loss_coef", "-1"), USAGE, ["--aux_loss_coef", ">= 0"]),
    ("moepatch_config_missing", (), ("--moepatch_config", "{world}/gone.json"), USAGE,
     ["--moepatch_config", "gone.json", "no such file"]),
    ("moepatch_config_not_json", (), ("--moepatch_config", "{world}/notjson.json"), USAGE,
     ["--moepatch_config", "not JSON", "line 2"]),
    ("moepatch_config_not_object", (), ("--moepatch_config", "{world}/list.json"), USAGE,
     ["--moepatch_config", "got list"]),
    ("moepatch_config_invalid_block", (), ("--moepatch_config", "{world}/block_invalid.json"), USAGE,
     ["--moepatch_config", "routing_stats.layers"]),
    # recipe
    ("recipe_missing", (), ("--recipe", "{world}/gone.json"), USAGE, ["--recipe", "gone.json", "no such file"]),
    ("recipe_not_json", (), ("--recipe", "{world}/notjson.json"), USAGE, ["--recipe", "not JSON"]),
    ("recipe_not_object", (), ("--recipe", "{world}/list.json"), USAGE, ["--recipe", "got list"]),
    ("recipe_unknown_key", (), ("--recipe", "{world}/recipe_unknown.json"), USAGE, ["--recipe", "'updte_every'"]),
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
]


def test_the_table_is_large_enough():
    assert len(CASES) >= 35 and len({case[0] for case in CASES}) == len(CASES)


@pytest.mark.parametrize("case", CASES, ids=[case[0] for case in CASES])
def test_bad_input_fails_clearly_and_writes_nothing(case, world, tmp_path, capsys):
    _, drop, extra, expected_code, fragments = case
    out = tmp_path / "out"
    argv = _argv(world, out, drop, extra)
    before = _snapshot(world, tmp_path)
    code, stdout, stderr = _run_main(argv, capsys)
    assert code == expected_code, stderr
    assert "finetune: error:" in stderr
    for fragment in fragments:
        assert fragment in stderr, (fragment, stderr)
    assert "Traceback" not in stdout + stderr
    assert _snapshot(world, tmp_path) == before  # nothing written, nothing touched
    assert not out.exists()


def test_probe_layers_out_of_range_is_refused_before_training(world, tmp_path, capsys):
    """The one argument that needs the model (which layers are MoE layers): refused after loading, before the
    Trainer exists and before anything is written."""
    out = tmp_path / "out"
    before = _snapshot(world, tmp_path)
    code, stdout, stderr = _run_main(_argv(world, out, extra=("--probe_layers", "99")), capsys)
    assert code == USAGE and "--probe_layers" in stderr and "layer 99 does not exist" in stderr
    assert "Traceback" not in stdout + stderr
    assert _snapshot(world, tmp_path) == before and not out.exists()


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


def test_probe_size_subsets_the_dev_files_in_a_run(world, tmp_path, monkeypatch, capsys):
    """Through the finetune engine: dev/<name>.jsonl of 4 examples, --probe_size 2 → 2 probe examples per source,
    the same ones on every run; the whole train file is trained on.  The model load is stubbed to stop the run."""
    import moepatch.data
    import moepatch.loading
    from moepatch.errors import CommandError

    loaded = []

    def recording_load_source(*args, **kwargs):
        loaded.append(original(*args, **kwargs))
        return loaded[-1]

    def stop(*args, **kwargs):
        raise CommandError("stopped before the model load")

    original = moepatch.data.load_source
    monkeypatch.setattr(moepatch.data, "load_source", recording_load_source)
    monkeypatch.setattr(moepatch.loading, "from_pretrained", stop)
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


def test_script_debug_shows_the_traceback(world, tmp_path):
    out = tmp_path / "out"
    done = _script(*_argv(world, out, ("--model_name_or_path",), ("--model_name_or_path", str(world / "no_ckpt"),
                                                                   "--debug")))
    assert done.returncode == 1  # an uncaught exception
    assert "Traceback" in done.stderr and "UsageError: --model_name_or_path" in done.stderr
    assert not out.exists()
