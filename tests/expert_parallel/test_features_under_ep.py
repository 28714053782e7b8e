"""moepatch's features on a model loaded under transformers' expert parallelism (gloo, CPU, torchrun).

``features_worker.py`` loads a tiny Qwen2-MoE (8 experts, top-2) with ``DistributedConfig(..., ep_size=N)`` and
dispatch ``"moepatch_dedup"`` or ``"all_to_all"``, applies each feature with :func:`moepatch.apply` next to the
single-process model with the same block, and writes the figures asserted here: frozen routers, routing statistics
per rank and all-reduced, C2R logits (``top_t`` 1 and E-1), C2R's balance loss on the actual choice, C2R's backward
and the balance loss's gradient (inputs, routers, experts), MoLoRA experts on attention (fresh and trained a step)
and on the routed experts (sharded like the experts; forward, backward, gradient reduction, the saved file). Two
launches: 2 ranks in both layouts (``shared``: tp = ep = 2, one batch; ``separate``: tp = 1, fsdp = ep = 2, a batch
per rank) with both dispatches, and 4 ranks (``separate``, dedup, and ``replicated``: fsdp = 4, ep = 2, two copies
of every expert, for the routed experts' LoRA only).

Then ``scripts/finetune.py --ep_size 4`` under torchrun (4 processes, 2 routed experts each) trains frozen routers +
MoLoRA experts on attention and on the routed experts' down projections to the end (the saved file gathers every
rank's routed sets), and ``--ep_size`` values that cannot work are refused before anything loads.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import torchrun_command
from safetensors.torch import load_file

import moepatch
from moepatch.errors import UsageError
from moepatch.mixing.finetune import ModelArguments
from moepatch.mixing.finetune import expert_parallel_config
from moepatch.testing import tiny

WORKER = Path(__file__).with_name("features_worker.py")
REPO = Path(__file__).resolve().parents[2]
RUNS = {"2 ranks": (2, ("shared", "separate"), ("moepatch_dedup", "all_to_all")),
        "4 ranks": (4, ("separate", "replicated"), ("moepatch_dedup",))}
"""Each run is one torchrun launch: processes, layouts, dispatches."""
ROUTERS = {f"model.layers.{i}.mlp.gate.weight" for i in (0, 2, 3)}  # tiny Qwen2-MoE: layer 1 is dense
FINETUNE_PROCESSES = 4
"""Processes (= ``--ep_size``) of the fine-tune script's run: 2 of the tiny model's 8 routed experts per rank."""


def _env() -> dict[str, str]:
    return dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join([str(REPO), *sys.path]))


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny.save_tiny_checkpoint(tmp_path_factory.mktemp("ep-features") / "qwen2_moe", "qwen2_moe")


@pytest.fixture(scope="module")
def runs(checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, list[dict]]:
    """Run name → each rank's results (layout/dispatch → feature → figures)."""
    results = {}
    for name, (processes, layouts, implementations) in RUNS.items():
        output = tmp_path_factory.mktemp(f"ep-features-{processes}")
        command = torchrun_command(str(WORKER), str(checkpoint), str(output), ",".join(layouts),
                                   ",".join(implementations), processes=processes)
        result = subprocess.run(command, env=_env(), capture_output=True, text=True, timeout=400)
        log = result.stdout + result.stderr
        assert all(f"rank {r} done" in result.stdout for r in range(processes)), log[-6000:]
        results[name] = [json.loads((output / f"rank{r}.json").read_text()) for r in range(processes)]
    return results


def cases(runs: dict[str, list[dict]], feature: str = "freeze"):
    """(where, figures of one rank, one layout and dispatch) of the cases that ran ``feature`` (the ``replicated``
    layout runs only ``routed_lora``)."""
    for run, ranks in runs.items():
        for rank, result in enumerate(ranks):
            for case, figures in result.items():
                if feature in figures:
                    yield f"{run}, rank {rank}, {case}", figures


