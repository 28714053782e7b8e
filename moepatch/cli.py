"""The ``moepatch`` command: ``inspect`` a checkpoint, run the ``demo`` on the embedded default, report the ``env``."""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import warnings
from pathlib import Path
from typing import Any

import torch


def _print_table(headers: list[str], rows: list[list[Any]]) -> None:
    cells = [headers] + [[str(c) for c in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    for n, row in enumerate(cells):
        print("  ".join(cell.rjust(width) for cell, width in zip(row, widths)))
        if n == 0:
            print("  ".join("-" * width for width in widths))


def _skeleton(path: str, trust_remote_code: bool) -> tuple[Any, torch.nn.Module]:
    """The checkpoint's config and a weightless (meta-device) model built from it: structure without loading."""
    from transformers import AutoConfig
    from transformers import AutoModelForCausalLM

    config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
    return config, model


def cmd_inspect(args: argparse.Namespace) -> int:
    from moepatch.adapter import describe
    from moepatch.config import CONFIG_KEY
    from moepatch.config import MoePatchConfig
    from moepatch.errors import UnsupportedModelError
    from moepatch.patch import plan_patch

    config, model = _skeleton(args.path, args.trust_remote_code)
    raw = getattr(config, CONFIG_KEY, None)
    print(f"checkpoint: {args.path}")
    print(f"model:      {type(model).__name__} (model_type={config.model_type!r})")
    problems: list[str] = []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            cfg = MoePatchConfig.from_dict(raw)
        except ValueError as error:
            cfg = None
            problems.append(str(error))
    notes = [str(w.message) for w in caught]
    try:
        moe = describe(model, family=cfg.family if cfg else None, verify=False)
    except UnsupportedModelError as error:
        print(f"family:     unsupported\n  {error}")
        return 2
    spec = moe.family
    renorm = "yes" if moe.renormalize else "no"
    print(f"family:     {spec.name}" + (" (structural match; routers are probed when weights are loaded)"
                                         if not spec.model_types else ""))
    print(f"layers:     {moe.num_layers} decoder layers; MoE layers {moe.moe_layer_indices}; "
          f"dense layers {list(moe.dense_layers)}")
    print(f"experts:    {moe.num_experts} routed, top-{moe.top_k}; routing: float32 softmax over all experts "
          f"→ top-k, renormalised: {renorm}; weights dtype: {spec.routing.weights_dtype}")
    print(f"shared:     {', '.join(spec.shared_expert_attrs) or 'none'}")
    print(f"router:     {moe.layers[0].name}.{spec.router_attr} ({type(moe.layers[0].router).__name__}); "
          f"experts: {moe.layers[0].name}.{spec.experts_attr} ({type(moe.layers[0].experts).__name__})")
    print(f"gate_substring freezes: {spec.gate_substring_note}")
    print(f"moepatch block ({CONFIG_KEY!r} in config.json): {json.dumps(raw) if raw is not None else 'absent'}")
    if cfg is not None:
        try:
            plan = plan_patch(moe, cfg)
            if plan.to_freeze:
                print(f"  freeze_gate={cfg.freeze_gate!r}: {len(plan.to_freeze)} parameters")
            if plan.stats_layers is not None:
                print(f"  routing_stats: layers {plan.stats_layers}")
        except ValueError as error:
            problems.append(str(error))
    for note in notes:
        print(f"  warning: {note}")
    for problem in problems:
        print(f"  error: {problem}")
    if not problems:
        print("  config: OK" + (" (no feature enabled)" if cfg is None or cfg.is_empty else ""))
    return 1 if problems else 0


def cmd_demo(args: argparse.Namespace) -> int:
    from transformers import AutoModelForCausalLM
    from transformers import AutoTokenizer

    import moepatch
    from moepatch import tiny

    output = Path(args.output or tempfile.mkdtemp(prefix="moepatch-demo-"))
    block = {"freeze_gate": "router", "routing_stats": {"layers": None}}
    checkpoint = tiny.save_tiny_checkpoint(output / "checkpoint", args.family, seed=args.seed, moepatch=block)
    print(f"[1/4] built a tiny {args.family} checkpoint with config.json['moepatch'] = {json.dumps(block)}")
    print(f"      -> {checkpoint}")
    model = AutoModelForCausalLM.from_pretrained(checkpoint)
    tokenizer = AutoTokenizer.from_pretrained(checkpoint)
    handle = moepatch.apply(model)
    moe = handle.moe_model
    print(f"[2/4] loaded with AutoModelForCausalLM and applied: family {moe.family.name}, MoE layers "
          f"{moe.moe_layer_indices}, {moe.num_experts} experts, top-{moe.top_k}; froze "
          f"{len(handle.frozen_parameters)} router parameters")
    batch = tiny.demo_batch(tokenizer)
    padding = int((batch["attention_mask"] == 0).sum())
    with torch.no_grad():
        model(**batch)
    recorder = handle.recorder
    print(f"[3/4] ran a batch of {batch['input_ids'].shape[0]} texts ({int(batch['attention_mask'].sum())} tokens, "
          f"{padding} padding tokens excluded)")
    print("[4/4] routing statistics: share of top-k choices per expert (%), mean router probability (%)")
    counts, prob_sums, tokens = recorder.counts, recorder.prob_sums, recorder.tokens
    headers = ["layer", "tokens"] + [f"e{e}" for e in range(moe.num_experts)]
    rows = []
    for slot, layer in enumerate(recorder.layers):
        share = counts[slot].double() / counts[slot].sum().clamp(min=1) * 100
        mean_prob = prob_sums[slot] / tokens[slot].clamp(min=1) * 100
        rows.append([layer, int(tokens[slot])] + [f"{s:.1f}" for s in share.tolist()])
        rows.append(["", "p(mean)"] + [f"{p:.1f}" for p in mean_prob.tolist()])
    _print_table(headers, rows)
    stats_path = output / "routing_stats.json"
    stats_path.write_text(recorder.to_json(indent=1))
    print(f"statistics: {stats_path}")
    try:
        from moepatch.plots import plot_routing_counts

        print(f"heatmap:    {plot_routing_counts(recorder, output / 'routing_counts.png')}")
    except ImportError:
        print("heatmap:    skipped (pip install matplotlib)")
    handle.remove()
    return 0


def cmd_env(args: argparse.Namespace) -> int:
    import importlib.metadata as metadata
    import platform

    from moepatch import __version__

    print(f"moepatch: {__version__}")
    print(f"python: {platform.python_version()} ({platform.platform()})")
    for package in ("torch", "transformers", "accelerate", "deepspeed", "peft", "lm_eval", "safetensors"):
        try:
            version = metadata.version(package.replace("_", "-"))
        except metadata.PackageNotFoundError:
            version = "not installed"
        print(f"{package}: {version}")
    print(f"cuda available: {torch.cuda.is_available()}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="moepatch", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    inspect = sub.add_parser("inspect", help="describe a checkpoint's MoE structure and check its moepatch config")
    inspect.add_argument("path", help="a checkpoint folder with config.json")
    inspect.add_argument("--trust-remote-code", action="store_true")
    inspect.set_defaults(func=cmd_inspect)
    demo = sub.add_parser("demo", help="build a tiny model, apply a config, run a batch, print routing statistics")
    demo.add_argument("--family", default="qwen2_moe", help="qwen2_moe, mixtral, qwen3_moe or olmoe")
    demo.add_argument("--output", help="folder for the checkpoint, statistics and plot (default: a temp folder)")
    demo.add_argument("--seed", type=int, default=0)
    demo.set_defaults(func=cmd_demo)
    env = sub.add_parser("env", help="versions of moepatch and its ecosystem, for bug reports")
    env.set_defaults(func=cmd_env)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
