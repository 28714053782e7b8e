"""Request router: which task experts answer a request (MELD's router, at the level of whole requests).

A request becomes a **signature** (an encoder), and a **head** scores the signature against every task:

* Encoders.  :class:`BaseModelEncoder` (the default, no extra model): the base MoE itself — the mean-pooled final
  hidden state over the request's tokens and, per MoE layer, the share of the request's expert choices each routed
  expert got (read with :class:`~moepatch.routing.recorder.RoutingRecorder`), each part L2-normalised and
  concatenated.  :class:`SentenceTransformerEncoder`: a sentence-transformers model from a local folder, or a plain
  transformers encoder embedded as FlagEmbedding does (``[CLS]``, normalised: MELD used bge-large / bge-m3).
  Anything with ``encode(texts) -> [n, d]`` and ``describe()`` plugs in.
* Heads.  ``centroid``: cosine similarity to each task's mean signature.  ``linear``: a softmax classifier on
  standardised signatures, trained with AdamW (full batch, weight decay).  ``contrastive``: MELD's scheme — every
  expert answers every fitting request, the experts whose answer is (near-)best are its positives, the rest its
  negatives — trained as a projection of the signatures and one embedding per task, with a multi-positive InfoNCE
  loss over cosine similarities (the encoder itself stays frozen).  ``retrieval``: MELD's own router — the cosine
  of the request's embedding and each expert's description embedding, by an encoder fine-tuned on MELD's positives
  and negatives (:mod:`~moepatch.task_experts.encoder_tuning`).  Scores become weights
  by a softmax with ``temperature``; the top-k are kept and renormalised.

MELD's evaluation variants are routing options: ``cross-dataset`` leaves the request's own task out of the
candidates, ``cross-task`` every task of its group (``groups``).  A router saves as ``router.safetensors`` (the
head's tensors) + ``router.json`` (tasks, encoder, head); loading never unpickles.
"""

from __future__ import annotations

import importlib
import inspect
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from typing import Protocol

import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from safetensors.torch import save_file
from tqdm.auto import tqdm

from moepatch.errors import FieldError
from moepatch.routing.recorder import RoutingRecorder
from moepatch.task_experts.manifest import ROUTER_CONFIG
from moepatch.task_experts.manifest import ROUTER_WEIGHTS
from moepatch.validation import safetensors_shapes

HEADS = ("centroid", "linear", "contrastive", "retrieval")
WIDTH_TENSORS = {"centroid": "centroids", "retrieval": "descriptions", "contrastive": "mean", "linear": "mean"}
"""The tensor of each head whose last dimension is the width of the signatures it scores."""
EXCLUSIONS = ("none", "cross-dataset", "cross-task")
FEATURES = ("hidden", "load")


class RequestEncoder(Protocol):
    def encode(self, texts: Sequence[str]) -> torch.Tensor: ...

    def describe(self) -> dict[str, Any]: ...


