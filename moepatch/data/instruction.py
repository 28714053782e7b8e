"""Multi-source instruction data for dynamic data mixing: records → conversations → tokens with assistant-only labels.

Two record formats are read from jsonl: fastchat ``{"conversations": [{"from": "human"|"gpt"|"system", "value":
...}], "system_prompt"?}`` (the released dynamic-mixing data) and ``{"instruction", "input"?, "output"}``.  A
conversation is rendered with the tokenizer's chat template, or with the Vicuna v1.1 format of the official code
(``"{system} USER: {q} ASSISTANT: {a}</s>..."``, empty system unless the record has one).  Labels are ``-100``
everywhere but on the assistant spans (their end-of-turn text included), found by rendering the conversation turn by
turn; a template that does not render prefix-consistently is refused rather than guessed.
"""

from __future__ import annotations

import json
import logging
import random
from dataclasses import dataclass
from dataclasses import field
from pathlib import Path
from typing import Any

logger = logging.getLogger("moepatch.data")  # the name of earlier releases: logging configs keep working
IGNORE_INDEX = -100
PROMPT_FORMATS = ("chat_template", "vicuna")
_FASTCHAT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}


def read_jsonl(path: str | Path) -> list[dict[str, Any]]:
    """The JSON objects of a jsonl file, or of a folder's ``*.jsonl`` files in name order (the official layout has
    one folder per source); ``ValueError`` naming file and line otherwise."""
    return [record for _, record in read_jsonl_located(path)]


def read_jsonl_located(path: str | Path) -> list[tuple[str, dict[str, Any]]]:
    """Like :func:`read_jsonl`, each record with where it comes from (``"file:line"``, for error messages)."""
    path = Path(path)
    if path.is_dir():
        files = sorted(path.glob("*.jsonl"))
        if not files:
            raise ValueError(f"data folder {str(path)!r} has no *.jsonl file")
        return [located for file in files for located in read_jsonl_located(file)]
    if not path.is_file():
        raise ValueError(f"data file {str(path)!r} not found")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as error:
        raise ValueError(f"{path}: not UTF-8 text ({error.reason} at byte {error.start})") from None
    records = []
    for number, line in enumerate(text.splitlines(), start=1):
        if line.strip():
            try:
                record = json.loads(line)
            except json.JSONDecodeError as error:
                raise ValueError(f"{path}:{number}: not JSON ({error.msg})") from None
            if not isinstance(record, dict):
                raise ValueError(f"{path}:{number}: expected a JSON object")
            records.append((f"{path}:{number}", record))
    return records


def _text_field(record: dict[str, Any], key: str, where: str, *, optional: bool = False) -> str:
    """``record[key]`` when it is a string (``""`` for an absent or null optional field); ``ValueError`` naming
    ``where`` and the field otherwise (a number or null would be rendered as ``"3"`` / ``"None"`` and trained on)."""
    value = record.get(key)
    if value is None and optional:
        return ""
    if not isinstance(value, str):
        raise ValueError(f"{where}: {key!r} must be a string, got {_shown(value)}")
    return value


