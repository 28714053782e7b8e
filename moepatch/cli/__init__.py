"""The ``moepatch`` command: inspect, demo, profile, place, allocate, install, uninstall, env.

Every argument is checked when parsed (types below) or, where the check needs the checkpoint's structure, against a
weightless meta-device skeleton — before any model is loaded or any file is written.  Every failure goes through
:func:`moepatch.errors.run_guarded`: status 2 for a bad argument, 1 for a failed check, one or two lines naming the
argument or file, no traceback unless ``--debug`` (or ``MOEPATCH_DEBUG=1``).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import sys
import tempfile
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any
from typing import NoReturn

import torch

from moepatch.errors import CommandError
from moepatch.errors import UsageError
from moepatch.errors import debug_requested
from moepatch.errors import run_guarded


# ---------------------------------------------------------------------------------------------- argument types
class CommandParser(argparse.ArgumentParser):
    """argparse with two-line errors (what is wrong, where to look) instead of the whole usage block."""

    def error(self, message: str) -> NoReturn:
        print(f"{self.prog}: error: {message}", file=sys.stderr)
        print(f"{self.prog}: see `{self.prog} --help`", file=sys.stderr)
        raise SystemExit(2)


def positive_int(text: str) -> int:
    """An integer >= 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def non_negative_int(text: str) -> int:
    """An integer >= 0."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a non-negative integer, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected a non-negative integer, got {text!r}")
    return value


def positive_float(text: str) -> float:
    """A finite number > 0."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}") from None
    if not math.isfinite(value) or value <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive finite number, got {text!r}")
    return value


def _as_type_error(check: Callable[[], Any]) -> Any:
    """Run a validation helper inside an argparse type: its :class:`UsageError` becomes argparse's message."""
    try:
        return check()
    except UsageError as error:
        raise argparse.ArgumentTypeError(str(error).partition(": ")[2]) from None


def checkpoint_config(text: str) -> Path:
    """An existing folder holding config.json (structure only: ``inspect``); moepatch never downloads."""
    from moepatch.validation import check_checkpoint_folder

    return _as_type_error(lambda: check_checkpoint_folder(text, "path", weights=False))


def checkpoint_folder(text: str) -> Path:
    """An existing folder holding config.json and weights (commands that run the model)."""
    from moepatch.validation import check_checkpoint_folder

    return _as_type_error(lambda: check_checkpoint_folder(text, "path"))


def existing_file(text: str) -> Path:
    """An existing, readable file."""
    path = Path(text)
    try:
        if not path.is_file():
            raise argparse.ArgumentTypeError(f"no file at {text!r}" if not path.exists() else f"{text!r} is not a file")
        with path.open("rb"):
            pass
    except OSError as error:
        raise argparse.ArgumentTypeError(f"{text[:80]}: {error.strerror or error}") from None
    return path


def output_folder(text: str) -> Path:
    """A folder to write into: a writable folder, or one that can be created (never a file or a path under one)."""
    from moepatch.validation import check_output_folder

    return _as_type_error(lambda: check_output_folder(text, "output"))


