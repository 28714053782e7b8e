"""Embedded instruction data for the demo and the tests: four task families generated in code, no downloads.

The four sources mimic the paper's mixture (ShareGPT, OpenOrca, MathInstruct, code instructions) only in having
clearly different token distributions — digits and operators, Python keywords and brackets, English prose, and
upper-case letter lists — so a router sends them to different experts and dynamic mixing has something to see.
Every answer is computed from its question, so a model can actually learn the tasks.  Records are written in the
fastchat ``conversations`` format of the released data (``train/<name>.jsonl``, ``dev/<name>.jsonl``) and go through
the same loading code as real data.
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable
from pathlib import Path

_WORDS = ("router", "expert", "token", "layer", "gate", "model", "data", "weight", "batch", "probe", "mixture",
          "sparse", "dense", "load", "balance")
_SUBJECTS = ("The router", "A small model", "Every expert", "The probe set", "Our mixture", "Each layer")
_VERBS = ("keeps", "reads", "sends", "weighs", "counts", "mixes")
_OBJECTS = ("the tokens", "a few experts", "the routing weights", "the padding", "its own statistics", "the data")


def _math(rng: random.Random) -> tuple[str, str]:
    a, b = rng.randint(2, 99), rng.randint(2, 99)
    op = rng.choice("+-*")
    value = a + b if op == "+" else a - b if op == "-" else a * b
    return f"Compute {a} {op} {b} and give the number.", f"{a} {op} {b} = {value}. The answer is {value}."


def _code(rng: random.Random) -> tuple[str, str]:
    name, factor = rng.choice(_WORDS), rng.randint(2, 9)
    op = rng.choice(("*", "+", "//", "%"))
    return (f"Write a Python function {name}_{factor}(x) that returns x {op} {factor}.",
            f"def {name}_{factor}(x):\n    return x {op} {factor}\n")


def _chat(rng: random.Random) -> tuple[str, str]:
    subject, verb, obj = rng.choice(_SUBJECTS), rng.choice(_VERBS), rng.choice(_OBJECTS)
    return (f"Say in one sentence what {subject.lower()} does.",
            f"{subject} {verb} {obj}, and that is all it does today.")


def _letters(rng: random.Random) -> tuple[str, str]:
    letters = [chr(rng.randint(65, 90)) for _ in range(rng.randint(4, 8))]
    return (f"Sort the letters {' '.join(letters)} alphabetically.", " ".join(sorted(letters)))


TASKS: dict[str, Callable[[random.Random], tuple[str, str]]] = {
    "chat": _chat,
    "code": _code,
    "letters": _letters,
    "math": _math,
}
"""Source name → generator of one ``(question, answer)`` pair; names in sorted order."""


def synthetic_records(name: str, count: int, seed: int = 0) -> list[dict]:
    """``count`` fastchat records of task ``name``, deterministic in ``seed``."""
    if name not in TASKS:
        raise ValueError(f"synthetic task {name!r}: choose from {sorted(TASKS)}")
    rng = random.Random(f"{name}/{seed}")
    records = []
    for _ in range(count):
        question, answer = TASKS[name](rng)
        records.append({"conversations": [{"from": "human", "value": question}, {"from": "gpt", "value": answer}]})
    return records


def write_synthetic_sources(
    folder: str | Path, *, train_per_source: int = 200, probe_per_source: int = 16, seed: int = 0
) -> dict[str, tuple[Path, Path]]:
    """Write ``train/<name>.jsonl`` and ``dev/<name>.jsonl`` for every task; return ``{name: (train, dev)}``."""
    folder = Path(folder)
    paths = {}
    for name in sorted(TASKS):
        records = synthetic_records(name, train_per_source + probe_per_source, seed)
        train, dev = folder / "train" / f"{name}.jsonl", folder / "dev" / f"{name}.jsonl"
        for path, chunk in ((train, records[:train_per_source]), (dev, records[train_per_source:])):
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text("".join(json.dumps(record) + "\n" for record in chunk))
        paths[name] = (train, dev)
    return paths


__all__ = ["TASKS", "synthetic_records", "write_synthetic_sources"]
