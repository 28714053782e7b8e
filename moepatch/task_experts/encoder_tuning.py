"""MELD's router training: fine-tune the embedding model so that a request lands near the description of the
experts that answer it (Yan et al., KDD 2024).

MELD runs every expert on every training query, takes the experts whose answer is right as the query's positives and
the others as its negatives, and fine-tunes bge with FlagEmbedding's contrastive recipe: one positive and one hard
negative per query (``train_group_size 2``), the other queries' passages as in-batch negatives, InfoNCE at
temperature 0.02, learning rate 1e-5, 10 epochs.  At inference a query's score for an expert is the cosine of its
embedding and the expert's description embedding (the ``retrieval`` head of
:class:`~moepatch.task_experts.router.TaskRouter`).

Here the same loss is sentence-transformers' ``MultipleNegativesRankingLoss`` with ``scale = 1 / temperature``
(in-batch and hard negatives, cosine similarity) under its own ``SentenceTransformerTrainer``, with its
``no_duplicates`` batches: there are few experts, so another row's positive is often this row's too, and FlagEmbedding
would count it as a negative; the positives come
from :func:`~moepatch.task_experts.router.expert_positives` (every expert scored on every request) or, with
``positives="own"``, from each request's own task.  The fine-tuned encoder is saved as safetensors in the router's
folder.
"""

from __future__ import annotations

import importlib
import random
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from moepatch.errors import FieldError

MELD_TEMPERATURE = 0.02
"""FlagEmbedding's ``--temperature`` in MELD's router and retrieval fine-tunes."""


@dataclass
class EncoderTuning:
    """MELD's FlagEmbedding settings (lr 1e-5, 10 epochs, temperature 0.02, batch 16)."""

    epochs: float = 10.0
    learning_rate: float = 1e-5
    temperature: float = MELD_TEMPERATURE
    batch_size: int = 16
    seed: int = 0


def contrastive_rows(queries: Sequence[str], positives: torch.Tensor, descriptions: Sequence[str],
                     seed: int = 0) -> list[dict[str, str]]:
    """MELD's training groups: one row per (query, positive expert), with one negative expert drawn from the
    query's non-positives (``train_group_size 2``); a query whose every expert is positive has no negative to learn
    from and gives no row."""
    if positives.shape != (len(queries), len(descriptions)):
        raise ValueError(f"positives: expected [{len(queries)}, {len(descriptions)}], got {list(positives.shape)}")
    chooser = random.Random(seed)
    rows = []
    for query, row in zip(queries, positives.tolist(), strict=True):
        negatives = [i for i, positive in enumerate(row) if not positive]
        if not negatives:
            continue
        for i, positive in enumerate(row):
            if positive:
                rows.append({"anchor": query, "positive": descriptions[i],
                             "negative": descriptions[chooser.choice(negatives)]})
    return rows


def _loss_class() -> Any:
    try:  # the losses' home since sentence-transformers 6 (by name: one of the two is always missing)
        losses = importlib.import_module("sentence_transformers.sentence_transformer.losses")
    except ImportError:
        losses = importlib.import_module("sentence_transformers.losses")
    return losses.MultipleNegativesRankingLoss


def finetune_encoder(model: Any, rows: Sequence[dict[str, str]], settings: EncoderTuning, output: Path) -> float:
    """Fine-tune the ``SentenceTransformer`` ``model`` on ``rows`` (:func:`contrastive_rows`) and save it to
    ``output`` (safetensors); returns the last logged training loss."""
    try:
        from datasets import Dataset
        from sentence_transformers import SentenceTransformerTrainer
        from sentence_transformers import SentenceTransformerTrainingArguments
    except ImportError as error:
        raise FieldError("finetune_encoder", f"needs sentence-transformers and datasets ({error}); pip install "
                                             "'moepatch[router]'") from error
    if not rows:
        raise FieldError("finetune_encoder", "no training row (every request has every expert as a positive)")
    loss = _loss_class()(model, scale=1.0 / settings.temperature)
    with tempfile.TemporaryDirectory(prefix="moepatch-encoder-") as scratch:
        arguments = SentenceTransformerTrainingArguments(
            output_dir=scratch, num_train_epochs=settings.epochs, learning_rate=settings.learning_rate,
            per_device_train_batch_size=settings.batch_size, seed=settings.seed, save_strategy="no",
            report_to="none", logging_steps=1, use_cpu=not torch.cuda.is_available(), disable_tqdm=False,
            batch_sampler="no_duplicates")  # another row's positive may be this row's: never an in-batch negative
        trainer = SentenceTransformerTrainer(model=model, args=arguments, train_dataset=Dataset.from_list(list(rows)),
                                             loss=loss)
        trainer.train()
    output.mkdir(parents=True, exist_ok=True)
    model.save(str(output), safe_serialization=True)
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    return float(losses[-1]) if losses else float("nan")
