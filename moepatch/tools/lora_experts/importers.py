"""Import the official MoLA (Gao et al., 2024) and GuiLoMo (Zhang et al., 2025) checkpoints.

Both are peft-based: ``adapter_model.bin`` (or ``.safetensors``) with peft's adapter name stripped from the keys, the
per-layer settings kept only in the training command's flags.

* MoLA / GuiLoMo stage 2: per targeted ``nn.Linear`` at ``<path>`` (relative to the causal LM), expert ``i``'s
  ``base_model.model.<path>.lora_A_<i>.weight [r, in]`` and ``lora_B_<i>.weight [out, r]`` (peft's
  ``lora_A.default_<i>`` with ``.default`` removed) and the router ``<path>.router.router.weight [N, in]``; the layer
  computes ``W x + Σ_{top-k} w_e · B_e A_e x · α / r`` with ``w`` the renormalised top-k of the router's softmax.
  GuiLoMo's stage 2 uses the **last** expert's rank in ``α / r`` for every expert of a module; moepatch's experts
  scale by their own rank, so each ``B_e`` is multiplied by ``r_e / r_last`` on import — the imported model computes
  what the checkpoint was trained to compute.
* GuiLoMo stage 1 (the search): per module the expert GSV ``<path>.router_expert_vector.router_expert_vector`` and
  per expert the rank GSV ``<path>.expertlora_E_vector_<i>`` → ``expert.json`` / ``rank.json`` exactly as the
  official ``save_rankandexp_num.py`` writes them (experts = max(2, argmax + 1), rank = argmax + 1).

Weights are read without unpickling code (``torch.load(weights_only=True)`` or safetensors).
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING
from typing import Any

import torch
from safetensors.torch import load_file
from torch import nn

from moepatch.config import MoePatchConfig
from moepatch.lora_experts.inject import ATTRIBUTE
from moepatch.lora_experts.inject import load_lora_weights
from moepatch.patch import apply
from moepatch.tools.lora_experts.guilomo import write_allocation_files

if TYPE_CHECKING:
    from moepatch.patch import PatchHandle

MOLA_TARGETS = ("q_proj", "v_proj", "k_proj", "o_proj", "gate_proj", "down_proj", "up_proj")
"""MoLA's ``--lora_target_modules`` default."""
WEIGHT_FILES = ("adapter_model.safetensors", "adapter_model.bin", "best_model/adapter_model.bin")
"""Where an official checkpoint folder keeps its weights (the last: GuiLoMo's fallback)."""
PEFT_PREFIX = "base_model.model."
_EXPERT_KEY = re.compile(r"^(?P<path>.+)\.lora_(?P<side>[AB])_(?P<expert>\d+)\.weight$")
_ROUTER_SUFFIX = ".router.router.weight"
EXPERT_GSV = "router_expert_vector"
RANK_GSV = "expertlora_E_vector"

IntSpec = int | str | Sequence[int]
"""An int for every layer, a list per layer, or MoLA's comma-separated flag value (``"2,2,4,4"``)."""


def read_adapter_weights(checkpoint: str | Path) -> dict[str, torch.Tensor]:
    """The tensors of an official checkpoint (a folder or the file itself), keys with peft's ``.default`` removed.

    ``.bin`` files load with ``torch.load(weights_only=True)``: tensors only, no code is unpickled.
    """
    path = Path(checkpoint)
    if path.is_dir():
        found = next((path / name for name in WEIGHT_FILES if (path / name).is_file()), None)
        if found is None:
            raise ValueError(f"{path}: no {' / '.join(WEIGHT_FILES)} found")
        path = found
    if not path.is_file():
        raise ValueError(f"{path}: no such checkpoint file")
    if path.suffix == ".safetensors":

        tensors = load_file(str(path))
    else:
        tensors = torch.load(path, map_location="cpu", weights_only=True)
    return {key.replace(".default", ""): value for key, value in tensors.items()}


def _int_spec(value: IntSpec, name: str) -> int | list[int]:
    if isinstance(value, str):
        try:
            parts = [int(part) for part in value.split(",") if part.strip()]
        except ValueError:
            raise ValueError(f"{name}: expected comma-separated integers, got {value!r}") from None
        return parts[0] if len(parts) == 1 else parts
    return value if isinstance(value, int) else [int(item) for item in value]


def _targets(target_modules: str | Sequence[str]) -> list[str]:
    if isinstance(target_modules, str):
        return [name.strip() for name in target_modules.split(",") if name.strip()]
    return list(target_modules)


BALANCE_COEF = 1e-3
"""``router_aux_loss_coef`` of both official models (hard-coded)."""


