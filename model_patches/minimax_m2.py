"""MiniMax-M2 (``transformers/models/minimax_m2/modeling_minimax_m2.py``, v5.25).

Every ``model.layers[i].mlp`` is a ``MiniMaxM2SparseMoeBlock``; it keeps the selection bias
``e_score_correction_bias`` itself and passes it to its router: ``gate(hidden, self.e_score_correction_bias)``.
Router ``mlp.gate`` (``MiniMaxM2TopKRouter``): logits of the hidden states cast to the weight's dtype; scores =
sigmoid of the float32 logits; selection = scores + bias, ``torch.topk(..., sorted=False)``; weights = the chosen
*unbiased* scores divided by their sum (no epsilon), kept in float32.  Experts ``mlp.experts`` fused.  Optional input
jitter (training) is the block's and left alone.  The causal LM adds transformers' load-balancing loss.
"""

from model_patches.registry import register
from model_patches.spec import FamilySpec
from model_patches.spec import RouterOutput
from model_patches.spec import RoutingRule

MINIMAX_M2 = register(
    FamilySpec(
        name="minimax_m2",
        model_types=("minimax_m2",),
        block_classes=("MiniMaxM2SparseMoeBlock",),
        routing=RoutingRule(logits_dtype="weight", score="sigmoid", selection_bias="^e_score_correction_bias",
                            selection_bias_argument=1, sorted_topk=False, renormalize=True, weights_dtype="float32"),
        router_output=RouterOutput(scores_are="sigmoid_logits"),
        gate_substring_note="router mlp.gate.weight (the block's e_score_correction_bias is a buffer); fused experts",
    )
)
