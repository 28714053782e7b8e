"""RoutingRecorder against routing recomputed from the router weights and the hidden states fed to each router."""

from __future__ import annotations

import json

import pytest
import torch
from routing_reference import capture_router_inputs
from routing_reference import moe_routers
from routing_reference import reference_counts

import moepatch
from model_patches.structure import describe
from moepatch.testing import tiny
from moepatch.undo import UndoLog


def _check_against_reference(model, recorder, captured, keep_masks):
    """``keep_masks[c]`` is the flat keep mask of call ``c`` (None = all tokens)."""
    routers = moe_routers(model)
    top_k = describe(model).top_k
    for slot, layer in enumerate(recorder.layers):
        counts = torch.zeros(recorder.num_experts, dtype=torch.int64)
        sums = torch.zeros(recorder.num_experts, dtype=torch.float64)
        for hidden, keep in zip(captured[layer], keep_masks, strict=True):
            c, s = reference_counts(model, routers[layer], hidden, top_k, keep)
            counts, sums = counts + c, sums + s
        assert torch.equal(recorder.counts[slot], counts), f"layer {layer}"
        torch.testing.assert_close(recorder.prob_sums[slot].double(), sums, atol=1e-5, rtol=0)
        assert int(recorder.tokens[slot]) * top_k == int(counts.sum())


def test_counts_match_independent_topk_excluding_padding(model, batch):
    keep = batch["attention_mask"].reshape(-1).bool()
    assert not keep.all()  # the batch really has padding
    with capture_router_inputs(model) as captured, moepatch.RoutingRecorder(model) as recorder, torch.no_grad():
        model(**batch)
    assert recorder.layers == sorted(moe_routers(model))
    assert recorder.counts.dtype == torch.int64 and recorder.counts.shape == (len(recorder.layers), 8)
    _check_against_reference(model, recorder, captured, [keep])
    assert recorder.tokens.tolist() == [int(keep.sum())] * len(recorder.layers)


def test_positional_attention_mask_is_found(batch):
    model = tiny.tiny_model("qwen2_moe")
    keep = batch["attention_mask"].reshape(-1).bool()
    with capture_router_inputs(model) as captured, moepatch.RoutingRecorder(model) as recorder, torch.no_grad():
        model.model(batch["input_ids"], batch["attention_mask"])  # positional, on the base model
    _check_against_reference(model, recorder, captured, [keep])


def test_no_mask_counts_every_token(model, batch):
    ids = batch["input_ids"]
    with capture_router_inputs(model) as captured, moepatch.RoutingRecorder(model) as recorder, torch.no_grad():
        model(input_ids=ids)
    _check_against_reference(model, recorder, captured, [None])
    assert int(recorder.tokens[0]) == ids.numel()


def test_training_mode_accumulates_without_keeping_graph(family, model, batch):
    if family == "llama_moe":  # its gate samples noise in training; the reference recomputes noise-free routing
        model = tiny.tiny_model(family, gate_add_noise=False)
    model.train()
    with capture_router_inputs(model) as captured, moepatch.RoutingRecorder(model) as recorder:
        for _ in range(2):
            out = model(**batch, labels=batch["input_ids"])
            out.loss.backward()
    keep = batch["attention_mask"].reshape(-1).bool()
    _check_against_reference(model, recorder, captured, [keep, keep])
    assert recorder._acc.grad_fn is None and not recorder._acc.requires_grad
    assert recorder._mask is None and not recorder._pending  # nothing of the step is retained


def test_gradient_checkpointing_recompute_is_not_counted_twice(batch):
    model = tiny.tiny_model("qwen2_moe")
    model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    with moepatch.RoutingRecorder(model) as recorder:
        model(**batch, labels=batch["input_ids"]).loss.backward()
    assert recorder.tokens.tolist() == [int(batch["attention_mask"].sum())] * len(recorder.layers)
    assert int(recorder.counts.sum()) == int(batch["attention_mask"].sum()) * 2 * len(recorder.layers)


