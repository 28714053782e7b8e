"""MiniMax in transformers 5 (``transformers/models/minimax/modeling_minimax.py``, v5.24.0): Mixtral's router.

Every ``model.layers[i].mlp`` is a ``MiniMaxSparseMoeBlock`` (the token mixer alternates lightning linear attention
and full attention).  Router ``mlp.gate`` (``MiniMaxTopKRouter``, weight ``[E, H]``, ``E`` from
``num_local_experts``): softmax over all experts of the float32 logits, top-k, **always** renormalised over the k,
weights kept in float32.  Optional input jitter (training only) is applied by the block before the router and left
alone.  Experts ``mlp.experts``: fused ``gate_up_proj [E, 2I, H]``, ``down_proj [E, H, I]``.
"""

from model_patches.registry import register
from model_patches.spec import FamilySpec
from model_patches.spec import RoutingRule

MINIMAX = register(
    FamilySpec(
        name="minimax",
        model_types=("minimax",),
        block_classes=("MiniMaxSparseMoeBlock",),
        routing=RoutingRule(renormalize=True, weights_dtype="float32"),
        gate_substring_note="router mlp.gate.weight; fused experts mlp.experts.gate_up_proj (gate AND up halves)",
    )
)
