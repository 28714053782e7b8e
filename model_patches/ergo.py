"""Ergo (``transformers/models/ergo/modeling_ergo.py``, v5.25).

``model.layers[i].mlp`` is an ``ErgoMoE`` on its MoE layers.  Router ``mlp.gate`` (``ErgoTopkRouter``): the logits come
from its own ``linear`` (``ErgoLinearWithFP32Output``: operands rounded to the activations' dtype, accumulated in
float32 with autocast off — a bf16 GEMM with float32 output on CUDA at inference), so the rule calls that module;
scores = sigmoid; the selection adds the buffer ``e_score_correction_bias``; ``topk(sorted=False)``; weights = the
chosen *unbiased* scores over their sum + 1e-20, × ``moe_routed_scaling_factor``, rounded to the activations' dtype
and returned in float32.  Experts ``mlp.experts`` fused; ``mlp.shared_experts`` on every token.  Each expert's output
is RMS-normalised with its own learned scale (``mlp.experts.post_expert_norm.weight [E, H]``, indexed by the chosen
expert) before the weighted sum: a per-expert tensor that a renumbering of the experts moves with them.
"""

from model_patches.registry import register
from model_patches.spec import FamilySpec
from model_patches.spec import RouterOutput
from model_patches.spec import RoutingRule

ERGO = register(
    FamilySpec(
        name="ergo",
        model_types=("ergo",),
        block_classes=("ErgoMoE",),
        routing=RoutingRule(logits_module="linear", score="sigmoid", score_dtype="logits",
                            selection_bias="e_score_correction_bias", sorted_topk=False, renormalize=True,
                            renormalize_epsilon=1e-20, scaling="routed_scaling_factor", weights_dtype="input_float32"),
        router_output=RouterOutput(scores_are="sigmoid_logits"),
        num_experts_attr="linear.out_features",
        router_weight_attr="linear.weight",
        shared_expert_attrs=("shared_experts",),
        expert_modules=("experts", "experts.post_expert_norm"),  # post_expert_norm.weight [E, H]: one row per expert
        gate_substring_note="router mlp.gate.linear.weight (its e_score_correction_bias is a buffer); fused experts",
    )
)
