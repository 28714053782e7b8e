"""Kolibri-1 and Kolibri-1.1 (``transformers/models/kolibri1{,_1}/modeling_kolibri1{,_1}.py``, v5.25).

``model.layers[i].mlp`` is a ``Kolibri1SparseMoeBlock`` / ``Kolibri1_1SparseMoeBlock``.  Router ``mlp.gate``
(``*TopKRouter``): float32 logits — on CUDA at inference, when the hidden states and the weight share a dtype,
``torch.mm(h, Wᵀ, out_dtype=float32)`` from a bf16 GEMM, else ``F.linear`` of both cast to float32; the selection adds
the buffer ``e_score_correction_bias`` to the **logits**; ``torch.topk`` (sorted); weights = the sigmoid of the chosen
*unbiased* logits, divided by their sum when ``norm_topk_prob`` (no epsilon), float32.  Experts ``mlp.experts`` fused;
``mlp.shared_experts`` on every token.  The causal LM adds no load-balancing loss.
"""

from model_patches.registry import register
from model_patches.spec import FamilySpec
from model_patches.spec import RouterOutput
from model_patches.spec import RoutingRule

KOLIBRI1 = register(
    FamilySpec(
        name="kolibri1",
        model_types=("kolibri1", "kolibri1_1"),
        block_classes=("Kolibri1SparseMoeBlock", "Kolibri1_1SparseMoeBlock"),
        routing=RoutingRule(logits_dtype="float32_mm_out", score="logits", selection_bias="e_score_correction_bias",
                            weights_from="sigmoid_of_chosen", renormalize="norm_topk_prob", weights_dtype="logits"),
        router_output=RouterOutput(scores_are="sigmoid_logits"),
        shared_expert_attrs=("shared_experts",),
        aux_loss_coef_attr=None,
        training_switches=(),
        gate_substring_note="router mlp.gate.weight (its e_score_correction_bias is a buffer); fused experts",
    )
)
