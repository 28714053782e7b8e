"""A task-experts run folder cannot lose or fake data: one reader checks every file of a run before a command uses
it (naming the file), writes land whole or not at all, outputs never overwrite inputs, and a killed training run
is named as unfinished."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from conftest import copy_run
from conftest import finetune_argv

from moepatch.cli import main as cli
from moepatch.data.synthetic import synthetic_records
from moepatch.task_experts import merging

REPO = Path(__file__).resolve().parents[2]


def _tree(root: Path) -> dict[str, tuple[str, int] | None]:
    """Every entry under ``root`` (hidden ones included: a staging folder left behind is a change too): a file's
    bytes (as a digest) and modification time, a folder's presence."""
    return {str(path.relative_to(root)): (hashlib.sha256(path.read_bytes()).hexdigest(), path.stat().st_mtime_ns)
            if path.is_file() else None for path in sorted(root.rglob("*"))}


def _contents(root: Path) -> dict[str, str | None]:
    """Every entry under ``root`` by its bytes alone (a re-run may rewrite identical data files)."""
    return {str(path.relative_to(root)): hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else None
            for path in sorted(root.rglob("*"))}


def _requests(path: Path) -> Path:
    with path.open("w") as stream:
        for task in ("chat", "code"):
            for record in synthetic_records(task, 2, seed=5):
                stream.write(json.dumps({**record, "task": task}) + "\n")
    return path


@pytest.fixture(scope="module")
def fitted(experts_run, tmp_path_factory) -> Path:
    """The trained run with a fitted router and one merge: every kind of file a run holds."""
    run = copy_run(experts_run, tmp_path_factory.mktemp("fitted"))
    assert cli(["experts", "fit-router", str(run), "--max-examples", "8"]) == 0
    assert cli(["experts", "merge", str(run), "--tasks", "chat", "code"]) == 0
    return run


@pytest.fixture()
def run(fitted, tmp_path) -> Path:
    copy = tmp_path / "run"
    shutil.copytree(fitted, copy)
    _requests(copy / "requests.jsonl")
    return copy


def _edit_json(relative: str, **fields) -> Callable[[Path], None]:
    def edit(run: Path) -> None:
        path = run / relative
        data = json.loads(path.read_text())
        data.update(fields)
        path.write_text(json.dumps(data))
    return edit


def _truncate(relative: str) -> Callable[[Path], None]:
    def edit(run: Path) -> None:
        path = run / relative
        path.write_bytes(path.read_bytes()[:200])
    return edit


def _write(relative: str, text: str) -> Callable[[Path], None]:
    return lambda run: (run / relative).write_text(text)


def _unlink(relative: str) -> Callable[[Path], None]:
    return lambda run: (run / relative).unlink()


def _edit_merge_weights(run: Path) -> None:
    path = run / "experts" / "merged" / "merges.json"
    entries = json.loads(path.read_text())
    entries[0]["weights"] = [float("nan"), 0.5]
    path.write_text(json.dumps(entries))


def _user_file_in_vllm(run: Path) -> None:
    (run / "experts" / "vllm").mkdir()
    (run / "experts" / "vllm" / "notes.txt").write_text("mine")


def _nothing(run: Path) -> None:
    return None


def _router_tensors(**replace) -> Callable[[Path], None]:
    """router.safetensors with some tensors replaced (shapes that agree with each other but not with the run)."""
    def edit(run: Path) -> None:
        import torch
        from safetensors.torch import load_file
        from safetensors.torch import save_file

        path = run / "experts" / "router" / "router.safetensors"
        tensors = load_file(str(path))
        tensors.update({key: torch.randn(*shape) for key, shape in replace.items()})
        save_file(tensors, str(path))
    return edit


def _base_elsewhere(run: Path) -> None:
    """The manifest names a base that is not there (the experts' configs name none, as peft allows)."""
    _edit_json("experts/manifest.json", base="/nowhere/base")(run)
    for task in ("chat", "code", "letters", "math"):
        _edit_json(f"experts/{task}/adapter_config.json", base_model_name_or_path=None)(run)


