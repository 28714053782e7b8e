"""MoLM / ModuleFormer (IBM/ModuleFormer) for transformers 5, checkpoint-compatible with ``ibm/MoLM-*``.

The published package does not run on transformers 5 (it imports ``transformers.onnx`` and calls ``get_head_mask``,
both removed), and the ``ibm/MoLM-*`` checkpoints ship no code. This module is a clean re-implementation of the
published ModuleFormer code (IBM, ``ibm/ModuleFormer``) with the **published module tree, class names, parameter and
buffer names and shapes**, so real checkpoints load with no missing or unexpected keys, and the published forward
semantics:

* no positional encoding; order comes only from causal *stick-breaking* attention (sigmoid, no softmax, no
  normalisation), computed in the published op order (log-space sum through a triangular matmul, then ``exp``);
* a mixture of attention heads (``attn.q_proj``, an :class:`MoE` used through :meth:`MoE.map` /
  :meth:`MoE.reduce`) and a mixture of MLP experts (``mlpf``), both with 3-D ``[E, in, out]`` expert weights;
* gating: an MLP gate, softmax over **all** experts in the activation dtype, then top-k of the raw probabilities
  (no renormalisation, no scale, optional ``sample_topk`` sampling in training), with the ``mi`` / ``switch``
  auxiliary loss computed on every call and added to the LM loss only when ``aux_loss_weight > 0``.

transformers-5 adaptations (no change to the maths): a :class:`~transformers.DynamicCache` replaces the tuple
history (each layer stores its detached keys/values as ``[B, 1, S, att_hidden]``), ``cache=`` replaces
``past_key_values=`` (still accepted as a deprecated alias), hidden states / attentions are captured with the
library's output recorders, blocks are :class:`~transformers.modeling_layers.GradientCheckpointingLayer`.

**Routing patch point.** Every expert choice of every MoE goes through :meth:`top_k_gating.select_experts`
(``(probs [N, E], k) -> (top_k_gates [N, k], top_k_indices [N, k])``).  Override it per gate instance (assign a
callable with that signature to ``gate.select_experts``) to change routing; the gate's output, the dispatch and the
routing attributes all follow its result.  Routing information lives on module attributes, as in the published code:
``mlpf.expert_size`` (list, tokens per expert), ``mlpf.batch_gates``, ``mlpf.batch_index``,
``mlpf.index_sorted_experts``, ``mlpf.top_k_gates``, ``mlpf.gate.loss`` (same for ``attn.q_proj``), and a forward
hook on ``mlpf.gate`` receives ``(top_k_indices, top_k_gates, probs)``.
"""

from __future__ import annotations

import math
from typing import Any
from typing import cast

import torch
import torch.nn.functional as F
import transformers.initialization as init
from torch import nn
from transformers.activations import get_activation
from transformers.cache_utils import Cache
from transformers.cache_utils import DynamicCache
from transformers.generation import GenerationMixin
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import BaseModelOutputWithPast
from transformers.modeling_outputs import CausalLMOutputWithPast
from transformers.modeling_utils import PreTrainedModel
from transformers.modeling_utils import slice_logits_to_keep
from transformers.utils import can_return_tuple
from transformers.utils.deprecation import deprecate_kwarg
from transformers.utils.generic import merge_with_config_defaults
from transformers.utils.output_capturing import OutputRecorder
from transformers.utils.output_capturing import capture_outputs

from moepatch.loading.autopatch import AppliesMoePatchOnLoad
from moepatch.models.moduleformer.configuration_moduleformer import ModuleFormerConfig

__all__ = [
    "MoE",
    "ModuleFormerAttention",
    "ModuleFormerBlock",
    "ModuleFormerForCausalLM",
    "ModuleFormerModel",
    "ModuleFormerPreTrainedModel",
    "ParallelExperts",
    "compute_gating",
    "stickbreaking_attention",
    "top_k_gating",
]

MI_LOSS_EPS = 1e-8
"""Inside ``log(p_e + eps)`` of the ``mi`` loss (published value)."""

SAMPLE_TOPK_EPS = 1e-6
"""Added to the probabilities before multinomial sampling in ``sample_topk`` mode (published value)."""

SWITCH_ZLOSS_WEIGHT = 0.1
"""Weight of the z-loss term of the ``switch`` aux loss (published value)."""


# --------------------------------------------------------------------------------------------------------------------
# Experts, gate, dispatch
# --------------------------------------------------------------------------------------------------------------------


