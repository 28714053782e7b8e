"""The end-to-end demo behind ``moepatch demo``: every feature on a tiny checkpoint, in seven narrated steps.

It builds a tiny checkpoint whose config.json carries a moepatch block, loads it with ``AutoModelForCausalLM`` and
applies it, records routing statistics, profiles co-activations and writes the official C2R fields, reloads (C2R
now on), compares expert placements, and optionally fine-tunes with dynamic mixing.  The narration is the demo's
product, so :func:`run_demo` reports each step through ``log`` (``print`` by default) as soon as it is done.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any
from typing import NamedTuple

import torch
from transformers import AutoModelForCausalLM
from transformers import AutoTokenizer

from moepatch.demo.task_experts import TASK_EXPERTS_FOLDER
from moepatch.demo.task_experts import task_experts_demo
from moepatch.errors import CommandError
from moepatch.loading.pretrained import from_pretrained
from moepatch.patch import PatchHandle
from moepatch.patch import apply
from moepatch.patch import get_handle
from moepatch.routing.recorder import RoutingRecorder
from moepatch.staged_output import staged_folder
from moepatch.testing import tiny
from moepatch.tools.c2r.placement import placement_report
from moepatch.tools.c2r.profiling import corpus_batches
from moepatch.tools.c2r.profiling import profile_coactivation
from moepatch.tools.c2r.profiling import write_c2r_fields
from moepatch.tools.report import format_table
from moepatch.tools.report import plot_coactivation
from moepatch.tools.report import plot_routing_counts
from moepatch.training import main as finetune

DEMO_BLOCK: dict[str, Any] = {"freeze_gate": "router", "routing_stats": {"layers": None}}
"""The moepatch block written into the demo checkpoint's config.json (everything the first load applies)."""

FINETUNE_FOLDER = "finetune"
"""Subfolder of the demo's output that receives step 7's fine-tune."""


def statistics_table(recorder: Any) -> list[str]:
    """Per layer: share of top-k choices per expert (%) and mean router probability (%)."""
    counts, prob_sums, tokens = recorder.counts, recorder.prob_sums, recorder.tokens
    headers = ["layer", "tokens"] + [f"e{e}" for e in range(recorder.num_experts)]
    rows = []
    for slot, layer in enumerate(recorder.layers):
        share = counts[slot].double() / counts[slot].sum().clamp(min=1) * 100
        mean_prob = prob_sums[slot] / tokens[slot].clamp(min=1) * 100
        rows.append([layer, int(tokens[slot])] + [f"{v:.1f}" for v in share.tolist()])
        rows.append(["", "p(mean)"] + [f"{v:.1f}" for v in mean_prob.tolist()])
    return format_table(headers, rows)


def is_demo_finetune(folder: Path) -> bool:
    """An earlier demo's fine-tune folder (safe to replace): it holds the fine-tune summary or sampling records."""
    return folder.is_dir() and ((folder / "moepatch_finetune_summary.json").exists()
                                or (folder / "sampling_info").is_dir() or not any(folder.iterdir()))


def run_demo(
    output: Path | None,
    family: str = "qwen2_moe",
    *,
    seed: int = 0,
    top_t: int = 2,
    ep_size: int = 2,
    finetune_steps: int = 40,
    expert_steps: int = 30,
    log: Callable[[str], None] = print,
) -> Path:
    """Run the demo's steps, writing the checkpoint, statistics, matrices and plots into ``output``.

    Args:
        output (`Path`, *optional*): folder for everything the demo writes; `None`: a fresh temporary folder.
            An earlier demo's ``finetune`` subfolder there is replaced (callers check it is one, see
            :func:`is_demo_finetune`); other files in it are kept.  The demo writes into a staged copy beside it
            (:func:`~moepatch.staged_output.staged_folder`) that replaces it only when every step succeeded, so a
            failing or interrupted demo leaves ``output`` exactly as it was.
        family (`str`): tiny model family (:data:`moepatch.testing.tiny.DEMO_FAMILIES`).
        seed (`int`): seed of the checkpoint's weights, the corpus order, the placement search and the fine-tune.
        top_t (`int`): C2R ``top_t`` written after profiling (the tiny models have 8 experts, top-2: 1 .. 7).
        ep_size (`int`): devices of the placement comparison (divides 8).
        finetune_steps (`int`): steps of step 7's fine-tune; 0 skips it.
        expert_steps (`int`): steps of each task expert in step 8 (task experts, router, merges); 0 skips it.
        log (`Callable[[str], None]`): receives the narration, one step at a time.

    Returns:
        `Path`: the output folder.
    """
    settings = _DemoSettings(family, seed, top_t, ep_size, finetune_steps, expert_steps)
    if output is None:
        fresh = Path(tempfile.mkdtemp(prefix="moepatch-demo-"))
        _run_steps(fresh, settings, log)
        return fresh
    final = Path(output).expanduser().absolute()
    with staged_folder(final, start_from_existing=True) as scratch:
        _run_steps(scratch, settings, lambda line: log(line.replace(str(scratch), str(final))))
        repoint_paths(scratch, final)
    return final


