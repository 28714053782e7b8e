"""DynamicMixtureSampler: draws follow the weights; updates are exact with DataLoader workers and across a resume."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from torch.utils.data import DataLoader

from moepatch.mixing.sampler import DynamicMixtureSampler
from moepatch.mixing.sampler import MixtureDataset

SIZES = [7, 5, 11]


def _dataset() -> MixtureDataset:
    return MixtureDataset([[{"x": s * 100 + i} for i in range(size)] for s, size in enumerate(SIZES)],
                          with_source=True)


def _chi_square(observed, probabilities) -> float:
    total = sum(observed)
    return sum((o - total * p) ** 2 / (total * p) for o, p in zip(observed, probabilities, strict=True))


def test_draws_follow_the_weights():
    sampler = DynamicMixtureSampler(SIZES, [0.5, 0.3, 0.2], seed=4)
    counts = np.bincount(sampler.sources_of(0, 20000), minlength=3)
    assert _chi_square(counts, [0.5, 0.3, 0.2]) < 13.8  # chi-square, 2 dof, p = 0.001


def test_each_source_stream_covers_every_example_once_per_pass():
    dataset = _dataset()
    sampler = DynamicMixtureSampler(SIZES, seed=1)
    per_source: dict[int, list[int]] = {0: [], 1: [], 2: []}
    for index in itertools.islice(iter(sampler), 300):
        source, position = dataset.locate(index)
        per_source[source].append(position)
    for source, positions in per_source.items():
        size = SIZES[source]
        for start in range(0, len(positions) - size + 1, size):
            assert sorted(positions[start : start + size]) == list(range(size))


def test_update_takes_effect_exactly_after_the_horizon():
    live = DynamicMixtureSampler(SIZES, seed=2, horizon=16)
    stream = iter(live)
    drawn = [next(stream) for _ in range(20)]  # 20 handed out (some "prefetched"), 10 consumed
    start = live.set_weights([0.0, 0.0, 1.0], consumed=10)
    assert start == 26
    drawn += [next(stream) for _ in range(60)]
    dataset = _dataset()
    sources = [dataset.locate(i)[0] for i in drawn]
    assert all(s == 2 for s in sources[26:])  # from draw 26 on only the new weights act
    pure = DynamicMixtureSampler(SIZES, seed=2, horizon=16)
    pure.schedule = [(0, [1 / 3] * 3), (26, [0.0, 0.0, 1.0])]
    assert [dataset.locate(i)[0] for i in itertools.islice(iter(pure), 80)] == sources


def test_too_small_horizon_and_bad_weights_raise():
    sampler = DynamicMixtureSampler(SIZES, seed=0, horizon=2)
    stream = iter(sampler)
    for _ in range(10):
        next(stream)
    with pytest.raises(ValueError, match="raise the horizon"):
        sampler.set_weights([1, 1, 1], consumed=4)
    with pytest.raises(ValueError, match="weights: expected 3 finite non-negative weights"):
        sampler.set_weights([1, -1, 1], consumed=20)
    with pytest.raises(ValueError, match="source_sizes"):
        DynamicMixtureSampler([3, 0])


def test_updates_reach_dataloader_workers_exactly():
    """With 2 workers and prefetching, the sources served equal the pure schedule's draws, and follow the update."""
    batch, workers, prefetch = 8, 2, 2
    horizon = (workers * prefetch + 1) * batch
    sampler = DynamicMixtureSampler(SIZES, seed=5, horizon=horizon)
    loader = DataLoader(_dataset(), batch_size=batch, sampler=sampler, num_workers=workers, prefetch_factor=prefetch)
    served = []
    for step, item in enumerate(loader):
        served.extend(item["source"].tolist())
        if step == 9:
            start = sampler.set_weights([0.05, 0.05, 0.9], consumed=(step + 1) * batch)
        if step == 79:
            break
    pure = DynamicMixtureSampler(SIZES, seed=5)
    pure.schedule = [(0, [1 / 3] * 3), (start, [0.05, 0.05, 0.9])]
    assert served == pure.sources_of(0, len(served)).tolist()
    after = np.bincount(served[start:], minlength=3)
    assert _chi_square(after, [0.05, 0.05, 0.9]) < 13.8


def test_resume_replays_the_same_sequence():
    dataset = _dataset()
    uninterrupted = DynamicMixtureSampler(SIZES, seed=9, horizon=12)
    stream = iter(uninterrupted)
    reference = [next(stream) for _ in range(40)]
    uninterrupted.set_weights([0.7, 0.2, 0.1], consumed=30)  # round 1 at 30 consumed draws
    reference += [next(stream) for _ in range(60)]
    state = uninterrupted.state_dict(consumed=45)  # checkpoint after 45 consumed draws

    resumed = DynamicMixtureSampler(SIZES, seed=0)
    resumed.load_state_dict(state)
    assert resumed.weights == uninterrupted.weights
    continued = list(itertools.islice(iter(resumed), 55))
    assert continued == reference[45:100]
    assert [dataset.locate(i)[0] for i in continued] == [dataset.locate(i)[0] for i in reference[45:100]]
