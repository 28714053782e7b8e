"""Cost of moepatch's routing features on DeepSeek-V3's router, measured side by side in one run.

moepatch executes every router kind of transformers through one declarative :class:`~model_patches.spec.RoutingRule`
(:mod:`model_patches.routing_rule`): once C2R is applied, a DeepSeek-V3 router is moepatch's executor, no longer
transformers' ``DeepseekV3TopkRouter.forward``.  This benchmark measures what that costs on the most elaborate router
kind transformers has — float32 logits, sigmoid scores plus the selection bias ``e_score_correction_bias``, 8 expert
groups scored by the sum of their 2 best biased scores, 4 groups kept, top-8 of 256 routed experts over hidden 7168,
``routed_scaling_factor`` 2.5, ``norm_topk_prob`` — against the goal patched / unpatched <= 1.05 per layer and per
forward:

(1) the full forward: unpatched vs ``routing_stats`` vs C2R (a realistic ``top_t = 32``, and ``top_t = E - 1 = 255``,
    which is vanilla top-k run through the executor and the C2R selection) vs ``routing_stats`` + C2R;
(2) the router alone (the MoE block's ``mlp.gate(hidden_states)`` call, on the block's real input captured from a
    forward): unpatched vs C2R, and where the time goes — the executor with the family's own top-k, and the selection
    step alone (the family's ``torch.topk``, C2R's masked top-k, C2R's whole ``constrained_topk`` including its
    group-limit fallback check); ``--profile`` adds torch.profiler tables of the gate call, with its kernel count and
    host synchronisations;
(3) the bias update (``"bias_update": {"rate": ...}``), only when that feature is registered: one training step
    (forward + backward) unpatched vs with the feature, and its ``.step()`` (once per optimizer step).

The model is built from transformers' real ``DeepseekV3Config`` with DeepSeek-V3's router sizes (above) and a random
non-zero ``e_score_correction_bias``, but with everything else the patch does not touch reduced to fit a 24 GiB CPU
machine: expert width (``moe_intermediate_size`` 64 instead of 2048), one shared expert of that width, multi-head
latent attention with 8 heads and ranks 64 (instead of 128 heads), 1 MoE layer (``--layers``; no dense layer:
``first_k_dense_replace`` 0) and a 4096-token vocabulary (instead of 129,280).  Those reductions make the patched /
unpatched ratios of (1) *stricter* than on the real model: the router, kept at full size, is a far larger share of a
layer's time than it is behind 2048-wide experts, 128 attention heads and the full LM head.  On a CPU the per-expert
matmuls still dominate the forward (small, memory-bound), so there the router-alone ratio (2) is the strict one; on a
GPU the router's small kernels are no longer hidden behind its matmul, and (1) and (2) both need checking.  With
``--dtype bfloat16`` the router weight and the bias stay float32, as ``from_pretrained`` keeps them
(``_keep_in_fp32_modules_strict``).

Usage::

    python benchmarks/bench_router_kinds.py                                   # CPU, 2x512 tokens
    python benchmarks/bench_router_kinds.py --threads 1 --clock cpu --rounds 6  # a CPU shared with other jobs
    python benchmarks/bench_router_kinds.py --device cuda --dtype bfloat16 --rounds 20 --per-round 5 --layers 2
    python benchmarks/bench_router_kinds.py --json figures.json   # also the key figures as JSON (see figures_json.py)
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch
from bench_forward import make_batch
from bench_forward import synchronize
from figures_json import Figure
from figures_json import add_json_argument
from figures_json import write_summary
from transformers import AutoModelForCausalLM
from transformers import DeepseekV3Config

import moepatch
from model_patches.routing_rule import router_logits
from model_patches.routing_rule import scores_of
from model_patches.routing_rule import selection_bias_of
from model_patches.routing_rule import selection_scores
from model_patches.routing_rule import vanilla_selector
from model_patches.structure import MoEModel
from model_patches.structure import describe
from moepatch.c2r.selection import _masked_topk
from moepatch.c2r.selection import allowed_table
from moepatch.c2r.selection import constrained_topk
from moepatch.feature import feature_named
from moepatch.routing.seam import layer_settings
from moepatch.routing.seam import routed_forward
from moepatch.testing import tiny

GOAL = 1.05
"""Patched / unpatched time per layer and per forward."""

clock: Callable[[], float] = time.perf_counter
"""The timer: the wall clock, or with ``--clock cpu`` the process's CPU time (CPU runs only: robust on a shared
machine, where the wall clock also counts the time other processes hold the cores)."""

BIAS_UPDATE = "bias_update"
"""Name of the auxiliary-loss-free bias update feature (benchmarked only when registered)."""


def deepseek_v3_router_sizes(
    layers: int, vocab: int, expert_width: int, experts_implementation: str | None
) -> DeepseekV3Config:
    """DeepSeek-V3's router sizes (its published config.json) with reduced experts, attention, depth and vocabulary."""
    extra = {} if experts_implementation is None else {"experts_implementation": experts_implementation}
    return DeepseekV3Config(
        vocab_size=vocab,
        hidden_size=7168,
        n_routed_experts=256,
        num_experts_per_tok=8,
        n_group=8,
        topk_group=4,
        routed_scaling_factor=2.5,
        norm_topk_prob=True,
        moe_intermediate_size=expert_width,
        n_shared_experts=1,
        intermediate_size=4 * expert_width,  # the dense MLP: unused with first_k_dense_replace=0
        first_k_dense_replace=0,
        num_hidden_layers=layers,
        num_attention_heads=8,
        num_key_value_heads=8,
        q_lora_rank=64,
        kv_lora_rank=64,
        qk_nope_head_dim=32,
        qk_rope_head_dim=16,
        v_head_dim=32,
        max_position_embeddings=4096,
        pad_token_id=0,
        **extra,
    )


