"""MoLM / ModuleFormer for transformers 5: config, models, a tiny test config and Auto-class registration.

The ``ibm/MoLM-*`` checkpoints carry no code and no ``auto_map``; their model card registers IBM's classes with the
Auto classes under ``"moduleformer"``.  :func:`register_moduleformer` does the same with this transformers-5
implementation, so ``AutoModelForCausalLM.from_pretrained("ibm/MoLM-700M-8B")``-style loading works offline.
"""

from __future__ import annotations

from typing import Any

from transformers import AutoConfig
from transformers import AutoModel
from transformers import AutoModelForCausalLM

from moepatch.models.moduleformer.configuration_moduleformer import ModuleFormerConfig
from moepatch.models.moduleformer.modeling_moduleformer import ModuleFormerAttention
from moepatch.models.moduleformer.modeling_moduleformer import ModuleFormerBlock
from moepatch.models.moduleformer.modeling_moduleformer import ModuleFormerForCausalLM
from moepatch.models.moduleformer.modeling_moduleformer import ModuleFormerModel
from moepatch.models.moduleformer.modeling_moduleformer import ModuleFormerPreTrainedModel
from moepatch.models.moduleformer.modeling_moduleformer import MoE
from moepatch.models.moduleformer.modeling_moduleformer import ParallelExperts
from moepatch.models.moduleformer.modeling_moduleformer import compute_gating
from moepatch.models.moduleformer.modeling_moduleformer import stickbreaking_attention
from moepatch.models.moduleformer.modeling_moduleformer import top_k_gating

__all__ = [
    "MOLM_CONFIGS",
    "MoE",
    "ModuleFormerAttention",
    "ModuleFormerBlock",
    "ModuleFormerConfig",
    "ModuleFormerForCausalLM",
    "ModuleFormerModel",
    "ModuleFormerPreTrainedModel",
    "ParallelExperts",
    "compute_gating",
    "molm_config",
    "register_moduleformer",
    "stickbreaking_attention",
    "tiny_moduleformer_config",
    "top_k_gating",
]

_MOLM_COMMON: dict[str, Any] = dict(
    vocab_size=50295,
    n_embd=1024,
    n_head=1,
    att_hidden=1024,
    ffd_hidden=2048,
    n_att_experts=16,
    n_mlp_experts=32,
    gating_size=256,
    block_size=512,
    history_length=512,
    activation_function="gelu_new",
    aux_loss_type="mi",
    aux_loss_weight=0,
    gate_type="mlp",
    bos_token_id=50256,
    eos_token_id=50256,
    tie_word_embeddings=False,
)

MOLM_CONFIGS: dict[str, dict[str, Any]] = {
    "MoLM-350M-4B": {**_MOLM_COMMON, "n_layer": 24, "k_att": 2, "k_mlp": 2},
    "MoLM-700M-4B": {**_MOLM_COMMON, "n_layer": 24, "k_att": 4, "k_mlp": 4},
    "MoLM-700M-8B": {**_MOLM_COMMON, "n_layer": 48, "k_att": 2, "k_mlp": 2},
}
"""Published MoLM sizes (700M-8B from its ``config.json``, the 4B ones inferred)."""


def molm_config(name: str = "MoLM-700M-8B", **overrides: Any) -> ModuleFormerConfig:
    """The config of a published MoLM size (``"MoLM-350M-4B"``, ``"MoLM-700M-4B"``, ``"MoLM-700M-8B"``)."""
    if name not in MOLM_CONFIGS:
        raise KeyError(f"unknown MoLM size {name!r}; known: {sorted(MOLM_CONFIGS)}")
    return ModuleFormerConfig(**{**MOLM_CONFIGS[name], **overrides})


def tiny_moduleformer_config(**overrides: Any) -> ModuleFormerConfig:
    """A tiny MoLM-shaped config for offline tests: hidden 32, 3 layers, 8 MLP experts / 4 attention experts, top-2.

    Keeps MoLM's structural choices — ``n_head=1`` and ``att_hidden == n_embd`` (so ``k_proj``/``v_proj`` are
    identities and the key layout matches the checkpoints), an MLP gate — and matches the project's tiny tokenizer
    (``moepatch.tiny.tiny_tokenizer()``: 512 tokens, pad 0 / bos 1 / eos 2).  ``history_length + block_size`` is
    32, which only sizes the unused attention buffers.
    """
    values: dict[str, Any] = dict(
        vocab_size=512,
        n_embd=32,
        n_layer=3,
        n_head=1,
        att_hidden=32,
        ffd_hidden=64,
        n_att_experts=4,
        k_att=2,
        n_mlp_experts=8,
        k_mlp=2,
        gating_size=16,
        block_size=16,
        history_length=16,
        activation_function="gelu_new",
        aux_loss_type="mi",
        aux_loss_weight=0,
        gate_type="mlp",
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
        tie_word_embeddings=False,
    )
    values.update(overrides)
    return ModuleFormerConfig(**values)


def register_moduleformer() -> None:
    """Register the config and models with ``AutoConfig`` / ``AutoModel`` / ``AutoModelForCausalLM`` (idempotent)."""

    AutoConfig.register(ModuleFormerConfig.model_type, ModuleFormerConfig, exist_ok=True)
    AutoModel.register(ModuleFormerConfig, ModuleFormerModel, exist_ok=True)
    AutoModelForCausalLM.register(ModuleFormerConfig, ModuleFormerForCausalLM, exist_ok=True)
