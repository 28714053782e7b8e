"""Every feature on the families added after the first six (``tiny.NEW_FAMILIES``), against independent references.

The first six run the whole suite (``tiny.TINY_FAMILIES``); these run here, each through every feature once, so the
suite's time grows by this module only.  References come from ``family_facts`` (the published modeling code) and the
test's own hooks, never from moepatch.
"""

from __future__ import annotations

import copy

import pytest
import torch
from family_facts import dense_layers
from family_facts import experts_and_top_k
from family_facts import moe_routers
from family_facts import num_layers
from family_facts import renormalizes
from family_facts import router_logits
from family_facts import router_parameter_pattern
from helpers import logits_of
from helpers import model_state as _state
from routing_reference import capture_router_inputs
from routing_reference import reference_counts

import moepatch
from model_patches.structure import describe
from moepatch.errors import UnsupportedModelError
from moepatch.routing.seam import override_selection
from moepatch.routing.seam import vanilla_selector
from moepatch.testing import tiny
from moepatch.undo import UndoLog

FAMILIES = tiny.NEW_FAMILIES
ROUTED = tuple(f for f in FAMILIES if f != "dbrx")
"""Families whose router returns ``(logits, weights, indices)`` (DBRX chooses in ``DbrxFFN``: refused features)."""
EXPECTED_FAMILY = {"qwen3_5_moe": "qwen3_5_moe", "minimax": "minimax", "jamba": "jamba", "deepseek_v2": "deepseek_v2",
                   "hunyuan_v1_moe": "hunyuan_v1_moe", "dbrx": "dbrx"}


@pytest.fixture(params=FAMILIES)
def new_family(request: pytest.FixtureRequest) -> str:
    return request.param


@pytest.fixture(params=ROUTED)
def routed_family(request: pytest.FixtureRequest) -> str:
    return request.param


def _full_list(model: torch.nn.Module, seed: int = 0) -> list:
    experts, _ = experts_and_top_k(model)
    return tiny.random_collaborative_list(num_layers(model), experts, seed=seed)


def test_view_matches_the_published_definition(new_family):
    model = tiny.tiny_model(new_family)
    moe = describe(model)
    assert moe.family.name == EXPECTED_FAMILY[new_family]
    assert (moe.num_experts, moe.top_k) == experts_and_top_k(model) == (tiny.TINY_NUM_EXPERTS, tiny.TINY_TOP_K)
    assert moe.renormalize == renormalizes(model)
    assert list(moe.dense_layers) == dense_layers(model)
    assert moe.moe_layer_indices == [i for i in range(num_layers(model)) if i not in dense_layers(model)]
    routers = moe_routers(model)
    assert sorted(routers) == moe.moe_layer_indices
    assert all(layer.router is routers[layer.index] for layer in moe.layers)


def test_a_dense_layer_is_exercised():
    assert any(dense_layers(tiny.tiny_model(family)) for family in FAMILIES)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_router_equals_the_published_rule(new_family, dtype):
    """softmax → top-k (renormalised per the family) from the router's own weight, computed here in float64."""
    model = tiny.tiny_model(new_family).to(dtype)
    _, k = experts_and_top_k(model)
    hidden = torch.randn(29, model.config.hidden_size if new_family != "dbrx" else model.config.d_model).to(dtype)
    for layer, router in moe_routers(model).items():
        with torch.no_grad():
            if new_family == "dbrx":  # the router gives logits; DbrxFFN chooses
                block = model.transformer.blocks[layer].ffn
                weights, index = block.route_tokens_to_experts(router(hidden))
            else:
                _, weights, index = router(hidden)
        probs = torch.softmax(router_logits(model, router, hidden).double(), dim=-1)
        want = torch.topk(probs, k, dim=-1).indices
        assert torch.equal(index.sort(dim=-1).values, want.sort(dim=-1).values)
        chosen = probs.gather(1, index)
        if renormalizes(model):
            chosen = chosen / chosen.sum(dim=-1, keepdim=True)
        tolerance = 1e-6 if dtype == torch.float32 else 2e-2
        torch.testing.assert_close(weights.double(), chosen, atol=tolerance, rtol=tolerance)


