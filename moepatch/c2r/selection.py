"""C2R routing: the top-1 expert is chosen freely, the other k-1 among the first ``top_t`` entries of its list.

Faithful to the official Qwen rule of C2R (Zhang et al., NAACL 2025), on every router kind moepatch executes,
written once against the routing patch point (:mod:`moepatch.routing.seam`): only the selection step changes, so each
family keeps its own weight semantics (Qwen2-MoE: global softmax probabilities, renormalised only when
``norm_topk_prob``; Mixtral: renormalised over the k chosen).  The official code's defects are fixed here:

* ``top_t = E`` (the official duplicate-expert bug) and every other ``top_t`` outside ``k-1 .. E-1`` are refused;
* malformed lists (shape, out-of-range ids, duplicates, the expert itself before the cut, layer-count mismatch)
  raise ``ValueError`` naming layer and expert — nothing is silently accepted;
* the list becomes per-layer non-persistent buffers once, at patch time (not a host→device copy per forward): the
  ``[E, T]`` candidates and the ``[E, E]`` table of allowed experts;
* ties break as in the family's own top-k, not in list order: the official code gathers the allowed probabilities
  in list order and runs ``topk`` on that reordered vector; here the non-allowed experts are masked to ``-inf`` in
  expert-index order and the family's very call (same ``k``, dim and dtype) picks the experts, so exact ties (common
  in bf16/fp16) resolve as vanilla routing resolves them;
* no side-channel attributes on modules (statistics come from :class:`~moepatch.routing.recorder.RoutingRecorder`);
* the load-balancing loss counts the experts actually chosen (:mod:`moepatch.routing.aux_loss`).

``top_t = E - 1`` reproduces vanilla top-k exactly, ties included (tested bit for bit in float32, bf16 and fp16).

A router that also scores a skip class (ZAYA) chooses it like an expert, but it is no expert: C2R never masks it, and
the allowed set is that of the token's first expert (see :func:`_masked_topk`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from dataclasses import field
from pathlib import Path
from typing import Any

import torch

from model_patches.structure import MoELayer
from model_patches.structure import MoEModel
from model_patches.structure import device_of
from moepatch.c2r.config import C2RConfig
from moepatch.routing.aux_loss import install_actual_choice_aux_loss
from moepatch.routing.seam import layer_settings
from moepatch.routing.seam import override_selection
from moepatch.routing.seam import selection_seam_problem
from moepatch.routing.seam import vanilla_selector
from moepatch.undo import UndoLog
from moepatch.validation import read_json_beside

CANDIDATES_BUFFER = "c2r_candidates"
"""Per-layer ``[E, T]`` int64 buffer: row ``e`` = the first ``top_t`` entries of expert ``e``'s list, in list order
(LLaMA-MoE's ``top_t = 1`` rule reads its fixed partners from it)."""

RESTRICTED_BUFFER = "c2r_restricted"
"""Per-layer ``[E]`` bool buffer: row ``e`` of the allowed table does not allow every expert."""

ALLOWED_BUFFER = "c2r_allowed"
"""Per-layer ``[E, E]`` bool buffer (:func:`allowed_table`): row ``e`` = the experts a token whose top-1 is ``e`` may
use, in expert-index order."""


def allowed_table(candidates: torch.Tensor, num_experts: int) -> torch.Tensor:
    """The ``[E, E]`` boolean table of the C2R rule, built once per layer at patch time.

    Args:
        candidates (`torch.Tensor` of shape `[E, T]`): row ``e`` = the first ``top_t`` collaborators of expert ``e``.
        num_experts (`int`): E.

    Returns:
        `torch.Tensor` of shape `[E, E]`, bool: ``allowed[e, j]`` is True for ``j == e`` and for every ``j`` in
        ``candidates[e]``.  The diagonal makes the top-1 expert the maximum of its own masked row; with ``top_t =
        E - 1`` every entry is True.
    """
    own = torch.eye(num_experts, dtype=torch.bool, device=candidates.device)  # [E, E]
    return own.scatter(1, candidates, True)  # [E, E]


def _masked_topk(
    scores: torch.Tensor, m: int, allowed: torch.Tensor, selected: int, *, sorted: bool = True,
    top1: torch.Tensor | None = None, restricted: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The family's own ``torch.topk(scores, m, dim=-1)``, over the scores of the allowed experts only.

    The top-1 expert (``argmax``) is free; every expert outside ``allowed[top1]`` gets ``-inf`` *in place*, so the
    vector keeps expert-index order, dtype and shape, and the very call the family makes picks the ``m`` best of
    the allowed ones.  Ties therefore resolve exactly as in the family's top-k: where a row allows every expert
    (``top_t = E - 1``) the masked vector equals ``scores`` bit for bit and the result is vanilla's, ties included.
    Gathering the allowed scores in list order instead (the official code) hands ``topk`` another vector, whose ties
    break in list order: another expert for about one token in 256 on the tiny bf16 models.

    ``top1`` holds the row's maximum, so ``topk`` puts it among the first ``selected`` columns (``m`` or ``m - 1``)
    unless more than ``selected`` allowed experts tie at that maximum.  In a row that does not allow every expert it
    is then put first, before the first ``m - 1`` chosen (all equal to it), so the selection always holds ``top1``
    and its collaborators only.  Among equal scores the order is ``topk``'s: ``top1`` need not be column 0.

    Columns after the ``E`` experts (ZAYA's skip class, :attr:`~model_patches.spec.RoutingRule.skip_class`) are no
    experts: they are never masked, and where one of them is ``top1`` the allowed row is that of the token's first
    *expert*, the best of the first ``E`` columns (its ``argmax``), so every chosen expert is still in one expert's
    allowed set.

    Args:
        scores (`torch.Tensor` of shape `[N, E]` or `[N, E + X]`): what the family's top-k runs over (probabilities
            or logits), with ``X`` non-expert classes last.
        m (`int`): columns returned.
        allowed (`torch.Tensor` of shape `[E, E]`, bool): :func:`allowed_table` of the layer.
        selected (`int`): leading columns that form the selection and must hold ``top1`` (``m`` or ``m - 1``).
        top1 (`torch.Tensor` of shape `[N, 1]`, *optional*): ``scores.argmax(dim=-1, keepdim=True)``, when the caller
            has it already.
        restricted (`torch.Tensor` of shape `[E]`, bool, *optional*): ``~allowed.all(dim=-1)``, built once per layer
            (:data:`RESTRICTED_BUFFER`); computed here when not given.

    Returns:
        `(scores gathered at the indices [N, m], indices [N, m])`, best first.
    """
    if top1 is None:
        top1 = scores.argmax(dim=-1, keepdim=True)  # [N, 1]
    if restricted is None:
        restricted = ~allowed.all(dim=-1)  # [E]
    num_experts = allowed.shape[0]
    extra = scores.shape[-1] - num_experts
    if extra:  # classes after the experts (ZAYA's skip class) are no experts: allowed everywhere, never masked
        anchor = torch.where(top1 < num_experts, top1, scores[:, :num_experts].argmax(dim=-1, keepdim=True))
        row = allowed[anchor.squeeze(1)]  # [N, E]
        row = torch.cat([row, row.new_ones(row.shape[0], extra)], dim=1)  # [N, E + extra]
    else:
        anchor, row = top1, allowed[top1.squeeze(1)]  # [N, 1], [N, E]
    masked = scores.masked_fill(~row, float("-inf"))  # expert-index order
    _, indices = torch.topk(masked, m, dim=-1, sorted=sorted)  # [N, m]: the family's call, the family's tie order
    lost = (indices[:, :selected] != top1).all(dim=-1, keepdim=True) & restricted[anchor]  # [N, 1]
    indices = torch.where(lost, torch.cat([top1, indices[:, :-1]], dim=1), indices)  # [N, m]
    return scores.gather(1, indices), indices


def constrained_topk(
    probs: torch.Tensor, k: int, allowed: torch.Tensor, *, sorted: bool = True, ungrouped: torch.Tensor | None = None,
    restricted: torch.Tensor | None = None, kept: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """C2R selection on the family's selection scores (the official Qwen rule), with the family's own tie-breaking.

    Args:
        probs (`torch.Tensor` of shape `[N, E]`): what the family's top-k runs over — probabilities (Qwen, Mixtral),
            sigmoid scores plus the selection bias (DeepSeek-V3), logits (gpt-oss, Llama 4) — with the experts of
            groups the group limit dropped already masked; ``[N, E + 1]`` with ZAYA's skip class last, which is
            never masked (see :func:`_masked_topk`; no group limit then).
        k (`int`): experts per token.
        allowed (`torch.Tensor` of shape `[E, E]`, bool): :func:`allowed_table` of the layer.
        sorted (`bool`, *optional*, defaults to `True`): the family's ``torch.topk(sorted=...)``.
        ungrouped (`torch.Tensor` of shape `[N, E]`, *optional*): the same scores before the group limit's mask,
            given when the router has one and its kept groups can hold fewer than ``k`` allowed experts (see
            :func:`group_limit_can_starve`); the fallback then runs on every token, branch-free (no host sync).
        restricted (`torch.Tensor` of shape `[E]`, bool, *optional*): see :func:`_masked_topk`.
        kept (`torch.Tensor` of shape `[N, E]`, bool, *optional*): the kept groups' mask (with ``ungrouped``); read
            off ``probs == ungrouped`` when not given.

    Returns:
        `(values [N, k], indices [N, k])`: the top-1 expert (the family's own first choice, ``argmax`` of ``probs``)
        and the k-1 best of its first ``top_t`` collaborators, chosen by the family's ``torch.topk(…, k, dim=-1)`` on
        the masked scores (see :func:`_masked_topk`); ``top_t = E - 1`` is vanilla top-k bit for bit.  Where the
        group limit leaves fewer than ``k`` allowed experts in the kept groups, the token takes all of those and then
        the best allowed experts outside them (by ``ungrouped``): C2R overrides the group limit for that token, and
        the chosen set is still inside the allowed set and holds the first choice.
    """
    top1 = probs.argmax(dim=-1, keepdim=True)  # [N, 1]
    values, indices = _masked_topk(probs, k, allowed, selected=k, sorted=sorted, top1=top1, restricted=restricted)
    if ungrouped is None:
        return values, indices
    if kept is None:
        kept = probs == ungrouped  # [N, E]: the group limit replaced the dropped groups' scores
    row_allowed = allowed[top1.squeeze(1)]  # [N, E]
    inside_allowed = row_allowed & kept
    inside = inside_allowed.sum(dim=-1, keepdim=True)  # [N, 1]
    short = inside < k  # [N, 1] tokens the group limit leaves too few allowed experts
    if probs.device.type == "cpu" and not bool(short.any()):  # free on the CPU; elsewhere no host sync: branch-free
        return values, indices
    best_inside = torch.topk(ungrouped.masked_fill(~inside_allowed, float("-inf")), k, dim=-1).indices
    best_outside = torch.topk(ungrouped.masked_fill(~(row_allowed & ~kept), float("-inf")), k, dim=-1).indices
    column = torch.arange(k, device=probs.device).expand_as(best_inside)  # [N, k]
    from_outside = best_outside.gather(1, (column - inside).clamp(min=0))
    filled = torch.where(column < inside, best_inside, from_outside)
    indices = torch.where(short, filled, indices)
    return probs.gather(1, indices), indices


def group_limit_can_starve(allowed: torch.Tensor, groups: int, kept_groups: int, k: int) -> bool:
    """Whether some token's kept groups can hold fewer than ``k`` of its allowed experts (then C2R needs its fallback).

    A token's first expert lies in a kept group; in the worst case the other ``kept_groups - 1`` kept groups are the
    ones holding the fewest of that expert's allowed experts.  Decided once per layer at patch time, so that routers
    whose lists can never starve run no fallback at all.
    """
    num_experts = allowed.shape[0]
    per_group = allowed.view(num_experts, groups, num_experts // groups).sum(dim=-1)  # [E, G] allowed per group
    own_group = torch.arange(num_experts, device=allowed.device) // (num_experts // groups)
    own = per_group.gather(1, own_group[:, None]).squeeze(1)  # [E]
    others = per_group.scatter(1, own_group[:, None], num_experts + 1)  # [E, G], the own group out of the way
    fewest = others.sort(dim=-1).values[:, : kept_groups - 1].sum(dim=-1)  # [E]
    return bool(((own + fewest) < k).any())


def constrained_top_k_plus_one(
    logits: torch.Tensor, k: int, candidates: torch.Tensor, top_t: int, allowed: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """C2R selection for LLaMA-MoE's gate (the official LLaMA-MoE rule): ``k + 1`` candidates from (noisy) logits.

    The top-1 expert is free; then the ``k`` highest-logit experts among the first ``top_t`` of its list: the first
    ``k`` columns are the selection (the top-1 expert and its ``k - 1`` best collaborators), column ``k`` the best
    excluded collaborator (the threshold of the noisy load estimate).  These are the ``k + 1`` best logits of the
    allowed experts, best first, so they come from the vanilla gate's own call, ``logits.topk(min(k + 1, E),
    dim=1)``, on the masked logits (see :func:`_masked_topk`): ties break as in the vanilla gate and ``top_t = E -
    1`` is vanilla bit for bit.  With ``top_t == 1`` (only for ``k == 2``) the partners are fixed: ``[e1, row[0],
    row[1]]``.

    Args:
        logits (`torch.Tensor` of shape `[N, E]`): gate logits.
        k (`int`): experts per token.
        candidates (`torch.Tensor` of shape `[E, W]`): each expert's first ``max(top_t, 2)`` collaborators.
        top_t (`int`): T.
        allowed (`torch.Tensor` of shape `[E, E]`, bool, *optional*): :func:`allowed_table` of
            ``candidates[:, :top_t]``, built once at patch time; built here when not given.

    Returns:
        `(top_logits [N, k+1], top_indices [N, k+1])`, the contract of the gate's ``select_experts``.
    """
    if top_t == 1:
        top1 = logits.argmax(dim=-1, keepdim=True)  # [N, 1]
        rest = candidates[top1.squeeze(1), :2]  # [N, 2] fixed partners (official special case, k == 2)
        indices = torch.cat([top1, rest], dim=1)  # [N, k+1]
        return logits.gather(1, indices), indices
    if allowed is None:
        allowed = allowed_table(candidates[:, :top_t], logits.shape[-1])
    return _masked_topk(logits, min(k + 1, logits.shape[-1]), allowed, selected=k)


@dataclass
class C2RPlan:
    """Validated C2R tables for one model, ready to install."""

    top_t: int
    tables: dict[int, torch.Tensor] = field(default_factory=dict)
    """Absolute MoE-layer index → ``[E, T]`` int64 candidate table."""
    vanilla_layers: list[int] = field(default_factory=list)
    """MoE layers whose list entry is ``null``: they keep vanilla routing."""
    aux_loss: str = "actual"


def _load_list_file(config: C2RConfig, file: str, base_dir: Path | None) -> list:
    """The list in ``file`` (``config.path``): a bare list, or a dict's ``collaborative_list`` (a config.json)."""
    where = f"{config.field_prefix}path"
    data = read_json_beside(file, base_dir, where)
    listed = data.get("collaborative_list") if isinstance(data, dict) else data
    if not isinstance(listed, list):
        raise ValueError(f"{where}: {file} holds no 'collaborative_list' list")
    return listed


def _check_top_t(top_t: int, num_experts: int, top_k: int, name: str, kind: str, group_note: str = "") -> None:
    if top_t == num_experts:
        raise ValueError(
            f"{name}: top_t = {top_t} = number of experts would let the top-1 expert be chosen again (the official "
            f"code's duplicate-expert bug); use at most E-1 = {num_experts - 1}, which equals vanilla top-k"
        )
    if kind == "logits_top_k_plus_one":  # LLaMA-MoE: k of row[:T] (one spare), or the fixed pair of T = 1
        if top_t == 1 and top_k == 2:
            return
        low, rule = top_k, " (LLaMA-MoE's gate takes k of the first T; top_t = 1 only with top-2)"
    else:
        low, rule = max(1, top_k - 1), group_note
    if not low <= top_t <= num_experts - 1:
        raise ValueError(f"{name}: top_t must be in [{low}, {num_experts - 1}] for top-{top_k} of {num_experts} "
                         f"experts{rule}, got {top_t}")


def _layer_table(entry: Any, layer: int, num_experts: int, top_t: int, name: str, width: int) -> torch.Tensor:
    """Validate one MoE layer's ``[E][E]`` (or ``[E][T]``) ranking; return the ``[E, width]`` candidates."""
    where = f"{name}[{layer}]"
    if not isinstance(entry, list) or len(entry) != num_experts:
        got = f"{len(entry)} rows" if isinstance(entry, list) else repr(type(entry).__name__)
        raise ValueError(f"{where}: expected {num_experts} rows (one per expert), got {got}")
    row_length = None
    for expert, row in enumerate(entry):
        if not isinstance(row, list) or len(row) not in (num_experts, max(top_t, width)):
            got = f"length {len(row)}" if isinstance(row, list) else type(row).__name__
            raise ValueError(f"{where}[{expert}]: expected a ranking of all {num_experts} experts (or its first "
                             f"top_t = {top_t}), got {got}")
        if row_length is not None and len(row) != row_length:
            raise ValueError(f"{where}[{expert}]: rows of one layer must have the same length ({row_length})")
        row_length = len(row)
        for position, value in enumerate(row):
            if type(value) is not int:
                raise ValueError(f"{where}[{expert}][{position}]: expected an expert id, got {value!r}")
    table = torch.tensor(entry, dtype=torch.int64)  # [E, width]
    bad = (table < 0) | (table >= num_experts)
    if bad.any():
        expert, position = (int(i) for i in bad.nonzero()[0])
        raise ValueError(f"{where}[{expert}][{position}]: expert id {int(table[expert, position])} is out of range "
                         f"[0, {num_experts})")
    ordered = table.sort(dim=1).values
    repeated = (ordered[:, 1:] == ordered[:, :-1]).any(dim=1)
    if repeated.any():
        expert = int(repeated.nonzero()[0])
        row = ordered[expert]
        duplicate = int(row[1:][row[1:] == row[:-1]][0])
        raise ValueError(f"{where}[{expert}]: expert {duplicate} appears more than once")
    candidates = table[:, :width]
    own = (candidates == torch.arange(num_experts).unsqueeze(1)).any(dim=1)
    if own.any():
        expert = int(own.nonzero()[0])
        position = int((candidates[expert] == expert).nonzero()[0])
        raise ValueError(f"{where}[{expert}]: lists expert {expert} itself at position {position}, before the "
                         f"top_t = {top_t} cut (an expert cannot collaborate with itself)")
    return candidates.contiguous()


def _group_note(model: MoEModel) -> str:
    """What a group-limited router's ``top_t`` must allow for, in words (empty without a group limit)."""
    first = next(layer for layer in model.layers if layer.index not in model.hashed_layers)
    settings = layer_settings(model, first)
    if settings.group_limit is None:
        return ""
    groups, kept = settings.groups, settings.kept_groups
    return (f" (the router's group limit keeps {kept} of {groups} groups: the allowed set must still hold the k "
            "experts — where the kept groups hold fewer of them, C2R takes the best allowed experts outside them)")


def plan_c2r(model: MoEModel, config: C2RConfig, base_dir: Path | None = None) -> C2RPlan:
    """Validate ``config`` against ``model`` and build the per-layer candidate tables (no model change).

    The list is indexed by **absolute decoder layer**: it must have one entry per decoder layer; entries of dense
    layers are ignored; a ``null`` entry for a MoE layer keeps that layer's vanilla routing.

    Raises:
        ValueError: naming the field, the layer and the expert of the first problem.
    """
    prefix = config.field_prefix
    model.require_routing_rule(f"{prefix}top_t")
    kind = model.family.selection_kind
    _check_top_t(config.top_t, model.num_experts, model.top_k, f"{prefix}top_t", kind, _group_note(model))
    for layer in model.layers:
        problem = selection_seam_problem(model.family, layer.router, layer.block)
        if problem is not None:
            raise ValueError(f"{prefix}top_t: cannot constrain the router of layer {layer.index}: {problem}; load the "
                             "checkpoint with moepatch.from_pretrained to get moepatch's implementation")
    width = max(config.top_t, 2) if kind == "logits_top_k_plus_one" and config.top_t == 1 else config.top_t
    name = f"{prefix}collaborative_list"
    if config.path is not None:
        listed = _load_list_file(config, config.path, base_dir)
    elif config.collaborative_list is not None:
        listed = config.collaborative_list
    else:  # parse refuses this: exactly one of the two is given
        raise ValueError(f"{name}: give the list, or a path to a file holding it")
    if len(listed) != model.num_layers:
        raise ValueError(f"{name}: has {len(listed)} layer entries but the model has {model.num_layers} decoder "
                         f"layers (the list is indexed by absolute layer; give dense layers any entry or null)")
    plan = C2RPlan(top_t=config.top_t, aux_loss=config.aux_loss)
    for index in model.moe_layer_indices:
        entry = listed[index]
        if index in model.hashed_layers and entry is not None:
            raise ValueError(f"{name}[{index}]: layer {index}'s router ({type(model.layer(index).router).__name__}) "
                             "chooses by a fixed hash of the token id: there is no learned choice for C2R to "
                             "constrain; give null for this layer")
        if entry is None:
            plan.vanilla_layers.append(index)
        else:
            plan.tables[index] = _layer_table(entry, index, model.num_experts, config.top_t, name, width)
    return plan


def _selector_for(layer: MoELayer, model: MoEModel, top_t: int) -> Callable[..., tuple[torch.Tensor, torch.Tensor]]:
    """The C2R selection step of ``layer`` in the family's contract (the buffers are read at call time: they follow
    ``.to()``)."""
    router = layer.router
    if model.family.selection_kind == "logits_top_k_plus_one":

        def select_plus_one(logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            candidates, allowed = getattr(router, CANDIDATES_BUFFER), getattr(router, ALLOWED_BUFFER)
            return constrained_top_k_plus_one(logits, model.top_k, candidates, top_t, allowed)

        return select_plus_one

    def allowed_for(first: torch.Tensor) -> torch.Tensor:  # rules that choose themselves (sparsemixer, product keys)
        return getattr(router, ALLOWED_BUFFER)[first]

    allowed = getattr(router, ALLOWED_BUFFER)
    select: Callable[..., tuple[torch.Tensor, torch.Tensor]]
    if bool(allowed.all()):  # every row allows every expert (top_t = E - 1): the family's own selection, exactly
        vanilla = vanilla_selector(model.family.routing)

        def select_vanilla(probs: torch.Tensor, k: int, **_: Any) -> tuple[torch.Tensor, torch.Tensor]:
            return vanilla(probs, k)

        select = select_vanilla
    else:
        settings = layer_settings(model, layer)
        groups, kept_groups = settings.groups, settings.kept_groups  # both set where a group limit is
        may_starve = (settings.group_limit is not None and groups is not None and kept_groups is not None
                      and group_limit_can_starve(allowed, groups, kept_groups, model.top_k))
        sorted_topk = model.family.routing.sorted_topk

        def select_constrained(probs: torch.Tensor, k: int, ungrouped: torch.Tensor | None = None,
                               kept: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
            return constrained_topk(probs, k, getattr(router, ALLOWED_BUFFER), sorted=sorted_topk,
                                    ungrouped=ungrouped if may_starve else None, kept=kept,
                                    restricted=getattr(router, RESTRICTED_BUFFER))

        select = select_constrained
    select.__dict__["allowed_for"] = allowed_for  # a function attribute the routing rules read (getattr)
    return select


def install_c2r(model: MoEModel, plan: C2RPlan, undo: UndoLog) -> list[str]:
    """Attach the candidate and allowed-expert buffers (non-persistent, built once here), override the selection of
    the planned layers and fix the aux loss."""
    for index, table in plan.tables.items():
        router = model.layer(index).router
        candidates = table.to(device_of(router))  # [E, T] (LLaMA-MoE's top_t = 1: [E, 2])
        undo.add_buffer(router, CANDIDATES_BUFFER, candidates)
        allowed = allowed_table(candidates[:, : plan.top_t], model.num_experts)
        undo.add_buffer(router, ALLOWED_BUFFER, allowed)
        undo.add_buffer(router, RESTRICTED_BUFFER, ~allowed.all(dim=-1))
    patched = override_selection(
        model, lambda layer: _selector_for(layer, model, plan.top_t), sorted(plan.tables), undo
    )
    if plan.aux_loss == "actual" and plan.tables:
        install_actual_choice_aux_loss(model, undo)
    return patched