@pytest.mark.slow
def test_freeze_gate_freezes_exactly_the_routers_and_a_step_leaves_them(runs: dict[str, list[dict]]) -> None:
    for where, figures in cases(runs):
        freeze = figures["freeze"]
        assert set(freeze["frozen"]) == set(freeze["expected"]) == ROUTERS, where
        assert freeze["routers_unchanged"] and freeze["others_moved"] > 0, (where, freeze["others_moved"])


@pytest.mark.slow
def test_routing_statistics_per_rank_and_all_reduced(runs: dict[str, list[dict]]) -> None:
    for where, figures in cases(runs):
        stats = figures["stats"]
        assert stats["local"] == stats["expected_local"], where  # this rank's tokens, as one process counts them
        assert stats["reduced"] == stats["expected_reduced"], where  # recorder.all_reduce(): the group's total
        assert sum(stats["local"][0]) > 0, where


@pytest.mark.slow
def test_c2r_and_its_balance_loss_equal_the_single_process_model(runs: dict[str, list[dict]]) -> None:
    for where, figures in cases(runs):
        assert figures["plain_logits"] <= 1e-5, where
        assert figures["c2r_top_t_1"] <= 1e-5 and figures["c2r_top_t_7"] <= 1e-5, where
        balance = figures["balance_loss"]
        assert balance["aux_loss"] == pytest.approx(balance["expected_aux_loss"], abs=1e-6), where
        assert balance["loss"] == pytest.approx(balance["expected_loss"], abs=1e-5), where


@pytest.mark.slow
def test_c2r_backward_and_the_balance_loss_gradient_equal_the_single_process_model(
        runs: dict[str, list[dict]]) -> None:
    """C2R trained, with and without its balance loss (weighted 1): the loss and its gradients (through the dispatch;
    the balance term's reach the routers, and the earlier layers' experts through the hidden states later routers
    read) equal the single-process C2R model's: input embeddings of the rank's batch, routers and experts gathered."""
    checked = 0
    for where, figures in cases(runs, "c2r_backward"):
        backward = figures["c2r_backward"]
        for target in ("loss", "balance"):
            got = backward[target]
            assert got["value"] <= 1e-5, (where, target, got)
            assert got["input_grad"] <= 1e-6, (where, target, got)
            assert got["router"] <= 1e-6 and got["experts"] <= 1e-6, (where, target, got)
            assert min(got["reference_norms"].values()) > 1e-3, (where, target, got)  # real gradients
        # the balance term's gradient is part of what was compared: it moves the routers' far beyond the tolerance
        assert backward["balance_effect"] > 1e-3, (where, backward)
        checked += 1
    assert checked == 2 * 2 * 2 + 4  # 2 ranks x 2 layouts x 2 dispatches, 4 ranks x the separate layout


@pytest.mark.slow
def test_lora_experts_on_attention_fresh_and_trained(runs: dict[str, list[dict]]) -> None:
    for where, figures in cases(runs):
        lora = figures["lora"]
        assert lora["same_names"] and lora["count"] == 112, where  # 4 layers x q, k, v, o x (3 A + 3 B + router)
        assert lora["fresh_equal"], where  # a fresh injection changes nothing, bit for bit
        assert lora["adapted_logits"] <= 1e-5 and lora["logits"] <= 1e-5 and lora["loss"] <= 1e-6, (where, lora)
        assert lora["grads"] <= 1e-6 and lora["min_grad_norm"] > 1e-3, (where, lora)


