"""The declarative config schema: every feature's declared fields parse their own defaults, the generic parser reports
every problem of a block in one go with its path, ``moepatch inspect --help-config`` prints every field, and the
built-in features are reachable as typed attributes of the config and of the handle."""

from __future__ import annotations

import typing
from dataclasses import dataclass
from dataclasses import field

import pytest

import moepatch
from moepatch.c2r.config import C2RConfig
from moepatch.cli import main
from moepatch.config import FeatureConfig
from moepatch.config import MoePatchConfig
from moepatch.feature import registered_features
from moepatch.lora_experts.config import METHODS
from moepatch.lora_experts.config import LoraExpertsConfig
from moepatch.patch import PatchHandle
from moepatch.routing.bias_update import BiasUpdateConfig
from moepatch.routing.freeze import FreezeRule
from moepatch.routing.recorder import RoutingRecorder
from moepatch.routing.statistics import RoutingStatsConfig
from moepatch.schema import REQUIRED
from moepatch.schema import Schema
from moepatch.schema import boolean
from moepatch.schema import describe
from moepatch.schema import integer
from moepatch.schema import layer_indices
from moepatch.schema import probability
from moepatch.testing import tiny
from moepatch.validation import Problems

REQUIRED_VALUES = {("c2r", "top_t"): 2, ("c2r", "path"): "collaboration.json", ("bias_update", "rate"): 0.001,
                   ("lora_experts", "method"): "molora"}
"""A valid value for each field without a default (and C2R's path: it needs a list or a path)."""


def _declared_defaults(name: str, method: str | None = None) -> dict[str, object]:
    """The block entry that spells out every declared field at its default (under ``method``)."""
    entry = next(feature for feature in registered_features() if feature.name == name).config_entry()
    block = {}
    for item in entry.fields:
        value = item.default_for(method)
        if item.default is REQUIRED or (name, item.name) in REQUIRED_VALUES:
            value = method if item.name == "method" else REQUIRED_VALUES[(name, item.name)]
        if item.methods is not None and method not in item.methods:
            continue  # a field of other methods: absent, as a user writes it
        block[item.name] = value
    if block.get("top_k", 1) is None:
        del block["renormalize"]  # only top-k routing is renormalised (a check across fields)
    return block


def _parse(name: str, block: object) -> tuple[object, list[str]]:
    problems = Problems()
    feature = next(feature for feature in registered_features() if feature.name == name)
    return feature.parse(block, f"moepatch.{name}", problems), problems.messages


@pytest.mark.parametrize("name", ["routing_stats", "c2r", "bias_update"])
def test_every_feature_parses_its_declared_defaults(name: str):
    config, problems = _parse(name, _declared_defaults(name))
    assert problems == [] and config is not None
    again, problems = _parse(name, config.to_dict())
    assert problems == [] and again == config


@pytest.mark.parametrize("method", METHODS)
def test_lora_experts_parse_each_method_s_declared_defaults(method: str):
    spelled, problems = _parse("lora_experts", _declared_defaults("lora_experts", method))
    assert problems == []
    implied, problems = _parse("lora_experts", {"method": method})
    assert problems == []
    assert isinstance(spelled, LoraExpertsConfig) and isinstance(implied, LoraExpertsConfig)
    implied.default_targets = False  # the one difference: target_modules was given
    assert spelled == implied
    assert _parse("lora_experts", implied.to_dict())[0] == implied


def test_every_registered_feature_describes_its_entry():
    for feature in registered_features():
        entry = feature.config_entry()
        assert entry.name == feature.name and entry.forms and entry.help
        for item in entry.fields:
            assert item.name and item.kind and item.help, f"{feature.name}.{item.name}"


@dataclass
class _Example:
    """A config with one field of each kind of check."""

    count: int = field(metadata=describe("integer", "A count.", check=integer))
    mode: str = field(default="a", metadata=describe("string", "A mode.", choices=("a", "b")))
    flag: bool = field(default=False, metadata=describe("bool", "A flag.", check=boolean))
    rate: float = field(default=0.0, metadata=describe("number in [0, 1)", "A rate.", check=probability))
    layers: list[int] | None = field(default=None, metadata=describe("layers", "Layers.",
                                                                     check=layer_indices(unique=True)))
    extra: str = "not a key of the block"


def test_the_generic_parser_reports_every_problem_with_its_path_in_one_go():
    problems = Problems()
    with pytest.warns(moepatch.MoePatchWarning, match=r"block\.surprise: unknown key"):
        values = Schema.of(_Example).parse({"mode": "c", "flag": "yes", "rate": 1.5, "layers": [0, "x", 0],
                                            "surprise": 1}, "block", problems)
    assert problems.messages == [
        "block.count: expected an integer, got None",
        "block.mode: expected one of ('a', 'b'), got 'c'",
        "block.flag: expected true or false, got 'yes'",
        "block.rate: expected a probability below 1, got 1.5",
        "block.layers[1]: expected an integer layer index, got 'x'",
    ]
    assert values is not None and set(values) == {"count", "mode", "flag", "rate", "layers"}
    with pytest.raises(ValueError, match="block.count.*block.mode.*block.flag.*block.rate.*block.layers"):
        problems.raise_if_any()


