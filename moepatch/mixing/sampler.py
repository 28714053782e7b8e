"""Weighted multi-source sampling whose weight updates are exact with DataLoader workers and across a resume.

The official code edits weights inside an ``IterableDataset`` in place: with ``dataloader_num_workers > 0`` the
workers never see the edit, and a wrapped dataset makes the callback silently do nothing.  Here the *sampler*
decides, in the main process, which source every draw comes from, and that decision is a pure function of
``(seed, draw number n, weight schedule)``:

* draw ``n`` picks a source by inverse CDF of the weights in force for ``n`` on a counter-based uniform
  ``u(seed, n)``, then the next example of that source's stream (a seeded permutation per pass, looped forever);
* :meth:`DynamicMixtureSampler.set_weights` appends ``(from_draw, weights)`` to the schedule, with
  ``from_draw = consumed + horizon``: ``horizon`` covers the draws the DataLoader has already prefetched (about
  ``prefetch_factor × workers × batch`` per process), so no draw ever changes source after it was made — the
  sequence is the same with 0 or 2 workers, and a run resumed from :meth:`state_dict` replays it exactly.  A horizon
  that is too small raises instead of silently drifting.

The same sampler on every rank yields the same draws; a distributed wrapper (accelerate's batch sharding) splits
them.
"""

from __future__ import annotations

import bisect
from collections.abc import Iterator
from collections.abc import Sequence
from typing import Any

import numpy as np
from torch.utils.data import Dataset
from torch.utils.data import Sampler

_MASK64 = (1 << 64) - 1


def _splitmix64(values: np.ndarray) -> np.ndarray:
    """Counter-based 64-bit hash (SplitMix64 finaliser), vectorised: the same inputs give the same outputs."""
    z = (values + np.uint64(0x9E3779B97F4A7C15)) & np.uint64(_MASK64)
    z = ((z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)) & np.uint64(_MASK64)
    z = ((z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)) & np.uint64(_MASK64)
    return z ^ (z >> np.uint64(31))


def uniforms(seed: int, start: int, count: int) -> np.ndarray:
    """``u(seed, n)`` in [0, 1) for ``n = start .. start+count-1``."""
    counters = np.arange(start, start + count, dtype=np.uint64) ^ np.uint64((seed * 0x632BE59BD9B4E019) & _MASK64)
    with np.errstate(over="ignore"):
        return (_splitmix64(counters) >> np.uint64(11)).astype(np.float64) / float(1 << 53)


class MixtureDataset(Dataset):
    """The train examples of several sources behind one index space (``offset[source] + position``)."""

    def __init__(self, sources: Sequence[Sequence[Any]], *, with_source: bool = False) -> None:
        if not sources or any(len(examples) == 0 for examples in sources):
            raise ValueError("sources: every source needs at least one example")
        self.sources = [list(examples) for examples in sources]
        self.offsets = np.cumsum([0] + [len(examples) for examples in self.sources]).tolist()
        self.with_source = with_source

    def __len__(self) -> int:
        return self.offsets[-1]

    def locate(self, index: int) -> tuple[int, int]:
        """``(source, position)`` of a global index."""
        source = bisect.bisect_right(self.offsets, index) - 1
        return source, index - self.offsets[source]

    def __getitem__(self, index: int) -> Any:
        source, position = self.locate(index)
        example = self.sources[source][position]
        return {**example, "source": source} if self.with_source else example


