"""Copies per token under contiguous, planned and optimal expert placement, and the cost of planning.

Part 1 reads the shipped LLaMA-MoE-v1-3.5B (2/8) co-activation matrices (``data/c2r-moe`` in this repository, from
the C2R authors' release; 32 layers, 8 experts, top-2), profiled under vanilla routing (``base``) and under C2R with
T = 5 (``topt_5``), and prints for 2 and 4 devices the mean over layers of the copies per token (distinct devices a
token is sent to under per-device de-duplicated dispatch) for:

* the contiguous placement (experts ``0..E/D-1`` on device 0, ...);
* :func:`moepatch.tools.c2r.placement.plan_placement` (exact search for 8 experts), with its planning time for all
layers;
* the heuristic alone (``exhaustive_limit=0``), with its planning time;
* the exhaustive optimum (:func:`moepatch.tools.c2r.placement.exhaustive_placement`).

Part 2 times the heuristic on synthetic Qwen-sized layers (E = 60, top-4) and E = 64 (top-8 style fine-grained
MoE) for 24 layers.  Each layer's matrix is profiled from sampled routing with latent structure, so there is a
grouping worth finding; copies per token are exact, computed from the sampled indices.  E = 60 cannot be split
over 8 devices in equal groups, so E = 60 runs with D = 2, 4 and 6.

Both parts are CPU work by nature (planning runs on the host, on co-activation counts): there is no ``--device``.

Usage::

    python benchmarks/bench_placement.py
    python benchmarks/bench_placement.py --json figures.json   # also the key figures as JSON (see figures_json.py)
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
from figures_json import Figure
from figures_json import add_json_argument
from figures_json import write_summary

from moepatch.c2r import matrices as collaboration_io
from moepatch.c2r import placement

DATA_FILE = Path(__file__).resolve().parents[1] / "data" / "c2r-moe" / "llama-moe-v1-3_5b-2_8.collaboration.json"
LABELS = {"base_collaboration": "base (vanilla)", "topt_5_collaboration": "topt_5 (C2R)"}


def mean_copies(matrices: np.ndarray, placements: list[list[list[int]]]) -> float:
    """Mean over layers of the top-2 copies per token of one placement per layer."""
    return float(
        np.mean([placement.copies_per_token_from_pairs(matrix, groups)
                 for matrix, groups in zip(matrices, placements, strict=True)])
    )


def reduction(contiguous: float, other: float) -> str:
    return f"{100.0 * (contiguous - other) / contiguous:5.1f}%"


def real_data_table() -> list[Figure]:
    """Part 1: the shipped LLaMA-MoE matrices; returns the planned copies per token of each matrix and D."""
    figures = []
    matrices = {name: tensor.numpy() for name, tensor in collaboration_io.load_matrices(DATA_FILE).items()}
    print("== LLaMA-MoE-v1-3.5B (2/8): mean copies per token over 32 layers (top-2: 1 = always one device) ==")
    header = (
        f"{'matrix':<16}{'D':>3}  {'contig':>7}  {'planned':>7}  {'reduce':>6}  {'plan ms':>8}  "
        f"{'heuristic':>9}  {'heur ms':>8}  {'optimum':>7}  {'reduce':>6}  {'exh ms':>7}"
    )
    print(header)
    print("-" * len(header))
    for ep_size in (2, 4):
        for name in ("base_collaboration", "topt_5_collaboration"):
            layers = matrices[name]
            contiguous = mean_copies(layers, [placement.contiguous_placement(8, ep_size)] * len(layers))
            start = time.perf_counter()
            planned = [placement.plan_placement(matrix, ep_size) for matrix in layers]
            plan_ms = 1e3 * (time.perf_counter() - start)
            start = time.perf_counter()
            heuristic = [placement.plan_placement(matrix, ep_size, exhaustive_limit=0) for matrix in layers]
            heuristic_ms = 1e3 * (time.perf_counter() - start)
            start = time.perf_counter()
            optimum = [placement.exhaustive_placement(matrix, ep_size) for matrix in layers]
            exhaustive_ms = 1e3 * (time.perf_counter() - start)
            planned_copies = mean_copies(layers, planned)
            heuristic_copies = mean_copies(layers, heuristic)
            optimum_copies = mean_copies(layers, optimum)
            print(
                f"{LABELS[name]:<16}{ep_size:>3}  {contiguous:7.4f}  {planned_copies:7.4f}  "
                f"{reduction(contiguous, planned_copies):>6}  {plan_ms:8.1f}  {heuristic_copies:9.4f}  "
                f"{heuristic_ms:8.1f}  {optimum_copies:7.4f}  {reduction(contiguous, optimum_copies):>6}  "
                f"{exhaustive_ms:7.1f}"
            )
            figures.append(
                Figure(
                    f"LLaMA-MoE 8 experts, D={ep_size}",
                    f"{LABELS[name]}: planned copies/token",
                    planned_copies,
                    unit="copies/token",
                    extra=f"contiguous {contiguous:.4f} ({reduction(contiguous, planned_copies).strip()}"
                    f" less), optimum {optimum_copies:.4f}, plan {plan_ms:.0f} ms",
                )
            )
    print("(times are for all 32 layers; 'heuristic' forces greedy + Kernighan-Lin with exhaustive_limit=0)")
    return figures


def synthetic_layer(num_experts: int, top_k: int, num_tokens: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Sample top-k routing with latent token clusters and return (indices [N, k], co-activation counts [E, E])."""
    generator = np.random.default_rng(seed)
    num_clusters = 16
    cluster_bias = generator.normal(size=(num_clusters, num_experts)) * 1.5
    logits = (
        generator.normal(size=(num_tokens, num_experts)) + cluster_bias[generator.integers(0, num_clusters, num_tokens)]
    )
    indices = np.argpartition(-logits, top_k, axis=1)[:, :top_k]
    one_hot = np.zeros((num_tokens, num_experts), dtype=np.float64)  # float matmul uses BLAS; counts stay exact
    np.put_along_axis(one_hot, indices, 1.0, axis=1)
    counts = np.rint(one_hot.T @ one_hot).astype(np.int64)
    np.fill_diagonal(counts, -1)
    return indices, counts


