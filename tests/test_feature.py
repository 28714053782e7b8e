"""The Feature interface: one registration makes a feature part of the config, apply, the handle and inspect."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from helpers import logits_of

import moepatch
from model_patches.structure import MoEModel
from moepatch.config import MoePatchConfig
from moepatch.feature import _FEATURES
from moepatch.feature import Feature
from moepatch.feature import Installed
from moepatch.feature import Planned
from moepatch.feature import register_feature
from moepatch.feature import registered_features
from moepatch.patch import plan_patch
from moepatch.testing import tiny
from moepatch.undo import UndoLog
from moepatch.validation import Problems


class RouterScale(Feature):
    """A small real feature: multiply the chosen MoE layers' router weights by a factor (undone exactly)."""

    name = "router_scale"
    handle_attributes = {"scaled_routers": []}
    off_summary = "scaled=0"

    def parse(self, data: Any, path: str, problems: Problems) -> float | None:
        if data is None:
            return None
        if not isinstance(data, (int, float)) or isinstance(data, bool) or data <= 0:
            problems.add(path, f"expected a positive factor, got {data!r}")
            return None
        return float(data)

    def to_dict(self, config: float) -> float:
        return config

    def plan(self, structure: MoEModel, config: float, checkpoint: Path | None) -> Planned:
        return Planned(config, [layer.router for layer in structure.layers])

    def install(self, structure: MoEModel, planned: Planned, undo: UndoLog) -> Installed:
        for router in planned.detail:
            original = router.weight.detach().clone()
            with torch.no_grad():
                router.weight.mul_(planned.config)

            def restore(router: torch.nn.Module = router, original: torch.Tensor = original) -> None:
                with torch.no_grad():
                    router.weight.copy_(original)

            undo.add_callback(restore)
        return Installed({"scaled_routers": list(planned.detail)}, len(planned.detail),
                         f"scaled={len(planned.detail)}")

    def describe(self, planned: Planned) -> str:
        return f"router_scale={planned.config}: {len(planned.detail)} routers"


@pytest.fixture
def router_scale():
    feature = register_feature(RouterScale())
    yield feature
    _FEATURES.pop(feature.name)


def test_one_registration_reaches_config_apply_handle_and_inspect(router_scale, batch):
    model = tiny.tiny_model("qwen2_moe")  # MoE layers 0, 2, 3
    reference = logits_of(model, batch)
    config = MoePatchConfig.from_dict({"router_scale": 3.0, "freeze_gate": True})
    assert config.router_scale == 3.0 and not config.is_empty
    assert config.to_dict()["router_scale"] == 3.0
    assert MoePatchConfig.from_dict(config.to_dict()).same_features(config)
    with pytest.raises(ValueError, match=r"moepatch\.router_scale: expected a positive factor"):
        MoePatchConfig.from_dict({"router_scale": -1})

    plan = plan_patch(moepatch.describe(model), config)
    assert "router_scale=3.0: 3 routers" in plan.describe()

    handle = moepatch.apply(model, {"router_scale": 3.0})
    assert len(handle.scaled_routers) == 3 and not handle.is_empty and "scaled=3" in repr(handle)
    assert not torch.equal(logits_of(model, batch), reference)
    handle.remove()
    assert torch.equal(logits_of(model, batch), reference)

    empty = moepatch.apply(model, {})
    assert empty.scaled_routers == [] and "scaled=0" in repr(empty) and empty.is_empty
    empty.remove()


def test_features_install_in_registration_order_and_names_are_unique():
    names = [feature.name for feature in registered_features()]
    assert names == ["freeze_gate", "routing_stats", "c2r", "lora_experts", "bias_update"]
    with pytest.raises(ValueError, match="already registered"):
        register_feature(registered_features()[0])
    with pytest.raises(ValueError, match="field of the moepatch block"):

        class Family(RouterScale):
            name = "family"

        register_feature(Family())


def test_handle_attributes_of_off_features_are_fresh_per_handle():
    model = tiny.tiny_model("mixtral")
    handle = moepatch.apply(model, {})
    handle.frozen_parameters.append("x")  # a caller mutating the empty value must not leak into the next handle
    handle.remove()
    assert moepatch.apply(model, {}).frozen_parameters == []
