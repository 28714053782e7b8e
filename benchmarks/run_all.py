"""Run every benchmark in benchmarks/ in one bounded session and print one summary table.

Why one runner: a GPU session is short and costly, so every benchmark has to run in it, unattended, within a known
time, and what it measured has to come back in one place.  So each benchmark runs as its own subprocess with its
own timeout inside a total budget (a crash, an out-of-memory or a hang costs that benchmark's row, never the
others'), its full output is saved to ``--output``, and its key figures are read from the JSON it writes with
``--json`` (``benchmarks/figures_json.py``) rather than parsed back from its printed tables.

The sizes are chosen per device: with ``--device cuda`` (no ``--quick``) they are meaningful on one H100 / H200 and
the whole run stays under 8 minutes (``--budget``, default 480 s, including each subprocess's imports, model
building and CUDA warm-up); ``--quick`` runs tiny sizes, for checking the runner itself on a CPU in a few minutes.
``--compile`` adds a compiled LoRA-expert run (the only benchmark with ``--compile``) after the others; it gets what
remains of the budget, so a slow compilation costs that row alone.  ``bench_placement.py`` is host-side planning on
co-activation counts: it runs as it is, on the CPU, on every device.

Usage::

    python benchmarks/run_all.py --device cpu --quick                 # check the runner here (a few minutes)
    bash benchmarks/gpu.sh --output "$OUT/benchmarks"                 # the GPU session: cuda, bfloat16, --compile
    python benchmarks/run_all.py --device cuda --only forward c2r     # a subset again

Exit status: 0 when every benchmark ran, 1 when one failed, timed out or was skipped for lack of budget, 2 for bad
arguments (nothing is run), 130 when interrupted.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from dataclasses import field
from datetime import datetime
from pathlib import Path
from typing import NoReturn

HERE = Path(__file__).resolve().parent
REPOSITORY = HERE.parent
MIN_START_S = 20.0
"""A benchmark is not started with less budget than this left: it could not even import torch and build a model."""


@dataclass(frozen=True)
class Benchmark:
    """One subprocess of the run: which script, with which arguments at full and at quick size, and its timeouts."""

    name: str
    script: str
    full: tuple[str, ...]
    quick: tuple[str, ...]
    timeout_s: float
    quick_timeout_s: float
    on_device: bool = True
    """False for host-side work (no ``--device`` / ``--dtype``: it runs on the CPU whatever the device)."""
    compiled: bool = False
    """Run only with ``--compile`` (and pass it on)."""

    def arguments(self, args: argparse.Namespace, json_path: Path) -> list[str]:
        """The command line of this benchmark for the run's device, dtype and size."""
        command = [sys.executable, str(HERE / self.script), *(self.quick if args.quick else self.full)]
        if self.on_device:
            command += ["--device", args.device, "--dtype", args.dtype]
        if self.compiled:
            command.append("--compile")
        return [*command, "--json", str(json_path)]

    def setting(self, args: argparse.Namespace) -> str:
        if not self.on_device:
            return "CPU (host-side planning)"
        return f"{args.device} {args.dtype}{' compiled' if self.compiled else ''}"


