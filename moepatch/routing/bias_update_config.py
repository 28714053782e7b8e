"""The ``bias_update`` entry of the moepatch block (:mod:`moepatch.routing.bias_update` runs it).

Kept apart from the feature so that :class:`~moepatch.config.MoePatchConfig` can name its type (``config.bias_update``)
without importing the feature's training machinery.
"""

from __future__ import annotations

from dataclasses import dataclass
from dataclasses import field
from typing import Any

from moepatch.schema import Schema
from moepatch.schema import describe
from moepatch.schema import layer_indices
from moepatch.schema import positive_number
from moepatch.validation import Problems


@dataclass
class BiasUpdateConfig:
    """``"bias_update": {"rate": γ, "layers": [...] | null}``: aux-loss-free balancing of the selection biases."""

    rate: float = field(
        metadata=describe("number > 0", "γ of b_i ← b_i + γ·sign(mean_load − load_i), applied after every step.",
                          check=positive_number,
                          missing="missing; the bias step per update, a positive number such as 0.001"))
    layers: list[int] | None = field(
        default=None,
        metadata=describe("list of layer indices | null", "Decoder-layer indices whose biases move (negative counts "
                                                          "from the last layer); null = every MoE layer.",
                          check=layer_indices(unique=False)))

    @classmethod
    def parse(cls, data: Any, path: str, problems: Problems) -> BiasUpdateConfig | None:
        """The config from the block value (``None`` / ``false``: off); every bad field goes to ``problems``."""
        if data is None or data is False:
            return None
        if not isinstance(data, dict):
            problems.add(path, f"expected an object such as {{\"rate\": 0.001}} or false, got "
                               f"{type(data).__name__} {data!r}")
            return None
        known_problems = len(problems.messages)
        values = BIAS_UPDATE_SCHEMA.parse(data, path, problems)
        if values is None or len(problems.messages) > known_problems:
            return None
        return cls(**values)

    def to_dict(self) -> dict[str, Any]:
        return {"rate": self.rate, "layers": None if self.layers is None else list(self.layers)}


BIAS_UPDATE_SCHEMA = Schema.of(BiasUpdateConfig)
"""The ``bias_update`` entry's fields."""
