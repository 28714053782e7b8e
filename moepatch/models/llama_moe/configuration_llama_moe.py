"""LLaMA-MoE configuration, field-for-field compatible with the published Hub checkpoints (Dec-2023 remote code).

The published ``configuration_llama_moe.py`` is a transformers-4.31 ``PretrainedConfig`` with an explicit ``__init__``;
this is the same set of fields with the same defaults written as a transformers-5 dataclass config, so the official
``config.json`` files load unchanged and ``save_pretrained`` / ``from_pretrained`` round trips keep every field.

Two transformers-5 facts shape this class:

* ``rope_scaling`` is a base-class property aliasing ``rope_parameters``, and every config standardises it, so a
  ``"rope_scaling": null`` in the official ``config.json`` becomes ``{"rope_theta": 10000.0, "rope_type": "default"}``.
  The published attention indexed ``rope_scaling["type"]`` whenever it was not ``None`` and crashed (``KeyError``);
  here only ``rope_type`` ``"linear"`` / ``"dynamic"`` is a scaling request (see
  :meth:`LlamaMoEConfig.rope_scaling_request`).
* Fields the class does not declare (the C2R ``top_t`` / ``collaborative_list``, the stray ``gates`` of the official
  file, a ``moepatch`` block) arrive as kwargs and are kept as plain attributes, which ``to_dict`` serialises again.
"""

from __future__ import annotations

from typing import Any

from transformers import PretrainedConfig

_ROPE_SCALING_TYPES = ("linear", "dynamic")
"""The only scaling kinds the published ``_rope_scaling_validation`` accepts."""


