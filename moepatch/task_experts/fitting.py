"""Fit the request router of a task-experts run: requests of each task, an encoder, a head, a held-out report.

Used by ``moepatch experts fit-router`` and the demo.  Every check (data folder, groups, encoder) raises a
:class:`~moepatch.errors.FieldError` naming the setting it is about (a :class:`RouterSettings` field, or ``data``),
before any model is loaded; the command names its flags.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from collections.abc import Sequence
from dataclasses import dataclass
from dataclasses import field
from pathlib import Path
from typing import Any

import torch

from moepatch.errors import FieldError
from moepatch.staged_output import staged_folder
from moepatch.task_experts import router as routers
from moepatch.task_experts.encoder_tuning import EncoderTuning
from moepatch.task_experts.encoder_tuning import contrastive_rows
from moepatch.task_experts.encoder_tuning import finetune_encoder
from moepatch.task_experts.manifest import ROUTER_FOLDER
from moepatch.task_experts.manifest import ExpertManifest
from moepatch.task_experts.manifest import base_model
from moepatch.task_experts.requests import Request
from moepatch.task_experts.requests import split_requests
from moepatch.task_experts.requests import task_requests
from moepatch.task_experts.serving import TaskExpertModel

HOLDOUT_REPORT = "holdout_report.json"
TUNED_ENCODER = "encoder"
"""The encoder ``fit-router --finetune-encoder`` trained, inside the router folder."""


@dataclass
class RouterSettings:
    head: str = "centroid"
    features: list[str] = field(default_factory=lambda: ["hidden", "load"])
    encoder: str | None = None  # a local sentence-transformers / transformers folder; None: the base's signatures
    encoder_pooling: str = "cls"  # a plain transformers folder: FlagEmbedding's [CLS] pooling, or "mean"
    holdout: float = 0.25
    max_examples: int = 64
    max_length: int = 256
    batch_size: int = 8
    groups: dict[str, str] = field(default_factory=dict)
    seed: int = 0
    positive_margin: float = 0.05
    descriptions: dict[str, str] = field(default_factory=dict)  # retrieval: task -> description (default: its name)
    finetune_encoder: bool = False  # retrieval: MELD's contrastive fine-tune of the encoder
    positives: str = "scored"  # the fine-tune's positives: "scored" (MELD: experts that answer well) or "own"
    tuning: EncoderTuning = field(default_factory=EncoderTuning)


def make_encoder(manifest: ExpertManifest, description: dict[str, Any], batch_size: int = 8) -> Any:
    """The encoder a router description names (``router.json``'s ``encoder``)."""
    if description["kind"] == "sentence_transformers":
        return routers.SentenceTransformerEncoder.from_description(description, batch_size,
                                                                   manifest.folder / ROUTER_FOLDER)
    model, tokenizer = base_model(manifest)
    return routers.BaseModelEncoder(model, tokenizer, features=description["features"],
                                    max_length=description["max_length"], batch_size=batch_size)


def scored_positives(manifest: ExpertManifest, requests: list[Any], margin: float,
                     log: Callable[[str], None] = print) -> torch.Tensor:
    """MELD's router data: every expert answers every request (answer loss); the near-best are its positives."""

    serving = TaskExpertModel.from_experts(manifest.folder, with_router=False)
    tasks = sorted(manifest.tasks)
    records = [request.record for request in requests]
    losses = torch.tensor([serving.answer_losses(records, [task] * len(records)) for task in tasks]).T
    positives = routers.expert_positives(losses, margin)
    own = sum(bool(positives[i, tasks.index(r.task)]) for i, r in enumerate(requests)) / len(requests)
    log(f"scored {len(tasks)} experts on {len(requests)} requests: {positives.sum(1).float().mean():.2f} positive "
        f"experts per request, the request's own task among them for {own:.1%}")
    return positives


def check_settings(manifest: ExpertManifest, settings: RouterSettings) -> None:
    """Every problem of ``settings`` as a :class:`~moepatch.errors.FieldError` naming the setting, before a model
    is loaded."""
    for task in settings.groups:
        if task not in manifest.tasks:
            raise FieldError("groups", f"unknown task {task!r}; the experts are {manifest.tasks}")
    if settings.head == "retrieval" and not settings.encoder:
        raise FieldError("head", lambda name: "retrieval scores requests against expert descriptions with an "
                                              f"embedding model: give {name('encoder')} DIR")
    if settings.descriptions and settings.head != "retrieval":
        raise FieldError("descriptions", "only the retrieval head uses expert descriptions")
    unknown = sorted(set(settings.descriptions) - set(manifest.tasks))
    if unknown:
        raise FieldError("descriptions", f"unknown task(s) {unknown}; the experts are {manifest.tasks}")
    empty = sorted(task for task, text in settings.descriptions.items()
                   if not isinstance(text, str) or not text.strip())
    if empty:
        raise FieldError("descriptions", f"task(s) {empty} have no description text")
    if settings.finetune_encoder and settings.head != "retrieval":
        raise FieldError("finetune_encoder", lambda name: f"only with {name('head')} retrieval (MELD fine-tunes the "
                                                          "encoder that scores requests against expert descriptions)")
    if settings.positives not in ("scored", "own"):
        raise FieldError("positives", f"expected 'scored' or 'own', got {settings.positives!r}")


def _tasks_of(requests: Sequence[Request]) -> list[str]:
    """The task of each of ``requests`` (:class:`~moepatch.task_experts.requests.Request` of a data folder, whose
    task :func:`~moepatch.task_experts.requests.task_requests` always names)."""
    tasks = [request.task for request in requests if request.task is not None]
    assert len(tasks) == len(requests), "task_requests names every request's task"
    return tasks


def fit_router(manifest: ExpertManifest, data: Path, settings: RouterSettings,
               log: Callable[[str], None] = print) -> tuple[Any, dict[str, Any] | None]:
    """Fit and save ``<experts>/router/``; returns the router and the held-out report (``None`` without a
    held-out split).  The router folder is replaced as a whole, only once everything is written."""
    if not data.is_dir():
        raise FieldError("data", f"{data} is not a data folder")
    check_settings(manifest, settings)
    by_task, without_dev = task_requests(data, manifest.tasks)
    if without_dev:
        log(f"note: no dev file for {without_dev}: the router learns from and is checked on examples those experts "
            "trained on (give dev/<task>.jsonl for a true held-out figure)")
    fit, held = split_requests(by_task, settings.holdout, settings.max_examples, settings.seed)
    description = ({"kind": "sentence_transformers", "path": str(Path(settings.encoder).resolve()),
                    "pooling": settings.encoder_pooling}
                   if settings.encoder else
                   {"kind": "base_model", "features": list(settings.features), "max_length": settings.max_length})
    folder = manifest.folder / ROUTER_FOLDER
    encoder = make_encoder(manifest, description, settings.batch_size)
    tasks = sorted(manifest.tasks)
    texts = [settings.descriptions.get(task, task) for task in tasks]
    needs_scores = settings.head == "contrastive" or (settings.finetune_encoder and settings.positives == "scored")
    positives = scored_positives(manifest, fit, settings.positive_margin, log) if needs_scores else None
    with staged_folder(folder) as staging:  # the earlier router stays whole until this fit has written everything
        if settings.finetune_encoder:
            if positives is None:  # each request's own task
                positives = torch.tensor([[task == request.task for task in tasks] for request in fit])
            rows = contrastive_rows([request.text for request in fit], positives, texts, settings.seed)
            loss = finetune_encoder(encoder.model, rows, settings.tuning, staging / TUNED_ENCODER)
            log(f"encoder fine-tuned on {len(rows)} (request, positive, negative) rows ({settings.positives} "
                f"positives, temperature {settings.tuning.temperature}), last loss {loss:.4f}; saved to "
                f"{folder / TUNED_ENCODER}")
            encoder.folder = TUNED_ENCODER  # router.json names it relative to the router folder
            encoder.pooling = None  # saved as a sentence-transformers folder: pooling is in its modules
        signatures = encoder.encode([request.text for request in fit + held])
        router = routers.TaskRouter.fit(signatures[:len(fit)], _tasks_of(fit), head=settings.head,
                                        encoder=encoder.describe(), groups=settings.groups, seed=settings.seed,
                                        positives=positives if settings.head == "contrastive" else None,
                                        descriptions=encoder.encode(texts) if settings.head == "retrieval" else None)
        router.save(staging)
        report = None
        if held:
            report = routers.routing_report(router, signatures[len(fit):], _tasks_of(held),
                                            min(2, len(router.tasks)))
            (staging / HOLDOUT_REPORT).write_text(json.dumps(report, indent=1) + "\n")
    log(f"router ({settings.head}, {description['kind']}) fitted on {len(fit)} requests of {len(by_task)} tasks, "
        f"saved to {folder}")
    return router, report
