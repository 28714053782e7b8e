"""Patched loading: moepatch.from_pretrained, and install/uninstall for tools that only use trust_remote_code."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import ROUTED_NEW_FAMILIES
from helpers import logits_of
from real_data import LLAMA_MOE_TOPT5_CONFIG
from transformers import AutoModelForCausalLM

import moepatch
from moepatch.loading.install import BACKUP_NAME
from moepatch.loading.install import LOADER_FILE
from moepatch.testing import tiny

BLOCK = {"freeze_gate": "router", "routing_stats": {"layers": [-1]}}

# A tool that never imports moepatch: loads with trust_remote_code and reports what it sees.
TOOL = r"""
import json, sys, torch
from transformers import AutoModelForCausalLM
assert sys.modules.get("moepatch") is None  # the tool never imports moepatch
model = AutoModelForCausalLM.from_pretrained(sys.argv[1], trust_remote_code=True).eval()
batch = json.load(open(sys.argv[2]))
with torch.no_grad():
    logits = model(**{k: torch.tensor(v) for k, v in batch.items()}).logits
handle = model.__dict__.get("_moepatch_handle")
print(json.dumps({
    "class": type(model).__name__,
    "patched": handle is not None,
    "frozen": sorted(n for n, p in model.named_parameters() if not p.requires_grad),
    "c2r_buffers": sorted(n for n, _ in model.named_buffers() if n.endswith("c2r_candidates")),
    "recorded_tokens": handle.recorder.tokens.tolist() if handle is not None and handle.recorder else None,
    "logits": logits.flatten()[:64].tolist(),
}))
"""


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _run_tool(folder: Path, tmp_path: Path, batch: dict, extra: str = "") -> subprocess.CompletedProcess:
    tmp_path.mkdir(parents=True, exist_ok=True)
    batch_file = tmp_path / "batch.json"
    batch_file.write_text(json.dumps({k: v.tolist() for k, v in batch.items()}))
    env = dict(os.environ, HF_MODULES_CACHE=str(tmp_path / "hf_modules"), HF_HUB_OFFLINE="1")
    return subprocess.run([sys.executable, "-c", extra + TOOL, str(folder), str(batch_file)], env=env,
                          capture_output=True, text=True, timeout=300)


@pytest.fixture
def checkpoint(tmp_path: Path) -> Path:
    block = {**BLOCK, "c2r": {"top_t": 2, "collaborative_list": tiny.random_collaborative_list(4, 8, 0)}}
    return tiny.save_tiny_checkpoint(tmp_path / "ckpt", "qwen2_moe", moepatch=block)


def test_install_then_load_in_a_process_that_never_imports_moepatch(checkpoint, tmp_path, batch):
    before = _snapshot(checkpoint)
    expected = moepatch.from_pretrained(checkpoint)
    moepatch.install(checkpoint)
    moepatch.install(checkpoint)  # idempotent
    config = json.loads((checkpoint / "config.json").read_text())
    assert config["auto_map"]["AutoModelForCausalLM"] == "moepatch_loader.MoePatchedForCausalLM"

    result = _run_tool(checkpoint, tmp_path, batch)
    assert result.returncode == 0, result.stderr
    seen = json.loads(result.stdout.strip().splitlines()[-1])
    assert seen["class"] == "Qwen2MoeForCausalLM" and seen["patched"]
    assert seen["frozen"] == ["model.layers.0.mlp.gate.weight", "model.layers.2.mlp.gate.weight",
                              "model.layers.3.mlp.gate.weight"]
    assert len(seen["c2r_buffers"]) == 3
    assert seen["recorded_tokens"] == [int(batch["attention_mask"].sum())]
    assert seen["logits"] == logits_of(expected, batch).flatten()[:64].tolist()  # C2R routing, same numbers

    moepatch.uninstall(checkpoint)
    assert _snapshot(checkpoint) == before


def test_missing_or_old_moepatch_gives_a_clear_error(checkpoint, tmp_path, batch):
    moepatch.install(checkpoint)
    result = _run_tool(checkpoint, tmp_path, batch, extra="import sys; sys.modules['moepatch'] = None\n")
    assert result.returncode != 0
    assert "prepared with `moepatch install`" in result.stderr and "pip install moepatch" in result.stderr
    loader = checkpoint / LOADER_FILE
    loader.write_text(loader.read_text().replace(f'REQUIRED_MOEPATCH = "{moepatch.__version__}"',
                                                 'REQUIRED_MOEPATCH = "99.0.0"'))
    result = _run_tool(checkpoint, tmp_path / "second", batch)
    assert result.returncode != 0 and "needs moepatch >= 99.0.0" in result.stderr


def test_folder_with_its_own_remote_code_loads_without_running_it(tmp_path, batch):
    """Like a published LLaMA-MoE folder: an auto_map into a modeling file that cannot run (here: raises)."""
    folder = tiny.save_tiny_checkpoint(tmp_path / "published", "mixtral", moepatch=BLOCK)
    (folder / "modeling_custom.py").write_text("raise RuntimeError('the published modeling file was imported')\n")
    config = json.loads((folder / "config.json").read_text())
    config["auto_map"] = {"AutoModelForCausalLM": "modeling_custom.CustomForCausalLM"}
    (folder / "config.json").write_text(json.dumps(config))
    before = _snapshot(folder)

    model, info = moepatch.from_pretrained(folder, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    assert moepatch.get_handle(model).frozen_parameters
    reference = tiny.tiny_model("mixtral")
    assert torch.equal(logits_of(model, batch), logits_of(reference, batch))
    assert getattr(model.config, "auto_map", None) == config["auto_map"]  # the folder's own entries are kept

    moepatch.install(folder, replace_auto_map=True)  # its own auto_map entries: explicit
    result = _run_tool(folder, tmp_path, batch)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout.strip().splitlines()[-1])["patched"]
    moepatch.uninstall(folder)
    assert _snapshot(folder) == before


def test_install_validates_before_touching_the_folder(tmp_path):
    folder = tiny.save_tiny_checkpoint(tmp_path / "bad", "olmoe", moepatch={"routing_stats": {"layers": [7]}})
    before = _snapshot(folder)
    with pytest.raises(ValueError, match=r"moepatch.routing_stats.layers\[0\]: layer 7 does not exist"):
        moepatch.install(folder)
    assert _snapshot(folder) == before
    with pytest.raises(ValueError, match="was not prepared by `moepatch install`"):
        moepatch.uninstall(folder)


BAD_BLOCK = {"routing_stats": {"layers": [99]}, "bias_update": {"rate": -1},
             "lora_experts": {"method": "molora", "num_experts": 0, "r": -1},
             "c2r": {"top_t": 0, "collaborative_list": None}}
"""Parse-time problems in three features, a structure-dependent one (layer 99 of 4) in a fourth."""

BAD_BLOCK_PROBLEMS = [
    "moepatch.routing_stats.layers[0]: layer 99 does not exist (the model has 4 decoder layers)",
    "moepatch.c2r: give exactly one of collaborative_list and path",
    "moepatch.c2r.top_t: top_t must be at least 1",
    "moepatch.lora_experts.num_experts: expected >= 1, got 0",
    "moepatch.lora_experts.r: expected >= 1, got -1",
    "moepatch.bias_update.rate: expected a positive, finite number, got -1",
]


def _with_block(folder: Path, block: dict) -> Path:
    """``folder`` with ``block`` written as its moepatch block (as a user edits config.json: never validated)."""
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "moepatch": block}))
    return folder


def test_install_names_config_json_and_lists_every_problem_of_the_block(tmp_path, capsys):
    """A user fixes the whole block in one go: install and inspect (the same check) name the file to edit and list
    the parse-time problems beside the layer ones, each once and counted; nothing is written."""
    from moepatch import cli

    folder = _with_block(tiny.save_tiny_checkpoint(tmp_path / "bad", "qwen2_moe"), BAD_BLOCK)
    before = _snapshot(folder)
    with pytest.raises(ValueError) as raised:
        moepatch.install(folder)
    text = str(raised.value)
    assert text.startswith(f"{folder / 'config.json'}: 6 problems in the moepatch config:\n")
    assert all(text.count(problem) == 1 for problem in BAD_BLOCK_PROBLEMS), text
    assert _snapshot(folder) == before

    assert cli.main(["install", str(folder)]) == 1
    err = capsys.readouterr().err
    assert f"moepatch install: error: {folder / 'config.json'}: 6 problems" in err
    assert all(problem in err for problem in BAD_BLOCK_PROBLEMS) and "Traceback" not in err
    assert _snapshot(folder) == before

    assert cli.main(["inspect", str(folder)]) == 1
    output = capsys.readouterr()
    assert [line for line in output.out.splitlines() if line.startswith("  error: ")] == \
        [f"  error: {line}" for line in text.splitlines()[1:] for line in [line.strip()]]
    assert f"{folder / 'config.json'}: 6 problem(s)" in output.err
    assert _snapshot(folder) == before


def test_install_names_config_json_for_one_bad_field(tmp_path, capsys):
    """One problem (an unknown family) is named with its file too, exit 1 (a malformed file), nothing written."""
    from moepatch import cli

    folder = _with_block(tiny.save_tiny_checkpoint(tmp_path / "bad", "qwen2_moe"), {"family": "nosuch"})
    before = _snapshot(folder)
    assert cli.main(["install", str(folder)]) == 1
    err = capsys.readouterr().err
    assert f"{folder / 'config.json'}: invalid moepatch config: moepatch.family: unknown family 'nosuch'" in err
    assert _snapshot(folder) == before


@pytest.mark.parametrize("failing", ["loader", "backup", "config"])
def test_install_and_uninstall_failing_at_any_write_leave_the_folder_as_it_was(tmp_path, monkeypatch, failing):
    """Each of install's three writes (the loader, the backup, config.json last) and uninstall's restore fails in
    turn: the folder is byte for byte what it was before the command."""
    import moepatch.loading.install as install_module
    import moepatch.staged_output as staged

    folder = tiny.save_tiny_checkpoint(tmp_path / "ck", "qwen2_moe")
    names = {"loader": LOADER_FILE, "backup": BACKUP_NAME, "config": "config.json"}
    real = staged.staged_file

    def failing_staged_file(target):
        if Path(target).name == names[failing]:
            raise OSError(28, "No space left on device")
        return real(target)

    before = _snapshot(folder)
    with monkeypatch.context() as patched:
        for module in (staged, install_module):  # install's own staged writes and write_text_atomically's
            patched.setattr(module, "staged_file", failing_staged_file)
        with pytest.raises(OSError, match="No space left"):
            moepatch.install(folder)
    assert _snapshot(folder) == before
    moepatch.install(folder)
    installed = _snapshot(folder)
    if failing == "config":
        with monkeypatch.context() as patched:
            for module in (staged, install_module):
                patched.setattr(module, "staged_file", failing_staged_file)
            with pytest.raises(OSError, match="No space left"):
                moepatch.uninstall(folder)
        assert _snapshot(folder) == installed
    moepatch.uninstall(folder)
    assert _snapshot(folder) == before


def test_saved_copy_of_an_installed_model_is_self_contained(checkpoint, tmp_path):
    moepatch.install(checkpoint)
    model = moepatch.from_pretrained(checkpoint)
    model.save_pretrained(tmp_path / "copy")
    saved = json.loads((tmp_path / "copy" / "config.json").read_text())
    assert "moepatch_loader" not in json.dumps(saved.get("auto_map", {}))
    assert AutoModelForCausalLM.from_pretrained(tmp_path / "copy") is not None
    assert not (tmp_path / "copy" / BACKUP_NAME).exists()


OFFICIAL_LLAMA_MOE = LLAMA_MOE_TOPT5_CONFIG


def _published_llama_moe_folder(folder: Path) -> Path:
    """A folder laid out like the published LLaMA-MoE checkpoint: its auto_map into its own modeling files, which
    raise if anything imports them, the official config fields (with C2R's top_t / collaborative_list) at tiny width."""
    official = json.loads(OFFICIAL_LLAMA_MOE.read_text())
    from moepatch.models.llama_moe import LlamaMoEConfig

    tiny_width = {"hidden_size": 32, "intermediate_size": 64, "num_attention_heads": 4, "num_key_value_heads": 4,
                  "vocab_size": 512, "size_experts": None, "pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2}
    config = LlamaMoEConfig(**{**official, **tiny_width})
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(folder)
    tiny.tiny_tokenizer().save_pretrained(folder)
    for name in ("configuration_llama_moe.py", "modeling_llama_moe_hf.py"):
        (folder / name).write_text(f"raise RuntimeError('{name} of the published checkpoint was imported')\n")
    saved = json.loads((folder / "config.json").read_text())
    saved["auto_map"] = {"AutoConfig": "configuration_llama_moe.LlamaMoEConfig",
                         "AutoModel": "modeling_llama_moe_hf.LlamaMoEModel",
                         "AutoModelForCausalLM": "modeling_llama_moe_hf.LlamaMoEForCausalLM"}
    saved["moepatch"] = {"freeze_gate": "router"}
    (folder / "config.json").write_text(json.dumps(saved, indent=2))
    return folder


def test_published_llama_moe_folder_loads_patched_every_way(tmp_path, batch):
    folder = _published_llama_moe_folder(tmp_path / "llama-moe")
    before = _snapshot(folder)
    model, info = moepatch.from_pretrained(folder, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    handle = moepatch.get_handle(model)
    assert handle.config.c2r.source == "official" and handle.config.c2r.top_t == 5
    assert len(handle.c2r_routers) == 32 and len(handle.frozen_parameters) == 32 * 3
    reference = logits_of(model, batch)
    assert torch.isfinite(reference).all()

    auto = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)  # moepatch imported: native class
    assert moepatch.get_handle(auto) is not None and torch.equal(logits_of(auto.eval(), batch), reference)

    moepatch.install(folder, replace_auto_map=True)  # its own auto_map entries: explicit
    result = _run_tool(folder, tmp_path, batch)
    assert result.returncode == 0, result.stderr
    seen = json.loads(result.stdout.strip().splitlines()[-1])
    assert seen["class"] == "LlamaMoEForCausalLM" and seen["patched"] and len(seen["c2r_buffers"]) == 32
    assert len(seen["frozen"]) == 96 and seen["logits"] == reference.flatten()[:64].tolist()
    moepatch.uninstall(folder)
    assert _snapshot(folder) == before


def test_moduleformer_install_round_trip(tmp_path, batch):
    """MoLM has no remote code of its own on the Hub: install gives tools a way to load it, already patched."""
    ranking = tiny.random_collaborative_list(3, 8, 0)
    block = {"freeze_gate": "router", "c2r": {"top_t": 2, "collaborative_list": ranking}}
    folder = tiny.save_tiny_checkpoint(tmp_path / "molm", "moduleformer", moepatch=block)
    before = _snapshot(folder)
    expected = moepatch.from_pretrained(folder)
    moepatch.install(folder)
    result = _run_tool(folder, tmp_path, batch)
    assert result.returncode == 0, result.stderr
    seen = json.loads(result.stdout.strip().splitlines()[-1])
    assert seen["class"] == "ModuleFormerForCausalLM" and seen["patched"]
    assert len(seen["c2r_buffers"]) == 3 and len(seen["frozen"]) == 3 * 6  # MLP + attention gates, 3 tensors each
    assert seen["logits"] == logits_of(expected, batch).flatten()[:64].tolist()
    moepatch.uninstall(folder)
    assert _snapshot(folder) == before


def test_trained_lora_experts_reach_a_tool_that_never_imports_moepatch(tmp_path, batch):
    """Save a model with trained LoRA experts, install the loader: a trust_remote_code tool gets the same logits."""
    checkpoint = tiny.save_tiny_checkpoint(tmp_path / "ckpt", "mixtral", moepatch={
        "lora_experts": {"method": "mola", "num_experts": 3, "top_k": 2, "r": 4, "routed_experts": True}})
    model = moepatch.from_pretrained(checkpoint)
    for name, parameter in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(parameter, std=0.1)  # as if trained
    model.save_pretrained(tmp_path / "trained")
    tiny.tiny_tokenizer().save_pretrained(tmp_path / "trained")
    expected = logits_of(model.eval(), batch).flatten()[:64].tolist()
    moepatch.install(tmp_path / "trained")
    result = _run_tool(tmp_path / "trained", tmp_path / "tool", batch)
    assert result.returncode == 0, result.stderr
    seen = json.loads(result.stdout.strip().splitlines()[-1])
    assert seen["patched"] and seen["logits"] == expected


@pytest.mark.parametrize("family", [*ROUTED_NEW_FAMILIES, *tiny.KIND_FAMILIES])
def test_newer_families_install_and_load_patched_in_a_tool(family, tmp_path, batch):
    """Qwen3.5-MoE, MiniMax, Jamba, DeepSeek-V2, HunYuan-MoE-V1: `install`, then a process that never imports
    moepatch loads the folder patched (frozen routers, C2R buffers, statistics), with the logits of moepatch's own
    loading; `uninstall` restores the folder byte for byte."""
    layers = tiny.tiny_config(family).num_hidden_layers
    block = {**BLOCK, "c2r": {"top_t": 2, "collaborative_list": tiny.random_collaborative_list(layers, 8, 0)}}
    folder = tiny.save_tiny_checkpoint(tmp_path / "ckpt", family, moepatch=block)
    before = _snapshot(folder)
    expected = moepatch.from_pretrained(folder).eval()
    moepatch.install(folder)
    done = _run_tool(folder, tmp_path / "tool", batch)
    assert done.returncode == 0, done.stderr[-3000:]
    seen = json.loads(done.stdout.strip().splitlines()[-1])
    handle = moepatch.get_handle(expected)
    assert seen["patched"] and seen["frozen"] == sorted(handle.frozen_parameters)
    assert len(seen["c2r_buffers"]) == len(handle.c2r_routers) > 0
    assert seen["recorded_tokens"] == [int(batch["attention_mask"].sum())]
    torch.testing.assert_close(torch.tensor(seen["logits"]), logits_of(expected, batch).flatten()[:64],
                               atol=1e-5, rtol=1e-5)
    moepatch.uninstall(folder)
    assert _snapshot(folder) == before
