"""Expert placement: exact search vs brute force, heuristic vs exact and planted optima, copies per token.

Every expected value here is computed independently in this file (brute force over permutations, Python loops over
tokens, the separation argument for planted groupings) or taken from the published analysis of the shipped data
(the C2R paper's placement definitions), never from the code under test.
"""

from __future__ import annotations

import itertools
import json

import numpy as np
import pytest
import torch
from real_data import LLAMA_MOE_MATRICES

from moepatch.c2r import placement

DATA_FILE = LLAMA_MOE_MATRICES
MATRIX_NAMES = ("base_collaboration", "topt_5_collaboration")


# ----------------------------------------------------------------------------------------------------------------
# Independent references
# ----------------------------------------------------------------------------------------------------------------


def brute_objective(matrix: np.ndarray, groups: list[list[int]]) -> float:
    """Intra-group co-activation by definition: symmetrised off-diagonal weight of same-group unordered pairs."""
    total = 0.0
    for group in groups:
        for position, first in enumerate(group):
            for second in group[position + 1 :]:
                total += (float(matrix[first][second]) + float(matrix[second][first])) / 2.0
    return total


def brute_partitions(num_experts: int, ep_size: int) -> list[frozenset[frozenset[int]]]:
    """All equal-size partitions by brute force: chunk every permutation, de-duplicate as sets of sets."""
    size = num_experts // ep_size
    seen: set[frozenset[frozenset[int]]] = set()
    for order in itertools.permutations(range(num_experts)):
        seen.add(frozenset(frozenset(order[start : start + size]) for start in range(0, num_experts, size)))
    return sorted(seen, key=lambda partition: sorted(sorted(group) for group in partition))


_PARTITION_CACHE: dict[tuple[int, int], list[list[list[int]]]] = {}


def all_partitions(num_experts: int, ep_size: int) -> list[list[list[int]]]:
    key = (num_experts, ep_size)
    if key not in _PARTITION_CACHE:
        _PARTITION_CACHE[key] = [
            [sorted(group) for group in partition] for partition in brute_partitions(num_experts, ep_size)
        ]
    return _PARTITION_CACHE[key]


def brute_optimum(matrix: np.ndarray, ep_size: int) -> tuple[float, list[set[frozenset[int]]]]:
    """Best objective over all partitions and the set of partitions reaching it."""
    scored = [(brute_objective(matrix, groups), groups) for groups in all_partitions(matrix.shape[0], ep_size)]
    best = max(value for value, _ in scored)
    winners = [{frozenset(group) for group in groups} for value, groups in scored if value == best]
    return best, winners


def brute_copies(indices: np.ndarray, groups: list[list[int]]) -> float:
    """Mean number of distinct devices per token, one token at a time."""
    device_of = {expert: device for device, group in enumerate(groups) for expert in group}
    return sum(len({device_of[int(expert)] for expert in row}) for row in indices) / len(indices)


def brute_counts(indices: np.ndarray, num_experts: int) -> np.ndarray:
    """Co-activation counts as the official profiler defines them: every ordered pair of distinct chosen experts."""
    counts = np.zeros((num_experts, num_experts), dtype=np.int64)
    for row in indices:
        for first in row:
            for second in row:
                if first != second:
                    counts[first, second] += 1
    return counts


def random_topk(num_tokens: int, num_experts: int, top_k: int, seed: int) -> np.ndarray:
    """Distinct top-k expert ids per token from random logits with some structure (so placements differ)."""
    generator = np.random.default_rng(seed)
    bias = generator.normal(size=(4, num_experts)) * 2.0
    logits = generator.normal(size=(num_tokens, num_experts)) + bias[generator.integers(0, 4, num_tokens)]
    return np.argsort(-logits, axis=1)[:, :top_k]


def planted_matrix(
    num_experts: int, ep_size: int, seed: int, within: tuple[float, float], cross: tuple[float, float]
) -> tuple[np.ndarray, list[list[int]]]:
    """Symmetric weights with a random planted grouping: within-group pairs ~ U(within), cross pairs ~ U(cross)."""
    generator = np.random.default_rng(seed)
    size = num_experts // ep_size
    order = generator.permutation(num_experts)
    planted = [sorted(int(expert) for expert in order[start : start + size]) for start in range(0, num_experts, size)]
    label = np.empty(num_experts, dtype=np.int64)
    for device, group in enumerate(planted):
        label[group] = device
    same = label[:, None] == label[None, :]
    weights = np.where(
        same,
        generator.uniform(*within, size=(num_experts, num_experts)),
        generator.uniform(*cross, size=(num_experts, num_experts)),
    )
    weights = np.triu(weights, k=1)
    weights = weights + weights.T
    np.fill_diagonal(weights, -1.0)
    return weights, sorted(planted, key=lambda group: group[0])


