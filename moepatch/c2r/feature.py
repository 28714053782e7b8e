"""The ``c2r`` feature: collaboration-constrained routing from the block's ``c2r`` entry or, for the official C2R
checkpoints, from their top-level ``top_t`` / ``collaborative_list`` fields (the one place those are merged)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING
from typing import Any

from model_patches.structure import MoEModel
from moepatch.c2r.config import C2R_SCHEMA
from moepatch.c2r.config import C2RConfig
from moepatch.c2r.selection import install_c2r
from moepatch.c2r.selection import plan_c2r
from moepatch.feature import Feature
from moepatch.feature import Installed
from moepatch.feature import Planned
from moepatch.schema import ConfigEntry
from moepatch.validation import Problems

if TYPE_CHECKING:
    from moepatch.undo import UndoLog


class CollaborationConstrainedRouting(Feature):
    """``"c2r": {"top_t": T, "collaborative_list" | "path": ...}``; ``"c2r": false`` ignores official fields."""

    name = "c2r"
    handle_attributes = {"c2r_routers": []}
    off_summary = "c2r_layers=0"
    remembers_off = True

    def parse(self, data: Any, path: str, problems: Problems) -> C2RConfig | None:
        return C2RConfig.parse(data, path, problems)

    def to_dict(self, config: C2RConfig) -> dict[str, Any]:
        return config.to_dict()

    def config_entry(self) -> ConfigEntry:
        return ConfigEntry(self.name, '{"top_t": T, "collaborative_list": [...] | "path": file, "aux_loss": ...} | '
                                      'false (also ignores the official top-level top_t / collaborative_list)',
                           "Collaboration-constrained routing: the top-1 expert is free, the other k-1 come from its "
                           "top_t collaborators.", C2R_SCHEMA.fields)

    def adopt(self, model_config: Any) -> C2RConfig | None:
        return C2RConfig.from_official(model_config)

    def is_outside_block(self, config: C2RConfig) -> bool:
        return config.source == "official"

    def plan(self, structure: MoEModel, config: C2RConfig, checkpoint: Path | None) -> Planned:
        return Planned(config, plan_c2r(structure, config, checkpoint))

    def install(self, structure: MoEModel, planned: Planned, undo: UndoLog) -> Installed:
        routers = install_c2r(structure, planned.detail, undo)
        return Installed({"c2r_routers": routers}, len(routers), f"c2r_layers={len(routers)}")

    def describe(self, planned: Planned) -> str:
        plan = planned.detail
        where = "official top-level fields" if planned.config.source == "official" else self.field_path()
        return (f"c2r ({where}): top_t={plan.top_t} on MoE layers {sorted(plan.tables)}"
                + (f"; vanilla on {plan.vanilla_layers}" if plan.vanilla_layers else "")
                + f"; load-balancing loss on the {plan.aux_loss} choice")


C2R = CollaborationConstrainedRouting()