class ParallelExperts(nn.Module):
    """``E`` bias-free linear maps stored as one ``weight [E, in, out]`` (published layout, *not* transposed).

    Rows must arrive grouped by expert (``expert_size[e]`` consecutive rows for expert ``e``, in expert order); each
    group is multiplied by ``weight[e]`` with one ``mm``, which is the published per-expert GEMM order.
    """

    def __init__(self, num_experts: int, input_size: int, output_size: int) -> None:
        super().__init__()
        self.num_experts = num_experts
        self.input_size = input_size
        self.output_size = output_size
        self.weight = nn.Parameter(torch.empty(num_experts, input_size, output_size))

    def extra_repr(self) -> str:
        return f"num_experts={self.num_experts}, input_size={self.input_size}, output_size={self.output_size}"

    def forward(self, inputs: torch.Tensor, expert_size: list[int]) -> torch.Tensor:
        """``inputs [sum(expert_size), in]`` grouped by expert → ``[sum(expert_size), out]``."""
        input_list = inputs.split(expert_size, dim=0)  # E groups of [n_e, in]
        output_list = [torch.mm(input_list[e], self.weight[e]) for e in range(self.num_experts)]  # [n_e, out]
        return torch.cat(output_list, dim=0)


def compute_gating(
    k: int, probs: torch.Tensor, top_k_gates: torch.Tensor, top_k_indices: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Turn per-token choices into the expert-grouped dispatch order used by :class:`ParallelExperts`.

    The (token, slot) pairs are flattened token-major (pair ``(t, s)`` at ``t * k + s``) and sorted by expert id
    with the default (non-stable) sort, as published: the sort order fixes the GEMM row order and the
    ``index_add`` summation order, so it is part of bitwise parity.  ``expert_size`` is a ``bincount`` of the chosen
    ids, equal to the published per-token count whenever a token's ``k`` choices are distinct, and still consistent
    with the dispatch (``sum == N * k``) if a routing override repeats an expert.

    Args:
        k: experts per token.
        probs: ``[N, E]`` gate probabilities (only ``E`` is read).
        top_k_gates: ``[N, k]`` weights of the chosen experts.
        top_k_indices: ``[N, k]`` chosen expert ids.

    Returns:
        ``(batch_gates [N*k], batch_index [N*k], expert_size [E], index_sorted_experts [N*k])``: gate and token of
        every dispatched row in expert order, the number of rows per expert, and each row's flat (token, slot)
        position.
    """
    top_k_experts = top_k_indices.flatten()  # [N*k] token-major
    expert_size = torch.bincount(top_k_experts, minlength=probs.size(1))  # [E] tokens routed to each expert
    _, index_sorted_experts = top_k_experts.sort(0)  # [N*k] flat (t, s) positions, grouped by expert
    batch_index = index_sorted_experts.div(k, rounding_mode="trunc")  # [N*k] token of each row
    batch_gates = top_k_gates.flatten()[index_sorted_experts]  # [N*k] gate of each row
    return batch_gates, batch_index, expert_size, index_sorted_experts


class top_k_gating(nn.Module):  # noqa: N801 - published class name; moepatch family specs match class names
    """The ModuleFormer router (published name ``top_k_gating``).

    ``w_gate`` is ``Sequential(Linear(+bias), GELU (exact erf), Dropout, Linear(no bias))`` for ``gate_type="mlp"``
    (keys ``w_gate.0.weight``, ``w_gate.0.bias``, ``w_gate.3.weight``) or ``Sequential(Linear(no bias))`` for
    ``"linear"``.  ``forward`` returns ``(top_k_indices [N, k], top_k_gates [N, k], probs [N, E])`` and leaves the
    auxiliary loss of this call in :attr:`loss`.

    The choice of experts is isolated in :meth:`select_experts`, the **routing patch point**.
    """

    def __init__(
        self,
        input_size: int,
        num_experts: int,
        top_k: int,
        *,
        dropout: float = 0.0,
        hidden_size: int = 256,
        sample_topk: int = 0,
        aux_loss: str = "mi",
        gate_type: str = "mlp",
    ) -> None:
        super().__init__()
        if not 0 <= sample_topk <= top_k:
            raise ValueError(f"sample_topk ({sample_topk}) must be in [0, top_k={top_k}].")
        self.input_size = input_size
        self.num_experts = num_experts
        self.top_k = top_k
        self.sample_topk = sample_topk
        self.aux_loss_type = aux_loss
        self.gate_type = gate_type
        if gate_type == "mlp":
            self.w_gate = nn.Sequential(
                nn.Linear(input_size, hidden_size),
                nn.GELU(),
                nn.Dropout(dropout),
                nn.Linear(hidden_size, num_experts, bias=False),
            )
        elif gate_type == "linear":
            self.w_gate = nn.Sequential(nn.Linear(input_size, num_experts, bias=False))
        else:
            # "gmm" exists in the published code but no MoLM checkpoint uses it and its initialisation is not
            # specified; refuse it loudly rather than load a half-understood layout.
            raise NotImplementedError(f"gate_type={gate_type!r} is not supported (use 'mlp' or 'linear').")
        self.loss: torch.Tensor | None = None

    def extra_repr(self) -> str:
        return f"k={self.top_k}, num_experts={self.num_experts}, sample_topk={self.sample_topk}"

    def select_experts(self, probs: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Routing patch point: choose ``k`` experts per token from the full probabilities.

        Override per instance (``gate.select_experts = fn`` with ``fn(probs, k) -> (gates, indices)``) to change
        routing.  ``gates`` must be ``probs`` gathered at ``indices``; it is used unchanged (ModuleFormer neither
        renormalises nor scales), so the returned pair *is* the routing decision: the gate's output, the dispatch,
        ``expert_size``/``batch_gates`` and the aux loss's routed counts all follow it.

        Default (published): top-k of the probabilities, sorted descending; in training with ``sample_topk > 0``,
        the top ``k - sample_topk`` by probability plus ``sample_topk`` experts sampled without replacement from
        the remaining ones (proportionally to ``probs + 1e-6``).

        Args:
            probs: ``[N, E]`` softmax over all experts, in the activation dtype.
            k: experts per token.

        Returns:
            ``(top_k_gates [N, k], top_k_indices [N, k] int64)``.
        """
        if self.training and self.sample_topk > 0:
            _, top_km1_indices = probs.topk(k - self.sample_topk, dim=1)  # [N, k - s] kept by probability
            masked_probs = probs + SAMPLE_TOPK_EPS  # [N, E] every expert keeps a chance
            masked_probs = masked_probs.scatter(1, top_km1_indices, 0)  # [N, E] exclude the kept ones
            k_indices = torch.multinomial(masked_probs, self.sample_topk)  # [N, s] sampled, no replacement
            top_k_indices = torch.cat([top_km1_indices, k_indices], dim=-1)  # [N, k]
            top_k_gates = torch.gather(probs, 1, top_k_indices)  # [N, k] raw probabilities
            return top_k_gates, top_k_indices
        return torch.topk(probs, k, dim=-1)  # ([N, k] probabilities, [N, k] ids), descending

    def compute_aux_loss(
        self, probs: torch.Tensor, logits: torch.Tensor, top_k_gates: torch.Tensor, top_k_indices: torch.Tensor
    ) -> torch.Tensor:
        """The published auxiliary loss of one gate call (``mi`` or ``switch``) (as the published code computes it)."""
        num_tokens = probs.size(0)
        if self.aux_loss_type == "mi":
            p_e = probs.sum(0) / num_tokens  # [E] mean routing distribution
            log_prob = torch.log_softmax(logits, dim=-1)  # [N, E]
            neg_h_e_given_x = (probs * log_prob).sum() / num_tokens  # scalar: -H(e|x)
            h_e = -(p_e * torch.log(p_e + MI_LOSS_EPS)).sum()  # scalar: H(e)
            return -(neg_h_e_given_x + h_e)  # H(e|x) - H(e) = -MI(e; x)
        gates = torch.zeros_like(probs).scatter(1, top_k_indices, top_k_gates)  # [N, E] sparse gates
        prob_sum = probs.sum(0)  # [E] P_e
        freq = (gates > 0).float().sum(0)  # [E] F_e: tokens routed to e
        switch = self.num_experts * ((prob_sum / prob_sum.sum()) * (freq / freq.sum())).sum()  # scalar
        z_loss = torch.log(torch.exp(logits).sum(dim=-1)).pow(2).mean()  # scalar, naive log-sum-exp as published
        return switch + SWITCH_ZLOSS_WEIGHT * z_loss

    def forward(
        self, x: torch.Tensor, skip_mask: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Route ``x [N, input_size]``; returns ``(top_k_indices [N, k], top_k_gates [N, k], probs [N, E])``."""
        logits = self.w_gate(x)  # [N, E]
        probs = torch.softmax(logits, dim=1)  # [N, E] over ALL experts, activation dtype (no fp32 upcast)
        if skip_mask is not None:
            keep = skip_mask.reshape(-1, 1) != 0  # [N, 1]
            probs = probs.masked_fill(~keep, 0)  # [N, E]
            logits = logits.masked_fill(~keep, 0)  # [N, E]
        top_k_gates, top_k_indices = self.select_experts(probs, self.top_k)  # [N, k], [N, k]
        self.loss = self.compute_aux_loss(probs, logits, top_k_gates, top_k_indices)
        return top_k_indices, top_k_gates, probs


class MoE(nn.Module):
    """A mixture of one-hidden-layer experts (published name ``MoE``): ``experts`` → activation → ``output_experts``.

    Used twice per block: as ``mlpf`` through :meth:`forward` (``y_t = Σ_s g_s · act(x_t W_in[e_s]) W_out[e_s]``,
    no GLU, no bias) and as the attention's ``q_proj`` through :meth:`map` (per-slot projections, no activation, no
    gate) then :meth:`reduce` (per-slot output projections weighted by the gates), with one routing decision shared by
    both.  After every gate call the module keeps the routing as attributes: ``top_k_gates``, ``batch_gates``,
    ``batch_index``, ``expert_size`` (list) and ``index_sorted_experts``.
    """

    def __init__(
        self,
        input_size: int,
        head_size: int,
        num_experts: int,
        k: int,
        *,
        activation: nn.Module | None = None,
        gating_dropout: float = 0.0,
        sample_topk: int = 0,
        gating_size: int = 256,
        aux_loss: str = "mi",
        gate_type: str = "mlp",
    ) -> None:
        super().__init__()
        self.num_experts = num_experts
        self.input_size = input_size
        self.head_size = head_size
        self.top_k = k
        self.experts = ParallelExperts(num_experts, input_size, head_size)
        self.output_experts = ParallelExperts(num_experts, head_size, input_size)
        self.activation = activation
        self.gate = top_k_gating(
            input_size=input_size,
            num_experts=num_experts,
            top_k=k,
            dropout=gating_dropout,
            hidden_size=gating_size,
            sample_topk=sample_topk,
            aux_loss=aux_loss,
            gate_type=gate_type,
        )
        self.top_k_gates: torch.Tensor | None = None
        self.batch_gates: torch.Tensor | None = None
        self.batch_index: torch.Tensor | None = None
        self.index_sorted_experts: torch.Tensor | None = None
        self.expert_size: list[int] | None = None

    def extra_repr(self) -> str:
        return f"k={self.top_k}"

    def compute_gate(self, x: torch.Tensor, skip_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Route ``x [N, input_size]``, store the dispatch attributes, return the gate's aux loss."""
        top_k_indices, self.top_k_gates, probs = self.gate(x, skip_mask)  # [N, k], [N, k], [N, E]
        self.batch_gates, self.batch_index, expert_size, self.index_sorted_experts = compute_gating(
            self.top_k, probs, self.top_k_gates, top_k_indices
        )
        self.expert_size = expert_size.tolist()
        return cast(torch.Tensor, self.gate.loss)  # the gate's call above set it

    def _routing(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, list[int]]:
        """``(batch_gates, batch_index, index_sorted_experts, expert_size)`` of the last :meth:`compute_gate`."""
        if (self.batch_gates is None or self.batch_index is None or self.index_sorted_experts is None
                or self.expert_size is None):
            raise RuntimeError("MoE: no routing yet (reduce follows a map; compute_gate routes)")
        return self.batch_gates, self.batch_index, self.index_sorted_experts, self.expert_size

    def forward(
        self,
        x: torch.Tensor,
        skip_mask: torch.Tensor | None = None,
        sample_topk: int = 0,
        multiply_by_gates: bool = True,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``x [B, T, input_size]`` → ``(y [B, T, input_size], aux_loss)``; ``sample_topk`` is unused (published)."""
        bsz, length, emb_size = x.size()
        x = x.reshape(-1, emb_size)  # [N, C] token-major
        loss = self.compute_gate(x, skip_mask)
        batch_gates, batch_index, _, expert_size = self._routing()
        expert_inputs = x[batch_index]  # [N*k, C] grouped by expert
        h = self.experts(expert_inputs, expert_size)  # [N*k, head]
        if self.activation is not None:
            h = self.activation(h)  # [N*k, head]
        expert_outputs = self.output_experts(h, expert_size)  # [N*k, C]
        if multiply_by_gates:
            expert_outputs = expert_outputs * batch_gates[:, None]  # [N*k, C]
        zeros = torch.zeros(bsz * length, self.input_size, dtype=expert_outputs.dtype, device=expert_outputs.device)
        y = zeros.index_add(0, batch_index, expert_outputs)  # [N, C] sum over the k slots
        return y.view(bsz, length, self.input_size), loss

    def map(
        self, x: torch.Tensor, skip_mask: torch.Tensor | None = None, sample_topk: int = 0
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Route and project: ``x [B, T, input_size]`` → ``(y [B, T, k, head_size], aux_loss)``.

        Slot ``s`` of token ``t`` holds ``x_t W_in[e_s]`` for its ``s``-th chosen expert (no activation, no gate).
        """
        bsz, length, emb_size = x.size()
        x = x.reshape(-1, emb_size)  # [N, C]
        loss = self.compute_gate(x, skip_mask)
        _, batch_index, index_sorted_experts, expert_size = self._routing()
        expert_inputs = x[batch_index]  # [N*k, C] grouped by expert
        expert_outputs = self.experts(expert_inputs, expert_size)  # [N*k, head]
        zeros = torch.zeros(
            bsz * length * self.top_k, self.head_size, dtype=expert_outputs.dtype, device=expert_outputs.device
        )
        y = zeros.index_add(0, index_sorted_experts, expert_outputs)  # [N*k, head] back to (t, s) order
        return y.view(bsz, length, self.top_k, -1), loss

    def reduce(self, x: torch.Tensor, multiply_by_gates: bool = True) -> torch.Tensor:
        """Project back and mix with the gates of the last :meth:`map`: ``[B, T, k, head]`` → ``[B, T, input_size]``."""
        bsz, length, k, emb_size = x.size()
        x = x.reshape(-1, emb_size)  # [N*k, head] in (t, s) order
        batch_gates, batch_index, index_sorted_experts, expert_size = self._routing()
        expert_inputs = x[index_sorted_experts]  # [N*k, head] grouped by expert
        expert_outputs = self.output_experts(expert_inputs, expert_size)  # [N*k, C]
        if multiply_by_gates:
            expert_outputs = expert_outputs * batch_gates[:, None]  # [N*k, C]
        zeros = torch.zeros(bsz * length, self.input_size, dtype=expert_outputs.dtype, device=expert_outputs.device)
        y = zeros.index_add(0, batch_index, expert_outputs)  # [N, C]
        return y.view(bsz, length, self.input_size)


# --------------------------------------------------------------------------------------------------------------------
# Stick-breaking attention
# --------------------------------------------------------------------------------------------------------------------


def stickbreaking_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: torch.Tensor,
    cum_weight: torch.Tensor,
    att_mask: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Causal stick-breaking attention, ``A_ij = σ(L_ij) · Π_{j<m≤i} (1 − σ(L_im))``, no softmax, no normalisation.

    Computed in the published op order (as the published code orders them): sigmoid and log-sigmoid masked to 0,
    the log-stick sum as a matmul with the strictly-lower-triangular ``cum_weight``, then ``exp`` and ``× σ``.
    A cumulative-product formulation would round differently.

    Args:
        q: ``[B, T, k, H, D]`` queries, one per selected attention expert (slot) and head.
        k: ``[B, S, H, D]`` keys (shared by all slots).
        v: ``[B, S, H, D]`` values.
        mask: ``[T, S]``, non-zero where key ``j`` is visible from query ``i`` (``j ≤ S − T + i``).
        cum_weight: ``[S, S]``, ``cum_weight[m, j] = 1`` iff ``m > j``.
        att_mask: optional additive padding mask broadcastable to ``[B, k, H, T, S]`` (``[B, 1, 1, 1, S]``).

    Returns:
        ``(y [B, T, k, H, D], att [B, k, H, T, S])``.
    """
    logits = torch.einsum("bikhd,bjhd->bkhij", q, k) / math.sqrt(k.size(-1))  # [B, k, H, T, S]
    if att_mask is not None:
        logits = logits + att_mask  # [B, k, H, T, S]; padded keys → σ = 0 and log σ(−L) = 0
    hidden = mask == 0  # [T, S] future keys
    z = torch.sigmoid(logits).masked_fill(hidden, 0)  # [B, k, H, T, S] break probability σ(L_ij)
    log_beta = F.logsigmoid(-logits).masked_fill(hidden, 0)  # [B, k, H, T, S] log(1 − σ(L_ij))
    re_cum_log_beta = torch.einsum("bkhij,jl->bkhil", log_beta, cum_weight.type_as(q))  # Σ_{m>j} log β_im
    att = z * re_cum_log_beta.exp()  # [B, k, H, T, S]
    y = torch.einsum("bkhij,bjhd->bikhd", att, v)  # [B, T, k, H, D]
    return y, att


class ModuleFormerAttention(nn.Module):
    """Mixture of attention heads with stick-breaking attention (published ``ModuleFormerAttention``).

    Queries come from the ``q_proj`` MoE (``k_att`` experts per token, one query per chosen expert), keys and
    values from ``k_proj`` / ``v_proj`` (identities when ``att_hidden == n_embd`` and ``n_head == 1``, as in MoLM,
    otherwise ``Linear`` with bias).  The ``mask`` / ``cum_weight`` buffers are persistent (they are in the
    checkpoints) but, as published, never read: the forward rebuilds both for the actual key length, so attention
    is full-causal over the input and the whole, never-truncated cache.
    """

    mask: torch.Tensor
    cum_weight: torch.Tensor

    def __init__(self, config: ModuleFormerConfig, layer_idx: int = 0) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.n_head = config.n_head
        self.att_hidden = config.att_hidden
        self.head_size = config.att_hidden // config.n_head
        self.top_k = config.k_att
        self.q_proj = MoE(
            input_size=config.n_embd,
            head_size=config.att_hidden,
            num_experts=config.n_att_experts,
            k=config.k_att,
            activation=None,
            gating_dropout=config.moe_pdrop,
            sample_topk=config.sample_topk,
            gating_size=config.gating_size,
            aux_loss=config.aux_loss_type,
            gate_type=config.gate_type,
        )
        if config.att_hidden == config.n_embd and config.n_head == 1:
            self.k_proj: nn.Module = nn.Identity()
            self.v_proj: nn.Module = nn.Identity()
        else:
            self.k_proj = nn.Linear(config.n_embd, config.att_hidden)
            self.v_proj = nn.Linear(config.n_embd, config.att_hidden)
        self.attn_dropout = nn.Dropout(config.attn_pdrop)  # published: built, never applied
        context = config.history_length + config.block_size
        self.register_buffer("mask", _causal_mask(context))
        self.register_buffer("cum_weight", _cum_weight(context))

    @deprecate_kwarg("past_key_values", "5.40.0", new_name="cache")
    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        cache: Cache | None = None,
        use_cache: bool | None = False,
        **kwargs: Any,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``hidden_states [B, T, n_embd]`` (the ``ln_1`` output) → ``(out [B, T, n_embd], att, aux_loss)``.

        ``att [B, k, H, T, S]`` are the stick-breaking weights; ``aux_loss`` is the ``q_proj`` gate loss.  The cache
        is read and written only when ``use_cache`` is truthy (published: a past is silently ignored otherwise).
        """
        bsz, q_len, _ = hidden_states.size()
        q, aux_loss = self.q_proj.map(hidden_states)  # [B, T, k, att_hidden]
        k = self.k_proj(hidden_states)  # [B, T, att_hidden]
        v = self.v_proj(hidden_states)  # [B, T, att_hidden]
        if use_cache and cache is not None:
            past_len = cache.get_seq_length(self.layer_idx)
            keys, values = cache.update(k.detach().unsqueeze(1), v.detach().unsqueeze(1), self.layer_idx)
            if past_len > 0:
                k = torch.cat([keys[:, 0, :past_len], k], dim=1)  # [B, S, att_hidden]
                v = torch.cat([values[:, 0, :past_len], v], dim=1)  # [B, S, att_hidden]
        kv_len = k.size(1)
        q = q.view(bsz, q_len, self.top_k, self.n_head, self.head_size)  # [B, T, k, H, D]
        k = k.view(bsz, kv_len, self.n_head, self.head_size)  # [B, S, H, D]
        v = v.view(bsz, kv_len, self.n_head, self.head_size)  # [B, S, H, D]
        mask = _causal_mask(kv_len, device=q.device)[kv_len - q_len :]  # [T, S]
        cum_weight = _cum_weight(kv_len, dtype=q.dtype, device=q.device)  # [S, S]
        y, att = stickbreaking_attention(q, k, v, mask, cum_weight, att_mask=attention_mask)
        y = y.reshape(bsz, q_len, self.top_k, self.att_hidden).to(hidden_states.dtype)  # [B, T, k, att_hidden]
        out = self.q_proj.reduce(y)  # [B, T, n_embd]
        return out, att, aux_loss


def _causal_mask(size: int, device: torch.device | str | None = None) -> torch.Tensor:
    """``[size, size]`` int8, 1 on and below the diagonal (the published ``attn.mask`` buffer)."""
    return torch.tril(torch.ones(size, size, dtype=torch.int8, device=device))


def _cum_weight(size: int, dtype: torch.dtype | None = None, device: torch.device | str | None = None) -> torch.Tensor:
    """``[size, size]`` float, 1 strictly below the diagonal (the published ``attn.cum_weight`` buffer)."""
    return torch.tril(torch.ones(size, size, dtype=dtype, device=device), -1)


# --------------------------------------------------------------------------------------------------------------------
# Block and models
# --------------------------------------------------------------------------------------------------------------------


class ModuleFormerBlock(GradientCheckpointingLayer):
    """Pre-LN block: ``h = x + drop(attn(ln_1(x)))``, ``out = h + drop(mlpf(ln_2(h)))``.

    Returns ``(hidden_states, aux_loss)`` (attention-gate loss + MLP-gate loss) so the aux loss also flows through
    gradient checkpointing.  All LayerNorms use PyTorch's default eps (1e-5), ignoring ``layer_norm_epsilon``, as
    published.
    """

    def __init__(self, config: ModuleFormerConfig, layer_idx: int = 0) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd)
        self.attn = ModuleFormerAttention(config, layer_idx=layer_idx)
        self.ln_2 = nn.LayerNorm(config.n_embd)
        self.mlpf = MoE(
            input_size=config.n_embd,
            head_size=config.ffd_hidden,
            num_experts=config.n_mlp_experts,
            k=config.k_mlp,
            activation=get_activation(config.activation_function),
            gating_dropout=config.moe_pdrop,
            sample_topk=config.sample_topk,
            gating_size=config.gating_size,
            aux_loss=config.aux_loss_type,
            gate_type=config.gate_type,
        )
        self.resid_dropout = nn.Dropout(config.resid_pdrop)

    @deprecate_kwarg("past_key_values", "5.40.0", new_name="cache")
    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        cache: Cache | None = None,
        use_cache: bool | None = False,
        **kwargs: Any,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        attn_output, _, att_aux_loss = self.attn(
            self.ln_1(hidden_states), attention_mask=attention_mask, cache=cache, use_cache=use_cache
        )
        hidden_states = hidden_states + self.resid_dropout(attn_output)
        mlp_output, mlp_aux_loss = self.mlpf(self.ln_2(hidden_states))
        hidden_states = hidden_states + self.resid_dropout(mlp_output)
        return hidden_states, att_aux_loss + mlp_aux_loss


class ModuleFormerPreTrainedModel(PreTrainedModel):
    """Weight initialisation and transformers plumbing shared by the ModuleFormer models."""

    config_class = ModuleFormerConfig
    base_model_prefix = "transformer"
    supports_gradient_checkpointing = True
    _no_split_modules = ["ModuleFormerBlock"]
    _can_record_outputs = {
        "hidden_states": OutputRecorder(ModuleFormerBlock, index=0),
        "attentions": OutputRecorder(ModuleFormerAttention, index=1),
    }

    def _init_weights(self, module: nn.Module) -> None:
        """Linear / Embedding / LayerNorm as transformers does; expert weights normal(0, initializer_range).

        The published initialisation of ``ParallelExperts`` is not in the spec; only loaded checkpoints are meant to
        be numerically faithful.  The two attention buffers are rebuilt so a meta-device model gets real values.
        """
        super()._init_weights(module)
        if isinstance(module, ParallelExperts):
            init.normal_(module.weight, mean=0.0, std=self.config.initializer_range)
        elif isinstance(module, ModuleFormerAttention):
            size = module.mask.size(0)
            init.copy_(module.mask, _causal_mask(size, device=module.mask.device))
            init.copy_(module.cum_weight, _cum_weight(size, dtype=module.cum_weight.dtype, device=module.mask.device))


class ModuleFormerModel(ModuleFormerPreTrainedModel):
    """Embeddings (no positions), the blocks, ``ln_f``; ``aux_loss`` keeps the summed gate losses of the last call."""

    def __init__(self, config: ModuleFormerConfig) -> None:
        super().__init__(config)
        self.embed_dim = config.n_embd
        self.vocab_size = config.vocab_size
        self.wte: nn.Module = nn.Embedding(config.vocab_size, self.embed_dim)
        self.drop = nn.Dropout(config.embd_pdrop)
        self.h = nn.ModuleList([ModuleFormerBlock(config, layer_idx=i) for i in range(config.n_layer)])
        self.ln_f = nn.LayerNorm(self.embed_dim)
        self.aux_loss: torch.Tensor | int = 0
        self.gradient_checkpointing = False
        self.post_init()

    def get_input_embeddings(self) -> nn.Module:
        return self.wte

    def set_input_embeddings(self, new_embeddings: nn.Module) -> None:
        self.wte = new_embeddings

    @deprecate_kwarg("past_key_values", "5.40.0", new_name="cache")
    @merge_with_config_defaults
    @capture_outputs
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.LongTensor | None = None,
        position_ids: torch.LongTensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        use_cache: bool | None = None,
        **kwargs: Any,
    ) -> BaseModelOutputWithPast:
        """Run the blocks.  ``position_ids`` is accepted for API compatibility and ignored (no positional encoding).

        ``attention_mask`` is a 2-D ``[B, past + T]`` padding mask (1 = keep); it becomes the published additive
        ``(1 − m) · finfo(dtype).min`` on the keys, broadcast as ``[B, 1, 1, 1, S]``.
        """
        kwargs.pop("output_attentions", None)
        kwargs.pop("output_hidden_states", None)
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("You must specify exactly one of input_ids or inputs_embeds")
        if inputs_embeds is None:
            inputs_embeds = self.wte(input_ids)
        hidden_states = inputs_embeds
        if token_type_ids is not None:
            hidden_states = hidden_states + self.wte(token_type_ids)  # published: same table as the tokens
        hidden_states = self.drop(hidden_states)
        bsz, q_len = hidden_states.shape[:2]

        if not use_cache:
            cache = None  # published: a past is only used when use_cache is truthy
        elif cache is None:
            cache = DynamicCache(config=self.config)
        past_len = cache.get_seq_length() if cache is not None else 0

        additive_mask = None
        if attention_mask is not None:
            if attention_mask.dim() != 2 or attention_mask.shape[-1] != past_len + q_len:
                raise ValueError(
                    f"attention_mask must be 2-D [batch, past + new tokens] = [{bsz}, {past_len + q_len}], "
                    f"got {tuple(attention_mask.shape)}"
                )
            mask = attention_mask.view(bsz, -1)[:, None, None, None, :].to(dtype=self.dtype)  # [B, 1, 1, 1, S]
            additive_mask = (1.0 - mask) * torch.finfo(self.dtype).min  # [B, 1, 1, 1, S]

        aux_loss: torch.Tensor | int = 0
        for block in self.h:
            hidden_states, block_aux_loss = block(
                hidden_states, attention_mask=additive_mask, cache=cache, use_cache=use_cache, **kwargs
            )
            aux_loss = aux_loss + block_aux_loss
        self.aux_loss = aux_loss
        hidden_states = self.ln_f(hidden_states)
        return BaseModelOutputWithPast(last_hidden_state=hidden_states, cache=cache)


