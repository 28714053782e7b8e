"""The ``moepatch`` command: ``inspect`` a checkpoint, run the ``demo`` on the embedded default, report the ``env``."""

from __future__ import annotations

import argparse
import contextlib
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


def _print_lora_targets(config: Any, targets: list[Any]) -> None:
    """What ``lora_experts`` adapts, grouped by path pattern (layer index → ``*``)."""
    import re
    from collections import defaultdict

    groups: dict[str, list[Any]] = defaultdict(list)
    for target in targets:
        groups[re.sub(r"\.(\d+)\.", ".*.", target.path, count=1)].append(target)
    print(f"  lora_experts ({config.method}): {len(targets)} projections; base "
          f"{'trainable' if config.train_base else 'frozen'}")
    for pattern, members in groups.items():
        counts = sorted({t.num_experts for t in members})
        ranks = sorted({r for t in members for r in t.ranks})
        top_k = sorted({t.top_k for t in members}, key=str)
        routed = members[0].storage not in ("linear", "identity")
        where = f"{len(members[0].in_dims)} routed experts each" if routed else members[0].storage
        print(f"    {pattern}: {len(members)}x ({where}), experts {counts}, ranks {ranks or '-'}, top-k {top_k}, "
              f"{members[0].placement}")


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
            cfg.add_official_c2r(config)
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
    shown = raw
    if isinstance(raw, dict) and isinstance(raw.get("c2r"), dict) and "collaborative_list" in raw["c2r"]:
        shown = {**raw, "c2r": {**raw["c2r"], "collaborative_list": "[...]"}}
    print(f"moepatch block ({CONFIG_KEY!r} in config.json): {json.dumps(shown) if raw is not None else 'absent'}")
    if cfg is not None:
        try:
            plan = plan_patch(moe, cfg)
            if plan.to_freeze:
                print(f"  freeze_gate={cfg.freeze_gate!r}: {len(plan.to_freeze)} parameters")
            if plan.stats_layers is not None:
                print(f"  routing_stats: layers {plan.stats_layers}")
            if plan.c2r is not None:
                where = "official top-level fields" if cfg.c2r.source == "official" else f"{CONFIG_KEY}.c2r"
                print(f"  c2r ({where}): top_t={plan.c2r.top_t} on MoE layers {sorted(plan.c2r.tables)}"
                      + (f"; vanilla on {plan.c2r.vanilla_layers}" if plan.c2r.vanilla_layers else "")
                      + f"; load-balancing loss on the {plan.c2r.aux_loss} choice")
            if plan.lora_targets is not None:
                _print_lora_targets(cfg.lora_experts, plan.lora_targets)
        except ValueError as error:
            problems.append(str(error))
    for note in notes:
        print(f"  warning: {note}")
    for problem in problems:
        print(f"  error: {problem}")
    if not problems:
        print("  config: OK" + (" (no feature enabled)" if cfg is None or cfg.is_empty else ""))
    return 1 if problems else 0


def _statistics_table(recorder: Any) -> None:
    """Per layer: share of top-k choices per expert (%) and mean router probability (%)."""
    counts, prob_sums, tokens = recorder.counts, recorder.prob_sums, recorder.tokens
    headers = ["layer", "tokens"] + [f"e{e}" for e in range(recorder.num_experts)]
    rows = []
    for slot, layer in enumerate(recorder.layers):
        share = counts[slot].double() / counts[slot].sum().clamp(min=1) * 100
        mean_prob = prob_sums[slot] / tokens[slot].clamp(min=1) * 100
        rows.append([layer, int(tokens[slot])] + [f"{v:.1f}" for v in share.tolist()])
        rows.append(["", "p(mean)"] + [f"{v:.1f}" for v in mean_prob.tolist()])
    _print_table(headers, rows)