def _fake_encoder(relative: str) -> Callable[[Path], None]:
    """A folder that passes as a sentence-transformers model (modules.json) for the argument checks."""
    def edit(run: Path) -> None:
        (run / relative).mkdir(parents=True)
        (run / relative / "modules.json").write_text("[]")
    return edit


ROUTE = "experts route {run} --input {run}/requests.jsonl"
MERGE = "experts merge {run} --tasks chat math"
EVAL = "eval --model moepatch --model_args pretrained={base},task_experts={run} --tasks te_none"
CASES = [
    # a broken file inside the run: exit 1, the file named, before any model is loaded
    ("expert weights truncated", _truncate("experts/code/adapter_model.safetensors"), MERGE.replace("math", "code"),
     1, "code/adapter_model.safetensors: not a complete safetensors file"),
    ("expert weights missing", _unlink("experts/chat/adapter_model.safetensors"), ROUTE, 1,
     "chat/adapter_model.safetensors: missing"),
    ("expert config of another base", _edit_json("experts/math/adapter_config.json",
                                                 base_model_name_or_path="/elsewhere/other-model"), MERGE, 1,
     "math/adapter_config.json: base_model_name_or_path: '/elsewhere/other-model'"),
    ("fit-router with an expert's weights missing", _unlink("experts/letters/adapter_model.safetensors"),
     "experts fit-router {run} --max-examples 8", 1, "letters/adapter_model.safetensors: missing"),
    ("expert rank differs", _edit_json("experts/chat/adapter_config.json", r=4), ROUTE, 1,
     "chat/adapter_config.json: r: 4, but manifest.json records rank 16"),
    ("expert config not JSON", _write("experts/chat/adapter_config.json", "{oops"), MERGE, 1,
     "chat/adapter_config.json: not JSON (line 1"),
    ("router of other tasks", _edit_json("experts/router/router.json", tasks=["chat", "code"]), ROUTE, 1,
     "router/router.json: tasks: ['chat', 'code'], but the run's experts are"),
    ("router weights truncated", _truncate("experts/router/router.safetensors"), ROUTE, 1,
     "router/router.safetensors: not a complete safetensors file"),
    ("router config not JSON", _write("experts/router/router.json", "[1,"), "experts serve-check {run} --input "
                                                                            "{run}/requests.jsonl", 1,
     "router/router.json: not JSON"),
    ("router head unknown", _edit_json("experts/router/router.json", head="magic"), ROUTE, 1,
     "router/router.json: head: expected one of"),
    ("merges.json not JSON", _write("experts/merged/merges.json", "{"), MERGE, 1, "merged/merges.json: not JSON"),
    ("merged adapter not listed", lambda run: shutil.copytree(run / "experts/merged/chat+code",
                                                              run / "experts/merged/stray"), MERGE, 1,
     "adapter folder(s) ['stray'] not listed in merges.json"),
    ("listed merge missing", lambda run: shutil.rmtree(run / "experts/merged/chat+code"),
     "experts export-vllm {run} --max-lora-rank 64", 1, "the merged adapter 'chat+code' is missing"),
    ("the run's tokenizer corrupt", _write("experts/tokenizer.json", "{}\n{}"), ROUTE, 1,
     "experts/tokenizer.json: not JSON (line 2"),
    ("run did not finish", _edit_json("experts/manifest.json", complete=False, planned=["chat", "code", "letters",
                                                                                        "math", "poems"]),
     ROUTE, 1, "did not finish (complete: false; trained ['chat', 'code', 'letters', 'math'] of the planned"),
    # outputs that would overwrite inputs: exit 2, the flag named
    ("routes over the requests", _nothing, ROUTE + " --routes {run}/requests.jsonl", 2,
     "--routes: {run}/requests.jsonl is the command's input (--input)"),
    ("routes over the manifest", _nothing, ROUTE + " --routes {run}/experts/manifest.json", 2,
     "--routes: {run}/experts/manifest.json is the command's input (output (manifest))"),
    ("routes over the run's tokenizer", _nothing, ROUTE + " --routes {run}/experts/tokenizer.json", 2,
     "tokenizer.json exists and is not a routes file"),
    ("merges.json with a NaN weight", _edit_merge_weights, MERGE, 1,
     "merges.json: [0]: weights: expected one finite number per task"),
    ("routes inside an expert", _nothing, ROUTE + " --routes {run}/experts/chat/routes.jsonl", 2,
     "lies inside the command's input"),
    # options that would be ignored
    ("an encoder option without the fine-tune", _nothing, "experts fit-router {run} --encoder-epochs 3", 2,
     "--encoder-epochs: only applies to --finetune-encoder"),
    ("a positive margin with the centroid head", _nothing, "experts fit-router {run} --positive-margin 0.1", 2,
     "--positive-margin: only applies to the contrastive head"),
    ("fit-router --data naming the experts folder", _nothing, "experts fit-router {run} --data {run}/experts", 2,
     "--data: "),
    ("more loras per batch than adapters", _nothing, "experts export-vllm {run} --max-lora-rank 64 --max-loras 100",
     2, "--max-loras: expected 1 .. "),
    ("a user's file inside vllm/", _user_file_in_vllm, "experts export-vllm {run} --max-lora-rank 64", 2,
     "holds ['notes.txt'], which no earlier export wrote"),
    ("serve-check comparing more requests than given", _nothing, "experts serve-check {run} --input "
                                                                 "{run}/requests.jsonl --compare 50", 2,
     "--compare: 50 is more than the 4 requests"),
    # weights that give nothing or nonsense
    ("all-zero weights", _nothing, MERGE + " --weights 0 0", 2, "--weights: all zero"),
    ("vanishing weights", _nothing, MERGE + " --weights 1e-300 1e-300", 2, "--weights: all zero or below 1e-6"),
    ("overflowing weights", _nothing, MERGE + " --weights 1e308 1e308", 2, "above 1e6 in magnitude"),
    ("NaN route weights", _write("routes.jsonl", json.dumps({"tasks": ["chat", "code"], "weights": [float("nan"),
                                                                                                      0.5]}) + "\n"),
     "experts merge {run} --from-routes {run}/routes.jsonl", 1, "routes.jsonl:1: 'weights' must be 2 finite numbers"),
    # issue #21, round three
    # the router's tensors against its head, the run and the encoder's signatures: exit 1, the file and field named
    ("router head of other tensors", _edit_json("experts/router/router.json", head="linear"), ROUTE, 1,
     "router/router.safetensors: no 'weight' tensor, which a 'linear' router"),
    ("router tensors of other tasks", _router_tensors(centroids=(3, 8)), ROUTE, 1,
     "router/router.safetensors: centroids: shape [3, 8] does not fit the tasks size (4 tasks in"),
    ("router width not the signatures'", _router_tensors(centroids=(4, 10)), ROUTE, 1,
     "router/router.safetensors: centroids: signatures of width 10, but the encoder router.json names"),
    ("serve-check with a router of another width", _router_tensors(centroids=(4, 10)),
     "experts serve-check {run} --input {run}/requests.jsonl --compare 2", 1,
     "router/router.safetensors: centroids: signatures of width 10"),
    # a file given to a command that is not JSON: exit 1, the file (and line) named
    ("route --input not JSON", _write("bad.jsonl", "{not json\n"), "experts route {run} --input {run}/bad.jsonl", 1,
     "bad.jsonl:1"),
    ("serve-check --input not JSON", _write("bad.jsonl", "{not json\n"),
     "experts serve-check {run} --input {run}/bad.jsonl", 1, "bad.jsonl:1"),
    ("export-vllm --routes not JSON", _write("bad.jsonl", "[1, 2\n"),
     "experts export-vllm {run} --max-lora-rank 64 --routes {run}/bad.jsonl", 1, "bad.jsonl:1"),
    # the run's manifest against its base: a run-file fault like every other one (exit 1), manifest.json named
    ("manifest base not a folder", _base_elsewhere, MERGE, 1,
     "manifest.json: base: /nowhere/base is not a folder here"),
    ("manifest hidden size not the base's", _edit_json("experts/manifest.json", hidden_size=64), MERGE, 1,
     "hidden size 32, but the experts in"),
    # eval checks the whole run before lm-eval runs
    ("eval on an unfinished run", _edit_json("experts/manifest.json", complete=False, planned=["chat", "poems"]),
     EVAL, 1, "did not finish (complete: false"),
    ("eval on a run with truncated expert weights", _truncate("experts/math/adapter_model.safetensors"), EVAL, 1,
     "math/adapter_model.safetensors: not a complete safetensors file"),
    ("eval on a run with a corrupt router", _write("experts/router/router.json", "{"), EVAL, 1,
     "router/router.json: not JSON"),
    ("eval on a run without a router", lambda run: shutil.rmtree(run / "experts" / "router"), EVAL, 2,
     "--model_args: task_experts={run}: no fitted router"),
    # an option that would be ignored, a combination that would drop one flag's values
    ("fit-router --features with --encoder", _fake_encoder("encoder"),
     "experts fit-router {run} --encoder {run}/encoder --features hidden", 2,
     "--features: only applies to the base model's signatures; --encoder embeds the requests itself"),
    ("merge --weights with --from-routes", _write("routes.jsonl", json.dumps({"tasks": ["chat", "code"]}) + "\n"),
     "experts merge {run} --from-routes {run}/routes.jsonl --weights 0.7 0.3", 2,
     "--weights: not with --from-routes: a route line carries its own weights"),
    # an input inside the folder a command replaces as a whole: exit 2, the input's flag named
    ("fit-router --encoder inside the router folder", _fake_encoder("experts/router/encoder"),
     "experts fit-router {run} --encoder {run}/experts/router/encoder", 2,
     "--encoder: {run}/experts/router/encoder lies inside {run}/experts/router, which the command replaces"),
    ("fit-router --data holding the router folder", _nothing, "experts fit-router {run} --data {run}", 2,
     "--data: {run} holds {run}/experts/router, which the command writes"),
    ("merge --from-routes inside merged/", _write("experts/merged/routes.jsonl",
                                                  json.dumps({"tasks": ["chat", "code"]}) + "\n"),
     "experts merge {run} --from-routes {run}/experts/merged/routes.jsonl", 2,
     "--from-routes: {run}/experts/merged/routes.jsonl lies inside {run}/experts/merged"),
    ("export-vllm --routes inside vllm/", lambda run: (run / "experts" / "vllm").mkdir() or (
        run / "experts" / "vllm" / "routes.jsonl").write_text(json.dumps({"tasks": ["chat"]}) + "\n"),
     "experts export-vllm {run} --max-lora-rank 64 --routes {run}/experts/vllm/routes.jsonl", 2,
     "--routes: {run}/experts/vllm/routes.jsonl lies inside {run}/experts/vllm"),
    # an output that cannot be written: refused before routing, never [Errno 2] after it
    ("routes into /proc", _nothing, ROUTE + " --routes /proc/moepatch-routes.jsonl", 2,
     "--routes: /proc/moepatch-routes.jsonl cannot be written"),
    ("routes onto a folder", _nothing, ROUTE + " --routes {run}/experts", 2, "--routes: {run}/experts is a folder"),
]


