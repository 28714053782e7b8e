"""Merges of experts on the fused routed experts (peft ``target_parameters``), which peft's own merge refuses.

The reference is peft itself: each ``ParamWrapper``'s ``get_delta_weight`` of the source experts, weighted and
summed, and peft's forward with several adapters active at once (it adds their deltas).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from conftest import finetune_argv

from moepatch.cli import main as cli
from moepatch.mixing.finetune import main
from moepatch.task_experts.serving import TaskExpertModel
from moepatch.testing import tiny

TASKS = ("chat", "code")


@pytest.fixture(scope="module")
def routed_run(base_checkpoint, tmp_path_factory) -> Path:
    """Two experts with LoRA on attention, the shared expert and the fused routed experts (r 4 and 4)."""
    output = tmp_path_factory.mktemp("te_routed") / "out"
    assert main(finetune_argv(base_checkpoint, output, "--max_steps", "2", "--tasks", *TASKS,
                              "--expert_routed_experts", "true", "--expert_r", "4", "--disable_tqdm", "true")) == 0
    # a third expert of another rank, trained into the same run (the others are kept)
    assert main(finetune_argv(base_checkpoint, output, "--max_steps", "2", "--tasks", "math",
                              "--expert_routed_experts", "true", "--expert_r", "2", "--disable_tqdm", "true")) == 0
    return output


def _peft_model(base_checkpoint: Path, folders: dict[str, Path]):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    names = list(folders)
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(str(base_checkpoint)),
                                      str(folders[names[0]]), adapter_name=names[0])
    for name in names[1:]:
        model.load_adapter(str(folders[name]), adapter_name=name)
    return model.eval()


def _merged(run: Path, name: str) -> Path:
    return run / "experts" / "merged" / name


def test_cat_merge_is_the_weighted_sum_of_peft_s_own_deltas_on_every_expert(routed_run, base_checkpoint, capsys):
    from peft.tuners.lora.layer import LoraLayer
    from peft.tuners.lora.layer import ParamWrapper

    assert cli(["experts", "merge", str(routed_run), "--tasks", *TASKS, "--weights", "0.7", "0.3"]) == 0
    reported = float(re.search(r"max relative error ([\d.e+-]+)", capsys.readouterr().out).group(1))
    assert reported < 1e-6
    folder = _merged(routed_run, "chat+code~cat-w700_300")
    config = json.loads((folder / "adapter_config.json").read_text())
    assert config["r"] == 8 and config["target_parameters"] == ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]
    model = _peft_model(base_checkpoint, {task: routed_run / "experts" / task for task in TASKS} | {"m": folder})
    fused = linear = 0
    with torch.no_grad():
        for name, layer in model.named_modules():
            if not isinstance(layer, LoraLayer) or "m" not in layer.lora_A:
                continue
            expected = 0.7 * layer.get_delta_weight("chat") + 0.3 * layer.get_delta_weight("code")
            torch.testing.assert_close(layer.get_delta_weight("m"), expected, atol=1e-6, rtol=1e-5, msg=name)
            assert expected.abs().max() > 0  # trained, not the zero init
            if isinstance(layer, ParamWrapper):
                fused += 1
                assert layer.num_experts == 8 and expected.dim() == 3
            else:
                linear += 1
    assert fused == 6 and linear == 28  # 3 sparse layers × (gate_up, down); 4 layers × (q k v o + shared MLP)


def test_merged_adapter_equals_the_experts_active_together(routed_run, base_checkpoint):
    assert cli(["experts", "merge", str(routed_run), "--tasks", *TASKS, "--weights", "1", "1",
                "--name", "both"]) == 0
    model = _peft_model(base_checkpoint, {task: routed_run / "experts" / task for task in TASKS}
                        | {"both": _merged(routed_run, "both")})
    batch = tiny.demo_batch()
    with torch.no_grad():
        model.base_model.set_adapter(list(TASKS))  # peft adds the two experts' deltas
        together = model(**batch).logits
        model.set_adapter("both")
        merged = model(**batch).logits
        model.set_adapter("chat")
        one = model(**batch).logits
    torch.testing.assert_close(merged, together, atol=1e-5, rtol=1e-5)
    assert (one - together).abs().max() > 1e-4  # the second expert does change the outputs


def test_experts_of_different_ranks_merge_expert_by_expert(routed_run, base_checkpoint):
    from peft.tuners.lora.layer import ParamWrapper

    assert cli(["experts", "merge", str(routed_run), "--tasks", "chat", "math", "--weights", "0.6", "-0.4"]) == 0
    folder = _merged(routed_run, "chat+math~cat-w600_-400")
    assert json.loads((folder / "adapter_config.json").read_text())["r"] == 6  # 4 + 2
    model = _peft_model(base_checkpoint, {"chat": routed_run / "experts" / "chat",
                                          "math": routed_run / "experts" / "math", "m": folder})
    wrappers = [layer for layer in model.modules() if isinstance(layer, ParamWrapper) and "m" in layer.lora_A]
    assert wrappers and all(layer.r["math"] == 2 and layer.r["m"] == 6 for layer in wrappers)
    with torch.no_grad():
        for layer in wrappers:
            expected = 0.6 * layer.get_delta_weight("chat") - 0.4 * layer.get_delta_weight("math")
            torch.testing.assert_close(layer.get_delta_weight("m"), expected, atol=1e-6, rtol=1e-5)


def _optimal_truncation_error(model, weights: dict[str, float], rank: int) -> float:
    """The worst relative error of the best rank-``rank`` approximation of Σ w·ΔW over every adapted matrix (each
    expert of a fused parameter on its own), from peft's own deltas and ``torch.linalg.svdvals``."""
    from peft.tuners.lora.layer import LoraLayer

    worst = 0.0
    with torch.no_grad():
        for layer in model.modules():
            if not isinstance(layer, LoraLayer) or not all(name in layer.lora_A for name in weights):
                continue
            total = sum(w * layer.get_delta_weight(name).double() for name, w in weights.items())
            for matrix in total.reshape(-1, *total.shape[-2:]):
                singular = torch.linalg.svdvals(matrix)
                worst = max(worst, (singular[rank:].square().sum() / singular.square().sum()).sqrt().item())
    return worst


