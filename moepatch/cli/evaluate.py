"""``moepatch eval <lm-eval arguments>``: lm-eval's own command line with the ``moepatch`` model registered
(:mod:`moepatch.evaluation`), its moepatch arguments checked before lm-eval runs, and the routing statistics written
after it.

lm-eval has no plugin discovery, so the model is registered by importing :mod:`moepatch.evaluation` before lm-eval's
CLI parses ``--model``.  Every problem of an argument names lm-eval's flag (``--model_args``, ``--output_path``).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from moepatch.errors import CommandError
from moepatch.errors import UsageError
from moepatch.evaluation import LAST_MODEL
from moepatch.evaluation import STATS_FILE
from moepatch.evaluation import switch_value
from moepatch.evaluation import unknown_model_args
from moepatch.staged_output import check_writable_target
from moepatch.staged_output import refuse_output_in_inputs
from moepatch.staged_output import write_text_atomically
from moepatch.task_experts.manifest import ROUTER_CONFIG
from moepatch.task_experts.manifest import ROUTER_FOLDER
from moepatch.task_experts.manifest import manifest_folder
from moepatch.task_experts.run_folder import read_run

MOEPATCH_CONFIG_ARG = "--model_args moepatch_config"
"""How a message names the ``moepatch_config=`` file of ``--model_args``."""


def _option_value(argv: list[str], option: str, short: str | None = None) -> str | None:
    """The value of ``option`` (or its ``short`` spelling) on an lm-eval command line; ``None`` when absent."""
    for index, token in enumerate(argv):
        if token in (option, short) and index + 1 < len(argv):
            return argv[index + 1]
        if token.startswith(f"{option}="):
            return token.split("=", 1)[1]
    return None


def _output_path(argv: list[str]) -> Path | None:
    value = _option_value(argv, "--output_path", "-o")
    return Path(value) if value is not None else None


def _results_folder(output: Path) -> Path:
    """The folder lm-eval writes its results into (beside a ``.json`` ``--output_path``, else inside it), where
    :data:`STATS_FILE` goes too."""
    return output.parent if output.suffix == ".json" else output


def _model_args(argv: list[str]) -> dict[str, str]:
    """``--model_args key=value,...`` of an lm-eval command line (empty when absent)."""
    text = ""
    for index, token in enumerate(argv):
        if token == "--model_args" and index + 1 < len(argv):
            text = argv[index + 1]
        elif token.startswith("--model_args="):
            text = token.split("=", 1)[1]
    pairs = (item.split("=", 1) for item in text.split(",") if "=" in item)
    return {key.strip(): value.strip() for key, value in pairs}


def _check_task_experts(folder: str) -> None:
    """``task_experts=`` names a finished run with a fitted router, every file of it readable
    (:func:`moepatch.task_experts.run_folder.read_run`): an unfinished or corrupt run is named (exit 1) before
    lm-eval loads its tasks and the model."""
    try:
        manifest_folder(folder)
    except ValueError as error:
        raise UsageError("--model_args", f"task_experts={folder}: {error}") from None
    try:
        manifest = read_run(folder)
    except ValueError as error:
        raise CommandError(f"{error} (--model_args task_experts)") from None
    if not (manifest.folder / ROUTER_FOLDER / ROUTER_CONFIG).is_file():
        raise UsageError("--model_args", f"task_experts={folder}: no fitted router in {manifest.folder / ROUTER_FOLDER}"
                                         "; run `moepatch experts fit-router` first (each request is routed)")


def run_lm_eval(argv: list[str]) -> int:
    """lm-eval's CLI on ``argv`` with the ``moepatch`` model registered; then the routing statistics, if asked.

    ``routing_stats=true`` without ``--output_path`` is refused before anything runs: the statistics would be
    computed and written nowhere."""
    from lm_eval.__main__ import cli_evaluate  # lm-eval's whole command line: only when it runs

    model_args = _model_args(argv)
    problem = unknown_model_args(model_args)
    if problem is not None:
        raise UsageError("--model_args", problem)
    for key, kind in (("pretrained", "folder"), ("task_experts", "folder"), ("moepatch_config", "file")):
        value = model_args.get(key)
        if value and not (Path(value).is_dir() if kind == "folder" else Path(value).is_file()):
            raise UsageError("--model_args", f"{key}={value}: no such {kind}")
    if model_args.get("task_experts"):  # the whole run folder checked before lm-eval runs, its files named
        _check_task_experts(model_args["task_experts"])
    if model_args.get("moepatch_config"):  # its block is checked before lm-eval runs, named as given
        from moepatch.loading.block_file import read_moepatch_block

        read_moepatch_block(model_args["moepatch_config"], MOEPATCH_CONFIG_ARG)
    output = _output_path(argv)
    if output is not None:  # checked before lm-eval runs: a results folder that fails only after the evaluation
        inputs = {f"--model_args {key}": model_args.get(key) or None
                  for key in ("pretrained", "task_experts", "moepatch_config")}
        inputs["--include_path"] = _option_value(argv, "--include_path")
        refuse_output_in_inputs(output, "--output_path", inputs)
        check_writable_target(_results_folder(output), "--output_path")
    stats = _model_args(argv).get("routing_stats")
    if stats is not None and _output_path(argv) is None:
        try:
            wanted = switch_value(stats)
        except ValueError as error:
            raise UsageError("--model_args", str(error)) from None
        if wanted:
            raise UsageError("--output_path", "routing_stats=true writes moepatch_routing_stats.json beside "
                                              "lm-eval's results: give --output_path")

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
        output = _output_path(argv)
        if output is None:
            print(json.dumps(report["adapters"]))
        else:
            folder = _results_folder(output)
            write_text_atomically(folder / STATS_FILE, json.dumps(report, indent=1) + "\n")
            print(f"moepatch: routing statistics per lm-eval task -> {folder / STATS_FILE}")
    return 0
