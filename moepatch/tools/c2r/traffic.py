"""Bytes an expert-parallel dispatch moves between ranks for a placement, predicted from the routing.

Two dispatchers are modelled, one MoE layer at a time, over ``D`` expert-parallel ranks that each host one group of
the placement (device ``d`` hosts group ``d``, contiguous ids after a renumbering):

* **per pair** — transformers' ``AllToAllEP``: one row per (token, chosen expert), sent to the expert's rank. A token
  sends ``k`` rows whatever the placement.
* **dedup** — moepatch's ``"moepatch_dedup"`` (:class:`~moepatch.expert_parallel.dispatch.DedupAllToAllEP`), and the
  way DeepEP and MegaBlocks-style dispatchers count traffic: one row per (token, distinct rank of its experts). A
  token sends as many rows as it has distinct ranks ("copies per token", the quantity C2R and the placement lower).

A row a rank sends to itself is a copy, not traffic: the figures are split into *remote* rows (to another rank) and
*local* ones (to the token's own rank), and only remote rows cost bandwidth. Which rank a token starts on (its
*source rank*) decides which of its rows are local. Given the source rank of every token, the counts are exact (what
the dispatch counts in :class:`~moepatch.expert_parallel.dispatch.DispatchTraffic` on the same tokens); without it, a
token's source rank is taken as uniform over the ``D`` ranks and the figures are the exact expectation under that
assumption: ``remote = rows × (D - 1) / D`` (per pair ``k (D - 1) / D`` per token, for any placement; dedup
``copies (D - 1) / D``). Copies per token themselves always come from each token's expert set (exact), never from
pair counts of a ``k > 2`` model (see :func:`moepatch.tools.c2r.placement.copies_per_token_from_pairs`).

Each row carries ``hidden × element size`` bytes of hidden state; the combine step sends one row back per row out,
so the return traffic equals the dispatch traffic. The dedup dispatch also sends, per row, the token's ``k`` local
expert ids (int32) and routing weights (metadata, counted apart by the dispatch); the per-pair dispatch sends
per-expert counts instead. Neither is in the figures here, which are hidden-state bytes.
"""

from __future__ import annotations

from collections.abc import Mapping
from collections.abc import Sequence
from dataclasses import dataclass
from fractions import Fraction
from typing import Any

import numpy as np
import torch

from moepatch.tools.c2r.placement import ArrayLike
from moepatch.tools.c2r.placement import _as_numpy
from moepatch.tools.c2r.placement import device_of_choices

COPIES_SOURCES = {"indices": "counted from each profiled token's experts",
                  "pairs": "exact from top-2 pair counts (one pair per token)",
                  None: "not computed: pair counts of a top-k > 2 model do not give them"}
"""How a report's copies per token were obtained (its layers' ``copies_source``), in words."""

Number = int | Fraction
"""An exact count: an ``int`` with given source ranks, a ``Fraction`` (an expectation) with uniform ones."""


