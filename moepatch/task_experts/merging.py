"""Merge task experts into one adapter with peft's ``add_weighted_adapter`` (MELD's offline merge).

``cat`` concatenates the weighted ``A``'s and the ``B``'s along the rank axis: the merged ``ΔW`` is exactly
``Σ wᵢ·sᵢ·BᵢAᵢ`` and the rank is the sum of the ranks.  ``svd`` truncates that sum to ``--rank`` (default: the
largest expert rank) and loses what the truncation drops.  Experts on the fused routed experts (peft
``target_parameters``, which peft's merge refuses) are merged expert by expert in peft's own layout
(:mod:`moepatch.task_experts.weighted_adapters`); peft still merges every linear module.  Each merge is checked
module by module (expert by expert) against the sum computed from the experts' own files
(:mod:`moepatch.task_experts.adapter_files`), and the relative Frobenius error is reported — ``cat`` must be exact
to float rounding, ``svd`` says what it cost.

Merged adapters go to ``<experts>/merged/<name>/`` (a standard peft folder) and ``<experts>/merged/merges.json``
lists them (name, tasks, weights, method, rank, worst error).
"""

from __future__ import annotations

import json
import re
import shutil
import tempfile
from collections.abc import Sequence
from dataclasses import asdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from peft import PeftModel

from moepatch.data.instruction import read_jsonl_located
from moepatch.errors import FieldError
from moepatch.errors import Naming
from moepatch.staged_output import write_text_atomically
from moepatch.task_experts.adapter_files import adapter_config
from moepatch.task_experts.adapter_files import adapter_deltas
from moepatch.task_experts.adapter_files import module_shapes
from moepatch.task_experts.adapter_files import quiet_peft
from moepatch.task_experts.manifest import MERGES_FILE
from moepatch.task_experts.manifest import ExpertManifest
from moepatch.task_experts.weighted_adapters import add_weighted_adapter
from moepatch.validation import is_finite_number

METHODS = ("cat", "svd")
MERGE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]*")
"""A ``--name``: what a task name may be (moepatch's own merge names use ``+`` and ``~``)."""
CAT_TOLERANCE = 1e-4
"""Largest relative error a ``cat`` merge may show (float32 rounding of the stored factors is ~1e-7)."""


@dataclass
class MergeRequest:
    """One merge: tasks, their weights, the method, the rank (``svd`` only) and the adapter's name."""

    tasks: list[str]
    weights: list[float]
    method: str = "cat"
    rank: int | None = None
    name: str | None = None

    def adapter_name(self) -> str:
        """``--name``, else the tasks joined by ``+`` — with ``~<method>[-r<rank>]-w<weights ‰>`` unless this is
        the equal-weight ``cat`` merge (the one serving uses for a request routed to these tasks)."""
        if self.name:
            return self.name
        joined = "+".join(self.tasks)
        if self.method == "cat" and len(set(self.weights)) == 1 and self.weights[0] == 1.0 / len(self.tasks):
            return joined
        rank = f"-r{self.rank}" if self.rank is not None else ""
        weights = "_".join(f"{round(1000 * w)}" for w in self.weights)
        return f"{joined}~{self.method}{rank}-w{weights}"


@dataclass
class MergeResult:
    name: str
    tasks: list[str]
    weights: list[float]
    method: str
    rank: int
    path: str  # relative to the merged folder
    max_relative_error: float
    module_errors: dict[str, float]


def merged_rank(ranks: Sequence[int], request: MergeRequest) -> int:
    """The merged adapter's rank: the sum of the ranks (``cat``), else ``--rank`` or the largest rank (``svd``)."""
    if request.method == "cat":
        return sum(ranks)
    return request.rank if request.rank is not None else max(ranks)