class _DemoSettings(NamedTuple):
    family: str
    seed: int
    top_t: int
    ep_size: int
    finetune_steps: int
    expert_steps: int


def repoint_paths(folder: Path, final: Path) -> None:
    """Rewrite ``folder``'s own path as ``final`` in the files written inside it: adapter configs, manifests and
    model cards record the absolute path of the checkpoint they were trained from, and the demo's checkpoint sits in
    the staged copy until the swap (the fine-tune's ``training_args.bin``, a pickle this run just wrote, records its
    output folder and is re-saved)."""
    old, new = str(folder), str(final)
    for path in sorted(folder.rglob("*")):
        if path.suffix in _TEXT_SUFFIXES and path.is_file():
            text = path.read_text()
            if old in text:
                path.write_text(text.replace(old, new))
        elif path.name == "training_args.bin":
            arguments = torch.load(path, weights_only=False)  # written by this run's own fine-tune moments ago
            for name, value in vars(arguments).items():
                if isinstance(value, str) and old in value:
                    setattr(arguments, name, value.replace(old, new))
            torch.save(arguments, path)


_TEXT_SUFFIXES = (".json", ".jsonl", ".md", ".txt", ".csv", ".yaml")


def _run_steps(output: Path, settings: _DemoSettings, log: Callable[[str], None]) -> None:
    """The demo's steps, writing into ``output`` (a folder nobody else reads until they succeeded)."""
    family, seed, top_t, ep_size, finetune_steps, expert_steps = settings

    output.mkdir(parents=True, exist_ok=True)
    checkpoint = tiny.save_tiny_checkpoint(output / "checkpoint", family, seed=seed, moepatch=DEMO_BLOCK)
    log(f"[1/8] built a tiny {family} checkpoint with config.json['moepatch'] = {json.dumps(DEMO_BLOCK)}")
    log(f"      -> {checkpoint}")

    def load() -> tuple[Any, PatchHandle]:
        model = AutoModelForCausalLM.from_pretrained(checkpoint).eval()
        return model, apply(model)  # everything comes from config.json

    model, handle = load()
    moe = handle.moe_model
    assert moe is not None  # None only for an unsupported model under strict=False; apply() here is strict
    log(f"[2/8] loaded with AutoModelForCausalLM and applied: family {moe.family.name}, MoE layers "
        f"{moe.moe_layer_indices}, {moe.num_experts} experts, top-{moe.top_k}; froze "
        f"{len(handle.frozen_parameters)} router parameters")
    tokenizer = AutoTokenizer.from_pretrained(checkpoint)
    batch = tiny.demo_batch(tokenizer)
    padding = int((batch["attention_mask"] == 0).sum())
    with RoutingRecorder(model, keep_choices=True) as choices_before, torch.no_grad():
        model(**batch)
    before = handle.recorder
    assert before is not None  # the demo block switches routing_stats on
    log(f"[3/8] vanilla routing on a batch of {batch['input_ids'].shape[0]} texts "
        f"({int(batch['attention_mask'].sum())} tokens, {padding} padding tokens excluded): share of top-k choices "
        "per expert (%), mean router probability (%)")
    _log_lines(log, statistics_table(before))
    (output / "routing_stats.vanilla.json").write_text(before.to_json(indent=1))

    documents = list(tiny.CORPUS + tiny.DEMO_TEXTS)
    vanilla_profile = profile_coactivation(model, corpus_batches(tokenizer, documents, seed=seed), progress=False)
    write_c2r_fields(checkpoint, top_t, vanilla_profile.collaborative_list())
    vanilla_profile.save(output / "coactivation.vanilla.safetensors")
    log(f"[4/8] profiled {vanilla_profile.tokens} tokens of the embedded corpus: co-activation matrices -> "
        f"{output / 'coactivation.vanilla.safetensors'}; wrote top_t={top_t} and collaborative_list into "
        f"{checkpoint / 'config.json'}")
    handle.remove()

    model, handle = load()  # the official C2R fields now in config.json switch C2R on
    with RoutingRecorder(model, keep_choices=True) as choices_after, torch.no_grad():
        model(**batch)
    after = handle.recorder
    assert after is not None
    same = [
        (torch.sort(choices_before.choices[layer], dim=1).values == torch.sort(choices_after.choices[layer], dim=1)
         .values).all(dim=1).double().mean().item() * 100
        for layer in after.layers
    ]
    log(f"[5/8] reloaded: C2R on {len(handle.c2r_routers)} routers (top_t={top_t}); tokens whose experts are "
        f"unchanged per layer: {', '.join(f'{v:.0f}%' for v in same)}")
    _log_lines(log, statistics_table(after))
    (output / "routing_stats.c2r.json").write_text(after.to_json(indent=1))

    c2r_profile = profile_coactivation(model, corpus_batches(tokenizer, documents, seed=seed), progress=False)
    log(f"[6/8] expert placement over {ep_size} devices (copies per token: distinct devices per token)")
    rows = []
    for name, profile in (("vanilla", vanilla_profile), ("C2R", c2r_profile)):
        report = placement_report(profile.matrices, ep_size, top_k=profile.top_k, seed=seed)
        contiguous, planned = report["mean_contiguous_copies_per_token"], report["mean_planned_copies_per_token"]
        rows.append([name, f"{contiguous:.3f}", f"{planned:.3f}", f"{(contiguous - planned) / contiguous * 100:.1f}%"])
    _log_lines(log, format_table(["routing", "contiguous", "planned", "saved"], rows))
    try:
        plot_routing_counts(after, output / "routing_counts.c2r.png")
        plot_routing_counts(before, output / "routing_counts.vanilla.png")
        plot_coactivation(vanilla_profile, [vanilla_profile.layers[0], vanilla_profile.layers[-1]],
                          output / "coactivation.vanilla.png")
        log(f"pictures:   {output}/routing_counts.{{vanilla,c2r}}.png, coactivation.vanilla.png")
    except ImportError:
        log("pictures:   skipped (pip install matplotlib)")
    log(f"statistics: {output}/routing_stats.{{vanilla,c2r}}.json")
    handle.remove()
    if finetune_steps > 0:
        finetune_demo_checkpoint(checkpoint, output / FINETUNE_FOLDER, steps=finetune_steps, seed=seed, log=log)
    if expert_steps > 0:
        task_experts_demo(checkpoint, output / TASK_EXPERTS_FOLDER, steps=expert_steps, seed=seed, log=log)


