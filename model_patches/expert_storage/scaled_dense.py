"""Experts that run every expert on every token, the router's choice only scaling their inputs (Llama 4's
``Llama4TextExperts``): ``gate_up_proj [E, H, 2I]`` (gate half, then up half) and ``down_proj [E, I, H]``, applied by
two batched products to ``routed_in [E·T, H]``, where rows ``e·T .. (e+1)·T`` are every token scaled by its routing
weight for expert ``e`` — exactly zero for the ``E - k`` experts the router did not choose.

The adapter replaces ``forward`` on the instance with the same operations (``bmm``, ``chunk``, ``up · act(gate)``,
``bmm``) plus each expert's deltas on the rows the router sent it: the ``k`` rows of each token that are not zero
(their scaled hidden states are what the projection receives), found with a fixed-size top-k over the rows'
magnitudes — no host synchronisation.  A row the router did not send is zero, and so is every delta of it (a LoRA
delta and a MoV scale are linear in the row), so leaving those rows out changes no output; it keeps them out of the
LoRA-expert routers' balance loss, which counts the tokens each routed expert really processed.  The deltas are
scattered back into the dense rows with ``index_add`` (``index_copy`` for MoV's scaled input), which adds exactly
zero for fresh deltas: the output is bit-identical.
"""

from __future__ import annotations

import dataclasses
import types
from collections.abc import Callable
from collections.abc import Mapping
from typing import ClassVar
from typing import Protocol
from typing import cast

import torch
from torch import nn

from model_patches.expert_storage.base import ChangeLog
from model_patches.expert_storage.base import RoutedDeltas
from model_patches.expert_storage.base import RoutedProjection
from model_patches.expert_storage.base import RowGroups
from model_patches.expert_storage.base import deltas_of
from model_patches.expert_storage.base import shape_of
from model_patches.expert_storage.fused import FusedExperts
from model_patches.expert_storage.fused import FusedLayout
from model_patches.expert_storage.fused import input_delta
from model_patches.structure import MoEModel

TOP_K = "_routed_deltas_top_k"
"""Attribute of an adapted experts module: how many of each token's rows the router sent (the model's top-k)."""
LAYOUT = FusedLayout(gated=True, transposed=True, concatenated=True)


class _Llama4Experts(Protocol):
    """What the adapter reads from ``Llama4TextExperts`` (a typed view of the module; nothing is checked at run
    time)."""

    gate_up_proj: torch.Tensor
    down_proj: torch.Tensor
    act_fn: Callable[[torch.Tensor], torch.Tensor]


class ScaledDenseExperts(FusedExperts):
    """Every expert on every token, inputs pre-scaled by the router's dense weights; projections ``gate_proj`` /
    ``up_proj`` (the halves of ``gate_up_proj``) and ``down_proj``."""

    kind: ClassVar[str] = "scaled_dense"

    def layout(self, experts: nn.Module) -> FusedLayout:
        """Always :data:`LAYOUT`: the class carries no layout flags, its ``forward`` fixes the layout."""
        return LAYOUT

    def projections(self, moe: MoEModel) -> list[RoutedProjection]:
        return [dataclasses.replace(projection, top_k=moe.top_k) for projection in super().projections(moe)]

    def problem(self, projection: RoutedProjection) -> str | None:
        experts = projection.module
        for attribute in ("gate_up_proj", "down_proj", "act_fn"):
            if not hasattr(experts, attribute):
                return f"{type(experts).__name__} has no {attribute}"
        llama4 = cast(_Llama4Experts, experts)
        if projection.top_k is None or not 1 <= projection.top_k <= shape_of(llama4.gate_up_proj)[0]:
            return f"{type(experts).__name__}: the model's top-k ({projection.top_k}) does not fit its experts"
        return self.shape_problem(experts, LAYOUT)

    def attach(self, module: nn.Module, deltas: Mapping[str, RoutedDeltas], projections: list[RoutedProjection],
               log: ChangeLog) -> None:
        self._store(module, deltas, log)
        log.set_attribute(module, TOP_K, projections[0].top_k)
        log.set_attribute(module, "forward", types.MethodType(scaled_dense_forward, module))

    def peft_parameter(self, module: nn.Module, projection: str) -> tuple[str, int, int] | None:
        return None  # peft reads [E, in, out] only from a module flagged is_transposed, which this one is not


def _sent_rows(hidden: torch.Tensor, top_k: int) -> tuple[torch.Tensor, RowGroups]:
    """The rows the router sent (``hidden``: ``[E, T, H]``, each token scaled per expert): their indices into the
    ``[E·T]`` rows, sorted by expert, and their grouping as :meth:`RoutedDeltas.grouped` takes it (each row's expert,
    cumulative row counts per expert, each row's token)."""
    num_experts, num_tokens = hidden.shape[0], hidden.shape[1]
    with torch.no_grad():
        magnitude = hidden.abs().amax(dim=-1).float()  # [E, T]: zero exactly where the routing weight is zero
        chosen = magnitude.topk(top_k, dim=0).indices.transpose(0, 1).reshape(-1)  # [T·k], token-major
        expert_ids, perm = torch.sort(chosen)
        tokens = perm // top_k
        counts = torch.histc(expert_ids.float() if hidden.device.type in ("cpu", "mps") else expert_ids.int(),
                             bins=num_experts, min=0, max=num_experts - 1)
        ends = torch.cumsum(counts, dim=0, dtype=torch.int32)
    return expert_ids * num_tokens + tokens, {"expert_ids": expert_ids, "ends": ends, "tokens": tokens}


def scaled_dense_forward(self: nn.Module, hidden_states: torch.Tensor) -> torch.Tensor:
    """``Llama4TextExperts.forward`` (transformers 5.25) with each expert's deltas on the rows the router sent it."""
    deltas = deltas_of(self)
    llama4 = cast(_Llama4Experts, self)
    num_experts, hidden_size = llama4.gate_up_proj.shape[0], llama4.gate_up_proj.shape[1]
    hidden_states = hidden_states.view(num_experts, -1, hidden_size)
    index, groups = _sent_rows(hidden_states, self.__dict__[TOP_K])
    gate_up = torch.bmm(hidden_states, llama4.gate_up_proj)
    rows = hidden_states.reshape(-1, hidden_size)[index]
    width = gate_up.shape[-1]
    delta = input_delta(deltas, rows, groups, LAYOUT, width)
    if delta is not None:
        gate_up = gate_up.reshape(-1, width).index_add(0, index, delta.to(gate_up.dtype)).view(num_experts, -1, width)
    gate, up = gate_up.chunk(2, dim=-1)
    intermediate = up * llama4.act_fn(gate)
    down = deltas.get("down_proj")
    inner = intermediate.shape[-1]
    sent = None
    if down is not None:
        sent = intermediate.reshape(-1, inner)[index]
        if down.placement == "input":
            scaled = down.grouped(sent, **groups)
            intermediate = intermediate.reshape(-1, inner).index_copy(0, index, scaled.to(intermediate.dtype))
            intermediate, sent = intermediate.view(num_experts, -1, inner), scaled
    next_states = torch.bmm(intermediate, llama4.down_proj)
    next_states = next_states.view(-1, hidden_size)
    if down is not None and down.placement == "output":
        assert sent is not None  # the rows were gathered above: there are down_proj deltas
        next_states = next_states.index_add(0, index, down.grouped(sent, **groups).to(next_states.dtype))
    return next_states