def check_request(manifest: ExpertManifest, request: MergeRequest, max_lora_rank: int | None = None) -> int:
    """Every problem of ``request`` as a :class:`~moepatch.errors.FieldError` naming the request's field (``tasks``,
    ``weights``, ``method``, ``rank``, ``name``) or ``max_lora_rank``, before anything is loaded; returns the merged
    rank."""
    manifest.check_tasks(request.tasks, "tasks")
    if len(request.tasks) < 2:
        raise FieldError("tasks", f"a merge needs two experts or more, got {request.tasks}")
    if len(request.weights) != len(request.tasks):
        raise FieldError("weights", f"{len(request.weights)} weight(s) {request.weights} for {len(request.tasks)} "
                                    f"tasks {request.tasks}")
    if not all(isinstance(w, (int, float)) and w == w and abs(w) != float("inf") for w in request.weights):
        raise FieldError("weights", f"expected finite numbers, got {request.weights}")
    if max(abs(w) for w in request.weights) < 1e-6:
        raise FieldError("weights", f"all zero or below 1e-6 in magnitude ({request.weights}): the merged adapter "
                                    "would change nothing")
    if max(abs(w) for w in request.weights) > 1e6:
        raise FieldError("weights", f"{request.weights} has a weight above 1e6 in magnitude: the merged factors "
                                    "would overflow float32")
    if request.method not in METHODS:
        raise FieldError("method", f"expected one of {METHODS}, got {request.method!r}")
    if request.rank is not None and request.method != "svd":
        raise FieldError("rank", "only an svd merge has a chosen rank (cat's is the sum of the ranks)")
    if request.rank is not None and request.rank < 1:
        raise FieldError("rank", f"expected an integer >= 1, got {request.rank}")
    experts = [manifest.expert(task) for task in request.tasks]
    fused = {tuple(sorted(expert.target_parameters or ())) for expert in experts}
    if len(fused) > 1:
        raise FieldError("tasks", f"the experts adapt different fused routed-expert parameters ({sorted(fused)}); "
                                  "only experts with the same target_parameters merge (peft loads them together only "
                                  "then)")
    targets = {tuple(sorted(expert.target_modules)) for expert in experts}
    if len(targets) > 1:
        raise FieldError("tasks", f"the experts adapt different modules ({sorted(targets)}); peft merges only "
                                  "adapters with the same target modules")
    if request.name is not None and (not MERGE_NAME.fullmatch(request.name) or request.name in manifest.tasks
                                     or request.name == "__base__"):
        raise FieldError("name", f"{request.name!r} must be letters, digits, '_', '-' (no '+', '~', '.', '/': those "
                                 "mark moepatch's own names) and not a task's name")
    configs = {task: adapter_config(manifest.expert_path(task)) for task in request.tasks}
    rslora = [task for task, config in configs.items() if config.get("use_rslora")]
    if rslora:
        raise FieldError("tasks", f"the experts of {rslora} use rsLoRA; peft's merge gives the merged adapter "
                                  "scaling √r (not 1) on top of the weighted factors, so its sum would be off by that "
                                  "factor")
    patterned = [task for task, config in configs.items() if config.get("target_parameters")
                 and (config.get("rank_pattern") or config.get("alpha_pattern"))]
    if patterned:
        raise FieldError("tasks", f"the experts of {patterned} combine target_parameters with rank_pattern / "
                                  "alpha_pattern, which this merge does not model")
    if request.rank is not None and request.rank > sum(expert.rank for expert in experts):
        raise FieldError("rank", f"{request.rank} exceeds the sum of the experts' ranks "
                                 f"{sum(expert.rank for expert in experts)}: their weighted sum has no higher rank")
    if request.rank is not None:
        shapes = {module: shape for task in request.tasks
                  for module, shape in module_shapes(manifest.expert_path(task)).items()}
        narrowest = min(shapes.items(), key=lambda item: min(item[1]), default=None)
        if narrowest is not None and request.rank > min(narrowest[1]):
            raise FieldError("rank", f"{request.rank} exceeds the smaller side of {narrowest[0]} "
                                     f"({narrowest[1][0]}×{narrowest[1][1]}): peft's svd merge cannot give it that "
                                     "rank")
    rank = merged_rank([expert.rank for expert in experts], request)
    if max_lora_rank is not None and rank > max_lora_rank:
        ranks, name, cat = [e.rank for e in experts], request.adapter_name(), request.method == "cat"

        def too_large(field: Naming) -> str:
            detail = f"the sum of the ranks {ranks}" if cat else f"{field('rank')} {rank}"
            return (f"the merged adapter {name!r} has rank {rank} ({detail}), more than {field('max_lora_rank')} "
                    f"{max_lora_rank}; merge fewer experts, use {field('method')} svd {field('rank')} R, or raise "
                    f"{field('max_lora_rank')}")

        raise FieldError("max_lora_rank", too_large)
    return rank


