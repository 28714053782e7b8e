"""transformers 5 fused experts (``gate_up_proj [E, 2I, H]``, ``down_proj [E, H, I]``; Qwen2-MoE, Mixtral,
Qwen3-MoE, OLMoE and every class decorated with ``use_experts_implementation``).

Deltas reach these experts through transformers' own experts-implementation interface: moepatch registers one more
implementation (:data:`IMPLEMENTATION`) in ``ALL_EXPERTS_FUNCTIONS`` and gives each adapted experts module its own
shallow copy of the config naming it, so the class's dispatching ``forward`` calls it — for that module only; the
model's config, its other experts and ``save_pretrained`` are untouched.  The implementation performs the same
operations as the one the model was using (``grouped_mm``, through transformers' grouped linear, or ``eager``) and
adds each expert's deltas between them, so fresh deltas that are exactly zero leave the output bit-identical.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from typing import ClassVar

import torch
from torch import nn
from transformers.integrations.moe import ExpertsInterface
from transformers.integrations.moe import _grouped_linear  # the grouped GEMM transformers' grouped_mm uses

from model_patches.expert_storage.base import ChangeLog
from model_patches.expert_storage.base import ExpertStorage
from model_patches.expert_storage.base import RoutedDeltas
from model_patches.expert_storage.base import RoutedProjection
from model_patches.expert_storage.base import deltas_of
from model_patches.expert_storage.base import shape_of

IMPLEMENTATION = "moepatch_routed_deltas"
"""The experts implementation registered in transformers' ``ALL_EXPERTS_FUNCTIONS``."""
BASE_CONFIG = "_routed_deltas_base_config"
"""Attribute of an adapted experts module: its original config, whose experts implementation is the base one."""
BASE_IMPLEMENTATIONS = ("grouped_mm", "eager", None)


