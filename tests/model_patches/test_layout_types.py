"""Types whose router is a known kind but whose default layout hides it (``tiny_kinds.LAYOUT_TYPES``).

Shrunk to a tiny depth, their default configs have no MoE layer that runs: every layer dense
(``first_k_dense_replace`` / ``mlp_only_layers``), only linear-attention or Mamba layers (transformers builds no
masks without an attention layer), sparse-attention indexer sizes left unset, or a multimodal wrapper whose text
decoder sits under ``language_model``.  Each tiny model must run, resolve with an exact (probed or declared) rule and
count every non-padding token k times in every MoE layer: a wrapper's decoder must stay the module that receives the
user's 2-D ``attention_mask``.
"""

from __future__ import annotations

import pytest
import torch

import moepatch
from model_patches.structure import describe
from moepatch.testing import tiny_kinds

FAMILY = {
    "deepseek_v32": "generic_topk",
    "glm_moe_dsa": "generic_topk",
    "bailing_hybrid": "generic_topk",
    "kolibri1_1": "kolibri1",
    "granitemoehybrid": "granitemoe",
    "qwen4_exp_text": "generic_topk",
    "qwen4_exp": "generic_topk",
    "gemma4": "gemma4_text",
}
"""Layout type → the family it resolves to (a wrapper: its text decoder's family)."""


def _batch() -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    input_ids = torch.randint(3, tiny_kinds.TINY_VOCAB_SIZE, (2, 9), generator=generator)
    attention_mask = torch.ones_like(input_ids)
    attention_mask[1, 6:] = 0
    return {"input_ids": input_ids, "attention_mask": attention_mask}


def test_every_layout_type_is_listed_here():
    assert set(FAMILY) == set(tiny_kinds.LAYOUT_TYPES)


@pytest.mark.parametrize("model_type", sorted(FAMILY))
def test_layout_type_resolves_exactly_and_counts_every_token(model_type):
    model = tiny_kinds.tiny_kind_model(model_type)
    moe = describe(model)
    assert moe.family.name == FAMILY[model_type]
    assert moe.routing_problem is None
    assert moe.layers, "no MoE layer"
    batch = _batch()
    with torch.no_grad():
        reference = model(**batch).logits
    handle = moepatch.apply(model, {"routing_stats": True})
    try:
        with torch.no_grad():
            logits = model(**batch).logits
        tokens = int(batch["attention_mask"].sum())
        assert torch.equal(logits, reference)
        assert handle.recorder.tokens.tolist() == [tokens] * len(moe.layers)
        assert handle.recorder.counts.sum(dim=-1).tolist() == [tokens * moe.top_k] * len(moe.layers)
    finally:
        handle.remove()


def test_a_multimodal_wrapper_keeps_its_base_model_as_decoder_and_its_text_layers():
    model = tiny_kinds.tiny_kind_model("gemma4")
    moe = describe(model)
    assert moe.decoder is model.model  # called with the user's attention_mask (its text decoder gets built masks)
    assert [layer.name for layer in moe.layers] == [f"model.language_model.layers.{i}" for i in moe.moe_layer_indices]
    assert all(layer.router is model.model.language_model.layers[layer.index].router for layer in moe.layers)