class BaseModelEncoder:
    """Signatures from the base MoE: mean-pooled final hidden state and/or per-layer expert loads."""

    def __init__(self, model: torch.nn.Module, tokenizer: Any, *, features: Sequence[str] = FEATURES,
                 max_length: int = 256, batch_size: int = 8) -> None:
        unknown = [name for name in features if name not in FEATURES]
        if unknown or not features:
            raise ValueError(f"features: expected some of {FEATURES}, got {list(features)}")
        self.model, self.tokenizer = model, tokenizer
        self.features, self.max_length, self.batch_size = tuple(features), max_length, batch_size

    def describe(self) -> dict[str, Any]:
        return {"kind": "base_model", "features": list(self.features), "max_length": self.max_length}

    @torch.no_grad()
    def encode(self, texts: Sequence[str]) -> torch.Tensor:
        was_training = self.model.training
        self.model.eval()
        recorder = RoutingRecorder(self.model, keep_choices=True) if "load" in self.features else None
        pieces = []
        try:
            for start in tqdm(range(0, len(texts), self.batch_size), desc="request signatures", unit="batch",
                              disable=len(texts) <= self.batch_size):
                batch = self.tokenizer(list(texts[start:start + self.batch_size]), return_tensors="pt",
                                       padding=True, truncation=True, max_length=self.max_length)
                batch = {key: value.to(self.model.device) for key, value in batch.items()
                         if key in ("input_ids", "attention_mask")}
                parts = []
                if recorder is not None:
                    recorder.reset()
                    recorder.start()
                try:
                    output = self.model(**batch, output_hidden_states=True)
                finally:
                    if recorder is not None:
                        recorder.stop()
                mask = batch["attention_mask"].unsqueeze(-1).float()
                if "hidden" in self.features:
                    hidden = output.hidden_states[-1].float()
                    parts.append(F.normalize((hidden * mask).sum(1) / mask.sum(1).clamp(min=1), dim=-1))
                if recorder is not None:
                    parts.append(F.normalize(self._loads(recorder, batch["attention_mask"]), dim=-1))
                pieces.append(torch.cat(parts, dim=-1).cpu())
        finally:
            self.model.train(was_training)
        return torch.cat(pieces)

    @staticmethod
    def _loads(recorder: Any, attention_mask: torch.Tensor) -> torch.Tensor:
        """``[batch, layers·E]``: per request and layer, the share of its choices each expert got."""
        lengths = attention_mask.sum(dim=1).tolist()
        per_layer = []
        for choices in recorder.choices.values():  # [non-padding tokens in order, k]
            rows = [F.one_hot(part.reshape(-1), recorder.num_experts).float().mean(0) if part.numel()
                    else torch.zeros(recorder.num_experts) for part in choices.split(lengths)]
            per_layer.append(torch.stack(rows))
        return torch.cat(per_layer, dim=-1)


POOLINGS = ("cls", "mean")


def encoder_folder_problem(folder: str | Path) -> str | None:
    """Why ``folder`` cannot be an ``--encoder`` (``None`` when it can): it must hold a sentence-transformers model
    (``modules.json``) or a transformers encoder (``config.json``, e.g. a bge / bge-m3 download) — not a causal LM,
    whose [CLS] (first-token) or mean-pooled hidden states are no sentence embedding."""
    path = Path(folder)
    if not path.is_dir():
        return f"{folder} is not a folder holding a sentence-transformers or transformers encoder"
    if not (path / "modules.json").is_file() and not (path / "config.json").is_file():
        return (f"{folder} holds neither a sentence-transformers model (modules.json) nor a transformers encoder "
                "(config.json)")
    if not (path / "modules.json").is_file():  # a sentence-transformers folder brings its own (e.g. last-token) pooling
        try:
            architectures = json.loads((path / "config.json").read_text()).get("architectures") or []
        except (OSError, UnicodeDecodeError, ValueError, AttributeError):
            architectures = []  # a broken config.json is reported when the encoder loads
        causal = [name for name in architectures if isinstance(name, str)
                  and name.endswith(("ForCausalLM", "LMHeadModel"))]
        if causal:
            return (f"{folder} holds a causal language model ({causal[0]}), not an embedding encoder: its "
                    "[CLS] / mean-pooled hidden states are no sentence embedding; give a sentence-transformers "
                    "folder or a bge-style encoder")
    return None


