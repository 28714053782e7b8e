"""LoRA / (IA)³ experts on the *routed* experts' projections, whatever their storage.

Each routed expert ``e`` of an adapted projection gets its own expert set (``RoutedExpertSets.sets[e]``, a
:class:`~moepatch.lora_experts.layers.LoraExperts` or :class:`~moepatch.lora_experts.layers.VectorExperts`) that runs
on exactly the rows the base router dispatched to ``e`` — inside the experts' own computation, never as a dense
pass over all tokens.  :class:`RoutedExpertSets` is the feature's side (the
:class:`~model_patches.expert_storage.RoutedDeltas` of one projection); the family's storage adapter in
:mod:`model_patches.expert_storage` runs it inside the experts' computation, in one of two ways:

* **grouped** (fused transformers-5 experts under ``grouped_mm``, MoLM): the rows of all routed experts at once,
  sorted by expert, with the experts' own routing metadata as tensors (each row's expert id, the cumulative row
  count per expert).  The sets' routers, A and B matrices (or vectors) are stacked along the expert axis and run as
  grouped matrix products (:func:`grouped_matmul`): no host synchronisation, no Python loop over experts, so
  ``torch.compile`` captures it in one graph.  Every set's parameters enter the stacks each step — also those of an
  expert that got no token — so the autograd graph has the same shape on every rank, which DeepSpeed ZeRO-1/2
  gradient bucketing relies on; under ZeRO-3 the module is a leaf (``_z3_leaf``), so all sets are gathered together
  when it runs.  Sets that differ in shape (a GuiLoMo allocation per routed expert) cannot be stacked and run one
  after the other, after one host sync for the row counts.
* **one expert** (``only=e``: the fused ``eager`` loop, LLaMA-MoE, DBRX, whose experts are themselves a loop): the
  set of expert ``e`` on its rows.

The stacked routers leave each set's router holding what the balance loss reads: ``last_logits`` /
``last_indices`` / ``last_tokens`` of all grouped rows and ``last_rows``, the mask of the rows that were its own.

Under transformers' expert parallelism a process holds only some routed experts (``held``, contiguous global ids) and
its experts' computation sees local ids ``0 .. len(held) - 1``: it gets only those experts' sets, registered under
their global ids (:class:`HeldExpertSets`), so each parameter keeps the single-process model's name and the names of
all processes together are exactly the single-process model's.
"""

from __future__ import annotations

from collections.abc import Iterator
from collections.abc import Sequence
from typing import TypeAlias
from typing import cast

import torch
from torch import nn

from moepatch.lora_experts.grouped import grouped_matmul
from moepatch.lora_experts.layers import LoraExperts
from moepatch.lora_experts.layers import VectorExperts

ExpertSet: TypeAlias = LoraExperts | VectorExperts
"""One routed expert's set: LoRA experts or (IA)³ vector experts."""


def _set_shape(expert_set: ExpertSet) -> tuple:
    """What must be equal across sets to stack them (``()``: a set that cannot be stacked)."""
    router = expert_set.router
    if getattr(expert_set, "heads", None) is not None or getattr(expert_set, "routes_hidden", False):
        return ()
    common = (type(expert_set), router.num_experts, router.top_k, getattr(router, "renormalize", True),
              tuple(router.weight.shape))
    if isinstance(expert_set, LoraExperts):
        return (*common, tuple(expert_set.ranks), expert_set.in_features, expert_set.out_features,
                tuple(expert_set.scaling))
    return (*common, tuple(expert_set.delta.shape))


class HeldExpertSets(nn.Module):
    """The sets of the routed experts ``held`` (contiguous global ids) of one process under expert parallelism:
    registered under their global ids (``sets.5.lora_A.0`` as in the single-process model), indexed and iterated
    by local id as the experts' computation numbers them (``[0]`` is expert ``held.start``'s)."""

    def __init__(self, sets: Sequence[ExpertSet], held: range) -> None:
        super().__init__()
        if len(sets) != len(held) or held.step != 1:
            raise ValueError(f"{len(sets)} sets for the routed experts {held}")
        self.held = held
        for expert, expert_set in zip(held, sets, strict=True):
            self.add_module(str(expert), expert_set)

    def __getitem__(self, local: int) -> ExpertSet:
        return cast(ExpertSet, self._modules[str(self.held[local])])

    def __iter__(self) -> Iterator[ExpertSet]:
        return iter(cast("dict[str, ExpertSet]", self._modules).values())

    def __len__(self) -> int:
        return len(self._modules)


