"""The aux-loss-free bias update (``bias_update``; DeepSeek-V3 technical report, 2024, §2.1.2) on tiny real models.

Every expectation is computed here, independently of :mod:`moepatch.routing.bias_update`: the loads come from this
file's own forward pre-hook on each MoE layer's experts module (its ``top_k_index`` argument, padding excluded with
the batch's attention mask), the biases are read at their transformers attribute paths, and the new bias is
``old + rate · sign(mean(load) − load)`` computed in the test.

Run as a script (``torchrun --nproc_per_node 2 tests/routing/test_bias_update.py OUT``) it is the worker of the
two-rank test.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
from helpers import torchrun_command
from torch import nn

import moepatch
from moepatch.testing import tiny
from moepatch.testing.tiny_kinds import TINY_KIND_NUM_EXPERTS
from moepatch.testing.tiny_kinds import tiny_kind_model

RATE = 0.01
BIAS_PATHS = {  # where transformers 5 keeps each family's selection bias (read by the test, not by moepatch)
    "deepseek_v3": "mlp.gate.e_score_correction_bias",
    "minimax_m2": "mlp.e_score_correction_bias",  # a buffer on the sparse block
    "ernie4_5_moe": "mlp.gate.moe_statics.e_score_correction_bias",  # a Parameter(requires_grad=False)
}
TEXTS = list(tiny.DEMO_TEXTS) + list(tiny.CORPUS[:4])


# ---------------------------------------------------------------------------------------------- independent helpers
def moe_layers(model: nn.Module) -> list[int]:
    return [i for i, layer in enumerate(model.model.layers) if hasattr(layer.mlp, "experts")]


def read_bias(model: nn.Module, model_type: str, layer: int) -> torch.Tensor:
    value: object = model.model.layers[layer]
    for part in BIAS_PATHS[model_type].split("."):
        value = getattr(value, part)
    return value


def biases(model: nn.Module, model_type: str) -> dict[int, torch.Tensor]:
    return {i: read_bias(model, model_type, i).detach().clone() for i in moe_layers(model)}


def expected_bias(old: torch.Tensor, loads: torch.Tensor, rate: float = RATE) -> torch.Tensor:
    """DeepSeek-V3 §2.1.2: b_i + γ·sign(mean_load − load_i), γ applied in the bias's dtype."""
    mean = loads.double().mean()
    sign = torch.sign(mean - loads.double()).to(old.dtype)
    return old + (sign * rate).reshape(old.shape)