@pytest.mark.slow
def test_lora_experts_on_routed_experts_sharded_like_the_experts(runs: dict[str, list[dict]]) -> None:
    """MoLoRA on the routed experts' gate / up / down: each rank creates only its experts' sets (under the
    single-process names), the forward and backward equal the single-process model's under both dispatches and both
    experts implementations, gradients reduce over the copies of each expert only, and the saved file holds every
    expert's sets and loads into the EP model (each rank its shard) and into the single-process model."""
    checked = 0
    for run, ranks in runs.items():
        held_by_case: dict[str, list[list[int]]] = {}
        for rank, result in enumerate(ranks):
            for case, figures in result.items():
                where, lora = f"{run}, rank {rank}, {case}", figures["routed_lora"]
                held_by_case.setdefault(case, []).append(lora["held"])
                # 3 MoE layers x gate, up, down x 8 routed experts x (3 A + 3 B + router) in the whole model
                assert lora["total"] == 504 and lora["names_known"], (where, lora)
                assert lora["count"] == 504 // 8 * len(lora["held"]), (where, lora)
                assert lora["fresh"] == 0.0, (where, lora)  # fresh sets (B = 0) change nothing, bit for bit
                assert lora["adapted_logits"] <= 1e-5, (where, lora)
                for implementation in ("grouped_mm", "eager"):
                    figures = lora[implementation]
                    assert figures["logits"] <= 1e-5 and figures["loss"] <= 1e-6, (where, implementation, figures)
                    assert figures["input_grad"] <= 1e-6 and figures["grads"] <= 1e-6, (where, implementation, figures)
                assert lora["nonzero_grads"] >= lora["count"] // 2 and lora["grad_norm"] > 1e-2, (where, lora)
                assert lora["replicated_count"] == lora["count"], (where, lora)  # only the routed sets were added
                assert lora["replicated_grads"] <= 1e-6, (where, lora)  # the mean over every batch, not over ranks
                assert lora["saved_keys"] and lora["saved_values"] == 0.0, (where, lora)
                assert lora["loaded_ep"] == 0.0 and lora["loaded_ep_logits"] <= 1e-5, (where, lora)
                assert lora["loaded_single_logits"] == 0.0, (where, lora)
                if case.endswith("moepatch_dedup"):  # saved by save_pretrained: the whole checkpoint reloads
                    assert lora["reloaded_logits"] <= 1e-5, (where, lora)
                checked += 1
        for case, held in held_by_case.items():
            copies = 2 if case.startswith("replicated") else 1
            assert sorted(e for experts in held for e in experts) == sorted(list(range(8)) * copies), (run, case, held)
    assert checked == 2 * 4 + 4 * 2  # 2 ranks x (2 layouts x 2 dispatches), 4 ranks x 2 layouts


@pytest.mark.slow
def test_finetune_keeps_added_adapters_data_parallel(runs: dict[str, list[dict]]) -> None:
    """Each rank its own batch: adapters start as rank 0's and their gradients are the ranks' average."""
    checked = 0
    for where, figures in cases(runs):
        if "data_parallel_lora" in figures:
            figures = figures["data_parallel_lora"]
            assert figures["count"] == 112 and figures["min_grad_norm"] > 1e-3, (where, figures)
            assert figures["grads"] <= 1e-6, (where, figures)
            checked += 1
    assert checked == 2 * 2 + 4  # the separate layout: 2 ranks x 2 dispatches, 4 ranks x 1


