"""Doge with ``is_moe`` (``transformers/models/doge/modeling_doge.py``, v5.25): product-key retrieval experts.

Every ``model.layers[i].mlp`` is a ``DogeCDMoE``: a dense shared MLP (``gate_proj`` / ``up_proj`` / ``down_proj``)
plus ``E`` routed experts that are single hidden units — rows of two embeddings, ``down_embed`` and ``up_embed``
(``[E, H]`` each: expert ``e`` adds ``act(down_embed[e] · h) · w_e · up_embed[e]``).  The router is the bias-free
linear ``router_gate`` scoring ``2 · √E`` *keys*, not ``E`` experts: the block views its output as ``[2, N, √E]``,
expert ``(i, j)`` scores key ``i`` of the first half + key ``j`` of the second, and the block itself takes the top-k
of those ``E`` pair sums, a softmax over the k (renormalised iff ``norm_topk_prob``), inside its own ``forward``.
That view splits the flat key scores, not each token, so each token's scores mix the keys of two tokens of the call
(:mod:`model_patches.product_keys` says which): reproduced bit for bit, never "fixed".

What this means for moepatch: the choice is deterministic and exact (:data:`ROUTING` with
``selection="product_keys"``).  The block has no selection step to replace, so a routing override (C2R) binds
:func:`routed_forward` — ``DogeCDMoE.forward`` call for call, the inline selection moved into a method — on the block
instance with the method (:func:`model_patches.product_keys.product_key_choice` with the override's allowed sets);
undoing it restores the class's forward.  It is bound only onto a block whose forward is transformers 5.25's
(:func:`published_forward`, compared bytecode for bytecode), so another version's computation is refused, never
silently replaced.  Statistics and the balance loss read the real choice where the block looks its experts up
(``down_embed(indices)``) and score each expert by its pair sum; the causal LM's own product-key balance loss
(:func:`balance_loss`) is kept, counting the chosen experts.  Renumbering experts is refused
(:data:`RENUMBERING_PROBLEM`).  The routed experts have no projection for LoRA experts to adapt.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from collections.abc import Sequence
from typing import Any
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import nn

from model_patches.product_keys import expert_scores
from model_patches.product_keys import key_view
from model_patches.registry import register
from model_patches.spec import BalanceLoss
from model_patches.spec import BlockSelection
from model_patches.spec import FamilySpec
from model_patches.spec import RouterRequirement
from model_patches.spec import RoutingRule

SELECTION_METHOD = "route_tokens_to_experts"
"""The method :func:`routed_forward` chooses through (``DogeCDMoE`` has none of its own: moepatch binds it)."""

RENUMBERING_PROBLEM = (
    "DogeCDMoE addresses its experts by product keys: expert i·√E + j is the pair (key i of router_gate's first half, "
    "key j of its second), so a renumbering of the experts would have to be one of the key ids, the same for both "
    "halves (the block's view uses each half as either): only √E! of the E! renumberings are, and moepatch does not "
    "renumber keys"
)


def published_forward(
    self,
    hidden_states: torch.Tensor,
    **kwargs,
) -> torch.Tensor:
    bsz, seq_len, _ = hidden_states.shape

    # get routing logits with router gate
    # Note: this split mixes router logits across tokens, so routing is not causal in a full forward pass
    # (token-by-token generation is unaffected). It is kept as-is so existing checkpoints give the same outputs.
    router_logits = self.router_gate(hidden_states).view(2, bsz * seq_len, -1)

    # get experts with the highest routing logits
    (scores_x, scores_y), (indices_x, indices_y) = router_logits.topk(self.num_keys, dim=-1)
    all_scores = scores_x.unsqueeze(-1) + scores_y.unsqueeze(-2)
    all_indices = indices_x.unsqueeze(-1) * self.num_keys + indices_y.unsqueeze(-2)
    all_scores = all_scores.view(*all_scores.shape[:-2], -1)
    all_indices = all_indices.view(*all_indices.shape[:-2], -1)
    scores, position_indices = all_scores.topk(self.top_k, dim=-1)
    indices = all_indices.gather(-1, position_indices)
    routing_weights = F.softmax(scores, dim=-1)
    if self.norm_topk_prob:
        routing_weights /= routing_weights.sum(dim=-1, keepdim=True)

    # mix routed experts states with shared expert states
    down_embed = self.down_embed(indices)
    up_embed = self.up_embed(indices)
    experts_weights = torch.matmul(down_embed, hidden_states.view(bsz * seq_len, -1, 1)).view(bsz * seq_len, -1)
    experts_weights = self.act_fn(experts_weights) * routing_weights
    experts_states = torch.matmul(experts_weights.view(bsz * seq_len, 1, -1), up_embed).view(bsz, seq_len, -1)
    hidden_states = self.down_proj(self.act_fn(self.gate_proj(hidden_states)) * self.up_proj(hidden_states))
    hidden_states = hidden_states + experts_states
    return hidden_states, router_logits  # type: ignore[return-value]  # verbatim: annotated Tensor upstream


published_forward.__doc__ = """``DogeCDMoE.forward`` of transformers 5.25, verbatim (comments included; docstring added
after the definition so that the code object is the published one's): the reference :func:`forward_problem` compares
a block's forward with, bytecode for bytecode.  Never called."""


class _DogeCDMoE(Protocol):
    """What :func:`routed_forward` calls on the ``DogeCDMoE`` block it is bound to (besides the selection method)."""

    router_gate: Callable[[torch.Tensor], torch.Tensor]
    down_embed: Callable[[torch.Tensor], torch.Tensor]
    up_embed: Callable[[torch.Tensor], torch.Tensor]
    act_fn: Callable[[torch.Tensor], torch.Tensor]
    gate_proj: Callable[[torch.Tensor], torch.Tensor]
    up_proj: Callable[[torch.Tensor], torch.Tensor]
    down_proj: Callable[[torch.Tensor], torch.Tensor]


def routed_forward(self: _DogeCDMoE, hidden_states: torch.Tensor, **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`published_forward` call for call, with its inline selection (from the key scores' ``topk`` to the
    renormalisation) replaced by ``self.route_tokens_to_experts(router_logits)``, which the routing override binds:
    :func:`~model_patches.product_keys.product_key_choice`, the same lines with the override's allowed sets."""
    bsz, seq_len, _ = hidden_states.shape

    # the same view as the block's: it mixes the key scores of two tokens into each row (model_patches.product_keys)
    router_logits = self.router_gate(hidden_states).view(2, bsz * seq_len, -1)

    routing_weights, indices = getattr(self, SELECTION_METHOD)(router_logits)

    down_embed = self.down_embed(indices)
    up_embed = self.up_embed(indices)
    experts_weights = torch.matmul(down_embed, hidden_states.view(bsz * seq_len, -1, 1)).view(bsz * seq_len, -1)
    experts_weights = self.act_fn(experts_weights) * routing_weights
    experts_states = torch.matmul(experts_weights.view(bsz * seq_len, 1, -1), up_embed).view(bsz, seq_len, -1)
    hidden_states = self.down_proj(self.act_fn(self.gate_proj(hidden_states)) * self.up_proj(hidden_states))
    hidden_states = hidden_states + experts_states
    return hidden_states, router_logits


_CODE_FLAGS = 0xFFFF
"""The code-object flags that describe the function itself (``CO_OPTIMIZED`` … ``CO_ASYNC_GENERATOR``); the higher
bits record ``__future__`` imports of the defining module."""


def _same_code(function: Any, reference: Callable[..., Any]) -> bool:
    """Whether ``function`` runs the same bytecode as ``reference`` (names, constants and arguments too): comments,
    layout and line numbers aside, the same computation."""
    code, want = getattr(function, "__code__", None), reference.__code__
    if code is None:
        return False
    fields = ("co_code", "co_names", "co_varnames", "co_consts", "co_argcount", "co_kwonlyargcount")
    # co_flags without the __future__ bits (this module's `annotations` import sets one; they change no bytecode)
    return all(getattr(code, name) == getattr(want, name) for name in fields) and (
        code.co_flags & _CODE_FLAGS) == (want.co_flags & _CODE_FLAGS)


def forward_problem(block: nn.Module) -> str | None:
    """Why :func:`routed_forward` cannot stand in for ``block``'s forward, or ``None``.

    The replacement reproduces transformers 5.25's ``DogeCDMoE.forward``; another version's (or remote code's)
    forward may compute otherwise, and an instance-level forward (another library's wrapper) would be dropped, so both
    are refused rather than replaced."""
    name = type(block).__name__
    own = block.__dict__.get("forward")
    if own is not None:
        return (f"{name}.forward is already replaced on the instance ({getattr(own, '__qualname__', own)!s}); "
                "moepatch would drop that replacement")
    if not _same_code(type(block).forward, published_forward):
        return (f"{name}.forward of this transformers is not the one moepatch reproduces (transformers 5.25's "
                "DogeCDMoE.forward, kept in model_patches/doge.py): moepatch would run another computation")
    return None


def balance_loss(
    gate_logits: Sequence[torch.Tensor], chosen: Sequence[torch.Tensor], num_experts: int, top_k: int,
    attention_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """``modeling_doge.load_balancing_loss_func`` (transformers 5.25) line for line, with each layer's experts the
    ``chosen [N, k]`` ones instead of the product-key top-k it recomputes from ``gate_logits`` (the blocks' ``[2, N,
    √E]`` views).  Its own normalisation is kept: tokens per expert divided by all ``N·k`` choices (``Σ f = 1``, not
    ``k``), probabilities the softmax over each row's ``K²`` pair sums scattered to expert ids.  With the family's own
    choice it equals transformers' value bit for bit."""
    num_keys = math.floor(math.sqrt(num_experts))
    compute_dtype = gate_logits[0].dtype
    compute_device = gate_logits[0].device
    layer_expert_indices = []
    layer_routing_weights = []

    for layer_gate_logits, expert_indices in zip(gate_logits, chosen, strict=True):
        layer_gate_logits = layer_gate_logits.to(compute_device)

        (scores_x, scores_y), (indices_x, indices_y) = layer_gate_logits.topk(num_keys, dim=-1)

        all_scores = scores_x.unsqueeze(-1) + scores_y.unsqueeze(-2)
        all_indices = indices_x.unsqueeze(-1) * num_keys + indices_y.unsqueeze(-2)
        all_scores = all_scores.view(*all_scores.shape[:-2], -1)
        all_indices = all_indices.view(*all_indices.shape[:-2], -1)

        expert_indices = expert_indices.to(compute_device).reshape(all_scores.shape[0], top_k)

        routing_weights = torch.zeros_like(all_scores).scatter(-1, all_indices, F.softmax(all_scores, dim=-1))

        layer_expert_indices.append(expert_indices)
        layer_routing_weights.append(routing_weights)
    all_expert_indices = torch.cat(layer_expert_indices, dim=0)
    all_routing_weights = torch.cat(layer_routing_weights, dim=0)

    if attention_mask is None:
        all_expert_indices = all_expert_indices.view(-1)
        tokens_per_expert = torch.zeros(num_experts, dtype=compute_dtype, device=compute_device)
        pad = torch.ones_like(all_expert_indices, dtype=compute_dtype, device=compute_device)
        tokens_per_expert = tokens_per_expert.scatter_add_(0, all_expert_indices, pad) / all_expert_indices.shape[0]
        router_prob_per_expert = torch.mean(all_routing_weights, dim=0)
    else:
        batch_size, sequence_length = attention_mask.shape
        num_hidden_layers = len(gate_logits)
        expert_attention_mask = (
            attention_mask[None, :, :, None]
            .expand((num_hidden_layers, batch_size, sequence_length, top_k))
            .reshape(-1)
            .to(compute_device)
        )
        all_expert_indices = all_expert_indices.view(-1)[expert_attention_mask.bool()]
        tokens_per_expert = torch.zeros(num_experts, dtype=compute_dtype, device=compute_device)
        pad = torch.ones_like(all_expert_indices, dtype=compute_dtype, device=compute_device)
        tokens_per_expert = tokens_per_expert.scatter_add_(0, all_expert_indices, pad) / torch.sum(
            expert_attention_mask
        )
        router_per_expert_attention_mask = (
            attention_mask[None, :, :, None]
            .expand((num_hidden_layers, batch_size, sequence_length, num_experts))
            .reshape(-1, num_experts)
            .to(compute_device)
        )
        router_prob_per_expert = torch.sum(all_routing_weights * router_per_expert_attention_mask, dim=0) / torch.sum(
            router_per_expert_attention_mask, dim=0
        )

    overall_loss = torch.sum(tokens_per_expert * router_prob_per_expert)
    return overall_loss * num_experts


def _is_square(value: Any) -> bool:
    return isinstance(value, int) and value > 0 and math.isqrt(value) ** 2 == value


ROUTING = RoutingRule(score="logits", selection="product_keys", renormalize="^norm_topk_prob")
"""Product keys: the top-k of the pair sums in the sorted keys' order, a softmax over the k sums, renormalised iff the
block's ``norm_topk_prob`` (:func:`model_patches.product_keys.product_key_choice`)."""

DOGE = register(
    FamilySpec(
        name="doge",
        model_types=("doge",),
        block_classes=("DogeCDMoE",),
        routing=ROUTING,
        router_attr="router_gate",
        experts_attr="down_embed",
        num_experts_attr="^num_experts",
        top_k_attr="^top_k",
        router_requirements=(
            RouterRequirement(
                attribute="^num_experts", holds=_is_square,
                reason="the product keys reach only ⌊√{value}⌋² of the {value} experts (DogeCDMoE never chooses the "
                       "others, and an allowed set could hold fewer than k reachable experts); a square expert "
                       "count is needed",
            ),
        ),
        selection_in_block=BlockSelection(method=SELECTION_METHOD, indices_argument=(0, "input"),
                                          forward=routed_forward, forward_problem=forward_problem,
                                          scores=expert_scores),
        expert_modules=("down_embed", "up_embed"),
        balance_loss=BalanceLoss(router_logits=key_view, loss=balance_loss),
        renumbering_problem=RENUMBERING_PROBLEM,
        gate_substring_note="the router mlp.router_gate.weight and the shared MLP's mlp.gate_proj",
    )
)

__all__ = ["DOGE", "RENUMBERING_PROBLEM", "ROUTING", "SELECTION_METHOD", "balance_loss", "forward_problem",
           "published_forward", "routed_forward"]