class ExpertLoads:
    """Per MoE layer, how many tokens each expert received, read from the experts module's ``top_k_index``.

    Padding is excluded with the attention mask of the current model call (a pre-hook on the model itself).
    Counting is on only inside :meth:`counting`, so backward re-runs of checkpointed forwards are never seen.
    """

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.num_experts = TINY_KIND_NUM_EXPERTS
        self.loads: dict[int, torch.Tensor] = {}
        self._mask: torch.Tensor | None = None
        self.active = False
        self._handles = [model.register_forward_pre_hook(self._take_mask, with_kwargs=True)]
        for index in moe_layers(model):
            experts = model.model.layers[index].mlp.experts
            self._handles.append(experts.register_forward_pre_hook(self._count(index), with_kwargs=True))

    def _take_mask(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        self._mask = kwargs.get("attention_mask")

    def _count(self, index: int):
        def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
            if not self.active:
                return
            chosen = kwargs["top_k_index"] if "top_k_index" in kwargs else args[1]
            num_experts = self.num_experts
            if self._mask is not None:
                chosen = chosen[self._mask.reshape(-1).bool()]
            counts = torch.bincount(chosen.reshape(-1), minlength=num_experts)[:num_experts]
            self.loads[index] = self.loads.get(index, torch.zeros(num_experts, dtype=torch.int64)) + counts

        return hook

    @contextmanager
    def counting(self) -> Iterator[ExpertLoads]:
        self.active = True
        try:
            yield self
        finally:
            self.active = False

    def take(self) -> dict[int, torch.Tensor]:
        loads, self.loads = self.loads, {}
        return loads

    def close(self) -> None:
        for handle in self._handles:
            handle.remove()


def padded_batch(texts: list[str] | tuple[str, ...] = tiny.DEMO_TEXTS) -> dict[str, torch.Tensor]:
    batch = tiny.demo_batch(texts=tuple(texts))
    assert (batch["attention_mask"] == 0).any()  # real padding
    return batch


# ---------------------------------------------------------------------------------------------- (a) the formula
@pytest.mark.parametrize("model_type", ["deepseek_v3", "minimax_m2", "ernie4_5_moe"])
def test_one_step_moves_each_bias_by_rate_times_sign(model_type):
    model = tiny_kind_model(model_type).train()
    before = biases(model, model_type)
    tensors = {i: read_bias(model, model_type, i) for i in before}
    handle = moepatch.apply(model, {"bias_update": {"rate": RATE}})
    counter = ExpertLoads(model)
    with counter.counting(), torch.no_grad():
        model(**padded_batch())
        model(**padded_batch(TEXTS[4:]))  # a second micro-batch of the same step
    loads = counter.take()
    model.eval()
    with counter.counting(), torch.no_grad():
        model(**padded_batch())  # evaluation is no training step: not counted by the update
    model.train()

    update = handle.bias_updater.step()

    assert update.layers == sorted(loads) == moe_layers(model)
    for row, layer in enumerate(update.layers):
        assert torch.equal(update.loads[row], loads[layer])
        new = read_bias(model, model_type, layer)
        assert new is tensors[layer]  # in place: same tensor object, dtype, device and type (buffer / Parameter)
        assert new.dtype == before[layer].dtype and not new.requires_grad
        assert torch.equal(new.detach(), expected_bias(before[layer], loads[layer])), layer
        moved = (new.detach() - before[layer]).reshape(-1)
        assert (moved > 0).any() and (moved < 0).any()  # both directions: the test is not trivial
    if model_type == "ernie4_5_moe":
        assert all(isinstance(read_bias(model, model_type, i), nn.Parameter) for i in before)

    # the counts were reset: a step without forwards has all loads equal (0) and moves nothing
    after_first = biases(model, model_type)
    again = handle.bias_updater.step()
    assert int(again.loads.sum()) == 0
    assert all(torch.equal(read_bias(model, model_type, i), after_first[i]) for i in before)

    handle.remove()  # stops the updates, keeps the trained biases
    with torch.no_grad():
        model(**padded_batch())
    assert all(torch.equal(read_bias(model, model_type, i), after_first[i]) for i in before)
    with pytest.raises(RuntimeError, match="removed"):
        handle.bias_updater.step()
    handle.bias_updater.restore_biases()  # explicit: back to the values before the first update
    assert all(torch.equal(read_bias(model, model_type, i), before[i]) for i in before)
    counter.close()


def test_checkpoint_reruns_count_once_and_layers_select():
    model = tiny_kind_model("deepseek_v3").train()
    model.activation_checkpointing_enable({"use_reentrant": False})
    before = biases(model, "deepseek_v3")
    last = moe_layers(model)[-1]
    handle = moepatch.apply(model, {"bias_update": {"rate": RATE, "layers": [-1]}})
    counter = ExpertLoads(model)
    batch = padded_batch()
    with counter.counting():
        out = model(**batch, labels=batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100))
    loads = counter.take()
    with counter.counting():
        out.loss.backward()  # re-runs the checkpointed layers' forwards: not counted again
    assert counter.take().keys() == loads.keys()  # the re-runs did happen (this test's hook saw them)
    update = handle.bias_updater.step()
    assert update.layers == [last]
    assert torch.equal(update.loads[0], loads[last])
    assert torch.equal(read_bias(model, "deepseek_v3", last), expected_bias(before[last], loads[last]))
    for layer in moe_layers(model)[:-1]:  # not selected: unchanged
        assert torch.equal(read_bias(model, "deepseek_v3", layer), before[layer])
    handle.remove()
    counter.close()


