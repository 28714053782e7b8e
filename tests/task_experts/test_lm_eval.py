"""``moepatch eval``: lm-eval's own CLI with the ``moepatch`` model, offline on local tasks, with task experts."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import copy_run

from moepatch.cli import main as cli
from moepatch.data.synthetic import synthetic_records

pytest.importorskip("lm_eval")


def _write_task(folder: Path, name: str, source: str, count: int = 4) -> None:
    """A two-choice task over one embedded source: the right answer vs another record's (absolute data path)."""
    records = synthetic_records(source, count + 1, seed=11)
    docs = [{"question": record["conversations"][0]["value"],
             "choices": [record["conversations"][1]["value"], records[i + 1]["conversations"][1]["value"]],
             "label": 0} for i, record in enumerate(records[:count])]
    data = folder / f"{name}.jsonl"
    data.write_text("".join(json.dumps(doc) + "\n" for doc in docs))
    (folder / f"{name}.yaml").write_text(
        f"task: {name}\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {data}\n"
        "test_split: test\noutput_type: multiple_choice\ndoc_to_text: \"{{question}}\"\n"
        "doc_to_choice: \"{{choices}}\"\ndoc_to_target: label\nmetric_list:\n  - metric: acc\n")


@pytest.fixture(scope="module")
def routed(experts_run, tmp_path_factory) -> Path:
    copy = copy_run(experts_run, tmp_path_factory.mktemp("evaluated"))
    assert cli(["experts", "fit-router", str(copy)]) == 0
    return copy


