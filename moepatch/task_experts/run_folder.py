"""One reader of a task-experts run folder (``OUT/experts``), used by every command that reads a run.

It validates the whole run once, before any model is loaded, and names the file (and the field) of the first
problem:

* ``manifest.json``: every field, and whether the run finished (:func:`moepatch.task_experts.manifest.read_manifest`);
* each expert: ``adapter_config.json`` (JSON, a LoRA, its rank and alpha those of the manifest, its base the
  manifest's) and ``adapter_model.safetensors`` (a complete header — a truncated file is caught here, without
  reading a tensor — holding LoRA pairs whose shapes agree with the config's rank);
* the fitted router: ``router.json`` against ``router.safetensors`` (the head's tensors, their shapes) and the
  manifest (the same tasks);
* the merged adapters: ``merged/merges.json`` against the folders beside it (every entry has its adapter, every
  adapter folder is listed, every task is an expert of the run).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from moepatch.task_experts.adapter_files import ADAPTER_CONFIG
from moepatch.task_experts.adapter_files import ADAPTER_WEIGHTS
from moepatch.task_experts.adapter_files import lora_keys
from moepatch.task_experts.manifest import MERGED_FOLDER
from moepatch.task_experts.manifest import MERGES_FILE
from moepatch.task_experts.manifest import ROUTER_CONFIG
from moepatch.task_experts.manifest import ROUTER_FOLDER
from moepatch.task_experts.manifest import ROUTER_WEIGHTS
from moepatch.task_experts.manifest import ExpertManifest
from moepatch.task_experts.manifest import read_manifest
from moepatch.validation import is_finite_number
from moepatch.validation import safetensors_shapes

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")
"""The JSON files of the tokenizer a run saves beside its manifest."""
HEAD_TENSORS: dict[str, dict[str, tuple[str, ...]]] = {
    "centroid": {"centroids": ("tasks", "width")},
    "retrieval": {"descriptions": ("tasks", "width")},
    "contrastive": {"projection": ("projected", "width"), "task_embeddings": ("tasks", "projected"),
                    "mean": ("width",)},
    "linear": {"weight": ("tasks", "width"), "bias": ("tasks",), "mean": ("width",), "std": ("width",)},
}
"""The tensors ``router.safetensors`` holds for each head, with the named sizes their dimensions must share."""


def read_json_file(path: Path) -> Any:
    """A JSON file's content; ``ValueError`` naming the file (missing, unreadable, not JSON)."""
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise ValueError(f"{path}: missing") from None
    except (OSError, UnicodeDecodeError) as error:
        raise ValueError(f"{path}: cannot be read ({getattr(error, 'strerror', None) or error})") from None
    except json.JSONDecodeError as error:
        raise ValueError(f"{path}: not JSON (line {error.lineno}: {error.msg})") from None


def check_expert(manifest: ExpertManifest, task: str) -> None:
    """The expert of ``task``: its config and its weights' header agree with each other and with the manifest."""
    expert = manifest.expert(task)
    folder = manifest.expert_path(task)
    config_path = folder / ADAPTER_CONFIG
    config = read_json_file(config_path)
    if not isinstance(config, dict) or config.get("peft_type") != "LORA":
        raise ValueError(f"{config_path}: not a peft LoRA config (peft_type "
                         f"{config.get('peft_type') if isinstance(config, dict) else None!r})")
    if config.get("r") != expert.rank:
        raise ValueError(f"{config_path}: r: {config.get('r')!r}, but manifest.json records rank {expert.rank} for "
                         f"task {task!r}")
    alpha = config.get("lora_alpha")
    if not isinstance(alpha, (int, float)) or not math.isclose(float(alpha), float(expert.alpha)):
        raise ValueError(f"{config_path}: lora_alpha: {alpha!r}, but manifest.json records {expert.alpha} for "
                         f"task {task!r}")
    base = config.get("base_model_name_or_path")
    if base not in (None, manifest.base) and Path(str(base)).resolve() != Path(manifest.base).resolve():
        raise ValueError(f"{config_path}: base_model_name_or_path: {base!r}, but the run's experts were trained on "
                         f"{manifest.base} (manifest.json 'base')")
    shapes = safetensors_shapes(folder / ADAPTER_WEIGHTS)
    pairs = list(lora_keys(shapes))
    if not pairs:
        raise ValueError(f"{folder / ADAPTER_WEIGHTS}: no LoRA weights (no '.lora_A.weight' key)")
    patterned = bool(config.get("rank_pattern")) or bool(config.get("target_parameters"))
    for module, a_key, b_key in pairs:
        a, b = shapes[a_key], shapes.get(b_key)
        if b is None or len(a) != 2 or len(b) != 2 or b[1] != a[0]:
            raise ValueError(f"{folder / ADAPTER_WEIGHTS}: {module}: lora_A {a} has no matching lora_B "
                             f"({b_key}: {b})")
        if not patterned and a[0] != expert.rank:
            raise ValueError(f"{folder / ADAPTER_WEIGHTS}: {module}: rank {a[0]}, but {ADAPTER_CONFIG} says "
                             f"r={expert.rank}")


