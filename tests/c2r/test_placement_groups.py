"""Expert placement for group-limited routers: plans keep every expert inside its routing group.

A group-limited router (DeepSeek-V3's ``n_group`` / ``topk_group``) splits its experts into ``G`` ranges of contiguous
ids and chooses only within the best ranges, so a renumbering may only permute ids inside each range.  The expected
optima here come from brute force over exactly those renumberings (every permutation within every group, then
contiguous sharding), computed in this file, never from the planner.
"""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from moepatch.c2r import placement


def symmetric_counts(num_experts: int, seed: int) -> np.ndarray:
    """Random symmetric co-activation counts with a zero diagonal."""
    counts = np.random.default_rng(seed).integers(0, 50, size=(num_experts, num_experts))
    counts = counts + counts.T
    np.fill_diagonal(counts, 0)
    return counts


def within_group_optimum(matrix: np.ndarray, ep_size: int, routing_groups: int) -> float:
    """Best intra-device co-activation over every renumbering that keeps each expert in its routing group."""
    num_experts = matrix.shape[0]
    per_group, per_device = num_experts // routing_groups, num_experts // ep_size
    best = -1.0
    ranges = [itertools.permutations(range(g * per_group, (g + 1) * per_group)) for g in range(routing_groups)]
    for orders in itertools.product(*ranges):
        order = [expert for group in orders for expert in group]
        devices = [order[d * per_device : (d + 1) * per_device] for d in range(ep_size)]
        value = sum(float(matrix[a][b]) for device in devices for a, b in itertools.combinations(device, 2))
        best = max(best, value)
    return best


def planted(num_experts: int, routing_groups: int, ep_size: int, seed: int) -> tuple[np.ndarray, list[list[int]]]:
    """Counts with a strong planted placement that a renumbering within groups realises (contiguous devices,
    experts shuffled inside their group), plus weak noise everywhere."""
    generator = np.random.default_rng(seed)
    device = np.arange(num_experts) // (num_experts // ep_size)
    routing = np.arange(num_experts) // (num_experts // routing_groups)
    for group in range(routing_groups):
        members = np.flatnonzero(routing == group)
        device[members] = device[members][generator.permutation(len(members))]
    noise = generator.integers(0, 5, size=(num_experts, num_experts))
    counts = noise + noise.T + 100 * (device[:, None] == device[None, :])
    np.fill_diagonal(counts, 0)
    return counts, [np.flatnonzero(device == d).tolist() for d in range(ep_size)]


