"""gpt-oss (``transformers/models/gpt_oss/modeling_gpt_oss.py``, v5.25).

Every ``model.layers[i].mlp`` is a ``GptOssMLP``.  Router ``mlp.router`` (``GptOssTopKRouter``): logits =
``F.linear(hidden, weight, bias)`` (a learned per-expert bias, part of the logits), top-k of the logits (sorted), then
softmax over the k chosen logits in their own dtype.  Experts ``mlp.experts`` (``GptOssExperts``): ``gate_up_proj
[E, H, 2I]`` with interleaved gate / up columns and biases, and a clamped SwiGLU in its ``_apply_gate`` — the fused
storage reads that layout from the decorator's flags, so LoRA experts on the routed experts add their gate / up
deltas on the even / odd columns before that gate.  The causal LM adds transformers' load-balancing loss.
"""

from model_patches.registry import register
from model_patches.spec import FamilySpec
from model_patches.spec import RoutingRule

GPT_OSS = register(
    FamilySpec(
        name="gpt_oss",
        model_types=("gpt_oss",),
        block_classes=("GptOssMLP",),
        routing=RoutingRule(logit_bias="bias", score="logits", score_dtype="logits", weights_from="softmax_of_chosen",
                            weights_dtype="logits"),
        router_attr="router",
        gate_substring_note="nothing named 'gate' is a router: router mlp.router.weight / .bias; experts gate_up_proj",
    )
)