def cmd_demo(args: argparse.Namespace) -> int:
    from transformers import AutoModelForCausalLM
    from transformers import AutoTokenizer

    import moepatch
    from moepatch import tiny
    from moepatch.placement import placement_report
    from moepatch.profiling import corpus_batches
    from moepatch.profiling import profile_coactivation
    from moepatch.profiling import write_c2r_fields

    output = Path(args.output or tempfile.mkdtemp(prefix="moepatch-demo-"))
    output.mkdir(parents=True, exist_ok=True)
    block = {"freeze_gate": "router", "routing_stats": {"layers": None}}
    checkpoint = tiny.save_tiny_checkpoint(output / "checkpoint", args.family, seed=args.seed, moepatch=block)
    print(f"[1/7] built a tiny {args.family} checkpoint with config.json['moepatch'] = {json.dumps(block)}")
    print(f"      -> {checkpoint}")

    def load() -> tuple[Any, Any]:
        model = AutoModelForCausalLM.from_pretrained(checkpoint).eval()
        return model, moepatch.apply(model)  # everything comes from config.json

    model, handle = load()
    moe = handle.moe_model
    print(f"[2/7] loaded with AutoModelForCausalLM and applied: family {moe.family.name}, MoE layers "
          f"{moe.moe_layer_indices}, {moe.num_experts} experts, top-{moe.top_k}; froze "
          f"{len(handle.frozen_parameters)} router parameters")
    tokenizer = AutoTokenizer.from_pretrained(checkpoint)
    batch = tiny.demo_batch(tokenizer)
    padding = int((batch["attention_mask"] == 0).sum())
    with moepatch.RoutingRecorder(model, keep_choices=True) as choices_before, torch.no_grad():
        model(**batch)
    before = handle.recorder
    print(f"[3/7] vanilla routing on a batch of {batch['input_ids'].shape[0]} texts "
          f"({int(batch['attention_mask'].sum())} tokens, {padding} padding tokens excluded): share of top-k choices "
          "per expert (%), mean router probability (%)")
    _statistics_table(before)
    (output / "routing_stats.vanilla.json").write_text(before.to_json(indent=1))

    documents = list(tiny.CORPUS + tiny.DEMO_TEXTS)
    vanilla_profile = profile_coactivation(model, corpus_batches(tokenizer, documents, seed=args.seed), progress=False)
    top_t = args.top_t
    write_c2r_fields(checkpoint, top_t, vanilla_profile.collaborative_list())
    vanilla_profile.save(output / "coactivation.vanilla.safetensors")
    print(f"[4/7] profiled {vanilla_profile.tokens} tokens of the embedded corpus: co-activation matrices -> "
          f"{output / 'coactivation.vanilla.safetensors'}; wrote top_t={top_t} and collaborative_list into "
          f"{checkpoint / 'config.json'}")
    handle.remove()

    model, handle = load()  # the official C2R fields now in config.json switch C2R on
    with moepatch.RoutingRecorder(model, keep_choices=True) as choices_after, torch.no_grad():
        model(**batch)
    after = handle.recorder
    same = [
        (torch.sort(choices_before.choices[layer], dim=1).values == torch.sort(choices_after.choices[layer], dim=1)
         .values).all(dim=1).double().mean().item() * 100
        for layer in after.layers
    ]
    print(f"[5/7] reloaded: C2R on {len(handle.c2r_routers)} routers (top_t={top_t}); tokens whose experts are "
          f"unchanged per layer: {', '.join(f'{v:.0f}%' for v in same)}")
    _statistics_table(after)
    (output / "routing_stats.c2r.json").write_text(after.to_json(indent=1))

    c2r_profile = profile_coactivation(model, corpus_batches(tokenizer, documents, seed=args.seed), progress=False)
    print(f"[6/7] expert placement over {args.ep_size} devices (copies per token: distinct devices per token)")
    rows = []
    for name, profile in (("vanilla", vanilla_profile), ("C2R", c2r_profile)):
        report = placement_report(profile.matrices, args.ep_size, top_k=profile.top_k, seed=args.seed)
        contiguous, planned = report["mean_contiguous_copies_per_token"], report["mean_planned_copies_per_token"]
        rows.append([name, f"{contiguous:.3f}", f"{planned:.3f}", f"{(contiguous - planned) / contiguous * 100:.1f}%"])
    _print_table(["routing", "contiguous", "planned", "saved"], rows)
    try:
        from moepatch.plots import plot_coactivation
        from moepatch.plots import plot_routing_counts

        plot_routing_counts(after, output / "routing_counts.c2r.png")
        plot_routing_counts(before, output / "routing_counts.vanilla.png")
        plot_coactivation(vanilla_profile, [vanilla_profile.layers[0], vanilla_profile.layers[-1]],
                          output / "coactivation.vanilla.png")
        print(f"pictures:   {output}/routing_counts.{{vanilla,c2r}}.png, coactivation.vanilla.png")
    except ImportError:
        print("pictures:   skipped (pip install matplotlib)")
    print(f"statistics: {output}/routing_stats.{{vanilla,c2r}}.json")
    handle.remove()
    if args.finetune_steps > 0:
        _demo_finetune(checkpoint, output / "finetune", args)
    return 0


