"""ERNIE 4.5 MoE (``transformers/models/ernie4_5_moe/modeling_ernie4_5_moe.py``, v5.25).

``model.layers[i].mlp`` is an ``Ernie4_5_MoeSparseMoeBlock`` on its MoE layers.  Router ``mlp.gate``
(``Ernie4_5_MoeTopKRouter``), run with autocast off: float32 logits, float32 softmax over all experts; the selection
adds ``moe_statics.e_score_correction_bias`` (a frozen parameter ``[1, E]``); top-k (sorted); weights = the chosen
*unbiased* probabilities divided by ``clamp(sum, min=norm_min)``, cast to the hidden states' dtype.  Experts
``mlp.experts`` fused; ``mlp.shared_experts`` on every token.  The causal LM adds transformers' load-balancing loss.
"""

from model_patches.registry import register
from model_patches.spec import FamilySpec
from model_patches.spec import RoutingRule

ERNIE4_5_MOE = register(
    FamilySpec(
        name="ernie4_5_moe",
        model_types=("ernie4_5_moe",),
        block_classes=("Ernie4_5_MoeSparseMoeBlock",),
        routing=RoutingRule(logits_dtype="float32", selection_bias="moe_statics.e_score_correction_bias",
                            renormalize=True, renormalize_min="norm_min", weights_dtype="input", no_autocast=True),
        shared_expert_attrs=("shared_experts",),
        gate_substring_note=(
            "router mlp.gate.weight and its moe_statics.e_score_correction_bias (frozen already); fused experts "
            "mlp.experts.gate_up_proj; shared_experts.gate_proj; gate_proj of dense layers"
        ),
    )
)
