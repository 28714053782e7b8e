"""DBRX's experts: ``DbrxExperts`` holding a ``DbrxExpertGLU`` ``mlp`` whose ``w1`` / ``v1`` / ``w2`` stack every
expert's rows into ``[E·I, H]`` matrices (expert ``e`` owns rows ``e·I .. (e+1)·I``); ``forward(hidden, top_k_index,
top_k_weights)`` loops over the experts, computing ``act(x·w1ₑᵀ) · (x·v1ₑᵀ) · w2ₑ`` on the tokens each one received.

The adapter replaces ``DbrxExperts.forward`` on the instance with the same loop and the same operations, plus the
deltas of each expert's ``gate_proj`` (``w1``), ``up_proj`` (``v1``) and ``down_proj`` (``w2``) on exactly its rows,
with the rows' token indices.  Every expert is visited, also one that received no token (its deltas then run on
zero rows), so the autograd graph has the same shape on every rank (DeepSpeed ZeRO-1/2 gradient bucketing).
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


class _DbrxGLU(Protocol):
    """What the adapter reads from ``DbrxExpertGLU``: the row-stacked weights and the activation."""

    w1: torch.Tensor
    v1: torch.Tensor
    w2: torch.Tensor
    activation_fn: Callable[[torch.Tensor], torch.Tensor]


class _DbrxExperts(Protocol):
    """What the adapter reads from ``DbrxExperts`` (a typed view of the module; nothing is checked at run time)."""

    mlp: _DbrxGLU
    num_experts: int
    ffn_hidden_size: int
    hidden_size: int


class StackedRowExperts(ExpertStorage):
    """Row-stacked ``[E·I, H]`` expert weights inside the experts module's ``mlp``."""

    kind: ClassVar[str] = "stacked_rows"

    aliases: ClassVar[dict[str, tuple[str, ...]]] = {"gate_proj": ("gate_proj", "w1", "mlp.w1"),
                                                      "up_proj": ("up_proj", "v1", "mlp.v1"),
                                                      "down_proj": ("down_proj", "w2", "mlp.w2")}

    def widths(self, experts: nn.Module) -> dict[str, tuple[tuple[int, ...], tuple[int, ...]]] | None:
        mlp = getattr(experts, "mlp", None)
        if mlp is None or not all(isinstance(getattr(mlp, name, None), torch.Tensor) for name in ("w1", "v1", "w2")):
            return None
        dbrx = cast(_DbrxExperts, experts)
        count, inner, hidden = dbrx.num_experts, dbrx.ffn_hidden_size, dbrx.hidden_size
        if shape_of(mlp.w1) != (count * inner, hidden):
            return None
        return {"gate_proj": ((hidden,) * count, (inner,) * count), "up_proj": ((hidden,) * count, (inner,) * count),
                "down_proj": ((inner,) * count, (hidden,) * count)}

    def attach(self, module: nn.Module, deltas: Mapping[str, RoutedDeltas], projections: list[RoutedProjection],
               log: ChangeLog) -> None:
        self._store(module, deltas, log)
        log.set_attribute(module, "forward", types.MethodType(stacked_rows_forward, module))


    def expert_weight(self, module: nn.Module, projection: str, expert: int) -> torch.Tensor:
        dbrx = cast(_DbrxExperts, module)
        stacked = {"gate_proj": dbrx.mlp.w1, "up_proj": dbrx.mlp.v1, "down_proj": dbrx.mlp.w2}[projection]
        block = stacked.view(dbrx.num_experts, dbrx.ffn_hidden_size, dbrx.hidden_size)[expert]  # [I, H]
        return block.T if projection == "down_proj" else block  # w2 is applied as x·w2ₑ: [in, out] stored


def stacked_rows_forward(self: nn.Module, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                         top_k_weights: torch.Tensor) -> torch.Tensor:
    """``DbrxExperts.forward`` (transformers 5.24) with each expert's deltas added inside its GLU."""
    deltas = deltas_of(self)
    dbrx = cast(_DbrxExperts, self)
    batch_size = hidden_states.shape[0]
    hidden = hidden_states.reshape(-1, dbrx.hidden_size)
    next_states = torch.zeros_like(hidden, dtype=hidden.dtype, device=hidden.device)
    with torch.no_grad():
        expert_mask = torch.nn.functional.one_hot(top_k_index, num_classes=dbrx.num_experts + 1).permute(2, 1, 0)
    split = (-1, dbrx.ffn_hidden_size, dbrx.hidden_size)
    mlp = dbrx.mlp
    w1, v1, w2 = mlp.w1.view(split), mlp.v1.view(split), mlp.w2.view(split)
    gate_delta, up_delta, down_delta = deltas.get("gate_proj"), deltas.get("up_proj"), deltas.get("down_proj")
    for expert in range(dbrx.num_experts):
        with torch.no_grad():
            slot, token_idx = torch.where(expert_mask[expert])  # [rows]: the choice slot and token of each row
        x = hidden[token_idx]
        gate = x.matmul(w1[expert].T)
        up = x.matmul(v1[expert].T)
        if gate_delta is not None:
            gate = gate + gate_delta.grouped(x, tokens=token_idx, only=expert).to(gate.dtype)
        if up_delta is not None:
            up = up + up_delta.grouped(x, tokens=token_idx, only=expert).to(up.dtype)
        intermediate = mlp.activation_fn(gate) * up
        if down_delta is not None and down_delta.placement == "input":
            intermediate = down_delta.grouped(intermediate, tokens=token_idx, only=expert)
        states = intermediate.matmul(w2[expert])
        if down_delta is not None and down_delta.placement == "output":
            states = states + down_delta.grouped(intermediate, tokens=token_idx, only=expert).to(states.dtype)
        states = states.view(-1, dbrx.hidden_size) * top_k_weights[token_idx, slot, None]
        next_states.index_add_(0, token_idx, states)
    return next_states.view(batch_size, -1, dbrx.hidden_size)