# ---------------------------------------------------------------------------------------------- (b) freeze, C2R
def test_frozen_routers_with_a_plain_optimizer_loop():
    model = tiny_kind_model("deepseek_v3").train()
    before = biases(model, "deepseek_v3")
    handle = moepatch.apply(model, {"freeze_gate": "router", "bias_update": {"rate": RATE}})
    routers = {name: p.detach().clone() for name, p in model.named_parameters() if name in handle.frozen_parameters}
    assert routers and all(".mlp.gate." in name for name in routers)
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    handle.bias_updater.attach(optimizer)  # the update runs after every optimizer.step()
    counter = ExpertLoads(model)
    expected = before
    for texts in (TEXTS[:4], TEXTS[4:]):
        batch = padded_batch(texts)
        with counter.counting():
            loss = model(**batch, labels=batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        loads = counter.take()
        expected = {i: expected_bias(expected[i], loads[i]) for i in expected}
        for i in expected:
            assert torch.equal(read_bias(model, "deepseek_v3", i), expected[i]), i
    assert handle.bias_updater.steps == 2
    for name, p in model.named_parameters():
        if name in routers:
            assert torch.equal(p.detach(), routers[name]), name  # frozen routers did not move; their biases did
    handle.remove()
    optimizer.step()  # the optimizer hook went with remove(): nothing moves the biases any more
    assert all(torch.equal(read_bias(model, "deepseek_v3", i), expected[i]) for i in expected)
    counter.close()


def test_a_step_the_loss_scaler_skips_moves_no_bias():
    """fp16 training: a step whose gradients overflow is skipped by the GradScaler (no weight moves); the biases
    must not move either, with the plain-loop hook and with the Trainer callback (accelerate's optimizer reports
    ``step_was_skipped``), and that step's loads count towards the next one."""
    from accelerate import Accelerator
    from accelerate.optimizer import AcceleratedOptimizer

    from moepatch.routing.bias_update import BiasUpdateCallback

    Accelerator(cpu=True)  # accelerate's optimizer wrapper needs its state, as the Trainer sets it up

    model = tiny_kind_model("deepseek_v3").train()
    before = biases(model, "deepseek_v3")
    handle = moepatch.apply(model, {"freeze_gate": "router", "bias_update": {"rate": RATE}})
    trainable = [p for p in model.parameters() if p.requires_grad]
    counter = ExpertLoads(model)
    for route in ("hook", "callback"):
        optimizer = torch.optim.SGD(trainable, lr=0.1)
        scaler = torch.amp.GradScaler("cpu")
        if route == "hook":
            hook = handle.bias_updater.attach(optimizer)
            stepper = optimizer
        else:
            stepper = AcceleratedOptimizer(optimizer, device_placement=False, scaler=scaler)
            callback = BiasUpdateCallback(handle.bias_updater)
        start = biases(model, "deepseek_v3")
        batch = padded_batch(TEXTS[:4])
        with counter.counting():
            loss = model(**batch, labels=batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)).loss
        scaler.scale(loss).backward()
        trainable[0].grad.view(-1)[0] = float("inf")  # an fp16 overflow
        if route == "hook":
            scaler.step(optimizer)
            scaler.update()
        else:
            stepper.step()  # accelerate steps and updates the scaler itself
            assert stepper.step_was_skipped
            callback.on_step_end(None, None, None, optimizer=stepper)
        optimizer.zero_grad()
        assert all(torch.equal(read_bias(model, "deepseek_v3", i), start[i]) for i in start), route
        skipped_loads = counter.take()
        batch = padded_batch(TEXTS[4:])
        with counter.counting():
            loss = model(**batch, labels=batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)).loss
        loss.backward()
        optimizer.step()  # an applied step (no scaler): the update sees both batches' loads
        if route == "callback":
            callback.on_step_end(None, None, None, optimizer=optimizer)
        else:
            hook.remove()
        loads = counter.take()
        summed = {i: skipped_loads[i] + loads[i] for i in loads}
        for i in start:
            assert torch.equal(read_bias(model, "deepseek_v3", i), expected_bias(start[i], summed[i])), (route, i)
    assert before.keys() == start.keys()
    handle.remove()
    counter.close()


