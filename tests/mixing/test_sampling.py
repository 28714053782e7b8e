"""The dynamic-sampling weight update against hand computation and the spec's toy example."""

from __future__ import annotations

import math

import numpy as np
import pytest

import moepatch
from moepatch.mixing.update_rule import mix_weights
from moepatch.mixing.update_rule import source_distances
from moepatch.mixing.update_rule import update_weights

LOADS = [[6, 2, 2], [2, 6, 2], [1, 1, 8]]  # three sources, three experts, raw counts


def _by_hand(weights, loads, eta, c, distance, criterion):
    """The update written out with plain numpy loops."""
    o = [np.array(row, dtype=float) / sum(row) for row in loads]
    n = len(o)
    if distance == "l2":
        pair = [[float(np.sqrt(((o[i] - o[j]) ** 2).sum())) for j in range(n)] for i in range(n)]
    else:
        pair = [[float(o[i] @ o[j] / (np.linalg.norm(o[i]) * np.linalg.norm(o[j]))) for j in range(n)]
                for i in range(n)]
    reduce = {"mean": lambda r: sum(r) / len(r), "max": max, "min": min}[criterion]
    delta = [reduce(row) for row in pair]
    if distance == "cos":
        delta = [1 - d for d in delta]
    logits = [math.log(w / sum(weights)) + eta * d for w, d in zip(weights, delta, strict=True)]
    exp = [math.exp(v) for v in logits]
    alpha = [v / sum(exp) for v in exp]
    mixed = [(1 - c) * a + c / n for a in alpha]
    return [m / sum(mixed) for m in mixed], delta


@pytest.mark.parametrize(("distance", "criterion"), [("l2", "mean"), ("l2", "max"), ("cos", "mean"), ("cos", "min")])
@pytest.mark.parametrize(("weights", "eta", "c"), [([1 / 3] * 3, 10.0, 0.05), ([0.5, 0.3, 0.2], 3.0, 0.8)])
def test_update_matches_hand_computation(weights, eta, c, distance, criterion):
    want, delta = _by_hand(weights, LOADS, eta, c, distance, criterion)
    assert source_distances(LOADS, distance=distance, criterion=criterion) == pytest.approx(delta, abs=1e-12)
    got = update_weights(weights, LOADS, eta=eta, c=c, distance=distance, criterion=criterion)
    assert got == pytest.approx(want, abs=1e-6) and sum(got) == pytest.approx(1.0, abs=1e-12)
    assert min(got) >= c / 3 - 1e-12


def test_spec_toy_example():
    """Dynamic Data Mixing (Zhu et al., 2024), a toy example of the update: Δ = [0.034, 0.055, 0.028, 0.032]
    from uniform, η=10, c=0.05 →
    w = [0.241, 0.294, 0.229, 0.236] (Δ is given to 3 decimals, hence the 1e-3 check)."""
    got = mix_weights([0.25] * 4, [0.034, 0.055, 0.028, 0.032], eta=10.0, c=0.05)
    assert got == pytest.approx([0.241, 0.294, 0.229, 0.236], abs=1.5e-3)
    assert max(range(4), key=got.__getitem__) == 1  # the most different source gains weight


def test_raw_counts_and_normalised_loads_agree():
    normalised = [[v / sum(row) for v in row] for row in LOADS]
    assert update_weights([1 / 3] * 3, LOADS) == pytest.approx(update_weights([1 / 3] * 3, normalised), abs=1e-15)


def test_two_sources_never_move():
    assert update_weights([0.7, 0.3], [[5, 1], [1, 5]], c=0.0) == pytest.approx([0.7, 0.3], abs=1e-12)


def test_degenerate_combination_warns_and_only_smooths():
    with pytest.warns(moepatch.MoePatchWarning, match="degenerate"):
        got = update_weights([0.6, 0.3, 0.1], LOADS, c=0.5, criterion="min")
    assert got == pytest.approx([0.5 * w + 0.5 / 3 for w in (0.6, 0.3, 0.1)], abs=1e-12)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"weights": [0.5, 0.5], "loads": LOADS}, "weights / loads: 2 weights for 3 sources"),
        ({"weights": [1, 0, 1], "loads": LOADS}, "weights: every weight must be finite and > 0"),
        ({"weights": [1, 1, 1], "loads": [[1, 1], [0, 0], [1, 2]]}, "loads: source 1 has no routed tokens"),
        ({"weights": [1, 1, 1], "loads": [[1, -1], [1, 1], [1, 2]]}, "loads: expert loads must be finite"),
        ({"weights": [1, 1, 1], "loads": [1, 2, 3]}, "loads: expected a |D| x E matrix"),
        ({"weights": [1, 1, 1], "loads": LOADS, "eta": -1.0}, "eta: expected a finite value >= 0"),
        ({"weights": [1, 1, 1], "loads": LOADS, "c": 1.5}, r"c: expected a smoothing value in \[0, 1\]"),
        ({"weights": [1, 1, 1], "loads": LOADS, "distance": "kl"}, "distance: expected one of"),
        ({"weights": [1, 1, 1], "loads": LOADS, "criterion": "median"}, "criterion: expected one of"),
    ],
)
def test_bad_arguments_name_the_argument(kwargs, message):
    weights, loads = kwargs.pop("weights"), kwargs.pop("loads")
    with pytest.raises(ValueError, match=message.replace("|", r"\|")):
        update_weights(weights, loads, **kwargs)
