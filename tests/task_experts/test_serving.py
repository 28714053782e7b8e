"""Mixed-adapter batches equal one request at a time; the vLLM export's format and refusals."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
import torch
from conftest import copy_run

from moepatch.cli import main as cli
from moepatch.data.synthetic import synthetic_records
from moepatch.task_experts.serving import TaskExpertModel
from moepatch.task_experts.vllm_export import VLLM_MAX_LORA_RANKS


@pytest.fixture(scope="module")
def served(experts_run, tmp_path_factory) -> Path:
    """A copy of the run with a router and one saved merge."""
    copy = copy_run(experts_run, tmp_path_factory.mktemp("served"))
    assert cli(["experts", "fit-router", str(copy)]) == 0
    assert cli(["experts", "merge", str(copy), "--tasks", "chat", "code"]) == 0
    return copy


def _texts(per_task: int = 2) -> list[str]:
    return [record["conversations"][0]["value"] for task in ("chat", "code", "letters", "math")
            for record in synthetic_records(task, per_task, seed=7)]


def test_mixed_adapter_batch_equals_each_request_alone(served):
    serving = TaskExpertModel.from_experts(served)
    texts = _texts()
    adapters = ["chat", "code", "chat+code", "__base__", "letters", "math", "chat+code", "math"]
    assert serving.mixed_batches
    mixed = serving.generate_with(texts, adapters, max_new_tokens=6)
    for text, adapter, tokens in zip(texts, adapters, mixed, strict=True):
        assert serving.generate_with([text], [adapter], max_new_tokens=6)[0] == tokens  # greedy, identical
    alone = torch.cat([serving.logits([text], [adapter]) for text, adapter in zip(texts, adapters, strict=True)])
    torch.testing.assert_close(serving.logits(texts, adapters), alone, atol=1e-4, rtol=1e-4)
    assert not torch.allclose(alone[0], serving.logits([texts[0]], ["__base__"])[0], atol=1e-4)  # adapters count


def test_a_mixed_batch_reaches_the_lora_inside_the_moe_block(served):
    """The shared expert sees [batch·tokens, hidden]: each request's rows must get its own adapter."""
    serving = TaskExpertModel.from_experts(served, with_router=False)
    texts = _texts(1)[:2]
    shared = serving.model.get_base_model().model.layers[0].mlp.shared_expert.down_proj
    seen = []
    original = shared._mixed_batch_forward

    def capture(x, *args, adapter_names, **kwargs):
        seen.append(adapter_names)
        return original(x, *args, adapter_names=adapter_names, **kwargs)

    shared._mixed_batch_forward = capture
    serving.logits(texts, ["chat", "math"])
    del shared._mixed_batch_forward
    lengths = [len(serving.tokenizer(text)["input_ids"]) for text in texts]
    width = max(lengths)
    assert seen and seen[0] == ["chat"] * width + ["math"] * width


def test_a_layer_that_sees_part_of_the_tokens_refuses_a_mixed_batch(served):
    """Rows that are not batch × tokens (say, the tokens routed to one expert) cannot be told apart: refused."""
    serving = TaskExpertModel.from_experts(served, with_router=False)
    texts = _texts(1)[:2]
    serving.logits(texts, ["chat", "math"])  # records the batch's token count
    shared = serving.model.get_base_model().model.layers[0].mlp.shared_expert.down_proj
    width = max(len(serving.tokenizer(text)["input_ids"]) for text in texts)
    rows = torch.zeros(2 * width - 1, shared.in_features)
    with pytest.raises(ValueError, match=rf"shared_expert\.down_proj: {2 * width - 1} input rows for a mixed batch "
                                         rf"of 2 requests of {width} tokens"):
        shared(rows, adapter_names=["chat", "math"])


def test_generate_routes_and_uses_the_merge_of_the_chosen_tasks(served):
    serving = TaskExpertModel.from_experts(served)
    results = serving.generate(_texts(1), top_k=2, max_new_tokens=3)
    for result in results:
        assert len(result.tasks) == 2 and result.adapter == "+".join(sorted(result.tasks))
        assert result.adapter in serving.adapters and len(result.token_ids) <= 3
    with pytest.raises(ValueError, match=r"unknown adapter\(s\) \['nope'\]"):
        serving.generate_with(["hi"], ["nope"])


def test_serve_check_prints_equality_and_throughput(served, tmp_path, capsys):
    requests = tmp_path / "requests.jsonl"
    requests.write_text("".join(json.dumps({"text": text}) + "\n" for text in _texts(3)))
    assert cli(["experts", "serve-check", str(served), "--input", str(requests), "--batch-size", "4",
                "--max-new-tokens", "4", "--compare", "4"]) == 0
    out = capsys.readouterr().out
    assert "4/4 requests generate the same greedy tokens as alone" in out
    assert re.search(r"throughput ratio mixed / one adapter at a time: \d+\.\d\d", out)


