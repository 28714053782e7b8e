"""PNG pictures of routing statistics (needs matplotlib: ``pip install moepatch[plot]``)."""

from __future__ import annotations

from pathlib import Path

from moepatch.recorder import RoutingRecorder


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
    figure.tight_layout()
    path = Path(path)
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return path