def test_svd_merge_of_fused_experts_reports_the_optimal_truncation_error(routed_run, base_checkpoint, capsys):
    errors = {}
    for rank in (8, 2):
        assert cli(["experts", "merge", str(routed_run), "--tasks", *TASKS, "--method", "svd",
                    "--rank", str(rank)]) == 0
        errors[rank] = float(re.search(r"max relative error ([\d.e+-]+)", capsys.readouterr().out).group(1))
    assert errors[8] < 1e-6  # the sum has rank ≤ 8: nothing to truncate
    model = _peft_model(base_checkpoint, {task: routed_run / "experts" / task for task in TASKS})
    assert errors[2] == pytest.approx(_optimal_truncation_error(model, {"chat": 0.5, "code": 0.5}, 2), rel=1e-3)
    config = json.loads((_merged(routed_run, "chat+code~svd-r2-w500_500") / "adapter_config.json").read_text())
    assert config["r"] == 2 and config["target_parameters"]


def test_a_failed_merge_leaves_no_half_built_adapter(routed_run, monkeypatch):
    from moepatch.task_experts import weighted_adapters
    from moepatch.task_experts.weighted_adapters import add_weighted_adapter

    model = TaskExpertModel.from_experts(routed_run, with_router=False).model

    def broken_fused(*args, **kwargs):
        raise RuntimeError("fused merge failed")

    def broken_peft(*args, _original=model.add_weighted_adapter, **kwargs):
        _original(*args, **kwargs)  # peft has injected the adapter into the linear layers, then fails
        raise RuntimeError("peft failed")

    for target, name, replacement in ((weighted_adapters, "merge_fused", broken_fused),
                                      (model, "add_weighted_adapter", broken_peft)):
        with monkeypatch.context() as patch:
            patch.setattr(target, name, replacement)
            with pytest.raises(RuntimeError, match="failed"):
                add_weighted_adapter(model, ["chat", "code"], [0.5, 0.5], "broken", "cat")
        assert "broken" not in model.peft_config
        assert not any("broken" in getattr(layer, "lora_A", {}) for layer in model.modules())
    add_weighted_adapter(model, ["chat", "code"], [0.5, 0.5], "broken", "cat")  # the name is free again
    with pytest.raises(ValueError, match=r"svd_rank: 20 exceeds the smaller side of .*_proj \(16×32\)"):
        add_weighted_adapter(model, ["chat", "code"], [0.5, 0.5], "wide", "svd", svd_rank=20)
    model.peft_config["chat"].use_rslora = True
    with pytest.raises(ValueError, match=r"the adapters \['chat'\] use rsLoRA"):
        add_weighted_adapter(model, ["chat", "code"], [0.5, 0.5], "scaled", "cat")
    assert "wide" not in model.peft_config and "scaled" not in model.peft_config


def test_serving_merges_fused_experts_in_memory_as_the_written_merge(routed_run):
    assert cli(["experts", "merge", str(routed_run), "--tasks", *TASKS]) == 0
    serving = TaskExpertModel.from_experts(routed_run, with_router=False)
    written = serving.logits(["Say hello."], ["chat+code"])
    serving.model.delete_adapter("chat+code")
    assert serving.adapter_for(["code", "chat"]) == "chat+code"  # merged now, in memory
    torch.testing.assert_close(serving.logits(["Say hello."], ["chat+code"]), written, atol=1e-6, rtol=1e-6)


def test_experts_with_different_fused_parameters_are_refused(routed_run, tmp_path, capsys):
    manifest_path = routed_run / "experts" / "manifest.json"
    original = manifest_path.read_text()
    manifest = json.loads(original)
    manifest["experts"][0]["target_parameters"] = ["mlp.experts.down_proj"]
    try:
        manifest_path.write_text(json.dumps(manifest))
        assert cli(["experts", "merge", str(routed_run), "--tasks", *TASKS, "--name", "refused"]) == 2
    finally:
        manifest_path.write_text(original)
    assert "--tasks: the experts adapt different fused routed-expert parameters" in capsys.readouterr().err
    assert not _merged(routed_run, "refused").exists()


def test_a_name_already_loaded_is_refused_not_silently_kept(routed_run):
    from moepatch.task_experts.weighted_adapters import add_weighted_adapter

    serving = TaskExpertModel.from_experts(routed_run, with_router=False)
    with pytest.raises(ValueError, match="adapter_name: 'code' is already loaded"):
        add_weighted_adapter(serving.model, list(TASKS), [0.5, 0.5], "code")