@pytest.mark.slow
def test_finetune_script_under_torchrun_with_expert_parallelism(checkpoint: Path, tmp_path: Path) -> None:
    block = tmp_path / "block.json"
    block.write_text(json.dumps({"freeze_gate": "router", "lora_experts": {
        "method": "molora", "num_experts": 3, "r": 4,
        "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj", "mlp.experts.down_proj"]}}))
    output = tmp_path / "run"
    command = torchrun_command(
        str(REPO / "scripts" / "finetune.py"), "--model_name_or_path", str(checkpoint), "--output_dir", str(output),
        "--use_cpu", "--report_to", "none", "--per_device_train_batch_size", "2", "--learning_rate", "5e-3",
        "--max_length", "64", "--seed", "0", "--save_strategy", "no", "--synthetic_data", "--max_steps", "2",
        "--logging_steps", "1", "--moepatch_config", str(block), "--ep_size", str(FINETUNE_PROCESSES),
        "--ep_implementation", "moepatch_dedup", processes=FINETUNE_PROCESSES)
    result = subprocess.run(command, env=_env(), capture_output=True, text=True, timeout=400)
    log = result.stdout + result.stderr
    assert "moepatch finetune: done, 2 steps" in result.stdout, log[-6000:]
    summary = json.loads((output / "moepatch_finetune_summary.json").read_text())
    assert summary["global_step"] == 2 and summary["world_size"] == FINETUNE_PROCESSES
    base, trained = load_file(str(checkpoint / "model.safetensors")), load_file(str(output / "model.safetensors"))
    assert base.keys() == trained.keys()  # the LoRA experts are kept out of the model's own file
    assert all(torch.equal(base[key], trained[key]) for key in base)  # every expert gathered back, base frozen
    experts = load_file(str(output / "lora_experts.safetensors"))
    assert any(value.abs().sum() > 0 for key, value in experts.items() if "lora_B" in key)  # the adapters trained
    routed = {key: value for key, value in experts.items() if ".experts.lora_experts.down_proj.sets." in key}
    # every routed expert's set, each rank's 8 / FINETUNE_PROCESSES gathered into the one file
    assert {key.split(".sets.")[1].split(".")[0] for key in routed} == {str(e) for e in range(8)}
    # trained on every rank and gathered from every rank: each expert's sets moved in some layer
    trained_experts = {key.split(".sets.")[1].split(".")[0] for key, value in routed.items()
                       if "lora_B" in key and value.abs().sum() > 0}
    assert trained_experts == {str(e) for e in range(8)}, trained_experts
    assert moepatch.get_handle(moepatch.from_pretrained(output)).lora_targets


@pytest.mark.parametrize(("size", "world", "family", "message"), [
    (2, "1", "qwen2_moe", "2 but this launch has 1 process"),
    (3, "3", "qwen2_moe", "3 does not divide the model's 8 routed experts"),
    # what the model allows is said before the launch is blamed ("launch with torchrun --nproc_per_node 3")
    (3, "1", "qwen2_moe", "3 does not divide the model's 8 routed experts"),
    (2, "1", "llama_moe", "2: the 'llama_moe' model (LlamaMoEForCausalLM) has no expert-parallel plan"),
    (2, "2", "llama_moe", "2: the 'llama_moe' model (LlamaMoEForCausalLM) has no expert-parallel plan"),
], ids=["world 1", "3 of 8", "3 of 8 in world 1", "no plan in world 1", "no plan"])
def test_an_unfit_ep_size_is_refused_by_name(size: int, world: str, family: str, message: str,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WORLD_SIZE", world)
    arguments = ModelArguments(model_name_or_path="unused", ep_size=size)
    with pytest.raises(UsageError, match="--ep_size") as error:
        expert_parallel_config(arguments, tiny.tiny_config(family))
    assert message in str(error.value)
    if "launch" not in message:
        assert "torchrun" not in str(error.value)


def test_ep_arguments_are_checked_when_parsed() -> None:
    with pytest.raises(UsageError, match="--ep_size"):
        ModelArguments(model_name_or_path="unused", ep_size=0)
    with pytest.raises(UsageError, match=r"--ep_size: expected an integer >= 2 .*1 is no expert parallelism: leave "
                                         r"--ep_size out\), got 1"):
        ModelArguments(model_name_or_path="unused", ep_size=1)
    with pytest.raises(UsageError, match="--ep_implementation"):
        ModelArguments(model_name_or_path="unused", ep_size=2, ep_implementation="all_reduce")
    with pytest.raises(UsageError, match="--ep_implementation"):
        ModelArguments(model_name_or_path="unused", ep_implementation="moepatch_dedup")  # no --ep_size
    config = expert_parallel_config(ModelArguments(model_name_or_path="unused"), tiny.tiny_config("qwen2_moe"))
    assert config is None


def test_ep_size_with_deepspeed_is_refused_when_parsed(tmp_path: Path) -> None:
    """transformers' expert parallelism (its device mesh, FSDP2) cannot run inside DeepSpeed's ZeRO: it failed
    only in the load, blaming the checkpoint's weights. Refused before the checkpoint is even read (its folder is
    missing here), naming both flags. A process of its own: parsing ``--deepspeed`` ZeRO-3 sets transformers'
    global DeepSpeed config, which would change how later tests build models."""
    pytest.importorskip("deepspeed", reason="TrainingArguments reads --deepspeed with it")
    output = tmp_path / "out"
    result = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "finetune.py"), "--model_name_or_path", str(tmp_path / "missing"),
         "--output_dir", str(output), "--use_cpu", "--report_to", "none", "--synthetic_data", "--max_steps", "1",
         "--ep_size", "2", "--deepspeed", str(REPO / "configs" / "deepspeed" / "zero3_cpu.json")],
        env=_env(), capture_output=True, text=True, timeout=300)
    assert result.returncode == 2, result.stderr[-3000:]
    assert "--ep_size: not with --deepspeed" in result.stderr and "Traceback" not in result.stderr
    assert not output.exists()


