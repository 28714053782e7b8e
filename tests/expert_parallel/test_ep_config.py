"""The expert-parallel choices a load takes from config.json, and the layouts it refuses before anything is loaded.

- The moepatch block's ``ep_implementation`` (a name transformers' ``EPImplementationInterface`` knows) is declared,
  checked and documented like every field, patches nothing without expert parallelism (outputs bit-identical), and is
  the dispatch wherever the caller left ``DistributedConfig.ep_implementation`` at ``"auto"`` (``scripts/finetune.py``:
  ``--ep_implementation`` not given); a name the caller gives wins. That it reaches transformers' engine under
  torchrun is checked by the placement worker (``test_placement_under_ep.py``).
- ``moepatch.from_pretrained`` and the loader ``moepatch install`` writes refuse an ``ep_size`` that does not divide the
  routed experts, an ``ep_implementation`` transformers does not know, and a copy renumbered for another EP size, each
  by its name. Their checkpoints here hold truncated weights: a refusal that came after any weight was read would be
  a weights error instead.
- ``moepatch.apply`` refuses a model sharded at another EP size than its renumbered checkpoint's (the real,
  torchrun-loaded case is in the placement worker); ``scripts/finetune.py`` refuses such a copy before the tokenizer or
  any data is read.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
import torch
from transformers import AutoConfig
from transformers import AutoModelForCausalLM
from transformers import DistributedConfig

import moepatch
from moepatch.cli import main as cli
from moepatch.config import MoePatchConfig
from moepatch.config import write_config
from moepatch.errors import BlockMisfitError
from moepatch.errors import FieldError
from moepatch.errors import UsageError
from moepatch.expert_parallel import PLACEMENT_FILE
from moepatch.expert_parallel import resolve_ep_implementation
from moepatch.expert_parallel.placement import write_placement_record
from moepatch.testing import tiny
from moepatch.training.arguments import ModelArguments
from moepatch.training.distributed import expert_parallel_config
from moepatch.training.runner import main as finetune

MOE_LAYERS = (0, 2, 3)
"""The tiny Qwen2-MoE's MoE layers (layer 1 is a dense MLP); 8 routed experts each."""


def _placed(folder: Path, ep_size: int) -> Path:
    """Record in ``folder`` that its experts were renumbered for ``ep_size`` ranks (the identity renumbering: what
    is checked is the record, which ``moepatch place --write-permuted`` writes the same way)."""
    write_placement_record(folder, ep_size, {layer: list(range(8)) for layer in MOE_LAYERS})
    return folder


# ------------------------------------------------------------------------------------------------ the field
def test_the_block_field_is_checked_by_name_and_round_trips(tmp_path: Path) -> None:
    for name in ("auto", "all_to_all", "all_reduce", "moepatch_dedup"):  # transformers' own and moepatch's
        config = MoePatchConfig.from_dict({"ep_implementation": name})
        assert config.ep_implementation == name and config.copy().ep_implementation == name and config.is_empty
        assert MoePatchConfig.from_dict(config.to_dict()).ep_implementation == name
    assert "ep_implementation" not in MoePatchConfig.from_dict({}).to_dict()
    for bad in ("moepatch_dedupe", 3, ["all_to_all"]):
        with pytest.raises(ValueError, match=r"moepatch\.ep_implementation: expected a name "
                                             r"EPImplementationInterface knows \(.*'moepatch_dedup'.*\), got"):
            MoePatchConfig.from_dict({"ep_implementation": bad})

    model = tiny.tiny_model("qwen2_moe", moepatch={"ep_implementation": "moepatch_dedup"})
    model.save_pretrained(tmp_path)  # transformers 5's strict config keeps the block through save / load
    assert MoePatchConfig.from_model(AutoConfig.from_pretrained(tmp_path)).ep_implementation == "moepatch_dedup"