def test_loads_follow_the_c2r_choice():
    model_type = "deepseek_v3"
    model = tiny_kind_model(model_type).train()
    batch = padded_batch(TEXTS)
    counter = ExpertLoads(model)
    with counter.counting(), torch.no_grad():
        model(**batch)
    vanilla = counter.take()

    listed = tiny.random_collaborative_list(model.config.num_hidden_layers, 8, seed=3)
    before = biases(model, model_type)
    handle = moepatch.apply(model, {"c2r": {"top_t": 1, "collaborative_list": listed}, "bias_update": {"rate": RATE}})
    with counter.counting(), torch.no_grad():
        model(**batch)
    constrained = counter.take()
    update = handle.bias_updater.step()
    assert any(not torch.equal(vanilla[i], constrained[i]) for i in constrained)  # C2R changed the choice
    for row, layer in enumerate(update.layers):
        assert torch.equal(update.loads[row], constrained[layer])
        assert torch.equal(read_bias(model, model_type, layer), expected_bias(before[layer], constrained[layer]))
    handle.remove()
    counter.close()


# ---------------------------------------------------------------------------------------------- (c) HF Trainer
def test_trainer_callback_moves_biases_by_rate_times_sign_each_step(tmp_path):
    from transformers import DataCollatorForSeq2Seq
    from transformers import Trainer
    from transformers import TrainerCallback
    from transformers import TrainingArguments

    from moepatch.routing.bias_update import BiasUpdateCallback
    from moepatch.routing.bias_update import bias_update_callbacks

    model_type = "deepseek_v3"
    model = tiny_kind_model(model_type)
    handle = moepatch.apply(model, {"bias_update": {"rate": RATE}, "freeze_gate": "router"})
    tokenizer = tiny.tiny_tokenizer()
    texts = TEXTS + list(tiny.CORPUS[4:8])
    rows = [dict(tokenizer(text)) for text in texts]
    for row in rows:
        row["labels"] = list(row["input_ids"])
    counter = ExpertLoads(model)
    records: list[tuple[dict[int, torch.Tensor], dict[int, torch.Tensor]]] = []

    class Observe(TrainerCallback):  # runs after BiasUpdateCallback (registered later)
        def on_train_begin(self, args, state, control, **kwargs):
            counter.active = True
            records.append(({}, biases(model, model_type)))

        def on_step_end(self, args, state, control, **kwargs):
            records.append((counter.take(), biases(model, model_type)))

    callbacks = bias_update_callbacks(model)
    assert len(callbacks) == 1 and isinstance(callbacks[0], BiasUpdateCallback)
    arguments = TrainingArguments(output_dir=str(tmp_path), max_steps=3, per_device_train_batch_size=2,
                                  gradient_accumulation_steps=2, learning_rate=1e-3, use_cpu=True, report_to="none",
                                  save_strategy="no", logging_strategy="no", seed=0, dataloader_num_workers=0)
    trainer = Trainer(model=model, args=arguments, train_dataset=rows,
                      data_collator=DataCollatorForSeq2Seq(tokenizer, label_pad_token_id=-100),
                      callbacks=[*callbacks, Observe()])
    trainer.train()
    counter.active = False

    assert len(records) == 4 and handle.bias_updater.steps == 3
    for (_, old), (loads, new) in zip(records, records[1:], strict=False):  # neighbours
        assert sorted(loads) == sorted(old)
        for layer in old:
            assert int(loads[layer].sum()) > 0
            assert torch.equal(new[layer], expected_bias(old[layer], loads[layer])), layer
    handle.remove()
    counter.close()


