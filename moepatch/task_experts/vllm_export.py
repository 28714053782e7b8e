"""Export task experts and their merges for vLLM multi-LoRA serving (MELD served its merged pairs this way).

Writes ``<experts>/vllm/``: a copy of every adapter to serve (the single experts and the merges), ``vllm.json`` with
the ``EngineArgs`` fields to pass (``enable_lora``, ``max_loras``, ``max_lora_rank``, ``max_cpu_loras``) and one
``LoRARequest(name, id, path)`` entry per adapter, and — when ``route`` wrote routes — ``requests.jsonl`` naming each
request's adapter.  vLLM itself needs a GPU and is not a dependency: the format is what is checked here.

Refused, with the reason, before anything is written: a rank above ``max_lora_rank`` (or a value vLLM does not
accept), a base architecture vLLM has no LoRA implementation of, and modules vLLM does not load LoRA on for that
architecture (:data:`model_patches.vllm_lora.VLLM_LORA_MODULES`, checked on the adapter's safetensors keys as vLLM
does) — e.g. dense MLP names on Mixtral, ``kv_b_proj`` under DeepSeek's MLA, ``shared_expert_gate`` — and peft's
``target_parameters`` on fused routed experts (vLLM's MoE LoRA reads one tensor per expert, not that layout).
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from safetensors import safe_open

from model_patches.vllm_lora import VLLM_ARCHITECTURES
from model_patches.vllm_lora import VLLM_LORA_MODULES
from model_patches.vllm_lora import VLLM_NOT_LOADED
from moepatch.data.instruction import read_jsonl_located
from moepatch.errors import FieldError
from moepatch.errors import Naming
from moepatch.staged_output import staged_folder
from moepatch.task_experts.adapter_files import adapter_config
from moepatch.task_experts.adapter_files import lora_keys
from moepatch.task_experts.manifest import MERGED_FOLDER
from moepatch.task_experts.manifest import ExpertManifest
from moepatch.task_experts.merging import combination_key
from moepatch.task_experts.merging import read_merges
from moepatch.task_experts.merging import route_tasks

VLLM_FOLDER = "vllm"
VLLM_FILE = "vllm.json"
VLLM_MAX_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)
"""The values vLLM's ``LoRAConfig.max_lora_rank`` accepts (``MaxLoRARanks``)."""


@dataclass
class ServedAdapter:
    name: str
    source: Path
    rank: int
    tasks: list[str]


def _problems(adapter: ServedAdapter, config: dict[str, Any], model_type: str, max_lora_rank: int,
              spell: Naming) -> list[str]:
    """Why vLLM would not serve ``adapter``; ``spell`` names the fields a problem names (``max_lora_rank``)."""
    problems = []
    if adapter.rank > max_lora_rank:
        problems.append(f"{adapter.name}: rank {adapter.rank} > {spell('max_lora_rank')} {max_lora_rank}")
    if config.get("target_parameters"):
        problems.append(f"{adapter.name}: target_parameters {config['target_parameters']} (fused routed experts): "
                        "vLLM's MoE LoRA reads one tensor per expert (experts.<e>.<projection>), not peft's "
                        "target_parameters layout, for this architecture")
    accepted = VLLM_LORA_MODULES[model_type]
    refused: dict[str, str] = {}
    for name in _adapted_modules(adapter.source):
        leaf = name.rsplit(".", 1)[-1]
        if ".experts." in f".{name}." or "base_layer" in name:
            continue  # the fused routed experts: reported above
        if leaf not in accepted:
            refused[leaf] = VLLM_NOT_LOADED.get(leaf, "not a LoRA layer of vLLM's implementation")
    for leaf, why in sorted(refused.items()):
        problems.append(f"{adapter.name}: {leaf}: {why}; vLLM's {VLLM_ARCHITECTURES[model_type]} takes LoRA on "
                        f"{sorted(accepted)}")
    if config.get("modules_to_save"):
        problems.append(f"{adapter.name}: modules_to_save {config['modules_to_save']} (full copies of modules) "
                        "are not loaded by vLLM")
    if config.get("use_dora"):
        problems.append(f"{adapter.name}: DoRA adapters are not served by vLLM")
    return problems


def _adapted_modules(folder: Path) -> list[str]:
    """Module paths of the LoRA keys in ``folder``'s safetensors (what vLLM checks), else the config's
    ``target_modules``."""
    weights = folder / "adapter_model.safetensors"
    if not weights.is_file():
        targets = adapter_config(folder).get("target_modules") or []
        return [targets] if isinstance(targets, str) else list(targets)
    with safe_open(str(weights), framework="pt") as tensors:
        return sorted({module for module, _, _ in lora_keys(tensors.keys())})


def served_adapters(manifest: ExpertManifest, include_experts: bool = True) -> list[ServedAdapter]:
    """The single experts (unless ``include_experts`` is false) and every merge in ``merged/merges.json``."""
    adapters = []
    if include_experts:
        adapters += [ServedAdapter(e.task, manifest.expert_path(e.task), e.rank, [e.task]) for e in manifest.experts]
    merged = manifest.folder / MERGED_FOLDER
    adapters += [ServedAdapter(entry["name"], merged / entry["path"], int(entry["rank"]), list(entry["tasks"]))
                 for entry in read_merges(merged)]
    return adapters


