"""HunYuan-MoE-V1 in transformers 5 (``transformers/models/hunyuan_v1_moe/modeling_hunyuan_v1_moe.py``, v5.24.0).

Every ``model.layers[i].mlp`` is a ``HunYuanMoEV1Moe``.  Router ``mlp.gate`` (``HunYuanMoEV1Gate``) holds its logit
weight in an ``nn.Linear`` ``wg`` (``[E, H]``, created in float32, no bias); ``E`` / ``k`` are the gate's
``num_experts`` / ``top_k`` (``num_experts`` / ``moe_topk``, per-layer lists allowed by the config: unequal ones are
refused).  When ``wg`` is float32 the hidden states are cast to float32 first; softmax over all experts in float32,
top-k, **always** renormalised, weights cast to the logits' dtype.  Experts ``mlp.experts``: fused ``gate_up_proj``,
``down_proj``; ``mlp.shared_mlp`` runs on every token.  The causal LM adds no load-balancing loss.
"""

from model_patches.registry import register
from model_patches.spec import FamilySpec
from model_patches.spec import RoutingRule

HUNYUAN_V1_MOE = register(
    FamilySpec(
        name="hunyuan_v1_moe",
        model_types=("hunyuan_v1_moe",),
        block_classes=("HunYuanMoEV1Moe",),
        routing=RoutingRule(renormalize=True, weights_dtype="logits", logits_dtype="float32_if_weight_is"),
        router_weight_attr="wg.weight",
        shared_expert_attrs=("shared_mlp",),
        aux_loss_coef_attr=None,
        training_switches=(),
        gate_substring_note=(
            "router mlp.gate.wg.weight; fused experts mlp.experts.gate_up_proj (gate AND up halves); "
            "shared_mlp.gate_proj"
        ),
    )
)