def build_model(args: argparse.Namespace, device: torch.device, dtype: torch.dtype) -> torch.nn.Module:
    """The reduced DeepSeek-V3 model with a random non-zero selection bias; router weight and bias kept float32."""
    torch.manual_seed(0)
    config = deepseek_v3_router_sizes(args.layers, args.vocab, args.expert_width, args.experts_implementation)
    model = AutoModelForCausalLM.from_config(config).eval()
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for layer in describe(model).layers:
            bias = layer.router.e_score_correction_bias
            bias.copy_(torch.randn(bias.shape, generator=generator) * args.bias_std)
    model = model.to(device=device, dtype=dtype)
    for layer in describe(model).layers:
        layer.router.to(torch.float32)  # as from_pretrained keeps gate.weight and e_score_correction_bias
    return model


def timed(device: torch.device, work: Callable[[], object]) -> float:
    synchronize(device)
    start = clock()
    work()
    synchronize(device)
    return clock() - start


def rotated(names: list[str], round_index: int) -> list[str]:
    """Round ``r`` starts with variant ``r mod n`` (and odd rounds run backwards), so drifts hit every variant."""
    shift = round_index % len(names)
    order = names[shift:] + names[:shift]
    return order if round_index % 2 == 0 else order[::-1]


def interleaved(
    variants: dict[str, Callable[[], list[float]]], rounds: int, warmup: int, label: str
) -> dict[str, list[float]]:
    """Run every variant once per round (each returns the seconds of its timed calls); warm-up rounds are dropped."""
    times: dict[str, list[float]] = {name: [] for name in variants}
    names = list(variants)
    for round_index in range(warmup + rounds):
        for name in rotated(names, round_index):
            seconds = variants[name]()
            if round_index >= warmup:
                times[name].extend(seconds)
        kind = "warm-up" if round_index < warmup else "round"
        print(f"  {label}: {kind} {round_index + 1}/{warmup + rounds} done", flush=True)
    return times


def forward_variants(
    model: torch.nn.Module, batch: dict, device: torch.device, per_round: int, patches: dict[str, dict | None]
) -> dict[str, Callable[[], list[float]]]:
    """One callable per patch: apply it, time ``per_round`` forwards, check it did its work, remove it."""
    expected_tokens = int(batch["attention_mask"].sum())

    def forwards() -> list[float]:
        with torch.no_grad():
            return [timed(device, lambda: model(**batch)) for _ in range(per_round)]

    def run(config: dict | None) -> list[float]:
        if config is None:
            return forwards()
        with moepatch.patched(model, config) as handle:
            seconds = forwards()
            if "c2r" in config:
                assert handle.c2r_routers, "C2R patched no router"
            if "routing_stats" in config:
                assert int(handle.recorder.tokens[0]) == per_round * expected_tokens, "statistics missed tokens"
        return seconds

    return {name: (lambda config=config: run(config)) for name, config in patches.items()}


