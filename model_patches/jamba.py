"""Jamba in transformers 5 (``transformers/models/jamba/modeling_jamba.py``, v5.24.0).

A hybrid: each decoder layer is a Mamba or an attention layer (``attn_layer_period`` / ``attn_layer_offset``), and its
``feed_forward`` is a ``JambaSparseMoeBlock`` on the layers ``expert_layer_offset + n * expert_layer_period``, a dense
``JambaMLP`` elsewhere.  Router ``feed_forward.router`` (``JambaTopKRouter``, weight ``[E, H]``): float32 softmax over
all experts, top-k, **not** renormalised, weights cast to the hidden states' dtype (the logits' dtype).  Experts
``feed_forward.experts``: fused ``gate_up_proj [E, 2I, H]``, ``down_proj [E, H, I]``.
"""

from model_patches.registry import register
from model_patches.spec import FamilySpec
from model_patches.spec import RoutingRule

JAMBA = register(
    FamilySpec(
        name="jamba",
        model_types=("jamba",),
        block_classes=("JambaSparseMoeBlock",),
        routing=RoutingRule(renormalize=False, weights_dtype="logits"),
        block_attr="feed_forward",
        router_attr="router",
        gate_substring_note=(
            "fused experts feed_forward.experts.gate_up_proj (gate AND up halves) and gate_proj of dense "
            "feed_forward layers; the router feed_forward.router.weight has no 'gate' in its name"
        ),
    )
)
