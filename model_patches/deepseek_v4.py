"""DeepSeek-V4 (``transformers/models/deepseek_v4/modeling_deepseek_v4.py``, v5.25).

Every ``model.layers[i].mlp`` is a ``DeepseekV4SparseMoeBlock``.  In the first layers (``mlp_layer_types ==
"hash_moe"``) its router is a ``DeepseekV4HashRouter``: the experts are a fixed ``tid2eid[input_ids]`` lookup — no
learned choice — and only their weights come from the learned scores; moepatch's statistics count those layers,
while C2R, freezing, the bias update and expert renumbering leave them out by name.  The other layers' router
``DeepseekV4TopKRouter``: logits of the hidden states; scores = the router's own ``score_fn`` (``scoring_func``,
sqrt-softplus by default); the selection adds the buffer ``e_score_correction_bias``; ``torch.topk(...,
sorted=False)``; weights = the chosen *unbiased* scores over their sum + 1e-20, times ``routed_scaling_factor``.
Experts ``mlp.experts`` fused; ``mlp.shared_experts`` on every token.  The causal LM adds transformers'
load-balancing loss.
"""

from model_patches.registry import register
from model_patches.spec import FamilySpec
from model_patches.spec import RoutingRule

DEEPSEEK_V4 = register(
    FamilySpec(
        name="deepseek_v4",
        model_types=("deepseek_v4",),
        block_classes=("DeepseekV4SparseMoeBlock",),
        routing=RoutingRule(score="module", score_module="score_fn", selection_bias="e_score_correction_bias",
                            sorted_topk=False, renormalize=True, renormalize_epsilon=1e-20,
                            scaling="routed_scaling_factor", weights_dtype="logits"),
        hashed_routers=("DeepseekV4HashRouter",),
        shared_expert_attrs=("shared_experts",),
        gate_substring_note="router mlp.gate.weight; fused experts mlp.experts.gate_up_proj (gate AND up halves)",
    )
)
