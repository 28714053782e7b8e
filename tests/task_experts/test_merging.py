"""``moepatch experts merge``: peft cat / svd merges, checked against sums computed here from the raw files."""

from __future__ import annotations

import hashlib
import json
import re
import shutil
from pathlib import Path

import pytest
import torch
from conftest import copy_run
from safetensors.torch import load_file

from moepatch.cli import main as cli

PREFIX = "base_model.model."


def _raw_deltas(folder: Path) -> dict[str, torch.Tensor]:
    """ΔW per module written out by hand: scaling α/r (no patterns in these adapters) times B @ A, float64."""
    config = json.loads((folder / "adapter_config.json").read_text())
    assert not config.get("rank_pattern") and not config.get("alpha_pattern") and not config.get("use_rslora")
    tensors = load_file(str(folder / "adapter_model.safetensors"))
    scale = config["lora_alpha"] / config["r"]
    return {key[len(PREFIX):-len(".lora_A.weight")]: scale * (tensors[key.replace("lora_A", "lora_B")].double()
                                                               @ tensors[key].double())
            for key in tensors if key.endswith(".lora_A.weight")}


@pytest.fixture()
def run(experts_run, tmp_path) -> Path:
    """A private copy of the trained experts (merges write into it)."""
    copy = copy_run(experts_run, tmp_path, data=False)
    return copy


def test_cat_merge_is_the_weighted_sum_of_the_deltas(run, capsys):
    assert cli(["experts", "merge", str(run), "--tasks", "chat", "math", "code", "--weights", "0.5", "0.3",
                "0.2", "--method", "cat"]) == 0
    merged = run / "experts" / "merged" / "chat+math+code~cat-w500_300_200"  # not the equal-weight merge: marked
    config = json.loads((merged / "adapter_config.json").read_text())
    assert config["r"] == 48  # ranks add up: 3 × 16
    experts = {task: _raw_deltas(run / "experts" / task) for task in ("chat", "math", "code")}
    got = _raw_deltas(merged)
    assert set(got) == set(experts["chat"]) and len(got) == 28  # 4 layers × 7 projections (q k v o + shared MLP)
    for module, delta in got.items():
        expected = 0.5 * experts["chat"][module] + 0.3 * experts["math"][module] + 0.2 * experts["code"][module]
        torch.testing.assert_close(delta, expected, atol=1e-6, rtol=1e-5, msg=module)
    merges = json.loads((run / "experts" / "merged" / "merges.json").read_text())
    assert merges[0]["name"] == merged.name and merges[0]["max_relative_error"] < 1e-6
    assert "max relative error" in capsys.readouterr().out


