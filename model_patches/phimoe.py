"""PhiMoE / Phi-3.5-MoE (``transformers/models/phimoe/modeling_phimoe.py``, v5.25).

Every ``model.layers[i].mlp`` is a ``PhimoeSparseMoeBlock``; router ``mlp.router`` (``PhimoeTopKRouter``, an
``nn.Linear`` ``[E, H]``) chooses two experts with **sparsemixer** (:mod:`model_patches.sparsemixer`): the best
logit, then the best of the rest, each weighted by a softmax over the logits within a relative threshold
(``router_jitter_noise``) of the pick; in training both picks are Gumbel samples and the weights carry a Heun-method
gradient, and the router multiplies its input by a uniform jitter (``input_jitter_noise``) first.  C2R restricts the
second pick to the first expert's allowed set — exact at eval; in training it restricts the *sampling*, the weights
staying the family's.  The causal LM adds transformers' load-balancing loss.
"""

from model_patches.registry import register
from model_patches.spec import FamilySpec
from model_patches.spec import RoutingRule

PHIMOE = register(
    FamilySpec(
        name="phimoe",
        model_types=("phimoe",),
        block_classes=("PhimoeSparseMoeBlock",),
        routing=RoutingRule(score="logits", selection="sparsemixer", jitter="router_jitter_noise",
                            input_jitter="input_jitter_noise"),
        router_attr="router",
        gate_substring_note="fused experts mlp.experts.gate_up_proj; the router is 'router'",
    )
)