def test_finetune_script_adds_the_callback_from_the_block(tmp_path):
    """scripts/finetune.py's engine reads ``bias_update`` from the checkpoint's block and moves the biases after its
    one optimizer step (dynamic mixing: its eval-mode probe round follows the step): every entry by exactly −rate,
    0 or +rate, both directions present."""
    from safetensors.torch import load_file

    from moepatch.config import write_config
    from moepatch.mixing.finetune import main

    checkpoint = tmp_path / "ckpt"
    model = tiny_kind_model("deepseek_v3")
    write_config(model, {"bias_update": {"rate": RATE}, "freeze_gate": "router"})
    model.save_pretrained(checkpoint)
    tiny.tiny_tokenizer().save_pretrained(checkpoint)
    output = tmp_path / "run"
    assert main(["--model_name_or_path", str(checkpoint), "--output_dir", str(output), "--use_cpu", "--report_to",
                 "none", "--synthetic_data", "--max_steps", "1", "--update_every", "1", "--probe_size", "4",
                 "--per_device_train_batch_size", "2", "--max_length", "64", "--seed", "0", "--save_strategy", "no",
                 "--plot", "false"]) == 0
    before, after = load_file(str(checkpoint / "model.safetensors")), load_file(str(output / "model.safetensors"))
    names = [name for name in before if name.endswith("e_score_correction_bias")]
    assert len(names) == len(moe_layers(model))
    for name in names:
        signs = ((after[name] - before[name]) / RATE).round()
        assert set(signs.tolist()) <= {-1.0, 0.0, 1.0} and {-1.0, 1.0} <= set(signs.tolist()), name
        assert torch.equal(after[name], before[name] + signs * RATE), name
    assert json.loads((output / "config.json").read_text())["moepatch"]["bias_update"]["rate"] == RATE


# ---------------------------------------------------------------------------------------------- (d) refusals
def _state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {name: t.detach().clone() for name, t in model.state_dict(keep_vars=True).items()}


def _assert_untouched(model: nn.Module, state: dict[str, torch.Tensor], flags: dict[str, bool]) -> None:
    assert moepatch.get_handle(model) is None
    assert all(torch.equal(t.detach(), state[name]) for name, t in model.state_dict(keep_vars=True).items())
    assert {name: p.requires_grad for name, p in model.named_parameters()} == flags
    hooks = [m for m in model.modules() if m._forward_hooks or m._forward_pre_hooks]
    assert not hooks, hooks[:2]


@pytest.mark.parametrize("rate", [0, -0.001, math.nan, math.inf, "0.001", True, None])
def test_bad_rate_is_refused_before_any_change(rate):
    model = tiny_kind_model("deepseek_v3")
    state, flags = _state(model), {n: p.requires_grad for n, p in model.named_parameters()}
    with pytest.raises(ValueError, match=r"moepatch\.bias_update\.rate: "):
        moepatch.apply(model, {"freeze_gate": "router", "bias_update": {"rate": rate}})
    _assert_untouched(model, state, flags)


@pytest.mark.parametrize("which", ["qwen2_moe", "gpt_oss"])
def test_routers_without_selection_bias_are_refused(which):
    model = tiny.tiny_model("qwen2_moe") if which == "qwen2_moe" else tiny_kind_model("gpt_oss")
    router_class = {"qwen2_moe": "Qwen2MoeTopKRouter", "gpt_oss": "GptOssTopKRouter"}[which]
    state, flags = _state(model), {n: p.requires_grad for n, p in model.named_parameters()}
    with pytest.raises(ValueError, match=rf"^moepatch\.bias_update: {router_class} .*has no selection bias"):
        moepatch.apply(model, {"freeze_gate": "router", "bias_update": {"rate": RATE}})
    _assert_untouched(model, state, flags)


def test_other_bad_blocks_are_refused_naming_the_field():
    model = tiny_kind_model("ernie4_5_moe")  # MoE layers 1, 2; layer 0 dense
    state, flags = _state(model), {n: p.requires_grad for n, p in model.named_parameters()}
    with pytest.raises(ValueError, match=r"moepatch\.bias_update\.layers\[0\]: layer 0 is a dense layer"):
        moepatch.apply(model, {"bias_update": {"rate": RATE, "layers": [0]}})
    with pytest.raises(ValueError, match=r"moepatch\.bias_update: expected an object"):
        moepatch.apply(model, {"bias_update": True})
    _assert_untouched(model, state, flags)
    read_bias(model, "ernie4_5_moe", 1).requires_grad_(True)  # a bias the optimizer would move as well
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    with pytest.raises(ValueError, match=r"moepatch\.bias_update: layer 1 .*trainable parameter"):
        moepatch.apply(model, {"bias_update": {"rate": RATE}})
    _assert_untouched(model, state, flags)


