"""``moepatch eval <lm-eval arguments>``: lm-eval's own command line with the ``moepatch`` model registered
(:mod:`moepatch.evaluation`), its moepatch arguments checked before lm-eval runs, and the routing statistics written
after it.

lm-eval has no plugin discovery, so the model is registered by importing :mod:`moepatch.evaluation` before lm-eval's
CLI parses ``--model``.  Every problem of an argument names lm-eval's flag (``--model_args``, ``--output_path``).
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from dataclasses import field
from pathlib import Path
from typing import Any

from moepatch.errors import CommandError
from moepatch.errors import UsageError
from moepatch.evaluation import LAST_MODEL
from moepatch.evaluation import STATS_FILE
from moepatch.evaluation import ModelArgError
from moepatch.evaluation import check_model_args
from moepatch.evaluation import experts_match_base
from moepatch.evaluation import top_k_in_range
from moepatch.staged_output import check_writable_target
from moepatch.staged_output import refuse_output_in_inputs
from moepatch.staged_output import write_text_atomically
from moepatch.task_experts.manifest import ROUTER_CONFIG
from moepatch.task_experts.manifest import ROUTER_FOLDER
from moepatch.task_experts.manifest import manifest_folder
from moepatch.task_experts.run_folder import read_run

MOEPATCH_CONFIG_ARG = "--model_args moepatch_config"
"""How a message names the ``moepatch_config=`` file of ``--model_args``."""


def _results_folder(output: Path) -> Path:
    """The folder lm-eval writes its results into (beside a ``.json`` ``--output_path``, else inside it), where
    :data:`STATS_FILE` goes too."""
    return output.parent if output.suffix == ".json" else output


@dataclass
class _LmEvalArgs:
    """What the pre-checks need of an lm-eval ``run`` command line, read by lm-eval's own parser."""

    model: str | None = None
    model_args: dict[str, Any] = field(default_factory=dict)
    flags: dict[str, str] = field(default_factory=dict)
    """Each model_args key and the flag it came with as typed (``--model_args`` or ``-a``)."""
    output_path: str | None = None
    include_path: str | None = None

    def flag(self, key: str | None = None) -> str:
        """The flag that gave ``key`` (the last model_args flag when ``key`` is None or came from none)."""
        if key is not None and key in self.flags:
            return self.flags[key]
        return next(reversed(self.flags.values()), "--model_args")


def _parse(argv: list[str]) -> _LmEvalArgs | None:
    """``argv`` parsed by lm-eval's own ``run`` parser, so that every form lm-eval takes is checked the way it reads
    it: ``--model_args a=1,b=2``, space-separated ``a=1 b=2``, a JSON object, ``-a``, ``--model_args=``, several
    flags merged, values converted (``2`` an int, ``true`` a bool).  ``None`` for lm-eval's other subcommands (``ls``,
    ``validate``), which take no model.

    The parser is a fresh one built here whose model_args action also records the flag each key came with, so a
    message names ``-a`` when the user typed ``-a``.  A line lm-eval's parser refuses exits 2 here with lm-eval's own
    message, as lm-eval would."""
    import argparse

    from lm_eval._cli.ls import List
    from lm_eval._cli.run import Run
    from lm_eval._cli.utils import MergeDictAction
    from lm_eval._cli.validate import Validate

    root = argparse.ArgumentParser(prog="lm-eval")
    subcommands = root.add_subparsers(dest="command")
    for command in (Run, List, Validate):  # HarnessCLI's subcommands, to tell `ls tasks` from a `run` line
        command.create(subcommands)
    # lm-eval's own rule (HarnessCLI.parse_args): a line with no subcommand is a `run`
    if argv and argv[0] in subcommands.choices:
        if argv[0] != "run" or len(argv) == 1:
            return None
        argv = argv[1:]
    elif len(argv) <= 1:
        return None
    parsed = _LmEvalArgs()

    class Recording(MergeDictAction):
        def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values: Any,
                     option_string: str | None = None) -> None:
            given = argparse.Namespace()
            super().__call__(parser, given, values, option_string)
            part = getattr(given, self.dest, None) or {}
            parsed.flags.update(dict.fromkeys(part, option_string or "--model_args"))
            setattr(namespace, self.dest, {**(getattr(namespace, self.dest, None) or {}), **part})

    run = subcommands.choices["run"]
    for action in run._actions:  # argparse offers no public way to reach an action once added
        if action.dest == "model_args":
            action.__class__ = Recording
    namespace = run.parse_args(argv)
    parsed.model = namespace.model
    parsed.model_args = dict(namespace.model_args or {})
    parsed.output_path = namespace.output_path
    parsed.include_path = namespace.include_path
    return parsed


