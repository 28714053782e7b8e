"""The demo's task-expert step (MELD, Yan et al., KDD 2024): one expert per embedded task, the default router, routed
``cat`` merges, and what each costs in loss on held-out requests."""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path

from moepatch.data.synthetic import synthetic_records
from moepatch.errors import CommandError
from moepatch.task_experts.fitting import RouterSettings
from moepatch.task_experts.fitting import fit_router
from moepatch.task_experts.manifest import read_manifest
from moepatch.task_experts.requests import request_text
from moepatch.task_experts.router import routing_report
from moepatch.task_experts.serving import BASE_ADAPTER
from moepatch.task_experts.serving import TaskExpertModel
from moepatch.tools.report import format_table
from moepatch.training import main as finetune

TASK_EXPERTS_FOLDER = "task_experts"
TASKS = ("chat", "code", "letters", "math")


def task_experts_demo(checkpoint: Path, output: Path, *, steps: int, seed: int = 0, held_out: int = 8,
                      log: Callable[[str], None] = print, step: str = "[8/8]") -> dict[str, dict[str, float]]:
    """Train, route, merge, compare; returns the per-task loss table (``{task: {base, own, routed}}``)."""
    log(f"{step} task experts (MELD): one LoRA per embedded task ({steps} steps each, r 16, alpha 32), the default "
        "router (the base's own signatures), routed top-2 cat merges")
    if output.exists():
        shutil.rmtree(output)
    status = finetune(["--model_name_or_path", str(checkpoint), "--synthetic_data", "--output_dir", str(output),
                       "--task_experts", "true", "--max_steps", str(steps), "--use_cpu",
                       "--per_device_train_batch_size", "8", "--learning_rate", "3e-3", "--max_length", "64",
                       "--save_strategy", "no", "--report_to", "none", "--seed", str(seed), "--disable_tqdm", "true",
                       "--logging_steps", str(max(1, steps))])
    if status:
        raise CommandError(f"{step} (task experts) failed with status {status}; see the message above")
    manifest = read_manifest(output)
    _, fit = fit_router(manifest, output / "data", RouterSettings(seed=seed), log=lambda line: None)
    assert fit is not None  # the default settings hold out part of each task's dev examples
    log(f"router:     fitted on the tasks' dev examples; held-out routing accuracy {fit['accuracy']:.3f}")

    records = {task: synthetic_records(task, held_out, seed=seed + 1000) for task in TASKS}  # never trained on
    serving = TaskExpertModel.from_experts(output)
    router = serving.router
    assert router is not None  # from_experts loads the router just fitted
    texts = [request_text(record, task) for task in TASKS for record in records[task]]
    labels = [task for task in TASKS for _ in records[task]]
    with serving.model.disable_adapter():  # signatures of the base itself
        signatures = serving.encoder.encode(texts)
    report = routing_report(router, signatures, labels, top_k=2)
    rows = [[task, str(sum(report["confusion"][task].values())), f"{report['per_task_accuracy'][task]:.3f}"]
            + [str(report["confusion"][task].get(other, 0)) for other in TASKS] for task in TASKS]
    log(f"routing of {len(texts)} new requests (top-1 = own task; top-2 recall {report['top_k_recall']:.3f})")
    for line in format_table(["task", "requests", "accuracy", *[f"->{t}" for t in TASKS]], rows):
        log(line)
    routes = [choice.tasks for choice in router.route(signatures, 2)]
    merged = [serving.adapter_for(tasks) for tasks in routes]
    flat = [record for task in TASKS for record in records[task]]
    losses = {"base": serving.answer_losses(flat, [BASE_ADAPTER] * len(flat)),
              "own": serving.answer_losses(flat, labels),
              "routed": serving.answer_losses(flat, merged)}
    table: dict[str, dict[str, float]] = {}
    for task in TASKS:
        rows_of = [i for i, label in enumerate(labels) if label == task]
        table[task] = {kind: sum(values[i] for i in rows_of) / len(rows_of) for kind, values in losses.items()}
    log(f"answer loss on the held-out requests: base, own expert, routed top-2 cat merge ({len(set(merged))} "
        "merges, weights 1/2 each)")
    for line in format_table(["task", "base", "own expert", "routed merge"],
                             [[task, *(f"{table[task][k]:.3f}" for k in ("base", "own", "routed"))]
                              for task in TASKS]):
        log(line)
    log(f"experts:    {output}/experts (manifest.json, router/); next: moepatch experts merge / export-vllm, "
        "moepatch eval --model moepatch --model_args pretrained=...,task_experts=...")
    return table