def check_router(folder: Path, tasks: list[str]) -> dict[str, Any]:
    """``router.json`` against ``router.safetensors`` and the run's tasks; returns ``router.json``'s content."""
    config_path, weights_path = folder / ROUTER_CONFIG, folder / ROUTER_WEIGHTS
    config = read_json_file(config_path)
    if not isinstance(config, dict):
        raise ValueError(f"{config_path}: expected a JSON object")
    for key in ("tasks", "head", "encoder"):
        if key not in config:
            raise ValueError(f"{config_path}: missing {key!r}")
    routed = config["tasks"]
    if not isinstance(routed, list) or not routed or not all(isinstance(task, str) for task in routed):
        raise ValueError(f"{config_path}: tasks: expected a non-empty list of names, got {routed!r}")
    if sorted(routed) != sorted(tasks) or len(set(routed)) != len(routed):
        raise ValueError(f"{config_path}: tasks: {routed}, but the run's experts are {tasks} (manifest.json): fit "
                         "the router again")
    head = config["head"]
    if head not in HEAD_TENSORS:
        raise ValueError(f"{config_path}: head: expected one of {sorted(HEAD_TENSORS)}, got {head!r}")
    temperature = config.get("temperature", 0.05)
    if not isinstance(temperature, (int, float)) or isinstance(temperature, bool) or not (
            math.isfinite(temperature) and temperature > 0):
        raise ValueError(f"{config_path}: temperature: expected a number > 0, got {temperature!r}")
    shapes = safetensors_shapes(weights_path)
    sizes: dict[str, int] = {"tasks": len(routed)}
    for key, dims in HEAD_TENSORS[head].items():
        if key not in shapes:
            raise ValueError(f"{weights_path}: no {key!r} tensor, which a {head!r} router ({config_path}) holds")
        if len(shapes[key]) != len(dims):
            raise ValueError(f"{weights_path}: {key}: shape {list(shapes[key])}, expected {len(dims)} dimension(s)")
        for size, dim in zip(shapes[key], dims, strict=True):
            if sizes.setdefault(dim, size) != size:
                detail = f"{sizes[dim]} tasks in {config_path}" if dim == "tasks" else f"{sizes[dim]} elsewhere"
                raise ValueError(f"{weights_path}: {key}: shape {list(shapes[key])} does not fit the {dim} size "
                                 f"({detail})")
    return config


def check_merges(folder: Path, tasks: list[str]) -> list[dict[str, Any]]:
    """``merged/merges.json`` against the adapter folders beside it; returns its entries."""
    path = folder / MERGES_FILE
    folders = sorted(child.name for child in folder.iterdir() if child.is_dir() and not child.name.startswith("."))
    if not path.is_file():
        if folders:
            raise ValueError(f"{folder}: merged adapters {folders} but no {MERGES_FILE} listing them")
        return []
    entries = read_json_file(path)
    if not isinstance(entries, list):
        raise ValueError(f"{path}: expected a list of merges")
    listed = []
    for index, entry in enumerate(entries):
        where = f"{path}: [{index}]"
        if not isinstance(entry, dict) or not isinstance(entry.get("name"), str) or not isinstance(
                entry.get("tasks"), list):
            raise ValueError(f"{where}: expected an object with 'name' and 'tasks'")
        weights = entry.get("weights", [])
        if not isinstance(weights, list) or not all(is_finite_number(w) for w in weights) or (
                weights and len(weights) != len(entry["tasks"])):
            raise ValueError(f"{where}: weights: expected one finite number per task, got {weights!r}")
        unknown = [task for task in entry["tasks"] if task not in tasks]
        if unknown:
            raise ValueError(f"{where}: merges task(s) {unknown} that are not experts of the run {tasks}")
        adapter = folder / str(entry.get("path", entry["name"]))
        if not (adapter / ADAPTER_CONFIG).is_file():
            raise ValueError(f"{where}: the merged adapter {entry['name']!r} is missing (no {ADAPTER_CONFIG} in "
                             f"{adapter})")
        safetensors_shapes(adapter / ADAPTER_WEIGHTS)
        listed.append(adapter.name)
    stray = [name for name in folders if name not in listed]
    if stray:
        raise ValueError(f"{folder}: adapter folder(s) {stray} not listed in {MERGES_FILE}")
    return entries


def read_run(path: str | Path, *, router: bool = True) -> ExpertManifest:
    """The manifest of the run at ``path`` (``OUT`` or ``OUT/experts``) after checking every file of the run
    (module docstring); ``router=False`` leaves the fitted router out (``fit-router`` replaces it).  ``ValueError``
    naming the file and field of the first problem."""
    manifest = read_manifest(path)
    for name in TOKENIZER_FILES:  # the experts' tokenizer, which every command that runs the base loads
        if (manifest.folder / name).is_file():
            read_json_file(manifest.folder / name)
    for task in manifest.tasks:
        check_expert(manifest, task)
    if router and (manifest.folder / ROUTER_FOLDER).is_dir():
        check_router(manifest.folder / ROUTER_FOLDER, manifest.tasks)
    if (manifest.folder / MERGED_FOLDER).is_dir():
        check_merges(manifest.folder / MERGED_FOLDER, manifest.tasks)
    return manifest
