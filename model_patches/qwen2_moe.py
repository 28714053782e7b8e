"""Qwen2-MoE / Qwen1.5-MoE in transformers 5 (``transformers/models/qwen2_moe/modeling_qwen2_moe.py``, v5.24.0).

``model.layers[i].mlp`` is a ``Qwen2MoeSparseMoeBlock`` unless ``i`` is in ``mlp_only_layers`` or not a multiple of
``decoder_sparse_step`` (then a dense ``Qwen2MoeMLP``).  Router ``mlp.gate`` (``Qwen2MoeTopKRouter``, weight
``[E, H]``): float32 softmax over all experts, top-k, renormalised only when ``norm_topk_prob`` (false for
Qwen1.5-MoE-A2.7B), weights cast back to the logits' dtype.  Experts ``mlp.experts``: fused ``gate_up_proj
[E, 2I, H]`` and ``down_proj [E, H, I]``.  A sigmoid-gated shared expert runs on every token.
"""

from model_patches.registry import register
from model_patches.spec import FamilySpec
from model_patches.spec import RoutingRule

QWEN2_MOE = register(
    FamilySpec(
        name="qwen2_moe",
        model_types=("qwen2_moe",),
        block_classes=("Qwen2MoeSparseMoeBlock",),
        routing=RoutingRule(renormalize="norm_topk_prob", weights_dtype="logits"),
        shared_expert_attrs=("shared_expert", "shared_expert_gate"),
        gate_substring_note=(
            "router mlp.gate.weight; fused experts mlp.experts.gate_up_proj (gate AND up halves: one tensor); "
            "shared_expert.gate_proj; shared_expert_gate; gate_proj of dense MLP layers"
        ),
    )
)
