"""lm-eval model ``moepatch``: a checkpoint loaded patched, optionally routing each request to its task experts.

``moepatch eval <lm-eval arguments>`` (:mod:`moepatch.cli.evaluate`) registers the model by importing this module and
runs lm-eval's own command line::

    moepatch eval --model moepatch --model_args pretrained=./ckpt,task_experts=./run,routing_stats=true \\
        --tasks my_task --include_path ./tasks --device cpu --output_path ./results

``--model_args``: ``pretrained`` (checkpoint folder; its config.json's moepatch block is applied),
``moepatch_config`` (a JSON file whose moepatch block replaces the checkpoint's), ``task_experts`` (a ``finetune
--task_experts`` output with a fitted router: every request is routed on its context and answered by its expert,
or by the equal-weight ``cat`` merge of its top-k experts), ``top_k`` (default 2), ``routing_stats`` (per lm-eval
task expert loads of the base MoE, written to ``<output_path>/moepatch_routing_stats.json``), and every argument
of lm-eval's ``hf`` model.
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Callable
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from lm_eval.api.registry import register_model
from lm_eval.models.huggingface import HFLM
from transformers import AutoTokenizer

import moepatch
from moepatch.config import write_config
from moepatch.errors import first_line
from moepatch.loading.block_file import read_moepatch_block
from moepatch.loading.pretrained import load_config
from moepatch.routing.recorder import RoutingRecorder
from moepatch.task_experts.serving import TaskExpertModel

STATS_FILE = "moepatch_routing_stats.json"
LAST_MODEL: list[MoePatchLM] = []
"""The model lm-eval's CLI built in this process (``moepatch eval`` writes its statistics after the run)."""


class ModelArgError(ValueError):
    """One bad model argument; the message starts with its key (``top_k: expected an integer, got 'x'``).

    The same check runs twice: in ``moepatch eval`` before lm-eval starts (the message then follows the flag the user
    typed, ``--model_args`` or ``-a``: exit 2 before any task loads) and when lm-eval builds the model from Python
    (after ``moepatch model_args:``), so the two can never disagree."""

    def __init__(self, key: str, message: str) -> None:
        self.key = key
        super().__init__(message)


def switch_value(value: Any, key: str = "routing_stats") -> bool:
    """A true / false model argument as lm-eval passes it: text from a Python ``model_args`` string, a bool (or 0 /
    1) once lm-eval's CLI has converted ``true`` / ``1``; anything else names ``key``."""
    if isinstance(value, bool):
        return value
    if str(value).lower() in ("true", "1", "yes"):
        return True
    if str(value).lower() in ("false", "0", "no"):
        return False
    raise ModelArgError(key, f"{key}: expected true or false, got {value!r}")


def integer_value(value: Any, key: str, minimum: int | None = None) -> int:
    """An integer model argument: an int (lm-eval's CLI converts ``2``, and ``-1`` to a float), or its text from
    Python; a bool or a fraction is refused rather than silently truncated."""
    number: int | None = None
    if isinstance(value, int) and not isinstance(value, bool):
        number = value
    elif isinstance(value, float) and value.is_integer():
        number = int(value)
    elif isinstance(value, str):
        with contextlib.suppress(ValueError):
            number = int(value.strip())
    if number is None:
        raise ModelArgError(key, f"{key}: expected an integer, got {value!r}")
    if minimum is not None and number < minimum:
        raise ModelArgError(key, f"{key}: expected an integer >= {minimum}, got {number}")
    return number


def top_k_in_range(top_k: int, tasks: list[str]) -> None:
    """``top_k`` merges at most every task the router knows: more would fail on the first request."""
    if not 1 <= top_k <= len(tasks):
        raise ModelArgError("top_k", f"top_k: expected 1..{len(tasks)} (the router's tasks), got {top_k}")


def experts_match_base(base: str | Path, pretrained: str, task_experts: str) -> None:
    """Task experts evaluated on another base than they were trained on would score a model nobody trained."""
    if Path(base).resolve() != Path(pretrained).resolve():
        raise ModelArgError("task_experts", f"the task experts in {task_experts} were trained on {base}, not on "
                                            f"pretrained={pretrained}")


def load_patched(pretrained: str, moepatch_config: str | None = None) -> torch.nn.Module:
    """The checkpoint loaded with its moepatch block applied, or with ``moepatch_config``'s block instead."""
    try:
        check_model_args({"pretrained": pretrained, "moepatch_config": moepatch_config})
    except ModelArgError as error:
        raise ValueError(f"moepatch model_args: {error}") from None
    config = load_config(pretrained)
    if moepatch_config:
        write_config(config, read_moepatch_block(moepatch_config, MOEPATCH_CONFIG_ARG))
    try:
        return moepatch.from_pretrained(pretrained, config=config)
    except Exception as error:  # safetensors' own error for a truncated or corrupt file names no file
        if "safetensor" not in type(error).__name__.lower():
            raise
        text = first_line(error)
        raise ValueError(f"moepatch model_args: pretrained={pretrained}: its *.safetensors weights cannot be read "
                         f"({text})") from None


