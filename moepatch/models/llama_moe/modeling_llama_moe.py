"""LLaMA-MoE for transformers 5, checkpoint-compatible with the published Hub models (Dec-2023 remote code).

The published ``modeling_llama_moe_hf.py`` (pjlab-sys4nlp/llama-moe, transformers-4.31 style) does not run on
transformers 5: construction dies on the standardised ``rope_scaling`` dict, every forward dies on its output dataclass
(``past_key_values`` is renamed to ``cache`` by v5's ``ModelOutput``), meta-device loading leaves its RoPE caches as
uninitialised memory, and tuple KV caches are gone. This is a re-implementation of the same model on v5 conventions
(``DynamicCache``, ``cache`` keyword, ``GenerationMixin``, ``GradientCheckpointingLayer``, ``post_init`` /
``_init_weights``) that keeps what a checkpoint and a parity test can see:

* the module tree and every parameter / buffer name and shape (``ParameterList`` experts without ``.weight``, the
  gate's ``gate_network.{0,2}`` and ``weight_noise``, the persistent ``self_attn.rotary_emb.inv_freq``);
* the numerics of the published code: noisy top-(k+1) gate with an fp32 softmax over the k chosen logits, CV² balance
  loss (smooth load estimate in noisy training, hard counts otherwise), the sort-based expert dispatch of the
  ``UniversalCalculator``, eager attention dividing by ``sqrt(head_dim)`` with summed additive masks, fp32 RMSNorm,
  and an LM loss to which the balance loss is added whenever labels are given and it is positive.

RoPE tables are always computed from the formula ``1 / base^(2i/d)`` in fp32 on CPU (as the published constructor
did, before any weights were loaded), lazily, outside any module buffer: the ``inv_freq`` buffer only exists so the
published checkpoints (which store bf16-rounded values) load without unexpected keys, and is never read.

The expert choice is isolated in :meth:`TopKBalancedNoisyGate.select_experts`, the routing patch point (C2R).
"""

from __future__ import annotations

import functools
import math
import warnings
from dataclasses import dataclass
from typing import Any
from typing import cast

import torch
import torch.nn.functional as F
from torch import nn
from transformers import GenerationMixin
from transformers import PreTrainedModel
from transformers import initialization as init
from transformers.activations import ACT2FN
from transformers.cache_utils import Cache
from transformers.cache_utils import DynamicCache
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import CausalLMOutputWithPast
from transformers.utils import ModelOutput
from transformers.utils import can_return_tuple
from transformers.utils import logging
from transformers.utils.deprecation import deprecate_kwarg

from moepatch.loading.autopatch import AppliesMoePatchOnLoad
from moepatch.models.llama_moe.configuration_llama_moe import LlamaMoEConfig

logger = logging.get_logger(__name__)


# ----------------------------------------------------------------------------------------------------------------------
# Outputs
# ----------------------------------------------------------------------------------------------------------------------


@dataclass
class CalculatorOutput(ModelOutput):
    """What the expert calculator returns (``num_dropped_tokens`` is always ``-1``: the universal one drops none)."""

    hidden_states: torch.Tensor | None = None
    num_dropped_tokens: torch.Tensor | None = None


@dataclass
class MoEMlpOutput(ModelOutput):
    """What one MoE layer returns: its output plus the gate statistics the model output aggregates per layer."""

    hidden_states: torch.Tensor | None = None
    balance_loss: torch.Tensor | None = None
    num_dropped_tokens: torch.Tensor | None = None
    gate_load: torch.Tensor | None = None
    gate_importance: torch.Tensor | None = None


@dataclass
class BaseMoEModelOutputWithPast(ModelOutput):
    """Base-model output. The KV cache field is ``cache`` (the published class named it ``past_key_values``, which
    transformers 5 renames on construction, breaking every forward of the unmodified file)."""

    last_hidden_state: torch.Tensor | None = None
    cache: Cache | None = None
    hidden_states: tuple[torch.Tensor, ...] | None = None
    attentions: tuple[torch.Tensor, ...] | None = None
    balance_loss: torch.Tensor | float | None = None  # summed over layers (0.0 with no layer)
    num_dropped_tokens: tuple[torch.Tensor, ...] | None = None
    gate_load: tuple[torch.Tensor, ...] | None = None
    gate_importance: tuple[torch.Tensor, ...] | None = None


@dataclass
class MoECausalLMOutputWithPast(CausalLMOutputWithPast):
    """Causal-LM output with the MoE statistics: ``balance_loss`` (summed over layers), per-layer ``gate_load`` /
    ``gate_importance`` (``[E]`` each) and ``num_dropped_tokens`` (``tensor(-1.0)`` per layer)."""

    num_dropped_tokens: tuple[torch.Tensor, ...] | None = None
    balance_loss: torch.Tensor | float | None = None
    gate_load: tuple[torch.Tensor, ...] | None = None
    gate_importance: tuple[torch.Tensor, ...] | None = None


# ----------------------------------------------------------------------------------------------------------------------
# Norm, RoPE, attention
# ----------------------------------------------------------------------------------------------------------------------


