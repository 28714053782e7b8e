"""Machine-readable key figures of one benchmark run: what ``--json PATH`` writes.

Every benchmark prints its full tables for people; ``benchmarks/run_all.py`` runs them all and needs their key figures
without reading those tables back with regular expressions (a changed column width or a new row would silently
break that).  So each benchmark also hands its key figures to :func:`write_summary` when asked, and the printed
output stays exactly as it was.

The file holds one JSON object::

    {"benchmark": "bench_forward", "device": "cuda", "device_name": "NVIDIA H200", "dtype": "bfloat16",
     "arguments": {...}, "figures": [{"setting": "qwen1.5-moe-2l 4x512", "label": "patched / unpatched (median)",
                                      "value": 1.012, "unit": "x", "goal_max": null, "extra": ""}, ...]}

``goal_max`` is the upper bound the benchmark itself states for that figure (``null`` where it states none), so a
reader can say ``ok`` or ``ABOVE`` without knowing the benchmark.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
from dataclasses import asdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class Figure:
    """One key figure: what was measured (``label``) under which setting, its value, unit and stated goal."""

    setting: str
    label: str
    value: float
    unit: str = "x"
    """``x`` (a ratio), ``ms``, ``%`` or a free unit such as ``copies/token``."""
    goal_max: float | None = None
    """The upper bound the benchmark states for ``value``; ``None`` where it states none."""
    extra: str = ""
    """Context shown next to the value (e.g. the other ratio of a pair, or the absolute times)."""


def add_json_argument(parser: argparse.ArgumentParser) -> None:
    """``--json PATH``: where to write the key figures (nothing is written without it)."""
    parser.add_argument("--json", type=Path, default=None, metavar="PATH",
                        help="also write the key figures as JSON to PATH (read by benchmarks/run_all.py)")


def device_name(device: str) -> str:
    """The accelerator's or the CPU's model name, so a saved result says what it was measured on."""
    try:
        import torch

        if device.startswith("cuda") and torch.cuda.is_available():
            return torch.cuda.get_device_name(torch.device(device))
    except Exception:  # noqa: BLE001 - a missing name must never lose the figures
        pass
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _torch_version() -> str | None:
    try:
        import torch

        return str(torch.__version__)
    except ImportError:
        return None


def _jsonable(value: Any) -> Any:
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    if isinstance(value, (list, tuple)):
        return [_jsonable(item) for item in value]
    return str(value)


def write_summary(path: Path | None, benchmark: str, args: argparse.Namespace, figures: list[Figure], *,
                  note: str = "") -> None:
    """Write ``figures`` (and the arguments they were measured with) to ``path``; nothing when ``path`` is None.
    ``note`` says why there are no figures when a benchmark cannot run here (e.g. it needs more GPUs); the runner
    shows it in place of its figures.

    Written to a temporary file in the same folder and renamed, so a reader never sees half a file (a benchmark
    killed by its timeout leaves no file rather than a truncated one).
    """
    if path is None:
        return
    arguments = {name: _jsonable(value) for name, value in vars(args).items() if name != "json"}
    device = str(arguments.get("device", "cpu"))
    payload = {
        "benchmark": benchmark,
        "device": device,
        "device_name": device_name(device),
        "dtype": arguments.get("dtype"),
        "python": sys.version.split()[0],
        "torch": _torch_version(),
        "arguments": arguments,
        "figures": [asdict(figure) for figure in figures],
    }
    if note:
        payload["note"] = note
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    descriptor, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(descriptor, "w") as handle:
            json.dump(payload, handle, indent=2)
            handle.write("\n")
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
