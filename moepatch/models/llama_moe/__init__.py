"""LLaMA-MoE (pjlab-sys4nlp/llama-moe, Dec-2023 Hub code) re-implemented for transformers 5.

The published checkpoints ship transformers-4.31 remote code that does not run on transformers 5; these classes keep
its module tree, state-dict keys and numerics (see ``modeling_llama_moe``), so real checkpoints load with no missing
or unexpected keys once :func:`register_llama_moe` has mapped ``model_type="llama_moe"`` to them.

Example:
    ```python
    from moepatch.models.llama_moe import register_llama_moe, tiny_llama_moe_config
    register_llama_moe()
    model = AutoModelForCausalLM.from_config(tiny_llama_moe_config())
    ```
"""

from __future__ import annotations

from typing import Any

from transformers import AutoConfig
from transformers import AutoModel
from transformers import AutoModelForCausalLM

from moepatch.models.llama_moe.configuration_llama_moe import LlamaMoEConfig
from moepatch.models.llama_moe.modeling_llama_moe import BaseMoEModelOutputWithPast
from moepatch.models.llama_moe.modeling_llama_moe import LinearGLUExperts
from moepatch.models.llama_moe.modeling_llama_moe import LinearGLUMoELayer
from moepatch.models.llama_moe.modeling_llama_moe import LlamaMoEDecoderLayer
from moepatch.models.llama_moe.modeling_llama_moe import LlamaMoEForCausalLM
from moepatch.models.llama_moe.modeling_llama_moe import LlamaMoEModel
from moepatch.models.llama_moe.modeling_llama_moe import LlamaMoEPreTrainedModel
from moepatch.models.llama_moe.modeling_llama_moe import MoECausalLMOutputWithPast
from moepatch.models.llama_moe.modeling_llama_moe import MoEMlpOutput
from moepatch.models.llama_moe.modeling_llama_moe import TopKBalancedNoisyGate
from moepatch.models.llama_moe.modeling_llama_moe import UniversalCalculator

TINY_LLAMA_MOE = {
    "vocab_size": 512,  # len(moepatch.tiny.tiny_tokenizer())
    "hidden_size": 32,
    "intermediate_size": 64,  # 8 experts x 8 rows (size_experts=None -> equal shares)
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 4,
    "max_position_embeddings": 256,
    "rms_norm_eps": 1e-5,
    "num_experts": 8,
    "num_selects": 2,
    "score_scale_factor": 4.0,  # the published 8/2 rule
    "pad_token_id": 0,
    "bos_token_id": 1,
    "eos_token_id": 2,
}
"""The tiny defaults: published LLaMA-MoE-v1-3_5B-2_8 semantics (8 experts, top-2, scale 4) at toy width."""


def tiny_llama_moe_config(**overrides: Any) -> LlamaMoEConfig:
    """A tiny LLaMA-MoE config (hidden 32, 2 layers, 8 experts, top-2, vocab 512 = the tiny tokenizer's size).

    Every other field keeps the published defaults (noisy ``mlp`` gate, balance loss 0.01, ``UniversalCalculator``);
    ``overrides`` replace any field, e.g. ``num_hidden_layers=4`` or ``size_experts=[[4, 12, ...], ...]``.
    """
    return LlamaMoEConfig(**{**TINY_LLAMA_MOE, **overrides})


def register_llama_moe() -> None:
    """Map ``model_type="llama_moe"`` to these classes in ``AutoConfig`` / ``AutoModel`` / ``AutoModelForCausalLM``.

    Idempotent (``exist_ok=True``): safe to call from several entry points. After it, ``from_pretrained`` on a
    LLaMA-MoE checkpoint directory uses this implementation without ``trust_remote_code``.
    """

    AutoConfig.register(LlamaMoEConfig.model_type, LlamaMoEConfig, exist_ok=True)
    AutoModel.register(LlamaMoEConfig, LlamaMoEModel, exist_ok=True)
    AutoModelForCausalLM.register(LlamaMoEConfig, LlamaMoEForCausalLM, exist_ok=True)


__all__ = [
    "TINY_LLAMA_MOE",
    "BaseMoEModelOutputWithPast",
    "LinearGLUExperts",
    "LinearGLUMoELayer",
    "LlamaMoEConfig",
    "LlamaMoEDecoderLayer",
    "LlamaMoEForCausalLM",
    "LlamaMoEModel",
    "LlamaMoEPreTrainedModel",
    "MoECausalLMOutputWithPast",
    "MoEMlpOutput",
    "TopKBalancedNoisyGate",
    "UniversalCalculator",
    "register_llama_moe",
    "tiny_llama_moe_config",
]
