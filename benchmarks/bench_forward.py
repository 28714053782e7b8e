"""Forward time of the unpatched model vs the patched one (gate freezing + routing statistics on every MoE layer).

Both are measured side by side in one run, on the same model instance, in interleaved rounds (a few forwards
unpatched; apply, a few forwards, remove; alternating which goes first) so drifts of the machine hit both equally.
Prints the median times and their ratio per model:

* ``tiny``: the embedded-default tiny Qwen2-MoE (hidden 32, 8 experts, top-2) — worst case for relative overhead;
* ``qwen1.5-moe-2l``: Qwen1.5-MoE-A2.7B layer sizes (hidden 2048, 60 experts, top-4, expert width 1408, shared
  expert 5632, 16 heads) at reduced depth (2 layers) and a reduced vocabulary (the embedding and LM head are not
  what the patch touches; the full 151,936-token head would only dilute the ratio).

Usage::

    python benchmarks/bench_forward.py                      # both models, CPU
    python benchmarks/bench_forward.py --device cuda --dtype bfloat16 --rounds 30
    python benchmarks/bench_forward.py --json figures.json   # also the key figures as JSON (see figures_json.py)
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch
from figures_json import Figure
from figures_json import add_json_argument
from figures_json import write_summary
from tqdm import tqdm
from transformers import AutoModelForCausalLM
from transformers import Qwen2MoeConfig

import moepatch
from moepatch.testing import tiny

PATCH = {"freeze_gate": "router", "routing_stats": {"layers": None}}


def qwen15_moe_reduced(layers: int, vocab: int) -> Qwen2MoeConfig:
    """Qwen1.5-MoE-A2.7B per-layer sizes (its published config.json) with ``layers`` layers and ``vocab`` tokens."""
    return Qwen2MoeConfig(
        vocab_size=vocab,
        hidden_size=2048,
        intermediate_size=5632,
        moe_intermediate_size=1408,
        shared_expert_intermediate_size=5632,
        num_hidden_layers=layers,
        num_attention_heads=16,
        num_key_value_heads=16,
        num_experts=60,
        num_experts_per_tok=4,
        norm_topk_prob=False,
        initializer_range=0.02,
        pad_token_id=0,
    )


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_forward(model: torch.nn.Module, batch: dict, device: torch.device) -> float:
    synchronize(device)
    start = time.perf_counter()
    with torch.no_grad():
        model(**batch)
    synchronize(device)
    return time.perf_counter() - start


def measure(
    model: torch.nn.Module, batch: dict, device: torch.device, rounds: int, warmup: int, per_round: int
) -> tuple[list[float], list[float]]:
    """Interleaved rounds of ``per_round`` forwards each; returns (unpatched seconds, patched seconds)."""
    plain: list[float] = []
    patched: list[float] = []

    def unpatched_round(timed: bool) -> None:
        times = [time_forward(model, batch, device) for _ in range(per_round)]
        plain.extend(times if timed else [])

    def patched_round(timed: bool) -> None:
        with moepatch.patched(model, PATCH) as handle:
            times = [time_forward(model, batch, device) for _ in range(per_round)]
            expected = per_round * int(batch["attention_mask"].sum())
            assert int(handle.recorder.tokens[0]) == expected  # the patch really recorded every forward
        patched.extend(times if timed else [])

    for _ in range(warmup):
        unpatched_round(False)
        patched_round(False)
    for round_index in tqdm(range(rounds), desc="rounds", leave=False):
        order: list[Callable[[bool], None]] = [unpatched_round, patched_round]
        for step in order if round_index % 2 == 0 else reversed(order):
            step(True)
    return plain, patched


def make_batch(vocab: int, batch_size: int, seq: int, device: torch.device) -> dict:
    generator = torch.Generator().manual_seed(0)
    input_ids = torch.randint(3, vocab, (batch_size, seq), generator=generator)
    attention_mask = torch.ones_like(input_ids)
    attention_mask[0, seq * 3 // 4 :] = 0  # some right padding, so the mask path is exercised
    input_ids[attention_mask == 0] = 0
    return {"input_ids": input_ids.to(device), "attention_mask": attention_mask.to(device)}


def add_common_arguments(parser: argparse.ArgumentParser, rounds: int) -> None:
    """Arguments shared by the benchmark scripts (models, device, dtype, batch shape)."""
    parser.add_argument("--models", nargs="+", default=["tiny", "qwen1.5-moe-2l"])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--rounds", type=int, default=rounds)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--vocab", type=int, default=4096, help="vocabulary of the reduced Qwen1.5-MoE model")


def build_model(name: str, vocab: int, device: torch.device, dtype: torch.dtype) -> tuple[torch.nn.Module, int]:
    """``tiny`` (the embedded tiny Qwen2-MoE) or ``qwen1.5-moe-2l``; returns the model and its vocabulary size."""
    if name == "tiny":
        model, vocab = tiny.tiny_model("qwen2_moe"), len(tiny.tiny_tokenizer())
    elif name == "qwen1.5-moe-2l":
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(qwen15_moe_reduced(2, vocab)).eval()
    else:
        raise SystemExit(f"unknown model {name!r}")
    return model.to(device=device, dtype=dtype), vocab


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_arguments(parser, rounds=20)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--per-round", type=int, default=5, help="forwards timed per round and variant")
    add_json_argument(parser)
    args = parser.parse_args()
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    torch.manual_seed(0)
    rows = []
    for name in args.models:
        model, vocab = build_model(name, args.vocab, device, dtype)
        batch = make_batch(vocab, args.batch_size, args.seq, device)
        print(f"{name}: {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters, "
              f"batch {args.batch_size}x{args.seq}, {args.device} {args.dtype}, "
              f"{args.rounds} rounds x {args.per_round} forwards", flush=True)
        plain, patched = measure(model, batch, device, args.rounds, args.warmup, args.per_round)
        p50, q50 = statistics.median(plain), statistics.median(patched)
        rows.append((name, p50 * 1e3, q50 * 1e3, q50 / p50, min(patched) / min(plain)))
        del model
    print()
    print(f"{'model':<16}{'unpatched ms':>14}{'patched ms':>12}{'ratio (median)':>16}{'ratio (min)':>13}")
    for name, plain_ms, patched_ms, ratio, ratio_min in rows:
        print(f"{name:<16}{plain_ms:>14.2f}{patched_ms:>12.2f}{ratio:>16.3f}{ratio_min:>13.3f}")
    print("patched = freeze_gate 'router' + routing statistics on every MoE layer (padding excluded)")
    figures = [Figure(f"{name} {args.batch_size}x{args.seq}", "patched / unpatched forward (median)", ratio,
                      extra=f"{plain_ms:.2f} vs {patched_ms:.2f} ms; min ratio {ratio_min:.3f}")
               for name, plain_ms, patched_ms, ratio, ratio_min in rows]
    write_summary(args.json, "bench_forward", args, figures)


if __name__ == "__main__":
    main()
