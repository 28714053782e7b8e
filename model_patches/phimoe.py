"""PhiMoE / Phi-3.5-MoE (``transformers/models/phimoe/modeling_phimoe.py``, v5.25).

Every ``model.layers[i].mlp`` is a ``PhimoeSparseMoeBlock``; router ``mlp.router`` (``PhimoeTopKRouter``, an
``nn.Linear``) chooses with **sparsemixer** (Liu et al., 2024): the first expert is the best logit, the second the
best after masking it, each weight a softmax over the logits within a relative threshold of that pick; in training
both picks are Gumbel *samples* and the weights carry a Heun-method gradient.  The structure serves every feature
that needs only where routers and experts are; the selection override (C2R) and the balance loss on the actual
choice are not implemented for sparsemixer yet and refuse with that reason.  The causal LM adds transformers'
load-balancing loss.
"""

from model_patches.registry import register
from model_patches.spec import FamilySpec
from model_patches.spec import RoutingRule

PHIMOE = register(
    FamilySpec(
        name="phimoe",
        model_types=("phimoe",),
        block_classes=("PhimoeSparseMoeBlock",),
        routing=RoutingRule(score="logits"),
        routing_problem=("PhimoeTopKRouter chooses with sparsemixer (two sequential, thresholded picks, sampled in "
                         "training), which moepatch's routing rule does not express yet"),
        router_attr="router",
        hidden_dim_attr="in_features",
        gate_substring_note="fused experts mlp.experts.gate_up_proj; the router is 'router'",
    )
)
