"""moepatch.apply / PatchHandle: exactness, idempotence, exact undo, instance scope, unsupported models."""

from __future__ import annotations

import copy

import pytest
import torch
from family_facts import router_parameter_pattern
from helpers import logits_of
from helpers import model_state as _state
from transformers import AutoModelForCausalLM
from transformers import GptOssConfig
from transformers import LlamaConfig

import moepatch
from moepatch.testing import tiny

ALL_FEATURES = {"freeze_gate": "gate_substring", "routing_stats": {"layers": None}}


def test_empty_config_is_bit_identical_and_patches_nothing(model, batch):
    before_logits, before = logits_of(model, batch), _state(model)
    handle = moepatch.apply(model, {})
    assert handle.is_empty and handle.moe_model is not None
    assert torch.equal(logits_of(model, batch), before_logits)
    state = _state(model)
    assert state["forwards"] == before["forwards"] and state["hooks"] == before["hooks"]
    assert state["requires_grad"] == before["requires_grad"]


def test_all_features_keep_outputs_bit_identical(model, batch):
    reference = logits_of(model, batch)
    handle = moepatch.apply(model, ALL_FEATURES)
    assert handle.frozen_parameters and handle.recorder is not None
    assert torch.equal(logits_of(model, batch), reference)


def test_apply_twice_is_apply_once(model, batch):
    first = moepatch.apply(model, ALL_FEATURES)
    after_first = _state(model)
    second = moepatch.apply(model, copy.deepcopy(ALL_FEATURES))
    assert second is first
    assert _state(model) == after_first
    logits_of(model, batch)
    assert first.recorder.tokens.tolist() == [int(batch["attention_mask"].sum())] * len(first.recorder.layers)


def test_remove_restores_model_exactly(model, batch):
    reference, before = logits_of(model, batch), _state(model)
    handle = moepatch.apply(model, ALL_FEATURES)
    assert _state(model) != before
    handle.remove()
    assert _state(model) == before
    assert "_moepatch_handle" not in model.__dict__
    assert all("forward" not in m.__dict__ for m in model.modules())
    assert torch.equal(logits_of(model, batch), reference)
    handle.remove()  # idempotent
    assert _state(model) == before


def test_patches_the_instance_never_the_class(family, batch):
    model, twin = tiny.tiny_model(family, seed=0), tiny.tiny_model(family, seed=0)
    router_cls = type(moepatch.describe(model).layers[0].router)
    class_forward = router_cls.__dict__["forward"]
    handle = moepatch.apply(model, ALL_FEATURES)
    assert router_cls.__dict__["forward"] is class_forward
    assert all(p.requires_grad for p in twin.parameters())
    assert all(not m._forward_hooks for m in twin.modules())
    assert moepatch.get_handle(twin) is None and moepatch.get_handle(model) is handle


def test_new_config_replaces_previous_patch(model):
    moepatch.apply(model, {"freeze_gate": "gate_substring"})
    handle = moepatch.apply(model, {"freeze_gate": "router"})
    frozen = {name for name, p in model.named_parameters() if not p.requires_grad}
    assert frozen == set(handle.frozen_parameters)
    pattern = router_parameter_pattern(model.config.model_type)
    assert frozen == {name for name, _ in model.named_parameters() if pattern.search(name)}


def test_explicit_config_is_written_to_model_config_and_restored(model):
    assert getattr(model.config, "moepatch", None) is None
    handle = moepatch.apply(model, {"freeze_gate": True})
    assert model.config.moepatch["freeze_gate"] == "router"
    handle.remove()
    assert getattr(model.config, "moepatch", None) is None


def test_reads_config_from_model_config(family):
    model = tiny.tiny_model(family, moepatch={"freeze_gate": True})
    handle = moepatch.apply(model)
    assert handle.config.freeze_gate == "router" and handle.frozen_parameters


def test_patched_context_manager(model):
    with moepatch.patched(model, {"freeze_gate": True}) as handle:
        assert handle.active and not all(p.requires_grad for p in model.parameters())
    assert all(p.requires_grad for p in model.parameters())


