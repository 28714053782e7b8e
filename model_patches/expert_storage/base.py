"""What an expert-storage adapter is: the routed experts' projections as features see them, and how per-expert
deltas are run inside the experts' own computation.

A routed-experts module keeps its weights in a family-specific layout (fused ``[E, 2I, H]`` tensors, one
``ParameterList`` entry per expert, ``[E, in, out]`` modules fed expert-grouped rows).  An adapter lists each
adaptable projection (:class:`RoutedProjection`) and attaches **routed deltas** — any module following
:class:`RoutedDeltas`, one per projection — so that each expert's delta runs on exactly the rows the router sent to
that expert, with the token index of each row.  The feature (``moepatch.lora_experts``) owns the delta modules and
their parameters; the adapter only reads them from the experts module's :data:`DELTAS_ATTRIBUTE`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import ClassVar
from typing import Protocol
from typing import TypedDict

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from model_patches.structure import MoEModel

DELTAS_ATTRIBUTE = "_routed_deltas"
"""Plain (unregistered) attribute of an adapted storage module: ``{projection: RoutedDeltas}``."""


class RoutedDeltas(Protocol):
    """Per-expert deltas of one projection (e.g. a set of LoRA experts for each routed expert)."""

    placement: str
    """``"output"``: the result is added to the projection's output; ``"input"``: it replaces the input (a scale)."""

    def grouped(self, rows: torch.Tensor, expert_ids: torch.Tensor | None = None, ends: torch.Tensor | None = None,
                tokens: torch.Tensor | None = None, only: int | None = None) -> torch.Tensor:
        """``rows`` sorted by expert — ``expert_ids [S]`` the expert of each row, ``ends [E]`` (int32) the cumulative
        row count per expert, both tensors (no host sync) — or all of expert ``only``; ``tokens``: each row's token
        index (or ``None``)."""
        ...


class RowGroups(TypedDict, total=False):
    """How the rows handed to :meth:`RoutedDeltas.grouped` are grouped: its keyword arguments, as one dict."""

    expert_ids: torch.Tensor
    ends: torch.Tensor
    tokens: torch.Tensor | None
    only: int


class ChangeLog(Protocol):
    """Where an adapter records its changes so they can be undone (``moepatch.undo.UndoLog`` is one)."""

    def set_attribute(self, obj: object, name: str, value: object) -> None: ...

    def add_hook(self, handle: RemovableHandle) -> None: ...


@dataclass(frozen=True)
class RoutedProjection:
    """One adaptable projection of the routed experts of one module."""

    path: str
    """How targets name it: ``<experts module path>.<projection>`` (or the storage module's own path)."""
    module: nn.Module
    """The module storing the weights (deltas are attached to it)."""
    projection: str
    """``gate_proj``, ``up_proj``, ``down_proj`` (or ``gate_up_proj`` where gate and up are one input projection)."""
    in_dims: tuple[int, ...]
    """Input width per routed expert."""
    out_dims: tuple[int, ...]
    """Output width per routed expert."""
    aliases: tuple[str, ...]
    """Module paths a target entry may name to reach this projection (the family's own attribute names)."""
    owner: nn.Module | None = None
    """The mixture that computes the rows' token indices, where the storage module does not know them."""
    top_k: int | None = None
    """Experts each token is routed to, where the storage must find the routed rows itself (experts that run every
    expert on every token, the router's choice only scaling their inputs); ``None`` elsewhere."""
    held: range | None = None
    """Under expert parallelism (transformers' ``DistributedConfig(ep_size=N)``): the global ids of the routed experts
    this process holds (``in_dims`` / ``out_dims`` still list every expert of the model); ``None``: all of them."""


def shape_of(parameter: torch.Tensor) -> tuple[int, ...]:
    """The full shape, also of a ZeRO-3 partitioned parameter."""
    return tuple(getattr(parameter, "ds_shape", parameter.shape))


