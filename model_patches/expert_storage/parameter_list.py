"""LLaMA-MoE's experts: ``LinearGLUExperts`` with one ``ParameterList`` entry per expert (``weight_gate``,
``weight_up``, ``weight_down``; experts may differ in width) and ``forward(x, i)`` for expert ``i``'s rows.

The adapter replaces ``forward`` on the instance with the same GLU expression plus expert ``i``'s deltas.  The
rows' token indices come from the calculator, which keeps them on the experts module as ``row_tokens`` (one tensor
per expert) before calling it.
"""

from __future__ import annotations

import types
from collections.abc import Callable
from collections.abc import Mapping
from typing import ClassVar
from typing import Protocol
from typing import cast

import torch
from torch import nn

from model_patches.expert_storage.base import ChangeLog
from model_patches.expert_storage.base import ExpertStorage
from model_patches.expert_storage.base import RoutedDeltas
from model_patches.expert_storage.base import RoutedProjection
from model_patches.expert_storage.base import deltas_of
from model_patches.expert_storage.base import shape_of


class _GLUExperts(Protocol):
    """What the adapter reads from ``LinearGLUExperts`` (a typed view of the module; nothing is checked at run time):
    ``[out, in]`` weights (and ``[out]`` biases, or ``None``) of each expert."""

    in_features: int
    out_features: int
    weight_gate: nn.ParameterList
    weight_up: nn.ParameterList
    weight_down: nn.ParameterList
    bias_gate: nn.ParameterList | None
    bias_up: nn.ParameterList | None
    bias_down: nn.ParameterList | None
    act_fn: Callable[[torch.Tensor], torch.Tensor]


class ParameterListExperts(ExpertStorage):
    """``weight_{gate,up,down}`` ``ParameterList``s of ``[out, in]`` tensors, one per expert."""

    kind: ClassVar[str] = "parameter_list"

    aliases: ClassVar[dict[str, tuple[str, ...]]] = {"gate_proj": ("gate_proj", "weight_gate"),
                                                      "up_proj": ("up_proj", "weight_up"),
                                                      "down_proj": ("down_proj", "weight_down")}

    def widths(self, experts: nn.Module) -> dict[str, tuple[tuple[int, ...], tuple[int, ...]]] | None:
        glu = cast(_GLUExperts, experts)
        sizes = tuple(shape_of(weight)[0] for weight in glu.weight_gate)  # experts may differ in width
        hidden, out = (glu.in_features,) * len(sizes), (glu.out_features,) * len(sizes)
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
    glu = cast(_GLUExperts, self)
    functional = nn.functional
    row_tokens = getattr(self, "row_tokens", None)
    tokens = row_tokens[i] if row_tokens is not None and len(row_tokens) > i else None
    gate = functional.linear(x, glu.weight_gate[i], glu.bias_gate[i] if glu.bias_gate is not None else None)
    up = functional.linear(x, glu.weight_up[i], glu.bias_up[i] if glu.bias_up is not None else None)
    if "gate_proj" in deltas:
        gate = gate + deltas["gate_proj"].grouped(x, tokens=tokens, only=i).to(gate.dtype)
    if "up_proj" in deltas:
        up = up + deltas["up_proj"].grouped(x, tokens=tokens, only=i).to(up.dtype)
    hidden = glu.act_fn(gate) * up
    down = deltas.get("down_proj")
    if down is not None and down.placement == "input":
        hidden = down.grouped(hidden, tokens=tokens, only=i)
    out = functional.linear(hidden, glu.weight_down[i], glu.bias_down[i] if glu.bias_down is not None else None)
    if down is not None and down.placement == "output":
        out = out + down.grouped(hidden, tokens=tokens, only=i).to(out.dtype)
    return out