def finetune_demo_checkpoint(
    checkpoint: Path, output: Path, *, steps: int, seed: int = 0, log: Callable[[str], None] = print
) -> None:
    """Step 7: fine-tune the C2R checkpoint on the embedded four-task data with dynamic mixing and frozen routers,
    then check the routers came out bit-identical.  ``output`` is replaced when it exists (an earlier demo's)."""
    every = max(1, steps // 4)
    log(f"[7/8] fine-tune {steps} steps on the embedded four-task data (chat, code, letters, math) "
        f"with dynamic mixing (probe round every {every} steps, last MoE layer), C2R routing and frozen routers")
    if output.exists():  # the demo's own folder from an earlier run: a fine-tune starts fresh
        shutil.rmtree(output)
    status = finetune(["--model_name_or_path", str(checkpoint), "--synthetic_data", "--output_dir", str(output),
                       "--max_steps", str(steps), "--update_every", str(every), "--use_cpu",
                       "--per_device_train_batch_size", "8", "--learning_rate", "3e-3", "--max_length", "64",
                       "--probe_size", "16", "--save_strategy", "no", "--report_to", "none", "--seed", str(seed),
                       "--logging_steps", str(every), "--disable_tqdm", "true"])
    if status:
        raise CommandError(f"step 7 (fine-tune) failed with status {status}; see the message above")
    base, tuned = from_pretrained(checkpoint), from_pretrained(output)
    tuned_handle = get_handle(tuned)
    assert tuned_handle is not None  # from_pretrained patches the checkpoint from its config.json
    frozen = set(tuned_handle.frozen_parameters)
    before, after = dict(base.named_parameters()), dict(tuned.named_parameters())
    kept = sum(torch.equal(before[name], after[name]) for name in frozen)
    others = sum(not torch.equal(before[name], after[name]) for name in before if name not in frozen)
    log(f"routers:    {kept}/{len(frozen)} bit-identical after training (frozen); {others} other tensors trained")
    log(f"pictures:   {output}/sampling_info/rounds.png (weights over steps, per-source expert loads)")
    log(f"rounds:     {output}/sampling_info/rounds.jsonl; fine-tuned model: {output}")


def _log_lines(log: Callable[[str], None], lines: list[str]) -> None:
    for line in lines:
        log(line)
