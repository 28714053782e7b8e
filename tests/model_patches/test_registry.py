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
ROUTER_KIND_FAMILY_FILES = {"deepseek_v3", "deepseek_v4", "doge", "ergo", "ernie4_5_moe", "gemma4_text", "gpt_oss",
                            "granitemoe", "inkling", "jetmoe", "kolibri1", "llama4", "minimax_m2", "phimoe", "zaya"}
"""The router kinds' anchor families, tested in test_router_kinds.py on tiny_kinds models."""


def test_every_family_module_is_registered_and_tested():
    families = registry.families()
    infrastructure = {"diagnosis", "errors", "expert_storage", "registry", "routing_rule", "spec", "structure",
                      "vllm_lora", "sparsemixer", "expert_sorted", "product_keys"}
    modules = {name for name in dir(model_patches) if isinstance(getattr(model_patches, name), types.ModuleType)}
    modules -= infrastructure
    original = {"qwen2_moe", "mixtral", "generic_topk", "llama_moe", "moduleformer"}
    assert modules == original | NEW_FAMILY_FILES | ROUTER_KIND_FAMILY_FILES
    assert set(families) == original | NEW_FAMILY_FILES | ROUTER_KIND_FAMILY_FILES
    tested = set(EXPECTED_FAMILY.values()) | NEW_FAMILY_FILES | ROUTER_KIND_FAMILY_FILES
    assert tested == set(families)  # each family has a tiny model tested


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


@pytest.mark.parametrize("forward", [_softmax_over_k, _sigmoid_scores], ids=["softmax-over-k", "sigmoid"])
def test_generic_family_finds_a_layer_that_breaks_the_probed_rule(forward):
    """An OLMoE-shaped model whose layer-1 router follows another rule than layer 0: the structure is accepted, the
    rule is not (each layer is checked against the rule probed on the first, bit for bit)."""
    model = tiny.tiny_model("olmoe")
    assert describe(model).routing_problem is None
    _swap_router_class(model, 1, forward)
    moe = describe(model)
    assert moe.routing_problem.startswith("layer 1: OtherRuleRouter does not follow the probed rule")


def test_generic_probe_finds_softmax_over_k_on_every_layer():
    """Every layer top-k of the logits then softmax over the k (gpt-oss's rule on an OLMoE body): probed exactly."""
    model = tiny.tiny_model("olmoe")
    for layer in range(3):
        _swap_router_class(model, layer, _softmax_over_k)
    moe = describe(model)
    assert moe.routing_problem is None
    assert (moe.family.routing.score, moe.family.routing.weights_from) == ("logits", "softmax_of_chosen")


def test_register_refuses_duplicates():
    spec = FamilySpec(name="qwen2_moe", model_types=("x",), block_classes=("X",), routing=RoutingRule())
    with pytest.raises(ValueError, match="already registered"):
        registry.register(spec)
    clash = FamilySpec(name="other", model_types=("mixtral",), block_classes=("X",), routing=RoutingRule())
    with pytest.raises(ValueError, match="claimed by both"):
        registry.register(clash)
