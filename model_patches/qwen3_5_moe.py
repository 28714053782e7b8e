"""Qwen3.5-MoE text model in transformers 5 (``transformers/models/qwen3_5_moe/modeling_qwen3_5_moe.py``, v5.24.0).

``Qwen3_5MoeForCausalLM`` (``model_type`` ``qwen3_5_moe_text``, and ``qwen3_5_moe`` through the causal-LM auto
mapping) has a ``Qwen3_5MoeTextModel`` whose every ``model.layers[i].mlp`` is a ``Qwen3_5MoeSparseMoeBlock`` (the
token mixer alternates Gated-DeltaNet linear attention and full attention; the MLP is always sparse).  Router
``mlp.gate`` (``Qwen3_5MoeTopKRouter``, weight ``[E, H]``): float32 softmax over all experts, top-k, **always**
renormalised (the router has no ``norm_topk_prob``), weights cast back to the logits' dtype.  Experts ``mlp.experts``:
fused ``gate_up_proj [E, 2I, H]`` / ``down_proj [E, H, I]``; a sigmoid-gated shared expert runs on every token.  The
multimodal ``Qwen3_5MoeForConditionalGeneration`` keeps the same text layers under ``model.language_model``; only the
causal LM is supported (load the text model with ``AutoModelForCausalLM``).
"""

from model_patches.registry import register
from model_patches.spec import FamilySpec
from model_patches.spec import RoutingRule

QWEN3_5_MOE = register(
    FamilySpec(
        name="qwen3_5_moe",
        model_types=("qwen3_5_moe", "qwen3_5_moe_text"),
        block_classes=("Qwen3_5MoeSparseMoeBlock",),
        routing=RoutingRule(renormalize=True, weights_dtype="logits"),
        shared_expert_attrs=("shared_expert", "shared_expert_gate"),
        gate_substring_note=(
            "router mlp.gate.weight; fused experts mlp.experts.gate_up_proj (gate AND up halves: one tensor); "
            "shared_expert.gate_proj; shared_expert_gate"
        ),
    )
)