def crosses_no_group(groups: list[list[int]], routing_groups: int) -> bool:
    """The renumbering that puts ``groups`` on devices 0, 1, ... keeps every expert in its routing group."""
    order = [expert for group in groups for expert in group]
    size = len(order) // routing_groups
    return all(new // size == old // size for new, old in enumerate(order))


# (E, G, D): whole groups per device, groups split over devices, devices straddling group boundaries
SMALL_CASES = [(8, 4, 2), (8, 4, 4), (8, 4, 8), (8, 2, 4), (8, 2, 8), (12, 4, 3), (12, 6, 4), (12, 3, 4)]


@pytest.mark.parametrize(("num_experts", "routing_groups", "ep_size"), SMALL_CASES)
@pytest.mark.parametrize("exhaustive_limit", [20000, 0], ids=["exact", "heuristic"])
def test_grouped_plan_is_the_optimum_over_renumberings_within_groups(
    num_experts: int, routing_groups: int, ep_size: int, exhaustive_limit: int
) -> None:
    matrix = symmetric_counts(num_experts, seed=num_experts * 100 + routing_groups * 10 + ep_size)
    groups = placement.plan_placement(matrix, ep_size, routing_groups=routing_groups, exhaustive_limit=exhaustive_limit)
    placement.validate_placement(groups, num_experts, ep_size, routing_groups=routing_groups)
    assert crosses_no_group(groups, routing_groups)
    assert placement.group_crossings(placement.expert_permutation(groups), routing_groups) == []
    value = placement.intra_group_coactivation(matrix, groups)
    assert value == within_group_optimum(matrix, ep_size, routing_groups)
    assert value >= placement.intra_group_coactivation(matrix, placement.contiguous_placement(num_experts, ep_size))


@pytest.mark.parametrize("ep_size", [1, 2, 4, 8])
def test_devices_hosting_whole_groups_get_the_contiguous_plan(ep_size: int) -> None:
    """DeepSeek-V3's shape: 256 experts in 8 routing groups.  With D <= G every device hosts G/D whole groups, and no
    renumbering within groups changes which experts share a device: the plan is routing groups -> devices."""
    matrix = symmetric_counts(256, seed=ep_size)
    assert placement.plan_placement(matrix, ep_size, routing_groups=8) == placement.contiguous_placement(256, ep_size)
    assert "contiguous" in placement.routing_group_note(256, ep_size, 8)


@pytest.mark.parametrize(("num_experts", "routing_groups", "ep_size"),
                         [(64, 8, 16), (256, 8, 32), (60, 4, 6), (60, 6, 4), (48, 3, 4)])
def test_grouped_plan_recovers_a_planted_placement(num_experts: int, routing_groups: int, ep_size: int) -> None:
    """Groups split over devices (per-group search) and straddling devices too large to enumerate (the local search
    that only swaps experts of one group) both find a planted placement realisable within groups."""
    matrix, want = planted(num_experts, routing_groups, ep_size, seed=3)
    groups = placement.plan_placement(matrix, ep_size, routing_groups=routing_groups)
    placement.validate_placement(groups, num_experts, ep_size, routing_groups=routing_groups)
    assert placement.intra_group_coactivation(matrix, groups) >= placement.intra_group_coactivation(matrix, want)
    contiguous = placement.contiguous_placement(num_experts, ep_size)
    assert placement.intra_group_coactivation(matrix, groups) > placement.intra_group_coactivation(matrix, contiguous)


def test_routers_without_a_binding_limit_plan_as_before() -> None:
    """No routing groups, or one group (GLM-4.5 / Kimi-K2 ship n_group = topk_group = 1): the unconstrained planner,
    exact and canonical, as before."""
    matrix = symmetric_counts(8, seed=11)
    for ep_size in (2, 4):
        plain = placement.plan_placement(matrix, ep_size)
        assert placement.plan_placement(matrix, ep_size, routing_groups=None) == plain
        assert placement.plan_placement(matrix, ep_size, routing_groups=1) == plain
        assert plain == placement.exhaustive_placement(matrix, ep_size)


def test_report_counts_copies_per_token_for_grouped_layers() -> None:
    """Copies per token of grouped layers are counted from the routed indices over the in-group plan; ungrouped
    layers get the same row as in a report without routing groups."""
    generator = np.random.default_rng(5)
    num_experts, ep_size, routing_groups = 8, 4, 2
    indices = {layer: np.stack([generator.choice(num_experts, 2, replace=False) for _ in range(300)])
               for layer in range(2)}
    matrices = np.zeros((2, num_experts, num_experts), dtype=np.int64)
    for layer, chosen in indices.items():
        for first, second in chosen:
            matrices[layer, first, second] += 1
            matrices[layer, second, first] += 1
    report = placement.placement_report(matrices, ep_size, indices=indices, routing_groups={0: routing_groups})
    plain = placement.placement_report(matrices, ep_size, indices=indices)
    grouped, free = report["layers"]
    assert grouped["routing_groups"] == routing_groups and free["routing_groups"] is None
    assert free == {**plain["layers"][1], "routing_groups": None}
    assert crosses_no_group(grouped["groups"], routing_groups)
    device_of = {expert: device for device, group in enumerate(grouped["groups"]) for expert in group}
    copies = sum(len({device_of[int(e)] for e in row}) for row in indices[0]) / len(indices[0])
    assert grouped["planned_copies_per_token"] == pytest.approx(copies)
    assert grouped["planned_copies_per_token"] <= grouped["contiguous_copies_per_token"]
    text = placement.format_report(report)
    assert "layers [0]: group-limited routers (2 routing groups of 4 contiguous experts)" in text
    assert "spans 2 devices" in text


def test_cross_group_placements_and_bad_group_counts_are_refused() -> None:
    assert placement.group_crossings([1, 0, 2, 3], 2) == []
    assert placement.group_crossings([2, 1, 0, 3], 2) == [(0, 2), (2, 0)]
    placement.validate_placement([[0, 1], [2, 3]], 4, 2, routing_groups=2)
    with pytest.raises(ValueError, match="with 2 routing groups a renumbering must keep every expert in its group"):
        placement.validate_placement([[0, 2], [1, 3]], 4, 2, routing_groups=2)
    with pytest.raises(ValueError, match=r"routing_groups \(3\) does not divide the 8 experts"):
        placement.plan_placement(symmetric_counts(8, 0), 2, routing_groups=3)
    with pytest.raises(ValueError, match="routing_groups must be a positive integer"):
        placement.plan_placement(symmetric_counts(8, 0), 2, routing_groups=0)
    assert "straddle" in placement.routing_group_note(12, 3, 2)  # 4 experts per device, 6 per routing group