class ExpertStorage:
    """One storage kind of routed experts (named by :attr:`model_patches.spec.FamilySpec.expert_storage`)."""

    kind: ClassVar[str]
    one_projection_per_module: ClassVar[bool] = False
    """Each storage module is a single projection (its deltas are attached directly, not keyed by projection)."""

    aliases: ClassVar[dict[str, tuple[str, ...]]] = {}
    """Per projection, the attribute names under which targets may name it (relative to the experts module)."""

    def widths(self, experts: nn.Module) -> dict[str, tuple[tuple[int, ...], tuple[int, ...]]] | None:
        """Per projection, the ``(input widths, output widths)`` of every routed expert of one MoE layer's experts
        module; ``None`` when the module does not have this storage's layout (``problem`` names it)."""
        raise NotImplementedError

    def projections(self, moe: MoEModel) -> list[RoutedProjection]:
        """Every adaptable routed projection of ``moe`` (paths relative to ``moe.inner``): one per projection of
        each MoE layer's experts module."""
        names = module_names(moe.inner)
        found = []
        for layer in moe.layers:
            dims = self.widths(layer.experts)
            base = names[id(layer.experts)]
            for projection, (in_dims, out_dims) in (dims or {}).items():
                aliases = self.projection_aliases(layer.experts, projection)
                found.append(RoutedProjection(f"{base}.{projection}", layer.experts, projection, in_dims, out_dims,
                                              tuple(f"{base}.{alias}" for alias in aliases),
                                              held=self.held_experts(layer.experts)))
        return found

    def held_experts(self, experts: nn.Module) -> range | None:
        """The global ids of the routed experts ``experts`` holds when expert parallelism split them over processes,
        ``None`` when it holds them all (or its ids cannot be told: :meth:`problem` then refuses it)."""
        return None

    def projection_aliases(self, experts: nn.Module, projection: str) -> tuple[str, ...]:
        """The attribute names (relative to ``experts``) under which targets may name ``projection``: the class's
        :attr:`aliases` unless the layout of this module stores the projection under other names."""
        return self.aliases[projection]

    def problem(self, projection: RoutedProjection) -> str | None:
        """Why deltas cannot run inside this projection's computation, or ``None``."""
        return None

    def attach(self, module: nn.Module, deltas: Mapping[str, RoutedDeltas], projections: list[RoutedProjection],
               log: ChangeLog) -> None:
        """Make ``module`` run ``deltas`` (by projection name) inside its computation, recording changes in ``log``.

        Called once per storage module with the deltas of all its adapted projections.
        """
        raise NotImplementedError

    def expert_weight(self, module: nn.Module, projection: str, expert: int) -> torch.Tensor:
        """Routed expert ``expert``'s weight of ``projection`` as an ``[out, in]`` *view* of the stored tensor, so
        that writing into it (under ``torch.no_grad``) changes the model: how a per-expert delta ΔW is folded in."""
        raise NotImplementedError

    def fold(self, module: nn.Module, projection: str, expert: int, delta: torch.Tensor) -> None:
        """``W_e ← W_e + ΔW`` for routed expert ``expert``'s ``projection`` (``delta``: ``[out, in]``), in place."""
        with torch.no_grad():
            weight = self.expert_weight(module, projection, expert)
            weight.add_(delta.to(device=weight.device, dtype=weight.dtype))

    def peft_parameter(self, module: nn.Module, projection: str) -> tuple[str, int, int] | None:
        """Where peft's ``target_parameters`` (``ParamWrapper``) reaches ``projection``: the name of the 3-D
        ``[E, out, in]`` parameter of ``module`` (``[E, in, out]`` where the module says ``is_transposed``, which peft
        reads) and the ``(first, total)`` entries of its out axis that belong to the projection; ``None`` when peft
        has no layout for this storage."""
        return None

    @staticmethod
    def _store(module: nn.Module, deltas: Mapping[str, RoutedDeltas], log: ChangeLog) -> None:
        log.set_attribute(module, DELTAS_ATTRIBUTE, deltas)


def deltas_of(module: nn.Module) -> Mapping[str, RoutedDeltas]:
    """The deltas attached to ``module`` (empty when none)."""
    return module.__dict__.get(DELTAS_ATTRIBUTE) or {}


def module_names(root: nn.Module) -> dict[int, str]:
    """``id(module) -> qualified name`` inside ``root``."""
    return {id(module): path for path, module in root.named_modules()}