def test_config_round_trip_and_freeze_log_line():
    from moepatch.config import MoePatchConfig
    from moepatch.patch import plan_patch

    block = {"bias_update": {"rate": 0.001, "layers": [-1]}, "freeze_gate": "router"}
    config = MoePatchConfig.from_dict(block)
    assert config.bias_update.rate == 0.001 and config.to_dict()["bias_update"] == {"rate": 0.001, "layers": [-1]}
    assert MoePatchConfig.from_dict(config.to_dict()).same_features(config)
    lines = plan_patch(moepatch.describe(tiny_kind_model("deepseek_v3")), config).describe()
    assert "e_score_correction_bias` is a buffer, not a parameter: left unchanged by freezing" in lines[0]
    assert lines[-1].startswith("bias_update: rate 0.001 on the selection biases of MoE layers [2]")


# ---------------------------------------------------------------------------------------------- (e) two ranks
@pytest.mark.slow
def test_two_ranks_apply_the_update_of_the_summed_loads(tmp_path: Path):
    """Two gloo ranks route different texts and end with identical biases = the formula on the summed loads: a
    DeepSeek-V3 buffer with plain torch.distributed, then (with DeepSpeed installed) an ERNIE bias *parameter*
    partitioned by ZeRO-3 and gathered for the update."""
    env = dict(os.environ, OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu", PYTHONPATH=os.pathsep.join(sys.path))
    command = torchrun_command(__file__, str(tmp_path))
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=540)
    log = result.stdout + result.stderr
    assert "rank 0 done" in result.stdout and "rank 1 done" in result.stdout, log[-6000:]

    phases = ["plain"] + (["zero3"] if _deepspeed_available() else [])
    for phase in phases:
        ranks = [json.loads((tmp_path / f"{phase}.rank{r}.json").read_text()) for r in range(2)]
        assert ranks[0]["shard"] != ranks[1]["shard"]
        assert ranks[0]["before"] == ranks[1]["before"]
        for layer, old in ranks[0]["before"].items():
            local = [torch.tensor(rank["loads"][layer]) for rank in ranks]
            assert not torch.equal(local[0], local[1])  # the ranks routed different tokens
            expected = expected_bias(torch.tensor(old, dtype=torch.float32), local[0] + local[1])
            for rank in ranks:
                assert torch.equal(torch.tensor(rank["after"][layer], dtype=torch.float32), expected), (phase, layer)
        for rank in ranks:
            assert rank["updater_local"] == [rank["loads"][layer] for layer in sorted(rank["loads"], key=int)]
    if "zero3" in phases:
        assert all(json.loads((tmp_path / f"zero3.rank{r}.json").read_text())["partitioned"] for r in range(2))


def _deepspeed_available() -> bool:
    try:
        import deepspeed  # noqa: F401
    except ImportError:
        return False
    return True


def _write(output: str, name: str, data: dict) -> None:
    with open(os.path.join(output, name), "w") as file:
        json.dump(data, file)


def _plain_phase(output: str, rank: int, shard: list[str]) -> None:
    """The same tiny DeepSeek-V3 on every rank (its bias is a router buffer), one step of this rank's shard."""
    model = tiny_kind_model("deepseek_v3", seed=0).train()
    before = biases(model, "deepseek_v3")
    handle = moepatch.apply(model, {"bias_update": {"rate": RATE}})
    counter = ExpertLoads(model)
    with counter.counting(), torch.no_grad():
        model(**tiny.demo_batch(texts=tuple(shard)))
    loads = counter.take()
    update = handle.bias_updater.step()  # the all-reduce of the loads
    _write(output, f"plain.rank{rank}.json", {
        "shard": shard, "loads": {i: v.tolist() for i, v in loads.items()},
        "updater_local": update.local_loads.tolist(), "before": {i: v.tolist() for i, v in before.items()},
        "after": {i: v.tolist() for i, v in biases(model, "deepseek_v3").items()}})


