"""LLaMA-MoE's experts: ``LinearGLUExperts`` with one ``ParameterList`` entry per expert (``weight_gate``,
``weight_up``, ``weight_down``; experts may differ in width) and ``forward(x, i)`` for expert ``i``'s rows.

The adapter replaces ``forward`` on the instance with the same GLU expression plus expert ``i``'s deltas.  The
rows' token indices come from the calculator, which keeps them on the experts module as ``row_tokens`` (one tensor
per expert) before calling it.
"""

from __future__ import annotations

import types
from collections.abc import Mapping
from typing import ClassVar

import torch
from torch import nn

from model_patches.expert_storage.base import ChangeLog
from model_patches.expert_storage.base import ExpertStorage
from model_patches.expert_storage.base import RoutedDeltas
from model_patches.expert_storage.base import RoutedProjection
from model_patches.expert_storage.base import deltas_of
from model_patches.expert_storage.base import shape_of


class ParameterListExperts(ExpertStorage):
    """``weight_{gate,up,down}`` ``ParameterList``s of ``[out, in]`` tensors, one per expert."""

    kind: ClassVar[str] = "parameter_list"

    aliases: ClassVar[dict[str, tuple[str, ...]]] = {"gate_proj": ("gate_proj", "weight_gate"),
                                                      "up_proj": ("up_proj", "weight_up"),
                                                      "down_proj": ("down_proj", "weight_down")}

    def widths(self, experts: nn.Module) -> dict[str, tuple[tuple[int, ...], tuple[int, ...]]] | None:
        sizes = tuple(shape_of(weight)[0] for weight in experts.weight_gate)  # experts may differ in width
        hidden, out = (experts.in_features,) * len(sizes), (experts.out_features,) * len(sizes)
        return {"gate_proj": (hidden, sizes), "up_proj": (hidden, sizes), "down_proj": (sizes, out)}

    def attach(self, module: nn.Module, deltas: Mapping[str, RoutedDeltas], projections: list[RoutedProjection],
               log: ChangeLog) -> None:
        self._store(module, deltas, log)
        log.set_attribute(module, "forward", types.MethodType(glu_forward, module))


    def expert_weight(self, module: nn.Module, projection: str, expert: int) -> torch.Tensor:
        return getattr(module, _LISTS[projection])[expert]  # [out, in]


_LISTS = {"gate_proj": "weight_gate", "up_proj": "weight_up", "down_proj": "weight_down"}


def glu_forward(self: nn.Module, x: torch.Tensor, i: int) -> torch.Tensor:
    """``LinearGLUExperts.forward(x, i)`` plus expert ``i``'s deltas."""
    deltas = deltas_of(self)
    functional = nn.functional
    row_tokens = getattr(self, "row_tokens", None)
    tokens = row_tokens[i] if row_tokens is not None and len(row_tokens) > i else None
    gate = functional.linear(x, self.weight_gate[i], self.bias_gate[i] if self.bias_gate is not None else None)
    up = functional.linear(x, self.weight_up[i], self.bias_up[i] if self.bias_up is not None else None)
    if "gate_proj" in deltas:
        gate = gate + deltas["gate_proj"].grouped(x, tokens=tokens, only=i).to(gate.dtype)
    if "up_proj" in deltas:
        up = up + deltas["up_proj"].grouped(x, tokens=tokens, only=i).to(up.dtype)
    hidden = self.act_fn(gate) * up
    down = deltas.get("down_proj")
    if down is not None and down.placement == "input":
        hidden = down.grouped(hidden, tokens=tokens, only=i)
    out = functional.linear(hidden, self.weight_down[i], self.bias_down[i] if self.bias_down is not None else None)
    if down is not None and down.placement == "output":
        out = out + down.grouped(hidden, tokens=tokens, only=i).to(out.dtype)
    return out