def seed(text: str) -> int:
    """A random seed: an integer in [0, 2**32) (what torch, numpy and Python's random all accept)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer seed, got {text!r}") from None
    if not 0 <= value < 2**32:
        raise argparse.ArgumentTypeError(f"expected a seed in [0, 2**32), got {text!r}")
    return value


def non_empty_text(text: str) -> str:
    """A non-empty string."""
    if not text.strip():
        raise argparse.ArgumentTypeError("expected a non-empty value")
    return text


def _structure(path: Path, trust_remote_code: bool = False) -> Any:
    """The checkpoint's MoE structure from a weightless skeleton: checks arguments without loading weights."""
    from model_patches.structure import describe

    return describe(_skeleton(str(path), trust_remote_code)[1], verify=False)


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

    from moepatch.errors import UnsupportedModelError
    from moepatch.loading.pretrained import drop_loader_auto_map

    config_file = Path(path) / "config.json"
    try:
        raw = json.loads(config_file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise CommandError(f"{config_file}: not a readable JSON file ({error})") from None
    if not isinstance(raw, dict):
        raise CommandError(f"{config_file}: expected a JSON object, got {type(raw).__name__}")
    if "model_type" not in raw:
        raise CommandError(f"{config_file}: no model_type field")
    try:
        config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    except Exception as error:  # unknown model_type, or a field of the wrong type (transformers' strict configs)
        model_type = raw.get("model_type")
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise CommandError(f"{config_file}: cannot build a config for model_type={model_type!r}: {first}") from None
    drop_loader_auto_map(config)  # `moepatch install`'s loader: the skeleton is moepatch's (or transformers') class
    try:
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
    except ValueError as error:
        raise UnsupportedModelError(f"{config_file}: {type(config).__name__} is not a causal LM "
                                    f"({str(error).splitlines()[0]})") from None
    except Exception as error:  # fields that pass the config class but not the model's constructor
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise CommandError(f"{config_file}: cannot build the model it describes: {first}") from None
    return config, model


def _checked_block(checkpoint: Path, trust_remote_code: bool = False) -> tuple[Any, Any]:
    """The checkpoint's structure, with its own moepatch block and C2R fields planned on the skeleton: a broken
    block is reported naming config.json before any weight is loaded.  Returns ``(config, moe)``."""
    from model_patches.structure import describe
    from moepatch.config import MoePatchConfig
    from moepatch.patch import plan_patch

    config, model = _skeleton(str(checkpoint), trust_remote_code)
    try:
        settings = MoePatchConfig.from_model(config)
    except ValueError as error:
        raise CommandError(f"{checkpoint / 'config.json'}: {error}") from None
    moe = describe(model, family=settings.family, verify=False)
    try:
        plan_patch(moe, settings)
    except ValueError as error:
        raise CommandError(f"{checkpoint / 'config.json'}: {error}") from None
    return config, moe


def _load_tokenizer(checkpoint: Path, trust_remote_code: bool = False) -> Any:
    """The checkpoint's tokenizer; a missing or broken one is named, not a traceback."""
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(checkpoint, trust_remote_code=trust_remote_code)
    except Exception as error:
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise CommandError(f"{checkpoint}: no usable tokenizer ({first})") from None
    try:
        encoded = tokenizer("moepatch checks its tokenizer")["input_ids"]
    except Exception:  # a tokenizer object without a vocabulary
        encoded = []
    if not encoded:
        raise CommandError(f"{checkpoint}: no usable tokenizer (it encodes text to nothing: are tokenizer.json / "
                           "tokenizer_config.json there?)")
    return tokenizer


def cmd_inspect(args: argparse.Namespace) -> int:
    from model_patches.structure import describe
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
            cfg.adopt_outside_block(config)
        except ValueError as error:
            cfg = None
            problems.append(str(error))
    notes = [str(w.message) for w in caught]
    try:
        moe = describe(model, family=cfg.family if cfg else None, verify=False)
    except UnsupportedModelError as error:
        print(f"family:     unsupported\n  {error}")
        print(f"moepatch inspect: error: {type(model).__name__} is not a model moepatch can patch (see above)",
              file=sys.stderr)
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
            for description in plan.describe():
                for line in description.splitlines():
                    print(f"  {line}")
        except ValueError as error:
            problems.append(str(error))
    for note in notes:
        print(f"  warning: {note}")
    for problem in problems:
        print(f"  error: {problem}")
    if not problems:
        print("  config: OK" + (" (no feature enabled)" if cfg is None or cfg.is_empty else ""))
        return 0
    print(f"moepatch inspect: error: {Path(args.path) / 'config.json'}: {len(problems)} problem(s) in the moepatch "
          "config (listed above)", file=sys.stderr)
    return 1


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
    from moepatch.c2r.placement import placement_report
    from moepatch.c2r.profiling import corpus_batches
    from moepatch.c2r.profiling import profile_coactivation
    from moepatch.c2r.profiling import write_c2r_fields
    from moepatch.testing import tiny

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
    from moepatch.mixing.finetune import main as finetune

    every = max(1, args.finetune_steps // 4)
    print(f"[7/7] fine-tune {args.finetune_steps} steps on the embedded four-task data (chat, code, letters, math) "
          f"with dynamic mixing (probe round every {every} steps, last MoE layer), C2R routing and frozen routers")
    if output.exists():  # the demo's own folder from an earlier run: a fine-tune starts fresh
        import shutil

        shutil.rmtree(output)
    status = finetune(["--model_name_or_path", str(checkpoint), "--synthetic_data", "--output_dir", str(output),
              "--max_steps", str(args.finetune_steps), "--update_every", str(every), "--use_cpu",
              "--per_device_train_batch_size", "8", "--learning_rate", "3e-3", "--max_length", "64",
              "--probe_size", "16", "--save_strategy", "no", "--report_to", "none", "--seed", str(args.seed),
              "--logging_steps", str(every), "--disable_tqdm", "true"])
    if status:
        raise CommandError(f"step 7 (fine-tune) failed with status {status}; see the message above")
    import moepatch

    base, tuned = moepatch.from_pretrained(checkpoint), moepatch.from_pretrained(output)
    frozen = set(moepatch.get_handle(tuned).frozen_parameters)
    before, after = dict(base.named_parameters()), dict(tuned.named_parameters())
    kept = sum(torch.equal(before[name], after[name]) for name in frozen)
    others = sum(not torch.equal(before[name], after[name]) for name in before if name not in frozen)
    print(f"routers:    {kept}/{len(frozen)} bit-identical after training (frozen); {others} other tensors trained")
    print(f"pictures:   {output}/sampling_info/rounds.png (weights over steps, per-source expert loads)")
    print(f"rounds:     {output}/sampling_info/rounds.jsonl; fine-tuned model: {output}")


def default_min_tokens(num_experts: int, top_k: int) -> int:
    """Fewest tokens ``profile`` writes C2R fields from: 64 choices per expert on average (64·E/k)."""
    return math.ceil(64 * num_experts / top_k)


def cmd_profile(args: argparse.Namespace) -> int:
    import os

    import moepatch
    from moepatch.c2r.config import C2RConfig
    from moepatch.c2r.profiling import corpus_batches
    from moepatch.c2r.profiling import default_top_t
    from moepatch.c2r.profiling import profile_coactivation
    from moepatch.c2r.profiling import read_corpus
    from moepatch.c2r.profiling import write_c2r_fields
    from moepatch.c2r.selection import plan_c2r
    from moepatch.config import CONFIG_KEY
    from moepatch.loading.install import BACKUP_NAME
    from moepatch.loading.pretrained import load_for_command
    from moepatch.testing import tiny

    checkpoint = Path(args.model_path)
    if not args.write_config:
        for flag, value in (("--top-t", args.top_t), ("--min-tokens", args.min_tokens)):
            if value is not None:
                raise UsageError(flag, "only applies to the fields written into config.json; drop it or drop "
                                       "--no-write-config")
    config, moe = _checked_block(checkpoint, args.trust_remote_code)  # every check before anything is loaded
    num_experts, top_k, moe_layers = moe.num_experts, moe.top_k, moe.moe_layer_indices
    if top_k < 2:
        raise CommandError(f"{checkpoint}: the model routes each token to {top_k} expert; co-activation (and C2R) "
                           "needs at least 2 experts per token")
    if args.top_t is not None and not top_k - 1 <= args.top_t <= num_experts - 1:
        raise UsageError("--top-t", f"expected {max(top_k - 1, 1)} .. {num_experts - 1} for this model "
                                    f"({num_experts} experts, top-{top_k}), got {args.top_t}")
    bad_plot = [i for i in args.plot_layers if not -len(moe_layers) <= i < len(moe_layers)]
    if bad_plot:
        raise UsageError("--plot-layers", f"positions among the {len(moe_layers)} MoE layers {moe_layers} run from "
                                          f"{-len(moe_layers)} to {len(moe_layers) - 1}, got {bad_plot}")
    min_tokens = args.min_tokens if args.min_tokens is not None else default_min_tokens(num_experts, top_k)
    if args.max_tokens is not None and args.write_config and args.max_tokens < min_tokens:
        raise UsageError("--max-tokens", f"{args.max_tokens} is below the {min_tokens} tokens needed to write C2R "
                                         "fields (--min-tokens); raise it, lower --min-tokens, or --no-write-config")
    if args.write_config and (checkpoint / BACKUP_NAME).exists():
        raise CommandError(f"{checkpoint}: moepatch's loader is installed there, and `moepatch uninstall` would undo "
                           "the written fields; run `moepatch uninstall` first (or pass --no-write-config)")
    if args.write_config and not os.access(checkpoint / "config.json", os.W_OK):
        raise CommandError(f"{checkpoint / 'config.json'} is not writable; the C2R fields go there (or pass "
                           "--no-write-config)")
    from moepatch.validation import check_output_folder

    output = check_output_folder(args.output, "--output") if args.output else checkpoint / "c2r_profile"
    if not args.output:
        check_output_folder(output, "--output")
    documents = read_corpus(args.data, args.text_field) if args.data else list(tiny.CORPUS + tiny.DEMO_TEXTS)
    tokenizer = _load_tokenizer(checkpoint, args.trust_remote_code)

    model = load_for_command(checkpoint, patch=False)  # never runs the folder's own code; no weight missing
    block = getattr(model.config, CONFIG_KEY, None)
    overrides = None if args.as_configured else {**(block if isinstance(block, dict) else {}), "c2r": False}
    handle = moepatch.apply(model, overrides)  # vanilla routing unless --as-configured (C2R profiles vanilla)
    batches = corpus_batches(tokenizer, documents, batch_size=args.batch_size, max_length=args.max_length,
                             seed=args.seed)
    try:
        profile = profile_coactivation(model, batches, max_tokens=args.max_tokens)
    finally:
        handle.remove()
    routing = "C2R (as configured)" if handle.c2r_routers else "vanilla"
    note = ""
    if not args.as_configured and _has_c2r_fields(model.config):
        note = " (the checkpoint's C2R was switched off for profiling; --as-configured profiles it as it routes)"
    print(f"profiled {profile.tokens} non-padding tokens with {routing} routing{note}, MoE layers {profile.layers}, "
          f"top-{profile.top_k} of {profile.num_experts} experts")
    if args.write_config and profile.tokens < min_tokens:
        raise CommandError(f"only {profile.tokens} non-padding tokens profiled, fewer than the {min_tokens} needed "
                           f"to write C2R fields (--min-tokens; default 64 per expert: 64·E/k); give more --data, or "
                           f"--no-write-config to keep only the matrices; nothing was written")
    top_t = args.top_t if args.top_t is not None else default_top_t(num_experts, top_k)
    ranking = profile.collaborative_list()
    plan_c2r(handle.moe_model, C2RConfig(top_t=top_t, collaborative_list=ranking, source="official"))  # validate
    output.mkdir(parents=True, exist_ok=True)
    matrices = profile.save(output / "coactivation.safetensors")
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
    return 0


def _has_c2r_fields(config: Any) -> bool:
    """The checkpoint routes under C2R when applied (official top-level fields or a ``c2r`` entry, not switched
    off)."""
    from moepatch.config import MoePatchConfig

    return MoePatchConfig.from_model(config).c2r is not None


PLACE_PROFILING_DEFAULTS = {"data": None, "text_field": "text", "max_tokens": None, "batch_size": 4, "max_length": 512}
"""Options of ``place`` that only apply to a checkpoint SOURCE (it is profiled), with their defaults."""


def _profile_for_placement(args: argparse.Namespace) -> dict[str, Any]:
    """Profile a checkpoint under vanilla routing and, when it has C2R fields, under C2R (choices kept)."""
    import moepatch
    from moepatch.c2r.profiling import corpus_batches
    from moepatch.c2r.profiling import profile_coactivation
    from moepatch.c2r.profiling import read_corpus
    from moepatch.loading.pretrained import load_for_command
    from moepatch.testing import tiny

    options = {name: default if getattr(args, name) is None else getattr(args, name)
               for name, default in PLACE_PROFILING_DEFAULTS.items()}
    documents = read_corpus(options["data"], options["text_field"]) if options["data"] else list(
        tiny.CORPUS + tiny.DEMO_TEXTS)
    tokenizer = _load_tokenizer(Path(args.source), args.trust_remote_code)
    model = load_for_command(args.source, patch=False)  # never runs the folder's own code; no weight missing
    profiles = {}
    for routing, config in (("vanilla", {"c2r": False}), ("c2r", None)):
        with moepatch.patched(model, config) as handle:
            if routing == "c2r" and not handle.c2r_routers:
                continue
            batches = corpus_batches(tokenizer, documents, batch_size=options["batch_size"],
                                     max_length=options["max_length"], seed=args.seed)
            profiles[routing] = profile_coactivation(model, batches, max_tokens=options["max_tokens"],
                                                     keep_choices=True, progress=not args.json)
    return profiles


def _check_block_on_skeleton(checkpoint: Path, block: dict[str, Any], argument: str) -> int:
    """Plan a moepatch block on the weightless skeleton: a bad block fails before any weight is loaded.

    Returns the narrowest ``min(in, out)`` width of the projections the block's LoRA experts adapt (0 without
    any), the most rank a LoRA expert can use there.
    """
    from moepatch.config import MoePatchConfig
    from moepatch.patch import plan_patch

    moe = _structure(checkpoint)
    try:
        plan = plan_patch(moe, MoePatchConfig.from_dict(block))
    except ValueError as error:
        raise UsageError(argument, str(error)) from None
    lora = plan["lora_experts"]
    widths = [min(min(t.in_dims), min(t.out_dims)) for t in (lora.targets if lora is not None else ())
              if getattr(t, "in_dims", None) and getattr(t, "out_dims", None)]
    return min(widths, default=0)


def cmd_allocate(args: argparse.Namespace) -> int:
    """GuiLoMo stage 1 on a checkpoint: learn expert counts and ranks, write expert.json / rank.json."""
    import random

    from transformers import DataCollatorForSeq2Seq

    import moepatch
    from moepatch.config import MoePatchConfig
    from moepatch.loading.pretrained import load_for_command
    from moepatch.lora_experts.balance import install_balance_hook
    from moepatch.lora_experts.guilomo import SearchLoraExperts
    from moepatch.lora_experts.guilomo import search
    from moepatch.lora_experts.guilomo import search_config
    from moepatch.lora_experts.guilomo import to_search_layers
    from moepatch.lora_experts.guilomo import write_allocation
    from moepatch.mixing.instruction_data import encode_messages
    from moepatch.mixing.instruction_data import read_jsonl
    from moepatch.mixing.instruction_data import to_messages
    from moepatch.testing.synthetic import TASKS
    from moepatch.testing.synthetic import synthetic_records
    from moepatch.validation import check_output_folder

    checkpoint = Path(args.model_path)
    if args.top_k > args.max_experts:
        raise UsageError("--top-k", f"{args.top_k} is more than --max-experts {args.max_experts}")
    if args.data and args.examples is not None:
        raise UsageError("--examples", "only applies to the embedded data; with --data every record is used")
    block = search_config(args.target_modules, args.max_experts, args.max_rank, args.top_k)
    narrowest = _check_block_on_skeleton(checkpoint, {"lora_experts": block}, "--target-modules")
    if args.max_rank > narrowest:
        raise UsageError("--max-rank", f"{args.max_rank} exceeds the narrowest adapted projection ({narrowest} "
                                       "features): a LoRA rank cannot usefully exceed min(in, out)")
    output = Path(args.output) if args.output else checkpoint / "guilomo"
    check_output_folder(output, "--output")
    if args.data:
        records = [(f"{path}, record {i + 1}", r) for path in args.data for i, r in enumerate(read_jsonl(path))]
    else:
        total = 64 if args.examples is None else args.examples
        names = sorted(TASKS)
        counts = [total // len(names) + (i < total % len(names)) for i in range(len(names))]
        records = [(f"embedded {name} record {i + 1}", r) for name, count in zip(names, counts)
                   for i, r in enumerate(synthetic_records(name, count, args.seed))]
    conversations = [to_messages(record, where) for where, record in records]  # malformed records fail here
    if len(conversations) < 2 * args.batch_size:
        where = "--data" if args.data else "--examples"
        raise UsageError(where, f"{len(conversations)} examples make fewer than 2 batches of --batch-size "
                                f"{args.batch_size}; the search needs train/valid batch pairs")
    tokenizer = _load_tokenizer(checkpoint)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.unk_token or tokenizer.eos_token
    prompt = "chat_template" if getattr(tokenizer, "chat_template", None) else "vicuna"
    random.Random(args.seed).shuffle(conversations)
    examples = [encode_messages(tokenizer, messages, prompt_format=prompt, max_length=args.max_length)
                for messages in conversations]
    kept = [example for example in examples if any(label != -100 for label in example["labels"])]
    if len(kept) < 2 * args.batch_size:
        raise UsageError("--max-length", f"{args.max_length} tokens cut every answer token of "
                                         f"{len(examples) - len(kept)} of {len(examples)} examples, leaving fewer "
                                         f"than 2 batches of --batch-size {args.batch_size} to learn from; raise it")
    if len(kept) < len(examples):
        print(f"dropped {len(examples) - len(kept)} of {len(examples)} examples whose answer --max-length "
              f"{args.max_length} cuts off entirely")
    examples = kept
    torch.manual_seed(args.seed)
    model = load_for_command(checkpoint, patch=False)
    moepatch.apply(model, {"lora_experts": block})
    replaced = to_search_layers(model, args.max_rank)
    routers = [m.router for m in model.modules() if isinstance(m, SearchLoraExperts)]
    install_balance_hook(model, routers, MoePatchConfig.from_dict({"lora_experts": block}).lora_experts)
    collator = DataCollatorForSeq2Seq(tokenizer, label_pad_token_id=-100, return_tensors="pt")
    batches = [collator(examples[i : i + args.batch_size]) for i in range(0, len(examples), args.batch_size)]
    print(f"GuiLoMo search: {replaced} projections with {args.max_experts} experts of rank {args.max_rank}, "
          f"{len(examples)} examples, {len(batches)} batches (train/valid pairs) x {args.epochs} epochs")
    result = search(model, batches, epochs=args.epochs, lr=args.lr, arch_lr=args.arch_lr)
    if not all(math.isfinite(value) for value in result["loss_trace"]):
        raise CommandError(f"the search diverged (loss {result['loss_trace'][-1]}); lower --lr / --arch-lr; "
                           "nothing was written")
    expert_file, rank_file = write_allocation(result, output)
    counts = list(result["expert"].values())
    ranks = list(result["rank"].values())
    trace = result["loss_trace"]
    print(f"loss {trace[0]:.3f} -> {trace[-1]:.3f}; experts per module: min {min(counts)}, mean "
          f"{sum(counts) / len(counts):.2f}, max {max(counts)}; ranks: mean {sum(ranks) / len(ranks):.2f}")
    print(f"wrote {expert_file} and {rank_file}; use them with "
          '{"lora_experts": {"method": "mola", "num_experts": "expert.json", "r": "rank.json", ...}}')
    return 0


def _check_permuted_target(source: Path, target: Path) -> None:
    """``--write-permuted DIR`` must be a new or empty folder, not the source."""
    if target.resolve() == source.resolve():
        raise UsageError("--write-permuted", f"{target} is the source checkpoint; give a new folder")
    if target.exists() and (not target.is_dir() or any(target.iterdir())):
        raise UsageError("--write-permuted", f"{target} already exists and is not an empty folder; give a new folder")


def _matrix_file_top_k(source: Path, matrices: dict[str, torch.Tensor], given: int | None) -> int:
    """The matrices' experts per token: recorded in the file, implied by its diagonal, or ``--top-k``; never guessed."""
    from moepatch.c2r.matrices import inferred_top_k
    from moepatch.c2r.matrices import recorded_top_k

    known: dict[str, int] = {}
    recorded = recorded_top_k(source)
    if recorded is not None:
        known["recorded in the file"] = recorded
    for name, stack in matrices.items():
        implied = inferred_top_k(stack)
        if implied is not None:
            known[f"implied by the diagonal of {name!r}"] = implied
    if len(set(known.values())) > 1:
        raise CommandError(f"{source}: the file contradicts itself about top_k: {known}")
    num_experts = min(int(stack.shape[-1]) for stack in matrices.values())
    if known:
        where, top_k = next(iter(known.items()))
        if given is not None and given != top_k:
            raise UsageError("--top-k", f"{given} contradicts top_k={top_k} {where} ({source}); drop --top-k")
        if not 2 <= top_k <= num_experts:
            raise CommandError(f"{source}: top_k={top_k} {where}, but pair counts need 2 .. {num_experts} experts "
                               "per token")
        return top_k
    if given is None:
        raise UsageError("--top-k", f"{source} does not record how many experts each token chose; pass --top-k K "
                                    "(the profiled model's experts per token, e.g. 4 for Qwen1.5-MoE, 2 for Mixtral)")
    if not 2 <= given <= num_experts:
        raise UsageError("--top-k", f"expected 2 .. {num_experts} (pair counts come from tokens with at least two "
                                    f"experts, and the matrices have {num_experts}), got {given}")
    return given


def cmd_place(args: argparse.Namespace) -> int:
    from moepatch.c2r.matrices import load_matrices
    from moepatch.c2r.permutation import write_permuted_checkpoint
    from moepatch.c2r.placement import expert_permutation
    from moepatch.c2r.placement import format_report
    from moepatch.c2r.placement import placement_report

    source = Path(args.source)
    reports: dict[str, dict[str, Any]] = {}
    notes: list[str] = []
    if source.is_dir():
        from moepatch.validation import check_checkpoint_folder

        check_checkpoint_folder(source, "source")
        _, moe = _checked_block(source, args.trust_remote_code)  # checks before anything is loaded or profiled
        _check_ep_size(moe.num_experts, args.ep_size)
        if args.top_k is not None and args.top_k != moe.top_k:
            raise UsageError("--top-k", f"{args.top_k} contradicts the checkpoint's top-{moe.top_k} routing; drop "
                                        "--top-k (a checkpoint's routed tokens are counted exactly)")
        if args.write_permuted:
            from moepatch.c2r.permutation import check_permutable

            _check_permuted_target(source, Path(args.write_permuted))
            check_permutable(moe)
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
            raise UsageError("--write-permuted", "needs a checkpoint folder as SOURCE, not a matrix file")
        for name in PLACE_PROFILING_DEFAULTS:
            if getattr(args, name) is not None:
                raise UsageError(f"--{name.replace('_', '-')}", "only applies when SOURCE is a checkpoint folder "
                                                                "(it is profiled); a matrix file is used as it is")
        if args.trust_remote_code:
            raise UsageError("--trust-remote-code", "only applies when SOURCE is a checkpoint folder")
        loaded = load_matrices(source)
        top_k = _matrix_file_top_k(source, loaded, args.top_k)
        for stack in loaded.values():
            _check_ep_size(int(stack.shape[-1]), args.ep_size)
        if top_k > 2:
            notes.append(
                f"copies per token: not computed. The matrices come from a top-{top_k} model, and pairwise counts do "
                f"not determine how many distinct devices a token with {top_k} experts reaches. Run `moepatch place "
                f"CHECKPOINT --ep-size {args.ep_size}` on the checkpoint instead: it routes tokens and counts the "
                "devices of each token exactly. The intra-group fractions below are exact."
            )
        for name, matrices in loaded.items():
            try:
                reports[name] = placement_report(matrices, args.ep_size, top_k=top_k, seed=args.seed)
            except ValueError as error:
                raise CommandError(f"{source}, matrix {name!r}: {error}") from None
    result: dict[str, Any] = {"source": str(source), "ep_size": args.ep_size, "reports": reports}
    if notes:
        result["notes"] = notes
    if args.write_permuted:
        chosen = reports.get("c2r") or reports["vanilla"]
        permutations = {row["layer"]: expert_permutation(row["groups"]) for row in chosen["layers"]}
        result["permuted_checkpoint"] = str(write_permuted_checkpoint(source, permutations, args.write_permuted))
    if args.json:
        print(json.dumps(result, indent=1), file=getattr(args, "json_stream", sys.stdout))
        return 0
    for note in notes:
        print(note + "\n")
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


def _check_ep_size(num_experts: int, ep_size: int) -> None:
    if num_experts % ep_size:
        raise UsageError("--ep-size", f"{ep_size} does not divide the {num_experts} experts (expert parallelism "
                                      "hosts the same number of experts on every device)")


def cmd_install(args: argparse.Namespace) -> int:
    from moepatch.loading.install import install

    loader = install(args.path)
    print(f"installed: {loader} and auto_map entries in {Path(args.path) / 'config.json'}")
    print("AutoModelForCausalLM.from_pretrained(PATH, trust_remote_code=True) now returns the patched model; "
          "`moepatch uninstall PATH` restores the folder")
    return 0


def cmd_uninstall(args: argparse.Namespace) -> int:
    from moepatch.loading.install import uninstall

    uninstall(args.path, force=args.force)
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


def check_demo_arguments(args: argparse.Namespace) -> None:
    """The demo's tiny models have 8 experts, top-2: ``--top-t`` and ``--ep-size`` must fit them."""
    from moepatch.testing import tiny

    num_experts, top_k = tiny.TINY_NUM_EXPERTS, tiny.TINY_TOP_K
    if not max(top_k - 1, 1) <= args.top_t <= num_experts - 1:
        raise UsageError("--top-t", f"expected {max(top_k - 1, 1)} .. {num_experts - 1} for the demo's {num_experts} "
                                    f"experts (top-{top_k}), got {args.top_t}")
    _check_ep_size(num_experts, args.ep_size)
    previous = Path(args.output) / "finetune" if args.output else None
    if previous is not None and previous.exists() and args.finetune_steps > 0 and not _is_demo_finetune(previous):
        raise UsageError("--output", f"{previous} exists and is not a fine-tune of an earlier demo; the demo writes "
                                     "its fine-tune there: choose another --output")


def _is_demo_finetune(folder: Path) -> bool:
    """An earlier demo's fine-tune folder (safe to replace): it holds the fine-tune summary or sampling records."""
    return folder.is_dir() and ((folder / "moepatch_finetune_summary.json").exists()
                                or (folder / "sampling_info").is_dir() or not any(folder.iterdir()))


def build_parser() -> argparse.ArgumentParser:
    from moepatch.testing.tiny import DEMO_FAMILIES

    parser = CommandParser(prog="moepatch", description=__doc__.splitlines()[0],
                           epilog="Every command accepts --debug (or MOEPATCH_DEBUG=1) to show a traceback on failure.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=CommandParser)
    inspect = sub.add_parser("inspect", help="describe a checkpoint's MoE structure and check its moepatch config")
    inspect.add_argument("path", type=checkpoint_config, help="a checkpoint folder with config.json")
    inspect.add_argument("--trust-remote-code", action="store_true")
    inspect.set_defaults(func=cmd_inspect)
    demo = sub.add_parser("demo", help="build a tiny model, apply a config, run a batch, print routing statistics")
    demo.add_argument("--family", default="qwen2_moe", choices=DEMO_FAMILIES, help="tiny model family")
    demo.add_argument("--output", type=output_folder,
                      help="folder for the checkpoint, statistics and plot (default: a temp folder)")
    demo.add_argument("--seed", type=seed, default=0)
    demo.add_argument("--top-t", type=positive_int, default=2, help="C2R top_t written after profiling (1 .. 7)")
    demo.add_argument("--ep-size", type=positive_int, default=2, help="devices for the placement report (1, 2, 4, 8)")
    demo.add_argument("--finetune-steps", type=non_negative_int, default=40,
                      help="steps of the final fine-tune with dynamic mixing (0: skip it)")
    demo.set_defaults(func=cmd_demo, check=check_demo_arguments)
    profile = sub.add_parser("profile", help="C2R profiling: co-activation matrices and the official config fields")
    profile.add_argument("model_path", type=checkpoint_folder,
                         help="checkpoint folder (its config.json receives top_t and collaborative_list)")
    profile.add_argument("--data", nargs="+", type=existing_file,
                         help="plain-text (one document per line) or .jsonl files; default: the embedded demo corpus")
    profile.add_argument("--text-field", default="text", type=non_empty_text, help="jsonl field holding the text")
    profile.add_argument("--max-tokens", type=positive_int, help="stop after this many non-padding tokens")
    profile.add_argument("--min-tokens", type=non_negative_int,
                         help="refuse to write C2R fields profiled from fewer non-padding tokens (default 64·E/k: "
                              "64 choices per expert on average)")
    profile.add_argument("--seed", type=seed, default=0, help="seed of the document order")
    profile.add_argument("--top-t", type=positive_int, help="T written to config.json (default E/2)")
    profile.add_argument("--batch-size", type=positive_int, default=4)
    profile.add_argument("--max-length", type=positive_int, default=512, help="tokens per document (truncation)")
    profile.add_argument("--output", type=output_folder,
                         help="folder for matrices and plots (default MODEL_PATH/c2r_profile)")
    profile.add_argument("--plot-layers", type=int, nargs="+", default=[0, -1],
                         help="positions among the MoE layers to draw (default first and last)")
    profile.add_argument("--no-write-config", dest="write_config", action="store_false",
                         help="do not write top_t / collaborative_list into config.json")
    profile.add_argument("--as-configured", action="store_true",
                         help="profile the routing the checkpoint is configured with (C2R included); by default C2R "
                              "is switched off for the pass, as C2R's method profiles the unmodified model")
    profile.add_argument("--trust-remote-code", action="store_true")
    profile.set_defaults(func=cmd_profile)
    allocate = sub.add_parser("allocate", help="GuiLoMo search: per-module expert counts and per-expert ranks")
    allocate.add_argument("model_path", type=checkpoint_folder, help="checkpoint folder")
    allocate.add_argument("--data", nargs="+", type=existing_file,
                          help="jsonl instruction files (default: the embedded four tasks)")
    allocate.add_argument("--max-experts", type=positive_int, default=8)
    allocate.add_argument("--max-rank", type=positive_int, default=8)
    allocate.add_argument("--top-k", type=positive_int, default=2)
    allocate.add_argument("--target-modules", nargs="+", type=non_empty_text,
                          default=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
    allocate.add_argument("--epochs", type=positive_int, default=1)
    allocate.add_argument("--batch-size", type=positive_int, default=4)
    allocate.add_argument("--examples", type=positive_int,
                          help="embedded examples when --data is not given (default 64, split over the four tasks)")
    allocate.add_argument("--max-length", type=positive_int, default=256)
    allocate.add_argument("--lr", type=positive_float, default=3e-4)
    allocate.add_argument("--arch-lr", type=positive_float, default=3e-3)
    allocate.add_argument("--seed", type=seed, default=0)
    allocate.add_argument("--output", type=output_folder,
                          help="folder for expert.json / rank.json (default: <model>/guilomo)")
    allocate.set_defaults(func=cmd_allocate)

    place = sub.add_parser("place", help="C2R expert placement for expert parallelism: copies per token report")
    place.add_argument("source", type=_place_source,
                       help="a matrix file (JSON / safetensors / official .pkl) or a checkpoint folder")
    place.add_argument("--ep-size", type=positive_int, required=True,
                       help="expert-parallel degree D (devices per layer)")
    place.add_argument("--json", action="store_true", help="print the report as JSON")
    place.add_argument("--seed", type=seed, default=0)
    place.add_argument("--top-k", type=positive_int,
                       help="experts per token of a matrix file's model, when the file does not record it")
    place.add_argument("--write-permuted", metavar="DIR", type=output_folder,
                       help="write a checkpoint whose experts are renumbered so contiguous sharding = planned groups")
    place.add_argument("--data", nargs="+", type=existing_file,
                       help="corpus for profiling a checkpoint (default: embedded)")
    place.add_argument("--text-field", type=non_empty_text, help="jsonl field holding the text (default 'text')")
    place.add_argument("--max-tokens", type=positive_int)
    place.add_argument("--batch-size", type=positive_int, help="default 4")
    place.add_argument("--max-length", type=positive_int, help="default 512")
    place.add_argument("--trust-remote-code", action="store_true")
    place.set_defaults(func=cmd_place)
    install = sub.add_parser("install", help="make a checkpoint load already patched via trust_remote_code")
    install.add_argument("path", type=checkpoint_folder, help="checkpoint folder")
    install.set_defaults(func=cmd_install)
    uninstall = sub.add_parser("uninstall", help="undo `moepatch install` (restores config.json byte for byte)")
    uninstall.add_argument("path", type=checkpoint_config, help="checkpoint folder")
    uninstall.add_argument("--force", action="store_true",
                           help="restore config.json even though it was edited since install (the edits are lost)")
    uninstall.set_defaults(func=cmd_uninstall)
    env = sub.add_parser("env", help="versions of moepatch and its ecosystem, for bug reports")
    env.set_defaults(func=cmd_env)
    return parser


def _place_source(text: str) -> Path:
    """A matrix file or a checkpoint folder."""
    path = Path(text)
    try:
        is_folder = path.is_dir()
    except OSError as error:
        raise argparse.ArgumentTypeError(f"{text[:80]}: {error.strerror or error}") from None
    return checkpoint_folder(text) if is_folder else existing_file(text)


def _repeated_option(argv: list[str]) -> str | None:
    """The first option given twice (argparse silently keeps the last value, so a typo'd re-run is refused)."""
    seen: set[str] = set()
    for token in argv:
        if token == "--":
            break
        if token.startswith("--"):
            name = token.partition("=")[0]
            if name in seen:
                return name
            seen.add(name)
    return None


def main(argv: list[str] | None = None) -> int:
    """Parse, check, run; every failure becomes an exit status and a short message (see :mod:`moepatch.errors`)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = debug_requested(argv)
    argv = [arg for arg in argv if arg != "--debug"]
    command = next((arg for arg in argv if not arg.startswith("-")), None)
    prog = f"moepatch {command}" if command in COMMANDS else "moepatch"

    def body() -> int:
        repeated = _repeated_option(argv)
        if repeated is not None:
            hint = " (list every value after one flag)" if repeated == "--data" else ""
            raise UsageError(repeated, f"given twice; give it once{hint}")
        args = build_parser().parse_args(argv)
        if getattr(args, "check", None) is not None:
            args.check(args)
        if getattr(args, "json", False):
            # stdout carries only the JSON: progress and third-party chatter (DeepSpeed's accelerator notice on
            # import) go to stderr
            args.json_stream = sys.stdout
            with contextlib.redirect_stdout(sys.stderr):
                return args.func(args)
        return args.func(args)

    return run_guarded(prog, body, debug=debug)


COMMANDS = ("inspect", "demo", "profile", "place", "allocate", "install", "uninstall", "env")


if __name__ == "__main__":
    sys.exit(main())