@register_model("moepatch")
class MoePatchLM(HFLM):
    """lm-eval's HF model over a moepatch-patched checkpoint (see the module docstring)."""

    def __init__(self, pretrained: str, moepatch_config: str | None = None, task_experts: str | None = None,
                 top_k: int | str = 2, routing_stats: bool | str = False, **kwargs: Any) -> None:
        try:  # the checks `moepatch eval` ran before lm-eval started; again for lm-eval called from Python
            values = check_model_args({"pretrained": pretrained, "moepatch_config": moepatch_config,
                                       "task_experts": task_experts, "top_k": top_k, "routing_stats": routing_stats,
                                       **kwargs})
            self.routing_stats = bool(values["routing_stats"])
            self.top_k = int(values["top_k"])
            self.serving = None
            if task_experts:
                self.serving = TaskExpertModel.from_experts(task_experts)
                router = self.serving.router
                assert router is not None  # from_experts (with_router=True) loads it or raises
                top_k_in_range(self.top_k, router.tasks)
                experts_match_base(self.serving.manifest.base, pretrained, task_experts)
        except ModelArgError as error:
            raise ValueError(f"moepatch model_args: {error}") from None
        if self.serving is not None:
            model = self.serving.model.get_base_model()  # peft's layers are inside it; the active adapter applies
        else:
            model = load_patched(pretrained, moepatch_config)
        kwargs.pop("tokenizer", None)
        tokenizer = AutoTokenizer.from_pretrained(pretrained)
        super().__init__(pretrained=model, tokenizer=tokenizer, **kwargs)
        self.stats: dict[str, dict[str, Any]] = {}
        self.adapter_uses: dict[str, dict[str, int]] = {}
        LAST_MODEL[:] = [self]

    # ------------------------------------------------------------------ routing per request
    @contextlib.contextmanager
    def _adapter(self, name: str | None) -> Iterator[None]:
        if self.serving is None or name is None:
            yield
            return
        if name == "__base__":
            with self.serving.model.disable_adapter():
                yield
            return
        self.serving.model.set_adapter(name)
        yield

    @contextlib.contextmanager
    def _recording(self, task: str | None) -> Iterator[None]:
        if not self.routing_stats:
            yield
            return
        recorder = RoutingRecorder(self.model)
        with recorder:
            yield
        entry = self.stats.setdefault(task or "unknown", {"tokens": 0, "counts": None, "layers": recorder.layers})
        counts = recorder.counts.to(torch.float64)
        entry["counts"] = counts if entry["counts"] is None else entry["counts"] + counts
        entry["tokens"] += int(recorder.tokens.max().item()) if recorder.tokens.numel() else 0

    def _adapters_of(self, requests: list[Any]) -> list[str | None]:
        if self.serving is None:
            return [None] * len(requests)
        contexts = [request.args[0] for request in requests]
        unique = list(dict.fromkeys(contexts))
        routes = dict(zip(unique, self.serving.route(unique, self.top_k), strict=True))
        return [self.serving.adapter_for(routes[context]) for context in contexts]

    def _grouped(self, method: Callable[..., list[Any]], requests: list[Any], **kwargs: Any) -> list[Any]:
        """Run ``method`` (the parent's) on the requests of each (adapter, lm-eval task) group, in request order."""
        adapters = self._adapters_of(requests)
        keys = [(adapter, getattr(request, "task_name", None))
                for adapter, request in zip(adapters, requests, strict=True)]
        results: list[Any] = [None] * len(requests)
        for key in dict.fromkeys(keys):
            rows = [i for i, k in enumerate(keys) if k == key]
            adapter, task = key
            if adapter is not None:
                uses = self.adapter_uses.setdefault(task or "unknown", {})
                uses[adapter] = uses.get(adapter, 0) + len(rows)
            with self._adapter(adapter), self._recording(task):
                for row, result in zip(rows, method([requests[i] for i in rows], **kwargs), strict=True):
                    results[row] = result
        return results

    def loglikelihood(self, requests: list[Any], disable_tqdm: bool = False) -> list[Any]:
        return self._grouped(super().loglikelihood, requests, disable_tqdm=disable_tqdm)

    def loglikelihood_rolling(self, requests: list[Any], disable_tqdm: bool = False) -> list[Any]:
        return self._grouped(super().loglikelihood_rolling, requests, disable_tqdm=disable_tqdm)

    def generate_until(self, requests: list[Any], disable_tqdm: bool = False) -> list[Any]:
        return self._grouped(super().generate_until, requests, disable_tqdm=disable_tqdm)

    # ------------------------------------------------------------------ statistics
    def routing_report(self) -> dict[str, Any]:
        """Per lm-eval task: tokens seen and each MoE layer's expert load (share of the choices); the adapters
        requests were routed to."""
        tasks = {}
        for task, entry in self.stats.items():
            counts = entry["counts"]
            loads = counts / counts.sum(dim=1, keepdim=True).clamp(min=1)
            tasks[task] = {"tokens": entry["tokens"], "layers": entry["layers"], "expert_load": loads.tolist()}
        return {"tasks": tasks, "adapters": self.adapter_uses,
                "note": "counted over every token lm-eval ran through the model (its loglikelihood batches pass no "
                        "attention mask, so padding in batches > 1 counts too)"}