class ModuleFormerForCausalLM(AppliesMoePatchOnLoad, ModuleFormerPreTrainedModel, GenerationMixin):
    """ModuleFormer with an untied LM head; fp32 logits; the published shifted CE loss (+ weighted aux loss)."""

    _tied_weights_keys = {"lm_head.weight": "transformer.wte.weight"}

    def __init__(self, config: ModuleFormerConfig) -> None:
        super().__init__(config)
        self.transformer = ModuleFormerModel(config)
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.aux_loss_weight = config.aux_loss_weight
        self.post_init()

    @deprecate_kwarg("past_key_values", "5.40.0", new_name="cache")
    @can_return_tuple
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.LongTensor | None = None,
        position_ids: torch.LongTensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        **kwargs: Any,
    ) -> CausalLMOutputWithPast:
        """Published loss: ``CE(mean, ignore -100)(logits[:, :-1], labels[:, 1:])`` cast to the hidden dtype, plus
        ``transformer.aux_loss * aux_loss_weight`` only if labels are given and ``aux_loss_weight > 0``."""
        outputs: BaseModelOutputWithPast = self.transformer(
            input_ids,
            cache=cache,
            attention_mask=attention_mask,
            token_type_ids=token_type_ids,
            position_ids=position_ids,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            **kwargs,
        )
        hidden_states = cast(torch.Tensor, outputs.last_hidden_state)  # ModelOutput fields are Optional
        logits = self.lm_head(slice_logits_to_keep(hidden_states, logits_to_keep)).to(torch.float32)

        loss = None
        if labels is not None:
            shift_logits = logits[..., :-1, :].contiguous()  # [B, T-1, V]
            shift_labels = labels[..., 1:].contiguous().to(shift_logits.device)  # [B, T-1]
            loss = F.cross_entropy(shift_logits.view(-1, shift_logits.size(-1)), shift_labels.view(-1))
            loss = loss.to(hidden_states.dtype)
            if self.aux_loss_weight > 0:
                loss = loss + self.transformer.aux_loss * self.aux_loss_weight

        return CausalLMOutputWithPast(
            loss=loss,
            logits=logits,
            cache=outputs.cache,
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
        )