def relative_errors(expected: dict[str, torch.Tensor], merged: dict[str, torch.Tensor]) -> dict[str, float]:
    """``‖merged − expected‖_F / ‖expected‖_F`` per module (0 where both are zero)."""
    if set(expected) != set(merged):
        missing, extra = sorted(set(expected) - set(merged)), sorted(set(merged) - set(expected))
        raise ValueError(f"merged adapter modules differ from the experts': missing {missing[:3]}, extra {extra[:3]}")
    errors = {}
    for module, target in expected.items():
        norm = torch.linalg.matrix_norm(target).item()
        difference = torch.linalg.matrix_norm(merged[module] - target).item()
        errors[module] = difference / norm if norm > 0 else difference
    return errors


def expected_deltas(manifest: ExpertManifest, request: MergeRequest) -> dict[str, torch.Tensor]:
    """``Σ wᵢ·sᵢ·BᵢAᵢ`` per module from the experts' files (float64)."""
    total: dict[str, torch.Tensor] = {}
    for task, weight in zip(request.tasks, request.weights, strict=True):
        for module, delta in adapter_deltas(manifest.expert_path(task)).items():
            total[module] = total[module] + weight * delta if module in total else weight * delta
    return total


def load_experts(base: torch.nn.Module, manifest: ExpertManifest, tasks: Sequence[str]) -> Any:
    """A ``PeftModel`` over ``base`` with the experts of ``tasks`` loaded under their task names."""
    manifest.check_base(base.config, "the base model")
    with quiet_peft():
        model = PeftModel.from_pretrained(base, str(manifest.expert_path(tasks[0])), adapter_name=tasks[0])
        for task in tasks[1:]:
            model.load_adapter(str(manifest.expert_path(task)), adapter_name=task)
    return model


def merge_loaded(model: Any, manifest: ExpertManifest, request: MergeRequest, output: Path) -> MergeResult:
    """Merge ``request`` in a ``PeftModel`` holding its experts, write it to ``output / name`` and check it."""
    name = request.adapter_name()
    add_weighted_adapter(model, list(request.tasks), [float(w) for w in request.weights], name, request.method,
                         request.rank)
    try:
        with tempfile.TemporaryDirectory(dir=output, prefix=".writing-") as scratch:
            model.save_pretrained(scratch, selected_adapters=[name])
            written = Path(scratch) / name if (Path(scratch) / name).is_dir() else Path(scratch)
            errors = relative_errors(expected_deltas(manifest, request), adapter_deltas(written))
            worst = max(errors.values())
            _record_base(written, manifest.base)
            if request.method == "cat" and worst > CAT_TOLERANCE:
                raise ValueError(f"cat merge {name!r}: relative error {worst:.2e} > {CAT_TOLERANCE} against the sum "
                                 "of the experts' deltas (peft's cat should be exact); nothing written")
            target = output / name
            if target.exists():
                shutil.rmtree(target)
            shutil.move(str(written), str(target))
    finally:
        model.delete_adapter(name)
    rank = adapter_config(target)["r"]
    return MergeResult(name, list(request.tasks), [float(w) for w in request.weights], request.method, rank, name,
                       worst, errors)