def capture_block_input(model: torch.nn.Module, structure: MoEModel, batch: dict) -> torch.Tensor:
    """The hidden states the first MoE block receives in a forward of ``batch`` (what its gate is called on)."""
    captured: list[torch.Tensor] = []
    hook = structure.layers[0].block.register_forward_pre_hook(lambda module, args: captured.append(args[0].detach()))
    try:
        with torch.no_grad():
            model(**batch)
    finally:
        hook.remove()
    return captured[0]


def router_variants(
    model: torch.nn.Module, structure: MoEModel, hidden: torch.Tensor, device: torch.device, calls: int,
    patches: dict[str, dict | None],
) -> dict[str, Callable[[], list[float]]]:
    """The first MoE layer's ``gate(hidden)`` per patch, plus the executor with the family's own top-k."""
    layer = structure.layers[0]
    rule = structure.family.routing
    executor = routed_forward(layer.router, layer.block, rule, layer_settings(structure, layer), vanilla_selector(rule))

    def gate_calls(call: Callable[[torch.Tensor], Any]) -> list[float]:
        with torch.no_grad():
            return [timed(device, lambda: call(hidden)) for _ in range(calls)]

    def run(config: dict | None) -> list[float]:
        if config is None:
            return gate_calls(layer.block.gate)
        with moepatch.patched(model, config):
            return gate_calls(layer.block.gate)

    variants = {name: (lambda config=config: run(config)) for name, config in patches.items()}
    variants["executor, family top-k"] = lambda: gate_calls(executor)
    return variants


def selection_variants(
    structure: MoEModel, hidden: torch.Tensor, ranking: list, top_ts: list[int], device: torch.device, calls: int
) -> tuple[dict[str, Callable[[], list[float]]], list[str]]:
    """The selection step alone, on the real selection scores of the first MoE layer; also what C2R changes there."""
    layer = structure.layers[0]
    rule, settings = structure.family.routing, layer_settings(structure, layer)
    k, experts = structure.top_k, structure.num_experts
    with torch.no_grad():
        logits = router_logits(rule, settings, layer.router, hidden.reshape(-1, hidden.shape[-1]))
        scores = scores_of(rule, logits)
        bias = selection_bias_of(rule, layer.router, layer.block)
        selection, ungrouped, kept = selection_scores(rule, settings, scores, bias)
    candidates = torch.tensor(ranking[layer.index], dtype=torch.int64, device=device)  # [E, E], the expert last
    vanilla = torch.topk(selection, k, dim=-1, sorted=False).indices.sort(dim=-1).values

    def repeat(work: Callable[[], object]) -> list[float]:
        with torch.no_grad():
            return [timed(device, work) for _ in range(calls)]

    variants: dict[str, Callable[[], list[float]]] = {
        "group limit (shared)": lambda: repeat(lambda: selection_scores(rule, settings, scores, bias)),
        "family top-k": lambda: repeat(lambda: torch.topk(selection, k, dim=-1, sorted=False)),
    }
    notes = []
    for top_t in top_ts:
        allowed = allowed_table(candidates[:, :top_t], experts)
        variants[f"masked top-k T={top_t}"] = lambda allowed=allowed: repeat(
            lambda: _masked_topk(selection, k, allowed, selected=k, sorted=False))
        variants[f"constrained_topk T={top_t}"] = lambda allowed=allowed: repeat(
            lambda: constrained_topk(selection, k, allowed, sorted=False, ungrouped=ungrouped, kept=kept))
        chosen = constrained_topk(selection, k, allowed, sorted=False, ungrouped=ungrouped)[1].sort(dim=-1).values
        row_allowed = allowed[selection.argmax(dim=-1)]
        short = ((row_allowed & (selection == ungrouped)).sum(dim=-1) < k).float().mean()
        changed = (chosen != vanilla).any(dim=-1).float().mean()
        notes.append(f"T={top_t}: {float(changed):.1%} of tokens route differently from vanilla; {float(short):.1%} "
                     f"take the group-limit fallback (fewer than {k} allowed experts in the kept groups)")
    return variants, notes


