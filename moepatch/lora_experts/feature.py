"""The ``lora_experts`` feature: LoRA / (IA)³ expert sets beside the model's projections."""

from __future__ import annotations

import re
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING
from typing import Any

import torch
from safetensors.torch import load_file

from model_patches.structure import MoEModel
from moepatch.feature import Feature
from moepatch.feature import Installed
from moepatch.feature import Planned
from moepatch.lora_experts import save_lora_experts
from moepatch.lora_experts.config import LORA_EXPERTS_SCHEMA
from moepatch.lora_experts.config import WEIGHTS_NAME
from moepatch.lora_experts.config import LoraExpertsConfig
from moepatch.lora_experts.inject import GROUPS
from moepatch.lora_experts.inject import LoraTarget
from moepatch.lora_experts.inject import base_parameter_count
from moepatch.lora_experts.inject import expert_parameter_count
from moepatch.lora_experts.inject import install_lora_experts
from moepatch.lora_experts.inject import load_lora_weights
from moepatch.lora_experts.inject import lora_state_dict
from moepatch.lora_experts.inject import plan_lora_experts
from moepatch.lora_experts.inject import read_saved_lora_weights
from moepatch.schema import ConfigEntry
from moepatch.validation import Problems

if TYPE_CHECKING:
    from moepatch.undo import UndoLog


@dataclass
class LoraExpertsPlan:
    """The projections to adapt, the saved expert weights to load (``None``: fresh experts) and the model's own
    parameter count (the denominator of the share the apply log and ``inspect`` report)."""

    targets: list[LoraTarget]
    weights: dict[str, torch.Tensor] | None
    model_parameters: int = 0


def parameters_by_group(config: LoraExpertsConfig, targets: list[LoraTarget]) -> dict[str, int]:
    """LoRA-expert parameters per target group (attention and other, dense MLPs, shared experts, routers, routed
    experts), in :data:`GROUPS` order, groups without targets left out."""
    counts = dict.fromkeys(GROUPS, 0)
    for target in targets:
        counts[target.group] += expert_parameter_count(config, target)
    return {group: count for group, count in counts.items() if count}


def summary_line(config: LoraExpertsConfig, targets: list[LoraTarget], model_parameters: int) -> str:
    """The apply log's line: what is trained, how much of it sits where, and its share of the model — so a default
    that puts most parameters into routed experts is seen before training starts."""
    groups = parameters_by_group(config, targets)
    total = sum(groups.values())
    share = f" = {100 * total / model_parameters:.3g}% of the model's {model_parameters:,}" if model_parameters else ""
    kind = "trainable, base trainable too" if config.train_base else "trainable, base frozen"
    return (f"lora_experts ({config.method}): {len(targets)} projections; {total:,} LoRA-expert parameters ({kind})"
            f"{share}: " + "; ".join(f"{group} {count:,}" for group, count in groups.items()))


def describe_targets(config: LoraExpertsConfig, targets: list[LoraTarget], model_parameters: int = 0) -> list[str]:
    """The summary line, then what ``lora_experts`` adapts grouped by path pattern (the first layer index becomes
    ``*``) with the parameters of each pattern."""
    groups: dict[str, list[LoraTarget]] = defaultdict(list)
    for target in targets:
        groups[re.sub(r"\.(\d+)\.", ".*.", target.path, count=1)].append(target)
    lines = [summary_line(config, targets, model_parameters)]
    for pattern, members in groups.items():
        counts = sorted({t.num_experts for t in members})
        ranks = sorted({r for t in members for r in t.ranks})
        top_k = sorted({t.top_k for t in members}, key=str)
        routed = members[0].storage not in ("linear", "identity")
        where = f"{len(members[0].in_dims)} routed experts each" if routed else members[0].storage
        parameters = sum(expert_parameter_count(config, t) for t in members)
        lines.append(f"  {pattern}: {len(members)}x ({where}), experts {counts}, ranks {ranks or '-'}, "
                     f"top-k {top_k}, {members[0].placement}, {parameters:,} parameters")
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

    def config_entry(self) -> ConfigEntry:
        return ConfigEntry(self.name, '{"method": "molora" | "mov" | "mola", ...} | false',
                           "LoRA-expert layers (MoLoRA, MoV, MoLA, GuiLoMo allocations); defaults follow the method.",
                           LORA_EXPERTS_SCHEMA.fields)

    def plan(self, structure: MoEModel, config: LoraExpertsConfig, checkpoint: Path | None) -> Planned:
        targets = plan_lora_experts(structure, config, checkpoint, self.field_path())
        return Planned(config, LoraExpertsPlan(targets, read_saved_lora_weights(checkpoint, config),
                                               base_parameter_count(structure.inner)))

    def install(self, structure: MoEModel, planned: Planned, undo: UndoLog) -> Installed:
        plan: LoraExpertsPlan = planned.detail
        install_lora_experts(structure, plan.targets, planned.config, undo, plan.weights)
        paths = [target.path for target in plan.targets]
        return Installed({"lora_targets": paths}, len(paths), f"lora_experts={len(paths)}")

    def describe(self, planned: Planned) -> str:
        plan: LoraExpertsPlan = planned.detail
        return "\n".join(describe_targets(planned.config, plan.targets, plan.model_parameters))

    def state_keys(self, model: torch.nn.Module) -> set[str]:
        return set(lora_state_dict(model))

    def save_state(self, model: torch.nn.Module, folder: Path) -> list[Path]:
        """``lora_experts.safetensors`` (every process's routed-expert sets gathered under expert parallelism)."""
        if not self.state_keys(model):
            return []

        return [save_lora_experts(model, folder)]

    def load_state(self, model: torch.nn.Module, folder: Path) -> list[Path]:
        if not self.state_keys(model):
            return []

        file = folder / WEIGHTS_NAME
        if not file.is_file():
            raise ValueError(f"{file} missing: the model carries LoRA experts, and their weights are kept there")
        load_lora_weights(model, load_file(str(file)))
        return [file]


LORA_EXPERTS = LoraExpertLayers()