def test_inspect_help_config_and_the_schema_show_the_field(capsys: pytest.CaptureFixture[str]) -> None:
    assert "ep_implementation" in [entry.name for entry in moepatch.config_schema()]
    assert cli(["inspect", "--help-config"]) == 0
    text = capsys.readouterr().out
    assert "ep_implementation: EP implementation name | null" in text
    assert "any other name given there wins" in text


def test_the_field_alone_patches_nothing(tmp_path: Path) -> None:
    """Not a feature: ``apply`` installs nothing, binds no forward, and the logits are bit-identical to the
    unpatched model's (and through ``moepatch.from_pretrained`` without expert parallelism, to transformers')."""
    batch = tiny.demo_batch()
    reference = tiny.tiny_model("qwen2_moe", seed=0)
    model = tiny.tiny_model("qwen2_moe", seed=0, moepatch={"ep_implementation": "moepatch_dedup"})
    handle = moepatch.apply(model)
    assert handle.is_empty and handle.installed == {}
    assert not any("forward" in module.__dict__ for module in model.modules())
    with torch.no_grad():
        assert torch.equal(model(**batch).logits, reference(**batch).logits)

    model.save_pretrained(tmp_path)
    loaded = moepatch.from_pretrained(tmp_path, dtype=torch.float32).eval()
    plain = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    assert moepatch.get_handle(loaded).is_empty
    with torch.no_grad():
        assert torch.equal(loaded(**batch).logits, plain(**batch).logits)


# ------------------------------------------------------------------------------- the choice where "auto" was left
def test_the_block_chooses_the_dispatch_only_where_the_caller_left_auto() -> None:
    given = DistributedConfig(tp_size=2, ep_size=2, tp_plan={})
    chosen = resolve_ep_implementation(given, "moepatch_dedup")
    assert chosen.ep_implementation == "moepatch_dedup" and (chosen.tp_size, chosen.ep_size) == (2, 2)
    assert given.ep_implementation == "auto"  # the caller's object is left as it was
    explicit = DistributedConfig(tp_size=2, ep_size=2, tp_plan={}, ep_implementation="all_to_all")
    assert resolve_ep_implementation(explicit, "moepatch_dedup") is explicit
    assert resolve_ep_implementation(given, None) is given
    single = DistributedConfig(tp_size=2)  # no expert parallelism: nothing to choose
    assert resolve_ep_implementation(single, "moepatch_dedup") is single
    as_dict = {"tp_size": 2, "ep_size": 2, "tp_plan": {}}
    assert resolve_ep_implementation(as_dict, "moepatch_dedup") == {**as_dict, "ep_implementation": "moepatch_dedup"}
    assert "ep_implementation" not in as_dict


