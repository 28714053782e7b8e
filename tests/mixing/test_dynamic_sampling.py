"""Dynamic data mixing in a real HF Trainer run: rounds, logged weights, checkpointed sampler, exact resume."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import DataCollatorForSeq2Seq
from transformers import TrainerCallback
from transformers import TrainingArguments

from moepatch.mixing.callback import DynamicSamplingArguments
from moepatch.mixing.callback import DynamicSamplingCallback
from moepatch.mixing.callback import MixtureTrainer
from moepatch.mixing.callback import sampling_horizon
from moepatch.mixing.sampler import DynamicMixtureSampler
from moepatch.mixing.sampler import MixtureDataset
from moepatch.testing import tiny

NAMES = ["code", "math", "chat"]
RANGES = [(10, 60), (100, 200), (300, 500)]  # clearly different token distributions per source


def _examples(source: int, count: int, seed: int) -> list[dict]:
    generator = torch.Generator().manual_seed(seed * 10 + source)
    low, high = RANGES[source]
    result = []
    for _ in range(count):
        ids = torch.randint(low, high, (12,), generator=generator).tolist()
        result.append({"input_ids": ids, "attention_mask": [1] * 12, "labels": ids})
    return result


class _StopAfter(TrainerCallback):
    """Interrupt the run after a step (its checkpoint saved), as a crash or a preempted job would."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            control.should_training_stop = True
        return control


def _run(output_dir, max_steps: int, resume: str | None = None, stop_after: int | None = None, workers: int = 0):
    tokenizer = tiny.tiny_tokenizer()
    model = tiny.tiny_model("qwen2_moe", seed=0).train()
    args = TrainingArguments(output_dir=str(output_dir), use_cpu=True, max_steps=max_steps, learning_rate=5e-3,
                             per_device_train_batch_size=4, save_strategy="steps", save_steps=2, report_to=[],
                             logging_steps=1000, seed=0, dataloader_num_workers=workers)
    train = [_examples(s, 20, seed=1) for s in range(3)]
    probes = [_examples(s, 6, seed=2) for s in range(3)]
    sampler = DynamicMixtureSampler([len(t) for t in train], seed=3, horizon=sampling_horizon(args))
    collator = DataCollatorForSeq2Seq(tokenizer, label_pad_token_id=-100, return_tensors="pt")
    options = DynamicSamplingArguments(update_every=2, eta=10.0, c=0.05, probe_layers=[-1])
    callback = DynamicSamplingCallback(sampler, NAMES, probes, collator, options)
    callbacks = [callback] + ([_StopAfter(stop_after)] if stop_after else [])
    trainer = MixtureTrainer(model=model, args=args, train_dataset=MixtureDataset(train), data_collator=collator,
                             callbacks=callbacks, mixture_sampler=sampler)
    trainer.train(resume_from_checkpoint=resume)
    rounds = [json.loads(line) for line in (output_dir / "sampling_info" / "rounds.jsonl").read_text().splitlines()]
    return rounds, sampler


@pytest.mark.parametrize("workers", [0, 2])
def test_rounds_update_log_and_checkpoint(tmp_path, workers):
    rounds, sampler = _run(tmp_path / "run", max_steps=6, workers=workers)
    assert [r["step"] for r in rounds] == [2, 4, 6]
    assert set(rounds[0]) >= {"step", "old_weights", "new_weights", "distances", "per_source_loads"}
    assert rounds[0]["old_weights"] == pytest.approx([1 / 3] * 3)
    assert rounds[0]["new_weights"] != pytest.approx(rounds[0]["old_weights"], abs=1e-6)  # the first round moves
    assert all(len(loads) == 8 for loads in rounds[0]["per_source_loads"])  # last MoE layer, 8 experts
    assert sampler.weights == pytest.approx(rounds[-1]["new_weights"])
    saved = json.loads((tmp_path / "run" / "checkpoint-4" / "dynamic_sampling.json").read_text())
    assert saved["names"] == NAMES and len(saved["schedule"]) == 3  # initial + rounds at steps 2 and 4


def test_resume_after_round_one_matches_an_uninterrupted_run(tmp_path):
    straight, straight_sampler = _run(tmp_path / "straight", max_steps=6)
    _run(tmp_path / "stopped", max_steps=6, stop_after=2)
    resumed, resumed_sampler = _run(tmp_path / "stopped", max_steps=6,
                                    resume=str(tmp_path / "stopped" / "checkpoint-2"))
    assert [r["step"] for r in resumed] == [2, 4, 6]
    for a, b in zip(straight, resumed, strict=True):
        assert b["new_weights"] == pytest.approx(a["new_weights"], abs=1e-9)
    assert resumed_sampler.schedule == straight_sampler.schedule
    assert (resumed_sampler.sources_of(0, 200) == straight_sampler.sources_of(0, 200)).all()  # same example sequence


def test_resume_from_an_earlier_checkpoint_records_each_round_once(tmp_path):
    """A run resumed from checkpoint-2 after reaching step 6 rewrites rounds 4 and 6 instead of appending them."""
    straight, _ = _run(tmp_path / "run", max_steps=6)
    resumed, _ = _run(tmp_path / "run", max_steps=6, resume=str(tmp_path / "run" / "checkpoint-2"))
    assert [r["step"] for r in resumed] == [2, 4, 6]
    for a, b in zip(straight, resumed, strict=True):
        assert b["new_weights"] == pytest.approx(a["new_weights"], abs=1e-9)


@pytest.mark.parametrize("field, value", [("update_every", 0), ("update_every", -1), ("eta", float("nan")),
                                          ("eta", -1.0), ("c", 1.5), ("c", -0.1), ("distance", "l1"),
                                          ("criterion", "median"), ("probe_layers", []), ("probe_layers", [1, 1]),
                                          ("probe_batch_size", 0)])
def test_options_are_checked_when_built(field, value):
    """``update_every=0`` used to raise ZeroDivisionError at the first probe round; now refused when built, named by
    its field (scripts/finetune.py names the flag: tests/mixing/test_finetune_bad_inputs.py)."""
    from moepatch.errors import FieldError

    with pytest.raises(FieldError, match=f"^{field}: ") as error:
        DynamicSamplingArguments(**{field: value})
    assert error.value.field == field
