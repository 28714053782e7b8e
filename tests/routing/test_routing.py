"""The routing patch point: vanilla selection reproduces every family's router bit for bit; overrides are undone."""

from __future__ import annotations

import pytest
import torch
from helpers import logits_of

from model_patches.structure import describe
from moepatch.routing.seam import override_selection
from moepatch.routing.seam import select_topk
from moepatch.testing import tiny
from moepatch.undo import UndoLog


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_vanilla_selection_is_bit_identical_to_the_family_router(family, batch, dtype):
    model = tiny.tiny_model(family).to(dtype)
    moe = describe(model)
    hidden = torch.randn(37, model.config.hidden_size, dtype=dtype)
    originals = [layer.router(hidden) for layer in moe.layers]
    reference_logits = logits_of(model, batch)

    undo = UndoLog()
    if moe.family.selection_kind == "logits_top_k_plus_one":  # LLaMA-MoE: k + 1 candidates from the logits

        def vanilla(logits):
            return torch.topk(logits, moe.top_k + 1, dim=1)
    else:
        vanilla = select_topk
    patched = override_selection(moe, lambda layer: vanilla, None, undo)
    assert patched == [f"{layer.name}.gate" for layer in moe.layers]
    seam = "select_experts" if family in ("moduleformer", "llama_moe") else "forward"  # gates with their own seam
    assert all(seam in layer.router.__dict__ for layer in moe.layers)
    for layer, original in zip(moe.layers, originals, strict=True):
        got_all = layer.router(hidden)
        if isinstance(got_all, dict):  # LLaMA-MoE's gate returns the published dict
            got_all, original = list(got_all.values()), list(original.values())
        for got, want in zip(got_all, original, strict=True):
            assert got.dtype == want.dtype and torch.equal(got, want)
    assert torch.equal(logits_of(model, batch), reference_logits)

    undo.undo()
    assert all(seam not in layer.router.__dict__ for layer in moe.layers)


def test_selection_override_changes_routing_only_where_asked(batch):
    model = tiny.tiny_model("mixtral")
    moe = describe(model)
    reference = logits_of(model, batch)
    seen_layers = []

    def factory(layer):
        seen_layers.append(layer.index)

        def lowest_k(probs, k):  # deliberately different: the k least likely experts
            values, index = torch.topk(-probs, k, dim=-1)
            return -values, index

        return lowest_k

    undo = UndoLog()
    override_selection(moe, factory, [2], undo)
    assert seen_layers == [2]
    hidden = torch.randn(5, model.config.hidden_size)
    _, weights, index = moe.layer(2).router(hidden)
    probs = torch.softmax(torch.nn.functional.linear(hidden, moe.layer(2).router.weight), dim=-1)
    expected_index = torch.topk(-probs, 2, dim=-1).indices
    assert torch.equal(index, expected_index)
    chosen = probs.gather(1, expected_index)
    torch.testing.assert_close(weights, chosen / chosen.sum(-1, keepdim=True))  # Mixtral renormalises
    assert not torch.equal(logits_of(model, batch), reference)
    undo.undo()
    assert torch.equal(logits_of(model, batch), reference)