def test_finetune_takes_the_dispatch_from_the_block_unless_given(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WORLD_SIZE", "2")
    config = tiny.tiny_config("qwen2_moe")
    assert expert_parallel_config(ModelArguments(model_name_or_path="unused", ep_size=2),
                                  config).ep_implementation == "auto"
    write_config(config, {"ep_implementation": "moepatch_dedup"})
    layout = expert_parallel_config(ModelArguments(model_name_or_path="unused", ep_size=2), config)
    assert (layout.ep_implementation, layout.tp_size, layout.fsdp_size, layout.ep_size) == ("moepatch_dedup", 1, 2, 2)
    given = ModelArguments(model_name_or_path="unused", ep_size=2, ep_implementation="all_to_all")
    assert expert_parallel_config(given, config).ep_implementation == "all_to_all"
    write_config(config, {"ep_implementation": "all_reduce"})  # inference only: the Trainer cannot use it
    with pytest.raises(UsageError, match=r"--ep_implementation: not given, and the moepatch block's "
                                         r"ep_implementation 'all_reduce' cannot train"):
        expert_parallel_config(ModelArguments(model_name_or_path="unused", ep_size=2), config)


# ------------------------------------------------------------------------------- refusals before loading
@pytest.fixture(scope="module")
def unreadable(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny Qwen2-MoE prepared by ``moepatch install`` whose weights file was then truncated: any refusal that
    reads a weight first says so instead."""
    folder = tiny.save_tiny_checkpoint(tmp_path_factory.mktemp("unreadable") / "ckpt", "qwen2_moe")
    moepatch.install(folder)
    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    return folder


def _through_moepatch(folder: Path, distributed_config: object) -> None:
    moepatch.from_pretrained(folder, distributed_config=distributed_config)


def _through_the_installed_loader(folder: Path, distributed_config: object) -> None:
    AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True, distributed_config=distributed_config)


LOADERS = pytest.mark.parametrize("load", [_through_moepatch, _through_the_installed_loader],
                                  ids=["moepatch.from_pretrained", "installed loader"])


@LOADERS
@pytest.mark.parametrize("distributed_config", [DistributedConfig(tp_size=3, ep_size=3, tp_plan={}),
                                                {"tp_size": 3, "ep_size": 3, "tp_plan": {}}],
                         ids=["DistributedConfig", "dict"])
def test_an_ep_size_that_does_not_divide_the_experts_is_refused(unreadable: Path, load, distributed_config) -> None:
    with pytest.raises(FieldError, match=r"ep_size: 3 does not divide the model's 8 routed experts") as error:
        load(unreadable, distributed_config)
    assert error.value.field == "ep_size" and str(unreadable / "config.json") in str(error.value)


@LOADERS
def test_an_ep_implementation_transformers_does_not_know_is_refused(unreadable: Path, load) -> None:
    config = DistributedConfig(tp_size=2, ep_size=2, tp_plan={}, ep_implementation="moepatch_dedupe")
    with pytest.raises(FieldError, match=r"ep_implementation: expected a name EPImplementationInterface knows "
                                         r"\(.*'moepatch_dedup'.*\), got 'moepatch_dedupe'") as error:
        load(unreadable, config)
    assert error.value.field == "ep_implementation"


@LOADERS
def test_a_copy_renumbered_for_another_ep_size_is_refused(unreadable: Path, tmp_path: Path, load) -> None:
    placed = _placed(Path(shutil.copytree(unreadable, tmp_path / "placed")), 4)
    with pytest.raises(ValueError, match=rf"{PLACEMENT_FILE}: the experts of this checkpoint were renumbered so that "
                                         r"each of 4 expert-parallel ranks holds one planned group of 2 experts; "
                                         r"with ep_size=2"):
        load(placed, DistributedConfig(tp_size=2, ep_size=2, tp_plan={}))


@LOADERS
@pytest.mark.parametrize(("distributed_config", "field", "message"), [
    ({"tp_size": 2, "ep_size": "abc", "tp_plan": {}}, "distributed_config.ep_size", "got 'abc'"),
    ({"tp_size": 2, "ep_size": 2.5, "tp_plan": {}}, "distributed_config.ep_size", "got 2.5"),
    ({"tp_size": 2, "ep_size": True, "tp_plan": {}}, "distributed_config.ep_size", "got True"),
    ({"tp_size": "2", "ep_size": 2, "tp_plan": {}}, "distributed_config.tp_size", "got '2'"),
    ({"fsdp_size": 0, "ep_size": 2}, "distributed_config.fsdp_size", "got 0"),
    ("ep2", "distributed_config", "expected a transformers DistributedConfig or a dict of its fields, got str 'ep2'"),
], ids=["ep_size str", "ep_size float", "ep_size bool", "tp_size str", "fsdp_size 0", "a string"])
def test_a_distributed_config_of_the_wrong_type_is_refused_by_field(unreadable: Path, load, distributed_config,
                                                                    field: str, message: str) -> None:
    """Nothing is converted (``int("abc")`` failed, ``2.5`` was read as 2, ``True`` as 1): the field is named."""
    with pytest.raises(FieldError, match=re.escape(message)) as error:
        load(unreadable, distributed_config)
    assert error.value.field == field and str(error.value).startswith(f"{field}: ")


@LOADERS
def test_all_reduce_is_refused_where_the_expert_group_does_not_share_a_batch(unreadable: Path, tmp_path: Path,
                                                                             load) -> None:
    """transformers' ``AllReduceEP`` (``needs_shared_batch``) runs only when the EP group is the TP group
    (``ep_size == tp_size``); it refused ``tp_size=1, fsdp_size=2, ep_size=2`` only while installing the experts'
    forward. Refused before loading, chosen by the caller or by the block (the caller left ``"auto"``)."""
    from transformers.distributed.expert_parallel import AllReduceEP

    from moepatch.expert_parallel.layout import ep_layout_problem

    assert AllReduceEP.needs_shared_batch  # the condition mirrored
    layout = {"tp_size": 1, "fsdp_size": 2, "ep_size": 2}
    expected = (r"ep_implementation: 'all_reduce' needs every rank of the expert group to hold the same batch "
                r"\(ep_size == tp_size\), got ep_size=2, tp_size=1")
    with pytest.raises(FieldError, match=expected) as error:
        load(unreadable, DistributedConfig(**layout, ep_implementation="all_reduce"))
    assert error.value.field == "ep_implementation"
    folder = Path(shutil.copytree(unreadable, tmp_path / "all_reduce_block"))
    config = json.loads((folder / "config.json").read_text())
    config["moepatch"] = {"ep_implementation": "all_reduce"}
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(FieldError, match=rf"'all_reduce' needs .* \(chosen by the moepatch block of "
                                         rf"{re.escape(str(folder / 'config.json'))}\)"):
        load(folder, dict(layout))
    shared = DistributedConfig(tp_size=2, ep_size=2, tp_plan={}, ep_implementation="all_reduce")
    assert ep_layout_problem(shared, "all_reduce") is None  # the layout it is made for
    assert ep_layout_problem(DistributedConfig(**layout), "all_to_all") is None


@pytest.mark.parametrize("family", ["llama_moe", "moduleformer", "qwen2_moe"])
def test_a_model_without_an_expert_parallel_plan_is_refused_before_loading(tmp_path: Path, family: str) -> None:
    """Refused where transformers' own plan resolution (``_resolve_parallel_plans``, run during the load) finds no
    ``ep_plan``, and only there: moepatch's LLaMA-MoE and ModuleFormer classes have none, Qwen2-MoE has one."""
    from moepatch.expert_parallel.layout import ep_plan_problem

    layout = DistributedConfig(tp_size=1, fsdp_size=2, ep_size=2)
    model = tiny.tiny_model(family)
    try:
        model._resolve_parallel_plans(layout)
        transformers_refuses = False
    except ValueError as error:
        transformers_refuses = "has no `ep_plan`" in str(error)
    assert (ep_plan_problem(model.config, layout) is not None) == transformers_refuses
    assert transformers_refuses == (family != "qwen2_moe")
    if family != "llama_moe":
        return
    folder = tiny.save_tiny_checkpoint(tmp_path / "llama_moe", family)
    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])  # a refusal after any weight was read would say so
    with pytest.raises(FieldError, match=r"ep_size: 2: the 'llama_moe' model \(LlamaMoEForCausalLM\) has no "
                                         r"expert-parallel plan") as error:
        moepatch.from_pretrained(folder, distributed_config=DistributedConfig(tp_size=2, ep_size=2, tp_plan={}))
    assert error.value.field == "ep_size"


