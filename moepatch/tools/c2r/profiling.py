"""C2R profiling: co-activation matrices over a corpus → the official ``top_t`` / ``collaborative_list`` fields.

The official script counts pairs token by token in Python and has no seed; here the counting is the
:class:`~moepatch.routing.recorder.RoutingRecorder`'s co-activation accumulator (one batched ``bmm`` per model
call, padding
excluded), the corpus order is seeded, and the ranking has a deterministic tie-break (descending count, then
ascending expert id; the expert itself always last).  A model that already routes under C2R is profiled as it routes
(the recorder reads the router outputs), so the matrices then show the constrained choices.
"""

from __future__ import annotations

import json
import random
from collections.abc import Iterable
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn
from tqdm.auto import tqdm

from moepatch.errors import FieldError
from moepatch.routing.recorder import RoutingRecorder
from moepatch.staged_output import write_text_atomically

MATRIX_KEY = "coactivation"


@dataclass
class CoactivationProfile:
    """Co-activation counts of one profiling run."""

    layers: list[int]
    """Absolute decoder-layer index of each matrix."""
    num_layers: int
    """Decoder layers of the model (the length of ``collaborative_list``)."""
    num_experts: int
    top_k: int
    tokens: int
    """Non-padding tokens profiled."""
    matrices: torch.Tensor
    """int64 ``[len(layers), E, E]``; ``[i, j]`` = tokens whose chosen experts include ``i`` and ``j``; diagonal =
    tokens that chose ``i``."""
    choices: dict[int, torch.Tensor] | None = None
    """With ``keep_choices``: absolute layer → ``[N, k]`` chosen experts per token (exact copies-per-token)."""

    def collaborative_list(self) -> list[list[list[int]] | None]:
        """The official ``[num_layers][E][E]`` field (``null`` for dense layers)."""
        rankings = collaborative_ranking(self.matrices)
        result: list[list[list[int]] | None] = [None] * self.num_layers
        for slot, layer in enumerate(self.layers):
            result[layer] = rankings[slot].tolist()
        return result

    def save(self, path: str | Path) -> Path:
        """Write the matrices as safetensors (key ``coactivation``) with the run's facts as metadata."""

        path = Path(path)
        metadata = {
            "layers": json.dumps(self.layers),
            "num_layers": str(self.num_layers),
            "num_experts": str(self.num_experts),
            "top_k": str(self.top_k),
            "tokens": str(self.tokens),
        }
        save_file({MATRIX_KEY: self.matrices.contiguous()}, str(path), metadata=metadata)
        return path

    @classmethod
    def load(cls, path: str | Path) -> CoactivationProfile:
        """Read a file written by :meth:`save`."""

        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata()
            matrices = handle.get_tensor(MATRIX_KEY)
        return cls(
            layers=json.loads(metadata["layers"]),
            num_layers=int(metadata["num_layers"]),
            num_experts=int(metadata["num_experts"]),
            top_k=int(metadata["top_k"]),
            tokens=int(metadata["tokens"]),
            matrices=matrices,
        )


def collaborative_ranking(matrices: torch.Tensor) -> torch.Tensor:
    """Per layer and expert, all experts by descending co-activation, ties by ascending id, the expert itself last.

    Args:
        matrices (`torch.Tensor` of shape `[L, E, E]` or `[E, E]`): co-activation counts (the diagonal is ignored).

    Returns:
        `torch.Tensor`: int64 rankings of the same shape.
    """
    scores = matrices.to(torch.float64).clone()
    diagonal = torch.arange(scores.shape[-1])
    scores[..., diagonal, diagonal] = -1.0  # below every count: self goes last, as in the official lists
    return torch.sort(scores, dim=-1, descending=True, stable=True).indices


