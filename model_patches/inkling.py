"""Inkling (``transformers/models/inkling/modeling_inkling.py``, v5.25; ``model_type`` ``inkling_text``).

``model.layers[i].mlp`` is an ``InklingMoE`` where ``mlp_layer_types[i] == "sparse"`` (an ``InklingMLP`` elsewhere).
Router ``mlp.gate`` (``InklingTopkRouter``), autocast off: float32 logits ``F.linear(h.float(), W.float())`` of a
weight with ``n_routed_experts + n_shared_experts`` rows — the router also scores its shared experts; scores = sigmoid
of all of them, the selection = the routed experts' scores + the buffer ``e_score_correction_bias``,
``topk(sorted=False)``; weights = ``exp(lp − logsumexp(lp))`` of ``lp = logsigmoid`` of the k chosen *unbiased*
logits followed by the shared experts' logits (one normalisation over the k routed and the shared experts), ×
``route_scale`` × the learned ``global_scale`` (float32), cast to the activations' dtype.  It returns ``(routed
logits [N, E], weights [N, k], indices [N, k], shared_gammas [N, S])``; ``mlp.shared_experts`` scales its S experts by
those gammas.  Experts ``mlp.experts`` fused.  The causal LM adds no load-balancing loss.

The second Inkling (``inkling2_text``) routes the DeepSeek-V3 way without shared-expert scores: the generic family
probes it.
"""

from model_patches.registry import register
from model_patches.spec import FamilySpec
from model_patches.spec import RouterOutput
from model_patches.spec import RoutingRule

INKLING = register(
    FamilySpec(
        name="inkling",
        model_types=("inkling_text",),
        block_classes=("InklingMoE",),
        routing=RoutingRule(logits_dtype="float32", no_autocast=True, score="sigmoid",
                            selection_bias="e_score_correction_bias", sorted_topk=False,
                            weights_from="logsigmoid_softmax_of_chosen", shared_logits="n_shared_experts",
                            scaling="route_scale", weights_scale="global_scale", weights_dtype="input"),
        router_output=RouterOutput(scores_are="sigmoid_logits"),
        router_expert_parameters=("weight",),  # its last n_shared_experts rows score the shared experts
        shared_expert_attrs=("shared_experts",),
        aux_loss_coef_attr=None,
        training_switches=(),
        gate_substring_note="router mlp.gate.weight and mlp.gate.global_scale (its e_score_correction_bias is a "
                            "buffer); fused experts mlp.experts.gate_up_proj (gate AND up halves); "
                            "mlp.shared_experts.gate_proj; dense layers' mlp.gate_proj",
    )
)