def _llama() -> torch.nn.Module:
    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2)
    return AutoModelForCausalLM.from_config(config)


def _gpt_oss() -> torch.nn.Module:
    config = GptOssConfig(vocab_size=64, hidden_size=32, intermediate_size=16, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2, head_dim=8, num_local_experts=4,
                          num_experts_per_tok=2)
    return AutoModelForCausalLM.from_config(config)


def test_unsupported_model_strict_raises_with_class_and_families():
    model = _llama()
    with pytest.raises(moepatch.UnsupportedModelError) as error:
        moepatch.apply(model, {"freeze_gate": True})
    message = str(error.value)
    assert type(model).__name__ in message and "qwen2_moe" in message and "mixtral" in message
    assert all(p.requires_grad for p in model.parameters())


def test_gpt_oss_router_is_frozen_with_its_bias():
    """gpt-oss (top-k of logits, then softmax over the k, a learned logit bias) is frozen like any router."""
    model = _gpt_oss()
    handle = moepatch.apply(model, {"freeze_gate": "router"})
    frozen = {name for name, p in model.named_parameters() if not p.requires_grad}
    assert frozen == set(handle.frozen_parameters) == {f"model.layers.{i}.mlp.router.{p}" for i in range(2)
                                                       for p in ("weight", "bias")}


def test_unsupported_model_non_strict_warns_and_returns_empty_handle():
    model = _llama()
    reference = [p.clone() for p in model.parameters()]
    with pytest.warns(moepatch.MoePatchWarning, match="not supported"):
        handle = moepatch.apply(model, {"freeze_gate": True}, strict=False)
    assert handle.is_empty and handle.moe_model is None
    assert all(p.requires_grad for p in model.parameters())
    assert all(torch.equal(a, b) for a, b in zip(reference, model.parameters(), strict=True))


def test_peft_wrapped_model_is_patched_through_the_wrapper(batch):
    peft = pytest.importorskip("peft")
    model = tiny.tiny_model("qwen2_moe")
    wrapped = peft.get_peft_model(model, peft.LoraConfig(r=2, target_modules=["q_proj", "v_proj"]))
    handle = moepatch.apply(wrapped, {"freeze_gate": "router", "routing_stats": True})
    assert all(name.startswith("base_model.model.") for name in handle.frozen_parameters)
    assert all(not p.requires_grad for n, p in wrapped.named_parameters() if n in handle.frozen_parameters)
    with torch.no_grad():
        wrapped(**batch)
    assert int(handle.recorder.tokens[0]) == int(batch["attention_mask"].sum())


ONE_FEATURE = {
    "freeze_gate": ({"freeze_gate": "router"}, "frozen=3"),
    "routing_stats": ({"routing_stats": True}, "routing_stats=True"),
    "c2r": ({"c2r": {"top_t": 2, "collaborative_list": [[[(e + 1 + i) % 8 for i in range(7)] + [e] for e in range(8)]]
                     * 4}}, "c2r_layers=3"),
    "lora_experts": ({"lora_experts": {"method": "molora", "num_experts": 2, "r": 2, "target_modules": ["q_proj"]}},
                     "lora_experts=4"),
}


@pytest.mark.parametrize("feature", sorted(ONE_FEATURE))
def test_handle_is_empty_and_repr_cover_every_feature(feature):
    """A handle with any one feature on is not empty, and its repr shows that feature (count from the model)."""
    model = tiny.tiny_model("qwen2_moe")  # 4 layers, MoE layers [0, 2, 3], 8 experts
    config, shown = ONE_FEATURE[feature]
    handle = moepatch.apply(model, config)
    assert not handle.is_empty
    assert shown in repr(handle)
    handle.remove()
    empty = moepatch.apply(model, {})
    assert empty.is_empty
    assert all(f"{name}=0" in repr(empty) for name in ("frozen", "c2r_layers", "lora_experts"))
    assert "routing_stats=False" in repr(empty)