@pytest.fixture(scope="module")
def real_matrices() -> dict[str, np.ndarray]:
    document = json.loads(DATA_FILE.read_text())
    return {name: np.asarray(document["matrices"][name], dtype=np.int64) for name in MATRIX_NAMES}


# ----------------------------------------------------------------------------------------------------------------
# Placements, validation, objective
# ----------------------------------------------------------------------------------------------------------------


def test_contiguous_placement() -> None:
    assert placement.contiguous_placement(8, 2) == [[0, 1, 2, 3], [4, 5, 6, 7]]
    assert placement.contiguous_placement(8, 4) == [[0, 1], [2, 3], [4, 5], [6, 7]]
    assert placement.contiguous_placement(6, 1) == [[0, 1, 2, 3, 4, 5]]
    assert placement.contiguous_placement(3, 3) == [[0], [1], [2]]
    with pytest.raises(ValueError, match="not divisible"):
        placement.contiguous_placement(60, 8)
    with pytest.raises(ValueError, match="ep_size must be a positive integer"):
        placement.contiguous_placement(8, 0)


@pytest.mark.parametrize(
    ("groups", "num_experts", "ep_size", "message"),
    [
        ([[0, 1, 2], [3, 4, 5, 6, 7]], 8, 2, "group sizes \\[3, 5\\]"),
        ([[0, 1, 2, 3], [3, 4, 5, 6]], 8, 2, "expert 3 is placed twice"),
        ([[0, 1, 2, 3], [4, 5, 6, 8]], 8, 2, "outside range"),
        ([[0, 1, 2, 3], [4, 5, 6]], 7, 2, "not divisible"),
        ([[0, 1], [2, 3], [4, 5], [6, 7]], 8, 2, "expected 2 groups"),
        ([[0, 1, 2, 3], [4, 5, 6, -1]], 8, 2, "outside range"),
        ([[0, 1, 2, 3], [4, 5, 6, 7.0]], 8, 2, "non-integer"),
        ([[0, 1, 2, 3], []], 4, 2, "group 1 is empty"),
        ("01234567", 8, 2, "list of groups"),
    ],
)
def test_validate_placement_rejects(groups: object, num_experts: int, ep_size: int, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        placement.validate_placement(groups, num_experts, ep_size)  # type: ignore[arg-type]


def test_validate_placement_accepts_any_valid_partition() -> None:
    placement.validate_placement([[7, 0, 3, 4], [1, 2, 6, 5]], 8, 2)
    placement.validate_placement([(5, 1), np.array([0, 2]), [3, 4]], 6, 3)


def test_metrics_reject_non_partitions() -> None:
    matrix = np.ones((4, 4))
    with pytest.raises(ValueError, match="not placed on any device"):
        placement.intra_group_coactivation(matrix, [[0, 1], [2]])
    with pytest.raises(ValueError, match="square"):
        placement.intra_group_coactivation(np.ones((4, 3)), [[0, 1], [2, 3]])
    with pytest.raises(ValueError, match="non-negative"):
        placement.intra_group_coactivation(-np.ones((4, 4)), [[0, 1], [2, 3]])


def test_intra_group_coactivation_matches_definition() -> None:
    generator = np.random.default_rng(3)
    matrix = generator.integers(0, 100, size=(8, 8))  # deliberately asymmetric, with a non-zero diagonal
    for groups in ([[0, 1, 2, 3], [4, 5, 6, 7]], [[0, 5], [1, 7], [2, 3], [4, 6]], [[3, 1, 6, 0], [7, 2, 4, 5]]):
        assert placement.intra_group_coactivation(matrix, groups) == pytest.approx(brute_objective(matrix, groups))
        assert placement.intra_group_coactivation(torch.from_numpy(matrix), groups) == pytest.approx(
            brute_objective(matrix, groups)
        )


# ----------------------------------------------------------------------------------------------------------------
# Exact search
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("num_experts", "ep_size"), [(4, 2), (6, 2), (6, 3), (8, 2), (8, 4), (8, 1), (8, 8)])
def test_partition_count_matches_brute_force(num_experts: int, ep_size: int) -> None:
    assert placement.count_equal_partitions(num_experts, ep_size) == len(all_partitions(num_experts, ep_size))


