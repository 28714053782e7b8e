"""DeepSeek-V2 (``transformers/models/deepseek_v2/modeling_deepseek_v2.py``, v5.25).

``model.layers[i].mlp`` is a ``DeepseekV2Moe`` from layer ``first_k_dense_replace`` on (a dense ``DeepseekV2MLP``
before).  Router ``mlp.gate`` (``DeepseekV2TopkRouter``, float32 weight ``[E, H]``, ``E`` = ``n_routed_experts``):
hidden states and weight cast to float32, softmax over all experts; with ``topk_method="group_limited_greedy"`` the
experts form ``n_group`` groups scored by their best probability, only the ``topk_group`` best are kept (the others'
probabilities set to 0); ``torch.topk(..., sorted=False)``; **no** renormalisation (the router ignores the config's
``norm_topk_prob``); weights multiplied by ``routed_scaling_factor`` and kept in float32.  Experts ``mlp.experts``:
fused ``gate_up_proj`` / ``down_proj``; ``mlp.shared_experts`` always run.  The causal LM adds no balance loss.
"""

from model_patches.registry import register
from model_patches.spec import FamilySpec
from model_patches.spec import GroupLimit
from model_patches.spec import RouterRequirement
from model_patches.spec import RoutingRule

DEEPSEEK_V2 = register(
    FamilySpec(
        name="deepseek_v2",
        model_types=("deepseek_v2",),
        block_classes=("DeepseekV2Moe",),
        routing=RoutingRule(
            renormalize=False, weights_dtype="float32", logits_dtype="float32", sorted_topk=False,
            scaling="routed_scaling_factor",
            group_limit=GroupLimit(groups="num_group", kept_groups="topk_group", score="max", fill="0",
                                   when=("topk_method", "group_limited_greedy")),
        ),
        router_requirements=(
            RouterRequirement(
                attribute="topk_method",
                allowed=("greedy", "group_limited_greedy"),
                reason="the router chooses with another method than greedy or group-limited greedy top-k",
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
