"""Every feature on the families added after the first six (``tiny.NEW_FAMILIES``), against independent references.

The first six run the whole suite (``tiny.TINY_FAMILIES``); these run here, each through every feature once, so the
suite's time grows by this module only.  References come from ``family_facts`` (the published modeling code) and the
test's own hooks, never from moepatch.
"""

from __future__ import annotations

import copy

import pytest
import torch
from family_facts import capture_choices
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
from routing_reference import independent_switch_loss
from routing_reference import reference_counts

import moepatch
from model_patches.structure import describe
from moepatch.routing.seam import override_selection
from moepatch.routing.seam import vanilla_selector
from moepatch.testing import tiny
from moepatch.undo import UndoLog

FAMILIES = tiny.NEW_FAMILIES
EXPECTED_FAMILY = {"qwen3_5_moe": "qwen3_5_moe", "minimax": "minimax", "jamba": "jamba", "deepseek_v2": "deepseek_v2",
                   "hunyuan_v1_moe": "hunyuan_v1_moe", "dbrx": "dbrx"}


@pytest.fixture(params=FAMILIES)
def new_family(request: pytest.FixtureRequest) -> str:
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
def test_vanilla_selection_override_is_bit_identical(new_family, batch, dtype):
    model = tiny.tiny_model(new_family).to(dtype)
    moe = describe(model)
    hidden = torch.randn(37, model.config.hidden_size, dtype=dtype)
    blocks_choose = new_family == "dbrx"  # DbrxFFN.route_tokens_to_experts chooses from the router's logits

    def routing(layer) -> tuple[torch.Tensor, ...]:
        with torch.no_grad():
            output = layer.router(hidden)
            return layer.block.route_tokens_to_experts(output) if blocks_choose else output

    originals = [routing(layer) for layer in moe.layers]
    reference = logits_of(model, batch)
    undo = UndoLog()
    override_selection(moe, lambda layer: vanilla_selector(moe.family.routing), None, undo)
    replaced = "route_tokens_to_experts" if blocks_choose else "forward"
    owners = [layer.block if blocks_choose else layer.router for layer in moe.layers]
    assert all(replaced in owner.__dict__ for owner in owners)
    for layer, original in zip(moe.layers, originals, strict=True):
        for got, want in zip(routing(layer), original, strict=True):
            assert got.dtype == want.dtype and torch.equal(got, want)
    assert torch.equal(logits_of(model, batch), reference)
    undo.undo()
    assert all(replaced not in owner.__dict__ for owner in owners)


def test_c2r_with_every_collaborator_allowed_is_vanilla(new_family, batch):
    model = tiny.tiny_model(new_family)
    reference = logits_of(model, batch)
    experts, _ = experts_and_top_k(model)
    handle = moepatch.apply(model, {"c2r": {"top_t": experts - 1, "collaborative_list": _full_list(model)}})
    assert handle.c2r_routers
    torch.testing.assert_close(logits_of(model, batch), reference, atol=1e-6, rtol=1e-6)


def test_c2r_small_top_t_constrains_the_second_expert(new_family, batch):
    model = tiny.tiny_model(new_family)
    reference = logits_of(model, batch)
    listed = _full_list(model, seed=3)
    moepatch.apply(model, {"c2r": {"top_t": 1, "collaborative_list": listed}})
    with capture_choices(model) as outputs:
        changed = logits_of(model, batch)
    assert not torch.equal(changed, reference)
    with capture_router_inputs(model) as captured:
        logits_of(model, batch)
    assert sorted(outputs) == sorted(moe_routers(model))
    for layer, index in outputs.items():
        router = moe_routers(model)[layer]
        probs = torch.softmax(router_logits(model, router, captured[layer][0]).double(), dim=-1)
        first = probs.argmax(dim=-1)
        chosen = index.tolist()
        for token, experts in enumerate(chosen):
            top1 = int(first[token])
            assert top1 in experts
            assert all(e == top1 or e == listed[layer][top1][0] for e in experts)


def test_routing_statistics_count_the_chosen_experts(new_family, batch):
    model = tiny.tiny_model(new_family)
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


def test_lora_experts_install_train_and_undo(new_family, batch):
    model = tiny.tiny_model(new_family)
    reference, before = logits_of(model, batch), _state(model)
    handle = moepatch.apply(model, {"lora_experts": {"method": "molora", "num_experts": 2, "r": 2,
                                                     "routed_experts": True}})
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


def test_apply_twice_is_apply_once(new_family, batch):
    model = tiny.tiny_model(new_family)
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