BENCHMARKS = (
    # Qwen1.5-MoE-A2.7B layer sizes, 2 layers, 4x512 tokens: the patch's overhead where the experts do real work.
    Benchmark(
        "forward", "bench_forward.py",
        full=("--models", "tiny", "qwen1.5-moe-2l", "--rounds", "20", "--per-round", "5", "--warmup", "2",
              "--batch-size", "4", "--seq", "512"),
        quick=("--models", "tiny", "--rounds", "2", "--per-round", "1", "--warmup", "1", "--batch-size", "2",
               "--seq", "16"),
        timeout_s=120, quick_timeout_s=120,
    ),
    Benchmark(
        "c2r", "bench_c2r.py",
        full=("--models", "tiny", "qwen1.5-moe-2l", "--rounds", "6", "--batches", "3", "--batch-size", "4",
              "--seq", "512"),
        quick=("--models", "tiny", "--rounds", "2", "--batches", "1", "--batch-size", "2", "--seq", "16"),
        timeout_s=120, quick_timeout_s=120,
    ),
    # DeepSeek-V3's router at full size, 2 MoE layers, 2x512 tokens (its docstring's GPU setting).
    Benchmark(
        "router_kinds", "bench_router_kinds.py",
        full=("--rounds", "20", "--warmup", "2", "--per-round", "5", "--router-calls", "20", "--layers", "2",
              "--batch-size", "2", "--seq", "512"),
        quick=("--rounds", "1", "--warmup", "1", "--per-round", "1", "--router-calls", "2", "--batch-size", "1",
               "--seq", "32", "--expert-width", "16"),
        timeout_s=150, quick_timeout_s=150,
    ),
    Benchmark("placement", "bench_placement.py", full=(), quick=("--synthetic-layers", "4"), timeout_s=90,
              quick_timeout_s=120, on_device=False),
    # Expert parallelism, per pair vs dedup dispatch, vanilla / C2R / placement: torchrun on 2 and 4 processes (gloo
    # on the CPU; NCCL with one GPU each, so on a machine with 1 GPU it writes a note instead of figures).
    Benchmark(
        "expert_parallel", "bench_expert_parallel.py",
        full=("--processes", "2", "4", "--layers", "2", "--batch-size", "4", "--seq", "512", "--steps", "3"),
        quick=("--quick",),
        timeout_s=180, quick_timeout_s=240,
    ),
    # The tiny model is left out on a GPU: there every variant is kernel-launch bound and the ratios say nothing.
    Benchmark(
        "lora_experts", "bench_lora_experts.py",
        full=("--models", "qwen1.5-moe", "--layers", "2", "--batch-size", "2", "--seq", "512", "--steps", "5",
              "--warmup", "2"),
        quick=("--models", "tiny", "--variants", "peft-lora", "mola-8", "--steps", "1", "--warmup", "1",
               "--batch-size", "1", "--seq", "16"),
        timeout_s=210, quick_timeout_s=180,
    ),
    # Compilation time dominates here; three variants give both MoLA ratios (vs peft LoRA, 8 vs 32 experts).
    Benchmark(
        "lora_experts_compiled", "bench_lora_experts.py",
        full=("--models", "qwen1.5-moe", "--variants", "peft-lora", "mola-8", "mola-32", "--layers", "2",
              "--batch-size", "2", "--seq", "512", "--steps", "5", "--warmup", "2"),
        quick=("--models", "tiny", "--variants", "peft-lora", "mola-8", "--steps", "1", "--warmup", "2",
               "--batch-size", "1", "--seq", "16"),
        timeout_s=300, quick_timeout_s=300, compiled=True,
    ),
)
NAMES = tuple(benchmark.name for benchmark in BENCHMARKS)


@dataclass
class Outcome:
    """What one benchmark's subprocess left: its status, wall time, figures (from its JSON) or why it has none."""

    benchmark: Benchmark
    setting: str
    status: str = "not run"
    """``ok``, ``failed``, ``timeout``, ``skipped`` or ``interrupted``."""
    wall_s: float | None = None
    reason: str = ""
    figures: list[dict] = field(default_factory=list)
    command: list[str] = field(default_factory=list)
    files: dict[str, str] = field(default_factory=dict)
    device_name: str | None = None


class Interrupted(Exception):
    """Ctrl-C during a benchmark: carries its outcome (killed, with its wall time), so the table still lists it."""

    def __init__(self, outcome: Outcome) -> None:
        super().__init__(outcome.benchmark.name)
        self.outcome = outcome


