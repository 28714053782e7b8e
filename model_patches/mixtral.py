"""Mixtral in transformers 5 (``transformers/models/mixtral/modeling_mixtral.py``, v5.24.0).

Every ``model.layers[i].mlp`` is a ``MixtralSparseMoeBlock`` (``block_sparse_moe`` in transformers 4).  Router
``mlp.gate`` (``MixtralTopKRouter``, weight ``[E, H]``): float32 softmax over all experts, top-k, **always**
renormalised over the k, weights kept in float32.  Optional input jitter (training only) is applied by the block
before the router and is left alone.  Experts ``mlp.experts``: fused ``gate_up_proj [E, 2I, H]``, ``down_proj``.
"""

from model_patches.registry import register
from model_patches.spec import FamilySpec
from model_patches.spec import RoutingRule

MIXTRAL = register(
    FamilySpec(
        name="mixtral",
        model_types=("mixtral",),
        block_classes=("MixtralSparseMoeBlock",),
        routing=RoutingRule(renormalize=True, weights_dtype="float32"),
        gate_substring_note="router mlp.gate.weight; fused experts mlp.experts.gate_up_proj (gate AND up halves)",
    )
)
