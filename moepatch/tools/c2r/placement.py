"""Collaboration-aware expert placement for expert parallelism (C2R, Zhang et al., NAACL 2025).

With expert parallelism over ``D`` devices, every device hosts ``E / D`` experts.  Under per-device de-duplicated
dispatch a token is sent once to every *distinct* device holding one of its ``k`` experts, so all-to-all volume is
proportional to the mean number of distinct devices per token ("copies per token", Occult's CT).  Grouping experts
that are often chosen together onto the same device lowers that number; C2R routing (small Top-T) makes the
co-activation matrix more concentrated, which is what makes such a grouping pay off.

Definitions used throughout this module (``C`` = one layer's ``[E, E]`` co-activation matrix as profiled, see
the C2R profiling definition):

* The **diagonal is ignored**: official files hold 0 or -1 there, and a token never picks the same expert twice.
* The pair weight is the symmetrised off-diagonal count ``w[i, j] = (C[i, j] + C[j, i]) / 2`` for ``i != j``.  For a
  profiled (symmetric) matrix this is exactly the number of tokens whose top-k contains both ``i`` and ``j``; an
  upper-triangular matrix (pairs counted once) gives half of it, which leaves every ratio below unchanged.
* The **intra-group co-activation** of a placement is ``sum(w[i, j] for i < j in the same group)``; the planners
  below maximise it.  Its **fraction** is that sum divided by the total ``sum(w[i, j] for i < j)``; for top-2 it is
  the fraction of tokens served by a single device.
* A **placement** is a list of ``D`` groups of expert ids; a valid one is a partition of ``range(E)`` into groups of
  equal size ``E / D`` (what expert parallelism can host).  Functions returning placements return them in canonical
  order: each group sorted ascending, groups ordered by their smallest expert.

**Routing groups.**  A group-limited router (DeepSeek-V3's ``n_group`` / ``topk_group``) splits its experts into ``G``
equal ranges of contiguous ids and chooses only within the best few ranges.  A renumbering that moves an expert to
another range changes the routing, so with ``routing_groups=G`` the planners only return placements that a renumbering
*within* routing groups realises under contiguous sharding: device ``d`` hosts new ids ``[d·E/D, (d+1)·E/D)``, and
each routing group's ids map onto themselves.  How much freedom that leaves depends on ``D`` vs ``G``
(:func:`routing_group_note`): with ``D <= G`` (``G/D`` whole groups per device) none — the plan is the contiguous
placement, routing groups → devices, which is also what node-limited routing is designed for; with ``D > G`` each
group is split over ``D/G`` devices and planned on its own; devices that straddle group boundaries are planned by a
search that only swaps experts of one group.  Such placements are returned in **device order** (group ``d`` of the
result is device ``d``), not canonical order.

Every function accepts ``torch.Tensor`` or ``numpy`` input and works in float64 ``numpy`` internally (integer counts
up to 2**53 stay exact, so ties and optima are decided exactly).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterator
from collections.abc import Mapping
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

ArrayLike = torch.Tensor | np.ndarray | Sequence[Any]
"""A torch tensor, a numpy array or nested Python lists; converted with :func:`_as_numpy`."""

Placement = list[list[int]]
"""``D`` groups of expert ids; group ``d`` is hosted by device ``d``."""

DEFAULT_MAX_PARTITIONS = 2_000_000
"""Largest number of partitions :func:`exhaustive_placement` enumerates (about a minute of pure Python)."""


# ----------------------------------------------------------------------------------------------------------------
# Input handling and validation
# ----------------------------------------------------------------------------------------------------------------


def _as_numpy(array: ArrayLike) -> np.ndarray:
    """Convert a tensor (any device), an array or nested lists to a numpy array without copying when possible."""
    if isinstance(array, torch.Tensor):
        return array.detach().cpu().numpy()
    return np.asarray(array)


def _pair_weights(matrix: ArrayLike) -> np.ndarray:
    """Symmetrised off-diagonal pair weights ``w`` (float64 ``[E, E]``, zero diagonal) of one layer's matrix.

    Args:
        matrix (`ArrayLike`): ``[E, E]`` co-activation counts; the diagonal is ignored.

    Returns:
        `np.ndarray`: ``(C + C.T) / 2`` with the diagonal set to 0.

    Raises:
        ValueError: if the matrix is not square 2-D, not finite, or has a negative off-diagonal entry (a count cannot
            be negative, and the planners assume that adding an expert to a group never lowers its weight).
    """
    values = _as_numpy(matrix)
    if values.ndim != 2 or values.shape[0] != values.shape[1]:
        raise ValueError(f"expected one layer's square [E, E] co-activation matrix, got shape {tuple(values.shape)}")
    if values.shape[0] == 0:
        raise ValueError("the co-activation matrix is empty (E = 0)")
    if values.dtype == np.bool_ or not np.issubdtype(values.dtype, np.number):
        raise ValueError(f"co-activation counts must be numeric, got dtype {values.dtype}")
    weights = values.astype(np.float64)
    np.fill_diagonal(weights, 0.0)
    if not np.all(np.isfinite(weights)):
        raise ValueError("the co-activation matrix has non-finite off-diagonal entries")
    weights = (weights + weights.T) / 2.0
    negative = np.argwhere(weights < 0)
    if negative.size:
        row, col = (int(x) for x in negative[0])
        raise ValueError(
            f"co-activation counts must be non-negative off the diagonal; symmetrised entry ({row}, {col}) is "
            f"{weights[row, col]}"
        )
    return weights


def _check_ep_size(num_experts: int, ep_size: int) -> int:
    """Validate the expert-parallel degree and return the group size ``E / D``."""
    if isinstance(num_experts, bool) or not isinstance(num_experts, (int, np.integer)) or num_experts < 1:
        raise ValueError(f"num_experts must be a positive integer, got {num_experts!r}")
    if isinstance(ep_size, bool) or not isinstance(ep_size, (int, np.integer)) or ep_size < 1:
        raise ValueError(f"ep_size must be a positive integer, got {ep_size!r}")
    if num_experts % ep_size != 0:
        raise ValueError(
            f"num_experts ({num_experts}) is not divisible by ep_size ({ep_size}): expert parallelism needs the same "
            f"number of experts on every device"
        )
    return int(num_experts) // int(ep_size)


def _check_partition(groups: Sequence[Sequence[int]], num_experts: int) -> list[list[int]]:
    """Check that ``groups`` is a partition of ``range(num_experts)`` into non-empty groups; return it as int lists.

    Raises:
        ValueError: naming the first problem (not a list of groups, an empty group, a non-integer id, an id out of
            range, an expert placed twice, experts placed nowhere).
    """
    if isinstance(groups, (str, bytes)) or not isinstance(groups, Sequence):
        raise ValueError(f"a placement must be a list of groups (lists of expert ids), got {type(groups).__name__}")
    seen: dict[int, int] = {}
    result: list[list[int]] = []
    for group_index, group in enumerate(groups):
        if isinstance(group, (str, bytes)) or not isinstance(group, (Sequence, np.ndarray)):
            raise ValueError(f"group {group_index} is not a list of expert ids: {group!r}")
        if len(group) == 0:
            raise ValueError(f"group {group_index} is empty")
        members: list[int] = []
        for expert in group:
            if isinstance(expert, (bool, np.bool_)) or not isinstance(expert, (int, np.integer)):
                raise ValueError(f"group {group_index} holds a non-integer expert id {expert!r}")
            expert = int(expert)
            if not 0 <= expert < num_experts:
                raise ValueError(f"group {group_index} holds expert {expert}, outside range(0, {num_experts})")
            if expert in seen:
                raise ValueError(
                    f"expert {expert} is placed twice (groups {seen[expert]} and {group_index}); a placement must "
                    f"be a partition of the experts"
                )
            seen[expert] = group_index
            members.append(expert)
        result.append(members)
    missing = [expert for expert in range(num_experts) if expert not in seen]
    if missing:
        raise ValueError(f"experts {missing} are not placed on any device; a placement must cover all experts")
    return result


def _canonical(groups: Sequence[Sequence[int]]) -> Placement:
    """Sort each group ascending and order groups by their smallest expert (so equal placements compare equal)."""
    return sorted((sorted(int(expert) for expert in group) for group in groups), key=lambda group: group[0])


def _group_ids(groups: Sequence[Sequence[int]], num_experts: int) -> np.ndarray:
    """``[E]`` array mapping each expert to the index of its group (device)."""
    group_of = np.empty(num_experts, dtype=np.int64)
    for group_index, group in enumerate(groups):
        group_of[list(group)] = group_index
    return group_of


def validate_placement(
    groups: Sequence[Sequence[int]], num_experts: int, ep_size: int, *, routing_groups: int | None = None
) -> None:
    """Check that ``groups`` is a placement expert parallelism can host.

    Args:
        groups (`Sequence[Sequence[int]]`): one list of expert ids per device.
        num_experts (`int`): number of experts ``E`` of the layer.
        ep_size (`int`): expert-parallel degree ``D``.
        routing_groups (`int`, *optional*): ``G`` of a group-limited router; the placement, in device order, must then
            be realisable by a renumbering within routing groups (see the module docstring).

    Raises:
        ValueError: if ``E`` is not divisible by ``D``, the number of groups is not ``D``, the groups are not a
            partition of ``range(E)`` (duplicate, missing or out-of-range ids) or do not all hold ``E / D`` experts,
            or the renumbering :func:`expert_permutation` gives moves an expert out of its routing group.
    """
    group_size = _check_ep_size(num_experts, ep_size)
    if isinstance(groups, (str, bytes)) or not isinstance(groups, Sequence):
        raise ValueError(f"a placement must be a list of groups (lists of expert ids), got {type(groups).__name__}")
    if len(groups) != ep_size:
        raise ValueError(f"expected {ep_size} groups (one per device), got {len(groups)}")
    members = _check_partition(groups, num_experts)
    sizes = [len(group) for group in members]
    if any(size != group_size for size in sizes):
        raise ValueError(
            f"every device must host num_experts / ep_size = {group_size} experts, got group sizes {sizes}"
        )
    count = _check_routing_groups(num_experts, routing_groups)
    if count is not None:
        crossings = group_crossings(expert_permutation(members), count)
        if crossings:
            new, old = crossings[0]
            size = num_experts // count
            raise ValueError(
                f"the placement needs new expert {new} (routing group {new // size}) to be old expert {old} (routing "
                f"group {old // size}): with {count} routing groups a renumbering must keep every expert in its group"
            )


# ----------------------------------------------------------------------------------------------------------------
# Routing groups of group-limited routers
# ----------------------------------------------------------------------------------------------------------------


def _check_routing_groups(num_experts: int, routing_groups: int | None) -> int | None:
    """Validate ``G``; ``None`` when it does not constrain anything (``None`` or a single group)."""
    if routing_groups is None:
        return None
    if isinstance(routing_groups, bool) or not isinstance(routing_groups, (int, np.integer)) or routing_groups < 1:
        raise ValueError(f"routing_groups must be a positive integer, got {routing_groups!r}")
    if num_experts % routing_groups:
        raise ValueError(f"routing_groups ({routing_groups}) does not divide the {num_experts} experts into equal "
                         "routing groups")
    return None if routing_groups == 1 else int(routing_groups)


def group_crossings(permutation: Sequence[int], routing_groups: int) -> list[tuple[int, int]]:
    """``(new id, old id)`` pairs of a renumbering (``permutation[new] = old``) that move an expert to another
    routing group (expert ``e`` is in group ``e // (E / G)``); empty when it keeps every expert in its group.

    Raises:
        ValueError: if ``routing_groups`` does not divide ``len(permutation)``.
    """
    count = _check_routing_groups(len(permutation), routing_groups)
    if count is None:
        return []
    size = len(permutation) // count
    return [(new, int(old)) for new, old in enumerate(permutation) if new // size != int(old) // size]


def routing_group_note(num_experts: int, ep_size: int, routing_groups: int) -> str:
    """What keeping experts inside ``G`` routing groups leaves to plan over ``D`` devices, in words."""
    per_device, per_group = num_experts // ep_size, num_experts // routing_groups
    if per_device % per_group == 0:
        return (f"each device hosts {per_device // per_group} whole routing group(s) of {per_group} experts, and a "
                "renumbering within groups cannot change which experts share a device: the plan is the contiguous "
                "placement (routing groups -> devices)")
    if per_group % per_device == 0:
        return (f"each routing group of {per_group} experts spans {per_group // per_device} devices; the plan "
                "co-locates co-activated experts inside each group")
    return (f"devices ({per_device} experts) straddle routing groups ({per_group} experts); the plan only exchanges "
            "experts of one group between devices")


# ----------------------------------------------------------------------------------------------------------------
# Placements and objective
# ----------------------------------------------------------------------------------------------------------------


def contiguous_placement(num_experts: int, ep_size: int) -> Placement:
    """The default expert-parallel placement: experts ``0 .. E/D - 1`` on device 0, the next block on device 1, ...

    Args:
        num_experts (`int`): number of experts ``E``.
        ep_size (`int`): expert-parallel degree ``D``; must divide ``E``.

    Returns:
        `list[list[int]]`: ``D`` consecutive blocks of ``E / D`` expert ids.

    Raises:
        ValueError: if ``D`` does not divide ``E`` or either is not a positive integer.
    """
    group_size = _check_ep_size(num_experts, ep_size)
    return [list(range(start, start + group_size)) for start in range(0, int(num_experts), group_size)]


def intra_group_coactivation(matrix: ArrayLike, groups: Sequence[Sequence[int]]) -> float:
    """Co-activation mass kept inside devices by a placement (the quantity the planners maximise).

    Defined as ``sum(w[i, j] for i < j in the same group)`` with ``w = (C + C.T) / 2`` off the diagonal (the
    diagonal of ``C`` is ignored).  For a symmetric top-2 profile it is the number of tokens whose two experts sit
    on the same device.

    Args:
        matrix (`ArrayLike`): one layer's ``[E, E]`` co-activation counts.
        groups (`Sequence[Sequence[int]]`): a partition of ``range(E)`` (equal sizes not required).

    Returns:
        `float`: the intra-group pair weight.

    Raises:
        ValueError: for a malformed matrix or groups that are not a partition of the experts.
    """
    weights = _pair_weights(matrix)
    members = _check_partition(groups, weights.shape[0])
    return float(sum(weights[np.ix_(group, group)].sum() / 2.0 for group in members))


def _total_pair_weight(weights: np.ndarray) -> float:
    """``sum(w[i, j] for i < j)``: the whole co-activation mass of a layer."""
    return float(weights.sum() / 2.0)


def count_equal_partitions(num_experts: int, ep_size: int) -> int:
    """Number of ways to split ``E`` experts into ``D`` unlabeled groups of ``E / D``: ``E! / ((E/D)!^D D!)``.

    Devices are interchangeable for the objective, so partitions differing only by the order of groups count once
    (``E = 8``: 35 for ``D = 2``, 105 for ``D = 4``).

    Raises:
        ValueError: if ``D`` does not divide ``E``.
    """
    group_size = _check_ep_size(num_experts, ep_size)
    return math.factorial(num_experts) // (math.factorial(group_size) ** ep_size * math.factorial(ep_size))


# ----------------------------------------------------------------------------------------------------------------
# Exact search
# ----------------------------------------------------------------------------------------------------------------


def _canonical_partitions(remaining: tuple[int, ...], group_size: int) -> Iterator[list[tuple[int, ...]]]:
    """Yield every partition of ``remaining`` into groups of ``group_size`` exactly once.

    The first group always contains the smallest remaining expert, which removes the ``D!`` relabelings of the same
    partition without any bookkeeping.
    """
    if not remaining:
        yield []
        return
    first, rest = remaining[0], remaining[1:]
    for companions in itertools.combinations(rest, group_size - 1):
        chosen = set(companions)
        left = tuple(expert for expert in rest if expert not in chosen)
        for tail in _canonical_partitions(left, group_size):
            yield [(first, *companions), *tail]


def exhaustive_placement(matrix: ArrayLike, ep_size: int, *, max_partitions: int = DEFAULT_MAX_PARTITIONS) -> Placement:
    """Exact optimum of the intra-group co-activation over all equal-size placements.

    Enumerates every canonical partition (see :func:`count_equal_partitions`) and keeps the first one with the
    largest objective in enumeration order, so the result is deterministic.  Meant for small ``E`` (LLaMA-MoE's 8
    experts) and as the reference the heuristic of :func:`plan_placement` is tested against.

    Args:
        matrix (`ArrayLike`): one layer's ``[E, E]`` co-activation counts (diagonal ignored).
        ep_size (`int`): expert-parallel degree ``D``; must divide ``E``.
        max_partitions (`int`, *optional*, defaults to 2,000,000): refuse to enumerate more partitions than this.

    Returns:
        `list[list[int]]`: an optimal placement in canonical order.

    Raises:
        ValueError: for a malformed matrix, a ``D`` that does not divide ``E``, or more than ``max_partitions``
            partitions (the message gives the count; use :func:`plan_placement` instead).
    """
    weights = _pair_weights(matrix)
    num_experts = weights.shape[0]
    group_size = _check_ep_size(num_experts, ep_size)
    partitions = count_equal_partitions(num_experts, ep_size)
    if partitions > max_partitions:
        raise ValueError(
            f"exhaustive placement of {num_experts} experts on {ep_size} devices would enumerate {partitions:,} "
            f"partitions (limit {max_partitions:,}); use plan_placement for a heuristic placement"
        )
    group_weight_cache: dict[tuple[int, ...], float] = {}

    def group_weight(group: tuple[int, ...]) -> float:
        cached = group_weight_cache.get(group)
        if cached is None:
            cached = float(sum(weights[i, j] for i, j in itertools.combinations(group, 2)))
            group_weight_cache[group] = cached
        return cached

    best_value = -math.inf
    best: list[tuple[int, ...]] = []
    for partition in _canonical_partitions(tuple(range(num_experts)), group_size):
        value = sum(group_weight(group) for group in partition)
        if value > best_value:
            best_value, best = value, partition
    return _canonical(best)


# ----------------------------------------------------------------------------------------------------------------
# Heuristic search
# ----------------------------------------------------------------------------------------------------------------


def _greedy_groups(weights: np.ndarray, ep_size: int, group_size: int) -> np.ndarray:
    """Greedy construction: seed each group with the strongest pair left, then add the most attached expert.

    Groups are filled one after another, so early groups get the strongest clusters; the local search repairs what
    the last groups lose.  Ties go to the lowest expert id (``argmax``), so the result is deterministic.

    Returns:
        `np.ndarray`: ``[E]`` group index of every expert.
    """
    num_experts = weights.shape[0]
    group_of = np.full(num_experts, -1, dtype=np.int64)
    unassigned = np.ones(num_experts, dtype=bool)
    for group_index in range(ep_size):
        free = np.flatnonzero(unassigned)
        if group_index == ep_size - 1 or group_size == 1:
            members = list(free[:group_size])
        else:
            block = weights[np.ix_(free, free)]
            upper = np.triu(np.ones_like(block, dtype=bool), k=1)
            flat = int(np.argmax(np.where(upper, block, -np.inf)))
            members = [int(free[flat // len(free)]), int(free[flat % len(free)])]
            unassigned[members] = False
            affinity = weights[:, members].sum(axis=1)
            while len(members) < group_size:
                candidate = int(np.argmax(np.where(unassigned, affinity, -np.inf)))
                members.append(candidate)
                unassigned[candidate] = False
                affinity += weights[:, candidate]
        group_of[members] = group_index
        unassigned[members] = False
    return group_of


def _group_affinity(weights: np.ndarray, group_of: np.ndarray, ep_size: int) -> np.ndarray:
    """``[E, D]`` matrix: total pair weight between each expert and the members of each group."""
    one_hot = np.zeros((weights.shape[0], ep_size), dtype=np.float64)
    one_hot[np.arange(weights.shape[0]), group_of] = 1.0
    return weights @ one_hot


def _objective(weights: np.ndarray, group_of: np.ndarray) -> float:
    """Intra-group pair weight of an assignment vector (``sum(w[i, j] for i < j in the same group)``)."""
    same_group = group_of[:, None] == group_of[None, :]
    return float(weights[same_group].sum() / 2.0)


def _kernighan_lin(
    weights: np.ndarray, group_of: np.ndarray, ep_size: int, tolerance: float, swappable: np.ndarray | None = None
) -> np.ndarray:
    """Improve an equal-size assignment with Kernighan–Lin passes of pairwise swaps between groups.

    A pass repeatedly applies the best swap of two unlocked experts from different groups — even if it lowers the
    objective, which lets the search climb out of local optima — and locks both.  The pass is then rolled back to
    its best prefix; passes repeat while that prefix improves the objective by more than ``tolerance``.  Swapping
    keeps every group at its size, so the result is still a valid placement.  ``swappable`` (``[E, E]`` bool) restricts
    the swaps to the pairs it allows (experts of one routing group).

    The gain of swapping ``a`` (group ``A``) with ``b`` (group ``B``) is
    ``M[a, B] + M[b, A] - M[a, A] - M[b, B] - 2 w[a, b]`` with ``M`` the expert-to-group affinity, computed for all
    pairs at once; ``M`` is updated in ``O(E)`` per swap.

    Returns:
        `np.ndarray`: the improved ``[E]`` group index of every expert.
    """
    num_experts = weights.shape[0]
    group_of = group_of.copy()
    experts = np.arange(num_experts)
    max_swaps = num_experts // 2
    while True:
        affinity = _group_affinity(weights, group_of, ep_size)
        locked = np.zeros(num_experts, dtype=bool)
        cumulative_gain = 0.0
        best_gain = 0.0
        best_assignment = group_of.copy()
        for _ in range(max_swaps):
            own = affinity[experts, group_of]
            cross = affinity[:, group_of]  # cross[a, b] = affinity of a to b's group
            gains = cross + cross.T - own[:, None] - own[None, :] - 2.0 * weights
            forbidden = (group_of[:, None] == group_of[None, :]) | locked[:, None] | locked[None, :]
            if swappable is not None:
                forbidden |= ~swappable
            if forbidden.all():
                break
            gains[forbidden] = -np.inf
            flat = int(np.argmax(gains))
            first, second = flat // num_experts, flat % num_experts
            first_group, second_group = group_of[first], group_of[second]
            delta = weights[:, second] - weights[:, first]
            affinity[:, first_group] += delta
            affinity[:, second_group] -= delta
            group_of[first], group_of[second] = second_group, first_group
            locked[[first, second]] = True
            cumulative_gain += float(gains[first, second])
            if cumulative_gain > best_gain + tolerance:
                best_gain = cumulative_gain
                best_assignment = group_of.copy()
        group_of = best_assignment
        if best_gain <= tolerance:
            return group_of


def plan_placement(
    matrix: ArrayLike,
    ep_size: int,
    *,
    seed: int = 0,
    restarts: int = 8,
    exhaustive_limit: int = 20000,
    routing_groups: int | None = None,
) -> Placement:
    """Plan an equal-size placement that keeps frequently co-activated experts on the same device.

    When there are at most ``exhaustive_limit`` partitions (``E = 8``: 35 for ``D = 2``, 105 for ``D = 4``) the
    exact optimum of :func:`exhaustive_placement` is returned.  Otherwise a heuristic runs ``restarts`` local
    searches (:func:`_kernighan_lin`) from different starts and keeps the best:

    * start 0: greedy construction (strongest remaining pair seeds a group, then the expert most attached to the
      group joins it);
    * start 1: the contiguous placement, so the plan is never worse than the default sharding;
    * further starts alternate greedy construction on randomly perturbed weights and uniformly random placements,
      drawn from ``numpy.random.default_rng(seed)``.

    Ties between restarts go to the earliest, so the result is deterministic for a given ``seed``.

    Args:
        matrix (`ArrayLike`): one layer's ``[E, E]`` co-activation counts (diagonal ignored, symmetrised).
        ep_size (`int`): expert-parallel degree ``D``; must divide ``E``.
        seed (`int`, *optional*, defaults to 0): seed of the randomised restarts.
        restarts (`int`, *optional*, defaults to 8): number of local searches of the heuristic (at least 1).
        exhaustive_limit (`int`, *optional*, defaults to 20000): largest partition count solved exactly; 0 forces
            the heuristic.
        routing_groups (`int`, *optional*): ``G`` of a group-limited router: plan only placements a renumbering
            within routing groups realises (:func:`_plan_within_routing_groups`); ``None`` or 1: no constraint.

    Returns:
        `list[list[int]]`: the placement in canonical order (groups sorted, ordered by smallest expert); with
        ``routing_groups`` in device order (each group sorted), so that :func:`expert_permutation` keeps every expert
        in its routing group.

    Raises:
        ValueError: for a malformed matrix, a ``D`` that does not divide ``E``, a ``G`` that does not divide ``E``
            or ``restarts < 1``.
    """
    if isinstance(restarts, bool) or not isinstance(restarts, int) or restarts < 1:
        raise ValueError(f"restarts must be a positive integer, got {restarts!r}")
    weights = _pair_weights(matrix)
    num_experts = weights.shape[0]
    group_size = _check_ep_size(num_experts, ep_size)
    count = _check_routing_groups(num_experts, routing_groups)
    if count is not None:
        return _plan_within_routing_groups(weights, ep_size, count, seed=seed, restarts=restarts,
                                           exhaustive_limit=exhaustive_limit)
    if group_size == 1 or ep_size == 1:
        return contiguous_placement(num_experts, ep_size)
    if count_equal_partitions(num_experts, ep_size) <= exhaustive_limit:
        return exhaustive_placement(weights, ep_size)

    generator = np.random.default_rng(seed)
    total = _total_pair_weight(weights)
    tolerance = 1e-12 * max(total, 1.0)
    contiguous = np.repeat(np.arange(ep_size), group_size)
    best_value = -math.inf
    best_assignment = contiguous
    for restart in range(restarts):
        if restart == 0:
            start = _greedy_groups(weights, ep_size, group_size)
        elif restart == 1:
            start = contiguous
        elif restart % 2 == 0:
            noise = generator.uniform(0.5, 1.5, size=weights.shape)
            start = _greedy_groups(weights * (noise + noise.T) / 2.0, ep_size, group_size)
        else:
            start = contiguous[generator.permutation(num_experts)]
        assignment = _kernighan_lin(weights, start, ep_size, tolerance)
        value = _objective(weights, assignment)
        if value > best_value + tolerance:
            best_value, best_assignment = value, assignment
    return _canonical([np.flatnonzero(best_assignment == group).tolist() for group in range(ep_size)])


def _plan_within_routing_groups(
    weights: np.ndarray, ep_size: int, routing_groups: int, *, seed: int, restarts: int, exhaustive_limit: int
) -> Placement:
    """Best placement realisable by a renumbering within ``G`` routing groups, in device order.

    Device ranges (``P = E/D`` ids) and routing groups (``S = E/G`` ids) are both contiguous, so the experts split
    into independent blocks of ``lcm(P, S)`` ids that no renumbering within groups can mix and no device crosses.
    Inside a block:

    * one device (``S`` divides ``P``): nothing to choose, the device hosts its whole groups;
    * one routing group over several devices (``P`` divides ``S``): any equal split of the group is realisable, so
      :func:`plan_placement` plans it (exact for small groups) on the group's own matrix;
    * several of each (devices straddle group boundaries): :func:`_plan_straddling`.

    The objective is a sum over devices, so the best blocks make the best placement.
    """
    num_experts = weights.shape[0]
    per_device, per_group = num_experts // ep_size, num_experts // routing_groups
    block = math.lcm(per_device, per_group)
    placement: Placement = []
    for start in range(0, num_experts, block):
        local = weights[start : start + block, start : start + block]
        devices = block // per_device
        if devices == 1:
            planned = [list(range(block))]
        elif block == per_group:
            planned = plan_placement(local, devices, seed=seed, restarts=restarts, exhaustive_limit=exhaustive_limit)
        else:
            planned = _plan_straddling(local, per_device, per_group, seed=seed, restarts=restarts,
                                       exhaustive_limit=exhaustive_limit)
        placement.extend(sorted(start + expert for expert in group) for group in planned)
    return placement


def _group_distributions(members: tuple[int, ...], slots: list[tuple[int, int]]) -> Iterator[list[tuple[int, int]]]:
    """Every way to put ``members`` on devices with fixed counts ``slots = [(device, count), ...]``, as
    ``(expert, device)`` lists."""
    if not slots:
        yield []
        return
    (device, count), rest = slots[0], slots[1:]
    for chosen in itertools.combinations(members, count):
        left = tuple(expert for expert in members if expert not in chosen)
        for tail in _group_distributions(left, rest):
            yield [(expert, device) for expert in chosen] + tail


def _plan_straddling(
    weights: np.ndarray, per_device: int, per_group: int, *, seed: int, restarts: int, exhaustive_limit: int
) -> Placement:
    """One block of :func:`_plan_within_routing_groups` whose devices straddle routing groups, in device order.

    A renumbering within groups puts on device ``d`` exactly as many experts of group ``g`` as the contiguous
    placement does (the overlap of their id ranges); which ones is free.  When the number of such assignments
    (a product of multinomials) is at most ``exhaustive_limit`` they are all scored and the first best is kept;
    otherwise Kernighan–Lin passes that only swap experts of one group run from the contiguous placement and from
    ``restarts - 1`` random shuffles within groups (``numpy.random.default_rng(seed)``).
    """
    size = weights.shape[0]
    devices = size // per_device
    contiguous = np.arange(size) // per_device
    routing = np.arange(size) // per_group
    slots = [[(int(d), int(np.sum(contiguous[routing == g] == d))) for d in range(devices)
              if np.any(contiguous[routing == g] == d)] for g in range(size // per_group)]
    count = math.prod(math.factorial(per_group) // math.prod(math.factorial(c) for _, c in group) for group in slots)
    best_value, best = -math.inf, contiguous
    tolerance = 1e-12 * max(_total_pair_weight(weights), 1.0)
    if count <= exhaustive_limit:
        options = [list(_group_distributions(tuple(range(g * per_group, (g + 1) * per_group)), group))
                   for g, group in enumerate(slots)]
        for choice in itertools.product(*options):
            assignment = np.empty(size, dtype=np.int64)
            for part in choice:
                for expert, device in part:
                    assignment[expert] = device
            value = _objective(weights, assignment)
            if value > best_value + tolerance:
                best_value, best = value, assignment
    else:
        generator = np.random.default_rng(seed)
        swappable = routing[:, None] == routing[None, :]
        for restart in range(restarts):
            start = contiguous.copy()
            if restart:
                for g in range(size // per_group):
                    members = np.flatnonzero(routing == g)
                    start[members] = start[members][generator.permutation(len(members))]
            assignment = _kernighan_lin(weights, start, devices, tolerance, swappable)
            value = _objective(weights, assignment)
            if value > best_value + tolerance:
                best_value, best = value, assignment
    return [np.flatnonzero(best == device).tolist() for device in range(devices)]


# ----------------------------------------------------------------------------------------------------------------
# Copies per token
# ----------------------------------------------------------------------------------------------------------------


def copies_per_token_from_pairs(matrix: ArrayLike, groups: Sequence[Sequence[int]], top_k: int = 2) -> float:
    """Mean number of devices a token is sent to, from a top-2 co-activation matrix.

    With ``k = 2`` every token contributes to exactly one pair, so ``tokens = sum(w[i, j] for i < j)`` and a token
    costs one copy if its pair is on one device, two otherwise: ``copies = 2 - intra / tokens``.

    Args:
        matrix (`ArrayLike`): one layer's ``[E, E]`` co-activation counts (diagonal ignored, symmetrised).
        groups (`Sequence[Sequence[int]]`): a partition of ``range(E)``.
        top_k (`int`, *optional*, defaults to 2): experts per token; only 2 is supported.

    Returns:
        `float`: mean copies per token, between 1 and 2.

    Raises:
        ValueError: if ``top_k != 2`` (pairwise counts do not determine how many distinct devices a token with more
            than two experts reaches: three experts on devices ``{0, 0, 1}`` and ``{0, 1, 2}`` can give the same pair
            totals; use :func:`copies_per_token_from_indices` with the routed indices), if the matrix has no
            off-diagonal mass, or for malformed input.
    """
    if top_k != 2:
        raise ValueError(
            f"copies per token cannot be derived from pairwise co-activation counts for top_k={top_k}: for k > 2 the "
            f"pair counts do not determine how many distinct devices each token reaches; record the routed expert "
            f"indices and use copies_per_token_from_indices instead"
        )
    weights = _pair_weights(matrix)
    tokens = _total_pair_weight(weights)
    if tokens <= 0:
        raise ValueError("the co-activation matrix has no off-diagonal counts, so it describes no top-2 tokens")
    intra = intra_group_coactivation(weights, groups)
    return float(2.0 - intra / tokens)


def device_of_choices(indices: ArrayLike, groups: Sequence[Sequence[int]]) -> np.ndarray:
    """``[N, k]``: the group (device) holding each of the experts ``indices`` chose, after checking both.

    Raises:
        ValueError: if ``indices`` is not a non-empty 2-D integer array, holds ids outside ``range(E)``, or the
            groups are not a partition (``E`` is taken from the groups).
    """
    values = _as_numpy(indices)
    if values.ndim != 2 or values.shape[0] == 0 or values.shape[1] == 0:
        raise ValueError(f"expected non-empty [N, k] expert indices, got shape {tuple(values.shape)}")
    if values.dtype == np.bool_ or not np.issubdtype(values.dtype, np.integer):
        raise ValueError(f"expert indices must be integers, got dtype {values.dtype}")
    num_experts = sum(len(group) for group in groups)
    members = _check_partition(groups, num_experts)
    if values.min() < 0 or values.max() >= num_experts:
        raise ValueError(
            f"expert indices must lie in range(0, {num_experts}), got values from {values.min()} to {values.max()}"
        )
    return _group_ids(members, num_experts)[values]


def copies_per_token_from_indices(indices: ArrayLike, groups: Sequence[Sequence[int]]) -> float:
    """Exact mean number of distinct devices per token from routed expert indices (any ``k``).

    Args:
        indices (`ArrayLike`): ``[N, k]`` integer expert ids chosen for each of ``N`` tokens (one layer).
        groups (`Sequence[Sequence[int]]`): a partition of ``range(E)``; ``E`` is taken from the groups.

    Returns:
        `float`: mean over tokens of the number of distinct groups holding the token's experts.

    Raises:
        ValueError: if ``indices`` is not a non-empty 2-D integer array, holds ids outside ``range(E)``, or the
            groups are not a partition.
    """
    devices = np.sort(device_of_choices(indices, groups), axis=1)
    distinct = 1 + (np.diff(devices, axis=1) != 0).sum(axis=1)
    return float(distinct.mean())


# ----------------------------------------------------------------------------------------------------------------
# Reports
# ----------------------------------------------------------------------------------------------------------------


def placement_report(
    matrices: ArrayLike,
    ep_size: int,
    *,
    top_k: int = 2,
    seed: int = 0,
    layers: Sequence[int] | None = None,
    indices: Mapping[int, ArrayLike] | None = None,
    routing_groups: Mapping[int, int] | None = None,
) -> dict[str, Any]:
    """Plan every layer and compare it with the contiguous placement; JSON-serialisable.

    Copies per token of a layer come from ``indices[layer]`` when given (exact for any ``k``), else from the pair
    counts when ``top_k == 2``, else they are ``None`` (pair counts cannot give them, see
    :func:`copies_per_token_from_pairs`); ``copies_source`` says which.  A mean is ``None`` unless every reported
    layer has the value.

    Args:
        matrices (`ArrayLike`): ``[L, E, E]`` co-activation counts.
        ep_size (`int`): expert-parallel degree ``D``.
        top_k (`int`, *optional*, defaults to 2): experts per token of the profiled model.
        seed (`int`, *optional*, defaults to 0): passed to :func:`plan_placement`.
        layers (`Sequence[int]`, *optional*): indices into the first dimension to report; default all.
        indices (`Mapping[int, ArrayLike]`, *optional*): ``{layer: [N, top_k] routed expert ids}``.
        routing_groups (`Mapping[int, int]`, *optional*): ``{layer: G}`` for layers whose router has a binding group
            limit; their plan keeps every expert in its routing group (:func:`plan_placement`), in device order.

    Returns:
        `dict`: ``{"ep_size", "num_experts", "top_k", "layers": [{"layer", "groups", "contiguous_copies_per_token",
        "planned_copies_per_token", "intra_group_fraction_contiguous", "intra_group_fraction_planned",
        "copies_source", "routing_groups"}], "mean_contiguous_copies_per_token", "mean_planned_copies_per_token",
        "mean_intra_group_fraction_contiguous", "mean_intra_group_fraction_planned"}`` (``routing_groups``: ``G``
        or ``None``).

    Raises:
        ValueError: if ``matrices`` is not ``[L, E, E]``, ``top_k < 2`` (nothing co-activates), a layer is out of
            range or has no co-activation mass, or an ``indices`` entry does not have ``top_k`` columns.
    """
    stack = _as_numpy(matrices)
    if stack.ndim != 3 or stack.shape[1] != stack.shape[2]:
        raise ValueError(f"expected [L, E, E] co-activation matrices, got shape {tuple(stack.shape)}")
    num_layers, num_experts = stack.shape[0], stack.shape[1]
    _check_ep_size(num_experts, ep_size)
    if top_k < 2:  # e.g. ZAYA (top-1): no pair of experts ever serves one token, whatever the placement
        raise ValueError(f"the model routes each token to {top_k} expert: no two experts are ever chosen together, "
                         "so every placement sends each token to one device; nothing to place")
    selected = list(range(num_layers)) if layers is None else [int(layer) for layer in layers]
    for layer in selected:
        if not 0 <= layer < num_layers:
            raise ValueError(f"layer {layer} is out of range for {num_layers} layers")
    indices = dict(indices or {})
    limits = {int(layer): _check_routing_groups(num_experts, count) for layer, count in (routing_groups or {}).items()}
    contiguous = contiguous_placement(num_experts, ep_size)
    rows: list[dict[str, Any]] = []
    for layer in selected:
        weights = _pair_weights(stack[layer])
        total = _total_pair_weight(weights)
        if total <= 0:
            raise ValueError(f"layer {layer} has no off-diagonal co-activation counts; nothing to place")
        planned = plan_placement(weights, ep_size, seed=seed, routing_groups=limits.get(layer))
        contiguous_copies: float | None = None
        planned_copies: float | None = None
        source: str | None = None
        if layer in indices:
            routed = _as_numpy(indices[layer])
            if routed.ndim != 2 or routed.shape[1] != top_k:
                raise ValueError(
                    f"indices for layer {layer} must be [N, top_k={top_k}], got shape {tuple(routed.shape)}"
                )
            contiguous_copies = copies_per_token_from_indices(routed, contiguous)
            planned_copies = copies_per_token_from_indices(routed, planned)
            source = "indices"
        elif top_k == 2:
            contiguous_copies = copies_per_token_from_pairs(weights, contiguous)
            planned_copies = copies_per_token_from_pairs(weights, planned)
            source = "pairs"
        rows.append(
            {
                "layer": layer,
                "groups": planned,
                "contiguous_copies_per_token": contiguous_copies,
                "planned_copies_per_token": planned_copies,
                "intra_group_fraction_contiguous": intra_group_coactivation(weights, contiguous) / total,
                "intra_group_fraction_planned": intra_group_coactivation(weights, planned) / total,
                "copies_source": source,
                "routing_groups": limits.get(layer),
            }
        )

    def mean_of(key: str) -> float | None:
        values = [row[key] for row in rows]
        if not values or any(value is None for value in values):
            return None
        return float(sum(values) / len(values))

    return {
        "ep_size": int(ep_size),
        "num_experts": int(num_experts),
        "top_k": int(top_k),
        "layers": rows,
        "mean_contiguous_copies_per_token": mean_of("contiguous_copies_per_token"),
        "mean_planned_copies_per_token": mean_of("planned_copies_per_token"),
        "mean_intra_group_fraction_contiguous": mean_of("intra_group_fraction_contiguous"),
        "mean_intra_group_fraction_planned": mean_of("intra_group_fraction_planned"),
    }


def format_report(report: Mapping[str, Any]) -> str:
    """Render a :func:`placement_report` as a text table: one row per layer and a mean row.

    Copies per token are shown with the relative reduction of the planned placement; missing values print as
    ``-``.  The planned groups are listed for up to 16 experts (wider layouts would not fit a line).

    Args:
        report (`Mapping[str, Any]`): the dict returned by :func:`placement_report`.

    Returns:
        `str`: the table, without a trailing newline.
    """

    def number(value: float | None, width: int, digits: int = 4) -> str:
        return f"{'-':>{width}}" if value is None else f"{value:>{width}.{digits}f}"

    def reduction(contiguous: float | None, planned: float | None) -> str:
        if contiguous is None or planned is None or contiguous == 0:
            return f"{'-':>8}"
        return f"{100.0 * (contiguous - planned) / contiguous:>7.1f}%"

    show_groups = report["num_experts"] <= 16
    header = f"{'layer':>5}  {'CT contig':>9}  {'CT plan':>9}  {'reduce':>8}  {'intra contig':>12}  {'intra plan':>10}"
    if show_groups:
        header += "  groups"
    lines = [
        f"placement: {report['num_experts']} experts on {report['ep_size']} devices, top-{report['top_k']} "
        f"(CT = copies per token; intra = fraction of co-activation within a device)",
        header,
        "-" * len(header),
    ]
    for row in report["layers"]:
        line = (
            f"{row['layer']:>5}  {number(row['contiguous_copies_per_token'], 9)}  "
            f"{number(row['planned_copies_per_token'], 9)}  "
            f"{reduction(row['contiguous_copies_per_token'], row['planned_copies_per_token'])}  "
            f"{number(row['intra_group_fraction_contiguous'], 12)}  {number(row['intra_group_fraction_planned'], 10)}"
        )
        if show_groups:
            line += "  " + " | ".join(" ".join(str(expert) for expert in group) for group in row["groups"])
        lines.append(line)
    lines.append("-" * len(header))
    lines.append(
        f"{'mean':>5}  {number(report['mean_contiguous_copies_per_token'], 9)}  "
        f"{number(report['mean_planned_copies_per_token'], 9)}  "
        f"{reduction(report['mean_contiguous_copies_per_token'], report['mean_planned_copies_per_token'])}  "
        f"{number(report['mean_intra_group_fraction_contiguous'], 12)}  "
        f"{number(report['mean_intra_group_fraction_planned'], 10)}"
    )
    limited: dict[int, list[int]] = {}
    for row in report["layers"]:
        if row.get("routing_groups"):
            limited.setdefault(row["routing_groups"], []).append(row["layer"])
    for count, rows in limited.items():
        lines.append(
            f"layers {rows}: group-limited routers ({count} routing groups of {report['num_experts'] // count} "
            f"contiguous experts); experts are only renumbered inside their group: "
            f"{routing_group_note(report['num_experts'], report['ep_size'], count)}"
        )
    lines.extend(f"note: {note}" for note in report.get("notes", ()))
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------------------------
# Permutations for writing re-sharded checkpoints
# ----------------------------------------------------------------------------------------------------------------


def expert_permutation(groups: Sequence[Sequence[int]]) -> list[int]:
    """New expert order under which the contiguous sharding reproduces ``groups``.

    ``perm[new_id] = old_id``: the concatenation of the groups in order.  Re-ordering expert weights as
    ``new_weights = old_weights[perm]`` (and router output columns likewise) puts group ``d`` on device ``d`` under
    the default contiguous sharding; an old expert id maps to its new id through :func:`inverse_permutation`.

    Args:
        groups (`Sequence[Sequence[int]]`): a partition of ``range(E)``, in device order.

    Returns:
        `list[int]`: the permutation of ``range(E)``.

    Raises:
        ValueError: if the groups are not a partition of the experts.
    """
    num_experts = sum(len(group) for group in groups) if isinstance(groups, Sequence) else 0
    members = _check_partition(groups, num_experts)
    return [expert for group in members for expert in group]


def inverse_permutation(perm: Sequence[int]) -> list[int]:
    """Inverse of a permutation of ``range(n)``: ``inverse[perm[i]] = i``.

    Args:
        perm (`Sequence[int]`): a permutation of ``range(len(perm))``.

    Returns:
        `list[int]`: the inverse permutation (old expert id -> new id for :func:`expert_permutation`).

    Raises:
        ValueError: if ``perm`` is not a permutation of ``range(len(perm))``.
    """
    if any(isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)) for value in perm):
        raise ValueError(f"a permutation must hold integer positions, got {list(perm)}")
    values = [int(value) for value in perm]
    if sorted(values) != list(range(len(values))):
        raise ValueError(f"not a permutation of range(0, {len(values)}): {values}")
    inverse = [0] * len(values)
    for position, value in enumerate(values):
        inverse[value] = position
    return inverse


def contiguous_group_lists(num_experts: int, ep_size: int) -> list[list[int]]:
    """One layer's ``[E][E]`` C2R collaborative list that keeps every token on its top-1 expert's device.

    For a renumbered checkpoint (device ``d`` holds the contiguous ids ``d·s .. (d+1)·s - 1``, ``s = E / D``), expert
    ``e``'s list starts with the other ``s - 1`` experts of its device, then every other expert, then ``e`` itself (the
    official format: a full ranking, self last).  With ``top_t = s - 1`` the k-1 experts C2R adds to the top-1 are
    chosen among its device-mates, so every token's experts sit on one device: one copy per token, the physical floor
    of the deduplicating dispatch.  Among the first ``s - 1`` entries the router's scores choose (their order does not
    matter); beyond them nothing is read.  This is C2R restricted to the placement's groups — the "collaboration
    pruning" to one device of Occult, the C2R authors' follow-up EP design — a moepatch switch, not the paper's list
    (whose ``top_t`` comes from the profile).

    Raises:
        ValueError: if ``ep_size`` does not divide ``num_experts`` or a group would hold a single expert.
    """
    size = _check_ep_size(num_experts, ep_size)
    if size < 2:
        raise ValueError(f"{ep_size} devices for {num_experts} experts leave one expert per device: C2R within groups "
                         "needs at least two experts per device")
    lists = []
    for expert in range(num_experts):
        start = expert // size * size
        mates = [other for other in range(start, start + size) if other != expert]
        others = [other for other in range(num_experts) if not start <= other < start + size]
        lists.append(mates + others + [expert])
    return lists