class LlamaRMSNorm(nn.Module):
    """RMSNorm as published: normalise in fp32, cast back to the input dtype, *then* multiply by the weight."""

    def __init__(self, hidden_size: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.variance_epsilon = eps

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        input_dtype = hidden_states.dtype
        hidden_states = hidden_states.to(torch.float32)
        variance = hidden_states.pow(2).mean(-1, keepdim=True)
        hidden_states = hidden_states * torch.rsqrt(variance + self.variance_epsilon)
        return self.weight * hidden_states.to(input_dtype)


def rope_inv_freq(dim: int, base: float, device: torch.device | str | None = None) -> torch.Tensor:
    """``1 / base^(2i/dim)`` in fp32, the published formula (``[dim/2]``)."""
    return 1.0 / (base ** (torch.arange(0, dim, 2, device=device).float() / dim))


@functools.lru_cache(maxsize=32)
def _rope_table(dim: int, base: float, length: int, position_scale: float, device: str) -> tuple[torch.Tensor, ...]:
    """fp32 ``(cos, sin)`` tables ``[length, dim]`` built on CPU from the formula, then moved to ``device``.

    Mirrors the published ``_set_cos_sin_cache`` (``einsum`` outer product of ``arange`` positions and ``inv_freq``,
    ``emb = cat(freqs, freqs)``), which ran in the constructor on CPU in fp32. Shared by every layer (the tables depend
    only on the arguments), never a module buffer, so meta-device construction and v5 loading cannot corrupt them.
    """
    with torch.inference_mode(False), torch.no_grad():
        inv_freq = rope_inv_freq(dim, base, device="cpu")  # [dim/2]
        positions = torch.arange(length, device="cpu", dtype=inv_freq.dtype)  # [length]
        if position_scale != 1.0:
            positions = positions / position_scale  # linear scaling divides the positions
        freqs = torch.einsum("i,j->ij", positions, inv_freq)  # [length, dim/2]
        emb = torch.cat((freqs, freqs), dim=-1)  # [length, dim]
        return emb.cos().to(device), emb.sin().to(device)


class LlamaRotaryEmbedding(nn.Module):
    """Rotary embedding of one attention layer (transformers-4.31 layout: one per layer, persistent ``inv_freq``).

    ``inv_freq`` is kept only for checkpoint compatibility (the published checkpoints store it, bf16-rounded) and is
    never read: cos/sin always come from :func:`_rope_table`, i.e. from the formula in fp32. ``scaling`` is the
    config's :meth:`~LlamaMoEConfig.rope_scaling_request` (``None``, ``("linear", f)`` or ``("dynamic", f)``).
    """

    inv_freq: torch.Tensor

    def __init__(
        self,
        dim: int,
        max_position_embeddings: int = 2048,
        base: float = 10000.0,
        scaling: tuple[str, float] | None = None,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        self.dim = dim
        self.max_position_embeddings = max_position_embeddings
        self.base = float(base)
        self.scaling_type: str | None
        self.scaling_factor: float
        self.scaling_type, self.scaling_factor = scaling if scaling is not None else (None, 1.0)
        self.register_buffer("inv_freq", rope_inv_freq(dim, self.base, device=device), persistent=True)

    def table_spec(self, seq_len: int) -> tuple[float, int, float]:
        """``(base, length, position_scale)`` of the table that serves ``seq_len`` positions, as published."""
        length = max(self.max_position_embeddings, seq_len)
        if self.scaling_type == "linear":
            return self.base, length, float(self.scaling_factor)
        if self.scaling_type == "dynamic" and seq_len > self.max_position_embeddings:
            # NTK-aware base growth of the published dynamic variant (rebuilt for the longer length)
            factor = float(self.scaling_factor)
            base = self.base * ((factor * seq_len / self.max_position_embeddings) - (factor - 1)) ** (
                self.dim / (self.dim - 2)
            )
            return base, seq_len, 1.0
        return self.base, length, 1.0

    def forward(
        self, x: torch.Tensor, position_ids: torch.Tensor, seq_len: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Return ``(cos, sin)`` gathered at ``position_ids`` (``[B, 1, T, dim]``, in ``x.dtype``)."""
        base, length, position_scale = self.table_spec(seq_len)
        cos, sin = _rope_table(self.dim, base, length, position_scale, str(x.device))  # [length, dim] fp32
        cos = cos[position_ids].to(x.dtype).unsqueeze(1)  # [B, 1, T, dim] (gather, then cast: same values)
        sin = sin[position_ids].to(x.dtype).unsqueeze(1)  # [B, 1, T, dim]
        return cos, sin


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """Non-interleaved rotation: ``cat(-x2, x1)``."""
    x1 = x[..., : x.shape[-1] // 2]
    x2 = x[..., x.shape[-1] // 2 :]
    return torch.cat((-x2, x1), dim=-1)


def apply_rotary_pos_emb(
    q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate queries and keys (``[B, heads, T, dim]``) with cos/sin ``[B, 1, T, dim]``."""
    q_embed = (q * cos) + (rotate_half(q) * sin)
    k_embed = (k * cos) + (rotate_half(k) * sin)
    return q_embed, k_embed


def repeat_kv(hidden_states: torch.Tensor, n_rep: int) -> torch.Tensor:
    """``[B, kv_heads, S, d] -> [B, kv_heads * n_rep, S, d]`` (grouped-query attention)."""
    batch, num_key_value_heads, slen, head_dim = hidden_states.shape
    if n_rep == 1:
        return hidden_states
    hidden_states = hidden_states[:, :, None, :, :].expand(batch, num_key_value_heads, n_rep, slen, head_dim)
    return hidden_states.reshape(batch, num_key_value_heads * n_rep, slen, head_dim)


class LlamaAttention(nn.Module):
    """Eager multi-head attention with the published numerics (the only implementation the published code had).

    Scores are ``(q · kᵀ) / sqrt(head_dim)`` (divided after the product, unlike v5 Llama's pre-multiplied scale), the
    additive mask is added, softmax runs in fp32 and is cast back; no dropout. ``pretraining_tp > 1`` splits the
    projections into slices as published.
    """

    def __init__(self, config: LlamaMoEConfig, layer_idx: int) -> None:
        super().__init__()
        self.config = config
        self.layer_idx = layer_idx
        self.hidden_size = config.hidden_size
        self.num_heads = config.num_attention_heads
        self.head_dim = self.hidden_size // self.num_heads
        kv_heads = config.num_key_value_heads  # the config sets it (num_attention_heads by default) on construction
        self.num_key_value_heads: int = kv_heads if kv_heads is not None else self.num_heads
        self.num_key_value_groups = self.num_heads // self.num_key_value_heads
        self.max_position_embeddings = config.max_position_embeddings
        self.pretraining_tp = config.pretraining_tp

        self.q_proj = nn.Linear(self.hidden_size, self.num_heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(self.hidden_size, self.num_key_value_heads * self.head_dim, bias=False)
        self.v_proj = nn.Linear(self.hidden_size, self.num_key_value_heads * self.head_dim, bias=False)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, self.hidden_size, bias=False)
        self.rotary_emb = LlamaRotaryEmbedding(
            self.head_dim,
            max_position_embeddings=self.max_position_embeddings,
            base=config.rope_base,
            scaling=config.rope_scaling_request(),
        )

    def _project(self, hidden_states: torch.Tensor, proj: nn.Linear, out_features: int) -> torch.Tensor:
        if self.pretraining_tp <= 1:
            return proj(hidden_states)
        slices = proj.weight.split(out_features // self.pretraining_tp, dim=0)
        return torch.cat([F.linear(hidden_states, w) for w in slices], dim=-1)

    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        cache: Cache | None = None,
        output_attentions: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        bsz, q_len, _ = hidden_states.size()
        kv_width = self.num_key_value_heads * self.head_dim
        query_states = self._project(hidden_states, self.q_proj, self.num_heads * self.head_dim)  # [B, T, H]
        key_states = self._project(hidden_states, self.k_proj, kv_width)  # [B, T, kvH]
        value_states = self._project(hidden_states, self.v_proj, kv_width)  # [B, T, kvH]

        query_states = query_states.view(bsz, q_len, self.num_heads, self.head_dim).transpose(1, 2)  # [B, h, T, d]
        key_states = key_states.view(bsz, q_len, self.num_key_value_heads, self.head_dim).transpose(1, 2)
        value_states = value_states.view(bsz, q_len, self.num_key_value_heads, self.head_dim).transpose(1, 2)

        past_len = cache.get_seq_length(self.layer_idx) if cache is not None else 0
        kv_seq_len = past_len + q_len
        if position_ids is None:
            position_ids = torch.arange(past_len, kv_seq_len, device=hidden_states.device).unsqueeze(0)
        cos, sin = self.rotary_emb(value_states, position_ids, seq_len=kv_seq_len)  # [B, 1, T, d]
        query_states, key_states = apply_rotary_pos_emb(query_states, key_states, cos, sin)

        if cache is not None:  # post-RoPE keys are cached, as published
            key_states, value_states = cache.update(key_states, value_states, self.layer_idx)  # [B, kvh, S, d]

        key_states = repeat_kv(key_states, self.num_key_value_groups)  # [B, h, S, d]
        value_states = repeat_kv(value_states, self.num_key_value_groups)  # [B, h, S, d]

        attn_weights = torch.matmul(query_states, key_states.transpose(2, 3)) / math.sqrt(self.head_dim)  # [B,h,T,S]
        if attention_mask is not None:
            attn_weights = attn_weights + attention_mask  # additive [B, 1, T, S]
        attn_weights = F.softmax(attn_weights, dim=-1, dtype=torch.float32).to(query_states.dtype)
        attn_output = torch.matmul(attn_weights, value_states)  # [B, h, T, d]
        attn_output = attn_output.transpose(1, 2).contiguous().reshape(bsz, q_len, self.hidden_size)  # [B, T, H]

        if self.pretraining_tp > 1:
            parts = attn_output.split(self.hidden_size // self.pretraining_tp, dim=2)
            o_slices = self.o_proj.weight.split(self.hidden_size // self.pretraining_tp, dim=1)
            attn_output = cast(torch.Tensor, sum(F.linear(parts[i], o_slices[i]) for i in range(self.pretraining_tp)))
        else:
            attn_output = self.o_proj(attn_output)
        return attn_output, (attn_weights if output_attentions else None)


def _prepare_decoder_attention_mask(
    attention_mask: torch.Tensor | None,
    batch_size: int,
    query_len: int,
    past_len: int,
    dtype: torch.dtype,
    device: torch.device,
) -> torch.Tensor | None:
    """Additive ``[B, 1, T, past+T]`` mask built as published: causal part (``finfo.min`` above the diagonal, omitted
    when ``T == 1``) **plus** the padding part (``finfo.min`` at padded keys). The sum matters: a key masked twice goes
    to ``-inf`` and a padded query row becomes uniform over the remaining keys, exactly like the published logits.
    A 4-D mask passed in is used as is (boolean masks are converted to additive ones).
    """
    min_value = torch.finfo(dtype).min
    if attention_mask is not None and attention_mask.dim() == 4:
        if attention_mask.dtype == torch.bool:
            return torch.zeros(attention_mask.shape, dtype=dtype, device=device).masked_fill(~attention_mask, min_value)
        return attention_mask.to(dtype)
    combined = None
    if query_len > 1:
        mask = torch.full((query_len, query_len), min_value, device=device)  # [T, T]
        cond = torch.arange(query_len, device=device)
        mask.masked_fill_(cond < (cond + 1).view(query_len, 1), 0)  # zero on and below the diagonal
        mask = mask.to(dtype)
        if past_len > 0:
            mask = torch.cat([torch.zeros(query_len, past_len, dtype=dtype, device=device), mask], dim=-1)  # [T, S]
        combined = mask[None, None, :, :].expand(batch_size, 1, query_len, query_len + past_len)  # [B, 1, T, S]
    if attention_mask is not None:
        src_len = attention_mask.shape[-1]
        expanded = attention_mask[:, None, None, :].expand(batch_size, 1, query_len, src_len).to(dtype)  # [B,1,T,S]
        inverted = 1.0 - expanded
        padding = inverted.masked_fill(inverted.to(torch.bool), min_value)
        combined = padding if combined is None else padding + combined
    return combined


# ----------------------------------------------------------------------------------------------------------------------
# MoE: gate, experts, calculator, layer
# ----------------------------------------------------------------------------------------------------------------------


def _standard_normal_cdf(value: torch.Tensor) -> torch.Tensor:
    """``Normal(0, 1).cdf`` as the published gate evaluated it: its ``loc``/``scale`` were fp32 ``[1]`` tensors, so
    the computation is promoted to (at least) fp32 whatever the activation dtype."""
    value = value.to(torch.promote_types(value.dtype, torch.float32))
    return 0.5 * (1 + torch.erf(value / math.sqrt(2)))


def get_gate_network(gate_network: str, input_size: int, num_experts: int) -> nn.Module:
    """``"mlp"``: ``Linear(H,E) → Tanh → Linear(E,E)`` (keys ``0.weight``, ``2.weight``); ``"linear"``: ``Linear(H,E)``
    (zeroed here as published; ``post_init`` re-initialises it like every ``nn.Linear``). No biases."""
    if gate_network == "linear":
        network = nn.Linear(input_size, num_experts, bias=False)
        nn.init.zeros_(network.weight)
        return network
    if gate_network == "mlp":
        return nn.Sequential(
            nn.Linear(input_size, num_experts, bias=False),
            nn.Tanh(),
            nn.Linear(num_experts, num_experts, bias=False),
        )
    raise ValueError(f"gate_network must be 'mlp' or 'linear', got {gate_network!r}")


class TopKBalancedNoisyGate(nn.Module):
    """Noisy top-k gate with a CV² balance loss (the published ``TopKBalancedNoisyGate``).

    ``forward(x [N, H])`` returns the published dict: ``topK_indices [N, k]`` (long), ``topK_scores [N, k]``,
    ``balance_loss`` (scalar, fp32; ``-100`` when ``use_balance`` is off), ``load [E]`` (float in noisy training,
    integer counts otherwise) and ``importance [E]``. The choice of experts lives in :meth:`select_experts`.
    """

    def __init__(
        self,
        input_size: int,
        num_experts: int,
        num_selects: int,
        gate_network: str = "mlp",
        use_softmax: bool = True,
        use_balance: bool = True,
        balance_loss_weight: float = 1e-2,
        add_noise: bool = True,
        noise_epsilon: float = 1e-2,
        layer_index: int = 0,
    ) -> None:
        super().__init__()
        if num_selects > num_experts:
            raise ValueError(f"num_selects ({num_selects}) must not exceed num_experts ({num_experts})")
        self.input_size = input_size
        self.num_experts = num_experts
        self.num_selects = num_selects
        self.layer_index = layer_index  # absolute decoder-layer index: what per-layer routing patches (C2R) key on
        self.gate_network_type = gate_network
        self.gate_network = get_gate_network(gate_network, input_size, num_experts)
        self.use_softmax = use_softmax
        self.softmax = nn.Softmax(1)
        self.use_balance = use_balance
        self.balance_loss_weight = balance_loss_weight
        self.add_noise = add_noise
        self.noise_epsilon = noise_epsilon
        self.warned = False
        if self.add_noise:
            self.weight_noise = nn.Linear(input_size, num_experts, bias=False)
            nn.init.zeros_(self.weight_noise.weight)  # as published; post_init re-initialises it (normal)
            # The published gate held ``Normal(mean=[0.], std=[1.])``; plain floats here (no meta/device tensors),
            # the CDF itself is :func:`_standard_normal_cdf`.
            self.mean = 0.0
            self.std = 1.0
            self.softplus = nn.Softplus()

    def select_experts(self, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Routing patch point: choose the candidate experts of every token from the (noisy) gate logits.

        Args:
            logits: ``[N, E]`` gate logits, noisy in training when ``add_noise`` is on.

        Returns:
            ``(top_logits, top_indices)``, both ``[N, m]`` with ``m = k + 1`` (``E`` when ``k == E``), best first. The
            first ``k`` columns are the selection (softmax-ed into the scores); column ``k`` (the best excluded
            candidate) and column ``k - 1`` are the thresholds of the smooth load estimate in noisy training.

        Default: plain ``torch.topk(logits, min(k + 1, E), dim=1)`` as published. Override per instance (e.g.
        collaboration-constrained routing, C2R) to change *which* experts are chosen; everything downstream (scores,
        importance, load, balance loss, dispatch) uses this method's output.
        """
        return logits.topk(min(self.num_selects + 1, self.num_experts), dim=1)  # [N, m], [N, m]

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        k = self.num_selects
        logits_gate = self.gate_network(x)  # [N, E]
        noisy = self.training and self.add_noise
        if noisy:
            noise_mm = self.weight_noise(x)  # [N, E]
            noise_control = self.softplus(noise_mm) + self.noise_epsilon  # [N, E], > 0
            logits_noise = torch.randn_like(logits_gate) * noise_control  # [N, E], one draw per layer
            logits = logits_gate + logits_noise  # [N, E]
        else:
            logits = logits_gate  # [N, E] (no noise in eval)

        top_logits, top_indices = self.select_experts(logits)  # [N, m], [N, m]
        top_k_logits = top_logits[:, :k]  # [N, k]
        top_k_indices = top_indices[:, :k]  # [N, k]
        if self.use_softmax:
            top_k_scores = self.softmax(top_k_logits.to(torch.float32))  # [N, k], fp32, over the k chosen only
        else:
            top_k_scores = top_k_logits  # [N, k], raw logits (may be <= 0)
        top_k_scores = top_k_scores.to(logits.dtype)  # [N, k]

        scores_filtered = torch.zeros_like(logits).scatter(1, top_k_indices, top_k_scores)  # [N, E]
        importance = scores_filtered.sum(0)  # [E], logits dtype

        if noisy and k != self.num_experts:
            threshold_if_in = top_logits[:, k : k + 1]  # [N, 1], best excluded candidate
            threshold_if_out = top_logits[:, k - 1 : k]  # [N, 1], last included
            is_in = torch.gt(logits_noise, threshold_if_in)  # [N, E]; noise term vs logit threshold, as published
            prob_if_in = _standard_normal_cdf((logits_gate - threshold_if_in) / noise_control)  # [N, E]
            prob_if_out = _standard_normal_cdf((logits_gate - threshold_if_out) / noise_control)  # [N, E]
            prob = torch.where(is_in, prob_if_in, prob_if_out)  # [N, E]
            load = prob.sum(0)  # [E], float
        else:
            load = (scores_filtered > 0).sum(0)  # [E], int64 count of positive scores
            if self.training and not self.add_noise and not self.warned:
                warnings.warn(
                    "Gradient-trackable implementation for load calculation is only available when "
                    '"add_noise=True". Training without noise will block the gradient from "load" path and lead '
                    "to inconsistency in optimization objectives.",
                    stacklevel=2,
                )
                self.warned = True

        if self.use_balance:
            balance_loss = (self.cv_squared(importance) + self.cv_squared(load)) * self.balance_loss_weight  # scalar
        else:
            balance_loss = torch.tensor(-100.0, device=x.device)
        return {
            "topK_indices": top_k_indices,
            "topK_scores": top_k_scores,
            "balance_loss": balance_loss,
            "load": load,
            "importance": importance,
        }

    SEAM_HELPERS = ("cv_squared",)
    """Methods :meth:`forward` calls that a published-code gate instance may lack (bound with it by moepatch)."""

    @classmethod
    def seam_problem(cls, gate: nn.Module) -> str | None:
        """Why this class's :meth:`forward` cannot run bound to ``gate`` (a running remote-code copy of the published
        gate, which has no ``select_experts`` seam), or ``None``.  Checks the published attributes it reads."""
        needed = ["num_selects", "num_experts", "gate_network", "add_noise", "noise_epsilon", "use_softmax",
                  "softmax", "use_balance", "balance_loss_weight", "warned"]
        if getattr(gate, "add_noise", False):
            needed += ["weight_noise", "softplus"]
        missing = [name for name in needed if not hasattr(gate, name)]
        return f"missing published gate attributes {missing}" if missing else None

    @staticmethod
    def cv_squared(x: torch.Tensor, eps: float = 1e-10) -> torch.Tensor:
        """Squared coefficient of variation ``var(x) / (mean(x)² + eps)`` in fp32, unbiased variance; 0 for one
        element."""
        if x.shape[0] == 1:
            return torch.tensor(0.0, device=x.device)
        return x.float().var() / (x.float().mean() ** 2 + eps)

    def reset_gate_network(self) -> None:
        """Re-draw the gate network from scratch (a fresh module of the same type, on the same device and dtype)."""
        reference = next(self.gate_network.parameters())
        network = get_gate_network(self.gate_network_type, self.input_size, self.num_experts)
        self.gate_network = network.to(reference.device, reference.dtype)


class LinearGLUExperts(nn.Module):
    """SwiGLU experts stored as ``ParameterList``s of 2-D ``[out, in]`` tensors, one entry per expert.

    Keys are ``weight_gate.{e}`` / ``weight_up.{e}`` (``[size_e, in]``) and ``weight_down.{e}`` (``[out, size_e]``),
    without a ``.weight`` suffix, exactly as in the published checkpoints. ``forward(x, i)`` runs expert ``i``:
    ``W_down · (act(W_gate · x) ⊙ (W_up · x))``.
    """

    row_tokens: tuple[torch.Tensor, ...]
    """Set by the calculator before each run: the token of every row of each expert (read by moepatch's LoRA
    experts on the routed experts, to leave padding out of their loss)."""

    def __init__(
        self,
        in_features: int,
        hidden_features: int,
        out_features: int,
        hidden_act: str,
        num_experts: int,
        size_experts: list[int] | None = None,
        bias: bool = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        factory_kwargs: dict[str, Any] = {"device": device, "dtype": dtype}
        self.in_features = in_features
        self.hidden_features = hidden_features
        self.out_features = out_features
        self.hidden_act = hidden_act
        self.num_experts = num_experts
        if size_experts is None:
            if hidden_features % num_experts != 0:
                raise ValueError(
                    f"hidden_features ({hidden_features}) must be divisible by num_experts ({num_experts})"
                )
            size_experts = [hidden_features // num_experts] * num_experts
        if len(size_experts) != num_experts:
            raise ValueError(f"size_experts has {len(size_experts)} entries, expected {num_experts}")
        self.size_experts = [int(size) for size in size_experts]

        self.weight_gate = nn.ParameterList()
        self.weight_up = nn.ParameterList()
        self.weight_down = nn.ParameterList()
        for size in self.size_experts:
            self.weight_gate.append(nn.Parameter(torch.empty((size, in_features), **factory_kwargs)))
            self.weight_up.append(nn.Parameter(torch.empty((size, in_features), **factory_kwargs)))
            self.weight_down.append(nn.Parameter(torch.empty((out_features, size), **factory_kwargs)))
        if bias:
            self.bias_gate = nn.ParameterList(
                nn.Parameter(torch.empty(size, **factory_kwargs)) for size in self.size_experts
            )
            self.bias_up = nn.ParameterList(
                nn.Parameter(torch.empty(size, **factory_kwargs)) for size in self.size_experts
            )
            self.bias_down = nn.ParameterList(
                nn.Parameter(torch.empty(out_features, **factory_kwargs)) for _ in self.size_experts
            )
        else:
            self.register_parameter("bias_gate", None)
            self.register_parameter("bias_up", None)
            self.register_parameter("bias_down", None)
        self.act_fn = ACT2FN[hidden_act]
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Kaiming-uniform (a=√5) weights and fan-in uniform biases, as ``nn.Linear`` and the published experts.

        Re-draws every tensor, loaded or not (``reset_experts``); ``post_init`` / loading use
        :meth:`initialize_parameters`, which leaves tensors loaded from a checkpoint alone.
        """
        self.initialize_parameters(respect_loaded=False)

    def initialize_parameters(self, respect_loaded: bool = True) -> None:
        """The published init; with ``respect_loaded`` through ``transformers.initialization``, whose functions skip
        tensors flagged as loaded (``_is_hf_initialized``)."""
        functions = init if respect_loaded else nn.init
        for i in range(self.num_experts):
            for weight in (self.weight_gate[i], self.weight_up[i], self.weight_down[i]):
                if weight.numel() > 0:
                    functions.kaiming_uniform_(weight, a=math.sqrt(5))
            if self.bias_gate is not None:
                for weight, bias in (
                    (self.weight_gate[i], self.bias_gate[i]),
                    (self.weight_up[i], self.bias_up[i]),
                    (self.weight_down[i], self.bias_down[i]),
                ):
                    fan_in = weight.shape[1]
                    bound = 1 / math.sqrt(fan_in) if fan_in > 0 else 0
                    functions.uniform_(bias, -bound, bound)

    def forward(self, x: torch.Tensor, i: int) -> torch.Tensor:
        gate = F.linear(x, self.weight_gate[i], self.bias_gate[i] if self.bias_gate is not None else None)  # [n, s]
        up = F.linear(x, self.weight_up[i], self.bias_up[i] if self.bias_up is not None else None)  # [n, s]
        down_bias = self.bias_down[i] if self.bias_down is not None else None
        return F.linear(self.act_fn(gate) * up, self.weight_down[i], down_bias)  # [n, out]

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, hidden_features={self.hidden_features}, "
            f"out_features={self.out_features}, "
            f"hidden_act={self.hidden_act}, num_experts={self.num_experts}, size_experts={self.size_experts}, "
            f"bias={self.bias_gate is not None}"
        )


class UniversalCalculator(nn.Module):
    """Dispatches tokens to the experts and combines them (the published ``UniversalCalculator``).

    The dispatch is replicated literally because it decides bitwise parity on CPU: token-major flatten, default
    (non-stable) sort of the expert ids, per-expert contiguous row groups in id order, ``index_add`` in sorted order.
    Output: ``y_t = Σ_j (score_j · score_scale_factor) · FFN_{e_j}(x_t)``.
    """

    def __init__(
        self,
        experts: LinearGLUExperts,
        multiply_gate_scores: bool = True,
        score_scale_factor: float = 1.0,
        add_weight_norm: bool = False,
    ) -> None:
        super().__init__()
        if multiply_gate_scores and add_weight_norm:
            raise NotImplementedError("add_weight_norm together with multiply_gate_scores is not implemented")
        self.experts = experts
        self.multiply_gate_scores = multiply_gate_scores
        self.score_scale_factor = score_scale_factor
        self.num_experts = experts.num_experts
        self.mlp_norm = None

    def forward(
        self,
        x: torch.Tensor,
        topK_indices: torch.Tensor,  # noqa: N803 - the gate's published dict keys are passed as keywords
        topK_scores: torch.Tensor,  # noqa: N803
        expert_batch_size: list[int] | None = None,
        **kwargs: Any,
    ) -> CalculatorOutput:
        batch_size, num_selects = topK_indices.shape  # N, k
        flat_indices = topK_indices.flatten()  # [N*k], pair (t, s) at t*k + s
        flat_scores = topK_scores.flatten()  # [N*k]
        batch_indices = torch.arange(batch_size, device=flat_scores.device).repeat_interleave(num_selects)  # [N*k]

        _, order = flat_indices.sort(0)  # [N*k], default (non-stable) sort as published
        sorted_scores = flat_scores.index_select(0, order)  # [N*k]
        sorted_batch_indices = batch_indices.index_select(0, order)  # [N*k]
        if expert_batch_size is None:
            expert_batch_size = flat_indices.bincount(minlength=self.num_experts).tolist()  # E ints

        sorted_x = x.index_select(0, sorted_batch_indices)  # [N*k, H]
        split_x = torch.split(sorted_x, expert_batch_size, dim=0)  # E groups, ascending expert id
        # idle experts run on zero rows (the published code skips them; outputs are identical): the autograd graph
        # then has the same shape on every rank, as DeepSpeed ZeRO-1/2 gradient bucketing needs for trainable experts
        # the token of every row, for per-expert consumers (moepatch's LoRA experts leave padding out of their loss)
        self.experts.row_tokens = torch.split(sorted_batch_indices, expert_batch_size, dim=0)
        expert_outputs = [self.experts(split_x[i], i) for i in range(self.num_experts)]
        if sum(expert_batch_size) == 0:
            expert_outputs = []
        output_dim = self.experts.out_features
        if not expert_outputs:  # no tokens at all
            y = torch.zeros((batch_size, output_dim), device=x.device, dtype=x.dtype)
            return CalculatorOutput(hidden_states=y, num_dropped_tokens=torch.tensor(-1.0))

        cat_expert_outputs = torch.cat(expert_outputs, 0)  # [N*k, out]
        if self.multiply_gate_scores:
            # the scalar product score * scale is formed first, in the score dtype, as published
            cat_expert_outputs = torch.mul(cat_expert_outputs, sorted_scores.reshape(-1, 1) * self.score_scale_factor)
        zeros = torch.zeros((batch_size, output_dim), device=cat_expert_outputs.device, dtype=cat_expert_outputs.dtype)
        y = zeros.index_add(0, sorted_batch_indices, cat_expert_outputs)  # [N, out]
        return CalculatorOutput(hidden_states=y, num_dropped_tokens=torch.tensor(-1.0))


class BaseMoELayer(nn.Module):
    """Gate + calculator. ``forward(x)`` takes one argument (``[..., H]``, padding included) as published."""

    gate: TopKBalancedNoisyGate
    calculator: UniversalCalculator
    input_size: int
    output_size: int
    num_experts: int
    num_selects: int

    def __init__(self) -> None:
        super().__init__()

    def _create_gate(self, **kwargs: Any) -> None:
        self.gate_type = kwargs.get("gate_type", "TopKBalancedNoisyGate")
        if self.gate_type != "TopKBalancedNoisyGate":
            raise NotImplementedError(f"gate_type {self.gate_type!r} is not implemented (only TopKBalancedNoisyGate)")
        self.gate = TopKBalancedNoisyGate(
            self.input_size,
            self.num_experts,
            self.num_selects,
            gate_network=kwargs.get("gate_network", "mlp"),
            use_softmax=kwargs.get("gate_use_softmax", True),
            use_balance=kwargs.get("gate_use_balance", True),
            balance_loss_weight=kwargs.get("gate_balance_loss_weight", 1e-2),
            add_noise=kwargs.get("gate_add_noise", True),
            noise_epsilon=kwargs.get("gate_noise_epsilon", 1e-2),
            layer_index=kwargs.get("layer_index", 0),
        )

    def _create_calculator(self, experts: LinearGLUExperts, **kwargs: Any) -> None:
        self.calculator_type = kwargs.get("calculator_type", "UniversalCalculator")
        if self.calculator_type != "UniversalCalculator":
            raise NotImplementedError(
                f"calculator_type {self.calculator_type!r} is not implemented (only UniversalCalculator)"
            )
        self.calculator = UniversalCalculator(
            experts,
            multiply_gate_scores=kwargs.get("multiply_gate_scores", True),
            score_scale_factor=kwargs.get("score_scale_factor", 1.0),
            add_weight_norm=kwargs.get("add_weight_norm", False),
        )

    def forward(self, x: torch.Tensor) -> MoEMlpOutput:
        original_shape = x.shape[:-1]
        x = x.reshape(-1, self.input_size)  # [N, H], token-major
        gate_outputs = self.gate(x)
        calc_outs = self.calculator(x, **gate_outputs)
        y = calc_outs.hidden_states.reshape(original_shape + (self.output_size,))  # [..., H]
        return MoEMlpOutput(
            hidden_states=y,
            balance_loss=gate_outputs.get("balance_loss"),
            num_dropped_tokens=calc_outs.num_dropped_tokens,
            gate_load=gate_outputs.get("load", torch.tensor(-1)),
            gate_importance=gate_outputs.get("importance", torch.tensor(-1)),
        )

    # --- published runtime setters ---------------------------------------------------------------------------------

    def set_num_selects(self, num_selects: int) -> None:
        if num_selects > self.gate.num_experts:
            raise ValueError(f"num_selects ({num_selects}) must not exceed num_experts ({self.gate.num_experts})")
        self.num_selects = num_selects
        self.gate.num_selects = num_selects

    def set_gate_use_softmax(self, use_softmax: bool) -> None:
        self.gate.use_softmax = use_softmax

    def set_gate_use_balance(self, use_balance: bool) -> None:
        self.gate.use_balance = use_balance

    def set_gate_balance_loss_weight(self, balance_loss_weight: float) -> None:
        self.gate.balance_loss_weight = balance_loss_weight

    def set_gate_add_noise(self, add_noise: bool) -> None:
        if add_noise and not hasattr(self.gate, "weight_noise"):
            raise KeyError("this gate was built with gate_add_noise=False and has no weight_noise to turn on")
        self.gate.add_noise = add_noise

    def set_gate_noise_epsilon(self, noise_epsilon: float) -> None:
        self.gate.noise_epsilon = noise_epsilon

    def set_calculator_multiply_gate_scores(self, multiply_gate_scores: bool) -> None:
        self.calculator.multiply_gate_scores = multiply_gate_scores

    def set_calculator_score_scale_factor(self, score_scale_factor: float) -> None:
        self.calculator.score_scale_factor = score_scale_factor

    def _set_calculator_attribute(self, name: str, value: Any) -> None:
        if name not in vars(self.calculator):
            raise KeyError(f'{self.calculator_type} does not have a key named "{name}".')
        setattr(self.calculator, name, value)

    def set_calculator_drop_tokens(self, drop_tokens: bool) -> None:
        self._set_calculator_attribute("drop_tokens", drop_tokens)

    def set_calculator_dropped_padding(self, dropped_padding: str) -> None:
        self._set_calculator_attribute("dropped_padding", dropped_padding)

    def set_calculator_capacity_factor(self, capacity_factor: float) -> None:
        self._set_calculator_attribute("capacity_factor", capacity_factor)

    def reset_gate_network(self) -> None:
        self.gate.reset_gate_network()

    def reset_experts(self) -> None:
        self.calculator.experts.reset_parameters()


class LinearGLUMoELayer(BaseMoELayer):
    """The MoE MLP of every LLaMA-MoE decoder layer (``model.layers.{i}.mlp``)."""

    def __init__(
        self,
        input_size: int,
        hidden_size: int,
        output_size: int,
        hidden_act: str,
        num_experts: int,
        num_selects: int,
        size_experts: list[int] | None = None,
        bias: bool = True,
        **kwargs: Any,
    ) -> None:
        super().__init__()
        if num_selects > num_experts:
            raise ValueError(f"num_selects ({num_selects}) must not exceed num_experts ({num_experts})")
        self.input_size = input_size
        self.hidden_size = hidden_size
        self.output_size = output_size
        self.hidden_act = hidden_act
        self.num_experts = num_experts
        self.num_selects = num_selects
        self.size_experts = size_experts
        self.bias = bias
        experts = LinearGLUExperts(
            input_size, hidden_size, output_size, hidden_act, num_experts, size_experts=size_experts, bias=bias
        )
        self._create_gate(**kwargs)
        self._create_calculator(experts, **kwargs)


# ----------------------------------------------------------------------------------------------------------------------
# Decoder layer and models
# ----------------------------------------------------------------------------------------------------------------------


class LlamaMoEDecoderLayer(GradientCheckpointingLayer):
    """``h = x + attn(norm(x)); out = h + moe(norm(h))``.

    Returns ``(hidden_states, balance_loss, num_dropped_tokens, gate_load, gate_importance, attn_weights | None)``;
    the KV cache is updated in place (``DynamicCache``) instead of being returned.
    """

    def __init__(self, config: LlamaMoEConfig, layer_index: int) -> None:
        super().__init__()
        self.hidden_size = config.hidden_size
        self.layer_index = layer_index
        self.self_attn = LlamaAttention(config=config, layer_idx=layer_index)
        self.mlp = LinearGLUMoELayer(
            input_size=config.hidden_size,
            hidden_size=config.intermediate_size,
            output_size=config.hidden_size,
            hidden_act=config.hidden_act,
            num_experts=config.num_experts,
            num_selects=config.num_selects,
            size_experts=config.expert_sizes(layer_index),
            bias=False,
            layer_index=layer_index,
            gate_type=config.gate_type,
            gate_network=config.gate_network,
            gate_use_softmax=config.gate_use_softmax,
            gate_use_balance=config.gate_use_balance,
            gate_balance_loss_weight=config.gate_balance_loss_weight,
            gate_add_noise=config.gate_add_noise,
            gate_noise_epsilon=config.gate_noise_epsilon,
            calculator_type=config.calculator_type,
            multiply_gate_scores=config.multiply_gate_scores,
            score_scale_factor=config.layer_score_scale_factor(layer_index),
            add_weight_norm=config.add_weight_norm,
            drop_tokens=config.drop_tokens,
            dropped_padding=config.dropped_padding,
            capacity_factor=config.capacity_factor,
        )
        self.input_layernorm = LlamaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.post_attention_layernorm = LlamaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)

    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        cache: Cache | None = None,
        output_attentions: bool = False,
        use_cache: bool = False,
    ) -> tuple[Any, ...]:
        residual = hidden_states
        hidden_states = self.input_layernorm(hidden_states)
        hidden_states, attn_weights = self.self_attn(
            hidden_states,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache,
            output_attentions=output_attentions,
        )
        hidden_states = residual + hidden_states

        residual = hidden_states
        hidden_states = self.post_attention_layernorm(hidden_states)
        mlp_outs: MoEMlpOutput = self.mlp(hidden_states)
        hidden_states = residual + cast(torch.Tensor, mlp_outs.hidden_states)  # ModelOutput fields are Optional
        return (
            hidden_states,
            mlp_outs.balance_loss,
            mlp_outs.num_dropped_tokens,
            mlp_outs.gate_load,
            mlp_outs.gate_importance,
            attn_weights,
        )


class LlamaMoEPreTrainedModel(PreTrainedModel):
    """Shared loading/initialisation behaviour of the LLaMA-MoE models."""

    config_class = LlamaMoEConfig
    config: LlamaMoEConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _no_split_modules = ["LlamaMoEDecoderLayer"]
    # the published eager attention only: the additive summed mask is part of the parity contract
    _supports_flash_attn = False
    _supports_sdpa = False
    _supports_flex_attn = False
    # checkpoints saved by code with a non-persistent inv_freq (SFT era) load clean; it is rebuilt from the formula
    _keys_to_ignore_on_load_missing = [r"rotary_emb\.inv_freq"]

    def _init_weights(self, module: nn.Module) -> None:
        """``nn.Linear`` / ``nn.Embedding`` / RMSNorm as v5 does (normal(0, initializer_range), padding row zeroed,
        ones), expert ``ParameterList``s kaiming-uniform as published, ``inv_freq`` from the formula."""
        super()._init_weights(module)
        if isinstance(module, LinearGLUExperts):
            module.initialize_parameters(respect_loaded=True)
        elif isinstance(module, LlamaRotaryEmbedding):
            init.copy_(module.inv_freq, rope_inv_freq(module.dim, module.base, device=module.inv_freq.device))


class LlamaMoEModel(LlamaMoEPreTrainedModel):
    """Embeddings → ``num_hidden_layers`` × :class:`LlamaMoEDecoderLayer` → final RMSNorm."""

    def __init__(self, config: LlamaMoEConfig) -> None:
        super().__init__(config)
        self.padding_idx = config.pad_token_id
        self.vocab_size = config.vocab_size
        self.embed_tokens: nn.Module = nn.Embedding(config.vocab_size, config.hidden_size, self.padding_idx)
        self.layers = nn.ModuleList([LlamaMoEDecoderLayer(config, i) for i in range(config.num_hidden_layers)])
        self.norm = LlamaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.gradient_checkpointing = False
        self.post_init()

    def get_input_embeddings(self) -> nn.Module:
        return self.embed_tokens

    def set_input_embeddings(self, value: nn.Module) -> None:
        self.embed_tokens = value

    @deprecate_kwarg("past_key_values", "5.40.0", new_name="cache")
    @can_return_tuple
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        use_cache: bool | None = None,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        **kwargs: Any,
    ) -> BaseMoEModelOutputWithPast:
        output_attentions = output_attentions if output_attentions is not None else self.config.output_attentions
        output_hidden_states = (
            output_hidden_states if output_hidden_states is not None else self.config.output_hidden_states
        )
        use_cache = use_cache if use_cache is not None else self.config.use_cache
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("You must specify exactly one of input_ids or inputs_embeds")
        if self.gradient_checkpointing and self.training and torch.is_grad_enabled() and use_cache:
            logger.warning_once(
                "`use_cache=True` is incompatible with gradient checkpointing; using `use_cache=False`."
            )
            use_cache = False
        if cache is not None and not isinstance(cache, Cache):
            raise TypeError(
                f"cache must be a transformers Cache (e.g. DynamicCache), got {type(cache).__name__}; tuple caches "
                "were removed in transformers 5"
            )

        if inputs_embeds is None:
            inputs_embeds = self.embed_tokens(input_ids)  # [B, T, H]
        batch_size, seq_length = inputs_embeds.shape[:2]
        if use_cache and cache is None:
            cache = DynamicCache(config=self.config)
        past_len = cache.get_seq_length() if cache is not None else 0
        if position_ids is None:  # the same positions for every row, as published (no left-padding shift)
            position_ids = torch.arange(past_len, past_len + seq_length, device=inputs_embeds.device).unsqueeze(0)
        mask = _prepare_decoder_attention_mask(
            attention_mask, batch_size, seq_length, past_len, inputs_embeds.dtype, inputs_embeds.device
        )  # [B, 1, T, S] additive, or None

        hidden_states = inputs_embeds
        all_hidden_states: tuple[torch.Tensor, ...] | None = () if output_hidden_states else None
        all_attentions: tuple[torch.Tensor, ...] | None = () if output_attentions else None
        balance_loss: torch.Tensor | float = 0.0
        num_dropped_tokens: tuple[torch.Tensor, ...] = ()
        gate_load: tuple[torch.Tensor, ...] = ()
        gate_importance: tuple[torch.Tensor, ...] = ()
        for decoder_layer in self.layers:
            if all_hidden_states is not None:
                all_hidden_states += (hidden_states,)
            layer_outputs = decoder_layer(
                hidden_states,
                attention_mask=mask,
                position_ids=position_ids,
                cache=cache,
                output_attentions=output_attentions,
                use_cache=use_cache,
            )
            hidden_states = layer_outputs[0]
            layer_balance = layer_outputs[1]
            if isinstance(balance_loss, torch.Tensor):  # multi-device placement: accumulate where the sum lives
                layer_balance = layer_balance.to(balance_loss.device)
            balance_loss = balance_loss + layer_balance
            num_dropped_tokens += (layer_outputs[2],)
            gate_load += (layer_outputs[3],)
            gate_importance += (layer_outputs[4],)
            if all_attentions is not None:
                all_attentions += (layer_outputs[5],)

        hidden_states = self.norm(hidden_states)
        if all_hidden_states is not None:
            all_hidden_states += (hidden_states,)
        return BaseMoEModelOutputWithPast(
            last_hidden_state=hidden_states,
            cache=cache if use_cache else None,
            hidden_states=all_hidden_states,
            attentions=all_attentions,
            balance_loss=balance_loss,
            num_dropped_tokens=num_dropped_tokens,
            gate_load=gate_load,
            gate_importance=gate_importance,
        )

    # --- published runtime setters (update the config too, so save_pretrained keeps them) -----------------------------

    def _moe_layers(self) -> list[LinearGLUMoELayer]:
        return [cast(LlamaMoEDecoderLayer, layer).mlp for layer in self.layers]

    def _set_on_every_layer(self, layer_setter: str, value: Any, config_key: str) -> None:
        """Call ``mlp.<layer_setter>(value)`` on every MoE layer and keep ``config.<config_key>`` in sync."""
        for mlp in self._moe_layers():
            getattr(mlp, layer_setter)(value)
        setattr(self.config, config_key, value)

    def set_moe_num_selects(self, num_selects: int) -> None:
        self._set_on_every_layer("set_num_selects", num_selects, "num_selects")

    def set_moe_gate_use_softmax(self, use_softmax: bool) -> None:
        self._set_on_every_layer("set_gate_use_softmax", use_softmax, "gate_use_softmax")

    def set_moe_gate_use_balance(self, use_balance: bool) -> None:
        self._set_on_every_layer("set_gate_use_balance", use_balance, "gate_use_balance")

    def set_moe_gate_balance_loss_weight(self, balance_loss_weight: float) -> None:
        self._set_on_every_layer("set_gate_balance_loss_weight", balance_loss_weight, "gate_balance_loss_weight")

    def set_moe_gate_add_noise(self, add_noise: bool) -> None:
        self._set_on_every_layer("set_gate_add_noise", add_noise, "gate_add_noise")

    def set_moe_gate_noise_epsilon(self, noise_epsilon: float) -> None:
        self._set_on_every_layer("set_gate_noise_epsilon", noise_epsilon, "gate_noise_epsilon")

    def set_moe_calculator_multiply_gate_scores(self, multiply_gate_scores: bool) -> None:
        self._set_on_every_layer("set_calculator_multiply_gate_scores", multiply_gate_scores, "multiply_gate_scores")

    def set_moe_calculator_score_scale_factor(self, score_scale_factor: float, layer_index: int | None = None) -> None:
        """All layers, or only ``layer_index`` (the config then stores a per-layer list)."""
        if layer_index is None:
            self._set_on_every_layer("set_calculator_score_scale_factor", score_scale_factor, "score_scale_factor")
            return
        self._moe_layers()[layer_index].set_calculator_score_scale_factor(score_scale_factor)
        factors = [self.config.layer_score_scale_factor(i) for i in range(self.config.num_hidden_layers)]
        factors[layer_index] = score_scale_factor
        self.config.score_scale_factor = factors

    def set_moe_calculator_drop_tokens(self, drop_tokens: bool) -> None:
        self._set_on_every_layer("set_calculator_drop_tokens", drop_tokens, "drop_tokens")

    def set_moe_calculator_dropped_padding(self, dropped_padding: str) -> None:
        self._set_on_every_layer("set_calculator_dropped_padding", dropped_padding, "dropped_padding")

    def set_moe_calculator_capacity_factor(self, capacity_factor: float) -> None:
        self._set_on_every_layer("set_calculator_capacity_factor", capacity_factor, "capacity_factor")

    def reset_gate_network(self) -> None:
        for mlp in self._moe_layers():
            mlp.reset_gate_network()

    def reset_experts(self) -> None:
        for mlp in self._moe_layers():
            mlp.reset_experts()


class LlamaMoEForCausalLM(AppliesMoePatchOnLoad, LlamaMoEPreTrainedModel, GenerationMixin):
    """LLaMA-MoE with the LM head. ``loss`` = shifted CE (mean, ignore −100) on model-dtype logits, plus the summed
    balance loss whenever labels are given and it is positive (train and eval alike, as published)."""

    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}  # tied only if tie_word_embeddings

    def __init__(self, config: LlamaMoEConfig) -> None:
        super().__init__(config)
        self.model = LlamaMoEModel(config)
        self.vocab_size = config.vocab_size
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def get_input_embeddings(self) -> nn.Module:
        return self.model.embed_tokens

    def set_input_embeddings(self, value: nn.Module) -> None:
        self.model.embed_tokens = value

    def get_output_embeddings(self) -> nn.Linear:
        return self.lm_head

    def set_output_embeddings(self, new_embeddings: nn.Linear) -> None:
        self.lm_head = new_embeddings

    def set_decoder(self, decoder: LlamaMoEModel) -> None:
        self.model = decoder

    def get_decoder(self) -> LlamaMoEModel:
        return self.model

    @deprecate_kwarg("past_key_values", "5.40.0", new_name="cache")
    @can_return_tuple
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        **kwargs: Any,
    ) -> MoECausalLMOutputWithPast:
        outputs: BaseMoEModelOutputWithPast = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            output_attentions=output_attentions,
            output_hidden_states=output_hidden_states,
            return_dict=True,
        )
        hidden_states = cast(torch.Tensor, outputs.last_hidden_state)  # [B, T, H] (ModelOutput fields are Optional)
        if isinstance(logits_to_keep, int) and logits_to_keep > 0:
            hidden_states = hidden_states[:, -logits_to_keep:, :]
        elif isinstance(logits_to_keep, torch.Tensor):
            hidden_states = hidden_states[:, logits_to_keep, :]
        logits = self.lm_head(hidden_states)  # [B, T, V], model dtype (no fp32 upcast, as published)

        loss = None
        if labels is not None:
            shift_logits = logits[..., :-1, :].contiguous().view(-1, self.config.vocab_size)  # [B*(T-1), V]
            shift_labels = labels[..., 1:].contiguous().view(-1).to(shift_logits.device)  # [B*(T-1)]
            loss = F.cross_entropy(shift_logits, shift_labels, ignore_index=-100)
            balance_loss = outputs.balance_loss
            if balance_loss is not None and balance_loss > 0:
                loss = loss + balance_loss

        return MoECausalLMOutputWithPast(
            loss=loss,
            logits=logits,
            cache=outputs.cache,
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
            num_dropped_tokens=outputs.num_dropped_tokens,
            balance_loss=outputs.balance_loss,
            gate_load=outputs.gate_load,
            gate_importance=outputs.gate_importance,
        )

    # --- published runtime setters, delegated to the base model -----------------------------------------------------

    def set_moe_num_selects(self, num_selects: int) -> None:
        self.model.set_moe_num_selects(num_selects)

    def set_moe_gate_use_softmax(self, use_softmax: bool) -> None:
        self.model.set_moe_gate_use_softmax(use_softmax)

    def set_moe_gate_use_balance(self, use_balance: bool) -> None:
        self.model.set_moe_gate_use_balance(use_balance)

    def set_moe_gate_balance_loss_weight(self, balance_loss_weight: float) -> None:
        self.model.set_moe_gate_balance_loss_weight(balance_loss_weight)

    def set_moe_gate_add_noise(self, add_noise: bool) -> None:
        self.model.set_moe_gate_add_noise(add_noise)

    def set_moe_gate_noise_epsilon(self, noise_epsilon: float) -> None:
        self.model.set_moe_gate_noise_epsilon(noise_epsilon)

    def set_moe_calculator_multiply_gate_scores(self, multiply_gate_scores: bool) -> None:
        self.model.set_moe_calculator_multiply_gate_scores(multiply_gate_scores)

    def set_moe_calculator_score_scale_factor(self, score_scale_factor: float, layer_index: int | None = None) -> None:
        self.model.set_moe_calculator_score_scale_factor(score_scale_factor, layer_index=layer_index)

    def set_moe_calculator_drop_tokens(self, drop_tokens: bool) -> None:
        self.model.set_moe_calculator_drop_tokens(drop_tokens)

    def set_moe_calculator_dropped_padding(self, dropped_padding: str) -> None:
        self.model.set_moe_calculator_dropped_padding(dropped_padding)

    def set_moe_calculator_capacity_factor(self, capacity_factor: float) -> None:
        self.model.set_moe_calculator_capacity_factor(capacity_factor)

    def reset_gate_network(self) -> None:
        self.model.reset_gate_network()

    def reset_experts(self) -> None:
        self.model.reset_experts()


__all__ = [
    "BaseMoEModelOutputWithPast",
    "CalculatorOutput",
    "LinearGLUExperts",
    "LinearGLUMoELayer",
    "LlamaMoEDecoderLayer",
    "LlamaMoEForCausalLM",
    "LlamaMoEModel",
    "LlamaMoEPreTrainedModel",
    "LlamaRotaryEmbedding",
    "MoECausalLMOutputWithPast",
    "MoEMlpOutput",
    "TopKBalancedNoisyGate",
    "UniversalCalculator",
]
