"""LoRA-expert layers (MoLoRA, MoV, MoLA / GuiLoMo) injected from ``config.json["moepatch"]["lora_experts"]``.

``moepatch.apply`` reads the block, validates it against the model (targets, per-layer / per-module counts,
per-expert ranks), attaches the expert sets beside the base projections — attention, dense MLPs, shared experts, and
the routed experts whatever their storage when ``routed_experts`` is true or an entry names them — freezes the base,
and adds the balance loss in training.
"""

from __future__ import annotations

import importlib
import warnings
from pathlib import Path
from typing import Any

import torch.distributed as dist
from torch import nn

from moepatch.lora_experts.config import WEIGHTS_NAME
from moepatch.lora_experts.config import LoraExpertsConfig
from moepatch.lora_experts.inject import expert_sharded
from moepatch.lora_experts.inject import full_lora_state_dict
from moepatch.lora_experts.inject import lora_state_dict
from moepatch.lora_experts.inject import write_expert_file
from moepatch.lora_experts.layers import ExpertRouter
from moepatch.lora_experts.layers import LoraExperts
from moepatch.lora_experts.layers import VectorExperts


def save_lora_experts(model: nn.Module, folder: str | Path, filename: str = WEIGHTS_NAME) -> Path:
    """Write only the LoRA-expert tensors to ``folder/filename`` (an adapter-only file to ship beside a base
    checkpoint); ``model.save_pretrained`` of a patched model writes the same file by itself.  Under expert
    parallelism every process calls it: the routed experts' sets of all processes are gathered and process 0
    writes the file."""

    folder = Path(folder)
    tensors = full_lora_state_dict(model)
    if not tensors:
        raise ValueError("save_lora_experts: the model carries no LoRA experts (apply a lora_experts config first)")
    if not expert_sharded(model):
        folder.mkdir(parents=True, exist_ok=True)
        return write_expert_file(tensors, folder / filename)

    if dist.get_rank() == 0:
        folder.mkdir(parents=True, exist_ok=True)
        write_expert_file(tensors, folder / filename)
    dist.barrier()  # every process returns once the file is there
    return folder / filename


MOVED_TO_TOOLS = {
    "export_peft": "moepatch.tools.lora_experts.export",
    "merge_into_base": "moepatch.tools.lora_experts.merge",
    **{name: "moepatch.tools.lora_experts.importers"
       for name in ("guilomo_allocation", "guilomo_block", "import_guilomo", "import_mola", "mola_block",
                    "read_adapter_weights", "write_guilomo_allocation")},
}
"""Offline tools earlier releases exported here; they live in :mod:`moepatch.tools.lora_experts` (above the patch-time
code, see ``docs/architecture.md``).  The old names still resolve, with a ``DeprecationWarning``."""


def __getattr__(name: str) -> Any:
    if name in MOVED_TO_TOOLS:
        warnings.warn(f"moepatch.lora_experts.{name} moved to moepatch.tools.lora_experts.{name}", DeprecationWarning,
                      stacklevel=2)
        return getattr(importlib.import_module(MOVED_TO_TOOLS[name]), name)
    raise AttributeError(f"module 'moepatch.lora_experts' has no attribute {name!r}")


__all__ = ["ExpertRouter", "LoraExperts", "LoraExpertsConfig", "VectorExperts", "WEIGHTS_NAME", "lora_state_dict",
           "save_lora_experts"]