@pytest.mark.parametrize(("num_experts", "ep_size"), [(6, 2), (6, 3), (8, 2), (8, 4)])
@pytest.mark.parametrize("seed", range(6))
def test_exhaustive_is_brute_force_optimum(num_experts: int, ep_size: int, seed: int) -> None:
    generator = np.random.default_rng(seed)
    matrix = generator.integers(0, 50, size=(num_experts, num_experts))  # asymmetric: symmetrisation is exercised
    np.fill_diagonal(matrix, -1)
    if seed % 2:
        matrix = matrix.astype(np.float64) + generator.random((num_experts, num_experts))
    best, winners = brute_optimum(matrix, ep_size)
    groups = placement.exhaustive_placement(matrix, ep_size)
    placement.validate_placement(groups, num_experts, ep_size)
    assert brute_objective(matrix, groups) == pytest.approx(best, rel=1e-12)
    assert {frozenset(group) for group in groups} in winners
    assert groups == sorted((sorted(group) for group in groups), key=lambda group: group[0])


def test_exhaustive_refuses_huge_searches() -> None:
    # 20! / (5!^4 * 4!) = 2432902008176640000 / (207360000 * 24)
    with pytest.raises(ValueError, match="488,864,376 partitions"):
        placement.exhaustive_placement(np.ones((20, 20)), 4)
    with pytest.raises(ValueError, match="limit 10"):
        placement.exhaustive_placement(np.ones((8, 8)), 2, max_partitions=10)


# ----------------------------------------------------------------------------------------------------------------
# Real LLaMA-MoE matrices
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", MATRIX_NAMES)
@pytest.mark.parametrize("ep_size", [2, 4])
@pytest.mark.parametrize("exhaustive_limit", [20000, 0], ids=["default", "heuristic"])
def test_plan_reaches_optimum_on_real_layers(
    real_matrices: dict[str, np.ndarray], name: str, ep_size: int, exhaustive_limit: int
) -> None:
    for layer, matrix in enumerate(real_matrices[name]):
        best, _ = brute_optimum(matrix, ep_size)
        groups = placement.plan_placement(matrix, ep_size, exhaustive_limit=exhaustive_limit)
        placement.validate_placement(groups, 8, ep_size)
        assert brute_objective(matrix, groups) == best, f"{name} layer {layer}, D={ep_size}"


# Same-device token fraction, mean over the 32 layers, from the published analysis of these matrices (3 decimals).
PUBLISHED_SAME_DEVICE = {
    ("base_collaboration", 2): (0.415, 0.732),
    ("base_collaboration", 4): (0.130, 0.478),
    ("topt_5_collaboration", 2): (0.417, 0.736),
    ("topt_5_collaboration", 4): (0.132, 0.482),
}


@pytest.mark.parametrize(("name", "ep_size"), sorted(PUBLISHED_SAME_DEVICE))
def test_report_matches_published_analysis(real_matrices: dict[str, np.ndarray], name: str, ep_size: int) -> None:
    report = placement.placement_report(real_matrices[name], ep_size)
    contiguous_fraction, best_fraction = PUBLISHED_SAME_DEVICE[(name, ep_size)]
    assert report["mean_intra_group_fraction_contiguous"] == pytest.approx(contiguous_fraction, abs=6e-4)
    assert report["mean_intra_group_fraction_planned"] == pytest.approx(best_fraction, abs=6e-4)
    # top-2: a token costs 1 copy if both experts share a device, else 2.
    assert report["mean_contiguous_copies_per_token"] == pytest.approx(2 - contiguous_fraction, abs=6e-4)
    assert report["mean_planned_copies_per_token"] == pytest.approx(2 - best_fraction, abs=6e-4)
    for row, matrix in zip(report["layers"], real_matrices[name], strict=True):
        tokens = matrix[np.triu_indices(8, k=1)].sum()
        assert tokens == 204_800
        same_device = sum(matrix[i, j] for group in row["groups"] for i, j in itertools.combinations(group, 2))
        assert row["planned_copies_per_token"] == pytest.approx((same_device + 2 * (tokens - same_device)) / tokens)


# ----------------------------------------------------------------------------------------------------------------
# Heuristic
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("ep_size", [2, 4])
def test_plan_reaches_optimum_on_random_eight_expert_matrices(ep_size: int) -> None:
    for seed in range(40):
        matrix = np.random.default_rng(seed).random((8, 8))
        best, _ = brute_optimum(matrix, ep_size)
        exact = placement.plan_placement(matrix, ep_size)
        assert brute_objective(matrix, exact) == pytest.approx(best, rel=1e-12)
        heuristic = placement.plan_placement(matrix, ep_size, exhaustive_limit=0, restarts=16)
        assert brute_objective(matrix, heuristic) == pytest.approx(best, rel=1e-12), f"seed {seed}"