class SentenceTransformerEncoder:
    """A local embedding model (no download): normalised sentence embeddings.

    A sentence-transformers folder (``modules.json``) runs as saved.  A plain transformers encoder folder (a bge or
    bge-m3 download, MELD's router encoders) runs as FlagEmbedding embeds with it: ``[CLS]`` pooling (``pooling``:
    ``"cls"``, or ``"mean"``), L2-normalised — built from sentence-transformers' own Transformer / Pooling modules,
    because FlagEmbedding itself does not import under transformers 5.
    """

    def __init__(self, folder: str | Path, batch_size: int = 32, pooling: str = "cls",
                 max_length: int | None = None) -> None:
        try:
            from sentence_transformers import SentenceTransformer
        except ImportError as error:
            raise FieldError("encoder", "sentence-transformers is not installed (pip install "
                                        "'moepatch[router]')") from error
        try:  # the modules' home since sentence-transformers 6; `models` before (by name: one is always missing)
            models = importlib.import_module("sentence_transformers.sentence_transformer.modules")
        except ImportError:
            models = importlib.import_module("sentence_transformers.models")
        problem = encoder_folder_problem(folder)
        if problem is not None:
            raise FieldError("encoder", problem)
        for weights in sorted(Path(folder).rglob("*.safetensors")):  # a truncated file is named, not a SafetensorError
            safetensors_shapes(weights)
        if pooling not in POOLINGS:
            raise FieldError("pooling", f"expected one of {POOLINGS}, got {pooling!r}")
        self.folder, self.batch_size = str(folder), batch_size
        self.pooling: str | None = None
        if (Path(folder) / "modules.json").is_file():
            self.model = SentenceTransformer(self.folder, device="cpu", local_files_only=True)
        else:
            self.pooling = pooling
            offline = {"local_files_only": True}
            keywords = ({"model_kwargs": offline, "processor_kwargs": offline}  # their names since ST 6
                        if "model_kwargs" in inspect.signature(models.Transformer.__init__).parameters
                        else {"model_args": offline, "tokenizer_args": offline})
            # max_length None: the model's own limit (512 for bge, 8192 for bge-m3: FlagEmbedding's defaults)
            transformer = models.Transformer(self.folder, max_seq_length=max_length, **keywords)
            width = getattr(transformer, "get_embedding_dimension", None) or transformer.get_word_embedding_dimension
            pool = models.Pooling(width(), pooling)  # the method's name since sentence-transformers 5.2
            self.model = SentenceTransformer(modules=[transformer, pool, models.Normalize()], device="cpu")

    def describe(self) -> dict[str, Any]:
        description: dict[str, Any] = {"kind": "sentence_transformers", "path": self.folder}
        if self.pooling is not None:
            description["pooling"] = self.pooling
        return description

    @classmethod
    def from_description(cls, description: dict[str, Any], batch_size: int = 32,
                         router_folder: str | Path | None = None) -> SentenceTransformerEncoder:
        """The encoder ``router.json`` names (``pooling`` only for a plain transformers folder); a relative path is
        inside ``router_folder`` (an encoder fine-tuned by ``fit-router`` travels with its router)."""
        path = Path(description["path"])
        if not path.is_absolute() and router_folder is not None:
            path = Path(router_folder) / path
        return cls(path, batch_size, pooling=description.get("pooling", "cls"))

    def encode(self, texts: Sequence[str]) -> torch.Tensor:
        return self.model.encode(list(texts), batch_size=self.batch_size, convert_to_tensor=True,
                                 normalize_embeddings=True, show_progress_bar=len(texts) > self.batch_size).cpu()


@dataclass
class RouteChoice:
    tasks: list[str]
    weights: list[float]
    scores: list[float]