def test_layer_selection_negative_and_order(batch):
    model = tiny.tiny_model("qwen2_moe")  # MoE layers 0, 2, 3; layer 1 dense
    with moepatch.RoutingRecorder(model, layers=[-1, 0]) as recorder, torch.no_grad():
        model(**batch)
    assert recorder.layers == [0, 3] and recorder.counts.shape == (2, 8)
    with moepatch.RoutingRecorder(model) as full, torch.no_grad():
        model(**batch)
    assert torch.equal(recorder.counts, full.counts[[0, 2]])


@pytest.mark.parametrize(
    ("layers", "fragment"),
    [([1], "layer 1 is a dense layer"), ([4], "does not exist"), ([0, 0], "listed twice"), (["0"], "integer")],
)
def test_bad_layers_raise_naming_the_layer(layers, fragment):
    model = tiny.tiny_model("qwen2_moe")
    with pytest.raises(ValueError, match=fragment):
        moepatch.RoutingRecorder(model, layers=layers)


def test_reset_stop_and_export(batch):
    model = tiny.tiny_model("mixtral")
    recorder = moepatch.RoutingRecorder(model)
    with recorder, torch.no_grad():
        model(**batch)
    first = recorder.counts.clone()
    with torch.no_grad():
        model(**batch)  # stopped: not recorded
    assert torch.equal(recorder.counts, first)
    exported = json.loads(json.dumps(recorder.to_dict()))
    assert exported["counts"] == first.tolist() and exported["layers"] == [0, 1, 2]
    assert exported["family"] == "mixtral" and exported["top_k"] == 2 and exported["num_experts"] == 8
    recorder.reset()
    assert int(recorder.counts.sum()) == 0 and float(recorder.prob_sums.sum()) == 0.0
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())


def test_cached_generation_counts_each_real_token_once():
    model = tiny.tiny_model("qwen2_moe")
    tokenizer = tiny.tiny_tokenizer()
    tokenizer.padding_side = "left"
    batch = dict(tokenizer(["short", "a much longer prompt for the model"], return_tensors="pt", padding=True))
    new_tokens = 3
    with moepatch.RoutingRecorder(model) as recorder, torch.no_grad():
        model.generate(**batch, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                       pad_token_id=0)
    # prompt tokens once, then every generated position but the last is fed back once per sequence
    expected = int(batch["attention_mask"].sum()) + 2 * (new_tokens - 1)
    assert recorder.tokens.tolist() == [expected] * len(recorder.layers)


def test_reports_experts_chosen_after_a_routing_override(batch):
    """A selection override at the routing patch point is what the recorder sees."""
    from moepatch.routing.seam import override_selection

    model = tiny.tiny_model("qwen2_moe")
    moe = describe(model)

    def always_first_two(probs, k):
        index = torch.arange(k, device=probs.device).expand(probs.shape[0], k)
        return probs.gather(1, index), index

    undo = UndoLog()
    override_selection(moe, lambda layer: always_first_two, None, undo)
    with moepatch.RoutingRecorder(model) as recorder, torch.no_grad():
        model(**batch)
    undo.undo()
    tokens = int(batch["attention_mask"].sum())
    expected = torch.zeros(8, dtype=torch.int64)
    expected[:2] = tokens
    assert all(torch.equal(row, expected) for row in recorder.counts)


def test_apply_with_routing_stats_records_selected_layers(batch):
    model = tiny.tiny_model("olmoe", moepatch={"routing_stats": {"layers": [-1]}})
    handle = moepatch.apply(model)
    with torch.no_grad():
        model(**batch)
    assert handle.recorder.layers == [2]
    assert int(handle.recorder.tokens[0]) == int(batch["attention_mask"].sum())
    handle.remove()
    assert not handle.recorder.active


def test_router_called_outside_a_model_call_is_counted_unmasked():
    model = tiny.tiny_model("mixtral")
    moe = describe(model)
    hidden = torch.randn(11, model.config.hidden_size)
    with moepatch.RoutingRecorder(model) as recorder, torch.no_grad():
        moe.layer(1).router(hidden)
    counts, sums = reference_counts(model, moe.layer(1).router, hidden, 2, None)
    assert recorder.tokens.tolist() == [0, 11, 0]
    assert torch.equal(recorder.counts[1], counts) and int(recorder.counts[[0, 2]].sum()) == 0
    torch.testing.assert_close(recorder.prob_sums[1], sums, atol=1e-5, rtol=0)
