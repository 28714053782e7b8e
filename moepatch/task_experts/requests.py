"""Requests as the router sees them: the prompt of a record (never its answer), with its task when known."""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from moepatch.data.instruction import read_jsonl_located
from moepatch.data.instruction import to_messages
from moepatch.data.sources import discover_sources
from moepatch.errors import FieldError


@dataclass
class Request:
    text: str
    task: str | None
    where: str  # "file:line"
    record: dict[str, Any]


def request_text(record: dict[str, Any], where: str) -> str:
    """``"text"`` / ``"prompt"`` as given, else the system and user turns of a conversation or instruction record
    (the answer is what the expert will produce, so it is left out)."""
    for key in ("text", "prompt"):
        if key in record:
            value = record[key]
            if not isinstance(value, str) or not value.strip():
                raise ValueError(f"{where}: {key!r} must be a non-empty string")
            return value
    messages = to_messages(record, where)
    while messages and messages[-1]["role"] == "assistant":
        messages = messages[:-1]
    text = "\n".join(message["content"] for message in messages if message["role"] in ("system", "user"))
    if not text.strip():
        raise ValueError(f"{where}: no user text to route on")
    return text


def read_requests(path: str | Path, task_field: str = "task") -> list[Request]:
    """The requests of a jsonl file (``text`` / ``prompt``, or conversation / instruction records; ``task_field``
    optional, for evaluation)."""
    requests = []
    for where, record in read_jsonl_located(path):
        task = record.get(task_field)
        if task is not None and not isinstance(task, str):
            raise ValueError(f"{where}: {task_field!r} must be a task name, got {task!r}")
        requests.append(Request(request_text(record, where), task, where, record))
    if not requests:
        raise ValueError(f"{path}: no requests")
    return requests


def task_requests(data: str | Path, tasks: list[str] | None = None) -> tuple[dict[str, list[Request]], list[str]]:
    """Per task, the requests of a multi-source data folder (the dynamic-mixing layout: ``dev/<task>.jsonl`` preferred
    — the router learns from examples the experts did not train on — else ``train/<task>.jsonl``, or
    ``<task>.jsonl`` / ``<task>/`` directly), and the tasks that had no dev file.  A problem of the folder is a
    :class:`~moepatch.errors.FieldError` on ``data``."""
    try:
        paths = discover_sources(data)
    except FieldError as error:  # the folder was given to discover_sources as its data_dir
        raise FieldError("data", error.message) from None
    if tasks is not None:
        missing = [task for task in tasks if task not in paths]
        if missing:
            raise FieldError("data", f"{data} has no data for the experts' task(s) {missing} (it has "
                                     f"{sorted(paths)})")
        paths = {task: paths[task] for task in tasks}
    result = {}
    for task, (train, dev) in paths.items():
        found = []
        for where, record in read_jsonl_located(dev or train):
            found.append(Request(request_text(record, where), task, where, record))
        if not found:
            raise FieldError("data", f"task {task!r} has no examples in {dev or train}")
        result[task] = found
    return result, [task for task, (_, dev) in paths.items() if dev is None]


def split_requests(by_task: dict[str, list[Request]], holdout: float, limit: int | None, seed: int
                   ) -> tuple[list[Request], list[Request]]:
    """(fit, held out): per task, ``limit`` requests at most, shuffled with ``seed``, ``holdout`` of them held out
    (one at least when ``holdout > 0``, one left to fit at least)."""
    rng = random.Random(seed)
    fit, held = [], []
    for task, requests in by_task.items():
        chosen = list(requests)
        rng.shuffle(chosen)
        chosen = chosen[:limit] if limit else chosen
        count = 0 if holdout <= 0 else min(len(chosen) - 1, max(1, round(holdout * len(chosen))))
        if count < 1 and holdout > 0:
            raise FieldError("holdout", f"task {task!r} has {len(chosen)} example(s): too few to hold one out")
        held += chosen[:count]
        fit += chosen[count:]
    return fit, held
