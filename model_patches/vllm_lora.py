"""What vLLM serves LoRA on, per model type: family knowledge the vLLM export reads (read from vLLM's model
implementations: ``SupportsLoRA``, ``packed_modules_mapping`` and their linear layers)."""

from __future__ import annotations

VLLM_ARCHITECTURES = {
    "qwen2_moe": "Qwen2MoeForCausalLM",
    "qwen3_moe": "Qwen3MoeForCausalLM",
    "mixtral": "MixtralForCausalLM",
    "olmoe": "OlmoeForCausalLM",  # LoRA in recent vLLM releases only
    "deepseek_v2": "DeepseekV2ForCausalLM",
    "deepseek_v3": "DeepseekV3ForCausalLM",
    "phimoe": "PhiMoEForCausalLM",
}
"""Model types whose vLLM implementation takes LoRA (``SupportsLoRA``), with the class vLLM serves them by."""
_ATTENTION = frozenset({"q_proj", "k_proj", "v_proj", "o_proj"})
_MLP = frozenset({"gate_proj", "up_proj", "down_proj"})
_MLA = frozenset({"q_proj", "q_a_proj", "q_b_proj", "kv_a_proj_with_mqa", "o_proj"})
VLLM_LORA_MODULES: dict[str, frozenset[str]] = {
    "qwen2_moe": _ATTENTION | _MLP,  # the shared expert and dense layers; not shared_expert_gate (a plain Linear)
    "qwen3_moe": _ATTENTION | _MLP,  # gate/up/down exist only in mlp_only_layers
    "mixtral": _ATTENTION,  # no dense MLP
    "olmoe": _ATTENTION,
    "deepseek_v2": _MLA | _MLP,  # dense and shared_experts MLPs; kv_b_proj loads but has no effect under MLA
    "deepseek_v3": _MLA | _MLP,
    "phimoe": _ATTENTION,
}
"""Per architecture, the module names vLLM loads LoRA on outside the routed experts — its linear layers, packed
ones unpacked (``qkv_proj`` → ``q_proj`` / ``k_proj`` / ``v_proj``, ``gate_up_proj`` → ``gate_proj`` / ``up_proj``,
``fused_qkv_a_proj`` → ``q_a_proj`` / ``kv_a_proj_with_mqa``).  vLLM checks the last name of every safetensors key
against its list and refuses the adapter on any other (``expected target modules in ... but received ...``)."""
VLLM_NOT_LOADED = {
    "kv_b_proj": "vLLM's MLA attention absorbs kv_b_proj into its kernels: a LoRA on it loads but has no effect",
    "shared_expert_gate": "a plain Linear in vLLM's Qwen2-MoE, not a LoRA layer",
    "lm_head": "the LM head is not a LoRA layer of this architecture in vLLM",
    "embed_tokens": "the embeddings are not a LoRA layer of this architecture in vLLM",
}
"""Why some names vLLM does not serve are refused (the reason shown with the refusal)."""