def _zero3_phase(output: str, rank: int, shard: list[str]) -> None:
    """ERNIE (its bias is a frozen Parameter) in a ZeRO-3 engine that partitions even the 8-entry biases; one
    forward / backward / ``engine.step()`` of this rank's shard, then the update (gathers the biases)."""
    import deepspeed

    deepspeed.init_distributed(dist_backend="gloo")
    model = tiny_kind_model("ernie4_5_moe", seed=0).train()
    before = biases(model, "ernie4_5_moe")
    handle = moepatch.apply(model, {"bias_update": {"rate": RATE}, "freeze_gate": "router"})
    config = {"train_micro_batch_size_per_gpu": len(shard), "gradient_accumulation_steps": 1,
              "optimizer": {"type": "SGD", "params": {"lr": 1e-3}}, "zero_allow_untested_optimizer": True,
              "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0}}
    engine, *_ = deepspeed.initialize(model=model, config=config,
                                      model_parameters=[p for p in model.parameters() if p.requires_grad])
    partitioned = all(read_bias(model, "ernie4_5_moe", i).numel() == 0 for i in before)
    counter = ExpertLoads(model)
    batch = tiny.demo_batch(texts=tuple(shard))
    with counter.counting():
        loss = engine(**batch, labels=batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)).loss
    engine.backward(loss)
    engine.step()
    loads = counter.take()
    update = handle.bias_updater.step()
    after = handle.bias_updater.biases()  # gathered: the partitions kept the update
    partitioned = partitioned and all(read_bias(model, "ernie4_5_moe", i).numel() == 0 for i in before)
    _write(output, f"zero3.rank{rank}.json", {
        "shard": shard, "partitioned": partitioned, "loads": {i: v.tolist() for i, v in loads.items()},
        "updater_local": update.local_loads.tolist(), "before": {i: v.tolist() for i, v in before.items()},
        "after": {i: v.tolist() for i, v in after.items()}})


def _worker(output: str) -> None:
    """One rank of the two-rank test (gloo): different texts per rank, different batch sizes."""
    import torch.distributed as dist

    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    shard = TEXTS[rank::world] if rank == 0 else TEXTS[rank::world][:3]
    _plain_phase(output, rank, shard)
    if _deepspeed_available():
        _zero3_phase(output, rank, TEXTS[rank::world])  # ZeRO-3 needs equal micro-batch sizes
    dist.barrier()
    dist.destroy_process_group()
    print(f"rank {rank} done", flush=True)


if __name__ == "__main__":
    _worker(sys.argv[1])


def test_every_unfit_layer_is_its_own_problem():
    """Two layers' selection biases unfit in two ways: two problems, each naming its layer (``inspect`` lists and
    counts them one by one)."""
    from model_patches.structure import LayerIndexError
    from moepatch.patch import problem_lines
    from moepatch.routing.bias_update import plan_bias_targets

    model = tiny_kind_model("deepseek_v3")  # MoE layers 1, 2
    structure = moepatch.describe(model)
    structure.layer(1).router.e_score_correction_bias = torch.zeros(TINY_KIND_NUM_EXPERTS, dtype=torch.int64)
    structure.layer(2).router.e_score_correction_bias = torch.zeros(TINY_KIND_NUM_EXPERTS + 1)
    with pytest.raises(LayerIndexError) as error:
        plan_bias_targets(structure, None, "moepatch.bias_update")
    lines = problem_lines(error.value)
    assert len(lines) == 2 and "layer 1" in lines[0] and "dtype torch.int64" in lines[0]
    assert "layer 2" in lines[1] and "shape" in lines[1]
    assert all(line.startswith("moepatch.bias_update: layer ") for line in lines)
