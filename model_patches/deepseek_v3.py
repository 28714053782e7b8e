"""DeepSeek-V3 and the routers that copy it (``transformers/models/deepseek_v3/modeling_deepseek_v3.py``, v5.25).

Claims ``deepseek_v3`` (also every Kimi-K2 checkpoint, which reuses that ``model_type``), GLM-4.5 (``glm4_moe``),
GLM-4.7-Flash (``glm4_moe_lite``) and Kimi-Linear (``kimi_linear``): their routers are the same code.
``model.layers[i].mlp`` is the MoE block from layer ``first_k_dense_replace`` on.  Router ``mlp.gate``
(``*TopkRouter``, float32 weight ``[E, H]``): logits of the float32 hidden states; scores = sigmoid; the selection
adds the buffer ``e_score_correction_bias``; experts form ``n_group`` groups scored by the sum of their two best
biased scores, only the ``topk_group`` best groups are kept (the others masked to ``-inf``); ``torch.topk(...,
sorted=False)``; weights = the chosen *unbiased* sigmoid scores, renormalised when ``norm_topk_prob`` (sum + 1e-20),
times ``routed_scaling_factor``, kept in float32.  Experts ``mlp.experts``: fused ``gate_up_proj`` / ``down_proj``;
``mlp.shared_experts`` run on every token.  The causal LM adds no load-balancing loss (DeepSeek-V3 balances with the
bias, updated outside the model: :mod:`moepatch.routing.bias_update`).
"""

from model_patches.registry import register
from model_patches.spec import FamilySpec
from model_patches.spec import GroupLimit
from model_patches.spec import RouterOutput
from model_patches.spec import RoutingRule

DEEPSEEK_V3 = register(
    FamilySpec(
        name="deepseek_v3",
        model_types=("deepseek_v3", "glm4_moe", "glm4_moe_lite", "kimi_linear"),
        block_classes=("DeepseekV3MoE", "Glm4MoeMoE", "Glm4MoeLiteMoE", "KimiLinearMoE"),
        routing=RoutingRule(
            logits_dtype="float32", score="sigmoid", score_dtype="logits", selection_bias="e_score_correction_bias",
            group_limit=GroupLimit(groups="num_group", kept_groups="topk_group"), sorted_topk=False,
            renormalize="norm_topk_prob", renormalize_epsilon=1e-20, scaling="routed_scaling_factor",
            weights_dtype="float32",
        ),
        router_output=RouterOutput(scores_are="sigmoid_logits"),
        shared_expert_attrs=("shared_experts",),
        aux_loss_coef_attr=None,
        training_switches=(),
        gate_substring_note=(
            "router mlp.gate.weight (its e_score_correction_bias is a buffer); fused experts mlp.experts.gate_up_proj "
            "(gate AND up halves); shared_experts.gate_proj; gate_proj of the first_k_dense_replace dense layers"
        ),
    )
)