def _shown(value: Any) -> str:
    """``value`` as its JSON text (``null``, ``3``, ``["a"]``), shortened for a message."""
    try:
        text = json.dumps(value)
    except (TypeError, ValueError):
        text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def to_messages(record: dict[str, Any], where: str = "record") -> list[dict[str, str]]:
    """Chat messages (``role``/``content``) of a fastchat or instruction/input/output record.

    Raises:
        ValueError: naming ``where`` (``"file:line"``): an unknown format, a field that is not a string (``null``,
            a number, a list ...), a turn without a known role, a conversation without an assistant turn.
    """
    if not isinstance(record, dict):
        raise ValueError(f"{where}: expected a JSON object, got {_shown(record)}")
    if "conversations" in record:
        turns = record["conversations"]
        if not isinstance(turns, list) or not turns:
            raise ValueError(f"{where}: 'conversations' must be a non-empty list, got {_shown(turns)}")
        messages = []
        system = _text_field(record, "system_prompt", where, optional=True)
        if system:
            messages.append({"role": "system", "content": system})
        for position, turn in enumerate(turns):
            speaker = turn.get("from") if isinstance(turn, dict) else None
            role = _FASTCHAT_ROLES.get(speaker) if isinstance(speaker, str) else None  # (a list is unhashable)
            if role is None or not isinstance(turn.get("value"), str):
                raise ValueError(f"{where}: conversations[{position}] needs 'from' in {sorted(_FASTCHAT_ROLES)} and "
                                 f"a string 'value', got {_shown(turn)}")
            messages.append({"role": role, "content": turn["value"]})
    elif "instruction" in record and "output" in record:
        prompt = _text_field(record, "instruction", where)
        extra = _text_field(record, "input", where, optional=True)
        if extra:
            prompt = f"{prompt}\n\n{extra}"
        output = _text_field(record, "output", where)
        messages = [{"role": "user", "content": prompt}, {"role": "assistant", "content": output}]
    else:
        raise ValueError(f"{where}: unknown record format (expected 'conversations' or 'instruction'/'output')")
    if not any(message["role"] == "assistant" for message in messages):
        raise ValueError(f"{where}: no assistant turn to train on")
    return messages


def _vicuna_pieces(messages: list[dict[str, str]], eos: str) -> list[tuple[str, bool]]:
    """Vicuna v1.1 text as (piece, is_assistant) pairs."""
    system = messages[0]["content"] if messages[0]["role"] == "system" else ""
    pieces: list[tuple[str, bool]] = [(system, False)]
    for message in messages:
        if message["role"] == "user":
            pieces.append((f" USER: {message['content']}", False))
        elif message["role"] == "assistant":
            pieces.append((" ASSISTANT:", False))
            pieces.append((f" {message['content']}{eos}", True))
    return pieces


def _template_pieces(tokenizer: Any, messages: list[dict[str, str]]) -> list[tuple[str, bool]]:
    """Chat-template text as (piece, is_assistant) pairs, by rendering the conversation turn by turn."""
    pieces: list[tuple[str, bool]] = []
    rendered = ""
    for index, message in enumerate(messages):
        if message["role"] == "assistant":
            prompt = tokenizer.apply_chat_template(messages[:index], tokenize=False, add_generation_prompt=True)
        else:
            prompt = tokenizer.apply_chat_template(messages[: index + 1], tokenize=False)
        full = tokenizer.apply_chat_template(messages[: index + 1], tokenize=False)
        if not prompt.startswith(rendered) or not full.startswith(prompt):
            raise ValueError("the chat template does not render turn by turn consistently; use prompt_format='vicuna'")
        pieces.append((prompt[len(rendered) :], False))
        pieces.append((full[len(prompt) :], message["role"] == "assistant"))
        rendered = full
    return [piece for piece in pieces if piece[0]]


def encode_messages(
    tokenizer: Any, messages: list[dict[str, str]], *, prompt_format: str = "chat_template", max_length: int = 512
) -> dict[str, list[int]]:
    """``input_ids``, ``attention_mask`` and ``labels`` (assistant tokens only) of one conversation, truncated."""
    if prompt_format not in PROMPT_FORMATS:
        raise ValueError(f"prompt_format: expected one of {PROMPT_FORMATS}, got {prompt_format!r}")
    if prompt_format == "chat_template" and not getattr(tokenizer, "chat_template", None):
        raise ValueError("prompt_format='chat_template' but the tokenizer has no chat template; use 'vicuna'")
    if prompt_format == "vicuna":
        pieces = _vicuna_pieces(messages, tokenizer.eos_token or "")
    else:
        pieces = _template_pieces(tokenizer, messages)
    input_ids: list[int] = []
    labels: list[int] = []
    for text, trained in pieces:  # piecewise tokenisation: label spans are exact by construction
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        input_ids.extend(ids)
        labels.extend(ids if trained else [IGNORE_INDEX] * len(ids))
    input_ids, labels = input_ids[:max_length], labels[:max_length]
    return {"input_ids": input_ids, "attention_mask": [1] * len(input_ids), "labels": labels}