def test_replicating_added_parameters_is_a_no_op_without_a_process_group() -> None:
    """A single process (torch.distributed not initialised): nothing to replicate over, no hook registered, and a
    step's gradients are those of the plain model (it called dist.get_world_size() and raised)."""
    import torch.distributed as dist

    from moepatch.expert_parallel import replicate_added_parameters

    assert not dist.is_initialized()
    batch = tiny.demo_batch()
    models = []
    for replicate in (True, False):
        model = tiny.tiny_model("qwen2_moe", seed=0, moepatch=ROUTED_BLOCK)
        torch.manual_seed(1)
        moepatch.apply(model)
        if replicate:
            assert replicate_added_parameters(model) == 0
        models.append(model)
    for model in models:
        model(**batch, labels=batch["input_ids"]).loss.backward()
    assert all(p._post_accumulate_grad_hooks is None for p in models[0].parameters())
    for (name, first), (_, second) in zip(models[0].named_parameters(), models[1].named_parameters(), strict=True):
        assert (first.grad is None) == (second.grad is None), name
        if first.grad is not None:
            assert torch.equal(first.grad, second.grad), name


ROUTED_BLOCK = {"lora_experts": {"method": "molora", "num_experts": 3, "r": 4, "target_modules": [
    "mlp.experts.gate_proj", "mlp.experts.up_proj", "mlp.experts.down_proj"]}}


def _split_by_expert_parallelism(model: torch.nn.Module, monkeypatch: pytest.MonkeyPatch,
                                 held: range = range(4, 8)) -> None:
    """Mark every experts module as transformers' EP does and make this process hold ``held`` (planning and
    installing only: the modules keep every expert, so nothing runs forward)."""
    from model_patches.expert_storage.fused import FusedExperts

    for layer in moepatch.describe(model).layers:
        layer.experts._is_expert_parallel = True
    monkeypatch.setattr(FusedExperts, "held_experts", lambda self, experts: held)