class TaskRouter:
    """A fitted head over an encoder's signatures (see the module docstring)."""

    def __init__(self, tasks: Sequence[str], head: str, tensors: dict[str, torch.Tensor], encoder: dict[str, Any],
                 temperature: float = 0.05, groups: dict[str, str] | None = None) -> None:
        if head not in HEADS:
            raise FieldError("head", f"expected one of {HEADS}, got {head!r}")
        self.tasks, self.head, self.tensors, self.encoder = list(tasks), head, tensors, encoder
        self.temperature = temperature
        self.groups = dict(groups or {})
        self.weights_path: Path | None = None  # the router.safetensors it was loaded from (named in errors)

    @property
    def width(self) -> int:
        """The width of the signatures the head scores."""
        return int(self.tensors[WIDTH_TENSORS[self.head]].shape[-1])

    def check_width(self, width: int) -> None:
        """``ValueError`` naming ``router.safetensors`` and the tensor when the encoder's signatures are ``width``
        wide and the head's are not (a router fitted on another encoder, base or ``--features``): found before any
        request is scored, instead of a matrix-shape error that names no file."""
        if width != self.width:
            where = self.weights_path if self.weights_path is not None else ROUTER_WEIGHTS
            raise ValueError(f"{where}: {WIDTH_TENSORS[self.head]}: signatures of width {self.width}, but the encoder "
                             f"{ROUTER_CONFIG} names ({self.encoder}) gives signatures of width {width}: the router "
                             "was fitted on another encoder or base; fit it again (`moepatch experts fit-router`)")

    def check_encoder(self, encoder: RequestEncoder) -> None:
        """:meth:`check_width` on the width ``encoder`` gives (one short text encoded)."""
        self.check_width(int(encoder.encode(["width of the request signatures"]).shape[-1]))

    # ------------------------------------------------------------------ fitting
    @classmethod
    def fit(cls, signatures: torch.Tensor, labels: Sequence[str], *, head: str = "centroid",
            encoder: dict[str, Any], temperature: float | None = None, groups: dict[str, str] | None = None,
            steps: int = 300, lr: float = 0.05, weight_decay: float = 1e-3, seed: int = 0,
            positives: torch.Tensor | None = None, descriptions: torch.Tensor | None = None) -> TaskRouter:
        """Fit on ``signatures [n, d]`` with task ``labels`` (every task needs one example or more).
        ``temperature`` of the weights' softmax: default 0.05 over cosine similarities (centroid, contrastive), 1
        over logits (linear).  ``positives`` (``contrastive``): bool ``[n, tasks]`` (tasks sorted by name), the
        experts that answered each request well (:func:`expert_positives`).  ``descriptions`` (``retrieval``):
        ``[tasks, d]`` embeddings of each expert's description by the same encoder (tasks sorted by name); MELD's
        router scores a request by its cosine to each of them (default temperature 0.02, MELD's)."""
        tasks = sorted(set(labels))
        if len(tasks) < 2:
            raise ValueError(f"a router needs examples of two tasks or more, got {tasks}")
        target = torch.tensor([tasks.index(label) for label in labels])
        signatures = signatures.float()
        if head == "centroid":
            centroids = torch.stack([signatures[target == i].mean(0) for i in range(len(tasks))])
            return cls(tasks, head, {"centroids": F.normalize(centroids, dim=-1)}, encoder,
                       0.05 if temperature is None else temperature, groups)
        if head == "retrieval":
            if descriptions is None or descriptions.shape != (len(tasks), signatures.shape[1]):
                raise FieldError("descriptions", f"the retrieval head needs one description embedding per task "
                                                 f"([{len(tasks)}, {signatures.shape[1]}])")
            return cls(tasks, head, {"descriptions": F.normalize(descriptions.float(), dim=-1)}, encoder,
                       0.02 if temperature is None else temperature, groups)
        if head == "contrastive":
            if positives is None or positives.shape != (len(signatures), len(tasks)) or not positives.any(1).all():
                raise FieldError("positives", "the contrastive head needs every request's positive experts "
                                              "([requests, tasks], one at least per request)")
            return cls(tasks, head, _fit_contrastive(signatures, positives, steps, lr, weight_decay, seed), encoder,
                       0.05 if temperature is None else temperature, groups)
        if head != "linear":
            raise FieldError("head", f"expected one of {HEADS}, got {head!r}")
        mean, std = signatures.mean(0), signatures.std(0).clamp(min=1e-6)
        x = (signatures - mean) / std
        generator = torch.Generator().manual_seed(seed)
        weight = (torch.randn(len(tasks), x.shape[1], generator=generator) * 0.01).requires_grad_()
        bias = torch.zeros(len(tasks), requires_grad=True)
        optimizer = torch.optim.AdamW([weight, bias], lr=lr, weight_decay=weight_decay)
        for _ in range(steps):
            optimizer.zero_grad()
            F.cross_entropy(x @ weight.T + bias, target).backward()
            optimizer.step()
        tensors = {"weight": weight.detach(), "bias": bias.detach(), "mean": mean, "std": std}
        return cls(tasks, head, tensors, encoder, 1.0 if temperature is None else temperature, groups)

    # ------------------------------------------------------------------ routing
    def scores(self, signatures: torch.Tensor) -> torch.Tensor:
        """``[n, tasks]`` scores (cosine similarities or logits)."""
        signatures = signatures.float()
        if self.head == "centroid":
            return F.normalize(signatures, dim=-1) @ self.tensors["centroids"].T
        if self.head == "retrieval":
            return F.normalize(signatures, dim=-1) @ self.tensors["descriptions"].T
        if self.head == "contrastive":
            projected = F.normalize((signatures - self.tensors["mean"]) @ self.tensors["projection"].T, dim=-1)
            return projected @ F.normalize(self.tensors["task_embeddings"], dim=-1).T
        x = (signatures - self.tensors["mean"]) / self.tensors["std"]
        return x @ self.tensors["weight"].T + self.tensors["bias"]

    def excluded(self, own_task: str | None, exclude: str) -> list[int]:
        """Task indices left out for a request of ``own_task`` under MELD's evaluation variant ``exclude``."""
        if exclude not in EXCLUSIONS:
            raise FieldError("exclude", f"expected one of {EXCLUSIONS}, got {exclude!r}")
        if exclude == "none" or own_task is None:
            return []
        if exclude == "cross-dataset":
            return [self.tasks.index(own_task)] if own_task in self.tasks else []
        group = self.groups.get(own_task, own_task)
        return [i for i, task in enumerate(self.tasks) if self.groups.get(task, task) == group]

    def route(self, signatures: torch.Tensor, top_k: int = 2, *, own_tasks: Sequence[str | None] | None = None,
              exclude: str = "none") -> list[RouteChoice]:
        """The top-k tasks of each request and their weights (softmax over the kept scores, renormalised)."""
        if not 1 <= top_k <= len(self.tasks):
            raise FieldError("top_k", f"expected 1..{len(self.tasks)} (the router's tasks), got {top_k}")
        scores = self.scores(signatures)
        own_tasks = list(own_tasks) if own_tasks is not None else [None] * len(scores)
        choices = []
        for row, own in zip(scores, own_tasks, strict=True):
            row = row.clone()
            left_out = self.excluded(own, exclude)
            row[left_out] = float("-inf")
            k = min(top_k, len(self.tasks) - len(left_out))
            if k < 1:
                raise FieldError("exclude", f"{exclude}: no task left for a request of {own!r}")
            values, indices = row.topk(k)
            weights = torch.softmax(values / self.temperature, dim=-1)
            choices.append(RouteChoice([self.tasks[i] for i in indices.tolist()], weights.tolist(), values.tolist()))
        return choices

    # ------------------------------------------------------------------ files
    def save(self, folder: str | Path) -> Path:
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        save_file({key: value.contiguous() for key, value in self.tensors.items()}, str(folder / ROUTER_WEIGHTS))
        (folder / ROUTER_CONFIG).write_text(json.dumps(
            {"tasks": self.tasks, "head": self.head, "temperature": self.temperature, "encoder": self.encoder,
             "groups": self.groups}, indent=1) + "\n")
        return folder / ROUTER_CONFIG

    @classmethod
    def load(cls, folder: str | Path) -> TaskRouter:
        folder = Path(folder)
        config_path, weights_path = folder / ROUTER_CONFIG, folder / ROUTER_WEIGHTS
        if not config_path.is_file() or not weights_path.is_file():
            raise ValueError(f"{folder}: no fitted router ({ROUTER_CONFIG} + {ROUTER_WEIGHTS}); run "
                             "`moepatch experts fit-router` first")
        config = json.loads(config_path.read_text())
        for key in ("tasks", "head", "encoder"):
            if key not in config:
                raise ValueError(f"{config_path}: missing {key!r}")
        router = cls(config["tasks"], config["head"], load_file(str(weights_path)), config["encoder"],
                     float(config.get("temperature", 0.05)), config.get("groups"))
        router.weights_path = weights_path
        return router


