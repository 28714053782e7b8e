"""MoLM / ModuleFormer's experts: ``ParallelExperts`` modules (``weight [E, in, out]``) called with expert-grouped
rows and ``expert_size``; the mixture (``MoE``) computing the grouping keeps each row's token as ``batch_index``.
JetMoE's ``JetMoeParallelExperts`` are the same modules with ``weight [E, out, in]`` (its mixtures keep no token
index: the deltas then get none).

Each ``ParallelExperts`` module is one linear projection, so a forward hook adds the per-expert deltas to its
output (a pre-hook scales its input instead).  In the MLP mixture ``experts`` is the input projection (gate and up
in one) and ``output_experts`` the output projection (JetMoE: ``input_linear`` / ``output_linear``); the attention
mixture's experts are adapted too.
"""

from __future__ import annotations

from collections.abc import Mapping
from functools import partial
from typing import ClassVar
from typing import Protocol
from typing import cast

import torch
from torch import nn

from model_patches.expert_storage.base import ChangeLog
from model_patches.expert_storage.base import ExpertStorage
from model_patches.expert_storage.base import RoutedDeltas
from model_patches.expert_storage.base import RoutedProjection
from model_patches.expert_storage.base import RowGroups
from model_patches.expert_storage.base import deltas_of
from model_patches.expert_storage.base import module_names
from model_patches.expert_storage.base import shape_of
from model_patches.structure import MoEModel

STORAGE_CLASSES = {"ParallelExperts": "in_out", "JetMoeParallelExperts": "out_in"}
"""Classes of one-projection expert modules and the layout of their ``weight``: ``[E, in, out]`` or ``[E, out, in]``."""
_INPUT_ALIASES = ("gate_proj", "up_proj", "gate_up_proj")
_MLP_ALIASES = {"experts": _INPUT_ALIASES, "output_experts": ("down_proj",), "input_linear": _INPUT_ALIASES,
                "output_linear": ("down_proj",)}


class _ParallelExperts(Protocol):
    """What the adapter reads from a ``ParallelExperts`` module (a typed view; nothing is checked at run time)."""

    weight: torch.Tensor


class ParallelExpertModules(ExpertStorage):
    """Every ``ParallelExperts`` module of the model; one projection each."""

    kind: ClassVar[str] = "parallel"
    one_projection_per_module: ClassVar[bool] = True

    def projections(self, moe: MoEModel) -> list[RoutedProjection]:
        names = module_names(moe.inner)
        mlp_blocks = {id(layer.block) for layer in moe.layers}
        found = []
        for module in moe.inner.modules():
            layout = STORAGE_CLASSES.get(type(module).__name__)
            if layout is None:
                continue
            path = names[id(module)]
            parent_path, _, child = path.rpartition(".")
            parent = moe.inner.get_submodule(parent_path)
            experts, first, second = shape_of(cast(_ParallelExperts, module).weight)
            fan_in, fan_out = (first, second) if layout == "in_out" else (second, first)
            aliases: tuple[str, ...] = (path, parent_path)
            if id(parent) in mlp_blocks:
                aliases += tuple(f"{parent_path}.{alias}" for alias in _MLP_ALIASES.get(child, ()))
            projection = "down_proj" if child in ("output_experts", "output_linear") else "gate_up_proj"
            found.append(RoutedProjection(path, module, projection, (fan_in,) * experts, (fan_out,) * experts,
                                          aliases, owner=parent))
        return found

    def attach(self, module: nn.Module, deltas: Mapping[str, RoutedDeltas], projections: list[RoutedProjection],
               log: ChangeLog) -> None:
        (projection,) = projections
        self._store(module, deltas, log)
        placement = deltas[projection.projection].placement
        if placement == "input":
            log.add_hook(module.register_forward_pre_hook(partial(_scale_input, owner=projection.owner,
                                                                  projection=projection.projection)))
        else:
            log.add_hook(module.register_forward_hook(partial(_add_output, owner=projection.owner,
                                                              projection=projection.projection)))


    def expert_weight(self, module: nn.Module, projection: str, expert: int) -> torch.Tensor:
        weight = cast(_ParallelExperts, module).weight
        if STORAGE_CLASSES[type(module).__name__] == "out_in":
            return weight[expert]
        return weight[expert].T  # weight [E, in, out]


def _row_tokens(owner: nn.Module | None, rows: int) -> torch.Tensor | None:
    """The token of each expert-grouped row, as the mixture kept it (``batch_index``)."""
    tokens = getattr(owner, "batch_index", None)
    return tokens if isinstance(tokens, torch.Tensor) and tokens.shape[0] == rows else None


def _groups(inputs: torch.Tensor, expert_size: object, tokens: torch.Tensor | None) -> RowGroups:
    """Each row's expert and the cumulative row counts, as tensors, from the mixture's per-expert row counts; each
    row's token, ``tokens``."""
    counts = torch.as_tensor(expert_size, device=inputs.device).to(torch.int64)
    expert_ids = torch.repeat_interleave(torch.arange(counts.shape[0], device=inputs.device), counts,
                                         output_size=inputs.shape[0])  # output_size: no host sync
    return {"expert_ids": expert_ids, "ends": counts.cumsum(0).to(torch.int32), "tokens": tokens}


def _add_output(module: nn.Module, args: tuple, output: torch.Tensor, owner: nn.Module | None, projection: str
                ) -> torch.Tensor:
    inputs, expert_size = args[0], args[1]
    tokens = _row_tokens(owner, inputs.shape[0])
    delta = deltas_of(module)[projection].grouped(inputs, **_groups(inputs, expert_size, tokens))
    return output + delta.to(output.dtype)


def _scale_input(module: nn.Module, args: tuple, owner: nn.Module | None, projection: str) -> tuple:
    inputs, expert_size = args[0], args[1]
    tokens = _row_tokens(owner, inputs.shape[0])
    return (deltas_of(module)[projection].grouped(inputs, **_groups(inputs, expert_size, tokens)),
            expert_size, *args[2:])
