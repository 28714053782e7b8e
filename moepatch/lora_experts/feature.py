"""The ``lora_experts`` feature: LoRA / (IA)³ expert sets beside the model's projections."""

from __future__ import annotations

import re
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING
from typing import Any

import torch

from model_patches.structure import MoEModel
from moepatch.feature import Feature
from moepatch.feature import Installed
from moepatch.feature import Planned
from moepatch.lora_experts.config import LoraExpertsConfig
from moepatch.lora_experts.inject import LoraTarget
from moepatch.lora_experts.inject import install_lora_experts
from moepatch.lora_experts.inject import plan_lora_experts
from moepatch.lora_experts.inject import read_saved_lora_weights
from moepatch.validation import Problems

if TYPE_CHECKING:
    from moepatch.undo import UndoLog


@dataclass
class LoraExpertsPlan:
    """The projections to adapt and the saved expert weights to load (``None``: fresh experts)."""

    targets: list[LoraTarget]
    weights: dict[str, torch.Tensor] | None


def describe_targets(config: LoraExpertsConfig, targets: list[LoraTarget]) -> list[str]:
    """What ``lora_experts`` adapts, grouped by path pattern (the first layer index becomes ``*``)."""
    groups: dict[str, list[LoraTarget]] = defaultdict(list)
    for target in targets:
        groups[re.sub(r"\.(\d+)\.", ".*.", target.path, count=1)].append(target)
    lines = [f"lora_experts ({config.method}): {len(targets)} projections; base "
             f"{'trainable' if config.train_base else 'frozen'}"]
    for pattern, members in groups.items():
        counts = sorted({t.num_experts for t in members})
        ranks = sorted({r for t in members for r in t.ranks})
        top_k = sorted({t.top_k for t in members}, key=str)
        routed = members[0].storage not in ("linear", "identity")
        where = f"{len(members[0].in_dims)} routed experts each" if routed else members[0].storage
        lines.append(f"  {pattern}: {len(members)}x ({where}), experts {counts}, ranks {ranks or '-'}, "
                     f"top-k {top_k}, {members[0].placement}")
    return lines


class LoraExpertLayers(Feature):
    """``"lora_experts": {"method": "molora" | "mov" | "mola" | ..., ...}``."""

    name = "lora_experts"
    handle_attributes = {"lora_targets": []}
    off_summary = "lora_experts=0"

    def parse(self, data: Any, path: str, problems: Problems) -> LoraExpertsConfig | None:
        return LoraExpertsConfig.parse(data, path, problems)

    def to_dict(self, config: LoraExpertsConfig) -> dict[str, Any]:
        return config.to_dict()

    def plan(self, structure: MoEModel, config: LoraExpertsConfig, checkpoint: Path | None) -> Planned:
        targets = plan_lora_experts(structure, config, checkpoint, self.field_path())
        return Planned(config, LoraExpertsPlan(targets, read_saved_lora_weights(checkpoint, config)))

    def install(self, structure: MoEModel, planned: Planned, undo: UndoLog) -> Installed:
        plan: LoraExpertsPlan = planned.detail
        install_lora_experts(structure, plan.targets, planned.config, undo, plan.weights)
        paths = [target.path for target in plan.targets]
        return Installed({"lora_targets": paths}, len(paths), f"lora_experts={len(paths)}")

    def describe(self, planned: Planned) -> str:
        return "\n".join(describe_targets(planned.config, planned.detail.targets))


LORA_EXPERTS = LoraExpertLayers()
