"""The config.json "moepatch" block: validation before any change, forward compatibility, save/load round trip."""

from __future__ import annotations

import json
import warnings

import pytest
import torch
from helpers import logits_of
from helpers import model_state as _state
from transformers import AutoConfig
from transformers import AutoModelForCausalLM

import moepatch
from moepatch.config import MoePatchConfig
from moepatch.testing import tiny

# (config block, field the error must name) — each applied to a tiny Qwen2-MoE (4 layers, layer 1 dense).
BAD_INPUTS = [
    (["freeze_gate"], "moepatch: expected an object"),
    ({"freeze_gate": "yes"}, "moepatch.freeze_gate"),
    ({"freeze_gate": 1}, "moepatch.freeze_gate"),
    ({"freeze_gate": ["router"]}, "moepatch.freeze_gate"),
    ({"family": "deepseek_v9"}, "moepatch.family"),
    ({"family": 3}, "moepatch.family"),
    ({"family": "mixtral"}, "cannot patch Qwen2MoeForCausalLM"),  # wrong family forced on this model
    ({"routing_stats": "all"}, "moepatch.routing_stats"),
    ({"routing_stats": {"enabled": "true"}}, "moepatch.routing_stats.enabled"),
    ({"routing_stats": {"layers": 2}}, "moepatch.routing_stats.layers"),
    ({"routing_stats": {"layers": []}}, "moepatch.routing_stats.layers"),
    ({"routing_stats": {"layers": [0, 1.5]}}, r"moepatch.routing_stats.layers\[1\]"),
    ({"routing_stats": {"layers": [True]}}, r"moepatch.routing_stats.layers\[0\]"),
    ({"routing_stats": {"layers": [0, 0]}}, "moepatch.routing_stats.layers: duplicate"),
    ({"routing_stats": {"layers": [-5]}}, r"moepatch.routing_stats.layers\[0\]: layer -5 does not exist"),
    ({"routing_stats": {"layers": [0, 7]}}, r"moepatch.routing_stats.layers\[1\]: layer 7 does not exist"),
    ({"routing_stats": {"layers": [1]}}, r"moepatch.routing_stats.layers\[0\]: layer 1 is a dense layer"),
    ({"moepatch_version": 1.0}, "moepatch.moepatch_version"),
    # a bad field next to good ones: nothing is applied, not even the good part
    ({"freeze_gate": True, "routing_stats": {"layers": [9]}}, "layer 9 does not exist"),
]


@pytest.mark.parametrize(("block", "names"), BAD_INPUTS, ids=[str(b) for b, _ in BAD_INPUTS])
def test_bad_input_raises_value_error_naming_the_field_and_leaves_model_untouched(block, names, batch):
    model = tiny.tiny_model("qwen2_moe")
    before, reference = _state(model), logits_of(model, batch)
    with pytest.raises(ValueError, match=names):
        moepatch.apply(model, block)
    assert _state(model) == before
    assert torch.equal(logits_of(model, batch), reference)


def test_bad_input_in_model_config_is_reported_too():
    model = tiny.tiny_model("qwen2_moe")
    model.config.moepatch = {"freeze_gate": "sometimes", "routing_stats": {"layers": "last"}}
    with pytest.raises(ValueError) as error:
        moepatch.apply(model)
    assert "moepatch.freeze_gate" in str(error.value) and "moepatch.routing_stats.layers" in str(error.value)


def test_unknown_keys_warn_and_are_ignored():
    with pytest.warns(moepatch.MoePatchWarning, match=r"moepatch\.c2r_future_knob: unknown key"):
        config = MoePatchConfig.from_dict({"freeze_gate": True, "c2r_future_knob": 1})
    assert config.freeze_gate == "router"
    with pytest.warns(moepatch.MoePatchWarning, match=r"moepatch\.routing_stats\.bins: unknown key"):
        MoePatchConfig.from_dict({"routing_stats": {"bins": 3}})


@pytest.mark.parametrize(
    ("raw", "freeze", "stats"),
    [
        ({"freeze_gate": True}, "router", None),
        ({"freeze_gate": False}, None, None),
        ({"freeze_gate": "gate_substring"}, "gate_substring", None),
        ({"routing_stats": True}, None, (True, None)),
        ({"routing_stats": {"layers": [-1]}}, None, (True, [-1])),
        ({"routing_stats": {"enabled": False}}, None, (False, None)),
    ],
)
def test_valid_forms_normalise(raw, freeze, stats):
    config = MoePatchConfig.from_dict(raw)
    assert config.freeze_gate == freeze
    got = None if config.routing_stats is None else (config.routing_stats.enabled, config.routing_stats.layers)
    assert got == stats
    again = MoePatchConfig.from_dict(config.to_dict())
    assert again.same_features(config)


def test_disabled_routing_stats_is_empty():
    assert MoePatchConfig.from_dict({"routing_stats": {"enabled": False}}).is_empty


def test_round_trip_through_save_pretrained_and_from_pretrained(family, tmp_path, batch):
    block = {"freeze_gate": "gate_substring", "routing_stats": {"layers": [-1]}}
    model = tiny.tiny_model(family)
    handle = moepatch.apply(model, block)
    with torch.no_grad():
        model(**batch)
    model.save_pretrained(tmp_path)

    saved = json.loads((tmp_path / "config.json").read_text())["moepatch"]
    assert MoePatchConfig.from_dict(saved).same_features(MoePatchConfig.from_dict(block))
    assert AutoConfig.from_pretrained(tmp_path).moepatch == saved

    with warnings.catch_warnings():
        warnings.simplefilter("error", moepatch.MoePatchWarning)
        loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
        reloaded = moepatch.apply(loaded)
    assert reloaded.frozen_parameters == handle.frozen_parameters
    assert reloaded.recorder.layers == handle.recorder.layers
    with torch.no_grad():
        loaded(**batch)
    assert torch.equal(reloaded.recorder.counts, handle.recorder.counts)
    torch.testing.assert_close(reloaded.recorder.prob_sums, handle.recorder.prob_sums, atol=1e-9, rtol=0)
    assert torch.equal(logits_of(loaded, batch), logits_of(model, batch))


def test_a_config_object_given_to_apply_is_not_mutated():
    model = tiny.tiny_model("qwen2_moe")
    model.config.top_t, model.config.collaborative_list = 3, tiny.random_collaborative_list(4, 8, 0)
    given = MoePatchConfig.from_dict({"freeze_gate": True})
    handle = moepatch.apply(model, given)
    assert handle.config.c2r is not None and given.c2r is None
    with pytest.warns(moepatch.MoePatchWarning, match="c2r_off: unknown key"):
        MoePatchConfig.from_dict({"c2r_off": True})