class LlamaMoEConfig(PretrainedConfig):
    """Configuration of a LLaMA-MoE model (``model_type="llama_moe"``).

    LLaMA fields keep the published class defaults (which are *not* those of the released checkpoints: the
    checkpoints' ``config.json`` sets ``num_experts=8`` etc. explicitly). MoE fields:

    * ``num_experts`` / ``num_selects``: experts per layer and experts per token (k).
    * ``size_experts``: one list per layer of per-expert widths (each summing to ``intermediate_size``); ``None``
      gives every expert ``intermediate_size // num_experts`` rows (``intermediate_size`` must be divisible).
    * ``gate_*``: the ``TopKBalancedNoisyGate`` (network ``"mlp"`` or ``"linear"``, fp32 softmax over the k chosen
      logits, CV² balance loss weighted by ``gate_balance_loss_weight``, learned noise in training).
    * ``calculator_type`` / ``multiply_gate_scores`` / ``score_scale_factor`` (float, or a list indexed by the absolute
      layer index) / ``add_weight_norm``: the ``UniversalCalculator``.
    * ``drop_tokens`` / ``dropped_padding`` / ``capacity_factor``: unused by the ``UniversalCalculator``; kept because
      the published configs carry them.
    """

    model_type = "llama_moe"
    # published: ["past_key_values"]; transformers 5 outputs name the KV cache "cache" (the Trainer's default)
    keys_to_ignore_at_inference = ["past_key_values", "cache"]

    # LLaMA fields (published class defaults)
    vocab_size: int = 32000
    hidden_size: int = 4096
    intermediate_size: int = 11008
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: int | None = None
    hidden_act: str = "silu"
    max_position_embeddings: int = 2048
    initializer_range: float = 0.02
    rms_norm_eps: float = 1e-6
    use_cache: bool = True
    pad_token_id: int | None = 0
    bos_token_id: int | None = 1
    eos_token_id: int | list[int] | None = 2
    pretraining_tp: int = 1
    tie_word_embeddings: bool = False
    rope_parameters: dict | None = None
    # MoE fields
    num_experts: int = 16
    num_selects: int = 4
    size_experts: list[list[int]] | None = None
    gate_type: str = "TopKBalancedNoisyGate"
    gate_network: str = "mlp"
    gate_use_softmax: bool = True
    gate_use_balance: bool = True
    gate_balance_loss_weight: float = 1e-2
    gate_add_noise: bool = True
    gate_noise_epsilon: float = 1e-2
    calculator_type: str = "UniversalCalculator"
    multiply_gate_scores: bool = True
    score_scale_factor: float | list[float] = 1.0
    add_weight_norm: bool = False
    drop_tokens: bool = True
    dropped_padding: str = "zero"
    capacity_factor: float = 1.25

    def __post_init__(self, **kwargs: Any) -> None:
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        super().__post_init__(**kwargs)
        self._validate_llama_moe()

    def _validate_llama_moe(self) -> None:
        """Reject what the published code rejects (at construction, not at the first forward)."""
        if self.hidden_size % self.num_attention_heads != 0:
            raise ValueError(
                f"hidden_size ({self.hidden_size}) must be divisible by num_attention_heads "
                f"({self.num_attention_heads})"
            )
        kv_heads = self.num_key_value_heads if self.num_key_value_heads is not None else self.num_attention_heads
        if self.num_attention_heads % kv_heads != 0:
            raise ValueError(
                f"num_attention_heads ({self.num_attention_heads}) must be a multiple of num_key_value_heads "
                f"({kv_heads})"
            )
        if not 1 <= self.num_selects <= self.num_experts:
            raise ValueError(f"num_selects ({self.num_selects}) must lie in [1, num_experts={self.num_experts}]")
        if self.size_experts is None:
            if self.intermediate_size % self.num_experts != 0:
                raise ValueError(
                    f"size_experts is None, so intermediate_size ({self.intermediate_size}) must be divisible by "
                    f"num_experts ({self.num_experts})"
                )
        else:
            if len(self.size_experts) != self.num_hidden_layers:
                raise ValueError(
                    f"size_experts has {len(self.size_experts)} entries, expected one per layer "
                    f"({self.num_hidden_layers})"
                )
            for layer_index, sizes in enumerate(self.size_experts):
                if len(sizes) != self.num_experts:
                    raise ValueError(
                        f"size_experts[{layer_index}] has {len(sizes)} entries, expected num_experts "
                        f"({self.num_experts})"
                    )
        factors = self.score_scale_factor
        if isinstance(factors, (list, tuple)) and len(factors) != self.num_hidden_layers:
            raise ValueError(
                f"score_scale_factor is a list of {len(factors)} values, expected one per layer "
                f"({self.num_hidden_layers})"
            )
        scaling = self.rope_scaling_request()
        if scaling is not None:
            kind, factor = scaling
            if kind not in _ROPE_SCALING_TYPES:
                raise ValueError(f"rope scaling type must be one of {_ROPE_SCALING_TYPES}, got {kind!r}")
            if not isinstance(factor, float) or factor <= 1.0:
                raise ValueError(f"rope scaling factor must be a float > 1, got {factor!r}")

    def rope_scaling_request(self) -> tuple[str, Any] | None:
        """The RoPE scaling the model must apply, as ``(kind, factor)``, or ``None`` for plain RoPE.

        transformers 5 standardises ``rope_parameters`` (alias ``rope_scaling``) into a dict even when the file says
        ``null``; a dict whose ``rope_type`` is ``"default"`` is *not* a scaling request (the published code treated
        any non-``None`` value as one and crashed). Legacy ``{"type": ..., "factor": ...}`` dicts are understood too.
        The factor is the file's value (construction refuses one that is not a float > 1).
        """
        params = self.rope_parameters
        if not params:
            return None
        kind = params.get("rope_type", params.get("type", "default"))
        if kind in (None, "default"):
            return None
        return kind, params.get("factor")

    @property
    def rope_base(self) -> float:
        """RoPE base: the published code hard-codes 10000; a ``rope_theta`` given explicitly (SFT-era configs) wins."""
        params = self.rope_parameters or {}
        return float(params.get("rope_theta", 10000.0))

    def expert_sizes(self, layer_index: int) -> list[int]:
        """Per-expert widths of one layer (``size_experts[layer_index]``, or equal shares of ``intermediate_size``)."""
        if self.size_experts is None:
            return [self.intermediate_size // self.num_experts] * self.num_experts
        return [int(size) for size in self.size_experts[layer_index]]

    def layer_score_scale_factor(self, layer_index: int) -> float:
        """``score_scale_factor`` of one layer (a list is indexed by the absolute layer index, as published)."""
        if isinstance(self.score_scale_factor, (list, tuple)):
            return float(self.score_scale_factor[layer_index])
        return float(self.score_scale_factor)


__all__ = ["LlamaMoEConfig"]