@dataclass(frozen=True)
class DispatchRows:
    """Rows one MoE layer's dispatch sends for ``tokens`` tokens under one placement (see the module docstring).

    With ``source == "given"`` every figure is an exact ``int``; with ``source == "uniform"`` the row figures are the
    exact expectation (a ``Fraction``) when each token's source rank is uniform over the ``ep_size`` ranks.
    """

    tokens: int
    top_k: int
    ep_size: int
    source: str
    """``"given"`` (each token's source rank known) or ``"uniform"`` (assumed uniform over the ranks)."""
    copies: int
    """Σ over tokens of the number of distinct ranks holding the token's experts (exact in both cases)."""
    pair_rows_remote: Number
    """Per-pair dispatch: (token, expert) pairs whose expert sits on another rank than the token's."""
    pair_rows_local: Number
    """Per-pair dispatch: pairs whose expert sits on the token's own rank (copies, not traffic)."""
    dedup_rows_remote: Number
    """Dedup dispatch: (token, rank) rows to ranks other than the token's."""
    dedup_rows_local: Number
    """Dedup dispatch: tokens with an expert on their own rank (one local row each)."""

    def per_token(self, row_bytes: int | None = None) -> dict[str, float | None]:
        """Means per token (floats), with hidden-state bytes when ``row_bytes`` (hidden × element size) is given."""
        result: dict[str, float | None] = {
            "copies_per_token": float(Fraction(self.copies, self.tokens)),
            "pair_rows_remote_per_token": float(Fraction(self.pair_rows_remote) / self.tokens),
            "pair_rows_local_per_token": float(Fraction(self.pair_rows_local) / self.tokens),
            "dedup_rows_remote_per_token": float(Fraction(self.dedup_rows_remote) / self.tokens),
            "dedup_rows_local_per_token": float(Fraction(self.dedup_rows_local) / self.tokens),
        }
        for name in ("pair", "dedup"):
            remote = Fraction(getattr(self, f"{name}_rows_remote")) / self.tokens
            result[f"{name}_bytes_remote_per_token"] = None if row_bytes is None else float(remote * row_bytes)
        return result


def predict_dispatch(
    indices: ArrayLike, groups: Sequence[Sequence[int]], *, source_ranks: ArrayLike | None = None
) -> DispatchRows:
    """Rows the per-pair and the dedup dispatch send for these tokens under ``groups`` (device ``d`` hosts
    ``groups[d]``).

    Args:
        indices (`ArrayLike`): ``[N, k]`` expert ids chosen for each of ``N`` tokens (one layer). The per-pair
            dispatch sends one row per slot (``k`` per token), the dedup one per distinct rank.
        groups (`Sequence[Sequence[int]]`): a partition of ``range(E)``, one group per expert-parallel rank.
        source_ranks (`ArrayLike`, *optional*): ``[N]`` rank each token is dispatched from; exact counts. Without it
            the source rank is taken as uniform over the ranks (exact expectations).

    Raises:
        ValueError: malformed indices (not a non-empty ``[N, k]`` integer array, ids outside ``range(E)``), groups
            that are not a partition, or source ranks not ``[N]`` in ``range(D)``.
    """
    rank_of = device_of_choices(indices, groups)  # [N, k]; checks the indices and the partition
    ep_size = len(groups)
    tokens, top_k = rank_of.shape
    present = np.zeros((tokens, ep_size), dtype=bool)
    np.put_along_axis(present, rank_of, True, axis=1)
    copies = int(present.sum())
    pair_local: Number
    dedup_local: Number
    if source_ranks is None:
        share = Fraction(1, ep_size)
        pair_local, dedup_local = tokens * top_k * share, copies * share
        source = "uniform"
    else:
        sources = _as_numpy(source_ranks)
        if sources.shape != (tokens,) or not np.issubdtype(sources.dtype, np.integer):
            raise ValueError(f"source_ranks must be [N = {tokens}] integers, got shape {tuple(sources.shape)} "
                             f"and dtype {sources.dtype}")
        if tokens and (sources.min() < 0 or sources.max() >= ep_size):
            raise ValueError(f"source ranks must lie in range(0, {ep_size})")
        pair_local = int((rank_of == sources[:, None]).sum())
        dedup_local = int(present[np.arange(tokens), sources].sum())
        source = "given"
    return DispatchRows(
        tokens=tokens, top_k=top_k, ep_size=ep_size, source=source, copies=copies,
        pair_rows_remote=tokens * top_k - pair_local, pair_rows_local=pair_local,
        dedup_rows_remote=copies - dedup_local, dedup_rows_local=dedup_local,
    )