def _block(num_experts: Any, r: Any, top_k: IntSpec, lora_alpha: float, lora_dropout: float,
           target_modules: str | Sequence[str], obalance: bool, reduction: str) -> dict[str, Any]:
    if not isinstance(obalance, bool):
        raise ValueError(f"obalance: expected true or false, got {obalance!r}")
    block = {"method": "mola", "target_modules": _targets(target_modules), "num_experts": num_experts, "r": r,
             "top_k": _int_spec(top_k, "top_k"), "alpha": float(lora_alpha), "dropout": float(lora_dropout),
             "router_init": "kaiming"}
    if obalance:
        block["balance_loss"] = {"coef": BALANCE_COEF, "reduction": reduction}
    return block


def mola_block(*, number_experts: IntSpec, lora_r: IntSpec, top_k: IntSpec, lora_alpha: float = 16.0,
               lora_dropout: float = 0.05, target_modules: str | Sequence[str] = MOLA_TARGETS,
               obalance: bool = False) -> dict[str, Any]:
    """The ``lora_experts`` block of a MoLA run, from its training flags (``--number_experts``, ``--lora_r``,
    ``--top_k``: comma lists per layer; ``--lora_alpha``, ``--lora_dropout``, ``--lora_target_modules``,
    ``--obalance``: False in ``mola_training.py``, True in ``mola_training_instruction.py``), which MoLA keeps
    nowhere in its checkpoint.  ``obalance`` adds MoLA's balance loss: per decoder layer, its routers pooled, summed
    over layers (``"reduction": "layer"``), coefficient 1e-3.

    Example:
        ```python
        block = mola_block(number_experts="2,2,4,4", lora_r="8,8,8,8", top_k="2,2,2,2")
        ```
    """
    return _block(_int_spec(number_experts, "number_experts"), _int_spec(lora_r, "lora_r"), top_k, lora_alpha,
                  lora_dropout, target_modules, obalance, "layer")


def guilomo_block(*, experts: dict[str, int] | str | Path, ranks: dict[str, int] | str | Path, top_k: IntSpec,
                  lora_alpha: float = 16.0, lora_dropout: float = 0.05,
                  target_modules: str | Sequence[str] = MOLA_TARGETS, obalance: bool = True) -> dict[str, Any]:
    """The ``lora_experts`` block of a GuiLoMo stage-2 run: its ``expert.json`` / ``rank.json`` (dicts or files)
    and the stage-2 flags (``--top_k`` per layer, ``--lora_alpha``, ``--lora_dropout``, targets, ``--obalance``:
    True in the official README).  Its balance loss is the official stage 2's (``MoLA_con``): one term per module,
    each with that module's own expert count N, summed (``"reduction": "sum"``), coefficient 1e-3 — MoLA's
    per-layer ``"layer"`` would pool a layer's routers whenever they share (N, k).

    Example:
        ```python
        block = guilomo_block(experts="search/expert.json", ranks="search/rank.json", top_k=2)
        ```
    """
    return _block(_json_dict(experts, "experts"), _json_dict(ranks, "ranks"), top_k, lora_alpha, lora_dropout,
                  target_modules, obalance, "sum")


def _json_dict(value: dict[str, int] | str | Path, name: str) -> dict[str, int]:
    if isinstance(value, dict):
        return dict(value)
    path = Path(value)
    if not path.is_file():
        raise ValueError(f"{name}: {path} not found")
    data = json.loads(path.read_text(encoding="utf-8"))
    if not isinstance(data, dict):
        raise ValueError(f"{name}: {path} holds {type(data).__name__}, expected an object keyed by module path")
    return data


def official_to_moepatch(tensors: dict[str, torch.Tensor], *, shared_rank_scaling: bool = False
                         ) -> dict[str, torch.Tensor]:
    """Official MoLA-layout keys → moepatch's (``<path>.lora_experts.{lora_A,lora_B}.<i>``, ``...router.weight``).

    ``shared_rank_scaling``: the checkpoint scaled every expert of a module by ``α / r_last`` (GuiLoMo stage 2);
    each ``B_e`` is then multiplied by ``r_e / r_last`` so moepatch's per-expert ``α / r_e`` gives the same output.
    Keys of neither form (e.g. GuiLoMo stage-1 GSVs) are refused, named.
    """
    converted: dict[str, torch.Tensor] = {}
    unknown = []
    for key, value in tensors.items():
        name = key[len(PEFT_PREFIX):] if key.startswith(PEFT_PREFIX) else key
        match = _EXPERT_KEY.match(name)
        if match:
            converted[f"{match['path']}.{ATTRIBUTE}.lora_{match['side']}.{match['expert']}"] = value
        elif name.endswith(_ROUTER_SUFFIX):
            converted[f"{name[: -len(_ROUTER_SUFFIX)]}.{ATTRIBUTE}.router.weight"] = value
        else:
            unknown.append(key)
    if unknown:
        raise ValueError(f"not a MoLA-layout checkpoint: {len(unknown)} keys of no known form, e.g. {unknown[:3]} "
                         "(a GuiLoMo stage-1 checkpoint gives allocations: guilomo_allocation)")
    if shared_rank_scaling:
        _rescale_to_own_ranks(converted)
    return converted


