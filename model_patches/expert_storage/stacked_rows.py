"""DBRX's experts: ``w1`` / ``v1`` / ``w2`` of all experts stacked as rows of ``[E·I, H]`` matrices inside one
``DbrxExpertGLU`` module, with no per-expert computation a delta could join.  Listed so that a target reaching
them is refused by name (attention and other linear projections of the family can still be adapted)."""

from __future__ import annotations

from typing import ClassVar

from model_patches.expert_storage.base import ExpertStorage
from model_patches.expert_storage.base import RoutedProjection
from model_patches.expert_storage.base import module_names
from model_patches.structure import MoEModel

_ALIASES = {"gate_proj": ("gate_proj", "w1"), "up_proj": ("up_proj", "v1"), "down_proj": ("down_proj", "w2")}


class StackedRowExperts(ExpertStorage):
    """Row-stacked expert weights: recognised, never adapted."""

    kind: ClassVar[str] = "stacked_rows"

    def projections(self, moe: MoEModel) -> list[RoutedProjection]:
        names = module_names(moe.inner)
        found = []
        for layer in moe.layers:
            base = names[id(layer.experts)]
            children = [base] + [f"{base}.{child}" for child, _ in layer.experts.named_children()]
            for projection, aliases in _ALIASES.items():
                found.append(RoutedProjection(f"{base}.{projection}", layer.experts, projection, (), (),
                                              tuple(f"{owner}.{alias}" for owner in children for alias in aliases)))
        return found

    def problem(self, projection: RoutedProjection) -> str | None:
        return ("this family stores its routed experts as rows stacked into [E·I, H] matrices, which LoRA experts "
                "cannot adapt (target attention or other linear projections instead)")
