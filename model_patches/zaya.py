"""ZAYA (``transformers/models/zaya/modeling_zaya.py``, v5.25).

Every ``model.layers[i].mlp`` is a ``ZayaSparseMoeBlock``: router ``mlp.gate`` (``ZayaRouter``), experts
``mlp.experts`` (``ZayaExperts``, fused ``gate_up_proj [E, 2I, H]`` / ``down_proj [E, H, I]``).  The router is not a
linear layer: ``down_proj`` (with bias) to a router width, plus — from layer 1 on — the previous layer's router state
× ``router_states_scale`` (the state is carried from router to router through the decoder layers), then an MLP
(RMSNorm → ``fc1`` / ``fc2`` with GELU → ``out_proj``) scoring ``E`` experts **and one skip class**; softmax; the
selection adds the buffer ``balancing_biases`` (−1 on the skip class); the weights are the gathered unbiased
probabilities, and a token that chooses the skip class reaches the experts as expert 0 with weight 0.

What this means for moepatch: the structure serves every feature that only needs to know where routers and experts
are (freezing freezes the whole router MLP; LoRA experts; statistics, which count a skip as "no expert" and sum each
expert's probability over the ``E + 1`` classes).  The rule is refused by name (:data:`ROUTING_PROBLEM`): the
executor's logit step is one linear map of the token's own hidden state, and its choice is among ``E`` experts.
The causal LM adds no load-balancing loss.
"""

from __future__ import annotations

from typing import Any

import torch

from model_patches.registry import register
from model_patches.spec import FamilySpec
from model_patches.spec import RouterOutput
from model_patches.spec import RoutingRule

ROUTING_PROBLEM = (
    "ZayaRouter scores E experts + 1 skip class with an MLP (down_proj → RMSNorm → fc1 / fc2 GELU → out_proj) over the "
    "hidden states plus the previous layer's router state (router_states, carried from layer to layer), and a skip "
    "choice reaches the experts as expert 0 with weight 0; moepatch's rule (one linear logit step of the token's own "
    "hidden state, a choice among E experts) does not express it"
)


def read_choice(output: Any, top_k: int, num_experts: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(probabilities [N, E], chosen [N, k])`` from ``ZayaRouter``'s ``(logits [N, E + 1], weights, indices,
    state)``: the float32 softmax over the ``E + 1`` classes without the skip column, and each skip choice (which the
    router hands over as expert 0 with weight exactly 0) as the "no expert" index ``E``."""
    logits, weights, indices = output[0], output[1], output[2]
    probabilities = torch.softmax(logits, dim=-1, dtype=torch.float32)[..., :num_experts]
    skipped = (indices == 0) & (weights == 0)
    return probabilities, indices.masked_fill(skipped, num_experts)


ZAYA = register(
    FamilySpec(
        name="zaya",
        model_types=("zaya",),
        block_classes=("ZayaSparseMoeBlock",),
        routing=RoutingRule(),
        routing_problem=ROUTING_PROBLEM,
        router_output=RouterOutput(scores_are="probabilities", reader=read_choice),
        router_weight_attr="router_mlp.out_proj.weight",
        aux_loss_coef_attr=None,
        training_switches=(),
        gate_substring_note=("the router mlp.gate.* (down_proj, router_mlp, router_states_scale; its balancing_biases "
                             "is a buffer) and the fused experts mlp.experts.gate_up_proj (gate AND up halves)"),
    )
)