@pytest.mark.parametrize(("num_experts", "ep_size"), [(60, 2), (60, 4), (60, 6), (64, 2), (64, 4), (64, 8)])
@pytest.mark.parametrize("seed", range(3))
def test_plan_recovers_planted_grouping(num_experts: int, ep_size: int, seed: int) -> None:
    # Every partition into equal groups has the same number of same-group pairs, so a partition other than the
    # planted one trades n >= 1 within-cluster pairs (weight >= 20) for n cross pairs (weight < 20): the planted
    # grouping is the unique optimum.
    matrix, planted = planted_matrix(num_experts, ep_size, seed, within=(20.0, 60.0), cross=(0.0, 19.9))
    groups = placement.plan_placement(matrix, ep_size, seed=seed)
    assert groups == planted


@pytest.mark.parametrize(("num_experts", "ep_size"), [(60, 4), (64, 8), (64, 2)])
def test_plan_beats_contiguous_and_planted_on_noisy_clusters(num_experts: int, ep_size: int) -> None:
    # Overlapping weight ranges: the planted grouping is no longer guaranteed optimal, but it is a good placement
    # the plan must match or beat.
    matrix, planted = planted_matrix(num_experts, ep_size, seed=7, within=(0.0, 60.0), cross=(0.0, 40.0))
    groups = placement.plan_placement(matrix, ep_size)
    placement.validate_placement(groups, num_experts, ep_size)
    contiguous = [
        list(range(start, start + num_experts // ep_size)) for start in range(0, num_experts, num_experts // ep_size)
    ]
    assert brute_objective(matrix, groups) >= brute_objective(matrix, planted) - 1e-9
    assert brute_objective(matrix, groups) > brute_objective(matrix, contiguous)


def test_plan_is_deterministic_canonical_and_accepts_torch() -> None:
    matrix, _ = planted_matrix(64, 4, seed=1, within=(0.0, 50.0), cross=(0.0, 45.0))
    first = placement.plan_placement(matrix, 4, seed=5)
    assert placement.plan_placement(matrix, 4, seed=5) == first
    assert placement.plan_placement(torch.from_numpy(matrix), 4, seed=5) == first
    assert all(group == sorted(group) for group in first)
    assert [group[0] for group in first] == sorted(group[0] for group in first)
    with pytest.raises(ValueError, match="restarts"):
        placement.plan_placement(matrix, 4, restarts=0)
    with pytest.raises(ValueError, match="not divisible"):
        placement.plan_placement(np.ones((60, 60)), 8)


def test_plan_trivial_degrees() -> None:
    matrix = np.random.default_rng(0).random((6, 6))
    assert placement.plan_placement(matrix, 1) == [[0, 1, 2, 3, 4, 5]]
    assert placement.plan_placement(matrix, 6) == [[0], [1], [2], [3], [4], [5]]


# ----------------------------------------------------------------------------------------------------------------
# Copies per token
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", range(3))
def test_copies_from_pairs_equals_indices_and_brute_force_for_top2(seed: int) -> None:
    indices = random_topk(3000, 8, 2, seed)
    counts = brute_counts(indices, 8)
    for groups in ([[0, 1, 2, 3], [4, 5, 6, 7]], [[0, 7], [1, 6], [2, 5], [3, 4]], [[1, 2, 5, 6], [0, 3, 4, 7]]):
        expected = brute_copies(indices, groups)
        assert placement.copies_per_token_from_pairs(counts, groups) == pytest.approx(expected, abs=1e-12)
        assert placement.copies_per_token_from_indices(indices, groups) == pytest.approx(expected, abs=1e-12)
        assert placement.copies_per_token_from_indices(torch.from_numpy(indices), groups) == pytest.approx(
            expected, abs=1e-12
        )


def test_copies_from_indices_any_k() -> None:
    indices = random_topk(2000, 60, 4, seed=11)
    groups = placement.contiguous_placement(60, 4)
    assert placement.copies_per_token_from_indices(indices, groups) == pytest.approx(brute_copies(indices, groups))
    shuffled = [sorted(group) for group in np.random.default_rng(0).permutation(60).reshape(6, 10).tolist()]
    assert placement.copies_per_token_from_indices(indices, shuffled) == pytest.approx(brute_copies(indices, shuffled))


def test_copies_errors() -> None:
    counts = np.ones((8, 8))
    groups = placement.contiguous_placement(8, 2)
    with pytest.raises(ValueError, match="copies_per_token_from_indices"):
        placement.copies_per_token_from_pairs(counts, groups, top_k=4)
    with pytest.raises(ValueError, match="no off-diagonal counts"):
        placement.copies_per_token_from_pairs(np.diag(np.ones(8)), groups)
    with pytest.raises(ValueError, match="range"):
        placement.copies_per_token_from_indices(np.array([[0, 8]]), groups)
    with pytest.raises(ValueError, match=r"\[N, k\]"):
        placement.copies_per_token_from_indices(np.array([0, 1]), groups)
    with pytest.raises(ValueError, match="integers"):
        placement.copies_per_token_from_indices(np.array([[0.0, 1.0]]), groups)


# ----------------------------------------------------------------------------------------------------------------
# Report and permutations
# ----------------------------------------------------------------------------------------------------------------


def test_report_is_json_serialisable_and_consistent() -> None:
    layers_indices = [random_topk(1500, 8, 2, seed) for seed in range(3)]
    matrices = np.stack([brute_counts(indices, 8) for indices in layers_indices])
    np.fill_diagonal(matrices[1], -1)
    report = placement.placement_report(torch.from_numpy(matrices), 2)
    assert json.loads(json.dumps(report)) == report
    assert report["ep_size"] == 2 and report["num_experts"] == 8 and len(report["layers"]) == 3
    for row, indices in zip(report["layers"], layers_indices, strict=True):
        placement.validate_placement(row["groups"], 8, 2)
        assert row["copies_source"] == "pairs"
        assert row["contiguous_copies_per_token"] == pytest.approx(brute_copies(indices, [[0, 1, 2, 3], [4, 5, 6, 7]]))
        assert row["planned_copies_per_token"] == pytest.approx(brute_copies(indices, row["groups"]))
        assert row["planned_copies_per_token"] <= row["contiguous_copies_per_token"]
    expected_mean = sum(row["planned_copies_per_token"] for row in report["layers"]) / 3
    assert report["mean_planned_copies_per_token"] == pytest.approx(expected_mean)
    text = placement.format_report(report)
    assert len(text.splitlines()) == 3 + 3 + 2
    assert text.splitlines()[-1].lstrip().startswith("mean")

    subset = placement.placement_report(matrices, 2, layers=[2])
    assert [row["layer"] for row in subset["layers"]] == [2]
    with pytest.raises(ValueError, match="out of range"):
        placement.placement_report(matrices, 2, layers=[3])


def test_report_top_k_above_two_needs_indices() -> None:
    layers_indices = {0: random_topk(1000, 16, 4, 0), 1: random_topk(1000, 16, 4, 1)}
    matrices = np.stack([brute_counts(layers_indices[layer], 16) for layer in range(2)])
    without = placement.placement_report(matrices, 4, top_k=4)
    assert json.loads(json.dumps(without)) == without
    assert all(row["planned_copies_per_token"] is None for row in without["layers"])
    assert without["mean_planned_copies_per_token"] is None
    assert without["mean_intra_group_fraction_planned"] is not None
    assert "-" in placement.format_report(without)

    with_indices = placement.placement_report(matrices, 4, top_k=4, indices=layers_indices)
    assert json.loads(json.dumps(with_indices)) == with_indices
    for row in with_indices["layers"]:
        assert row["copies_source"] == "indices"
        assert row["planned_copies_per_token"] == pytest.approx(
            brute_copies(layers_indices[row["layer"]], row["groups"])
        )
    with pytest.raises(ValueError, match="top_k=2"):
        placement.placement_report(matrices, 4, top_k=2, indices=layers_indices)


def test_expert_permutation_reproduces_groups_under_contiguous_sharding() -> None:
    groups = [[0, 3, 5, 6], [1, 2, 4, 7]]
    perm = placement.expert_permutation(groups)
    assert perm == [0, 3, 5, 6, 1, 2, 4, 7]
    weights = torch.arange(8) * 10  # stand-in for per-expert weights, expert e holds 10 * e
    permuted = weights[perm]
    for device, block in enumerate(placement.contiguous_placement(8, 2)):
        assert sorted((permuted[block] // 10).tolist()) == groups[device]
    inverse = placement.inverse_permutation(perm)
    assert [perm[inverse[old]] for old in range(8)] == list(range(8))
    assert [inverse[perm[new]] for new in range(8)] == list(range(8))
    assert torch.equal(permuted[inverse], weights)
    with pytest.raises(ValueError, match="not a permutation"):
        placement.inverse_permutation([0, 2, 2])
    with pytest.raises(ValueError, match="placed twice"):
        placement.expert_permutation([[0, 1], [1, 2]])
