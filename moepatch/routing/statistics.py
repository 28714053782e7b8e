"""The ``routing_stats`` feature: a :class:`~moepatch.routing.recorder.RoutingRecorder` running while the patch is
applied, built from the structure ``apply`` resolved."""

from __future__ import annotations

from dataclasses import dataclass
from dataclasses import field
from dataclasses import fields
from pathlib import Path
from typing import TYPE_CHECKING
from typing import Any

from model_patches.structure import MoEModel
from model_patches.structure import resolve_layer_indices
from moepatch.feature import Feature
from moepatch.feature import Installed
from moepatch.feature import Planned
from moepatch.routing.recorder import RoutingRecorder
from moepatch.validation import Problems
from moepatch.validation import is_int
from moepatch.validation import warn_unknown

if TYPE_CHECKING:
    from moepatch.undo import UndoLog


@dataclass
class RoutingStatsConfig:
    """Record routing statistics (hard top-k counts and router probability sums per layer and expert)."""

    enabled: bool = field(default=True, metadata={"help": "Record while the patch is applied."})
    layers: list[int] | None = field(
        default=None,
        metadata={
            "help": "Decoder-layer indices to record (negative counts from the last layer); null = every MoE layer."
        },
    )

    @classmethod
    def parse(cls, data: Any, path: str, problems: Problems) -> RoutingStatsConfig | None:
        if data is None or data is False:
            return None
        if data is True:
            return cls()
        if not isinstance(data, dict):
            problems.add(path, f"expected an object, true or false, got {type(data).__name__} {data!r}")
            return None
        warn_unknown(data, {f.name for f in fields(cls)}, path)
        result = cls()
        enabled = data.get("enabled", True)
        if not isinstance(enabled, bool):
            problems.add(f"{path}.enabled", f"expected true or false, got {enabled!r}")
        else:
            result.enabled = enabled
        layers = data.get("layers")
        if layers is not None:
            if not isinstance(layers, list):
                problems.add(f"{path}.layers", f"expected a list of layer indices or null, got {layers!r}")
            elif not layers:
                problems.add(f"{path}.layers", "empty list (use null for every MoE layer)")
            else:
                good = True
                for position, index in enumerate(layers):
                    if not is_int(index):
                        problems.add(f"{path}.layers[{position}]", f"expected an integer layer index, got {index!r}")
                        good = False
                if good and len(set(layers)) != len(layers):
                    duplicates = sorted({i for i in layers if layers.count(i) > 1})
                    problems.add(f"{path}.layers", f"duplicate layer indices {duplicates}")
                if good:
                    result.layers = list(layers)
        return result

    def to_dict(self) -> dict[str, Any]:
        return {"enabled": self.enabled, "layers": None if self.layers is None else list(self.layers)}


class RoutingStats(Feature):
    """``"routing_stats": {"layers": [...]}`` (or ``true``): count the experts each token goes to while applied."""

    name = "routing_stats"
    handle_attributes = {"recorder": None}
    off_summary = "routing_stats=False"

    def parse(self, data: Any, path: str, problems: Problems) -> RoutingStatsConfig | None:
        return RoutingStatsConfig.parse(data, path, problems)

    def to_dict(self, config: RoutingStatsConfig) -> dict[str, Any]:
        return config.to_dict()

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
