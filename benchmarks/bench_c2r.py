"""C2R costs, measured side by side in one run (interleaved rounds on the same model and batches).

(a) profiling: a profiling pass (RoutingRecorder with co-activation counting) vs the plain forward over the same
    batches (target <= 1.10), and vs the official script's way: store each layer's top-k indices, then count pairs
    token by token in a Python loop.
(c) routing: the C2R-patched forward vs the unpatched forward (target <= 1.05), with the official Qwen1.5-MoE
    ``top_t = 30`` rule on random collaboration lists.

Models: the tiny Qwen2-MoE and a 2-layer model with Qwen1.5-MoE-A2.7B layer sizes (hidden 2048, 60 experts, top-4,
expert width 1408; vocabulary reduced).  Usage::

    python benchmarks/bench_c2r.py [--models tiny qwen1.5-moe-2l] [--rounds 6] [--device cuda --dtype bfloat16]
                                   [--json figures.json]   # also the key figures as JSON (see figures_json.py)
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import numpy as np
import torch
from bench_forward import add_common_arguments
from bench_forward import build_model
from bench_forward import make_batch
from bench_forward import synchronize
from figures_json import Figure
from figures_json import add_json_argument
from figures_json import write_summary

import moepatch
from model_patches.structure import describe
from moepatch.testing import tiny
from moepatch.tools.c2r.profiling import profile_coactivation

PROFILING_GOAL = 1.10
"""Profiling pass / plain forward over the same batches."""
C2R_GOAL = 1.05
"""C2R-patched forward / unpatched forward."""


def timed(device: torch.device, work: Callable[[], object]) -> float:
    synchronize(device)
    start = time.perf_counter()
    work()
    synchronize(device)
    return time.perf_counter() - start


def plain_pass(model: torch.nn.Module, batches: list[dict]) -> None:
    with torch.no_grad():
        for batch in batches:
            model(**batch)


def profiling_pass(model: torch.nn.Module, batches: list[dict]) -> None:
    profile_coactivation(model, batches, progress=False)


def official_pass(model: torch.nn.Module, batches: list[dict]) -> None:
    """Like the official profiling.py: keep the last top-k indices per layer, then a per-token Python pair loop."""
    moe = describe(model)
    counts = np.zeros((len(moe.layers), moe.num_experts, moe.num_experts), dtype=np.int64)
    last: dict[int, torch.Tensor] = {}
    hooks = [layer.router.register_forward_hook(lambda m, a, out, s=slot: last.__setitem__(s, out[2]) and None)
             for slot, layer in enumerate(moe.layers)]
    try:
        with torch.no_grad():
            for batch in batches:
                model(**batch)
                for slot in range(len(moe.layers)):
                    for token_experts in last[slot].cpu().numpy():
                        counts[slot][np.ix_(token_experts, token_experts)] += 1
    finally:
        for hook in hooks:
            hook.remove()


def interleave(variants: dict[str, Callable[[], float]], rounds: int) -> dict[str, float]:
    times: dict[str, list[float]] = {name: [] for name in variants}
    names = list(variants)
    for round_index in range(rounds):
        for name in names if round_index % 2 == 0 else reversed(names):
            times[name].append(variants[name]())
    return {name: statistics.median(values) for name, values in times.items()}


def measure(model: torch.nn.Module, batches: list[dict], c2r: dict, device: torch.device, rounds: int) -> dict:
    def c2r_pass() -> float:
        with moepatch.patched(model, c2r) as handle:
            assert handle.c2r_routers
            return timed(device, lambda: plain_pass(model, batches))

    return interleave(
        {
            "plain": lambda: timed(device, lambda: plain_pass(model, batches)),
            "profiling": lambda: timed(device, lambda: profiling_pass(model, batches)),
            "official loop": lambda: timed(device, lambda: official_pass(model, batches)),
            "c2r": c2r_pass,
        },
        rounds,
    )


def counting_only(layers: int = 24, tokens: int = 8192, experts: int = 60, top_k: int = 4) -> tuple[float, float]:
    """Seconds to count one batch's co-activations: the official per-token loop vs the recorder's batched flush.

    Both get the same routed indices of ``layers`` layers (Qwen1.5-MoE shape); the recorder path is the real
    :class:`~moepatch.routing.recorder.RoutingRecorder` code, fed through its flush.
    """
    model = tiny.tiny_model("qwen2_moe", num_hidden_layers=layers, mlp_only_layers=[], num_experts=experts,
                            num_experts_per_tok=top_k)
    generator = torch.Generator().manual_seed(0)
    logits = [torch.randn(tokens, experts, generator=generator) for _ in range(layers)]
    indices = [torch.topk(x, top_k, dim=-1).indices for x in logits]
    recorder = moepatch.RoutingRecorder(model, coactivation=True)

    def ours() -> None:
        recorder._pending = [(slot, logits[slot], indices[slot]) for slot in range(layers)]
        recorder._end_call()

    def official() -> None:
        counts = np.zeros((layers, experts, experts), dtype=np.int64)
        for slot in range(layers):
            for token_experts in indices[slot].numpy():
                counts[slot][np.ix_(token_experts, token_experts)] += 1

    ours_s = statistics.median(timed(torch.device("cpu"), ours) for _ in range(5))
    official_s = timed(torch.device("cpu"), official)
    assert int(recorder.coactivation.sum()) > 0  # the recorder really counted
    return ours_s, official_s


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_arguments(parser, rounds=6)
    parser.add_argument("--batches", type=int, default=3)
    parser.add_argument("--top-t", type=int, default=None, help="default: E/2 (30 for 60 experts, as in the paper)")
    add_json_argument(parser)
    args = parser.parse_args()
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    rows = []
    for name in args.models:
        model, vocab = build_model(name, args.vocab, device, dtype)
        batches = [make_batch(vocab, args.batch_size, args.seq, device) for _ in range(args.batches)]
        moe = describe(model)
        top_t = args.top_t or moe.num_experts // 2
        ranking = tiny.random_collaborative_list(moe.num_layers, moe.num_experts, 0)
        c2r = {"c2r": {"top_t": top_t, "collaborative_list": ranking}}
        plain_pass(model, batches)  # warm-up
        print(f"{name}: {moe.num_experts} experts top-{moe.top_k}, {args.batches} batches of "
              f"{args.batch_size}x{args.seq}, {args.device} {args.dtype}, {args.rounds} interleaved rounds", flush=True)

        rows.append((name, measure(model, batches, c2r, device, args.rounds), top_t))
        del model
    print()
    print(f"{'model':<16}{'plain s':>10}{'profiling s':>13}{'official s':>12}{'prof/plain':>12}"
          f"{'official/prof':>15}{'c2r s':>9}{'c2r/plain':>11}  top_t")
    for name, m, top_t in rows:
        print(f"{name:<16}{m['plain']:>10.4f}{m['profiling']:>13.4f}{m['official loop']:>12.4f}"
              f"{m['profiling'] / m['plain']:>12.3f}{m['official loop'] / m['profiling']:>15.2f}"
              f"{m['c2r']:>9.4f}{m['c2r'] / m['plain']:>11.3f}  {top_t}")
    print("profiling = RoutingRecorder co-activation counting (padding excluded); official = per-token Python loop;")
    print("c2r = collaboration-constrained routing patched in (apply/remove around each timed pass)")
    ours_s, official_s = counting_only()
    print()
    print(f"counting only, 24 layers x 8192 tokens x top-4 of 60 experts: recorder {ours_s * 1e3:.1f} ms, "
          f"official per-token loop {official_s * 1e3:.0f} ms ({official_s / ours_s:.0f}x)")
    figures = []
    for name, m, top_t in rows:
        setting = f"{name} {args.batches}x{args.batch_size}x{args.seq}"
        figures += [
            Figure(setting, "profiling / plain pass", m["profiling"] / m["plain"], goal_max=PROFILING_GOAL),
            Figure(setting, f"c2r top_t={top_t} / plain forward", m["c2r"] / m["plain"], goal_max=C2R_GOAL),
            Figure(setting, "official loop / profiling", m["official loop"] / m["profiling"],
                   extra="speed-up of the recorder"),
        ]
    figures.append(Figure("24L x 8192 tok, top-4 of 60 (CPU)", "counting: official loop / recorder",
                          official_s / ours_s, extra=f"{ours_s * 1e3:.1f} vs {official_s * 1e3:.0f} ms"))
    write_summary(args.json, "bench_c2r", args, figures)


if __name__ == "__main__":
    main()
