"""The ``routing_stats`` feature: a :class:`~moepatch.routing.recorder.RoutingRecorder` running while the patch is
applied, built from the structure ``apply`` resolved."""

from __future__ import annotations

from dataclasses import dataclass
from dataclasses import field
from pathlib import Path
from typing import TYPE_CHECKING
from typing import Any

from model_patches.structure import MoEModel
from model_patches.structure import resolve_layer_indices
from moepatch.feature import Feature
from moepatch.feature import Installed
from moepatch.feature import Planned
from moepatch.routing.recorder import RoutingRecorder
from moepatch.schema import ConfigEntry
from moepatch.schema import Schema
from moepatch.schema import boolean
from moepatch.schema import describe
from moepatch.schema import layer_indices
from moepatch.validation import Problems

if TYPE_CHECKING:
    from moepatch.undo import UndoLog


@dataclass
class RoutingStatsConfig:
    """Record routing statistics (hard top-k counts and router probability sums per layer and expert)."""

    enabled: bool = field(default=True, metadata=describe("bool", "Record while the patch is applied.",
                                                          check=boolean))
    layers: list[int] | None = field(
        default=None,
        metadata=describe("list of layer indices | null", "Decoder-layer indices to record (negative counts from the "
                                                          "last layer); null = every MoE layer.",
                          check=layer_indices(unique=True)))

    @classmethod
    def parse(cls, data: Any, path: str, problems: Problems) -> RoutingStatsConfig | None:
        """The config from the block value (``None`` / ``false``: off, ``true``: the defaults); every bad field goes
        to ``problems``."""
        if data is None or data is False:
            return None
        if data is True:
            return cls()
        if not isinstance(data, dict):
            problems.add(path, f"expected an object, true or false, got {type(data).__name__} {data!r}")
            return None
        return cls(**(ROUTING_STATS_SCHEMA.parse(data, path, problems) or {}))

    def to_dict(self) -> dict[str, Any]:
        return {"enabled": self.enabled, "layers": None if self.layers is None else list(self.layers)}


ROUTING_STATS_SCHEMA = Schema.of(RoutingStatsConfig)
"""The ``routing_stats`` entry's fields."""


class RoutingStats(Feature):
    """``"routing_stats": {"layers": [...]}`` (or ``true``): count the experts each token goes to while applied."""

    name = "routing_stats"
    handle_attributes = {"recorder": None}
    off_summary = "routing_stats=False"

    def parse(self, data: Any, path: str, problems: Problems) -> RoutingStatsConfig | None:
        return RoutingStatsConfig.parse(data, path, problems)

    def to_dict(self, config: RoutingStatsConfig) -> dict[str, Any]:
        return config.to_dict()

    def config_entry(self) -> ConfigEntry:
        return ConfigEntry(self.name, '{"enabled": bool, "layers": [...] | null} | true | false',
                           "Record routing statistics while applied (handle.recorder).", ROUTING_STATS_SCHEMA.fields)

    def enabled(self, config: RoutingStatsConfig | None) -> bool:
        return config is not None and config.enabled

    def plan(self, structure: MoEModel, config: RoutingStatsConfig, checkpoint: Path | None) -> Planned:
        layers = resolve_layer_indices(structure, config.layers, f"{self.field_path()}.layers") if config.enabled \
            else None
        return Planned(config, layers)

    def install(self, structure: MoEModel, planned: Planned, undo: UndoLog) -> Installed:
        if planned.detail is None:  # "enabled": false
            return Installed({"recorder": None}, 0, "routing_stats=False")
        recorder = RoutingRecorder(structure.root, planned.detail, structure=structure).start()
        undo.add_callback(recorder.stop)
        return Installed({"recorder": recorder}, len(planned.detail), "routing_stats=True")

    def describe(self, planned: Planned) -> str:
        if planned.detail is None:
            return "routing_stats: off (enabled: false)"
        return f"routing_stats: layers {planned.detail}"


ROUTING_STATS = RoutingStats()
