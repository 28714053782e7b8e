"""Configuration of MoLM / ModuleFormer (IBM/ModuleFormer), rewritten for transformers 5.

IBM's ``configuration_moduleformer.py`` imports ``transformers.onnx`` (removed in transformers 5), so the published
package cannot even build its config there.  This is a clean re-implementation with the **published field names and
defaults**, so the ``config.json`` of ``ibm/MoLM-*`` checkpoints loads unchanged: the extra
keys those files carry (``att_func``, ``local_size``, ``moe_type``, ``pre_norm``, ``universal``, ``world_size``,
``torch_dtype``) are kept as plain attributes, exactly as the published ``PretrainedConfig`` kept them.

The class is a transformers-5 dataclass config (like ``GPT2Config``) but deliberately **not** ``@strict``: strict
configs reject undeclared keys, and MoLM configs have several.
"""

from __future__ import annotations

from typing import Any

from transformers import PretrainedConfig

__all__ = ["ModuleFormerConfig"]


class ModuleFormerConfig(PretrainedConfig):
    r"""Configuration of a ModuleFormer (MoLM) model: a mixture of attention heads and a mixture of MLP experts.

    Defaults are the published ones (IBM/ModuleFormer ``configuration_moduleformer.py``); the MoLM checkpoints
    override ``n_layer`` (24/48), ``n_head=1``, ``att_hidden=1024``, ``n_att_experts=16`` and ``k_att``/``k_mlp``.

    Several fields are stored but **never read by the model**, as in the published code: ``layer_norm_epsilon``
    (every LayerNorm uses PyTorch's default 1e-5), ``n_ctx``, ``attn_pdrop`` (its Dropout is never applied) and
    ``gate_type`` values other than ``"mlp"``/``"linear"``.  ``block_size`` and ``history_length`` only size the two
    saved-but-unused attention buffers (``C = history_length + block_size``); attention is never windowed.

    Args:
        vocab_size: vocabulary size of ``transformer.wte`` and ``lm_head``.
        block_size: with ``history_length``, the side of the unused ``attn.mask`` / ``attn.cum_weight`` buffers.
        history_length: see ``block_size``; also sets the default ``n_ctx = history_length * n_layer``.
        n_embd: hidden size.
        n_layer: number of blocks.
        n_head: heads per selected attention expert (1 for MoLM; then ``k_proj``/``v_proj`` are identities).
        att_hidden: width of one attention expert (``q_proj`` experts map ``n_embd -> att_hidden``).
        ffd_hidden: hidden width of one MLP expert.
        activation_function: activation of the MLP experts (``"gelu_new"``, the tanh-form GELU).
        resid_pdrop: dropout on both residual branches.
        embd_pdrop: dropout on the embeddings.
        attn_pdrop: builds ``attn.attn_dropout``, which the published forward never applies.
        moe_pdrop: dropout inside the gate MLP (``w_gate.2``).
        sample_topk: in training, how many of the ``k`` experts are sampled instead of taken by top-k.
        gating_size: hidden width of the gate MLP.
        n_att_experts: experts of the attention MoE (``attn.q_proj``).
        k_att: experts chosen per token by the attention MoE.
        n_mlp_experts: experts of the MLP MoE (``mlpf``).
        k_mlp: experts chosen per token by the MLP MoE.
        layer_norm_epsilon: stored only (see above).
        initializer_range: std of the normal initialisation.
        use_cache: return a cache from the forward (needed by ``generate``).
        bos_token_id: beginning-of-sequence id.
        eos_token_id: end-of-sequence id.
        pad_token_id: padding id (unset in the published config).
        tie_word_embeddings: tie ``lm_head`` to ``wte`` (``False`` for MoLM).
        aux_loss_type: ``"mi"`` (negative mutual information) or anything else for the switch loss.
        aux_loss_weight: weight of the summed gate losses in the LM loss; 0 (MoLM) never adds it.
        gate_type: ``"mlp"`` (MoLM: Linear+bias, GELU, Dropout, Linear) or ``"linear"`` (one Linear, no bias).
        n_ctx: stored only; defaults to ``history_length * n_layer``.
    """

    model_type = "moduleformer"
    keys_to_ignore_at_inference = ["past_key_values", "cache"]
    attribute_map = {
        "max_position_embeddings": "n_positions",
        "hidden_size": "n_embd",
        "num_attention_heads": "n_head",
        "num_hidden_layers": "n_layer",
    }

    vocab_size: int = 50295
    block_size: int = 512
    history_length: int = 512
    n_embd: int = 1024
    n_layer: int = 24
    n_head: int = 8
    att_hidden: int = 512
    ffd_hidden: int = 2048
    activation_function: str = "gelu_new"
    resid_pdrop: float | int = 0.0
    embd_pdrop: float | int = 0.0
    attn_pdrop: float | int = 0.0
    moe_pdrop: float | int = 0.0
    sample_topk: int = 0
    gating_size: int = 256
    n_att_experts: int = 32
    k_att: int = 2
    n_mlp_experts: int = 32
    k_mlp: int = 2
    layer_norm_epsilon: float = 1e-5
    initializer_range: float = 0.02
    use_cache: bool = True
    bos_token_id: int | None = 50256
    eos_token_id: int | list[int] | None = 50256
    pad_token_id: int | None = None
    tie_word_embeddings: bool = False
    aux_loss_type: str = "mi"
    aux_loss_weight: float | int = 0.0
    gate_type: str = "mlp"
    n_ctx: int | None = None

    def __post_init__(self, **kwargs: Any) -> None:
        # Standard names (``num_hidden_layers=...``) arrive as extra kwargs; resolve them before deriving n_ctx.
        for alias, field_name in self.attribute_map.items():
            if alias in kwargs:
                setattr(self, field_name, kwargs.pop(alias))
        # The published __init__ sets n_ctx = history_length * n_layer and then lets a JSON ``n_ctx`` (passed through
        # kwargs) override it; both agree for the released checkpoints.
        if self.n_ctx is None:
            self.n_ctx = self.history_length * self.n_layer
        if self.att_hidden % self.n_head != 0:
            raise ValueError(f"att_hidden ({self.att_hidden}) must be divisible by n_head ({self.n_head}).")
        if not 0 < self.k_att <= self.n_att_experts:
            raise ValueError(f"k_att ({self.k_att}) must be in [1, n_att_experts={self.n_att_experts}].")
        if not 0 < self.k_mlp <= self.n_mlp_experts:
            raise ValueError(f"k_mlp ({self.k_mlp}) must be in [1, n_mlp_experts={self.n_mlp_experts}].")
        super().__post_init__(**kwargs)