def test_apply_with_no_feature_is_bit_identical_and_remove_restores(new_family, batch):
    model = tiny.tiny_model(new_family)
    reference, before = logits_of(model, batch), _state(model)
    handle = moepatch.apply(model, {})
    assert handle.is_empty
    assert torch.equal(logits_of(model, batch), reference)
    handle.remove()
    assert _state(model) == before


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_vanilla_selection_override_is_bit_identical(routed_family, batch, dtype):
    model = tiny.tiny_model(routed_family).to(dtype)
    moe = describe(model)
    hidden = torch.randn(37, model.config.hidden_size, dtype=dtype)
    originals = [layer.router(hidden) for layer in moe.layers]
    reference = logits_of(model, batch)
    undo = UndoLog()
    override_selection(moe, lambda layer: vanilla_selector(moe.family.routing), None, undo)
    assert all("forward" in layer.router.__dict__ for layer in moe.layers)
    for layer, original in zip(moe.layers, originals):
        for got, want in zip(layer.router(hidden), original):
            assert got.dtype == want.dtype and torch.equal(got, want)
    assert torch.equal(logits_of(model, batch), reference)
    undo.undo()
    assert all("forward" not in layer.router.__dict__ for layer in moe.layers)


def test_c2r_with_every_collaborator_allowed_is_vanilla(routed_family, batch):
    model = tiny.tiny_model(routed_family)
    reference = logits_of(model, batch)
    experts, _ = experts_and_top_k(model)
    handle = moepatch.apply(model, {"c2r": {"top_t": experts - 1, "collaborative_list": _full_list(model)}})
    assert handle.c2r_routers
    torch.testing.assert_close(logits_of(model, batch), reference, atol=1e-6, rtol=1e-6)


def test_c2r_small_top_t_constrains_the_second_expert(routed_family, batch):
    model = tiny.tiny_model(routed_family)
    reference = logits_of(model, batch)
    listed = _full_list(model, seed=3)
    moepatch.apply(model, {"c2r": {"top_t": 1, "collaborative_list": listed}})
    outputs: dict[int, tuple] = {}
    handles = [router.register_forward_hook(lambda m, a, out, i=i: outputs.__setitem__(i, out))
               for i, router in moe_routers(model).items()]
    changed = logits_of(model, batch)
    for handle in handles:
        handle.remove()
    assert not torch.equal(changed, reference)
    with capture_router_inputs(model) as captured:
        logits_of(model, batch)
    for layer, (_, _, index) in outputs.items():
        router = moe_routers(model)[layer]
        probs = torch.softmax(router_logits(model, router, captured[layer][0]).double(), dim=-1)
        first = probs.argmax(dim=-1)
        chosen = index.tolist()
        for token, experts in enumerate(chosen):
            top1 = int(first[token])
            assert top1 in experts
            assert all(e == top1 or e == listed[layer][top1][0] for e in experts)


def test_routing_statistics_count_the_chosen_experts(routed_family, batch):
    model = tiny.tiny_model(routed_family)
    _, k = experts_and_top_k(model)
    handle = moepatch.apply(model, {"routing_stats": {}})
    with capture_router_inputs(model) as captured:
        logits_of(model, batch)
    keep = batch["attention_mask"].reshape(-1).bool()
    routers = moe_routers(model)
    for slot, layer in enumerate(handle.recorder.layers):
        counts, prob_sums = reference_counts(model, routers[layer], captured[layer][0], k, keep)
        assert torch.equal(handle.recorder.counts[slot], counts)
        torch.testing.assert_close(handle.recorder.prob_sums[slot], prob_sums, atol=1e-5, rtol=1e-5)
    assert handle.recorder.tokens.tolist() == [int(keep.sum())] * len(handle.recorder.layers)


