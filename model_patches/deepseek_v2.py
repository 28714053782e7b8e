"""DeepSeek-V2 in its V2-Lite setting (``transformers/models/deepseek_v2/modeling_deepseek_v2.py``, v5.24.0).

``model.layers[i].mlp`` is a ``DeepseekV2Moe`` from layer ``first_k_dense_replace`` on (a dense ``DeepseekV2MLP``
before).  Router ``mlp.gate`` (``DeepseekV2TopkRouter``, float32 weight ``[E, H]``, ``E`` = ``n_routed_experts``):
hidden states and weight cast to float32, softmax over all experts, ``torch.topk(..., sorted=False)``, **no**
renormalisation (the router ignores the config's ``norm_topk_prob``), weights multiplied by
``routed_scaling_factor`` and kept in float32.  That is softmax → top-k only with ``topk_method="greedy"`` and
``routed_scaling_factor == 1.0`` (DeepSeek-V2-Lite); ``group_limited_greedy`` (grouped top-k) or another scale is
refused by name.  Experts ``mlp.experts``: fused ``gate_up_proj`` / ``down_proj``; ``mlp.shared_experts`` always run.
The causal LM adds no load-balancing loss.
"""

from model_patches.registry import register
from model_patches.spec import FamilySpec
from model_patches.spec import RouterRequirement
from model_patches.spec import RoutingRule

DEEPSEEK_V2 = register(
    FamilySpec(
        name="deepseek_v2",
        model_types=("deepseek_v2",),
        block_classes=("DeepseekV2Moe",),
        routing=RoutingRule(renormalize=False, weights_dtype="float32", logits_dtype="float32", sorted_topk=False),
        router_requirements=(
            RouterRequirement(
                attribute="topk_method",
                allowed=("greedy",),
                reason="only the greedy top-k is softmax → top-k (group_limited_greedy is a grouped top-k: experts "
                       "are chosen within the topk_group best of n_group groups)",
            ),
            RouterRequirement(
                attribute="routed_scaling_factor",
                allowed=(1.0,),
                reason="the top-k weights are multiplied by {value}; only 1.0 (DeepSeek-V2-Lite) is supported",
            ),
        ),
        shared_expert_attrs=("shared_experts",),
        aux_loss_coef_attr=None,
        training_switches=(),
        gate_substring_note=(
            "router mlp.gate.weight; fused experts mlp.experts.gate_up_proj (gate AND up halves); "
            "shared_experts.gate_proj; gate_proj of the first_k_dense_replace dense layers"
        ),
    )
)