def find_updater(handle: moepatch.PatchHandle) -> Any:
    """The bias-update object the handle exposes (the one with a ``step()``), or ``None``."""
    installed = handle.installed.get(BIAS_UPDATE)
    values = list(installed.attributes.values()) if installed is not None else []
    return next((value for value in values if callable(getattr(value, "step", None))), None)


def bias_update_times(
    model: torch.nn.Module, structure: MoEModel, batch: dict, device: torch.device, rounds: int, warmup: int,
    rate: float,
) -> dict[str, list[float]]:
    """Training steps (forward + backward) unpatched vs with the bias update; its ``.step()`` timed on its own."""
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    biases = [layer.router.e_score_correction_bias.detach().clone() for layer in structure.layers]
    update_steps: list[float] = []

    def train_step() -> None:
        model.zero_grad(set_to_none=True)
        model(**batch, labels=labels).loss.backward()

    def unpatched() -> list[float]:
        return [timed(device, train_step)]

    def patched() -> list[float]:
        with moepatch.patched(model, {BIAS_UPDATE: {"rate": rate}}) as handle:
            updater = find_updater(handle)
            assert updater is not None, "the bias_update handle exposes no object with a step()"
            seconds = timed(device, train_step)
            update_steps.append(timed(device, updater.step))
        return [seconds]

    model.train()
    try:
        times = interleaved({"train step": unpatched, "train step, bias_update": patched}, rounds, warmup, "bias")
    finally:
        model.eval()
        model.zero_grad(set_to_none=True)
        with torch.no_grad():
            for layer, bias in zip(structure.layers, biases, strict=True):
                layer.router.e_score_correction_bias.copy_(bias)
    times[".step()"] = update_steps[warmup:]
    return times


def print_table(
    title: str, times: dict[str, list[float]], baseline: str, rows: list[str] | None = None, goal: bool = True
) -> None:
    """Median (and min) ms per variant, with the ratio to ``baseline`` and (``goal``) the goal next to each ratio."""
    base_median, base_min = statistics.median(times[baseline]), min(times[baseline])
    print()
    print(title)
    print(f"{'variant':<34}{'median ms':>11}{'min ms':>10}{'ratio (median)':>16}{'ratio (min)':>13}  goal")
    for name in rows or list(times):
        median, fastest = statistics.median(times[name]), min(times[name])
        ratio = median / base_median
        if name == baseline or not goal:
            verdict = ""
        else:
            verdict = f"<= {GOAL:.2f} " + ("ok" if ratio <= GOAL else "ABOVE")
        print(f"{name:<34}{median * 1e3:>11.2f}{fastest * 1e3:>10.2f}{ratio:>16.3f}{fastest / base_min:>13.3f}  "
              f"{verdict}")


METADATA_OPS = frozenset(f"aten::{name}" for name in (
    "view", "reshape", "_reshape_alias", "expand", "unsqueeze", "squeeze", "slice", "select", "as_strided", "t",
    "transpose", "permute", "alias", "detach", "empty", "empty_like", "empty_strided", "lift_fresh", "resolve_conj",
    "resolve_neg", "_local_scalar_dense", "item", "is_nonzero", "to", "_unsafe_view", "contiguous", "narrow"))
"""Aten ops that launch no kernel of their own (views, allocations, a ``to`` that returns its input, the scalar read;
a real conversion or copy shows up as its ``copy_``)."""