class OneLineParser(argparse.ArgumentParser):
    """Argument errors in one line (``run_all.py: error: --flag: ...``), exit status 2, as the refusals below."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message}\n")


def refuse(message: str) -> NoReturn:
    """A bad argument: one line naming the flag, exit status 2, nothing run."""
    sys.stderr.write(f"run_all.py: error: {message}\n")
    raise SystemExit(2)


def parse_arguments(argv: list[str] | None = None) -> argparse.Namespace:
    """The arguments, checked before anything runs (a refused run writes nothing)."""
    parser = OneLineParser(prog="run_all.py", description=__doc__,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", help="cpu, cuda or cuda:<index>")
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default=None,
                        help="default: bfloat16 on cuda, float32 on cpu")
    parser.add_argument("--compile", action="store_true", help="also run the LoRA-expert benchmark compiled")
    parser.add_argument("--quick", action="store_true", help="tiny sizes: checks the runner, measures little")
    parser.add_argument("--output", type=Path, default=None,
                        help="folder for every benchmark's output (created; must be empty if it exists); "
                             "default: a fresh benchmarks/results/<timestamp>")
    parser.add_argument("--budget", type=float, default=480.0,
                        help="total seconds for the whole run; a benchmark gets min(its timeout, what is left)")
    parser.add_argument("--only", nargs="+", choices=NAMES, metavar="NAME",
                        help=f"run only these benchmarks ({', '.join(NAMES)})")
    args = parser.parse_args(argv)

    if not re.fullmatch(r"cpu|cuda(:\d+)?", args.device):
        refuse(f"--device: expected cpu, cuda or cuda:<index>, got {args.device!r}")
    if args.device.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            refuse(f"--device {args.device}: CUDA is not available on this machine (torch {torch.__version__})")
        index = int(args.device.partition(":")[2] or 0)
        if index >= torch.cuda.device_count():
            refuse(f"--device {args.device}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    if args.dtype is None:
        args.dtype = "bfloat16" if args.device.startswith("cuda") else "float32"
    if not args.budget > MIN_START_S:
        refuse(f"--budget: expected more than {MIN_START_S:.0f} seconds, got {args.budget:g}")
    if args.only and "lora_experts_compiled" in args.only and not args.compile:
        refuse("--only lora_experts_compiled: needs --compile")
    args.output = prepare_output(args.output)
    return args


def prepare_output(output: Path | None) -> Path:
    """The output folder, created and checked writable; refuses a file, a non-empty folder or an unwritable place."""
    if output is None:
        output = HERE / "results" / datetime.now().strftime("%Y%m%d-%H%M%S")
        while output.exists():  # two runs started in the same second
            output = output.with_name(output.name + "-1")
    output = output.expanduser().resolve()
    if output.exists() and not output.is_dir():
        refuse(f"--output {output}: exists and is not a folder")
    if output.is_dir() and any(output.iterdir()):
        refuse(f"--output {output}: folder is not empty (give a new one, so runs never mix)")
    try:
        output.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=output):
            pass
    except OSError as error:
        refuse(f"--output {output}: not writable ({error.strerror or error})")
    return output


def failure_reason(stderr: Path, stdout: Path) -> str:
    """Why a benchmark failed, in one line: its last exception line when its stderr has one, else its last line.

    The last exception line matters for ``bench_lora_experts.py``, whose own last line only says which variant
    failed, "see above".  Progress bars write carriage returns, so lines are split on those too.
    """
    for path in (stderr, stdout):
        try:
            lines = [line.strip() for line in re.split(r"[\r\n]+", path.read_text(errors="replace")) if line.strip()]
        except OSError:
            continue
        if not lines:
            continue
        exception = re.compile(r"^([A-Za-z_][\w.]*(Error|Exception|Exit|Interrupt)|[\w.]+: error)\b")
        for line in reversed(lines[-60:]):
            if exception.match(line):
                return line if line == lines[-1] else f"{line} (last line: {lines[-1]})"
        return lines[-1]
    return "no output"


def kill_group(process: subprocess.Popen) -> None:
    """Kill the benchmark's process group: the benchmark and whatever it started (per-variant children, compile
    workers), which a plain ``kill`` of the benchmark would leave running on the device."""
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def run_one(benchmark: Benchmark, args: argparse.Namespace, timeout_s: float) -> Outcome:
    """Run one benchmark as a subprocess with ``timeout_s``; its stdout and stderr go to files in the output."""
    outcome = Outcome(benchmark, benchmark.setting(args))
    json_path = args.output / f"{benchmark.name}.json"
    stdout_path = args.output / f"{benchmark.name}.stdout.txt"
    stderr_path = args.output / f"{benchmark.name}.stderr.txt"
    outcome.command = benchmark.arguments(args, json_path)
    outcome.files = {"stdout": str(stdout_path), "stderr": str(stderr_path)}
    environment = dict(os.environ)
    environment["PYTHONPATH"] = os.pathsep.join(
        part for part in (str(REPOSITORY), environment.get("PYTHONPATH", "")) if part)
    environment.update({"PYTHONUNBUFFERED": "1", "TQDM_DISABLE": "1"})
    start = time.monotonic()
    interrupted = False
    with open(stdout_path, "w") as stdout, open(stderr_path, "w") as stderr:
        process = subprocess.Popen(outcome.command, cwd=REPOSITORY, stdout=stdout, stderr=stderr,
                                   env=environment, start_new_session=True)
        try:
            returncode = process.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            returncode = None
        except KeyboardInterrupt:  # the benchmark, in its own session, does not get the terminal's SIGINT
            returncode, interrupted = None, True
        finally:
            kill_group(process)  # also what a finished benchmark left behind
            process.wait()
    outcome.wall_s = time.monotonic() - start
    if interrupted:
        outcome.status, outcome.reason = "interrupted", "interrupted (killed)"
        raise Interrupted(outcome)
    if returncode is None:
        outcome.status = "timeout"
        outcome.reason = f"killed after {timeout_s:.0f} s; last line: {failure_reason(stderr_path, stdout_path)}"
    elif returncode != 0:
        outcome.status = "failed"
        outcome.reason = f"exit {returncode}: {failure_reason(stderr_path, stdout_path)}"
    else:
        read_figures(outcome, json_path)
    return outcome


def read_figures(outcome: Outcome, json_path: Path) -> None:
    """The figures of a benchmark that exited 0; one without a readable JSON file counts as failed."""
    try:
        payload = json.loads(json_path.read_text())
        outcome.figures = list(payload["figures"])
        outcome.device_name = payload.get("device_name")
        outcome.files["figures"] = str(json_path)
        outcome.status = "ok"
        if not outcome.figures:
            outcome.reason = str(payload.get("note") or "ran, but reported no figures")
    except (OSError, ValueError, KeyError, TypeError) as error:
        outcome.status = "failed"
        outcome.reason = f"exit 0 but no readable {json_path.name}: {error}"


def format_value(figure: dict) -> str:
    value, unit = float(figure["value"]), figure.get("unit", "x")
    if unit == "x":
        return f"{value:.3f}x"
    if unit == "ms":
        return f"{value:.2f} ms"
    if unit.startswith("%"):
        return f"{value:.1f}{unit}"
    return f"{value:.4f} {unit}"


def format_goal(figure: dict) -> str:
    goal = figure.get("goal_max")
    if goal is None:
        return "-"
    return f"<= {goal:.2f} " + ("ok" if float(figure["value"]) <= goal else "ABOVE")


def table_rows(outcomes: list[Outcome]) -> list[tuple[str, ...]]:
    """One row per figure (the wall time on each benchmark's first row); one row per benchmark without figures."""
    rows = []
    for outcome in outcomes:
        wall = "-" if outcome.wall_s is None else f"{outcome.wall_s:.0f}"
        name = outcome.benchmark.name
        if outcome.status != "ok" or not outcome.figures:
            status = outcome.status.upper() if outcome.status != "ok" else "no figures"
            rows.append((name, outcome.setting, status, "-", "-", wall, outcome.reason))
            continue
        for index, figure in enumerate(outcome.figures):
            rows.append((name if index == 0 else "", figure["setting"], figure["label"], format_value(figure),
                         format_goal(figure), wall if index == 0 else "", figure.get("extra", "")))
    return rows


def render_table(outcomes: list[Outcome]) -> str:
    header = ("benchmark", "setting", "figure", "measured", "goal", "wall s", "notes")
    rows = table_rows(outcomes)
    widths = [max(len(row[column]) for row in [header, *rows]) for column in range(len(header) - 1)]
    right = {3, 5}  # measured, wall s

    def line(row: tuple[str, ...]) -> str:
        cells = [cell.rjust(width) if column in right else cell.ljust(width)
                 for column, (cell, width) in enumerate(zip(row[:-1], widths, strict=True))]  # the last: unpadded
        return ("  ".join(cells) + "  " + row[-1]).rstrip()

    rule = "-" * len(line(header))
    return "\n".join([line(header), rule, *(line(row) for row in rows)])


def write_results(args: argparse.Namespace, outcomes: list[Outcome], table: str, total_s: float) -> None:
    """``summary.txt`` (the table) and ``summary.json`` (everything the table came from) next to the outputs."""
    (args.output / "summary.txt").write_text(table + "\n")
    payload = {
        "device": args.device, "dtype": args.dtype, "compile": args.compile, "quick": args.quick,
        "budget_s": args.budget, "total_s": total_s,
        "benchmarks": [{"name": o.benchmark.name, "setting": o.setting, "status": o.status, "wall_s": o.wall_s,
                        "reason": o.reason, "command": o.command, "files": o.files, "device_name": o.device_name,
                        "figures": o.figures} for o in outcomes],
    }
    (args.output / "summary.json").write_text(json.dumps(payload, indent=2) + "\n")


def main(argv: list[str] | None = None) -> int:
    started = time.monotonic()
    args = parse_arguments(argv)
    selected = [b for b in BENCHMARKS if (not b.compiled or args.compile) and (not args.only or b.name in args.only)]
    print(f"run_all: {len(selected)} benchmarks, {args.device} {args.dtype}{' --compile' if args.compile else ''}"
          f"{' --quick' if args.quick else ''}, budget {args.budget:.0f} s, output {args.output}", flush=True)
    if args.device == "cpu" and not args.quick:
        print("run_all: note: full sizes are meant for a GPU; on a CPU use --quick or a larger --budget", flush=True)
    outcomes: list[Outcome] = []
    interrupted = False
    for position, benchmark in enumerate(selected, 1):
        left = args.budget - (time.monotonic() - started)
        if interrupted or left < MIN_START_S:
            outcome = Outcome(benchmark, benchmark.setting(args), status="interrupted" if interrupted else "skipped",
                              reason="interrupted" if interrupted else f"total budget spent ({left:.0f} s left)")
            outcomes.append(outcome)
            continue
        timeout_s = min(benchmark.quick_timeout_s if args.quick else benchmark.timeout_s, left)
        print(f"[{position}/{len(selected)}] {benchmark.name} (timeout {timeout_s:.0f} s) ...", end=" ", flush=True)
        try:
            outcome = run_one(benchmark, args, timeout_s)
        except Interrupted as stop:
            interrupted, outcome = True, stop.outcome
        outcomes.append(outcome)
        print(f"{outcome.status}, {outcome.wall_s or 0:.0f} s" + (f": {outcome.reason}" if outcome.reason else ""),
              flush=True)

    total_s = time.monotonic() - started
    table = render_table(outcomes)
    write_results(args, outcomes, table, total_s)
    names = sorted({o.device_name for o in outcomes if o.device_name})
    print()
    print(f"summary: {args.device} ({', '.join(names) or 'device name not reported'}), {args.dtype}"
          f"{', --compile' if args.compile else ''}{', --quick' if args.quick else ''}; "
          f"total {total_s:.0f} s of a {args.budget:.0f} s budget")
    print(table)
    print()
    print(f"full output of each benchmark, in {args.output}:")
    for outcome in outcomes:
        files = ", ".join(Path(path).name for path in outcome.files.values()) or "(not run)"
        print(f"  {outcome.benchmark.name:<22}{files}")
    print("  summary.txt (this table), summary.json (figures, commands, statuses)")
    if interrupted:
        return 130
    return 0 if all(o.status == "ok" for o in outcomes) else 1


if __name__ == "__main__":
    sys.exit(main())