@pytest.mark.parametrize(("case", "damage", "command", "status", "named"), CASES, ids=[case[0] for case in CASES])
def test_a_bad_run_or_argument_is_named_and_nothing_changes(run, capsys, case, damage, command, status, named):
    base = json.loads((run / "experts" / "manifest.json").read_text())["base"]
    damage(run)
    before = _tree(run)
    code = cli(command.format(run=run, base=base).split())
    text = capsys.readouterr()
    message = text.out + text.err
    assert code == status, message
    assert named.format(run=run) in message, message
    assert "Traceback" not in message and "Errno" not in message and "RuntimeError" not in message
    assert _tree(run) == before, "a failed command wrote or changed files"


def test_a_merge_failing_half_way_leaves_the_merged_adapters_as_they_were(run, monkeypatch, capsys):
    """Two merges asked at once, the second fails after the first was written: neither lands, merges.json and the
    earlier merge unchanged, no temporary folder left."""
    merged = run / "experts" / "merged"
    before = _tree(merged)
    real = merging.merge_loaded
    calls = []

    def fail_on_second(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("disk full")
        return real(*args, **kwargs)

    monkeypatch.setattr(merging, "merge_loaded", fail_on_second)
    routes = run / "routes.jsonl"
    routes.write_text(json.dumps({"tasks": ["chat", "math"]}) + "\n" + json.dumps({"tasks": ["code", "math"]}) + "\n")
    assert cli(["experts", "merge", str(run), "--from-routes", str(routes)]) == 1
    assert "disk full" in capsys.readouterr().err
    assert len(calls) == 2
    assert _tree(merged) == before
    assert sorted(path.name for path in merged.parent.iterdir() if path.name.startswith(".")) == []


@pytest.mark.parametrize("command", ["fit-router", "export-vllm"])
def test_a_router_fit_or_vllm_export_failing_at_its_last_write_leaves_the_earlier_one(run, monkeypatch, capsys,
                                                                                      command):
    """The router folder and the vLLM export are replaced as a whole: a failure at the last write (the routing
    report, the routes file) leaves the earlier folder byte for byte."""
    import moepatch.task_experts.router as router_module

    experts = run / "experts"
    if command == "export-vllm":
        assert cli(["experts", "export-vllm", str(run), "--max-lora-rank", "64"]) == 0
        folder = experts / "vllm"
        routes = run / "routes.jsonl"
        routes.write_text(json.dumps({"tasks": ["chat", "code"]}) + "\n")
        real_dumps = json.dumps

        def failing_dumps(value, *args, **kwargs):
            if isinstance(value, dict) and "lora_name" in value:  # a line of requests.jsonl, written last
                raise OSError(28, "No space left on device")
            return real_dumps(value, *args, **kwargs)

        import moepatch.task_experts.vllm_export as vllm_export

        monkeypatch.setattr(vllm_export.json, "dumps", failing_dumps)
        argv = ["experts", "export-vllm", str(run), "--max-lora-rank", "64", "--routes", str(routes)]
    else:
        folder = experts / "router"

        def failing_report(*args, **kwargs):
            raise OSError(28, "No space left on device")

        monkeypatch.setattr(router_module, "routing_report", failing_report)
        argv = ["experts", "fit-router", str(run), "--max-examples", "8"]
    before = _tree(folder)
    assert cli(argv) == 1
    assert "No space left on device" in capsys.readouterr().err
    assert _tree(folder) == before
    assert not [path.name for path in experts.iterdir() if path.name.startswith(".")]


def test_a_failing_merge_without_earlier_merges_leaves_no_merged_folder(run, monkeypatch, capsys):
    """No merged/ before, a merge that fails half-way: still no merged/ (not an empty one), nothing hidden left."""
    shutil.rmtree(run / "experts" / "merged")
    before = _tree(run)

    def failing(*args, **kwargs):
        raise RuntimeError("merge failed on purpose")

    monkeypatch.setattr(merging, "merge_loaded", failing)
    assert cli(["experts", "merge", str(run), "--tasks", "chat", "code"]) == 1
    assert "merge failed on purpose" in capsys.readouterr().err
    assert _tree(run) == before
    assert not (run / "experts" / "merged").exists()


def test_routes_written_onto_a_full_disk_are_named_in_words(run, monkeypatch, capsys):
    """The disk fills up while the routes are written: the routes file named with the reason (no ``[Errno 28]``,
    no temporary name), the earlier routes file as it was."""
    routes = run / "experts" / "routes.jsonl"
    routes.write_text('{"tasks": ["chat"], "weights": [1.0]}\n')
    before = _tree(run)
    import moepatch.cli.experts as experts_command

    real_dumps = json.dumps

    def full_disk(value, *args, **kwargs):
        if isinstance(value, dict) and "where" in value:  # a line of the routes file
            raise OSError(28, "No space left on device")
        return real_dumps(value, *args, **kwargs)

    monkeypatch.setattr(experts_command.json, "dumps", full_disk)
    assert cli(["experts", "route", str(run), "--input", str(run / "requests.jsonl")]) == 1
    err = capsys.readouterr().err
    assert f"{routes}: could not be written (No space left on device)" in err, err
    assert "Errno" not in err and "OSError" not in err and ".writing-" not in err
    assert _tree(run) == before


def test_a_failing_rerun_into_a_finished_run_leaves_it_exactly_as_it_was(run, base_checkpoint, monkeypatch, capsys):
    """``--task_experts`` again into a finished run (with its router and a merge), training failing after its first
    task: the earlier experts, manifest (still complete), router and merges are byte for byte what they were —
    the new expert waited in a staged folder and the stale router / merges were to go only after every expert."""
    from transformers import Trainer

    from moepatch.mixing.finetune import main as finetune

    run_folder = run / "experts"
    assert (run_folder / "router").is_dir() and (run_folder / "merged").is_dir()
    before = _contents(run)
    real_train = Trainer.train
    calls = []

    def train_then_fail(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("training failed on purpose")
        return real_train(self, *args, **kwargs)

    monkeypatch.setattr(Trainer, "train", train_then_fail)
    code = finetune(finetune_argv(base_checkpoint, run, "--max_steps", "1", "--tasks", "chat", "code"))
    err = capsys.readouterr().err
    assert code == 1 and "training failed on purpose" in err and len(calls) == 2, err
    assert _contents(run) == before
    assert json.loads((run_folder / "manifest.json").read_text())["complete"] is True
    assert cli(["experts", "export-vllm", str(run), "--max-lora-rank", "64"]) == 0  # the run still reads whole


def test_merges_add_to_the_earlier_ones_and_record_the_runs_base(run):
    """A second merge keeps the first; the merged adapter names the manifest's base even when an expert's config
    leaves it out (peft copies the first expert's)."""
    config_path = run / "experts" / "chat" / "adapter_config.json"
    config = json.loads(config_path.read_text())
    config["base_model_name_or_path"] = None
    config_path.write_text(json.dumps(config))
    assert cli(["experts", "merge", str(run), "--tasks", "chat", "math"]) == 0
    merged = run / "experts" / "merged"
    names = [entry["name"] for entry in json.loads((merged / "merges.json").read_text())]
    assert names == ["chat+code", "chat+math"]
    base = json.loads((run / "experts" / "manifest.json").read_text())["base"]
    assert json.loads((merged / "chat+math" / "adapter_config.json").read_text())["base_model_name_or_path"] == base


def test_routes_land_whole(run, monkeypatch, capsys):
    """Routing that fails while writing leaves the earlier routes file as it was."""
    routes = run / "experts" / "routes.jsonl"
    routes.write_text('{"tasks": ["chat"], "weights": [1.0]}\n')  # an earlier route output
    import moepatch.task_experts.router as router_module

    def broken_route(self, *args, **kwargs):
        raise RuntimeError("interrupted")

    monkeypatch.setattr(router_module.TaskRouter, "route", broken_route)
    assert cli(["experts", "route", str(run), "--input", str(run / "requests.jsonl")]) == 1
    capsys.readouterr()
    assert routes.read_text() == '{"tasks": ["chat"], "weights": [1.0]}\n'


@pytest.mark.slow
def test_a_killed_task_experts_run_is_named_incomplete(base_checkpoint, tmp_path, capsys):
    """A real ``--task_experts`` run killed once its first expert is written: the next command names the run as
    unfinished (not a tokenizer error)."""
    output = tmp_path / "out"
    argv = finetune_argv(base_checkpoint, output, "--max_steps", "40")
    environment = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    process = subprocess.Popen([sys.executable, str(REPO / "scripts" / "finetune.py"), *argv], env=environment,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    first = output / "experts" / "chat" / "adapter_model.safetensors"
    deadline = time.monotonic() + 600
    while not first.is_file() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.2)
    assert first.is_file(), "the run never wrote its first expert"
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    manifest = json.loads((output / "experts" / "manifest.json").read_text())
    assert manifest["complete"] is False
    assert cli(["experts", "fit-router", str(output)]) == 1
    message = capsys.readouterr().err
    assert "did not finish (complete: false" in message and "tokenizer" not in message
