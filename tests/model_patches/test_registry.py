"""Family registry and the adapter view: declared facts match the real transformers modules."""

from __future__ import annotations

import types

import pytest
import torch
from family_facts import experts_and_top_k
from family_facts import moe_routers
from family_facts import num_layers
from family_facts import renormalizes
from torch import nn

import model_patches
from model_patches import registry
from model_patches.spec import FamilySpec
from model_patches.spec import RoutingRule
from model_patches.structure import describe
from moepatch.errors import UnsupportedModelError
from moepatch.testing import tiny

EXPECTED_FAMILY = {"qwen2_moe": "qwen2_moe", "mixtral": "mixtral", "qwen3_moe": "generic_topk", "olmoe": "generic_topk",
                   "llama_moe": "llama_moe", "moduleformer": "moduleformer"}
NEW_FAMILY_FILES = set(tiny.NEW_FAMILIES)  # each named after its model_type, tested in test_new_families.py


def test_every_family_module_is_registered_and_tested():
    families = registry.families()
    infrastructure = {"diagnosis", "errors", "expert_storage", "registry", "routing_rule", "spec", "structure",
                      "vllm_lora"}
    modules = {name for name in dir(model_patches) if isinstance(getattr(model_patches, name), types.ModuleType)}
    modules -= infrastructure
    original = {"qwen2_moe", "mixtral", "generic_topk", "llama_moe", "moduleformer"}
    assert modules == original | NEW_FAMILY_FILES
    assert set(families) == original | NEW_FAMILY_FILES
    assert set(EXPECTED_FAMILY.values()) | NEW_FAMILY_FILES == set(families)  # each family has a tiny model tested


def test_view_matches_the_config(family):
    model = tiny.tiny_model(family)
    moe = describe(model)
    assert moe.family.name == EXPECTED_FAMILY[family]
    assert (moe.num_experts, moe.top_k) == experts_and_top_k(model)
    assert moe.renormalize == renormalizes(model)
    dense = list(getattr(model.config, "mlp_only_layers", []) or [])
    assert list(moe.dense_layers) == dense
    assert moe.moe_layer_indices == [i for i in range(num_layers(model)) if i not in dense]
    routers = moe_routers(model)
    assert sorted(routers) == moe.moe_layer_indices
    for layer in moe.layers:
        assert layer.router is routers[layer.index]
        assert f"{layer.name}.gate" == next(n for n, m in model.named_modules() if m is routers[layer.index])


def test_block_class_match_is_exact_through_the_mro():
    spec = registry.get_family("qwen2_moe")
    from transformers.models.qwen2_moe.modeling_qwen2_moe import Qwen2MoeSparseMoeBlock

    class WrappedBlock(Qwen2MoeSparseMoeBlock):  # a quantised / wrapped subclass still matches
        pass

    class Qwen2MoeSparseMoeBlockV2(nn.Module):  # a similar name does not
        pass

    config = tiny.tiny_config("qwen2_moe")
    assert spec.is_sparse_block(WrappedBlock(config))
    assert not spec.is_sparse_block(Qwen2MoeSparseMoeBlockV2())


def test_model_type_scopes_named_families():
    model = tiny.tiny_model("qwen2_moe")
    with pytest.raises(UnsupportedModelError, match="mixtral: no sparse MoE block"):
        describe(model, family="mixtral")


def _swap_router_class(model, layer, forward):
    router = model.model.layers[layer].mlp.gate
    router.__class__ = type("OtherRuleRouter", (type(router),), {"forward": forward})


def _softmax_over_k(self, hidden_states):  # GPT-OSS rule: top-k of logits, then softmax over the k
    logits = torch.nn.functional.linear(hidden_states.reshape(-1, self.hidden_dim), self.weight)
    values, index = torch.topk(logits, self.top_k, dim=-1)
    return logits, torch.softmax(values, dim=-1), index


def _sigmoid_scores(self, hidden_states):  # DeepSeek-style sigmoid scoring
    logits = torch.nn.functional.linear(hidden_states.reshape(-1, self.hidden_dim), self.weight)
    values, index = torch.topk(torch.sigmoid(logits), self.top_k, dim=-1)
    return logits, values, index


@pytest.mark.parametrize(("forward", "reason"), [
    (_softmax_over_k, "layer 1: router's expert weights sum to 1 over the k .* declares norm_topk_prob=False"),
    (_sigmoid_scores, "layer 1: router's expert weights differ"),
], ids=["softmax-over-k", "sigmoid"])
def test_generic_family_rejects_a_router_with_another_rule(forward, reason):
    """An OLMoE-shaped model (no renormalisation) whose layer-1 router follows another rule is refused."""
    model = tiny.tiny_model("olmoe")
    describe(model)  # accepted as is
    _swap_router_class(model, 1, forward)
    with pytest.raises(UnsupportedModelError, match=reason):
        describe(model)


def test_generic_probe_accepts_softmax_over_k_when_renormalising():
    """With norm_topk_prob=True, softmax over the top-k logits *is* the renormalised top-k probabilities."""
    model = tiny.tiny_model("qwen3_moe")
    _swap_router_class(model, 1, _softmax_over_k)
    assert describe(model).renormalize


def test_register_refuses_duplicates():
    spec = FamilySpec(name="qwen2_moe", model_types=("x",), block_classes=("X",), routing=RoutingRule())
    with pytest.raises(ValueError, match="already registered"):
        registry.register(spec)
    clash = FamilySpec(name="other", model_types=("mixtral",), block_classes=("X",), routing=RoutingRule())
    with pytest.raises(ValueError, match="claimed by both"):
        registry.register(clash)