def _demo_finetune(checkpoint: Path, output: Path, args: argparse.Namespace) -> None:
    """Step 7: fine-tune the C2R checkpoint on the embedded four-task data with dynamic mixing and frozen routers."""
    from moepatch.finetune import main as finetune

    every = max(1, args.finetune_steps // 4)
    print(f"[7/7] fine-tune {args.finetune_steps} steps on the embedded four-task data (chat, code, letters, math) "
          f"with dynamic mixing (probe round every {every} steps, last MoE layer), C2R routing and frozen routers")
    finetune(["--model_name_or_path", str(checkpoint), "--synthetic_data", "--output_dir", str(output),
              "--max_steps", str(args.finetune_steps), "--update_every", str(every), "--use_cpu",
              "--per_device_train_batch_size", "8", "--learning_rate", "3e-3", "--max_length", "64",
              "--probe_size", "16", "--save_strategy", "no", "--report_to", "none", "--seed", str(args.seed),
              "--logging_steps", str(every), "--disable_tqdm", "true"])
    import moepatch

    base, tuned = moepatch.from_pretrained(checkpoint), moepatch.from_pretrained(output)
    frozen = set(moepatch.get_handle(tuned).frozen_parameters)
    before, after = dict(base.named_parameters()), dict(tuned.named_parameters())
    kept = sum(torch.equal(before[name], after[name]) for name in frozen)
    others = sum(not torch.equal(before[name], after[name]) for name in before if name not in frozen)
    print(f"routers:    {kept}/{len(frozen)} bit-identical after training (frozen); {others} other tensors trained")
    print(f"pictures:   {output}/sampling_info/rounds.png (weights over steps, per-source expert loads)")
    print(f"rounds:     {output}/sampling_info/rounds.jsonl; fine-tuned model: {output}")


def cmd_profile(args: argparse.Namespace) -> int:
    from transformers import AutoTokenizer

    import moepatch
    from moepatch import tiny
    from moepatch.c2r import plan_c2r
    from moepatch.config import C2RConfig
    from moepatch.profiling import corpus_batches
    from moepatch.profiling import default_top_t
    from moepatch.profiling import profile_coactivation
    from moepatch.profiling import read_corpus
    from moepatch.profiling import write_c2r_fields

    checkpoint = Path(args.model_path)
    model = moepatch.from_pretrained(checkpoint)  # never runs the folder's own code; applies its config
    tokenizer = AutoTokenizer.from_pretrained(checkpoint, trust_remote_code=args.trust_remote_code)
    handle = moepatch.apply(model)  # the handle; a checkpoint that already routes under C2R is profiled as it routes
    documents = read_corpus(args.data, args.text_field) if args.data else list(tiny.CORPUS + tiny.DEMO_TEXTS)
    batches = corpus_batches(tokenizer, documents, batch_size=args.batch_size, max_length=args.max_length,
                             seed=args.seed)
    profile = profile_coactivation(model, batches, max_tokens=args.max_tokens)
    moe = handle.moe_model
    top_t = args.top_t if args.top_t is not None else default_top_t(moe.num_experts, moe.top_k)
    ranking = profile.collaborative_list()
    plan_c2r(moe, C2RConfig(top_t=top_t, collaborative_list=ranking, source="official"))  # validate before writing
    output = Path(args.output) if args.output else checkpoint / "c2r_profile"
    output.mkdir(parents=True, exist_ok=True)
    matrices = profile.save(output / "coactivation.safetensors")
    routing = "C2R" if handle.c2r_routers else "vanilla"
    print(f"profiled {profile.tokens} non-padding tokens ({routing} routing), MoE layers {profile.layers}, "
          f"top-{profile.top_k} of {profile.num_experts} experts")
    print(f"matrices: {matrices}")
    plot_layers = [profile.layers[i] for i in args.plot_layers]
    try:
        from moepatch.plots import plot_coactivation

        print(f"heatmap:  {plot_coactivation(profile, plot_layers, output / 'coactivation.png')}")
    except ImportError:
        print("heatmap:  skipped (pip install matplotlib)")
    if args.write_config:
        path = write_c2r_fields(checkpoint, top_t, ranking)
        print(f"config:   wrote top_t={top_t} and collaborative_list [{profile.num_layers}][{profile.num_experts}]"
              f"[{profile.num_experts}] into {path}")
    handle.remove()
    return 0


def _profile_for_placement(args: argparse.Namespace) -> dict[str, Any]:
    """Profile a checkpoint under vanilla routing and, when it has C2R fields, under C2R (choices kept)."""
    from transformers import AutoTokenizer

    import moepatch
    from moepatch import tiny
    from moepatch.profiling import corpus_batches
    from moepatch.profiling import profile_coactivation
    from moepatch.profiling import read_corpus

    model = moepatch.from_pretrained(args.source, patch=False)  # never runs the folder's own code
    tokenizer = AutoTokenizer.from_pretrained(args.source, trust_remote_code=args.trust_remote_code)
    documents = read_corpus(args.data, args.text_field) if args.data else list(tiny.CORPUS + tiny.DEMO_TEXTS)
    profiles = {}
    for routing, config in (("vanilla", {"c2r": False}), ("c2r", None)):
        with moepatch.patched(model, config) as handle:
            if routing == "c2r" and not handle.c2r_routers:
                continue
            batches = corpus_batches(tokenizer, documents, batch_size=args.batch_size, max_length=args.max_length,
                                     seed=args.seed)
            profiles[routing] = profile_coactivation(model, batches, max_tokens=args.max_tokens, keep_choices=True,
                                                     progress=not args.json)
    return profiles


def cmd_allocate(args: argparse.Namespace) -> int:
    """GuiLoMo stage 1 on a checkpoint: learn expert counts and ranks, write expert.json / rank.json."""
    import random

    from transformers import DataCollatorForSeq2Seq

    import moepatch
    from moepatch.config import MoePatchConfig
    from moepatch.data import encode_messages
    from moepatch.data import read_jsonl
    from moepatch.data import to_messages
    from moepatch.finetune import load_tokenizer
    from moepatch.lora_experts.balance import install_balance_hook
    from moepatch.lora_experts.guilomo import SearchLoraExperts
    from moepatch.lora_experts.guilomo import search
    from moepatch.lora_experts.guilomo import search_config
    from moepatch.lora_experts.guilomo import to_search_layers
    from moepatch.lora_experts.guilomo import write_allocation
    from moepatch.synthetic import TASKS
    from moepatch.synthetic import synthetic_records

    torch.manual_seed(args.seed)
    checkpoint = Path(args.model_path)
    model = moepatch.from_pretrained(checkpoint, patch=False)
    block = search_config(args.target_modules, args.max_experts, args.max_rank, args.top_k)
    moepatch.apply(model, {"lora_experts": block})
    replaced = to_search_layers(model, args.max_rank)
    routers = [m.router for m in model.modules() if isinstance(m, SearchLoraExperts)]
    install_balance_hook(model, routers, MoePatchConfig.from_dict({"lora_experts": block}).lora_experts)
    tokenizer = load_tokenizer(str(checkpoint))
    prompt = "chat_template" if getattr(tokenizer, "chat_template", None) else "vicuna"
    if args.data:
        records = [r for path in args.data for r in read_jsonl(path)]
    else:
        records = [r for name in sorted(TASKS) for r in synthetic_records(name, args.examples // len(TASKS), args.seed)]
    random.Random(args.seed).shuffle(records)
    examples = [encode_messages(tokenizer, to_messages(r, f"record {i}"), prompt_format=prompt,
                                max_length=args.max_length) for i, r in enumerate(records)]
    collator = DataCollatorForSeq2Seq(tokenizer, label_pad_token_id=-100, return_tensors="pt")
    batches = [collator(examples[i : i + args.batch_size]) for i in range(0, len(examples), args.batch_size)]
    print(f"GuiLoMo search: {replaced} projections with {args.max_experts} experts of rank {args.max_rank}, "
          f"{len(examples)} examples, {len(batches)} batches (train/valid pairs) x {args.epochs} epochs")
    result = search(model, batches, epochs=args.epochs, lr=args.lr, arch_lr=args.arch_lr)
    output = Path(args.output) if args.output else checkpoint / "guilomo"
    expert_file, rank_file = write_allocation(result, output)
    counts = list(result["expert"].values())
    ranks = list(result["rank"].values())
    trace = result["loss_trace"]
    print(f"loss {trace[0]:.3f} -> {trace[-1]:.3f}; experts per module: min {min(counts)}, mean "
          f"{sum(counts) / len(counts):.2f}, max {max(counts)}; ranks: mean {sum(ranks) / len(ranks):.2f}")
    print(f"wrote {expert_file} and {rank_file}; use them with "
          '{"lora_experts": {"method": "mola", "num_experts": "expert.json", "r": "rank.json", ...}}')
    return 0


def cmd_place(args: argparse.Namespace) -> int:
    from moepatch.collaboration_io import load_matrices
    from moepatch.permute import write_permuted_checkpoint
    from moepatch.placement import expert_permutation
    from moepatch.placement import format_report
    from moepatch.placement import placement_report

    source = Path(args.source)
    reports: dict[str, dict[str, Any]] = {}
    if source.is_dir() and args.write_permuted:  # fail before profiling if the experts cannot be renumbered
        from moepatch.adapter import describe
        from moepatch.permute import check_permutable

        check_permutable(describe(_skeleton(str(source), args.trust_remote_code)[1], verify=False))
    if source.is_dir():
        for routing, profile in _profile_for_placement(args).items():
            report = placement_report(
                profile.matrices, args.ep_size, top_k=profile.top_k, seed=args.seed,
                indices={slot: profile.choices[layer] for slot, layer in enumerate(profile.layers)},
            )
            for row in report["layers"]:  # positions → absolute decoder-layer indices
                row["layer"] = profile.layers[row["layer"]]
            reports[routing] = report
    else:
        if args.write_permuted:
            raise SystemExit("--write-permuted needs a checkpoint folder as SOURCE, not a matrix file")
        for name, matrices in load_matrices(source).items():
            reports[name] = placement_report(matrices, args.ep_size, top_k=args.top_k, seed=args.seed)
    result: dict[str, Any] = {"source": str(source), "ep_size": args.ep_size, "reports": reports}
    if args.write_permuted:
        chosen = reports.get("c2r") or reports["vanilla"]
        permutations = {row["layer"]: expert_permutation(row["groups"]) for row in chosen["layers"]}
        result["permuted_checkpoint"] = str(write_permuted_checkpoint(source, permutations, args.write_permuted))
    if args.json:
        print(json.dumps(result, indent=1), file=getattr(args, "json_stream", sys.stdout))
        return 0
    for name, report in reports.items():
        print(f"== {name}: expert placement over {args.ep_size} devices ==")
        print(format_report(report))
        before, after = report["mean_contiguous_copies_per_token"], report["mean_planned_copies_per_token"]
        if before is not None and after is not None:
            print(f"copies per token: contiguous {before:.4f} -> planned {after:.4f} "
                  f"({(before - after) / before * 100:.1f}% less all-to-all volume)")
        print()
    if "permuted_checkpoint" in result:
        print(f"permuted checkpoint (contiguous sharding = planned groups): {result['permuted_checkpoint']}")
    return 0


def cmd_install(args: argparse.Namespace) -> int:
    from moepatch.install import install

    loader = install(args.path)
    print(f"installed: {loader} and auto_map entries in {Path(args.path) / 'config.json'}")
    print("AutoModelForCausalLM.from_pretrained(PATH, trust_remote_code=True) now returns the patched model; "
          "`moepatch uninstall PATH` restores the folder")
    return 0


def cmd_uninstall(args: argparse.Namespace) -> int:
    from moepatch.install import uninstall

    uninstall(args.path)
    print(f"restored {Path(args.path) / 'config.json'} and removed the moepatch loader")
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
    demo.add_argument("--top-t", type=int, default=2, help="C2R top_t written after profiling")
    demo.add_argument("--ep-size", type=int, default=2, help="devices for the placement report")
    demo.add_argument("--finetune-steps", type=int, default=40,
                      help="steps of the final fine-tune with dynamic mixing (0: skip it)")
    demo.set_defaults(func=cmd_demo)
    profile = sub.add_parser("profile", help="C2R profiling: co-activation matrices and the official config fields")
    profile.add_argument("model_path", help="checkpoint folder (its config.json receives top_t and collaborative_list)")
    profile.add_argument("--data", nargs="+", help="plain-text (one document per line) or .jsonl files; "
                                                  "default: the embedded demo corpus")
    profile.add_argument("--text-field", default="text", help="jsonl field holding the text")
    profile.add_argument("--max-tokens", type=int, help="stop after this many non-padding tokens")
    profile.add_argument("--seed", type=int, default=0, help="seed of the document order")
    profile.add_argument("--top-t", type=int, help="T written to config.json (default E/2)")
    profile.add_argument("--batch-size", type=int, default=4)
    profile.add_argument("--max-length", type=int, default=512, help="tokens per document (truncation)")
    profile.add_argument("--output", help="folder for matrices and plots (default MODEL_PATH/c2r_profile)")
    profile.add_argument("--plot-layers", type=int, nargs="+", default=[0, -1],
                         help="positions among the MoE layers to draw (default first and last)")
    profile.add_argument("--no-write-config", dest="write_config", action="store_false",
                         help="do not write top_t / collaborative_list into config.json")
    profile.add_argument("--trust-remote-code", action="store_true")
    profile.set_defaults(func=cmd_profile)
    allocate = sub.add_parser("allocate", help="GuiLoMo search: per-module expert counts and per-expert ranks")
    allocate.add_argument("model_path", help="checkpoint folder")
    allocate.add_argument("--data", nargs="+", help="jsonl instruction files (default: the embedded four tasks)")
    allocate.add_argument("--max-experts", type=int, default=8)
    allocate.add_argument("--max-rank", type=int, default=8)
    allocate.add_argument("--top-k", type=int, default=2)
    allocate.add_argument("--target-modules", nargs="+",
                          default=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
    allocate.add_argument("--epochs", type=int, default=1)
    allocate.add_argument("--batch-size", type=int, default=4)
    allocate.add_argument("--examples", type=int, default=64, help="embedded examples when --data is not given")
    allocate.add_argument("--max-length", type=int, default=256)
    allocate.add_argument("--lr", type=float, default=3e-4)
    allocate.add_argument("--arch-lr", type=float, default=3e-3)
    allocate.add_argument("--seed", type=int, default=0)
    allocate.add_argument("--output", help="folder for expert.json / rank.json (default: <model>/guilomo)")
    allocate.set_defaults(func=cmd_allocate)

    place = sub.add_parser("place", help="C2R expert placement for expert parallelism: copies per token report")
    place.add_argument("source", help="a matrix file (JSON / safetensors / official .pkl) or a checkpoint folder")
    place.add_argument("--ep-size", type=int, required=True, help="expert-parallel degree D (devices per layer)")
    place.add_argument("--json", action="store_true", help="print the report as JSON")
    place.add_argument("--seed", type=int, default=0)
    place.add_argument("--top-k", type=int, default=2, help="experts per token of a matrix file's model")
    place.add_argument("--write-permuted", metavar="DIR",
                       help="write a checkpoint whose experts are renumbered so contiguous sharding = planned groups")
    place.add_argument("--data", nargs="+", help="corpus for profiling a checkpoint (default: embedded)")
    place.add_argument("--text-field", default="text")
    place.add_argument("--max-tokens", type=int)
    place.add_argument("--batch-size", type=int, default=4)
    place.add_argument("--max-length", type=int, default=512)
    place.add_argument("--trust-remote-code", action="store_true")
    place.set_defaults(func=cmd_place)
    install = sub.add_parser("install", help="make a checkpoint load already patched via trust_remote_code")
    install.add_argument("path", help="checkpoint folder")
    install.set_defaults(func=cmd_install)
    uninstall = sub.add_parser("uninstall", help="undo `moepatch install` (restores config.json byte for byte)")
    uninstall.add_argument("path", help="checkpoint folder")
    uninstall.set_defaults(func=cmd_uninstall)
    env = sub.add_parser("env", help="versions of moepatch and its ecosystem, for bug reports")
    env.set_defaults(func=cmd_env)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if getattr(args, "json", False):
        # stdout carries only the JSON: progress and third-party chatter (DeepSpeed's accelerator notice on import)
        # go to stderr
        args.json_stream = sys.stdout
        with contextlib.redirect_stdout(sys.stderr):
            return args.func(args)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