def _fit_contrastive(signatures: torch.Tensor, positives: torch.Tensor, steps: int, lr: float, weight_decay: float,
                     seed: int, width: int = 64, temperature: float = 0.05) -> dict[str, torch.Tensor]:
    """Projection ``[width, d]`` and task embeddings ``[tasks, width]`` by multi-positive InfoNCE:
    ``−log Σ_{t∈P} exp(s_t/τ) / Σ_t exp(s_t/τ)``, ``s`` the cosine of the projected signature and each task."""
    generator = torch.Generator().manual_seed(seed)
    mean = signatures.mean(0)
    x = signatures - mean
    width = min(width, x.shape[1])
    projection = (torch.randn(width, x.shape[1], generator=generator) / x.shape[1] ** 0.5).requires_grad_()
    with torch.no_grad():  # start each task at the projected mean of its positives
        start = torch.stack([(x[positives[:, t]] if positives[:, t].any() else x).mean(0) for t in
                             range(positives.shape[1])]) @ projection.T
    tasks = start.clone().requires_grad_()
    optimizer = torch.optim.AdamW([projection, tasks], lr=lr * 0.2, weight_decay=weight_decay)
    for _ in range(steps):
        optimizer.zero_grad()
        scores = F.normalize(x @ projection.T, dim=-1) @ F.normalize(tasks, dim=-1).T / temperature
        loss = -(torch.logsumexp(scores.masked_fill(~positives, float("-inf")), dim=1)
                 - torch.logsumexp(scores, dim=1)).mean()
        loss.backward()
        optimizer.step()
    return {"projection": projection.detach(), "task_embeddings": tasks.detach(), "mean": mean}


