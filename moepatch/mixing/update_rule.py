"""Dynamic data mixing (Dynamic Data Mixing, Zhu et al., 2024): the sampling-weight update from per-source expert loads.

Every ``m`` optimizer steps each data source's probe set is routed through the model; its expert loads (hard
top-k counts of a MoE layer) are L1-normalised into ``Ô_i``.  Sources whose routing differs most from the others
gain weight (the paper's Algorithm 1)::

    δ_ij = ‖Ô_i − Ô_j‖₂              (distance="l2")   or   1 − cos(Ô_i, Ô_j)  (distance="cos")
    Δ_i  = reduce_j δ_ij              (criterion="mean" includes the zero diagonal, as the official code does)
    α    = softmax(log w + η·Δ)
    w    ← normalise((1 − c)·α + c/|D|)

The update compounds multiplicatively (``log w`` carries over) and keeps every weight ≥ c/|D|.  With two sources
Δ_1 = Δ_2, so the weights never move (the paper's stated limitation): use three or more.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from typing import Any

import torch

from moepatch.errors import MoePatchWarning

DISTANCES = ("l2", "cos")
CRITERIA = ("mean", "max", "min")
DEGENERATE = {("l2", "min"): "the zero diagonal makes every Δ 0", ("cos", "max"): "the unit diagonal makes every Δ 0"}


def _as_matrix(loads: Any) -> torch.Tensor:
    matrix = torch.as_tensor(loads, dtype=torch.float64)
    if matrix.dim() != 2 or matrix.shape[0] == 0 or matrix.shape[1] == 0:
        raise ValueError(f"loads: expected a |D| x E matrix of expert loads, got shape {tuple(matrix.shape)}")
    if not torch.isfinite(matrix).all() or (matrix < 0).any():
        raise ValueError("loads: expert loads must be finite and non-negative")
    totals = matrix.sum(dim=1)
    if (totals <= 0).any():
        raise ValueError(f"loads: source {int((totals <= 0).nonzero()[0])} has no routed tokens (all-zero row)")
    return matrix / totals.unsqueeze(1)  # L1-normalised: raw counts and normalised loads give the same result


def source_distances(loads: Any, *, distance: str = "l2", criterion: str = "mean") -> list[float]:
    """Δ: how different each source's routing is from the others (one value per source, in the loads' order).

    Args:
        loads: ``|D| x E`` expert loads (raw counts or L1-normalised) per source.
        distance (`str`, *optional*, defaults to `"l2"`): ``"l2"`` (used by the paper) or ``"cos"``.
        criterion (`str`, *optional*, defaults to `"mean"`): row reduction ``"mean"`` / ``"max"`` / ``"min"``.
    """
    if distance not in DISTANCES:
        raise ValueError(f"distance: expected one of {DISTANCES}, got {distance!r}")
    if criterion not in CRITERIA:
        raise ValueError(f"criterion: expected one of {CRITERIA}, got {criterion!r}")
    if (distance, criterion) in DEGENERATE:
        warnings.warn(
            f"distance={distance!r} with criterion={criterion!r} is degenerate ({DEGENERATE[distance, criterion]}): "
            "only the smoothing term c acts",
            MoePatchWarning,
            stacklevel=3,
        )
    normalised = _as_matrix(loads)  # [D, E]
    if distance == "l2":
        pairwise = torch.cdist(normalised, normalised)  # [D, D], zero diagonal
    else:
        unit = normalised / normalised.norm(dim=1, keepdim=True)
        pairwise = unit @ unit.T  # [D, D] cosine similarities, unit diagonal
    reduced = {"mean": pairwise.mean(dim=1), "max": pairwise.max(dim=1).values, "min": pairwise.min(dim=1).values}
    delta = reduced[criterion]
    return (delta if distance == "l2" else 1.0 - delta).tolist()


def mix_weights(
    weights: Sequence[float], distances: Sequence[float], *, eta: float = 10.0, c: float = 0.05
) -> list[float]:
    """``normalise((1 − c)·softmax(log w + η·Δ) + c/|D|)`` — the update given Δ."""
    w = torch.as_tensor(list(weights), dtype=torch.float64)
    delta = torch.as_tensor(list(distances), dtype=torch.float64)
    if w.dim() != 1 or w.numel() == 0 or delta.shape != w.shape:
        raise ValueError(f"weights / distances: expected two vectors of the same length |D| >= 1, got "
                         f"{tuple(w.shape)} and {tuple(delta.shape)}")
    if not torch.isfinite(w).all() or (w <= 0).any():
        raise ValueError("weights: every weight must be finite and > 0 (they are updated in log space)")
    if not (math.isfinite(eta) and eta >= 0):
        raise ValueError(f"eta: expected a finite value >= 0, got {eta!r}")
    if not 0.0 <= c <= 1.0:
        raise ValueError(f"c: expected a smoothing value in [0, 1], got {c!r}")
    alpha = torch.softmax(torch.log(w / w.sum()) + eta * delta, dim=0)
    mixed = (1.0 - c) * alpha + c / w.numel()
    return (mixed / mixed.sum()).tolist()


def update_weights(
    weights: Sequence[float],
    loads: Any,
    *,
    eta: float = 10.0,
    c: float = 0.05,
    distance: str = "l2",
    criterion: str = "mean",
) -> list[float]:
    """One dynamic-sampling update (pure).

    Args:
        weights: the current |D| sampling weights (positive; normalised here).
        loads: ``|D| x E`` per-source expert loads, raw counts or L1-normalised, sources in the weights' order.
        eta (`float`, *optional*, defaults to 10.0): step size η.
        c (`float`, *optional*, defaults to 0.05): smoothing towards uniform; every weight stays ≥ c/|D|.
        distance (`str`, *optional*, defaults to `"l2"`): ``"l2"`` or ``"cos"``.
        criterion (`str`, *optional*, defaults to `"mean"`): ``"mean"``, ``"max"`` or ``"min"`` (``l2``+``min`` and
            ``cos``+``max`` are degenerate and warn).

    Returns:
        `list[float]`: the new |D| weights, summing to 1.

    Raises:
        ValueError: naming the bad argument (shapes, negative loads, an all-zero source, non-positive weights, η < 0,
            c outside [0, 1], unknown distance or criterion).
    """
    if len(weights) != len(_as_matrix(loads)):
        raise ValueError(f"weights / loads: {len(weights)} weights for {len(_as_matrix(loads))} sources")
    return mix_weights(weights, source_distances(loads, distance=distance, criterion=criterion), eta=eta, c=c)