def test_a_block_that_does_not_parse_is_refused_before_an_ep_load(unreadable: Path, tmp_path: Path) -> None:
    """Under expert parallelism the block is read before loading (for its ``ep_implementation``): a bad block is
    ``apply``'s error, raised before the weights are read."""
    folder = Path(shutil.copytree(unreadable, tmp_path / "bad_block"))
    config = json.loads((folder / "config.json").read_text())
    config["moepatch"] = {"ep_implementation": "nccl"}
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(BlockMisfitError, match=r"moepatch\.ep_implementation: .* got 'nccl'"):
        moepatch.from_pretrained(folder, distributed_config=DistributedConfig(tp_size=2, ep_size=2, tp_plan={}))


# ------------------------------------------------------------------------------- apply and finetune
def test_apply_refuses_a_model_sharded_for_another_ep_size_than_its_copy(tmp_path: Path) -> None:
    """transformers keeps the ``DistributedConfig`` it sharded a model with as ``config.distributed_config``; set
    here as it would be (the load itself needs torchrun: the placement worker runs it for real)."""
    folder = _placed(tiny.save_tiny_checkpoint(tmp_path / "placed", "qwen2_moe"), 4)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    assert moepatch.apply(model).is_empty  # not sharded: nothing to check
    moepatch.get_handle(model).remove()
    model.config.distributed_config = DistributedConfig(tp_size=2, ep_size=2, tp_plan={})
    with pytest.raises(ValueError, match=rf"{PLACEMENT_FILE}: .* each of 4 expert-parallel ranks .* with ep_size=2"):
        moepatch.apply(model, {"freeze_gate": "router"})
    assert moepatch.get_handle(model) is None and all(p.requires_grad for p in model.parameters())
    model.config.distributed_config = DistributedConfig(tp_size=4, ep_size=4, tp_plan={})
    assert moepatch.apply(model, {"freeze_gate": "router"}).frozen_parameters  # the recorded size: accepted


