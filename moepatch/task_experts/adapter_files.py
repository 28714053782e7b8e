"""Read a peft LoRA adapter folder into per-module weight deltas, without peft.

The merge report compares what peft wrote against ``Σ wᵢ·sᵢ·BᵢAᵢ`` computed here from the experts' own files, so
the check does not go through the code it checks.  Only safetensors are read (never a pickle).
"""

from __future__ import annotations

import contextlib
import json
import math
import re
import warnings
from collections.abc import Iterable
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file

ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
LORA_A_KEY = re.compile(r"(?:base_model\.model\.)?(.+)\.lora_A\.weight")
"""A ``lora_A`` key of a peft adapter file; group 1 is the module path in the base model."""


def lora_keys(keys: Iterable[str]) -> Iterator[tuple[str, str, str]]:
    """``(module path, lora_A key, lora_B key)`` for every LoRA module among a safetensors file's ``keys``."""
    for key in keys:
        match = LORA_A_KEY.fullmatch(key)
        if match is not None:
            yield match.group(1), key, key.replace(".lora_A.weight", ".lora_B.weight")


def adapter_config(folder: str | Path) -> dict:
    """``adapter_config.json`` of a LoRA adapter; ``ValueError`` naming the file when it is not one."""
    path = Path(folder) / ADAPTER_CONFIG
    if not path.is_file():
        raise ValueError(f"{folder}: no {ADAPTER_CONFIG} (not a peft adapter folder)")
    config = json.loads(path.read_text())
    if config.get("peft_type") != "LORA":
        raise ValueError(f"{path}: peft_type {config.get('peft_type')!r}, expected 'LORA'")
    return config


def _pattern_value(patterns: dict, module: str, default: float) -> float:
    """peft's ``rank_pattern`` / ``alpha_pattern`` lookup: the first key that matches the module path's end."""
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return default


def module_scaling(config: dict, module: str) -> float:
    """``lora_alpha / r`` of one module (``/ √r`` with rsLoRA), pattern overrides included."""
    rank = _pattern_value(config.get("rank_pattern") or {}, module, config["r"])
    alpha = _pattern_value(config.get("alpha_pattern") or {}, module, config["lora_alpha"])
    return alpha / (math.sqrt(rank) if config.get("use_rslora") else rank)


def adapter_deltas(folder: str | Path) -> dict[str, torch.Tensor]:
    """``{module path: ΔW}`` (float64, ``[out, in]``) of every LoRA module of the adapter in ``folder``.

    Module paths are those of the base model (peft's ``base_model.model.`` prefix removed).  A LoRA on a fused
    parameter of ``E`` experts (peft ``target_parameters``: ``lora_A`` is ``[E·r, in]`` expert-major, ``lora_B``
    ``[out, r·E]`` expert-minor) gives one entry per expert, ``<path>[e]``, where the path is peft's (one
    ``.base_layer`` per parameter wrapped before it on the same module).  ``ValueError`` for adapters this reader
    does not model (DoRA, non-linear layers).
    """
    folder = Path(folder)
    config = adapter_config(folder)
    if config.get("use_dora"):
        raise ValueError(f"{folder}: DoRA adapters have no plain weight delta")
    weights_path = folder / ADAPTER_WEIGHTS
    if not weights_path.is_file():
        raise ValueError(f"{folder}: no {ADAPTER_WEIGHTS}")
    tensors = load_file(str(weights_path))
    fused_modules = {name.rsplit(".", 1)[0] for name in config.get("target_parameters") or []}
    if fused_modules and (config.get("rank_pattern") or config.get("alpha_pattern")):
        raise ValueError(f"{folder}: rank_pattern / alpha_pattern with target_parameters (peft keys those by "
                         "parameter, not by the saved module path): not modelled here")
    deltas = {}
    for module, a_key, b_key in lora_keys(tensors):
        a, b = tensors[a_key], tensors.get(b_key)
        if b is None or a.dim() != 2 or b.dim() != 2 or b.shape[1] != a.shape[0]:
            raise ValueError(f"{weights_path}: {module} has no matching 2-D lora_B")
        rank = int(_pattern_value(config.get("rank_pattern") or {}, module, config["r"]))
        scaling = module_scaling(config, module)
        if not _is_fused(module, fused_modules):
            if a.shape[0] != rank:
                raise ValueError(f"{weights_path}: {module} has lora_A of {a.shape[0]} rows, expected r={rank}")
            deltas[module] = scaling * (b.double() @ a.double())
            continue
        if a.shape[0] % rank:
            raise ValueError(f"{weights_path}: {module} has lora_A of {a.shape[0]} rows, not a multiple of r={rank}")
        experts = a.shape[0] // rank
        a_experts = a.double().reshape(experts, rank, a.shape[1])
        b_experts = b.double().reshape(b.shape[0], rank, experts)
        for expert in range(experts):
            deltas[f"{module}[{expert}]"] = scaling * (b_experts[:, :, expert] @ a_experts[expert])
    if not deltas:
        raise ValueError(f"{weights_path}: no LoRA module found")
    return deltas


def _is_fused(module: str, fused_modules: set[str]) -> bool:
    """Whether a saved module path is peft's wrapper of a ``target_parameters`` entry (``…mlp.experts``, one
    ``.base_layer`` per parameter wrapped before it on the same module)."""
    unwrapped = re.sub(r"(\.base_layer)+$", "", module)
    return any(unwrapped == name or unwrapped.endswith(f".{name}") for name in fused_modules)


def module_shapes(folder: str | Path) -> dict[str, tuple[int, int]]:
    """``{module path: (out, in)}`` of the linear LoRA modules of an adapter (read from the safetensors header)."""
    config = adapter_config(folder)
    fused_modules = {name.rsplit(".", 1)[0] for name in config.get("target_parameters") or []}
    shapes = {}
    with safe_open(str(Path(folder) / ADAPTER_WEIGHTS), framework="pt") as tensors:
        for module, a_key, b_key in lora_keys(tensors.keys()):
            if not _is_fused(module, fused_modules):
                shapes[module] = (tensors.get_slice(b_key).get_shape()[0], tensors.get_slice(a_key).get_shape()[1])
    return shapes


@contextlib.contextmanager
def quiet_peft() -> Iterator[None]:
    """Silence transformers' deprecation of a name peft still calls (``is_gradient_checkpointing``): not the
    user's to act on."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        yield