def _run_eval(tmp_path: Path, model_args: str) -> subprocess.CompletedProcess:
    tasks = tmp_path / "tasks"
    tasks.mkdir(exist_ok=True)
    _write_task(tasks, "te_math", "math")
    _write_task(tasks, "te_letters", "letters")
    env = {"HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "HF_DATASETS_CACHE": str(tmp_path / "cache"), "PATH": "/usr/bin:/bin"}
    import os

    env = {**os.environ, **env}
    return subprocess.run([sys.executable, "-m", "moepatch.cli", "eval", "--model", "moepatch", "--model_args",
                           model_args, "--tasks", "te_math", "te_letters", "--include_path", str(tasks), "--device",
                           "cpu", "--batch_size", "1", "--output_path", str(tmp_path / "results")],
                          capture_output=True, text=True, env=env, cwd=tmp_path, timeout=600)


def test_eval_routes_each_request_and_writes_routing_statistics(routed, base_checkpoint, tmp_path):
    done = _run_eval(tmp_path, f"pretrained={base_checkpoint},task_experts={routed},top_k=1,routing_stats=true")
    assert done.returncode == 0, done.stderr[-3000:]
    results = list((tmp_path / "results").rglob("results_*.json"))
    assert results, done.stdout[-2000:]
    scores = json.loads(results[0].read_text())["results"]
    assert set(scores) == {"te_math", "te_letters"} and all("acc,none" in value for value in scores.values())
    stats = json.loads((tmp_path / "results" / "moepatch_routing_stats.json").read_text())
    assert set(stats["tasks"]) == {"te_math", "te_letters"}
    for entry in stats["tasks"].values():
        assert entry["tokens"] > 0 and len(entry["expert_load"]) == len(entry["layers"])
        assert all(abs(sum(row) - 1) < 1e-6 for row in entry["expert_load"])
    # each lm-eval task's requests went to the expert of its own source (top-1 routing)
    assert stats["adapters"]["te_math"] == {"math": 8} and stats["adapters"]["te_letters"] == {"letters": 8}


def test_eval_without_experts_applies_the_moepatch_config_override(base_checkpoint, tmp_path):
    override = tmp_path / "override.json"
    override.write_text(json.dumps({"moepatch": {"routing_stats": True}}))
    done = _run_eval(tmp_path, f"pretrained={base_checkpoint},moepatch_config={override},routing_stats=true")
    assert done.returncode == 0, done.stderr[-3000:]
    stats = json.loads((tmp_path / "results" / "moepatch_routing_stats.json").read_text())
    assert set(stats["tasks"]) == {"te_math", "te_letters"} and stats["adapters"] == {}


def test_eval_with_experts_of_another_base_is_refused(routed, tmp_path):
    from moepatch.testing import tiny

    other = tiny.save_tiny_checkpoint(tmp_path / "other", "qwen2_moe", seed=1)
    done = _run_eval(tmp_path, f"pretrained={other},task_experts={routed}")
    assert done.returncode != 0
    assert "were trained on" in done.stderr


def test_eval_refuses_unknown_model_args_and_statistics_with_nowhere_to_go(base_checkpoint, tmp_path, capsys):
    """A typo of ``task_experts=`` is named (HFLM would swallow it and evaluate the base); ``routing_stats=true``
    without ``--output_path`` is refused before lm-eval runs."""
    done = _run_eval(tmp_path, f"pretrained={base_checkpoint},task_expert={tmp_path}")
    assert done.returncode == 2  # a bad argument, refused before lm-eval runs
    assert "unknown argument(s) ['task_expert']" in done.stderr and "Traceback" not in done.stderr
    assert cli(["eval", "--model", "moepatch", "--model_args", f"pretrained={base_checkpoint},routing_stats=true",
                "--tasks", "te_math"]) == 2
    assert "--output_path: routing_stats=true writes" in capsys.readouterr().err
    assert cli(["eval", "--model", "moepatch", "--model_args", f"pretrained={base_checkpoint}", "--tasks", "te_math",
                "--output_path", str(base_checkpoint / "results")]) == 2
    assert "lies inside the command's input" in capsys.readouterr().err
    assert cli(["eval", "--model", "moepatch", "--model_args", f"pretrained={base_checkpoint / 'nope'}", "--tasks",
                "te_math"]) == 2
    assert "--model_args: pretrained=" in capsys.readouterr().err


@pytest.mark.parametrize(("form", "named"), [
    (["run", "--model", "moepatch", "--model_args", "pretrained={ck}", "task_expert=x"],
     "--model_args: unknown argument(s) ['task_expert']"),
    (["--model", "moepatch", "-a", "pretrained={ck},top_k=x"], "-a: top_k: expected an integer, got 'x'"),
    (["--model", "moepatch", "--model_args=pretrained={ck},routing_stats=maybe", "--output_path", "out"],
     "--model_args: routing_stats: expected true or false, got 'maybe'"),
    (["--model", "moepatch", "--model_args", '{{"pretrained": "{ck}", "top_k": 0}}'],
     "--model_args: top_k: expected an integer >= 1, got 0"),
], ids=["space-separated", "short-flag", "equals", "json"])
def test_eval_refuses_bad_model_args_in_every_form_before_lm_eval_starts(base_checkpoint, tmp_path, form, named):
    """Every form lm-eval takes ``--model_args`` in is checked: exit 2 naming the flag as typed and the key, and
    lm-eval never starts (no task loading: ``arc_easy`` would need the network, no lm-eval log line)."""
    argv = [token.format(ck=base_checkpoint) for token in form]
    done = subprocess.run([sys.executable, "-m", "moepatch.cli", "eval", *argv, "--tasks", "arc_easy"],
                          capture_output=True, text=True, cwd=tmp_path, timeout=300,
                          env={**__import__("os").environ, "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1"})
    assert done.returncode == 2, done.stderr[-3000:]
    assert f"moepatch eval: error: {named}" in done.stderr
    assert "Traceback" not in done.stderr and "INFO" not in done.stderr and "Selected Tasks" not in done.stderr
    assert not (tmp_path / "out").exists()


def test_the_model_runs_the_same_checks_when_lm_eval_builds_it(base_checkpoint):
    """lm-eval called from Python builds the model without ``moepatch eval``'s pre-check: the same function refuses
    the same values with the same words, before anything loads."""
    from moepatch.evaluation import MoePatchLM

    with pytest.raises(ValueError, match=r"^moepatch model_args: top_k: expected an integer, got 'x'$"):
        MoePatchLM(pretrained=str(base_checkpoint), top_k="x")
    with pytest.raises(ValueError, match=r"^moepatch model_args: routing_stats: expected true or false, got 'maybe'"):
        MoePatchLM(pretrained=str(base_checkpoint), routing_stats="maybe")
    with pytest.raises(ValueError, match=r"^moepatch model_args: pretrained=.*nope: no such folder"):
        MoePatchLM(pretrained=str(base_checkpoint / "nope"))


def test_eval_with_task_experts_on_mixtral(tmp_path):
    """The same command on another family: Mixtral experts of the two sources the lm-eval tasks come from."""
    from conftest import finetune_argv

    from moepatch.mixing.finetune import main
    from moepatch.testing import tiny

    checkpoint = tiny.save_tiny_checkpoint(tmp_path / "ckpt", "mixtral")
    output = tmp_path / "out"
    assert main(finetune_argv(checkpoint, output, "--max_steps", "1", "--tasks", "letters", "math",
                              "--disable_tqdm", "true")) == 0
    assert cli(["experts", "fit-router", str(output)]) == 0
    done = _run_eval(tmp_path, f"pretrained={checkpoint},task_experts={output},top_k=1,routing_stats=true")
    assert done.returncode == 0, done.stderr[-3000:]
    stats = json.loads((tmp_path / "results" / "moepatch_routing_stats.json").read_text())
    assert stats["adapters"]["te_math"] == {"math": 8} and stats["adapters"]["te_letters"] == {"letters": 8}
    assert all(len(entry["expert_load"]) == len(entry["layers"]) > 0 for entry in stats["tasks"].values())