def test_routed_lora_under_ep_creates_this_process_sets_and_loads_its_shard(monkeypatch: pytest.MonkeyPatch
                                                                            ) -> None:
    from moepatch.lora_experts import lora_state_dict
    from moepatch.lora_experts.inject import load_lora_weights
    from moepatch.tools.lora_experts import merge_into_base

    whole = tiny.tiny_model("qwen2_moe")
    moepatch.apply(whole, ROUTED_BLOCK)
    generator = torch.Generator().manual_seed(3)
    saved = {key: torch.randn(value.shape, generator=generator) for key, value in lora_state_dict(whole).items()}

    model = tiny.tiny_model("qwen2_moe")
    _split_by_expert_parallelism(model, monkeypatch)
    moepatch.apply(model, ROUTED_BLOCK)
    own = lora_state_dict(model)
    assert set(own) < set(saved) and len(own) == len(saved) // 2  # the single-process names of experts 4..7 only
    assert {int(key.split(".sets.")[1].split(".")[0]) for key in own} == {4, 5, 6, 7}
    sets = model.model.layers[0].mlp.experts.lora_experts["down_proj"]
    assert len(sets.sets) == 4 and sets.held == range(4, 8) and sets.total == 8
    assert sets.sets[0] is sets.sets.get_submodule("4")  # local id 0 is routed expert 4

    load_lora_weights(model, saved)  # the whole model's file: this process takes its shard
    assert all(torch.equal(value, saved[key]) for key, value in lora_state_dict(model).items())
    with pytest.raises(ValueError, match="missing"):
        load_lora_weights(model, {key: value for key, value in saved.items() if ".sets.5." not in key})
    with pytest.raises(ValueError, match="unexpected"):
        load_lora_weights(model, {**saved, "model.layers.0.mlp.experts.lora_experts.down_proj.sets.8.x": saved[
            next(iter(own))]})
    with pytest.raises(ValueError, match="merge or export them on a single-process model"):
        merge_into_base(model)


@pytest.mark.parametrize(("family", "block", "message"), [
    ("qwen2_moe", {"lora_experts": {**ROUTED_BLOCK["lora_experts"], "method": "mola", "top_k": 2,
                                    "balance_loss": True}}, "balance loss and z-loss are not supported"),
    ("qwen2_moe", {"lora_experts": {**ROUTED_BLOCK["lora_experts"], "z_loss_coef": 1e-3}},
     "balance loss and z-loss are not supported"),
    ("llama_moe", {"lora_experts": {"method": "molora", "routed_experts": True, "target_modules": ["down_proj"]}},
     "'parameter_list' expert storage does not read"),
])
def test_routed_lora_under_ep_refuses_what_cannot_run_by_name(family: str, block: dict, message: str,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    model = tiny.tiny_model(family)
    _split_by_expert_parallelism(model, monkeypatch)
    with pytest.raises(ValueError, match=message):
        moepatch.apply(model, block)


@pytest.mark.parametrize("ranks", [[4, 4], [2, 6]])  # stacked sets, and sets of different shapes (GuiLoMo)
def test_routed_sets_keep_other_processes_routes_out_of_their_rows(ranks: list[int]) -> None:
    """Rows routed to other processes' experts (sorted last, outside the row counts: the experts' computation zeroes
    them before and after) keep their place in the result; every other row gets its own expert's delta."""
    from moepatch.lora_experts.layers import LoraExperts
    from moepatch.lora_experts.routed import RoutedExpertSets

    torch.manual_seed(0)
    sets = [LoraExperts(8, 6, [4, 4] if e == 0 else ranks, top_k=None) for e in range(2)]
    for expert_set in sets:
        for b in expert_set.lora_B:
            torch.nn.init.normal_(b)
    routed = RoutedExpertSets(sets, "output", held=range(2, 4), total=4)
    assert routed.stackable == (ranks == [4, 4])
    rows, expert_ids = torch.randn(7, 8), torch.tensor([0, 0, 0, 1, 1, 1, 1])  # the last two: sentinels, clamped
    rows[5:] = 0.0
    delta = routed(rows, expert_ids, torch.tensor([3, 5], dtype=torch.int32))
    assert delta.shape == (7, 6)
    assert torch.allclose(delta[:3], sets[0](rows[:3]), atol=1e-5)
    assert torch.allclose(delta[3:5], sets[1](rows[3:5]), atol=1e-5)
    if not routed.stackable:
        assert not delta[5:].any()