def chunk_source_ranks(num_tokens: int, ep_size: int) -> np.ndarray:
    """The source rank of each of ``num_tokens`` tokens when every rank of the EP group holds the same batch and
    dispatches its ``torch.chunk`` slice of it (what transformers' EP dispatches do when ``tp_size == ep_size``)."""
    chunk = -(-num_tokens // ep_size) if num_tokens else 1
    return np.arange(num_tokens) // chunk


# ----------------------------------------------------------------------------------------------------- reports
def dispatch_columns(
    contiguous: DispatchRows | None, planned: DispatchRows | None, *, top_k: int, ep_size: int,
    row_bytes: int | None,
) -> dict[str, Any]:
    """One layer's ``"dispatch"`` entry of a placement report (uniform source rank): per-pair and dedup remote rows
    (and bytes with ``row_bytes``) per token, for the contiguous and the planned placement. The per-pair figures do
    not depend on the placement under a uniform source rank (``k (D - 1) / D`` rows); a ``None`` placement (copies
    unknown) leaves its dedup figures ``None``."""
    pair_rows = float(Fraction(top_k * (ep_size - 1), ep_size))
    entry: dict[str, Any] = {
        "pair_rows_remote_per_token": pair_rows,
        "pair_bytes_remote_per_token": None if row_bytes is None else pair_rows * row_bytes,
    }
    for name, rows in (("contiguous", contiguous), ("planned", planned)):
        figures = rows.per_token(row_bytes) if rows is not None else None
        for key in ("dedup_rows_remote_per_token", "dedup_rows_local_per_token", "dedup_bytes_remote_per_token"):
            entry[f"{name}_{key}"] = None if figures is None else figures[key]
    return entry


def dispatch_from_copies(copies_per_token: float | None, ep_size: int) -> dict[str, float | None]:
    """Dedup remote / local rows per token from an exact mean copies per token (uniform source rank): ``copies
    (D - 1) / D`` and ``copies / D``; ``None`` when the copies are unknown."""
    if copies_per_token is None:
        return {"dedup_rows_remote_per_token": None, "dedup_rows_local_per_token": None}
    return {"dedup_rows_remote_per_token": copies_per_token * (ep_size - 1) / ep_size,
            "dedup_rows_local_per_token": copies_per_token / ep_size}


def row_size(hidden_size: int, dtype: torch.dtype, dtype_source: str) -> dict[str, Any]:
    """What one dispatched row weighs: ``hidden_size`` elements of ``dtype`` (the hidden state the experts receive),
    as a report's ``"dispatch"`` entry records it; ``dtype_source`` says where the figures came from."""
    element = torch.empty((), dtype=dtype).element_size()
    return {"hidden_size": hidden_size, "dtype": str(dtype).removeprefix("torch."), "element_size": element,
            "row_bytes": hidden_size * element, "dtype_source": dtype_source}


def add_dispatch_from_copies(report: dict[str, Any], row: Mapping[str, Any] | None = None) -> None:
    """Add the ``"dispatch"`` entries to a :func:`placement_report` built from matrices, from its copies per token
    where they are exact (top-2 pair counts) and ``None`` where they are not (``k > 2``). A matrix file records no
    hidden size or dtype, so bytes come only with ``row`` (:func:`row_size`, from ``place --hidden-size``); rows
    otherwise."""
    ep_size, top_k = report["ep_size"], report["top_k"]
    row_bytes = None if row is None else int(row["row_bytes"])
    for layer in report["layers"]:
        entry = dispatch_columns(None, None, top_k=top_k, ep_size=ep_size, row_bytes=row_bytes)
        for name in ("contiguous", "planned"):
            for key, value in dispatch_from_copies(layer[f"{name}_copies_per_token"], ep_size).items():
                entry[f"{name}_{key}"] = value
            remote = entry[f"{name}_dedup_rows_remote_per_token"]
            entry[f"{name}_dedup_bytes_remote_per_token"] = (None if remote is None or row_bytes is None
                                                             else remote * row_bytes)
        layer["dispatch"] = entry
    report["dispatch"] = {"source_rank": "uniform", **(dict(row) if row is not None else {"row_bytes": None})}


def format_dispatch(report: Mapping[str, Any]) -> str:
    """The ``"dispatch"`` entries of a placement report as a text table: per layer, remote rows and bytes per token
    of the per-pair dispatch and of the dedup dispatch under the contiguous and the planned placement, then the sum
    over the layers (one forward). Empty when the report has none."""
    info = report.get("dispatch")
    if not info or not report["layers"] or "dispatch" not in report["layers"][0]:
        return ""
    ep_size, top_k = report["ep_size"], report["top_k"]
    row_bytes = info.get("row_bytes")

    def cell(value: float | None, width: int, digits: int) -> str:
        return f"{'-':>{width}}" if value is None else f"{value:>{width}.{digits}f}"

    def ratio(value: float | None, base: float | None) -> str:
        return f"{'-':>9}" if value is None or not base else f"{value / base:>8.3f}x"

    if row_bytes is not None:
        unit = (f"bytes: row = hidden {info['hidden_size']} x {info['dtype']} ({info['element_size']} B) = "
                f"{row_bytes} B ({info['dtype_source']})")
    else:
        unit = ("bytes: not computed (a matrix file records no hidden size or dtype; pass --hidden-size H and "
                "--dtype, or run place on the checkpoint)")
    share = f"({ep_size}-1)/{ep_size}"
    copies = COPIES_SOURCES.get(report["layers"][0].get("copies_source"), "unknown")
    lines = [
        f"dispatch traffic per token and MoE layer over {ep_size} ranks: remote rows only (a row a rank sends itself "
        "is a copy, not traffic); the combine sends as many rows back",
        f"  per pair = transformers' all_to_all, one row per (token, expert): {top_k} x {share} rows, any placement",
        f"  dedup = moepatch_dedup, one row per (token, distinct rank): copies per token x {share}; copies {copies}",
        f"  a token's source rank is taken as uniform over the {ep_size} ranks; {unit}",
    ]
    header = (f"{'layer':>5}  {'rows':>9}  {'bytes':>9}  {'rows':>10}  {'bytes':>9}  {'rows':>9}  {'bytes':>9}  "
              f"{'per pair':>9}")
    lines += [f"{'':>5}  {'per pair, any placement':<20}  {'dedup, contiguous':<21}  {'dedup, planned':<20}  "
              f"{'planned /':>9}", header, "-" * len(header)]
    columns = (("pair", "pair_rows_remote_per_token", "pair_bytes_remote_per_token"),
               ("contiguous", "contiguous_dedup_rows_remote_per_token", "contiguous_dedup_bytes_remote_per_token"),
               ("planned", "planned_dedup_rows_remote_per_token", "planned_dedup_bytes_remote_per_token"))
    totals: dict[str, float | None] = {name: 0.0 for name, _, _ in columns}
    for row in report["layers"]:
        entry = row["dispatch"]
        cells = []
        for (name, rows_key, bytes_key), width in zip(columns, (9, 10, 9), strict=True):
            cells += [cell(entry[rows_key], width, 4), cell(entry[bytes_key], 9, 0)]
            value = entry[bytes_key if row_bytes else rows_key]
            totals[name] = None if value is None or totals[name] is None else totals[name] + value
        ratio_cell = ratio(entry["planned_dedup_rows_remote_per_token"], entry["pair_rows_remote_per_token"])
        lines.append(f"{row['layer']:>5}  " + "  ".join(cells) + f"  {ratio_cell}")
    lines.append("-" * len(header))
    shown = ", ".join(f"{label} {cell(totals[name], 0, 0 if row_bytes else 4).strip()}" for name, label in (
        ("pair", "per pair"), ("contiguous", "dedup contiguous"), ("planned", "dedup planned")))
    summary = (f"one forward, all {len(report['layers'])} MoE layers, remote {'bytes' if row_bytes else 'rows'} per "
               f"token: {shown}")
    if totals["planned"] is not None and totals["pair"]:
        summary += f" ({totals['planned'] / totals['pair']:.3f}x per pair)"
    lines.append(summary)
    return "\n".join(lines)