def test_export_vllm_writes_engine_args_and_lora_requests(served, capsys):
    assert cli(["experts", "route", str(served), "--input", str(_requests_file(served)), "--top-k", "1"]) == 0
    assert cli(["experts", "export-vllm", str(served), "--max-lora-rank", "64", "--routes",
                str(served / "experts" / "routes.jsonl")]) == 0
    data = json.loads((served / "experts" / "vllm" / "vllm.json").read_text())
    assert data["architecture"] == "Qwen2MoeForCausalLM"
    names = [entry["lora_name"] for entry in data["lora_requests"]]
    assert names == ["chat", "code", "letters", "math", "chat+code"]
    assert [entry["lora_int_id"] for entry in data["lora_requests"]] == [1, 2, 3, 4, 5]  # vLLM ids start at 1
    for entry in data["lora_requests"]:
        config = json.loads((Path(entry["lora_path"]) / "adapter_config.json").read_text())
        assert config["r"] == entry["rank"] <= 64 and (Path(entry["lora_path"]) / "adapter_model.safetensors").is_file()
    assert data["engine_args"] == {"model": data["engine_args"]["model"], "enable_lora": True, "max_loras": 5,
                                   "max_lora_rank": 64, "max_cpu_loras": 5}
    lines = [json.loads(line) for line in (served / "experts" / "vllm" / "requests.jsonl").read_text().splitlines()]
    assert lines and all(line["lora_name"] in names for line in lines)
    assert "EngineArgs(model=" in capsys.readouterr().out


def _requests_file(served: Path) -> Path:
    path = served / "requests.jsonl"
    path.write_text("".join(json.dumps({"text": text}) + "\n" for text in _texts(1)))
    return path


@pytest.mark.parametrize(("argv", "message"), [
    (["--max-lora-rank", "16"], r"chat\+code: rank 32 > --max-lora-rank 16"),
    (["--max-lora-rank", "48"], r"--max-lora-rank: vLLM accepts \[1, 8, 16, 32, 64"),
])
def test_export_vllm_refusals_write_nothing(served, capsys, argv, message):
    shutil.rmtree(served / "experts" / "vllm", ignore_errors=True)
    before = _tree(served)
    assert cli(["experts", "export-vllm", str(served), *argv]) == 2
    err = capsys.readouterr().err
    assert re.search(message, err) and "Traceback" not in err, err
    assert _tree(served) == before and not (served / "experts" / "vllm").exists()
    assert 48 not in VLLM_MAX_LORA_RANKS


def _tree(root: Path) -> dict[str, str | None]:
    """Every entry under ``root``, hidden ones included: a file's bytes (as a digest), a folder's presence."""
    import hashlib

    return {str(path.relative_to(root)): hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else None
            for path in sorted(root.rglob("*"))}


def _refused(argv: list[str], copy: Path, capsys, message: str) -> None:
    """``argv`` exits 2 naming ``message``, without a traceback, and leaves ``copy`` as it was."""
    before = _tree(copy)
    assert cli(argv) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err, err
    assert _tree(copy) == before


def test_export_vllm_refuses_routed_expert_adapters_and_unknown_architectures(served, tmp_path, capsys):
    copy = tmp_path / "out"
    shutil.copytree(served / "experts", copy / "experts", ignore=shutil.ignore_patterns("vllm"))
    config_path = copy / "experts" / "math" / "adapter_config.json"
    config = json.loads(config_path.read_text())
    config_path.write_text(json.dumps({**config, "target_parameters": ["mlp.experts.down_proj"]}))
    argv = ["experts", "export-vllm", str(copy), "--max-lora-rank", "64"]
    _refused(argv, copy, capsys, "math: target_parameters ['mlp.experts.down_proj'] (fused routed experts)")
    config_path.write_text(json.dumps(config))
    manifest_path = copy / "experts" / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    # the same adapters on a Mixtral base: vLLM's Mixtral has no dense MLP, so the shared-expert LoRA is refused
    manifest_path.write_text(json.dumps({**manifest, "model_type": "mixtral"}))
    _refused(argv, copy, capsys, "chat: down_proj: not a LoRA layer of vLLM's implementation; vLLM's "
                                 "MixtralForCausalLM takes LoRA on ['k_proj', 'o_proj', 'q_proj', 'v_proj']")
    manifest_path.write_text(json.dumps({**manifest, "model_type": "llama_moe"}))
    _refused(argv, copy, capsys, "vLLM has no LoRA implementation for it")
    assert not (copy / "experts" / "vllm").exists()