class FusedExperts(ExpertStorage):
    """transformers 5 fused experts; projections ``gate_proj`` / ``up_proj`` (the halves of ``gate_up_proj``) and
    ``down_proj``."""

    kind: ClassVar[str] = "fused"

    aliases: ClassVar[dict[str, tuple[str, ...]]] = {"gate_proj": ("gate_proj", "w1", "gate_up_proj"),
                                                      "up_proj": ("up_proj", "w3", "gate_up_proj"),
                                                      "down_proj": ("down_proj", "w2")}

    def widths(self, experts: nn.Module) -> dict[str, tuple[tuple[int, ...], tuple[int, ...]]] | None:
        weight = getattr(experts, "gate_up_proj", None)
        if not isinstance(weight, torch.Tensor) or len(shape_of(weight)) != 3:  # ZeRO-3: the full shape
            return None
        num, double, hidden = shape_of(weight)
        intermediate = double // 2
        return {"gate_proj": ((hidden,) * num, (intermediate,) * num),
                "up_proj": ((hidden,) * num, (intermediate,) * num),
                "down_proj": ((intermediate,) * num, (hidden,) * num)}

    def problem(self, projection: RoutedProjection) -> str | None:
        experts = projection.module
        for name in ("gate_up_proj", "down_proj", "num_experts", "_apply_gate"):
            if not hasattr(experts, name):
                return f"{type(experts).__name__} has no {name}"
        if getattr(experts, "has_bias", False) or not getattr(experts, "has_gate", True):
            return f"{type(experts).__name__}: biased or gate-less fused experts are not supported"
        if getattr(experts, "has_post_expert_norm", False) or getattr(experts, "_is_expert_parallel", False):
            return f"{type(experts).__name__}: post-expert norms / expert parallelism are not supported"
        if getattr(experts, "is_transposed", False):
            return f"{type(experts).__name__}: the transposed layout (gate_up_proj [E, H, 2I]) is not supported"
        if not getattr(experts, "is_concatenated", True):
            return f"{type(experts).__name__}: the interleaved gate/up layout is not supported"
        num, double, hidden = shape_of(experts.gate_up_proj)
        if double % 2 or shape_of(experts.down_proj) != (num, hidden, double // 2):
            return (f"{type(experts).__name__}: down_proj {shape_of(experts.down_proj)} does not fit gate_up_proj "
                    f"{shape_of(experts.gate_up_proj)} (expected [E, H, I] beside [E, 2I, H])")
        config = experts.__dict__.get(BASE_CONFIG, getattr(experts, "config", None))  # adapted already: its base
        implementation = getattr(config, "_experts_implementation", None)
        if implementation not in BASE_IMPLEMENTATIONS:
            return (f"experts implementation {implementation!r}: deltas on routed experts run with 'grouped_mm' "
                    "or 'eager' (set config._experts_implementation)")
        return None

    def attach(self, module: nn.Module, deltas: Mapping[str, RoutedDeltas], projections: list[RoutedProjection],
               log: ChangeLog) -> None:
        self._store(module, deltas, log)
        original = module.config
        routed = copy.copy(original)  # shallow: the same values, its own experts implementation
        routed.__dict__["_experts_implementation_internal"] = IMPLEMENTATION
        log.set_attribute(module, BASE_CONFIG, original)
        log.set_attribute(module, "config", routed)


    def expert_weight(self, module: nn.Module, projection: str, expert: int) -> torch.Tensor:
        if projection == "down_proj":
            return module.down_proj[expert]  # [H, I]
        half = shape_of(module.gate_up_proj)[1] // 2
        start = 0 if projection == "gate_proj" else half  # gate_up_proj [E, 2I, H]: gate rows first, then up
        return module.gate_up_proj[expert, start : start + half]

    def peft_parameter(self, module: nn.Module, projection: str) -> tuple[str, int, int] | None:
        if projection == "down_proj":
            return "down_proj", 0, shape_of(module.down_proj)[1]
        double = shape_of(module.gate_up_proj)[1]
        return "gate_up_proj", (0 if projection == "gate_proj" else double // 2), double


def routed_deltas_experts_forward(self: nn.Module, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                                  top_k_weights: torch.Tensor) -> torch.Tensor:
    """The experts implementation named :data:`IMPLEMENTATION`: the base implementation plus the deltas."""
    base = getattr(self.__dict__.get(BASE_CONFIG), "_experts_implementation", None)
    if base == "eager":
        return _eager(self, hidden_states, top_k_index, top_k_weights)
    if base in ("grouped_mm", None):
        return _grouped(self, hidden_states, top_k_index, top_k_weights)
    raise ValueError(f"{type(self).__name__}: experts implementation {base!r} was set after moepatch attached "
                     "routed deltas; they run with 'grouped_mm' or 'eager'")


ExpertsInterface.register(IMPLEMENTATION, routed_deltas_experts_forward)


def _gate_up_delta(deltas: Mapping[str, RoutedDeltas], rows: torch.Tensor, groups: dict[str, object],
                   intermediate: int) -> torch.Tensor | None:
    """The deltas of the ``gate_up_proj`` output (gate half, up half; zeros for a half without deltas);
    ``groups``: the rows' grouping, as :meth:`RoutedDeltas.grouped` takes it."""
    gate = deltas["gate_proj"].grouped(rows, **groups) if "gate_proj" in deltas else None
    up = deltas["up_proj"].grouped(rows, **groups) if "up_proj" in deltas else None
    if gate is None and up is None:
        return None
    zeros = rows.new_zeros(rows.shape[0], intermediate)
    return torch.cat([zeros if gate is None else gate.to(rows.dtype), zeros if up is None else up.to(rows.dtype)],
                     dim=-1)


def _grouped(self: nn.Module, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
             top_k_weights: torch.Tensor) -> torch.Tensor:
    """transformers' ``grouped_mm`` experts computation with the deltas in between."""
    deltas = deltas_of(self)
    device = hidden_states.device
    num_top_k, num_tokens, hidden_dim = top_k_index.size(-1), hidden_states.size(0), hidden_states.size(-1)
    sample_weights = top_k_weights.reshape(-1)
    expert_ids = top_k_index.reshape(-1)
    expert_ids_g, perm = torch.sort(expert_ids)
    tokens = perm // num_top_k
    rows = hidden_states[tokens]
    sample_weights_g = sample_weights[perm]
    histc_input = expert_ids_g.float() if device.type in ("cpu", "mps") else expert_ids_g.int()
    tokens_per_expert = torch.histc(histc_input, bins=self.num_experts, min=0, max=self.num_experts - 1)
    offsets = torch.cumsum(tokens_per_expert, dim=0, dtype=torch.int32)
    groups = {"expert_ids": expert_ids_g, "ends": offsets, "tokens": tokens}  # tensors only: no host sync

    projected = _grouped_linear(rows, self.gate_up_proj, offsets, bias=None, is_transposed=self.is_transposed)
    delta = _gate_up_delta(deltas, rows, groups, projected.shape[-1] // 2)
    if delta is not None:
        projected = projected + delta.to(projected.dtype)
    projected = self._apply_gate(projected)
    if "down_proj" in deltas and deltas["down_proj"].placement == "input":
        projected = deltas["down_proj"].grouped(projected, **groups)
    out = _grouped_linear(projected, self.down_proj, offsets, bias=None, is_transposed=self.is_transposed)
    if "down_proj" in deltas and deltas["down_proj"].placement == "output":
        out = out + deltas["down_proj"].grouped(projected, **groups).to(out.dtype)
    weighted = out * sample_weights_g.unsqueeze(-1)
    inverse = torch.empty_like(perm)
    inverse[perm] = torch.arange(perm.size(0), device=device)
    weighted = weighted[inverse]
    return weighted.view(num_tokens, num_top_k, hidden_dim).sum(dim=1).to(hidden_states.dtype)


def _eager(self: nn.Module, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
           top_k_weights: torch.Tensor) -> torch.Tensor:
    """transformers' ``eager`` experts loop with the deltas in between."""
    deltas = deltas_of(self)
    final = torch.zeros_like(hidden_states)
    with torch.no_grad():
        expert_mask = torch.nn.functional.one_hot(top_k_index, num_classes=self.num_experts + 1).permute(2, 1, 0)
        expert_hit = torch.greater(expert_mask.sum(dim=(-1, -2)), 0).nonzero()
    for hit in expert_hit:
        expert = int(hit[0])
        if expert == self.num_experts:
            continue
        top_k_pos, token_idx = torch.where(expert_mask[expert])
        rows = hidden_states[token_idx]
        groups = {"tokens": token_idx, "only": expert}
        projected = nn.functional.linear(rows, self.gate_up_proj[expert])
        delta = _gate_up_delta(deltas, rows, groups, projected.shape[-1] // 2)
        if delta is not None:
            projected = projected + delta.to(projected.dtype)
        current = self._apply_gate(projected)  # the experts' own gating (act(gate) · up unless the class says else)
        if "down_proj" in deltas and deltas["down_proj"].placement == "input":
            current = deltas["down_proj"].grouped(current, **groups)
        out = nn.functional.linear(current, self.down_proj[expert])
        if "down_proj" in deltas and deltas["down_proj"].placement == "output":
            out = out + deltas["down_proj"].grouped(current, **groups).to(out.dtype)
        out = out * top_k_weights[token_idx, top_k_pos, None]
        final.index_add_(0, token_idx, out.to(final.dtype))
    return final
