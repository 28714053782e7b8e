"""PNG pictures of routing statistics (needs matplotlib: ``pip install moepatch[plot]``)."""

from __future__ import annotations

from pathlib import Path

from moepatch.profiling import CoactivationProfile
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


def plot_coactivation(profile: CoactivationProfile, layers: list[int], path: str | Path) -> Path:
    """Heatmaps of the co-activation matrices of ``layers`` (absolute indices), one panel per layer."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, len(layers), figsize=(4.2 * len(layers), 3.8), squeeze=False)
    for axis, layer in zip(axes[0], layers):
        matrix = profile.matrices[profile.layers.index(layer)].double().clone()
        matrix.fill_diagonal_(float("nan"))  # the diagonal counts single experts, not pairs
        image = axis.imshow(matrix.numpy(), cmap="magma")
        axis.set_title(f"layer {layer}: co-activation")
        axis.set_xlabel("expert")
        axis.set_ylabel("expert")
        figure.colorbar(image, ax=axis, fraction=0.046, label="tokens")
    figure.suptitle(f"{profile.tokens} tokens, top-{profile.top_k} of {profile.num_experts} experts")
    figure.tight_layout()
    path = Path(path)
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path