def profile_router(model: torch.nn.Module, structure: MoEModel, hidden: torch.Tensor, patch: dict) -> None:
    """torch.profiler tables of the first MoE layer's gate call, unpatched and with ``patch``."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if hidden.device.type == "cuda" else [])
    gate = structure.layers[0].block.gate
    for name, config in (("unpatched", None), ("patched", patch)):
        handle = moepatch.apply(model, config) if config is not None else None
        try:
            with torch.no_grad():
                gate(hidden)
                with profile(activities=activities) as prof:
                    for _ in range(5):
                        gate(hidden)
                    synchronize(hidden.device)
        finally:
            if handle is not None:
                handle.remove()
        sort = "self_cuda_time_total" if hidden.device.type == "cuda" else "self_cpu_time_total"
        events = [event for event in prof.events() if event.name.startswith("aten::")]
        leaves = sum(1 for event in events if event.name not in METADATA_OPS and not any(
            c.name.startswith("aten::") and c.name not in METADATA_OPS for c in event.cpu_children))
        syncs = sum(1 for event in events if event.name == "aten::_local_scalar_dense")
        print(f"\nprofile of 5 gate calls, {name}: {leaves / 5:.0f} compute ops per call (about the kernels a GPU "
              f"launches), {syncs / 5:.0f} host sync(s) per call (tensor -> Python scalar)")
        print(prof.key_averages().table(sort_by=sort, row_limit=14))


def key_figures(
    args: argparse.Namespace, forward: dict[str, list[float]] | None, router: dict[str, list[float]],
    bias: dict[str, list[float]] | None,
) -> list[Figure]:
    """The patched / unpatched median ratios of sections (1) to (3), each against :data:`GOAL`."""
    tokens = f"{args.batch_size}x{args.seq}"
    figures = []

    def ratios(setting: str, times: dict[str, list[float]], baseline: str, what: str) -> None:
        base = statistics.median(times[baseline])
        for name, values in times.items():
            if name != baseline:
                figures.append(Figure(setting, f"{name} / {baseline} {what}", statistics.median(values) / base,
                                      goal_max=GOAL, extra=f"min ratio {min(values) / min(times[baseline]):.3f}"))

    if forward is not None:
        ratios(f"DSv3 router {args.layers}L {tokens}", forward, "unpatched", "forward")
    ratios(f"DSv3 gate alone {tokens}", router, "unpatched", "gate")
    if bias is not None:
        train = statistics.median(bias["train step"])
        total = (statistics.median(bias["train step, bias_update"]) + statistics.median(bias[".step()"])) / train
        figures.append(Figure(f"DSv3 router {args.layers}L {tokens}", "train step + bias .step() / unpatched", total,
                              goal_max=GOAL))
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--rounds", type=int, default=5, help="interleaved timed rounds of every section")
    parser.add_argument("--warmup", type=int, default=1, help="untimed rounds before them")
    parser.add_argument("--per-round", type=int, default=2, help="forwards timed per round and variant")
    parser.add_argument("--router-calls", type=int, default=20, help="gate calls timed per round and variant")
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--seq", type=int, default=512)
    parser.add_argument("--layers", type=int, default=1, help="decoder layers, all MoE")
    parser.add_argument("--vocab", type=int, default=4096)
    parser.add_argument("--expert-width", type=int, default=64, help="moe_intermediate_size (DeepSeek-V3: 2048)")
    parser.add_argument("--experts-implementation", default=None, help="experts kernel (default: transformers' own)")
    parser.add_argument("--bias-std", type=float, default=0.05, help="std of the random e_score_correction_bias")
    parser.add_argument("--top-t", type=int, default=32, help="the realistic C2R top_t (E - 1 is measured too)")
    parser.add_argument("--bias-rate", type=float, default=0.001, help="rate of the bias update")
    parser.add_argument("--skip-forward", action="store_true", help="leave out section (1)")
    parser.add_argument("--skip-training", action="store_true", help="leave out section (3)")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (a shared CPU: 1)")
    parser.add_argument("--clock", default="wall", choices=["wall", "cpu"],
                        help="cpu: process CPU time instead of wall time (CPU device; use with --threads 1)")
    parser.add_argument("--profile", action="store_true", help="print torch.profiler tables of the gate call")
    add_json_argument(parser)
    args = parser.parse_args()
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    if args.clock == "cpu":
        if device.type != "cpu":
            raise SystemExit("--clock cpu measures host CPU time: only meaningful with --device cpu")
        global clock
        clock = time.process_time

    model = build_model(args, device, dtype)
    structure = describe(model)
    experts = structure.num_experts
    batch = make_batch(args.vocab, args.batch_size, args.seq, device)
    ranking = tiny.random_collaborative_list(structure.num_layers, experts, 0)
    top_ts = list(dict.fromkeys([args.top_t, experts - 1]))

    def c2r(top_t: int) -> dict:
        return {"top_t": top_t, "collaborative_list": ranking}

    patches: dict[str, dict | None] = {"unpatched": None, "routing_stats": {"routing_stats": True}}
    patches.update({f"c2r top_t={t}": {"c2r": c2r(t)} for t in top_ts})
    patches[f"routing_stats + c2r top_t={args.top_t}"] = {"routing_stats": True, "c2r": c2r(args.top_t)}
    setup = (f"{args.batch_size}x{args.seq} tokens, {args.layers} MoE layer(s), {args.device} {args.dtype}, "
             f"{torch.get_num_threads()} threads, {args.clock} clock, {args.rounds} interleaved rounds after "
             f"{args.warmup} warm-up")
    print(f"DeepSeek-V3 router sizes: hidden 7168, {experts} experts top-{structure.top_k}, 8 groups / 4 kept; "
          f"expert width {args.expert_width}; {sum(p.numel() for p in model.parameters()) / 1e6:.0f}M parameters; "
          f"{setup}", flush=True)

    hidden = capture_block_input(model, structure, batch)  # also the first warm-up forward
    router_patches = {name: config for name, config in patches.items() if "routing_stats" not in name}
    router = interleaved(router_variants(model, structure, hidden, device, args.router_calls, router_patches),
                         args.rounds, args.warmup, "router")
    selection, notes = selection_variants(structure, hidden, ranking, top_ts, device, args.router_calls)
    selection_times = interleaved(selection, args.rounds, args.warmup, "selection")
    forward = None
    if not args.skip_forward:
        forward = interleaved(forward_variants(model, batch, device, args.per_round, patches), args.rounds,
                              args.warmup, "forward")
    bias = None
    registered = feature_named(BIAS_UPDATE) is not None
    if registered and not args.skip_training:
        bias = bias_update_times(model, structure, batch, device, args.rounds, args.warmup, args.bias_rate)

    if forward is not None:
        print_table(f"(1) full forward, {setup}, {args.per_round} forwards per round", forward, "unpatched")
    print_table(f"(2) router alone: layer {structure.layers[0].index} mlp.gate(hidden [{args.batch_size}, "
                f"{args.seq}, 7168]), {args.router_calls} calls per round", router, "unpatched",
                ["unpatched", "executor, family top-k", *(f"c2r top_t={t}" for t in top_ts)])
    print_table("    selection step alone, on the router's real selection scores (ratios to the family's top-k)",
                selection_times, "family top-k", goal=False)
    for note in notes:
        print(f"    {note}")
    if forward is not None:
        layer_ms = statistics.median(forward["unpatched"]) * 1e3 / args.layers
        for top_t in top_ts:
            extra = (statistics.median(router[f"c2r top_t={top_t}"]) - statistics.median(router["unpatched"])) * 1e3
            print(f"    c2r top_t={top_t}: router adds {extra:.2f} ms per MoE layer = {extra / layer_ms:.2%} of an "
                  f"unpatched forward's time per layer ({layer_ms:.1f} ms)")
    if not registered:
        print(f"\n(3) bias update: no '{BIAS_UPDATE}' feature is registered in this moepatch; section skipped "
              "(rerun once moepatch/routing/bias_update.py registers it)")
    elif bias is not None:
        print_table(f"(3) bias update (rate {args.bias_rate}): one training step, forward + backward", bias,
                    "train step", ["train step", "train step, bias_update"])
        step_ms = statistics.median(bias[".step()"]) * 1e3
        train_ms = statistics.median(bias["train step"]) * 1e3
        total = (statistics.median(bias["train step, bias_update"]) * 1e3 + step_ms) / train_ms
        print(f"    .step(): {step_ms:.3f} ms = {step_ms / train_ms:.3%} of a training step; training step with the "
              f"feature + .step() / unpatched = {total:.3f} (goal <= {GOAL:.2f} {'ok' if total <= GOAL else 'ABOVE'})")
    print("c2r = collaboration-constrained routing on random collaboration lists (the router's forward replaced by "
          "moepatch's executor); routing_stats = RoutingRecorder hooks; executor, family top-k = the executor with "
          f"DeepSeek-V3's own top-k (what c2r top_t={experts - 1} selects); ratios are patched / unpatched medians")

    write_summary(args.json, "bench_router_kinds", args, key_figures(args, forward, router, bias))

    if args.profile:
        profile_router(model, structure, hidden, {"c2r": c2r(args.top_t)})


if __name__ == "__main__":
    main()