def _record_base(adapter: Path, base: str) -> None:
    """The merged adapter names the experts' base (the manifest's), whatever base an expert's own config named:
    peft copies the first expert's ``base_model_name_or_path``."""
    path = adapter / "adapter_config.json"
    config = json.loads(path.read_text())
    config["base_model_name_or_path"] = base
    write_text_atomically(path, json.dumps(config, indent=2, sort_keys=True) + "\n")


def write_merges(output: Path, results: Sequence[MergeResult]) -> Path:
    """Add ``results`` to ``output/merges.json`` (a later merge of the same name replaces the earlier entry)."""
    path = output / MERGES_FILE
    entries = json.loads(path.read_text()) if path.is_file() else []
    names = {result.name for result in results}
    entries = [entry for entry in entries if entry["name"] not in names]
    entries += [{key: value for key, value in asdict(result).items() if key != "module_errors"} for result in results]
    write_text_atomically(path, json.dumps(entries, indent=1) + "\n")
    return path


def read_merges(output: Path) -> list[dict[str, Any]]:
    path = output / MERGES_FILE
    return json.loads(path.read_text()) if path.is_file() else []


def combination_key(tasks: Sequence[str], weights: Sequence[float]) -> tuple[str, ...]:
    """What makes two merges the same adapter: the task set when the weights are equal (order does not matter),
    else the tasks in order (the weights follow the router's ranking)."""
    return tuple(sorted(tasks)) if len(set(weights)) == 1 else tuple(tasks)


def route_tasks(where: str, record: Any) -> list[str]:
    """The chosen tasks of one line of a ``route`` output, its ``weights`` (when present) checked with them:
    ``ValueError`` naming ``where`` (file:line)."""
    tasks = record.get("tasks")
    if not isinstance(tasks, list) or not all(isinstance(task, str) for task in tasks) or not tasks:
        raise ValueError(f"{where}: expected a non-empty 'tasks' list of names, got {tasks!r}")
    routed = record.get("weights")
    if routed is not None and (not isinstance(routed, list) or len(routed) != len(tasks)
                               or not all(is_finite_number(w) and w >= 0 for w in routed) or not any(routed)):
        raise ValueError(f"{where}: 'weights' must be {len(tasks)} finite numbers >= 0, not all zero (one per "
                         f"task), got {routed!r}")
    return tasks


def combinations_from_routes(path: Path, weights: Sequence[float] | None,
                             known: Sequence[str] | None = None) -> list[MergeRequest]:
    """One ``cat`` request per distinct task combination in a ``route`` output (jsonl with ``"tasks"`` per line,
    best first), as MELD merged every pair its router produced; ``weights`` by rank (the top task's first) or equal
    ``1/k`` — then a pair is one adapter whatever its order."""
    seen: dict[tuple[str, ...], MergeRequest] = {}
    for where, record in read_jsonl_located(path):
        tasks = route_tasks(where, record)
        if len(set(tasks)) != len(tasks):
            raise ValueError(f"{where}: a task appears twice in {tasks}")
        unknown = [task for task in tasks if known is not None and task not in known]
        if unknown:
            raise ValueError(f"{where}: unknown task(s) {unknown}; the experts are {list(known or [])}")
        if len(tasks) < 2:
            continue
        chosen = list(weights) if weights is not None else [1.0 / len(tasks)] * len(tasks)
        if len(chosen) != len(tasks):
            raise FieldError("weights", f"{len(chosen)} weight(s) for the {len(tasks)} tasks of {where}")
        key = combination_key(tasks, chosen)
        if key not in seen:
            seen[key] = MergeRequest(list(key) if key != tuple(tasks) else list(tasks), chosen)
    if not seen:
        raise ValueError(f"{path}: no request with two or more tasks (route with `moepatch experts route --top-k 2` "
                         "or more)")
    return list(seen.values())
