"""GuiLoMo stage 1 on a checkpoint folder, end to end: what ``moepatch allocate`` runs.

The search (:mod:`moepatch.tools.lora_experts.guilomo`) learns, per adapted projection, how many LoRA experts and which
rank each needs; this module gathers the instruction examples it learns from (files or the embedded four tasks),
encodes them with the checkpoint's tokenizer, builds the search model from the checkpoint and runs the search.
The result is written with :func:`moepatch.tools.lora_experts.guilomo.write_allocation` (``expert.json`` /
``rank.json``), the files a ``{"lora_experts": {"method": "mola", "num_experts": "expert.json", "r": "rank.json"}}``
block reads (:func:`moepatch.tools.lora_experts.guilomo.stage_two_config`: GuiLoMo's own stage 2, its per-module balance
loss included).
"""

from __future__ import annotations

import random
from collections.abc import Callable
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING
from typing import Any

import torch
from transformers import DataCollatorForSeq2Seq

from model_patches.structure import layer_indexer
from moepatch.data.instruction import encode_messages
from moepatch.data.instruction import read_jsonl
from moepatch.data.instruction import to_messages
from moepatch.data.synthetic import TASKS
from moepatch.data.synthetic import synthetic_records
from moepatch.loading.pretrained import load_for_command
from moepatch.lora_experts.balance import install_balance_hook
from moepatch.patch import apply
from moepatch.tools.lora_experts.guilomo import SearchLoraExperts
from moepatch.tools.lora_experts.guilomo import SearchRecipe
from moepatch.tools.lora_experts.guilomo import search
from moepatch.tools.lora_experts.guilomo import to_search_layers

if TYPE_CHECKING:
    from moepatch.tools.lora_experts.guilomo import SearchRecipe

DEFAULT_EMBEDDED_EXAMPLES = 64
"""Embedded examples used when no data file is given, split evenly over the four tasks."""

IGNORED_LABEL = -100
"""Label of a token the loss ignores (prompt and padding): an example whose labels are all this has no answer."""

Record = tuple[str, dict[str, Any]]
"""An instruction record and where it came from (``"FILE, record N"``), for error messages."""


def file_records(paths: Sequence[str | Path]) -> list[Record]:
    """Every record of the jsonl instruction files, in order, each named by file and position."""

    return [(f"{path}, record {i + 1}", record) for path in paths for i, record in enumerate(read_jsonl(path))]


def embedded_records(total: int = DEFAULT_EMBEDDED_EXAMPLES, seed: int = 0) -> list[Record]:
    """``total`` synthetic records split evenly over the four embedded tasks (the first tasks by name get the
    remainder)."""

    names = sorted(TASKS)
    counts = [total // len(names) + (i < total % len(names)) for i in range(len(names))]
    return [(f"embedded {name} record {i + 1}", record) for name, count in zip(names, counts, strict=True)
            for i, record in enumerate(synthetic_records(name, count, seed))]


def conversations_of(records: Sequence[Record]) -> list[list[dict[str, str]]]:
    """The records as chat messages; a malformed record fails here, naming where it came from."""

    return [to_messages(record, where) for where, record in records]


def encode_examples(tokenizer: Any, conversations: Sequence[list[dict[str, str]]], *, max_length: int,
                    seed: int = 0) -> list[dict[str, list[int]]]:
    """Shuffle (seeded) and encode the conversations for training: the tokenizer's chat template when it has one,
    else the Vicuna format; only answer tokens carry labels.  Gives the tokenizer a pad token when it has none."""

    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.unk_token or tokenizer.eos_token
    prompt = "chat_template" if getattr(tokenizer, "chat_template", None) else "vicuna"
    order = list(conversations)
    random.Random(seed).shuffle(order)
    return [encode_messages(tokenizer, messages, prompt_format=prompt, max_length=max_length) for messages in order]


def with_answers(examples: Sequence[dict[str, list[int]]]) -> list[dict[str, list[int]]]:
    """The examples that kept at least one answer token after truncation (the others teach nothing)."""
    return [example for example in examples if any(label != IGNORED_LABEL for label in example["labels"])]


def search_checkpoint(
    checkpoint: Path,
    tokenizer: Any,
    examples: Sequence[dict[str, list[int]]],
    block: dict[str, Any],
    *,
    batch_size: int = 4,
    epochs: int = 1,
    recipe: SearchRecipe | None = None,
    seed: int = 0,
    log: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Run the GuiLoMo search on ``checkpoint`` with the LoRA experts of ``block`` (see
    :func:`moepatch.tools.lora_experts.guilomo.search_config`) over ``examples`` (consecutive batches form the train /
    valid pairs of the bilevel search) with the optimisation ``recipe`` (default: the official one, see
    :class:`moepatch.tools.lora_experts.guilomo.SearchRecipe`).

    ``log`` receives one line describing the search before it starts (it can take a while).

    Returns:
        `dict`: ``expert`` and ``rank`` (GuiLoMo's two files as dicts) and ``loss_trace`` (may hold non-finite
        values when the search diverged: the caller decides what to write).

    Raises:
        CommandError: the checkpoint's weights cannot be read or some are missing.
    """


    torch.manual_seed(seed)
    model = load_for_command(checkpoint, patch=False)
    handle = apply(model, {"lora_experts": block})
    replaced = to_search_layers(model, block["r"])
    routers = [m.router for m in model.modules() if isinstance(m, SearchLoraExperts)]
    settings = handle.lora_experts
    if settings is None:  # apply() above enabled the block's LoRA experts: only a block switched off gets here
        raise ValueError(f"lora_experts: the allocation block enables no LoRA experts: {block!r}")
    install_balance_hook(model, routers, settings, layer_indexer(handle.require_moe_model()))
    collator = DataCollatorForSeq2Seq(tokenizer, label_pad_token_id=IGNORED_LABEL, return_tensors="pt")
    batches = [collator(list(examples[i : i + batch_size])) for i in range(0, len(examples), batch_size)]
    if log is not None:
        log(f"GuiLoMo search: {replaced} projections with {block['num_experts']} experts of rank {block['r']}, "
            f"{len(examples)} examples, {len(batches)} batches (train/valid pairs) x {epochs} epochs")
    return search(model, batches, epochs=epochs, recipe=recipe or SearchRecipe())
