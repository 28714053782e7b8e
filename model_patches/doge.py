"""Doge with ``is_moe`` (``transformers/models/doge/modeling_doge.py``, v5.25): product-key retrieval experts.

Every ``model.layers[i].mlp`` is a ``DogeCDMoE``: a dense shared MLP (``gate_proj`` / ``up_proj`` / ``down_proj``)
plus ``E`` routed experts that are single hidden units — rows of two embeddings, ``down_embed`` and ``up_embed``
(``[E, H]`` each: expert ``e`` adds ``act(down_embed[e] · h) · w_e · up_embed[e]``).  The router is the bias-free
linear ``router_gate`` scoring ``2 · √E`` *keys*, not ``E`` experts: the block views its output as ``[2, N, √E]``,
expert ``(i, j)`` scores key ``i`` of the first half + key ``j`` of the second, and the block itself takes the top-k
of those ``E`` pair sums, a softmax over the k (renormalised iff ``norm_topk_prob``), inside its own ``forward``.

What this means for moepatch: each token does choose k of E experts, so the structure serves freezing (the
``router_gate`` weight), statistics (:func:`read_choice` recomputes the block's choice from the key scores, call for
call) and LoRA experts on the attention and the shared MLP.  The routed experts have no projection to adapt, and the
rule is refused by name (:data:`ROUTING_PROBLEM`).  The causal LM adds its own product-key balance loss.
"""

from __future__ import annotations

from typing import Any

import torch

from model_patches.registry import register
from model_patches.spec import FamilySpec
from model_patches.spec import RouterOutput
from model_patches.spec import RoutingRule

ROUTING_PROBLEM = (
    "DogeCDMoE routes by product keys: router_gate scores 2·√E keys, not E experts (expert (i, j) scores key i + key "
    "j), the block chooses the top-k of those sums inside its own forward (there is no router output or selection "
    "step to replace), and its view(2, N, √E) of the key scores mixes the keys of two tokens into each token's "
    "scores; moepatch's rule (an [E, H] logit weight, each token scored on its own) does not express it"
)


def read_choice(output: Any, top_k: int, num_experts: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(scores [N, E], chosen [N, k])`` from ``router_gate``'s output ``[B, S, 2·√E]``, computed as
    ``DogeCDMoE.forward`` computes them (same view, same top-k calls, so the same experts and order); each expert's
    score is its pair sum (``-inf`` for ids beyond ``√E²``, which the block never chooses)."""
    num_keys = output.shape[-1] // 2
    logits = output.view(2, -1, num_keys)
    (scores_x, scores_y), (indices_x, indices_y) = logits.topk(num_keys, dim=-1)
    all_scores = scores_x.unsqueeze(-1) + scores_y.unsqueeze(-2)
    all_indices = indices_x.unsqueeze(-1) * num_keys + indices_y.unsqueeze(-2)
    all_scores = all_scores.view(*all_scores.shape[:-2], -1)
    all_indices = all_indices.view(*all_indices.shape[:-2], -1)
    _, position_indices = all_scores.topk(top_k, dim=-1)
    chosen = all_indices.gather(-1, position_indices)
    scores = all_scores.new_full((all_scores.shape[0], num_experts), float("-inf")).scatter(1, all_indices, all_scores)
    return scores, chosen


DOGE = register(
    FamilySpec(
        name="doge",
        model_types=("doge",),
        block_classes=("DogeCDMoE",),
        routing=RoutingRule(renormalize="^norm_topk_prob"),
        routing_problem=ROUTING_PROBLEM,
        router_attr="router_gate",
        experts_attr="down_embed",
        router_output=RouterOutput(reader=read_choice),
        num_experts_attr="^num_experts",
        top_k_attr="^top_k",
        expert_modules=("down_embed", "up_embed"),
        aux_loss_coef_attr=None,
        gate_substring_note="the router mlp.router_gate.weight and the shared MLP's mlp.gate_proj",
    )
)