def expert_positives(losses: torch.Tensor, margin: float) -> torch.Tensor:
    """MELD's positives from scored expert outputs: ``losses [requests, tasks]`` (each expert's answer loss on each
    request) → bool, the experts within ``margin`` (relative) of the request's best expert."""
    best = losses.min(dim=1, keepdim=True).values
    return losses <= best * (1 + margin)


def routing_report(router: TaskRouter, signatures: torch.Tensor, labels: Sequence[str], top_k: int,
                   exclude: str = "none") -> dict[str, Any]:
    """Routing accuracy (top-1 is the request's task), top-k recall, a confusion table; under ``cross-dataset``
    the share routed to a task of the same group; under ``cross-task`` where requests went."""
    choices = router.route(signatures, top_k, own_tasks=labels, exclude=exclude)
    report: dict[str, Any] = {"requests": len(labels), "top_k": top_k, "exclude": exclude}
    confusion: dict[str, dict[str, int]] = {task: {} for task in sorted(set(labels))}
    for label, choice in zip(labels, choices, strict=True):
        confusion[label][choice.tasks[0]] = confusion[label].get(choice.tasks[0], 0) + 1
    report["confusion"] = confusion
    if exclude == "none":
        report["accuracy"] = sum(c.tasks[0] == label for c, label in zip(choices, labels, strict=True)) / len(labels)
        report["top_k_recall"] = sum(label in c.tasks for c, label in zip(choices, labels, strict=True)) / len(labels)
        report["per_task_accuracy"] = {task: row.get(task, 0) / sum(row.values()) for task, row in confusion.items()}
    elif exclude == "cross-dataset" and router.groups:  # without groups every other task is another group
        group = router.groups.get
        report["same_group_accuracy"] = sum(group(c.tasks[0], c.tasks[0]) == group(label, label)
                                            for c, label in zip(choices, labels, strict=True)) / len(labels)
    return report