def test_freeze_gate_freezes_exactly_the_router_parameters(new_family):
    model = tiny.tiny_model(new_family)
    handle = moepatch.apply(model, {"freeze_gate": True})
    pattern = router_parameter_pattern(model.config.model_type)
    want = sorted(name for name, _ in model.named_parameters() if pattern.search(name))
    assert want and sorted(handle.frozen_parameters) == want
    assert sorted(name for name, p in model.named_parameters() if not p.requires_grad) == want
    handle.remove()
    assert all(p.requires_grad for p in model.parameters())


def test_lora_experts_install_train_and_undo(routed_family, batch):
    model = tiny.tiny_model(routed_family)
    reference, before = logits_of(model, batch), _state(model)
    handle = moepatch.apply(model, {"lora_experts": {"method": "molora", "num_experts": 2, "r": 2}})
    assert any(".experts." in target for target in handle.lora_targets)
    model.train()
    output = model(**batch, labels=batch["input_ids"])
    output.loss.backward()
    trained = [p for n, p in model.named_parameters() if p.requires_grad]
    assert trained and all(p.grad is not None for p in trained)
    model.eval()
    handle.remove()
    after = _state(model)
    assert after == before  # the training forward's loss values (`lora_experts_aux`) are removed too
    assert torch.equal(logits_of(model, batch), reference)


def test_apply_twice_is_apply_once(routed_family, batch):
    model = tiny.tiny_model(routed_family)
    config = {"freeze_gate": True, "routing_stats": {}}
    first = moepatch.apply(model, config)
    after_first = _state(model)
    assert moepatch.apply(model, copy.deepcopy(config)) is first
    assert _state(model) == after_first


def test_save_and_reload_keep_the_block(new_family, tmp_path, batch):
    config = {"freeze_gate": True}
    model = tiny.tiny_model(new_family, moepatch=config)
    model.save_pretrained(tmp_path)
    loaded = tiny.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert loaded.config.moepatch["freeze_gate"] == "router"
    handle = moepatch.apply(loaded)
    assert handle.frozen_parameters
    assert torch.equal(logits_of(loaded, batch), logits_of(model, batch))


def test_dbrx_refuses_statistics_c2r_and_routed_lora_by_name():
    model = tiny.tiny_model("dbrx")
    with pytest.raises(UnsupportedModelError, match="routing statistics are not available for family dbrx"):
        moepatch.apply(model, {"routing_stats": {}})
    with pytest.raises(UnsupportedModelError, match="family dbrx: DbrxRouter returns only the logits"):
        moepatch.RoutingRecorder(model)
    with pytest.raises(ValueError, match="family dbrx chooses its experts outside the router"):
        moepatch.apply(model, {"c2r": {"top_t": 2, "collaborative_list": _full_list(model)}})
    with pytest.raises(ValueError, match="this family stores its routed experts as rows stacked"):
        moepatch.apply(model, {"lora_experts": {"method": "molora", "num_experts": 2, "r": 2}})
    assert all(p.requires_grad for p in model.parameters()) and not moepatch.get_handle(model)


def test_dbrx_lora_on_attention_works_and_undoes(batch):
    model = tiny.tiny_model("dbrx")
    reference = logits_of(model, batch)
    handle = moepatch.apply(model, {"lora_experts": {"method": "molora", "num_experts": 2, "r": 2,
                                                     "target_modules": ["out_proj"]}})
    assert handle.lora_targets
    handle.remove()
    assert torch.equal(logits_of(model, batch), reference)


def test_dbrx_gate_substring_rule_names_that_it_would_freeze_nothing():
    model = tiny.tiny_model("dbrx")
    with pytest.raises(ValueError, match="rule 'gate_substring' matches no parameter .* nothing would be frozen"):
        moepatch.apply(model, {"freeze_gate": "gate_substring"})
    assert all(p.requires_grad for p in model.parameters())
