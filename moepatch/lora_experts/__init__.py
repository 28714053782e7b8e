"""LoRA-expert layers (MoLoRA, MoV, MoLA / GuiLoMo) injected from ``config.json["moepatch"]["lora_experts"]``.

``moepatch.apply`` reads the block, validates it against the model (targets, per-layer / per-module counts,
per-expert ranks), attaches the expert sets beside the base projections — attention, dense MLPs, shared experts, and
the routed experts whatever their storage when ``routed_experts`` is true or an entry names them — freezes the base,
and adds the balance loss in training.
"""

from __future__ import annotations

from pathlib import Path

from torch import nn

from moepatch.lora_experts.config import WEIGHTS_NAME
from moepatch.lora_experts.config import LoraExpertsConfig
from moepatch.lora_experts.inject import lora_state_dict
from moepatch.lora_experts.layers import ExpertRouter
from moepatch.lora_experts.layers import LoraExperts
from moepatch.lora_experts.layers import VectorExperts


def save_lora_experts(model: nn.Module, folder: str | Path, filename: str = WEIGHTS_NAME) -> Path:
    """Write only the LoRA-expert tensors to ``folder/filename`` (an adapter-only file to ship beside a base
    checkpoint); ``model.save_pretrained`` of a patched model writes the same file by itself."""
    from moepatch.lora_experts.inject import write_expert_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tensors = lora_state_dict(model)
    if not tensors:
        raise ValueError("save_lora_experts: the model carries no LoRA experts (apply a lora_experts config first)")
    return write_expert_file(tensors, folder / filename)


def merge_into_base(model: nn.Module) -> None:
    """Refuse: token-routed experts cannot be folded into the base weights.

    Each token mixes the experts with its own router weights, so no single weight matrix reproduces the layer; keep
    the experts as modules (or, for request-level routing, merge plain LoRAs with peft's ``cat`` combination).
    """
    if any(isinstance(m, (LoraExperts, VectorExperts)) for m in model.modules()):
        raise ValueError("lora_experts: token-routed LoRA / (IA)³ experts cannot be merged into the base weights — "
                         "every token mixes the experts with its own router weights, so no fixed ΔW reproduces them")
    raise ValueError("lora_experts: the model carries no LoRA experts to merge")


__all__ = ["ExpertRouter", "LoraExperts", "LoraExpertsConfig", "VectorExperts", "WEIGHTS_NAME", "lora_state_dict",
           "merge_into_base", "save_lora_experts"]