class DynamicMixtureSampler(Sampler[int]):
    """Infinite stream of global indices into a :class:`MixtureDataset`, sources drawn with settable weights.

    Args:
        source_sizes (`Sequence[int]`): examples per source (the dataset's sources, same order).
        weights (`Sequence[float]`, *optional*): initial weights; uniform by default.
        seed (`int`, *optional*, defaults to 0): seeds the draws and the per-source permutations.
        horizon (`int`, *optional*, defaults to 0): draws an update is delayed by (≥ what the DataLoader
            prefetches); see the module docstring.
    """

    def __init__(
        self, source_sizes: Sequence[int], weights: Sequence[float] | None = None, *, seed: int = 0, horizon: int = 0
    ) -> None:
        self.source_sizes = [int(size) for size in source_sizes]
        if not self.source_sizes or min(self.source_sizes) <= 0:
            raise ValueError("source_sizes: every source needs at least one example")
        if horizon < 0:
            raise ValueError(f"horizon: expected >= 0, got {horizon}")
        self.seed, self.horizon = int(seed), int(horizon)
        start = [1.0] * len(self.source_sizes) if weights is None else weights
        self.schedule: list[tuple[int, list[float]]] = [(0, self._normalised(start))]
        self.generated = 0  # draws handed out so far (>= consumed: the DataLoader prefetches)
        self.counts = [0] * len(self.source_sizes)  # draws per source so far (realised mixture)

    def _normalised(self, weights: Sequence[float]) -> list[float]:
        values = [float(w) for w in weights]
        if len(values) != len(self.source_sizes) or any(not np.isfinite(w) or w < 0 for w in values) or not sum(values):
            raise ValueError(f"weights: expected {len(self.source_sizes)} finite non-negative weights with a positive "
                             f"sum, got {list(weights)}")
        total = sum(values)
        return [w / total for w in values]

    # ------------------------------------------------------------------ weights
    @property
    def weights(self) -> list[float]:
        """The newest weights (in force from ``schedule[-1][0]``)."""
        return list(self.schedule[-1][1])

    def set_weights(self, weights: Sequence[float], consumed: int) -> int:
        """Use ``weights`` from draw ``consumed + horizon`` on; return that draw number.

        Raises:
            ValueError: the sampler has already handed out draws past that point (the horizon is smaller than the
                DataLoader's prefetch), or ``consumed`` goes back before the previous update.
        """
        start = int(consumed) + self.horizon
        if start < self.schedule[-1][0]:
            raise ValueError(f"consumed: update at draw {start} precedes the previous one at {self.schedule[-1][0]}")
        if start < self.generated:
            raise ValueError(f"horizon: {self.generated} draws were already handed out, past draw {start} where the "
                             f"update should start; raise the horizon (>= prefetched draws)")
        self.schedule.append((start, self._normalised(weights)))
        return start

    # ------------------------------------------------------------------ draws
    def sources_of(self, start: int, count: int) -> np.ndarray:
        """Source of draws ``start .. start+count-1`` (pure in seed and schedule)."""
        u = uniforms(self.seed, start, count)
        draws = np.arange(start, start + count)
        result = np.empty(count, dtype=np.int64)
        bounds = [segment_start for segment_start, _ in self.schedule[1:]] + [np.iinfo(np.int64).max]
        # one vectorised pass per schedule segment
        for (segment_start, weights), end in zip(self.schedule, bounds, strict=True):
            inside = (draws >= segment_start) & (draws < end)
            if inside.any():
                cumulative = np.cumsum(weights)
                picked = np.searchsorted(cumulative, u[inside] * cumulative[-1], side="right")
                result[inside] = np.minimum(picked, len(weights) - 1)
        return result

    def _position(self, source: int, k: int) -> int:
        """The k-th example of a source's stream: a seeded permutation per pass over the source."""
        size = self.source_sizes[source]
        epoch, offset = divmod(k, size)
        order = np.random.Generator(np.random.PCG64([self.seed, source, epoch])).permutation(size)
        return int(order[offset])

    def __iter__(self) -> Iterator[int]:
        offsets = np.cumsum([0] + self.source_sizes)
        while True:
            source = int(self.sources_of(self.generated, 1)[0])
            position = self._position(source, self.counts[source])
            self.counts[source] += 1
            self.generated += 1
            yield int(offsets[source] + position)

    def __len__(self) -> int:  # an infinite stream; Trainer needs max_steps
        raise TypeError("DynamicMixtureSampler is infinite: train with max_steps")

    # ------------------------------------------------------------------ checkpointing
    def state_dict(self, consumed: int) -> dict[str, Any]:
        """State at ``consumed`` draws (what the trainer used; prefetched draws are replayed after a resume)."""
        return {"seed": self.seed, "horizon": self.horizon, "consumed": int(consumed),
                "schedule": [[start, list(weights)] for start, weights in self.schedule],
                "source_sizes": list(self.source_sizes)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Resume: the next draw handed out is draw ``state["consumed"]``, exactly as in an uninterrupted run."""
        if list(state["source_sizes"]) != self.source_sizes:
            raise ValueError(f"state: source sizes {state['source_sizes']} differ from {self.source_sizes}")
        self.seed, self.horizon = int(state["seed"]), int(state["horizon"])
        self.schedule = [(int(start), list(weights)) for start, weights in state["schedule"]]
        consumed = int(state["consumed"])
        replayed = np.bincount(self.sources_of(0, consumed), minlength=len(self.source_sizes)) if consumed else None
        self.counts = [0] * len(self.source_sizes) if replayed is None else replayed.tolist()
        self.generated = consumed


def realised_fractions(sampler: DynamicMixtureSampler) -> list[float]:
    """Share of each source among the draws handed out so far."""
    total = max(1, sum(sampler.counts))
    return [count / total for count in sampler.counts]


__all__ = ["DynamicMixtureSampler", "MixtureDataset", "realised_fractions", "uniforms"]