def _check_task_experts(folder: str, flag: str, args: dict[str, Any]) -> None:
    """``task_experts=`` names a finished run with a fitted router, every file of it readable
    (:func:`moepatch.task_experts.run_folder.read_run`), trained on ``pretrained`` and with at least ``top_k``
    tasks: an unfinished or corrupt run is named (exit 1) before lm-eval loads its tasks and the model."""
    try:
        manifest_folder(folder)
    except ValueError as error:
        raise UsageError(flag, f"task_experts={folder}: {error}") from None
    try:
        manifest = read_run(folder)
    except ValueError as error:
        raise CommandError(f"{error} ({flag} task_experts)") from None
    router_config = manifest.folder / ROUTER_FOLDER / ROUTER_CONFIG
    if not router_config.is_file():
        raise UsageError(flag, f"task_experts={folder}: no fitted router in {manifest.folder / ROUTER_FOLDER}"
                               "; run `moepatch experts fit-router` first (each request is routed)")
    try:
        experts_match_base(manifest.base, str(args["pretrained"]), folder)
        tasks = json.loads(router_config.read_text()).get("tasks")
        if isinstance(tasks, list):  # a malformed router.json is named when the model loads it
            top_k_in_range(int(args["top_k"]), tasks)
    except ModelArgError as error:
        raise UsageError(flag, str(error)) from None
    except (OSError, ValueError, AttributeError):
        pass


def _check_model_args(parsed: _LmEvalArgs) -> dict[str, Any]:
    """The ``moepatch`` model's arguments checked by :func:`moepatch.evaluation.check_model_args` (the same checks
    the model runs when lm-eval builds it), each problem a usage error naming the flag as typed and the key."""
    try:
        values = check_model_args(parsed.model_args)
    except ModelArgError as error:
        raise UsageError(parsed.flag(error.key), str(error)) from None
    model_args = parsed.model_args
    if model_args.get("task_experts"):  # the whole run folder checked before lm-eval runs, its files named
        _check_task_experts(str(model_args["task_experts"]), parsed.flag("task_experts"), values)
    if model_args.get("moepatch_config"):  # its block is checked before lm-eval runs, named as given
        from moepatch.loading.block_file import read_moepatch_block

        named = MOEPATCH_CONFIG_ARG.replace("--model_args", parsed.flag("moepatch_config"))
        read_moepatch_block(str(model_args["moepatch_config"]), named)
    return values


def run_lm_eval(argv: list[str]) -> int:
    """lm-eval's CLI on ``argv`` with the ``moepatch`` model registered; then the routing statistics, if asked.

    The ``moepatch`` model's arguments are checked first (exit 2 naming the flag and key, before lm-eval loads any
    task); ``routing_stats=true`` without ``--output_path`` is refused too: the statistics would be computed and
    written nowhere."""
    from lm_eval.__main__ import cli_evaluate  # lm-eval's whole command line: only when it runs

    parsed = _parse(argv)
    output: Path | None = None
    if parsed is not None and parsed.model == "moepatch":  # other models' arguments are lm-eval's business
        values = _check_model_args(parsed)
        model_args = parsed.model_args
        output = Path(parsed.output_path) if parsed.output_path else None
        if output is not None:  # checked before lm-eval runs: a results folder that fails only after the evaluation
            inputs = {f"{parsed.flag(key)} {key}": str(model_args[key]) if model_args.get(key) else None
                      for key in ("pretrained", "task_experts", "moepatch_config")}
            inputs["--include_path"] = parsed.include_path
            refuse_output_in_inputs(output, "--output_path", inputs)
            check_writable_target(_results_folder(output), "--output_path")
        elif values["routing_stats"]:
            raise UsageError("--output_path", "routing_stats=true writes moepatch_routing_stats.json beside "
                                              "lm-eval's results: give --output_path")
    elif parsed is not None and parsed.output_path:
        output = Path(parsed.output_path)

    LAST_MODEL.clear()
    saved = sys.argv
    sys.argv = ["lm-eval", *argv]
    try:
        cli_evaluate()
    finally:
        sys.argv = saved
    model = LAST_MODEL[0] if LAST_MODEL else None
    if model is not None and (model.routing_stats or model.serving is not None):
        report = model.routing_report()
        if output is None:
            print(json.dumps(report["adapters"]))
        else:
            folder = _results_folder(output)
            write_text_atomically(folder / STATS_FILE, json.dumps(report, indent=1) + "\n")
            print(f"moepatch: routing statistics per lm-eval task -> {folder / STATS_FILE}")
    return 0
