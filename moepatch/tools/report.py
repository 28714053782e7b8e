"""What moepatch measured, for people: text tables, and PNG pictures of routing statistics and sampling weights
(the pictures need matplotlib: ``pip install moepatch[plot]``)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING
from typing import Any

import numpy as np

from moepatch.routing.recorder import RoutingRecorder
from moepatch.tools.c2r.profiling import CoactivationProfile

if TYPE_CHECKING:
    from matplotlib.figure import Figure


def format_table(headers: list[str], rows: list[list[Any]], *, rule: bool = True) -> list[str]:
    """Right-aligned columns (a dashed rule under the headers unless ``rule`` is off), as lines."""
    cells = [[str(c) for c in headers]] + [[str(c) for c in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    lines = []
    for n, row in enumerate(cells):
        lines.append("  ".join(cell.rjust(width) for cell, width in zip(row, widths, strict=True)))
        if n == 0 and rule:
            lines.append("  ".join("-" * width for width in widths))
    return lines


def _save(figure: Figure, path: str | Path, dpi: int) -> Path:
    import matplotlib.pyplot as plt

    figure.tight_layout()
    path = Path(path)
    figure.savefig(path, dpi=dpi)
    plt.close(figure)
    return path


def plot_routing_counts(recorder: RoutingRecorder, path: str | Path) -> Path:
    """Heatmap of each layer's share of top-k choices per expert; returns the PNG path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    counts = recorder.counts.double()
    share = counts / counts.sum(dim=1, keepdim=True).clamp(min=1)
    figure, axis = plt.subplots(figsize=(max(4.0, 0.35 * recorder.num_experts + 2), 0.45 * len(recorder.layers) + 1.6))
    image = axis.imshow(share.numpy(), aspect="auto", cmap="viridis", vmin=0)
    axis.set_xlabel("expert")
    axis.set_ylabel("layer")
    axis.set_yticks(range(len(recorder.layers)), [str(i) for i in recorder.layers])
    axis.set_title(f"{recorder.model.family.name}: share of top-{recorder.top_k} choices")
    figure.colorbar(image, ax=axis, label="share of choices")
    return _save(figure, path, dpi=120)


def plot_coactivation(profile: CoactivationProfile, layers: list[int], path: str | Path) -> Path:
    """Heatmaps of the co-activation matrices of ``layers`` (absolute indices), one panel per layer."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, len(layers), figsize=(4.2 * len(layers), 3.8), squeeze=False)
    for axis, layer in zip(axes[0], layers, strict=True):
        matrix = profile.matrices[profile.layers.index(layer)].double().clone()
        matrix.fill_diagonal_(float("nan"))  # the diagonal counts single experts, not pairs
        image = axis.imshow(matrix.numpy(), cmap="magma")
        axis.set_title(f"layer {layer}: co-activation")
        axis.set_xlabel("expert")
        axis.set_ylabel("expert")
        figure.colorbar(image, ax=axis, fraction=0.046, label="tokens")
    figure.suptitle(f"{profile.tokens} tokens, top-{profile.top_k} of {profile.num_experts} experts")
    return _save(figure, path, dpi=110)


def plot_sampling_rounds(rounds: list[dict], path: str | Path) -> Path:
    """Dynamic mixing at a glance: source weights over steps (left) and the last round's per-source expert loads.

    ``rounds`` are the records of ``sampling_info/rounds.jsonl``; the loads are L1-normalised per source (with
    several probe layers, the layers' experts follow each other on the x axis).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = rounds[-1]["sources"]
    steps = [0] + [record["step"] for record in rounds]
    weights = np.array([rounds[0]["old_weights"]] + [record["new_weights"] for record in rounds])
    loads = np.array(rounds[-1]["per_source_loads"], dtype=float)
    loads = loads / np.clip(loads.sum(axis=1, keepdims=True), 1e-12, None)
    figure, (left, right) = plt.subplots(1, 2, figsize=(11, 3.8), gridspec_kw={"width_ratios": [1, 1.3]})
    for index, name in enumerate(names):
        left.step(steps, weights[:, index], where="post", marker="o", markersize=3, label=name)
    left.set_xlabel("optimizer step")
    left.set_ylabel("sampling weight")
    left.set_title("source weights after each probe round")
    left.legend(fontsize=8)
    image = right.imshow(loads, aspect="auto", cmap="viridis", vmin=0)
    right.set_yticks(range(len(names)), names)
    right.set_xlabel("expert (probe layers)")
    right.set_title(f"per-source expert load, step {rounds[-1]['step']}")
    figure.colorbar(image, ax=right, label="share of top-k choices")
    return _save(figure, path, dpi=110)