MOEPATCH_MODEL_ARGS = ("pretrained", "moepatch_config", "task_experts", "top_k", "routing_stats")
MOEPATCH_CONFIG_ARG = "model_args moepatch_config"
"""How a message names the ``moepatch_config=`` file of the model's arguments."""
MODEL_ARG_DEFAULTS: dict[str, Any] = {"top_k": 2, "routing_stats": False}
PATH_ARGS = {"pretrained": "folder", "moepatch_config": "file", "task_experts": "folder"}
"""moepatch's path arguments and what each must name (checked before anything loads)."""


def _hf_args() -> set[str]:
    return set(inspect.signature(HFLM.__init__).parameters) - {"self", "args", "kwargs"}


def unknown_model_args(names: Any) -> str | None:
    """Why ``names`` (model_args keys, beside moepatch's own) are not all arguments of lm-eval's HF model, or None."""
    unknown = sorted(set(names) - _hf_args() - set(MOEPATCH_MODEL_ARGS))
    if not unknown:
        return None
    return (f"unknown argument(s) {unknown}; moepatch takes {', '.join(MOEPATCH_MODEL_ARGS)}, and lm-eval's HF "
            f"model the arguments of HFLM ({', '.join(sorted(_hf_args())[:8])}, ...)")


def _hf_typed_args() -> dict[str, str]:
    """HFLM's arguments that take only an integer or only a switch (``max_length``, ``trust_remote_code``, ...):
    HFLM passes them on unchecked, so a typo fails deep in transformers (or, for a switch, any text is true)."""
    kinds = {}
    for name, parameter in inspect.signature(HFLM.__init__).parameters.items():
        annotation = str(parameter.annotation).replace("Optional[int]", "int | None")
        annotation = annotation.replace("Optional[bool]", "bool | None")
        if annotation in ("int", "int | None"):
            kinds[name] = "int"
        elif annotation in ("bool", "bool | None"):
            kinds[name] = "bool"
    return kinds


def check_model_args(args: dict[str, Any]) -> dict[str, Any]:
    """Every model argument of the ``moepatch`` model checked, each problem a :class:`ModelArgError` naming its key;
    ``top_k`` and ``routing_stats`` returned as the model uses them (their defaults filled in).

    One definition for both callers: ``moepatch eval`` runs it on lm-eval's own parse of ``--model_args`` before
    lm-eval starts, :class:`MoePatchLM` when lm-eval builds it (from Python too).  Values are what lm-eval passes:
    its CLI has already turned ``2`` into an int and ``true`` into a bool; from Python they may still be text."""
    problem = unknown_model_args(args)
    if problem is not None:  # HFLM would swallow them: a typo of task_experts= would evaluate the base model
        raise ModelArgError(min(set(args) - _hf_args() - set(MOEPATCH_MODEL_ARGS)), problem)
    if args.get("pretrained") in (None, ""):
        raise ModelArgError("pretrained", "pretrained: required: the checkpoint folder to evaluate")
    for key, kind in PATH_ARGS.items():
        value = args.get(key)
        if value in (None, ""):
            continue
        if not isinstance(value, str | Path):
            value = str(value)  # lm-eval's CLI turns a folder named 7 into the int 7
        if not (Path(value).is_dir() if kind == "folder" else Path(value).is_file()):
            raise ModelArgError(key, f"{key}={value}: no such {kind}")
    if args.get("task_experts") and args.get("moepatch_config"):
        raise ModelArgError("moepatch_config", "task_experts load the base their manifest names; moepatch_config "
                                               "does not apply to them")
    values = {**MODEL_ARG_DEFAULTS, **{key: value for key, value in args.items() if value is not None}}
    values["top_k"] = integer_value(values["top_k"], "top_k", minimum=1)
    values["routing_stats"] = switch_value(values["routing_stats"], "routing_stats")
    for key, kind in _hf_typed_args().items():
        if args.get(key) is not None:
            values[key] = integer_value(args[key], key) if kind == "int" else switch_value(args[key], key)
    return values