def _rescale_to_own_ranks(converted: dict[str, torch.Tensor]) -> None:
    marker = f".{ATTRIBUTE}.lora_A."
    ranks: dict[str, dict[int, int]] = {}
    for key, value in converted.items():
        if marker in key:
            module, _, index = key.rpartition(marker)
            ranks.setdefault(module, {})[int(index)] = value.shape[0]
    for module, per_expert in ranks.items():
        last = per_expert[max(per_expert)]
        for expert, rank in per_expert.items():
            key = f"{module}.{ATTRIBUTE}.lora_B.{expert}"
            converted[key] = converted[key] * (rank / last)


def import_official(model: nn.Module, checkpoint: str | Path, block: dict[str, Any], *,
                    shared_rank_scaling: bool = False) -> PatchHandle:
    """``moepatch.apply`` ``block`` (beside the model's other moepatch settings) and load the official weights;
    on any mismatch (keys, shapes) the patch is removed again and the error names the keys."""

    weights = official_to_moepatch(read_adapter_weights(checkpoint), shared_rank_scaling=shared_rank_scaling)
    config = MoePatchConfig.from_model(model).to_dict() | {"lora_experts": block}
    handle = apply(model, config)
    try:
        load_lora_weights(handle.require_moe_model().inner, weights)
    except ValueError:
        handle.remove()
        raise
    return handle


def import_mola(model: nn.Module, checkpoint: str | Path, **flags: Any) -> PatchHandle:
    """Patch ``model`` with an official MoLA checkpoint; ``flags`` as :func:`mola_block` (its training flags).

    Example:
        ```python
        handle = import_mola(model, "mola-run/", number_experts="2,2,4,4", lora_r="8,8,8,8", top_k="2,2,2,2")
        ```
    """
    return import_official(model, checkpoint, mola_block(**flags))


def import_guilomo(model: nn.Module, checkpoint: str | Path, **flags: Any) -> PatchHandle:
    """Patch ``model`` with an official GuiLoMo stage-2 checkpoint; ``flags`` as :func:`guilomo_block`.  Each
    expert's ``B`` absorbs the official shared ``α / r_last`` scaling (see the module docstring).

    Example:
        ```python
        handle = import_guilomo(model, "stage2/", experts="expert.json", ranks="rank.json", top_k=2)
        ```
    """
    return import_official(model, checkpoint, guilomo_block(**flags), shared_rank_scaling=True)


def guilomo_allocation(checkpoint: str | Path) -> tuple[dict[str, int], dict[str, int]]:
    """``(expert.json, rank.json)`` contents from a GuiLoMo stage-1 checkpoint, as the official
    ``save_rankandexp_num.py``: for every expert GSV the module (key without its first two and last two
    components) gets ``max(2, argmax + 1)`` experts; for every rank GSV the key without its first two components
    gets rank ``argmax + 1``.

    Example:
        ```python
        experts, ranks = guilomo_allocation("search-run/")
        ```
    """
    experts: dict[str, int] = {}
    ranks: dict[str, int] = {}
    for key, value in read_adapter_weights(checkpoint).items():
        if RANK_GSV in key:
            ranks[".".join(key.split(".")[2:])] = int(torch.argmax(value)) + 1
        elif EXPERT_GSV in key:
            experts[".".join(key.split(".")[2:-2])] = max(2, int(torch.argmax(value)) + 1)
    if not experts or not ranks:
        raise ValueError(f"{checkpoint}: no GuiLoMo stage-1 GSVs ({EXPERT_GSV} / {RANK_GSV}) found")
    return experts, ranks


def write_guilomo_allocation(checkpoint: str | Path, folder: str | Path) -> tuple[Path, Path]:
    """Write ``expert.json`` and ``rank.json`` (indent 4, as the official script) into ``folder``.

    Example:
        ```python
        expert_file, rank_file = write_guilomo_allocation("search-run/", "allocation/")
        ```
    """
    experts, ranks = guilomo_allocation(checkpoint)

    return write_allocation_files(experts, ranks, folder)
