"""GraniteMoE and its variants (``transformers/models/granitemoe*/modeling_granitemoe*.py``, v5.25).

Claims ``granitemoe``, ``granitemoeshared``, ``granitemoehybrid`` and ``granitemoe_swa``.  The block is
``model.layers[i].block_sparse_moe``; router ``router`` (``*TopKRouter``): logits = ``F.linear(hidden, W).float()``,
top-k of the logits (sorted), softmax over the k chosen logits, cast to the hidden states' dtype.  Experts
``experts``: fused ``gate_up_proj [E, 2I, H]`` / ``down_proj``; GraniteMoeShared adds an always-on ``shared_mlp``
beside the block.  The causal LM adds transformers' load-balancing loss.
"""

from model_patches.registry import register
from model_patches.spec import FamilySpec
from model_patches.spec import RoutingRule

GRANITEMOE = register(
    FamilySpec(
        name="granitemoe",
        model_types=("granitemoe", "granitemoeshared", "granitemoehybrid", "granitemoe_swa"),
        block_classes=("GraniteMoeMoE", "GraniteMoeSharedMoE", "GraniteMoeHybridMoE", "GraniteMoeSWAMoE"),
        routing=RoutingRule(logits_cast="float32", score="logits", score_dtype="logits",
                            weights_from="softmax_of_chosen", weights_dtype="input"),
        block_attr="block_sparse_moe",
        router_attr="router",
        gate_substring_note="fused experts block_sparse_moe.experts.gate_up_proj; the router is 'router'",
    )
)