def test_a_whole_block_reports_every_bad_field_of_every_feature():
    block = {"routing_stats": {"enabled": 1, "layers": [0, 0]}, "c2r": {"top_t": "2", "path": 3},
             "lora_experts": {"method": "mola", "dropout": 2, "alpha": -1, "top_k": None, "router_input": "hidden"},
             "bias_update": {"layers": []}}
    with pytest.raises(ValueError) as error:
        MoePatchConfig.from_dict(block)
    for path in ("moepatch.routing_stats.enabled", "moepatch.routing_stats.layers: duplicate", "moepatch.c2r.top_t",
                 "moepatch.c2r.path", "moepatch.lora_experts.dropout: expected a probability below 1, got 2.0",
                 "moepatch.lora_experts.alpha", "moepatch.lora_experts.top_k: MoLA routes top-k",
                 "moepatch.lora_experts.router_input: only MoV", "moepatch.bias_update.rate: missing",
                 "moepatch.bias_update.layers: empty list"):
        assert path in str(error.value)


def test_a_bad_method_stops_the_walk_with_one_message():
    config, problems = _parse("lora_experts", {"method": "moe", "alpha": "x"})
    assert config is None
    assert problems == [f"moepatch.lora_experts.method: expected one of {METHODS}, got 'moe'"]


def test_per_method_defaults_live_in_one_table():
    from moepatch.lora_experts.config import LORA_EXPERTS_SCHEMA
    from moepatch.lora_experts.config import METHOD_DEFAULTS

    for method, defaults in METHOD_DEFAULTS.items():
        for name, value in defaults.items():
            assert LORA_EXPERTS_SCHEMA.field(name).default_for(method) == value
    assert LORA_EXPERTS_SCHEMA.field("r").default_for("molora") == 4
    assert LORA_EXPERTS_SCHEMA.field("r").default_for("mola") == 8  # the declared default


def test_inspect_help_config_names_every_feature_and_field(capsys: pytest.CaptureFixture[str]):
    assert main(["inspect", "--help-config"]) == 0
    text = capsys.readouterr().out
    for entry in moepatch.config_schema():
        assert f"{entry.name}: " in text
        for item in entry.fields:
            assert f"{entry.name}.{item.name}  (" in text
    assert "lora_experts.r  (" in text and "molora: 4" in text  # a per-method default


def test_inspect_without_a_path_names_the_argument(capsys: pytest.CaptureFixture[str]):
    assert main(["inspect"]) == 2
    assert "path" in capsys.readouterr().err


def test_config_schema_lists_the_features_then_the_block_s_own_fields():
    names = [entry.name for entry in moepatch.config_schema()]
    own_fields = ["family", "ep_implementation", "moepatch_version"]
    assert names == [*(feature.name for feature in registered_features()), *own_fields]


def test_typed_feature_attributes_of_the_config():
    config = MoePatchConfig.from_dict({"freeze_gate": True, "routing_stats": {"layers": [-1]},
                                       "c2r": {"top_t": 2, "path": "list.json"},
                                       "lora_experts": {"method": "mov"}, "bias_update": {"rate": 0.01}})
    assert isinstance(config.freeze_gate, FreezeRule)
    assert isinstance(config.routing_stats, RoutingStatsConfig)
    assert isinstance(config.c2r, C2RConfig)
    assert isinstance(config.lora_experts, LoraExpertsConfig)
    assert isinstance(config.bias_update, BiasUpdateConfig)
    assert isinstance(MoePatchConfig.c2r, FeatureConfig)
    config.c2r = None  # assigning writes the feature table, as before
    assert "c2r" not in config.features and config.c2r is None
    config.freeze_gate = FreezeRule.GATE_SUBSTRING
    assert config.features["freeze_gate"] is FreezeRule.GATE_SUBSTRING
    assert config.lora_experts is config.features["lora_experts"]
    with pytest.raises(AttributeError, match="no_such_feature"):
        _ = config.no_such_feature  # a feature registered elsewhere is reached by __getattr__ (tests/test_feature.py)


def test_typed_parts_and_configs_of_the_handle():
    model = tiny.tiny_model("qwen2_moe")
    handle = moepatch.apply(model, {"freeze_gate": True, "routing_stats": True,
                                    "lora_experts": {"method": "molora", "num_experts": 2, "r": 2,
                                                     "target_modules": ["q_proj"]}})
    try:
        assert isinstance(handle.recorder, RoutingRecorder)  # untyped: reached by __getattr__
        assert handle.frozen_parameters and all(isinstance(name, str) for name in handle.frozen_parameters)
        assert handle.lora_targets and handle.c2r_routers == [] and handle.bias_updater is None
        assert handle.freeze_gate == "router" and isinstance(handle.routing_stats, RoutingStatsConfig)
        assert isinstance(handle.lora_experts, LoraExpertsConfig) and handle.c2r is None
        assert handle.bias_update is None
    finally:
        handle.remove()


def test_the_typed_attributes_are_visible_to_type_checkers():
    """mypy reads these annotations: the handle's properties and the config's descriptors name each feature's type."""
    returns = {name: getattr(PatchHandle, name).fget.__annotations__["return"]
               for name in ("c2r", "lora_experts", "bias_updater", "frozen_parameters")}
    assert returns == {"c2r": "C2RConfig | None",
                       "lora_experts": "LoraExpertsConfig | None", "bias_updater": "BiasUpdater | None",
                       "frozen_parameters": "list[str]"}
    assert typing.get_args(MoePatchConfig.__dict__["c2r"].__orig_class__) == (C2RConfig,)
