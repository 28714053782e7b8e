"""ZAYA (``transformers/models/zaya/modeling_zaya.py``, v5.25).

Every ``model.layers[i].mlp`` is a ``ZayaSparseMoeBlock``: router ``mlp.gate`` (``ZayaRouter``), experts
``mlp.experts`` (``ZayaExperts``, fused ``gate_up_proj [E, 2I, H]`` / ``down_proj [E, H, I]``).  The router is not a
linear layer: ``down_proj`` (with bias) to a router width, plus — from layer 1 on — the previous layer's router state
× ``router_states_scale`` (the state is carried from router to router through the decoder layers: the router returns
it as its fourth output), then an MLP (RMSNorm → ``fc1`` / ``fc2`` with GELU → ``out_proj``) scoring ``E`` experts
**and one skip class**; softmax over the ``E + 1`` classes in the logits' dtype; the selection is the top-k of the
float32 probabilities + the buffer ``balancing_biases`` (−1 on the skip class at init); the weights are the gathered
unbiased probabilities, and a token that chooses the skip class reaches the experts as expert 0 with weight 0.

The rule: the family's logit step (:func:`router_logits`, the router's own modules called as it calls them, which
also returns the state for the next layer), then the declared steps — softmax, float32 selection + bias, one
``torch.topk``, gathered probabilities, the skip class masked to expert 0 / weight 0 (``skip_class``).  So the
executor reproduces ``ZayaRouter.forward`` bit for bit, its fourth output included, and only the top-k is a seam.

**C2R.**  The skip class is no expert: it is in every allowed set, never masked.  The token's first choice is the
family's own (the best class, the skip class included); the allowed set is that of the token's first *expert* —
its first choice, or, where the skip class ranks first, the best expert by the same biased probabilities; the other
picks are the best allowed classes by the family's own ``topk`` on the masked vector; the weights are the gathered
unmasked probabilities.  The published ZAYA routes top-1 (its config refuses any other ``k``), where C2R keeps the
first choice and so changes nothing; the rule is exact for every ``k`` (the tests run it at ``k = 2``).

Statistics count a skip as "no expert" and sum each expert's probability over the ``E + 1`` classes.  A renumbering
of the experts moves the first ``E`` rows of ``router_mlp.out_proj.weight`` and entries of ``balancing_biases`` and
leaves the skip class's in place.  The causal LM adds no load-balancing loss; ``balancing_biases`` is a selection
bias over ``E + 1`` classes, which the aux-loss-free bias update (one entry per expert) does not move.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any
from typing import Protocol

import torch

from model_patches.registry import register
from model_patches.spec import FamilySpec
from model_patches.spec import RouterOutput
from model_patches.spec import RoutingRule


class _ZayaRouter(Protocol):
    """What :func:`router_logits` reads from a ``ZayaRouter``."""

    down_proj: Callable[[torch.Tensor], torch.Tensor]
    router_mlp: Callable[[torch.Tensor], torch.Tensor]
    use_eda: bool
    router_states_scale: torch.Tensor


def router_logits(router: _ZayaRouter, hidden_states: torch.Tensor,
                  router_states: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``ZayaRouter``'s logit step as its ``forward`` computes it: ``(logits [B, S, E + 1], state for the next layer's
    router)``, from the block's ``[B, S, H]`` hidden states and the previous layer's state (``None`` in layer 0)."""
    seq_length = hidden_states.shape[1]
    router_hidden_states = router.down_proj(hidden_states)
    if router.use_eda and router_states is not None:
        router_hidden_states = router_hidden_states + router_states * router.router_states_scale
    carried = router_hidden_states[:, -seq_length:].clone()
    return router.router_mlp(router_hidden_states), carried


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
        routing=RoutingRule(logits_function=router_logits, score="softmax", score_dtype="logits",
                            selection_dtype="float32", selection_bias="balancing_biases", skip_class=True),
        router_output=RouterOutput(scores_are="probabilities", reader=read_choice),
        router_weight_attr="router_mlp.out_proj.weight",
        router_expert_parameters=("router_mlp.out_proj.weight",),  # E expert rows, then the skip class's
        aux_loss_coef_attr=None,
        training_switches=(),
        gate_substring_note=("the router mlp.gate.* (down_proj, router_mlp, router_states_scale; its balancing_biases "
                             "is a buffer) and the fused experts mlp.experts.gate_up_proj (gate AND up halves)"),
    )
)