@pytest.mark.parametrize("balanced_family", ["qwen3_5_moe", "minimax", "jamba", "dbrx"])
def test_balance_loss_counts_the_experts_c2r_chose(balanced_family, batch):
    """These causal LMs recompute vanilla top-k from the router logits for their balance loss; under C2R moepatch's
    loss uses the experts that received the tokens (DBRX: the choice DbrxFFN handed to its experts), equal to an
    independent Switch loss of those choices.  (DeepSeek-V2 and HunYuan-MoE-V1 have no balance loss.)"""
    model = tiny.tiny_model(balanced_family, output_router_logits=True)
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    with torch.no_grad():
        want = model(**batch, labels=labels)
    experts, k = experts_and_top_k(model)
    handle = moepatch.apply(model, {"c2r": {"top_t": experts - 1, "collaborative_list": _full_list(model)}})
    with torch.no_grad():
        got = model(**batch, labels=labels)
    assert "forward" in model.__dict__
    assert torch.equal(got.aux_loss, want.aux_loss) and torch.equal(got.loss, want.loss)
    handle.remove()
    moepatch.apply(model, {"c2r": {"top_t": 1, "collaborative_list": _full_list(model, seed=4)}})
    model.train()
    if balanced_family == "dbrx":  # no router noise: the captured logits are the ones used
        for layer in describe(model).layers:
            layer.router.moe_jitter_eps = None
    with capture_choices(model) as chosen:
        out = model(**batch, labels=labels)
    expected = independent_switch_loss(out.router_logits, [chosen[i] for i in sorted(chosen)], experts,
                                       batch["attention_mask"])
    assert abs(out.aux_loss.item() - expected) < 1e-5
    from transformers.models.qwen2_moe.modeling_qwen2_moe import load_balancing_loss_func

    vanilla = load_balancing_loss_func(out.router_logits, experts, k, batch["attention_mask"]).item()
    assert abs(vanilla - expected) > 1e-4
    lm_only = model.loss_function(out.logits, labels, model.config.vocab_size)
    torch.testing.assert_close(out.loss, lm_only + model.router_aux_loss_coef * out.aux_loss)
    out.loss.backward()
    pattern = router_parameter_pattern(balanced_family)
    routers = [p for name, p in model.named_parameters() if pattern.search(name)]
    assert routers and all(p.grad is not None for p in routers)


def test_dbrx_lora_on_routed_experts_equals_an_independent_glu(batch):
    """Each routed expert's LoRA sets join its GLU (w1 gate, v1 up, w2 down) on exactly the tokens DbrxFFN sent it:
    the block output equals a per-token computation from the published DBRX expert formula."""
    model = tiny.tiny_model("dbrx")
    handle = moepatch.apply(model, {"lora_experts": {"method": "molora", "num_experts": 2, "r": 2,
                                                     "routed_experts": True,
                                                     "target_modules": ["gate_proj", "up_proj", "down_proj"]}})
    assert sorted(handle.lora_targets) == [f"transformer.blocks.{i}.ffn.experts.{p}" for i in range(2)
                                           for p in ("down_proj", "gate_proj", "up_proj")]
    torch.manual_seed(1)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_B" in name:
                parameter.normal_(std=0.3)  # non-zero deltas
    inputs, outputs = {}, {}

    def keep(module: torch.nn.Module, args: tuple, output: torch.Tensor, index: int) -> None:
        inputs[index], outputs[index] = args[0], output

    hooks = [block.ffn.register_forward_hook(lambda m, a, out, index=index: keep(m, a, out, index))
             for index, block in enumerate(model.transformer.blocks)]
    logits_of(model, batch)
    for hook in hooks:
        hook.remove()
    experts, k = experts_and_top_k(model)
    for index, block in enumerate(model.transformer.blocks):
        ffn = block.ffn
        sets = ffn.experts.lora_experts
        hidden = inputs[index].reshape(-1, model.config.d_model).double()
        probs = torch.softmax(router_logits(model, ffn.router, hidden.float()).double(), dim=-1)
        weights, chosen = torch.topk(probs, k, dim=-1)
        weights = weights / weights.sum(dim=-1, keepdim=True)
        inner = model.config.ffn_config.ffn_hidden_size
        w1, v1, w2 = (getattr(ffn.experts.mlp, name).double().view(experts, inner, -1) for name in ("w1", "v1", "w2"))

        def delta(projection: str, expert: int, rows: torch.Tensor, sets: torch.nn.Module = sets) -> torch.Tensor:
            with torch.no_grad():
                return sets[projection].sets[expert](rows.float()).double()

        want = torch.zeros_like(hidden)
        for token in range(hidden.shape[0]):
            x = hidden[token : token + 1]
            for slot in range(k):
                e = int(chosen[token, slot])
                gate = x @ w1[e].T + delta("gate_proj", e, x)
                up = x @ v1[e].T + delta("up_proj", e, x)
                intermediate = torch.nn.functional.silu(gate) * up
                want[token] += weights[token, slot] * (intermediate @ w2[e] + delta("down_proj", e, intermediate))[0]
        got = outputs[index].reshape(-1, model.config.d_model).double()
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    handle.remove()
    assert "forward" not in model.transformer.blocks[0].ffn.experts.__dict__


def test_dbrx_permuted_experts_compute_the_same_logits(batch):
    """Renumbering DBRX's experts moves blocks of ffn_hidden_size rows of w1 / v1 / w2 with the router rows."""
    from moepatch.tools.c2r.permutation import permute_experts

    model = tiny.tiny_model("dbrx")
    reference = logits_of(model, batch)
    moe = describe(model)
    experts, _ = experts_and_top_k(model)
    permutation = list(reversed(range(experts)))
    inner = model.config.ffn_config.ffn_hidden_size
    before = model.transformer.blocks[0].ffn.experts.mlp.w1.detach().clone().view(experts, inner, -1)
    permute_experts(moe, {i: permutation for i in moe.moe_layer_indices})
    after = model.transformer.blocks[0].ffn.experts.mlp.w1.view(experts, inner, -1)
    assert all(torch.equal(after[new], before[old]) for new, old in enumerate(permutation))
    torch.testing.assert_close(logits_of(model, batch), reference, atol=1e-5, rtol=1e-5)


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