class RoutedExpertSets(nn.Module):
    """One expert set per routed expert of a projection; runs them grouped by routed expert or one at a time.

    ``held``/``total``: under expert parallelism, the global ids of the routed experts this process holds (``sets``
    are theirs, in order) out of ``total``; ``None``: ``sets`` are every routed expert's."""

    _expert_of_column: torch.Tensor
    _column_scale: torch.Tensor

    def __init__(self, sets: Sequence[ExpertSet], placement: str, held: range | None = None,
                 total: int | None = None) -> None:
        super().__init__()
        if held is not None and held == range(len(sets)) and total in (None, len(sets)):
            held = None  # one process holds them all: the plain layout
        self.held = held
        """The global ids of this process's routed experts under expert parallelism, ``None``: all."""
        self.total = len(sets) if total is None else total
        """Routed experts of the projection in the whole model (over every process)."""
        self.sets: nn.ModuleList | HeldExpertSets = nn.ModuleList(sets) if held is None else HeldExpertSets(sets, held)
        self.placement = placement  # "output": a LoRA delta; "input": MoV scaling of the projection's input
        self._z3_leaf = True  # DeepSpeed ZeRO-3: gather every set's parameters when this module runs (stacked)
        shapes = {_set_shape(expert_set) for expert_set in sets}
        self.stackable = len(shapes) == 1 and () not in shapes
        first = sets[0]
        if self.stackable and isinstance(first, LoraExperts):  # per rank column: its LoRA expert and α / r_n
            expert_of_column = torch.repeat_interleave(torch.arange(len(first.ranks)), torch.tensor(first.ranks))
            self.register_buffer("_expert_of_column", expert_of_column, persistent=False)
            scale = torch.tensor(first.scaling, dtype=torch.float32)[expert_of_column]
            self.register_buffer("_column_scale", scale, persistent=False)

    def grouped(self, rows: torch.Tensor, expert_ids: torch.Tensor | None = None, ends: torch.Tensor | None = None,
                tokens: torch.Tensor | None = None, only: int | None = None) -> torch.Tensor:
        """See :meth:`forward` (called as a module, so hooks and DeepSpeed ZeRO-3 see it)."""
        return self(rows, expert_ids, ends, tokens, only)

    def forward(self, rows: torch.Tensor, expert_ids: torch.Tensor | None, ends: torch.Tensor | None,
                tokens: torch.Tensor | None = None, only: int | None = None) -> torch.Tensor:
        """The per-row result — the LoRA delta (``placement == "output"``) or the scaled rows (``"input"``).

        Args:
            rows (`torch.Tensor` of shape `[S, in]`): sorted by routed expert (all of expert ``only`` if given).
            expert_ids (`torch.Tensor` of shape `[S]`): each row's routed expert (unused with ``only``).
            ends (`torch.Tensor` of shape `[E]`, int32): cumulative row count per routed expert (unused with
                ``only``).
            tokens (`torch.Tensor` of shape `[S]`, *optional*): each row's token index, kept on the routers so the
                balance loss can leave padding out.
            only (`int`, *optional*): every row belongs to routed expert ``only``.
        """
        if only is not None:
            return self._one(rows, tokens, only)
        if ends is None:
            raise ValueError("RoutedExpertSets: `ends` is required unless `only` names the expert")
        if not self.stackable:
            return self._one_after_another(rows, ends, tokens)
        if expert_ids is None:
            raise ValueError("RoutedExpertSets: `expert_ids` is required unless `only` names the expert")
        logits = grouped_matmul(rows.float(), self._stack("router.weight").float().transpose(1, 2), ends, expert_ids)
        weights = self._mixing_weights(logits, expert_ids, tokens)  # [S, N] float32
        first = self._set(0)
        if isinstance(first, LoraExperts):
            return self._lora_delta(rows, weights, expert_ids, ends)
        scale = grouped_matmul(weights, self._stack("delta").to(weights.dtype), ends, expert_ids)  # Σ_n p_n δ_n
        router = first.router
        if router.top_k is not None and not getattr(router, "renormalize", True):  # Σ p = m < 1: t ⊙ (m + Σ p δ)
            return rows * (scale + weights.sum(dim=-1, keepdim=True)).to(rows.dtype)
        return rows + rows * scale.to(rows.dtype)

    def _set(self, index: int) -> ExpertSet:
        """The set of (local) routed expert ``index``."""
        return cast(ExpertSet, self.sets[index])

    def _all_sets(self) -> list[ExpertSet]:
        """Every set, in (local) routed expert order."""
        return [cast(ExpertSet, expert_set) for expert_set in self.sets]

    def _stack(self, name: str) -> torch.Tensor:
        """``[E, ...]``: parameter ``name`` of every set."""
        owner, _, attribute = name.rpartition(".")
        return torch.stack([getattr(expert_set.get_submodule(owner), attribute) for expert_set in self.sets])

    def _mixing_weights(self, logits: torch.Tensor, expert_ids: torch.Tensor, tokens: torch.Tensor | None
                        ) -> torch.Tensor:
        """The sets' mixing weights ``[S, N]`` from their logits — softmax, or the top-k (renormalised unless the
        routers say otherwise) — and what each router keeps for the balance loss."""
        router = self._set(0).router
        probs = logits.softmax(dim=-1)
        indices = None
        weights = probs
        if router.top_k is not None:
            values, indices = probs.topk(router.top_k, dim=-1)
            if getattr(router, "renormalize", True):
                values = values / values.sum(dim=-1, keepdim=True)
            weights = torch.zeros_like(probs).scatter(-1, indices, values)
        own = expert_ids.unsqueeze(0) == torch.arange(len(self.sets), device=expert_ids.device).unsqueeze(1)
        for expert_set, rows in zip(self._all_sets(), own, strict=True):  # attribute writes only: no tensor work
            expert_set.router.last_logits, expert_set.router.last_indices = logits, indices
            expert_set.router.last_tokens, expert_set.router.last_rows = tokens, rows
        return weights

    def _lora_delta(self, rows: torch.Tensor, weights: torch.Tensor, expert_ids: torch.Tensor, ends: torch.Tensor
                    ) -> torch.Tensor:
        """``Σ_n w_n·(α/r_n)·B_n A_n dropout(x)`` of each row's own set: the sets' A's ``[E, in, Σr]`` and B's
        ``[E, Σr, out]`` (each set's experts concatenated along the rank axis, as in a single set)."""
        lora_sets = cast("list[LoraExperts]", self._all_sets())  # stackable LoRA sets: all LoraExperts
        first = lora_sets[0]
        count, rank = len(lora_sets), sum(first.ranks)
        a = torch.cat([a for expert_set in lora_sets for a in expert_set.lora_A])  # [E·Σr, in]
        b = torch.cat([b for expert_set in lora_sets for b in expert_set.lora_B], dim=1)  # [out, E·Σr]
        a = a.view(count, rank, first.in_features).transpose(1, 2)
        b = b.view(first.out_features, count, rank).permute(1, 2, 0)
        column_weights = self._per_column(weights) * self._column_scale  # [S, Σr]
        hidden = grouped_matmul(first.dropout(rows).to(a.dtype), a, ends, expert_ids)  # [S, Σr]
        return grouped_matmul(hidden * column_weights.to(hidden.dtype), b, ends, expert_ids).to(rows.dtype)

    def _per_column(self, weights: torch.Tensor) -> torch.Tensor:
        """``[S, N]`` → ``[S, Σr]``: each LoRA expert's weight over its rank columns (an expand for equal ranks,
        whose backward is a sum, where a gather's is a scatter-add)."""
        ranks = cast(LoraExperts, self._set(0)).ranks
        if len(set(ranks)) == 1:
            return weights.unsqueeze(-1).expand(*weights.shape, ranks[0]).reshape(weights.shape[0], -1)
        return weights[:, self._expert_of_column]

    def _one(self, rows: torch.Tensor, tokens: torch.Tensor | None, expert: int) -> torch.Tensor:
        """The set of routed expert ``expert`` on its rows (its router keeps their tokens)."""
        expert_set = self._set(expert)
        expert_set.router.last_tokens, expert_set.router.last_rows = tokens, None
        return expert_set(rows)

    def _one_after_another(self, rows: torch.Tensor, ends: torch.Tensor, tokens: torch.Tensor | None
                           ) -> torch.Tensor:
        """Sets of different shapes: each on its rows, every set each step (on zero rows if its expert got none);
        one host sync reads the row counts."""
        bounds = [0, *ends.tolist()]
        pieces = []
        for expert, (start, end) in enumerate(zip(bounds, bounds[1:], strict=False)):  # pairs of neighbours
            pieces.append(self._one(rows[start:end], None if tokens is None else tokens[start:end], expert))
        tail = rows[bounds[-1]:]  # under expert parallelism: routes to other processes' experts, sorted last
        if tail.shape[0]:
            pieces.append(tail if self.placement == "input" else tail.new_zeros(
                tail.shape[0], cast(LoraExperts, self._set(0)).out_features))
        return torch.cat(pieces, dim=0)