def test_finetune_refuses_a_copy_for_another_ep_size_before_the_tokenizer_and_data(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    """Refused by ``--ep_size`` and the record's file in a single process: the record is checked before the launch's
    world size, and before the tokenizer (removed here) or any data is read or written."""
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    folder = _placed(tiny.save_tiny_checkpoint(tmp_path / "placed", "qwen2_moe"), 4)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (folder / name).unlink()
    output = tmp_path / "out"
    status = finetune(["--model_name_or_path", str(folder), "--output_dir", str(output), "--use_cpu",
                       "--report_to", "none", "--synthetic_data", "--max_steps", "1", "--ep_size", "2"])
    error = capsys.readouterr().err
    assert status == 2, error
    assert "--ep_size: " in error and str(folder / PLACEMENT_FILE) in error and "each of 4 expert-parallel" in error
    assert not output.exists()


def test_finetune_refuses_a_malformed_or_foreign_placement_record_as_a_file(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    """A record that is not JSON, or was written for another checkpoint (16 experts in an 8-expert copy), is a
    file whose content is wrong: exit 1 naming the file (and the field), before the launch's size is checked."""
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    folder = tiny.save_tiny_checkpoint(tmp_path / "ckpt", "qwen2_moe")
    output = tmp_path / "out"
    argv = ["--model_name_or_path", str(folder), "--output_dir", str(output), "--use_cpu", "--report_to", "none",
            "--synthetic_data", "--max_steps", "1", "--ep_size", "2"]
    for content, named in (("{not json", "not a readable JSON file"),
                           (json.dumps({"ep_size": 2, "num_experts": 16, "experts_per_rank": 8, "layers": [0, 2, 3]}),
                            "field 'num_experts' is 16, but the checkpoint has 8 routed experts")):
        (folder / PLACEMENT_FILE).write_text(content)
        status = finetune(argv)
        error = capsys.readouterr().err
        assert status == 1, error
        assert f"{folder / PLACEMENT_FILE}: {named}" in error and "Traceback" not in error
        assert not output.exists()


def test_finetune_refuses_a_model_without_an_expert_parallel_plan_before_the_launch_size(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    folder = tiny.save_tiny_checkpoint(tmp_path / "llama_moe", "llama_moe")
    output = tmp_path / "out"
    status = finetune(["--model_name_or_path", str(folder), "--output_dir", str(output), "--use_cpu", "--report_to",
                       "none", "--synthetic_data", "--max_steps", "1", "--ep_size", "2"])
    error = capsys.readouterr().err
    assert status == 2, error
    assert "--ep_size: 2: the 'llama_moe' model (LlamaMoEForCausalLM) has no expert-parallel plan" in error
    assert "leave --ep_size out" in error and "torchrun" not in error and not output.exists()