@dataclass
class DataSource:
    """One named source: tokenised train examples and a fixed probe (dev) split."""

    name: str
    train: list[dict[str, list[int]]] = field(default_factory=list)
    probe: list[dict[str, list[int]]] = field(default_factory=list)
    dropped: int = 0
    """Training records left out because truncation to ``max_length`` kept none of their assistant tokens."""


def load_source(
    name: str,
    train_path: str | Path,
    tokenizer: Any,
    *,
    probe_path: str | Path | None = None,
    probe_size: int = 80,
    seed: int = 0,
    prompt_format: str = "chat_template",
    max_length: int = 512,
) -> DataSource:
    """Read, convert and tokenise one source, with a probe split of ``probe_size`` examples.

    With ``probe_path`` the probe split is a fixed sample of ``probe_size`` of its records drawn with ``seed`` (kept
    in file order; all of them when it has fewer), and the train split is the whole of ``train_path``: the official
    dev sets hold 1,000 examples per source while the paper probes about 80.  Without ``probe_path`` the probe split
    is a seeded, fixed sample of ``probe_size`` train records, removed from the train split.

    A training example none of whose assistant tokens survive truncation to ``max_length`` has nothing to learn
    from (its loss is 0 by construction); it is left out, counted in ``dropped`` and logged.  Every one may be left
    out — the caller decides what an empty ``train`` means.  Probe examples are only routed, never trained on, so
    they are kept whatever their labels.

    Raises:
        ValueError: naming the file and line of a malformed record, an empty source, or a ``probe_size`` that leaves
            no training data.
    """
    if not (isinstance(probe_size, int) and not isinstance(probe_size, bool) and probe_size >= 1):
        raise ValueError(f"probe_size: expected an integer >= 1, got {probe_size!r}")
    records = read_jsonl_located(train_path)
    if not records:
        raise ValueError(f"source {name!r}: {train_path} holds no record")
    if probe_path is not None:
        probe_records = read_jsonl_located(probe_path)
        available = len(probe_records)
        if available > probe_size:
            chosen = sorted(random.Random(seed).sample(range(available), probe_size))
            probe_records = [probe_records[i] for i in chosen]
        logger.info("source %r: probe set of %d of the %d examples in %s (probe_size %d, seed %d)", name,
                    len(probe_records), available, probe_path, probe_size, seed)
    else:
        if probe_size >= len(records):
            raise ValueError(f"probe_size: {probe_size} probe examples leave no training data in {name!r} "
                             f"({len(records)} records in {train_path}); lower it or give a probe (dev) file")
        held_out = set(random.Random(seed).sample(range(len(records)), probe_size))
        probe_records = [r for i, r in enumerate(records) if i in held_out]
        records = [r for i, r in enumerate(records) if i not in held_out]
        logger.info("source %r: probe set of %d examples held out of the %d train records in %s (seed %d)", name,
                    len(probe_records), len(records) + len(probe_records), train_path, seed)

    def encode(batch: list[tuple[str, dict[str, Any]]]) -> list[dict[str, list[int]]]:
        return [
            encode_messages(tokenizer, to_messages(record, where), prompt_format=prompt_format, max_length=max_length)
            for where, record in batch
        ]

    encoded = encode(records)
    train = [example for example in encoded if any(label != IGNORE_INDEX for label in example["labels"])]
    dropped = len(encoded) - len(train)
    if dropped:
        logger.warning("source %r: %d of its %d training examples in %s have no assistant token left after "
                       "truncation to %d tokens; left out", name, dropped, len(encoded), train_path, max_length)
    return DataSource(name=name, train=train, probe=encode(probe_records), dropped=dropped)