def export_vllm(manifest: ExpertManifest, max_lora_rank: int, *, max_loras: int | None = None,
                include_experts: bool = True, routes: Path | None = None) -> Path:
    """Check, then write ``<experts>/vllm/`` (see the module docstring); returns ``vllm.json``'s path.

    Raises:
        FieldError: naming the argument (``max_lora_rank``, ``max_loras``, ``routes``; ``output``: the run), before
            anything is written.
        ValueError: a malformed routes file, named first.
    """
    if max_lora_rank not in VLLM_MAX_LORA_RANKS:
        raise FieldError("max_lora_rank", f"vLLM accepts {list(VLLM_MAX_LORA_RANKS)}, got {max_lora_rank}")
    architecture = VLLM_ARCHITECTURES.get(manifest.model_type)
    if architecture is None:
        raise FieldError("output", f"the experts' base is a {manifest.model_type} model; vLLM has no LoRA "
                                   f"implementation for it (exported here: {sorted(VLLM_ARCHITECTURES)})")
    adapters = served_adapters(manifest, include_experts)
    if not adapters:
        raise FieldError("output", lambda name: f"nothing to serve (no merges and {name('include_experts')})")
    configs = [adapter_config(adapter.source) for adapter in adapters]

    def problems(name: Naming) -> list[str]:
        return [problem for adapter, config in zip(adapters, configs, strict=True)
                for problem in _problems(adapter, config, manifest.model_type, max_lora_rank, name)]

    if problems(lambda field: field):
        raise FieldError("output", lambda name: "cannot serve these adapters with vLLM (nothing written):\n  "
                                                + "\n  ".join(problems(name)))
    if max_loras is not None and not 1 <= max_loras <= len(adapters):
        raise FieldError("max_loras", f"expected 1 .. {len(adapters)} (the adapters exported), got {max_loras}")
    _check_earlier_export(manifest.folder / VLLM_FOLDER)
    by_combination = {combination_key(a.tasks, [1.0] * len(a.tasks)): a.name for a in adapters
                      if "~" not in a.name}  # the single experts and the equal-weight cat merges serve routes
    route_lines = _route_lines(routes, by_combination) if routes is not None else None
    final = manifest.folder / VLLM_FOLDER
    with staged_folder(final) as folder:  # the earlier export stays whole until this one is written
        requests = []
        for lora_id, adapter in enumerate(adapters, start=1):  # vLLM's lora_int_id must be > 0
            shutil.copytree(adapter.source, folder / adapter.name, ignore=shutil.ignore_patterns("*.md"))
            requests.append({"lora_name": adapter.name, "lora_int_id": lora_id,
                             "lora_path": str((final / adapter.name).resolve()), "tasks": adapter.tasks,
                             "rank": adapter.rank})
        engine = {"model": manifest.base, "enable_lora": True,
                  "max_loras": min(max_loras or len(adapters), len(adapters)), "max_lora_rank": max_lora_rank,
                  "max_cpu_loras": len(adapters)}
        (folder / VLLM_FILE).write_text(json.dumps(
            {"architecture": architecture, "engine_args": engine, "lora_requests": requests}, indent=1) + "\n")
        if route_lines is not None:
            (folder / "requests.jsonl").write_text("".join(json.dumps(line) + "\n" for line in route_lines))
    return final / VLLM_FILE


def _check_earlier_export(folder: Path) -> None:
    """The export replaces ``vllm/`` as a whole: refused when it holds anything an earlier export did not write (a
    user's file would be deleted)."""
    if not folder.exists():
        return
    written = {VLLM_FILE, "requests.jsonl"}
    try:
        written |= {entry["lora_name"] for entry in json.loads((folder / VLLM_FILE).read_text())["lora_requests"]}
    except (OSError, ValueError, KeyError, TypeError):
        pass  # no readable earlier vllm.json: only its own file names are known
    foreign = sorted(path.name for path in folder.iterdir() if path.name not in written)
    if foreign:
        raise FieldError("output", f"{folder} holds {foreign}, which no earlier export wrote; the export replaces "
                                   "the folder as a whole: move them away first")


def _route_lines(routes: Path, by_combination: dict[tuple[str, ...], str]) -> list[dict[str, Any]]:
    """Each routed request with the adapter serving it; a combination without an exported adapter is an error."""
    lines, missing = [], set()
    for where, record in read_jsonl_located(routes):
        tasks = route_tasks(where, record)
        key = combination_key(tasks, [1.0] * len(tasks))
        if key not in by_combination:
            missing.add("+".join(key))
            continue
        lines.append({"text": record.get("text"), "lora_name": by_combination[key], "tasks": tasks})
    if missing:
        raise FieldError("routes", f"no exported adapter for the combination(s) {sorted(missing)}: run "
                                   f"`moepatch experts merge OUT --from-routes {routes}` first")
    return lines


def lora_requests(vllm_file: str | Path) -> Sequence[Any]:
    """vLLM ``LoRARequest`` objects from ``vllm.json`` (needs vLLM installed)."""
    from vllm.lora.request import LoRARequest

    data = json.loads(Path(vllm_file).read_text())
    return [LoRARequest(entry["lora_name"], entry["lora_int_id"], entry["lora_path"])
            for entry in data["lora_requests"]]