def test_cat_merge_reproduces_the_summed_model(run, base_checkpoint):
    """Outputs of base + merged adapter = base with Σ w·ΔW added to its weights by hand."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from moepatch.testing import tiny

    assert cli(["experts", "merge", str(run), "--tasks", "chat", "letters"]) == 0
    batch = tiny.demo_batch()
    merged = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(str(base_checkpoint)),
                                       str(run / "experts" / "merged" / "chat+letters")).eval()
    by_hand = AutoModelForCausalLM.from_pretrained(str(base_checkpoint)).eval()
    deltas = [_raw_deltas(run / "experts" / task) for task in ("chat", "letters")]
    with torch.no_grad():
        for module in deltas[0]:
            weight = by_hand.get_submodule(module).weight
            weight += (0.5 * deltas[0][module] + 0.5 * deltas[1][module]).to(weight.dtype)
        torch.testing.assert_close(merged(**batch).logits, by_hand(**batch).logits, atol=1e-5, rtol=1e-5)


def test_svd_merge_reports_the_truncation_error(run, capsys):
    assert cli(["experts", "merge", str(run), "--tasks", "code", "math", "--method", "svd", "--rank", "4"]) == 0
    out = capsys.readouterr().out
    reported = float(re.search(r"max relative error ([\d.e+-]+)", out).group(1))
    experts = [_raw_deltas(run / "experts" / task) for task in ("code", "math")]
    worst = 0.0
    for module in experts[0]:  # the best rank-4 approximation's error, from the singular values
        singular = torch.linalg.svdvals(0.5 * experts[0][module] + 0.5 * experts[1][module])
        worst = max(worst, (singular[4:].square().sum() / singular.square().sum()).sqrt().item())
    assert reported == pytest.approx(worst, rel=1e-3)
    folder = run / "experts" / "merged" / "code+math~svd-r4-w500_500"
    assert json.loads((folder / "adapter_config.json").read_text())["r"] == 4


def test_from_routes_merges_every_combination_once(run):
    routes = run / "routes.jsonl"
    routes.write_text("\n".join(json.dumps({"tasks": tasks}) for tasks in
                                (["chat", "code"], ["code", "chat"], ["math", "letters"], ["math"])) + "\n")
    assert cli(["experts", "merge", str(run), "--from-routes", str(routes)]) == 0
    names = sorted(entry["name"] for entry in json.loads((run / "experts" / "merged" / "merges.json").read_text()))
    assert names == ["chat+code", "letters+math"]  # equal weights: a pair is one adapter in either order


def _tree(root: Path) -> dict[str, str | None]:
    """Every entry under ``root``, hidden ones included: a file's bytes (as a digest), a folder's presence."""
    return {str(path.relative_to(root)): hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else None
            for path in sorted(root.rglob("*"))}


def _merged_folder_is_untouched(run: Path, before: dict[str, str | None]) -> bool:
    """The run exactly as it was — no merged/ appeared (not even an empty one), no staging folder left beside it."""
    return _tree(run) == before and not (run / "experts" / "merged").exists()


@pytest.mark.parametrize(("argv", "message"), [
    (["--tasks", "chat", "nope"], r"--tasks: unknown task\(s\) \['nope'\]"),
    (["--tasks", "chat"], r"--tasks: a merge needs two experts or more"),
    (["--tasks", "chat", "code", "--weights", "1"], r"--weights: 1 weight\(s\) \[1\.0\] for 2 tasks"),
    (["--tasks", "chat", "code", "--rank", "4"], r"--rank: only an svd merge"),
    (["--tasks", "chat", "code", "math", "--max-lora-rank", "32"],
     r"--max-lora-rank: the merged adapter 'chat\+code\+math' has rank 48 \(the sum of the ranks \[16, 16, 16\]\), "
     r"more than --max-lora-rank 32"),
    (["--tasks", "chat", "chat"], r"--tasks: task\(s\) \['chat'\] given more than once"),
    (["--tasks", "chat", "code", "--name", "math"], r"--name: 'math' must be .* and not a task's name"),
    (["--tasks", "chat", "code", "--name", "../x"], r"--name: '\.\./x' must be letters"),
    (["--tasks", "chat", "code", "--method", "svd", "--rank", "64"], r"--rank: 64 exceeds the sum of the experts' "
                                                                     r"ranks 32"),
    (["--tasks", "chat", "code", "--method", "svd", "--rank", "20"],
     r"--rank: 20 exceeds the smaller side of model\.layers\.\d\.self_attn\.[kv]_proj \(16×32\)"),
    (["--weights", "1", "1"], r"--tasks: required"),
])
def test_bad_merges_are_refused_and_nothing_is_written(run, capsys, argv, message):
    before = _tree(run)
    assert cli(["experts", "merge", str(run), *argv]) == 2
    err = capsys.readouterr().err
    assert re.search(message, err) and "Traceback" not in err, err
    assert _merged_folder_is_untouched(run, before)


def test_a_named_merge_is_not_replaced_without_replace(run, capsys):
    """--name of an existing merged adapter: refused (it would be silently replaced) unless --replace."""
    assert cli(["experts", "merge", str(run), "--tasks", "chat", "code", "--name", "mine"]) == 0
    capsys.readouterr()
    before = _tree(run)
    assert cli(["experts", "merge", str(run), "--tasks", "chat", "math", "--name", "mine"]) == 2
    err = capsys.readouterr().err
    assert "--name: a merged adapter 'mine' already exists" in err and "Traceback" not in err
    assert _tree(run) == before
    assert cli(["experts", "merge", str(run), "--tasks", "chat", "math", "--name", "mine", "--replace"]) == 0
    entries = json.loads((run / "experts" / "merged" / "merges.json").read_text())
    assert [entry["tasks"] for entry in entries if entry["name"] == "mine"] == [["chat", "math"]]


def test_from_routes_names_the_bad_line(run, capsys):
    routes = run / "routes.jsonl"
    routes.write_text(json.dumps({"tasks": ["chat", "code"]}) + "\n" + json.dumps({"tasks": ["chat", "nope"]}) + "\n")
    before = _tree(run)
    assert cli(["experts", "merge", str(run), "--from-routes", str(routes)]) == 1  # a malformed file: exit 1
    err = capsys.readouterr().err
    assert re.search(r"routes\.jsonl:2: unknown task\(s\) \['nope'\].*\(--from-routes\)", err)
    assert "Traceback" not in err
    assert _merged_folder_is_untouched(run, before)


def test_missing_expert_and_mismatched_base_are_named(run, capsys):
    manifest_path = run / "experts" / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    shutil.rmtree(run / "experts" / "code")
    before = _tree(run)
    assert cli(["experts", "merge", str(run), "--tasks", "chat", "code"]) == 1  # a file of the run is missing
    assert "the expert of task 'code' is missing" in capsys.readouterr().err
    assert _merged_folder_is_untouched(run, before)
    manifest["experts"] = [e for e in manifest["experts"] if e["task"] != "code"]
    manifest["hidden_size"] = 64
    manifest_path.write_text(json.dumps(manifest))
    before = _tree(run)
    # the manifest disagrees with its base: a run-file fault like any other (exit 1), manifest.json named
    assert cli(["experts", "merge", str(run), "--tasks", "chat", "math"]) == 1
    err = capsys.readouterr().err
    assert "hidden size 32, but the experts" in err and "manifest.json 'model_type' / 'hidden_size'" in err, err
    assert "Traceback" not in err
    assert _merged_folder_is_untouched(run, before)


def test_experts_with_and_without_routed_experts_are_not_merged(run, capsys):
    manifest_path = run / "experts" / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    manifest["experts"][0]["target_parameters"] = ["mlp.experts.gate_up_proj"]
    manifest_path.write_text(json.dumps(manifest))
    before = _tree(run)
    assert cli(["experts", "merge", str(run), "--tasks", "chat", "code"]) == 2
    err = capsys.readouterr().err
    assert "the experts adapt different fused routed-expert parameters" in err and "Traceback" not in err
    assert _merged_folder_is_untouched(run, before)