def read_corpus(paths: Iterable[str | Path], text_field: str = "text") -> list[str]:
    """Documents from ``.jsonl`` files (field ``text_field``), ``.json`` lists (strings or objects with that field)
    or plain text files (one document per non-empty line).  A missing file or no document at all is a
    :class:`~moepatch.errors.FieldError` on ``paths``; a malformed file is a ``ValueError`` naming it."""
    documents: list[str] = []
    for path in paths:
        path = Path(path)
        if not path.exists():
            raise FieldError("paths", f"file {str(path)!r} not found")
        try:
            lines = path.read_text(encoding="utf-8").splitlines()
        except UnicodeDecodeError as error:
            raise ValueError(f"{path}: not UTF-8 text ({error.reason})") from None
        if path.suffix.lower() == ".json":
            try:
                document = json.loads("\n".join(lines))
            except json.JSONDecodeError as error:
                raise ValueError(f"{path}: not valid JSON ({error.msg}); a .json corpus is a list of strings or of "
                                 f"objects with a string {text_field!r}") from None
            if not isinstance(document, list):
                raise ValueError(f"{path}: expected a JSON list of documents, got {type(document).__name__}")
            for number, record in enumerate(document):
                text = record if isinstance(record, str) else (
                    record.get(text_field) if isinstance(record, dict) else None)
                if not isinstance(text, str):
                    raise ValueError(f"{path}[{number}]: expected a string or an object with a string {text_field!r}")
                if text.strip():
                    documents.append(text)
        elif path.suffix.lower() == ".jsonl":
            for number, line in enumerate(lines, start=1):
                if line.strip():
                    try:
                        record = json.loads(line)
                    except json.JSONDecodeError as error:
                        raise ValueError(f"{path}:{number}: not JSON ({error.msg})") from None
                    if not isinstance(record, dict) or not isinstance(record.get(text_field), str):
                        raise ValueError(f"{path}:{number}: expected a JSON object with a string {text_field!r}")
                    documents.append(record[text_field])
        else:
            documents.extend(line for line in lines if line.strip())
    if not documents:
        raise FieldError("paths", f"no documents found in {', '.join(str(path) for path in paths)} (empty, or only "
                                  "blank documents)")
    return documents


def corpus_batches(
    tokenizer: Any, documents: list[str], *, batch_size: int = 4, max_length: int = 512, seed: int = 0
) -> Iterator[dict[str, torch.Tensor]]:
    """Seeded shuffle, then padded, truncated batches (``input_ids``, ``attention_mask``)."""
    order = list(documents)
    random.Random(seed).shuffle(order)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    for start in range(0, len(order), batch_size):
        chunk = order[start : start + batch_size]
        yield dict(tokenizer(chunk, return_tensors="pt", padding=True, truncation=True, max_length=max_length))


def profile_coactivation(
    model: nn.Module,
    batches: Iterable[dict[str, torch.Tensor]],
    *,
    layers: list[int] | None = None,
    max_tokens: int | None = None,
    progress: bool = True,
    keep_choices: bool = False,
) -> CoactivationProfile:
    """Run ``model`` over ``batches`` (no gradient) and count expert co-activations per MoE layer.

    Args:
        model (`nn.Module`): a supported MoE model, patched or not.
        batches (`Iterable[dict]`): model inputs with ``attention_mask`` (padding is not counted).
        layers (`list[int]`, *optional*): layers to profile; default every MoE layer.
        max_tokens (`int`, *optional*): stop once this many non-padding tokens have been profiled.
        progress (`bool`, *optional*, defaults to `True`): show a tqdm bar of tokens.
        keep_choices (`bool`, *optional*, defaults to `False`): also keep every token's chosen experts.
    """
    recorder = RoutingRecorder(model, layers, coactivation=True, keep_choices=keep_choices)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    bar = tqdm(total=max_tokens, unit="tok", desc="profiling", disable=not progress)
    seen = 0
    try:
        with recorder, torch.no_grad():
            for batch in batches:
                model(**{key: value.to(device) for key, value in batch.items()})
                tokens = int(batch["attention_mask"].sum()) if "attention_mask" in batch else batch["input_ids"].numel()
                seen += tokens
                bar.update(tokens)
                if max_tokens is not None and seen >= max_tokens:
                    break
    finally:
        bar.close()
        model.train(was_training)
    return CoactivationProfile(
        layers=recorder.layers,
        num_layers=recorder.model.num_layers,
        num_experts=recorder.num_experts,
        top_k=recorder.top_k,
        tokens=int(recorder.tokens[0]),
        matrices=recorder.coactivation,
        choices=recorder.choices if keep_choices else None,
    )


def default_top_t(num_experts: int, top_k: int) -> int:
    """E/2 (the paper's Qwen1.5-MoE choice, 30 of 60), clipped to the valid range k-1..E-1."""
    return min(num_experts - 1, max(top_k - 1, 1, num_experts // 2))


def write_c2r_fields(checkpoint: str | Path, top_t: int, collaborative_list: list) -> Path:
    """Write the official top-level ``top_t`` and ``collaborative_list`` into ``checkpoint/config.json``."""
    path = Path(checkpoint) / "config.json"
    config = json.loads(path.read_text())
    config["top_t"] = top_t
    config["collaborative_list"] = collaborative_list

    write_text_atomically(path, json.dumps(config, indent=2) + "\n")  # a failure leaves config.json as it was
    return path