def synthetic_timing(num_layers: int = 24, num_tokens: int = 20_000) -> list[Figure]:
    """Part 2: planning time and copies per token on synthetic large-E layers; returns the reduction per case."""
    figures = []
    print()
    print(f"== synthetic layers: {num_layers} layers, {num_tokens:,} sampled tokens each, heuristic planner ==")
    header = (
        f"{'E':>3}{'k':>3}{'D':>3}  {'contig':>7}  {'planned':>7}  {'reduce':>6}  {'total s':>8}  {'ms/layer':>8}  "
        f"{'max ms':>7}"
    )
    print(header)
    print("-" * len(header))
    cases = [(60, 4, 2), (60, 4, 4), (60, 4, 6), (64, 8, 2), (64, 8, 4), (64, 8, 8)]
    shapes = sorted({(num_experts, top_k) for num_experts, top_k, _ in cases})
    layers = {shape: [synthetic_layer(*shape, num_tokens, seed) for seed in range(num_layers)] for shape in shapes}
    for num_experts, top_k, ep_size in cases:
        contiguous = placement.contiguous_placement(num_experts, ep_size)
        durations: list[float] = []
        contiguous_copies: list[float] = []
        planned_copies: list[float] = []
        for indices, counts in layers[(num_experts, top_k)]:
            start = time.perf_counter()
            groups = placement.plan_placement(counts, ep_size)
            durations.append(time.perf_counter() - start)
            contiguous_copies.append(placement.copies_per_token_from_indices(indices, contiguous))
            planned_copies.append(placement.copies_per_token_from_indices(indices, groups))
        contiguous_mean, planned_mean = float(np.mean(contiguous_copies)), float(np.mean(planned_copies))
        print(
            f"{num_experts:>3}{top_k:>3}{ep_size:>3}  {contiguous_mean:7.4f}  {planned_mean:7.4f}  "
            f"{reduction(contiguous_mean, planned_mean):>6}  {sum(durations):8.3f}  {1e3 * np.mean(durations):8.1f}  "
            f"{1e3 * max(durations):7.1f}"
        )
        figures.append(
            Figure(
                f"synthetic E={num_experts} top-{top_k}, D={ep_size}",
                "planned vs contiguous copies/token",
                100.0 * (contiguous_mean - planned_mean) / contiguous_mean,
                unit="% less",
                extra=f"{1e3 * np.mean(durations):.1f} ms/layer to plan",
            )
        )
    return figures


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--synthetic-layers", type=int, default=24, help="layers of part 2 (fewer: a quicker run)")
    add_json_argument(parser)
    args = parser.parse_args(argv)
    if args.synthetic_layers < 1:
        parser.error(f"--synthetic-layers: expected an integer >= 1, got {args.synthetic_layers}")
    figures = real_data_table()
    figures += synthetic_timing(num_layers=args.synthetic_layers)
    write_summary(args.json, "bench_placement", args, figures)
    return 0


if __name__ == "__main__":
    sys.exit(main())
