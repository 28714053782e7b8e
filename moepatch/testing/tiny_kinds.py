"""Tiny real transformers MoE models for the router kinds beyond softmax → top-k.

Most MoE models released since DeepSeek-V3 do not route by softmax → top-k: they add a selection bias to sigmoid (or
softmax) scores, limit the choice to a few expert groups, take the top-k of the raw logits, use PhiMoE's sparsemixer,
hash the token id, or run a small MLP as the router.  A test of such a router needs a model in which every part of the
rule *matters*: a selection bias that is zero (as transformers initialises it), a group limit over a single group, or
a scaling factor of 1 would let an implementation that ignores them pass.  So each model here is built from its real
config class (``transformers.CONFIG_MAPPING[model_type]``) with

* hidden size 32, 4 query / 2 KV heads (4 / 4 where the attention is multi-head latent attention), 2–3 layers with at
  least one MoE layer and a dense layer where the family has one (``first_k_dense_replace``, ``mlp_layer_types``,
  ``moe_layer_start_index``, ``num_dense_layers``, ``mlp_only_layers``, ``interleave_moe_layer_step``);
* 8 routed experts, top-2 (exceptions, which the families impose: ZAYA routes top-1 over 8 experts + 1 skip class,
  LongCat-Flash adds 2 zero-computation experts to its 8, Doge's product keys need a square count: 16 = 4 × 4);
* where the router has a group limit: the 8 experts in 4 groups, 2 groups kept;
* where the router (or its block) has a routed scaling factor: 2.5, not 1;
* where the config has ``norm_topk_prob`` (or an alias such as ``moe_renormalize``): ``True``, so renormalisation runs;
* vocabulary = the tiny tokenizer's (:func:`moepatch.testing.tiny.tiny_tokenizer`), pad / bos / eos 0 / 1 / 2, untied
  embeddings, ``initializer_range`` 0.2 (routers with a real spread of scores);
* every selection bias, zero-initialised router bias or weight, neutral router scale and hash table overwritten by
  :func:`tiny_kind_model` with random values (:data:`RANDOMISED` lists them per type with their attribute paths).  A
  selection bias gets a scale at which it changes the chosen experts of roughly 40–65 % of the tokens of the first MoE
  layer compared with a zero bias (measured on random tokens): a test fails if an implementation ignores it, and the
  logits still matter.

:data:`KIND_NOTES` says per type which router kind it is (letters of the router-kinds table, primes for variants) and
what the tiny config sets.

Example:
    ```python
    from moepatch.testing.tiny_kinds import tiny_kind_model
    model = tiny_kind_model("deepseek_v3")
    model.model.layers[1].mlp.gate.e_score_correction_bias  # random, non-zero
    ```
"""

from __future__ import annotations

import fnmatch
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from transformers import CONFIG_MAPPING
from transformers import AutoModelForCausalLM
from transformers import PretrainedConfig
from transformers import PreTrainedModel

TINY_VOCAB_SIZE = 512
"""The length of :func:`moepatch.testing.tiny.tiny_tokenizer`'s vocabulary (a constant here, so that this module does
not import ``tiny``, which builds these models for its own callers; a test checks the two agree)."""
TINY_KIND_NUM_EXPERTS = 8
"""Routed experts per MoE layer (see the module docstring for the three families that differ)."""
TINY_KIND_TOP_K = 2
"""Experts per token."""
TINY_KIND_GROUPS = 4
"""Expert groups of a group-limited router (2 experts each)."""
TINY_KIND_TOPK_GROUP = 2
"""Groups a group-limited router keeps."""
TINY_KIND_SCALING = 2.5
"""Routed scaling factor wherever the router or its block has one: a factor of 1 would hide a missing multiplication."""

ANCHOR_TYPES: tuple[str, ...] = (
    "deepseek_v3", "glm4_moe", "gpt_oss", "llama4_text", "ernie4_5_moe", "granitemoe", "minimax_m2", "phimoe",
    "kimi_linear", "longcat_flash", "aria_text", "afmoe",
)
"""One or two model types per router kind A–H: the ones the router-generalisation tests run first."""
FURTHER_TYPES: tuple[str, ...] = (
    "deepseek_v4", "zaya", "jetmoe", "laguna", "hy_v3", "ergo", "kolibri1", "inkling_text", "inkling2_text",
    "lfm2_moe", "cohere2_moe", "flint", "axk2", "beam", "minimax_m3_vl_text", "gemma4_text", "deepseek_v2", "doge",
)
"""Further types whose router computation differs from every anchor's (a cast, where the bias lives, an epsilon, the
score function, where the scaling factor is applied, ...) and that build in about a second on a CPU."""
LAYOUT_TYPES: tuple[str, ...] = (
    "deepseek_v32", "glm_moe_dsa", "bailing_hybrid", "kolibri1_1", "granitemoehybrid", "qwen4_exp_text", "qwen4_exp",
    "gemma4",
)
"""Types whose router computes like an anchor's or a further type's, but whose default config, shrunk, has no MoE layer
that runs: every layer dense at a tiny depth (``first_k_dense_replace`` / ``mlp_only_layers`` defaults of 2–3), only
linear-attention or Mamba layers (transformers needs one attention layer's cache to build the masks), required
sparse-attention indexer sizes left unset, or a multimodal wrapper whose text config has no MoE block by default
(:data:`TEXT_TYPE_OF`)."""
ROUTER_KIND_TYPES: tuple[str, ...] = ANCHOR_TYPES + FURTHER_TYPES + LAYOUT_TYPES
"""Every model type :func:`tiny_kind_model` builds."""
TEXT_TYPE_OF: dict[str, str] = {"gemma4": "gemma4_text", "qwen4_exp": "qwen4_exp_text"}
"""Multimodal wrapper types → the text type whose tiny config becomes their ``text_config``: the wrapper's MoE is its
text decoder's, so one text config (sizes, routing settings) serves both.  ``AutoModelForCausalLM`` builds Qwen4-Exp's
text model alone from the wrapper config, and Gemma 4's ``*ForConditionalGeneration`` around it (vision and audio
towers left out)."""


@dataclass(frozen=True)
class Randomised:
    """A family of tensors :func:`tiny_kind_model` overwrites after ``from_config``.

    ``pattern`` is an ``fnmatch`` pattern over the model's parameter and buffer names.  ``kind``:

    * ``"bias"``: random sign, magnitude uniform in [0.5, 1.5] × ``scale`` — never zero, never negligible;
    * ``"normal"``: N(0, ``scale``²), for a router weight that transformers initialises to zero;
    * ``"positive"``: uniform in [1 − ``scale``, 1 + ``scale``], for a multiplicative scale initialised to one;
    * ``"hash"``: each row a random set of distinct expert ids, for a token-id → experts table initialised to zeros
      (which would send every token to expert 0 in every slot).

    ``keep_last`` leaves the last entry as transformers set it (ZAYA's skip class: ``_init_weights`` writes −1 there
    even when loading a checkpoint, so a random value would not survive ``save_pretrained`` / ``from_pretrained``).
    """

    pattern: str
    kind: str
    scale: float
    why: str
    keep_last: bool = False


def _selection_bias(path: str, scale: float, where: str) -> Randomised:
    return Randomised(path, "bias", scale, f"selection bias ({where}), zero-initialised; only the choice reads it")


_LAYERS = "model.layers.*."
_GATE_BIAS = _LAYERS + "mlp.gate.e_score_correction_bias"

RANDOMISED: dict[str, tuple[Randomised, ...]] = {
    "deepseek_v3": (_selection_bias(_GATE_BIAS, 0.1, "router buffer, added to the sigmoid scores"),),
    "glm4_moe": (_selection_bias(_GATE_BIAS, 0.1, "router buffer, added to the sigmoid scores"),),
    "gpt_oss": (Randomised(_LAYERS + "mlp.router.bias", "bias", 0.4,
                           "router linear bias nn.Parameter, part of the logits the top-k is taken of; transformers "
                           "draws it from N(0, initializer_range), redrawn at a scale at which it decides"),),
    "llama4_text": (),
    "ernie4_5_moe": (_selection_bias(_LAYERS + "mlp.gate.moe_statics.e_score_correction_bias", 0.1,
                                     "nn.Parameter(requires_grad=False) of shape [1, E] in the router's `moe_statics` "
                                     "submodule, added to the softmax probabilities"),),
    "granitemoe": (),
    "minimax_m2": (_selection_bias(_LAYERS + "mlp.e_score_correction_bias", 0.1,
                                   "buffer on the *block*, passed to the router's forward as an argument"),),
    "phimoe": (),
    "kimi_linear": (_selection_bias(_GATE_BIAS, 0.1, "router buffer, added to the sigmoid scores"),),
    "longcat_flash": (_selection_bias(_LAYERS + "mlp.router.e_score_correction_bias", 0.05,
                                      "router buffer over the routed + zero experts, added to the softmax "
                                      "probabilities in get_topk_indices"),),
    "aria_text": (),
    "afmoe": (
        _selection_bias(_LAYERS + "mlp.expert_bias", 0.1,
                        "nn.Parameter(requires_grad=False) on the *block*, passed to the router's forward"),
        Randomised(_LAYERS + "mlp.router.gate.weight", "normal", 0.2,
                   "router linear weight, which AfmoePreTrainedModel._init_weights sets to zero: every score would "
                   "be 0.5 and the choice would follow the bias alone"),
    ),
    "deepseek_v4": (
        _selection_bias(_GATE_BIAS, 0.4, "router buffer of the learned layers, added to the sqrt-softplus scores"),
        Randomised(_LAYERS + "mlp.gate.tid2eid", "hash", 0.0,
                   "token id → expert ids table of the hash-routed layers (all zeros after from_config)"),
    ),
    "zaya": (
        Randomised(_LAYERS + "mlp.gate.balancing_biases", "bias", 0.1,
                   "selection bias (router buffer over E experts + 1 skip class, initialised 0 and skip −1), added to "
                   "the softmax probabilities; the skip entry keeps its −1", keep_last=True),
        Randomised(_LAYERS + "mlp.gate.down_proj.bias", "bias", 0.2, "router down-projection bias, zero-initialised"),
        Randomised(_LAYERS + "mlp.gate.router_mlp.fc?.bias", "bias", 0.2, "router MLP biases, zero-initialised"),
        Randomised(_LAYERS + "mlp.gate.router_states_scale", "positive", 0.5,
                   "scale of the previous layer's router state (layers ≥ 1), initialised to 1"),
    ),
    "jetmoe": (),
    "laguna": (_selection_bias(_GATE_BIAS, 0.1, "router nn.Parameter(requires_grad=False)"),),
    "hy_v3": (_selection_bias(_LAYERS + "mlp.e_score_correction_bias", 0.1,
                              "buffer on the *block*, passed to the router's forward as an argument"),),
    "ergo": (_selection_bias(_GATE_BIAS, 0.1, "router buffer, added to the sigmoid scores"),),
    "kolibri1": (_selection_bias(_GATE_BIAS, 0.6, "router buffer added to the raw *logits*, not to sigmoid scores"),),
    "inkling_text": (
        _selection_bias(_GATE_BIAS, 0.1, "router buffer over the routed experts only, added to the sigmoid scores"),
        Randomised(_LAYERS + "mlp.gate.global_scale", "positive", 0.5,
                   "multiplier of every routing weight, nn.Parameter initialised to 1"),
    ),
    "inkling2_text": (_selection_bias(_GATE_BIAS, 0.1, "router buffer, added to the sigmoid scores"),),
    "lfm2_moe": (_selection_bias(_LAYERS + "feed_forward.expert_bias", 0.1,
                                 "buffer on the *block* (use_expert_bias=True), passed to the router's forward"),),
    "cohere2_moe": (),
    "flint": (),
    "axk2": (_selection_bias(_GATE_BIAS, 0.05, "router buffer, added to the sigmoid scores"),),
    "beam": (_selection_bias(_GATE_BIAS, 0.1, "router buffer, added to the sigmoid scores"),),
    "minimax_m3_vl_text": (_selection_bias(_GATE_BIAS, 0.05, "router buffer, added to the sigmoid scores"),),
    "gemma4_text": (
        Randomised(_LAYERS + "router.per_expert_scale", "positive", 0.5,
                   "per-expert multiplier of the routing weights, nn.Parameter initialised to 1"),
        Randomised(_LAYERS + "router.scale", "positive", 0.5,
                   "per-channel scale of the router's normalised input, nn.Parameter initialised to 1"),
    ),
    "deepseek_v2": (),
    "doge": (),
    "deepseek_v32": (_selection_bias(_GATE_BIAS, 0.1, "router buffer, added to the sigmoid scores"),),
    "glm_moe_dsa": (_selection_bias(_GATE_BIAS, 0.1, "router buffer, added to the sigmoid scores"),),
    "bailing_hybrid": (_selection_bias(_GATE_BIAS, 0.1, "router buffer, added to the sigmoid scores"),),
    "kolibri1_1": (_selection_bias(_GATE_BIAS, 0.6, "router buffer added to the raw *logits*, not to sigmoid scores"),),
    "granitemoehybrid": (),
    "qwen4_exp_text": (),
    "qwen4_exp": (),
    "gemma4": (
        Randomised("model.language_model.layers.*.router.per_expert_scale", "positive", 0.5,
                   "per-expert multiplier of the routing weights, nn.Parameter initialised to 1"),
        Randomised("model.language_model.layers.*.router.scale", "positive", 0.5,
                   "per-channel scale of the router's normalised input, nn.Parameter initialised to 1"),
    ),
}
"""Per model type: the tensors :func:`tiny_kind_model` overwrites with random values (empty: the router has no
selection bias, zero-initialised part or neutral scale)."""

KIND_NOTES: dict[str, str] = {
    "deepseek_v3": "E: fp32 sigmoid + gate.e_score_correction_bias, group limit (n_group=4, topk_group=2; group score "
                   "= sum of its 2 best biased scores), gathered unbiased sigmoid renormalised (norm_topk_prob=True, "
                   "+1e-20) × routed_scaling_factor=2.5; layer 0 dense (first_k_dense_replace=1), one shared expert",
    "glm4_moe": "E: the deepseek_v3 router (n_group=4, topk_group=2, norm_topk_prob=True, routed_scaling_factor=2.5); "
                "layer 0 dense (first_k_dense_replace=1), one shared expert",
    "gpt_oss": "C: linear with bias → top-k of the logits → softmax over the k in the logits' dtype; every layer MoE",
    "llama4_text": "F: top-k of the logits → sigmoid of the k scattered into a dense [T, E] score matrix that scales "
                   "each expert's input; layer 0 dense, layer 1 MoE (interleave_moe_layer_step=2), shared expert",
    "ernie4_5_moe": "B: fp32 softmax + gate.moe_statics.e_score_correction_bias, gathered unbiased probabilities / "
                    "clamp(sum, min=moe_norm_min); layer 0 dense (moe_layer_start_index=1), one shared expert",
    "granitemoe": "C: top-k of the fp32 logits → softmax over the k, cast to the hidden dtype; every layer MoE",
    "minimax_m2": "D: fp32 sigmoid + block-level mlp.e_score_correction_bias passed as an argument, always "
                  "renormalised (no epsilon), no scaling factor; every layer MoE (the family has no dense layer)",
    "phimoe": "G: sparsemixer (argmax, then the argmax after masking the first, each under the relative threshold "
              "2·router_jitter_noise=0.02; Gumbel sampling in training); every layer MoE",
    "kimi_linear": "E (not D): the deepseek_v3 router under other config names: num_expert_group=4, topk_group=2, "
                   "moe_renormalize=True, num_experts_per_token=2, routed_scaling_factor=2.5; layer 0 dense "
                   "(mlp_layer_types), KDA linear attention on layers 0–1, MLA on layer 2, one shared expert",
    "longcat_flash": "B: fp32 softmax over 8 routed + 2 zero-computation experts (zero_expert_num=2) + "
                     "router.e_score_correction_bias, gathered unbiased probabilities × routed_scaling_factor=2.5, "
                     "no renormalisation; the MoE of every layer runs beside two dense MLPs",
    "aria_text": "C: top-k of the logits → softmax over the k (no casts); every layer MoE, one shared expert",
    "afmoe": "D: fp32 sigmoid + block-level mlp.expert_bias passed as an argument, always renormalised (+1e-20) × "
             "route_scale=2.5; layer 0 dense (num_dense_layers=1), one shared expert",
    "deepseek_v4": "H + D: layer 0 hash-routed (gate.tid2eid[input_ids]), layer 1 learned: sqrtsoftplus scores + "
                   "e_score_correction_bias, always renormalised (+1e-20) × routed_scaling_factor=2.5; shared expert",
    "zaya": "B′: router MLP (down_proj → RMSNorm → fc1/fc2 GELU → out_proj, plus the previous layer's router state) "
            "over 8 experts + 1 skip class, softmax + balancing_biases (float32), gathered unbiased probabilities, "
            "skip masked to expert 0 with weight 0; top-1 (the config refuses any other k)",
    "jetmoe": "C: top-k of the fp32 logits → softmax over the k; the MLP (mlp.router) and the attention (mixture of "
              "attention heads, self_attention.experts.router) are both routed",
    "laguna": "D: fp32 sigmoid + gate.e_score_correction_bias (nn.Parameter), always renormalised (no epsilon); "
              "moe_routed_scaling_factor=2.5 multiplies the experts' output in the block; layer 0 dense",
    "hy_v3": "D: fp32 sigmoid + block-level mlp.e_score_correction_bias passed as an argument, renormalised (+1e-20) × "
             "router_scaling_factor=2.5; layer 0 dense, one shared expert",
    "ergo": "D: fp32-output linear, sigmoid + gate.e_score_correction_bias, renormalised (+1e-20) × "
            "moe_routed_scaling_factor=2.5, cast to the hidden dtype then back to fp32; layer 0 dense",
    "kolibri1": "D′: fp32 logits + e_score_correction_bias (the bias is added to the logits), weights = sigmoid of the "
                "gathered logits, renormalised iff norm_topk_prob=True (no epsilon), no scaling; every layer MoE",
    "inkling_text": "D″: fp32 sigmoid + e_score_correction_bias over the routed experts; the k chosen and the shared "
                    "experts' logits share one normalised log-sigmoid softmax, × route_scale=2.5 × global_scale; "
                    "layer 0 dense",
    "inkling2_text": "D: fp32 scoring_func (sigmoid) + e_score_correction_bias, always renormalised (+1e-20) × "
                     "route_scale=2.5; every layer MoE",
    "lfm2_moe": "D: sigmoid + block-level feed_forward.expert_bias passed as an argument (use_expert_bias=True), "
                "renormalised iff norm_topk_prob=True (+1e-6) × routed_scaling_factor=2.5; layer 0 dense (conv), "
                "layer 1 MoE (attention)",
    "cohere2_moe": "C: top-k of the logits → fp32 softmax over the k (expert_selection_fn='softmax'), cast to the "
                   "hidden dtype; layer 0 dense (mlp_layer_types)",
    "flint": "sigmoid → top-k without a bias, renormalised iff norm_topk_prob=True (no epsilon); layer 0 dense "
             "(mlp_only_layers=[0]), ungated shared expert",
    "axk2": "E′: the deepseek_v3 router but the groups outside the best topk_group are masked to 0.0 (not −inf), and "
            "the group step is skipped when n_group is None; n_group=4, topk_group=2; layer 0 dense",
    "beam": "E″: the deepseek_v3 router with sorted top-k calls and routed_scaling_factor=2.5 applied to the experts' "
            "output in the block; n_group=4, topk_group=2; layer 0 dense",
    "minimax_m3_vl_text": "D: the minimax_m2 computation with the bias on the router (gate.e_score_correction_bias); "
                          "routed_scaling_factor=2.5 multiplies the experts' output in the block; layer 0 dense",
    "gemma4_text": "A′: the decoder layer's `router` (beside its dense `mlp`) = RMSNorm × scale × H^-0.5 → proj → fp32 "
                   "softmax → top-k → renormalised → × per_expert_scale[index]; every layer has both",
    "deepseek_v2": "A″: fp32 softmax, topk_method='group_limited_greedy' (group score = its max, other groups zeroed; "
                   "n_group=4, topk_group=2), no renormalisation (the router ignores norm_topk_prob) × "
                   "routed_scaling_factor=2.5; layer 0 dense",
    "doge": "H: product keys (router_gate → 2 × √E key scores, top-√E per half, top-k of the pair sums, softmax, "
            "renormalised iff norm_topk_prob=True); experts are embedding rows; 16 experts = 4 × 4 keys",
    "deepseek_v32": "E: the deepseek_v3 router (n_group=4, topk_group=2, norm_topk_prob=True, "
                    "routed_scaling_factor=2.5); layer 0 dense (mlp_layer_types; the default first_k_dense_replace=3 "
                    "leaves no MoE layer at a tiny depth), MLA with the DSA indexer (index_n_heads=2, "
                    "index_head_dim=16), one shared expert",
    "glm_moe_dsa": "E: the deepseek_v3 router, as deepseek_v32 (n_group=4, topk_group=2, norm_topk_prob=True, "
                   "routed_scaling_factor=2.5); layer 0 dense (mlp_layer_types), MLA with the DSA indexer, one shared "
                   "expert",
    "bailing_hybrid": "E: the deepseek_v3 router under kimi_linear's config names (num_expert_group=4, topk_group=2, "
                      "moe_renormalize=True, num_experts_per_token=2, routed_scaling_factor=2.5); layer 0 dense "
                      "(mlp_layer_types) with KDA linear attention, layer 1 MoE with MLA (layer_types: the default "
                      "puts full attention on every 6th layer only), one shared expert",
    "kolibri1_1": "D′: the kolibri1 router (bias added to the fp32 logits, sigmoid of the gathered unbiased logits, "
                  "norm_topk_prob=True); layer 0 dense (mlp_only_layers=[0]; the default [0, 1] leaves no MoE layer at "
                  "a tiny depth), sliding attention then indexed attention, head_dim=16 (the config requires a "
                  "multiple of 16), one shared expert",
    "granitemoehybrid": "C: the granitemoe router (top-k of the fp32 logits → softmax over the k, cast to the hidden "
                        "dtype); every layer MoE beside a shared MLP, layer 0 Mamba-2, layer 1 attention (the default "
                        "layer_types is Mamba only, which transformers cannot build masks for)",
    "qwen4_exp_text": "A: fp32 softmax → top-k, renormalised iff norm_topk_prob=True (no epsilon), cast to the logits' "
                      "dtype; every layer MoE with a sigmoid-gated shared expert and hyper-connections (hc_count=4); "
                      "layer 0 Gated-DeltaNet, layer 1 indexed attention (QSA indexer sizes, which default to None)",
    "qwen4_exp": "A: the multimodal config around qwen4_exp_text's (TEXT_TYPE_OF); AutoModelForCausalLM builds the "
                 "text model alone from it, so the model is qwen4_exp_text's",
    "gemma4": "A′: Gemma4ForConditionalGeneration around gemma4_text's config (TEXT_TYPE_OF; no vision or audio "
              "tower): the layers are model.language_model's and route as gemma4_text's",
}
"""Per model type: router kind (A–H as in the router-kinds table; primes mark a variant) and what the config sets."""

_E = TINY_KIND_NUM_EXPERTS
_K = TINY_KIND_TOP_K
_GROUPS = dict(n_group=TINY_KIND_GROUPS, topk_group=TINY_KIND_TOPK_GROUP)
_MLA = dict(num_key_value_heads=4, kv_lora_rank=8, q_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=8,
            v_head_dim=8)
"""Multi-head latent attention sizes (MLA needs as many KV as query heads)."""
_DENSE_THEN_SPARSE = ["dense", "sparse"]

_SIZES: dict[str, dict[str, Any]] = {
    "deepseek_v3": dict(num_hidden_layers=3, intermediate_size=48, moe_intermediate_size=16, n_routed_experts=_E,
                        num_experts_per_tok=_K, n_shared_experts=1, first_k_dense_replace=1, **_GROUPS,
                        routed_scaling_factor=TINY_KIND_SCALING, norm_topk_prob=True, **_MLA),
    "glm4_moe": dict(num_hidden_layers=3, intermediate_size=48, moe_intermediate_size=16, head_dim=8,
                     n_routed_experts=_E, num_experts_per_tok=_K, n_shared_experts=1, first_k_dense_replace=1,
                     **_GROUPS, routed_scaling_factor=TINY_KIND_SCALING, norm_topk_prob=True),
    "gpt_oss": dict(num_hidden_layers=2, intermediate_size=16, head_dim=8, num_local_experts=_E,
                    num_experts_per_tok=_K, sliding_window=64),
    "llama4_text": dict(num_hidden_layers=2, intermediate_size=16, intermediate_size_mlp=48, head_dim=8,
                        num_local_experts=_E, num_experts_per_tok=_K, interleave_moe_layer_step=2,
                        attention_chunk_size=64),
    "ernie4_5_moe": dict(num_hidden_layers=3, intermediate_size=48, moe_intermediate_size=16, moe_num_experts=_E,
                         moe_k=_K, moe_num_shared_experts=1, moe_layer_start_index=1, moe_layer_end_index=2,
                         moe_layer_interval=1),
    "granitemoe": dict(num_hidden_layers=2, intermediate_size=16, num_local_experts=_E, num_experts_per_tok=_K),
    "minimax_m2": dict(num_hidden_layers=2, intermediate_size=16, head_dim=8, num_local_experts=_E,
                       num_experts_per_tok=_K),
    "phimoe": dict(num_hidden_layers=2, intermediate_size=16, num_local_experts=_E, num_experts_per_tok=_K),
    "kimi_linear": dict(num_hidden_layers=3, intermediate_size=48, moe_intermediate_size=16, num_experts=_E,
                        num_experts_per_token=_K, num_shared_experts=1, num_expert_group=TINY_KIND_GROUPS,
                        topk_group=TINY_KIND_TOPK_GROUP, moe_renormalize=True,
                        routed_scaling_factor=TINY_KIND_SCALING, mlp_layer_types=["dense", "sparse", "sparse"],
                        layer_types=["linear_attention", "linear_attention", "full_attention"], linear_head_dim=8,
                        linear_num_heads=4, **{**_MLA, "q_lora_rank": None}),
    "longcat_flash": dict(num_layers=2, ffn_hidden_size=48, expert_ffn_hidden_size=16, head_dim=8,
                          n_routed_experts=_E, zero_expert_num=2, moe_topk=_K,
                          routed_scaling_factor=TINY_KIND_SCALING, **_MLA),
    "aria_text": dict(num_hidden_layers=2, intermediate_size=16, head_dim=8, moe_num_experts=_E, moe_topk=_K,
                      moe_num_shared_experts=1),
    "afmoe": dict(num_hidden_layers=3, num_dense_layers=1, intermediate_size=48, moe_intermediate_size=16, head_dim=8,
                  num_experts=_E, num_experts_per_tok=_K, num_shared_experts=1, route_scale=TINY_KIND_SCALING,
                  global_attn_every_n_layers=2, sliding_window=64),
    "deepseek_v4": dict(num_hidden_layers=2, moe_intermediate_size=16, n_routed_experts=_E, num_experts_per_tok=_K,
                        n_shared_experts=1, routed_scaling_factor=TINY_KIND_SCALING, norm_topk_prob=True,
                        mlp_layer_types=["hash_moe", "moe"]),
    "zaya": dict(num_hidden_layers=2, intermediate_size=16, moe_intermediate_size=16, head_dim=8, num_experts=_E,
                 num_experts_per_tok=1, router_hidden_size=16),
    "jetmoe": dict(num_hidden_layers=2, intermediate_size=16, kv_channels=8, num_local_experts=_E,
                   num_experts_per_tok=_K),
    "laguna": dict(num_hidden_layers=3, intermediate_size=48, moe_intermediate_size=16,
                   shared_expert_intermediate_size=16, head_dim=8, num_experts=_E, num_experts_per_tok=_K,
                   mlp_layer_types=["dense", "sparse", "sparse"], moe_routed_scaling_factor=TINY_KIND_SCALING),
    "hy_v3": dict(num_hidden_layers=3, intermediate_size=48, moe_intermediate_size=16, head_dim=8, num_experts=_E,
                  num_experts_per_tok=_K, num_shared_experts=1, router_scaling_factor=TINY_KIND_SCALING,
                  mlp_layer_types=["dense", "sparse", "sparse"]),
    "ergo": dict(num_hidden_layers=3, first_dense_intermediate_size=48, moe_intermediate_size=16, head_dim=8,
                 num_experts=_E, num_experts_per_tok=_K, moe_routed_scaling_factor=TINY_KIND_SCALING,
                 mlp_layer_types=["dense", "sparse", "sparse"]),
    "kolibri1": dict(num_hidden_layers=2, moe_intermediate_size=16, shared_expert_intermediate_size=16, head_dim=8,
                     num_local_experts=_E, num_experts_per_tok=_K, norm_topk_prob=True),
    "inkling_text": dict(num_hidden_layers=2, intermediate_size=48, moe_intermediate_size=16, head_dim=8,
                         n_routed_experts=_E, num_experts_per_tok=_K, n_shared_experts=1,
                         route_scale=TINY_KIND_SCALING, mlp_layer_types=_DENSE_THEN_SPARSE),
    "inkling2_text": dict(num_hidden_layers=2, moe_intermediate_size=16, head_dim=8, n_routed_experts=_E,
                          num_experts_per_tok=_K, route_scale=TINY_KIND_SCALING),
    "lfm2_moe": dict(num_hidden_layers=2, intermediate_size=48, moe_intermediate_size=16, num_experts=_E,
                     num_experts_per_tok=_K, num_dense_layers=1, use_expert_bias=True, norm_topk_prob=True,
                     routed_scaling_factor=TINY_KIND_SCALING, layer_types=["conv", "full_attention"]),
    "cohere2_moe": dict(num_hidden_layers=2, intermediate_size=16, prefix_dense_intermediate_size=48, head_dim=8,
                        num_experts=_E, num_experts_per_tok=_K, mlp_layer_types=_DENSE_THEN_SPARSE),
    "flint": dict(num_hidden_layers=2, intermediate_size=48, moe_intermediate_size=16,
                  shared_expert_intermediate_size=16, head_dim=8, num_experts=_E, num_experts_per_tok=_K,
                  norm_topk_prob=True, mlp_only_layers=[0]),
    "axk2": dict(num_hidden_layers=2, intermediate_size=48, moe_intermediate_size=16, head_dim=8, n_routed_experts=_E,
                 num_experts_per_tok=_K, n_shared_experts=1, **_GROUPS, routed_scaling_factor=TINY_KIND_SCALING,
                 norm_topk_prob=True, mlp_layer_types=_DENSE_THEN_SPARSE, index_head_dim=16, index_n_heads=2,
                 gated_norm_rank=4, **_MLA),
    "beam": dict(num_hidden_layers=2, intermediate_size=48, moe_intermediate_size=16, head_dim=8, num_experts=_E,
                 num_experts_per_tok=_K, **_GROUPS, routed_scaling_factor=TINY_KIND_SCALING, norm_topk_prob=True,
                 mlp_layer_types=_DENSE_THEN_SPARSE),
    "minimax_m3_vl_text": dict(num_hidden_layers=2, intermediate_size=16, dense_intermediate_size=48,
                               shared_intermediate_size=16, head_dim=8, num_local_experts=_E, num_experts_per_tok=_K,
                               routed_scaling_factor=TINY_KIND_SCALING, mlp_layer_types=_DENSE_THEN_SPARSE),
    "gemma4_text": dict(num_hidden_layers=2, intermediate_size=48, moe_intermediate_size=16, head_dim=8,
                        enable_moe_block=True, num_experts=_E, top_k_experts=_K),
    "deepseek_v2": dict(num_hidden_layers=3, intermediate_size=48, moe_intermediate_size=16, n_routed_experts=_E,
                        num_experts_per_tok=_K, n_shared_experts=1, first_k_dense_replace=1,
                        topk_method="group_limited_greedy", **_GROUPS, routed_scaling_factor=TINY_KIND_SCALING,
                        norm_topk_prob=True, **{**_MLA, "q_lora_rank": None}),
    "doge": dict(num_hidden_layers=2, intermediate_size=16, is_moe=True, num_experts=16, num_experts_per_tok=_K,
                 norm_topk_prob=True),
}
"""Tiny sizes and routing settings per model type, given to the config class's constructor."""

_DSA = dict(index_head_dim=16, index_n_heads=2)
"""DeepSeek sparse attention indexer sizes (the head dimension holds the rotary part, 8)."""
_SIZES.update({
    "deepseek_v32": dict(num_hidden_layers=2, intermediate_size=48, moe_intermediate_size=16, n_routed_experts=_E,
                         num_experts_per_tok=_K, n_shared_experts=1, **_GROUPS,
                         routed_scaling_factor=TINY_KIND_SCALING, norm_topk_prob=True,
                         mlp_layer_types=_DENSE_THEN_SPARSE, **_DSA, **_MLA),
    "glm_moe_dsa": dict(num_hidden_layers=2, intermediate_size=48, moe_intermediate_size=16, n_routed_experts=_E,
                        num_experts_per_tok=_K, n_shared_experts=1, **_GROUPS, routed_scaling_factor=TINY_KIND_SCALING,
                        norm_topk_prob=True, mlp_layer_types=_DENSE_THEN_SPARSE, **_DSA, **_MLA),
    "bailing_hybrid": dict(num_hidden_layers=2, intermediate_size=48, moe_intermediate_size=16, head_dim=8,
                           num_experts=_E, num_experts_per_token=_K, num_shared_experts=1,
                           num_expert_group=TINY_KIND_GROUPS, topk_group=TINY_KIND_TOPK_GROUP, moe_renormalize=True,
                           routed_scaling_factor=TINY_KIND_SCALING, mlp_layer_types=_DENSE_THEN_SPARSE,
                           layer_types=["linear_attention", "full_attention"], **{**_MLA, "q_lora_rank": None}),
    "kolibri1_1": dict(num_hidden_layers=2, moe_intermediate_size=16, shared_expert_intermediate_size=16,
                       mlp_only_intermediate_size=48, head_dim=16, num_experts=_E, num_experts_per_tok=_K,
                       norm_topk_prob=True, mlp_only_layers=[0], sliding_window=64, index_num_heads=2,
                       layer_types=["sliding_attention", "indexed_attention"]),
    "granitemoehybrid": dict(num_hidden_layers=2, intermediate_size=16, shared_intermediate_size=16,
                             num_local_experts=_E, num_experts_per_tok=_K,
                             layer_types=["linear_attention", "full_attention"], mamba_n_heads=4, mamba_d_state=8,
                             mamba_chunk_size=8),
    "qwen4_exp_text": dict(num_hidden_layers=2, head_dim=8, moe_intermediate_size=16,
                           shared_expert_intermediate_size=16, num_experts=_E, num_experts_per_tok=_K,
                           norm_topk_prob=True, layer_types=["linear_attention", "indexed_attention"],
                           linear_key_head_dim=8, linear_value_head_dim=8, linear_num_key_heads=2,
                           linear_num_value_heads=4, hc_lowrank=8, indexer_n_heads=2, indexer_kv_heads=1,
                           indexer_head_dim=8, indexer_budget=4, indexer_compress_ratio=2),
    "qwen4_exp": dict(),
    "gemma4": dict(vision_config=None, audio_config=None),
})
"""The :data:`LAYOUT_TYPES` (a multimodal wrapper's entry holds its own fields; its text config is its text type's)."""
_WRAPPER_FIELDS = ("initializer_range", "tie_word_embeddings")
"""Common fields a multimodal wrapper's config keeps at its own level too: Gemma 4 initialises every weight with the
wrapper's ``initializer_range`` and ties the LM head by the wrapper's ``tie_word_embeddings``."""

_VOCAB_FIELDS: dict[str, tuple[str, ...]] = {"inkling2_text": ("unpadded_vocab_size",)}
"""Fields besides ``vocab_size`` that follow the vocabulary (Inkling2's LM head is ``unpadded_vocab_size`` wide)."""


def common_config_fields(vocab_size: int) -> dict[str, Any]:
    """The fields every tiny config shares (this module's and :func:`moepatch.testing.tiny.tiny_config`'s): hidden 32,
    4 query / 2 KV heads, pad / bos / eos 0 / 1 / 2, untied embeddings, ``initializer_range`` 0.2."""
    return dict(
        vocab_size=vocab_size,
        hidden_size=32,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        initializer_range=0.2,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
        tie_word_embeddings=False,
    )


def tiny_kind_config(model_type: str, **overrides: Any) -> PretrainedConfig:
    """A tiny config of ``transformers.CONFIG_MAPPING[model_type]`` (sizes and routing as in :data:`KIND_NOTES`).

    ``overrides`` replace any field and go to the constructor, so derived fields (``layer_types``, ...) follow them.
    The vocabulary is the tiny tokenizer's unless ``vocab_size`` is given, so that one tokenizer drives every model.
    A multimodal wrapper (:data:`TEXT_TYPE_OF`) gets its text type's tiny config as ``text_config``, ``overrides``
    going to that text config (the decoder the features patch).
    """
    if model_type not in _SIZES:
        raise ValueError(f"tiny_kind_config: unknown model type {model_type!r}; choose from {ROUTER_KIND_TYPES}")
    # each config class takes its own fields (text_config, ...): PreTrainedConfig's signature does not list them
    config_class: Callable[..., PretrainedConfig] = CONFIG_MAPPING[model_type]
    if model_type in TEXT_TYPE_OF:
        text = tiny_kind_config(TEXT_TYPE_OF[model_type], **overrides)
        wrapper = {field: getattr(text, field) for field in _WRAPPER_FIELDS}
        return config_class(text_config=text, **wrapper, **_SIZES[model_type])
    if "vocab_size" not in overrides:
        overrides = {"vocab_size": TINY_VOCAB_SIZE, **overrides}
    vocab = {field: overrides["vocab_size"] for field in _VOCAB_FIELDS.get(model_type, ())}
    return config_class(**{**common_config_fields(overrides["vocab_size"]), **_SIZES[model_type], **vocab,
                                         **overrides})


def tiny_kind_model(model_type: str, *, seed: int = 0, **overrides: Any) -> PreTrainedModel:
    """A randomly initialised tiny ``*ForCausalLM`` of ``model_type`` (float32, eval mode), deterministic per ``seed``.

    ``torch.manual_seed(seed)``, ``AutoModelForCausalLM.from_config``, then :func:`randomise_routing_tensors`:
    transformers initialises selection biases to zero, which would let a test pass with an implementation that
    ignores them.
    """
    config = tiny_kind_config(model_type, **overrides)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    randomise_routing_tensors(model, model_type, seed=seed)
    return model


def randomise_routing_tensors(model: torch.nn.Module, model_type: str, *, seed: int = 0) -> list[str]:
    """Overwrite in place the tensors :data:`RANDOMISED` lists for ``model_type``; return their names.

    The values come from a generator of their own (seeded with ``seed``), so they do not depend on how many random
    numbers the model's initialisation drew.  A pattern that matches nothing raises ``ValueError``: a renamed
    attribute in a later transformers must not silently leave a bias at zero.
    """
    generator = torch.Generator().manual_seed(seed)
    tensors = {**dict(model.named_parameters()), **dict(model.named_buffers())}
    done = []
    for entry in RANDOMISED.get(model_type, ()):
        names = sorted(name for name in tensors if fnmatch.fnmatchcase(name, entry.pattern))
        if not names:
            raise ValueError(f"randomise_routing_tensors: {model_type}: no tensor matches {entry.pattern!r}")
        for name in names:
            owner = model.get_submodule(name.rsplit(".", 1)[0])
            values = _draw(entry, tensors[name], generator, getattr(owner, "num_experts", None))
            with torch.no_grad():
                if entry.keep_last:
                    tensors[name][:-1].copy_(values[:-1])
                else:
                    tensors[name].copy_(values)
            done.append(name)
    return done


def _draw(entry: Randomised, tensor: torch.Tensor, generator: torch.Generator, num_experts: int | None) -> torch.Tensor:
    """Random values for ``tensor`` of the ``entry.kind`` (see :class:`Randomised`), in the tensor's dtype."""
    if entry.kind == "hash":
        if num_experts is None:
            raise ValueError(f"randomise_routing_tensors: {entry.pattern!r}: the owning router has no num_experts")
        rows, top_k = tensor.shape
        return torch.rand(rows, num_experts, generator=generator).argsort(dim=-1)[:, :top_k].to(tensor.dtype)
    if entry.kind == "normal":
        return (torch.randn(tensor.shape, generator=generator, dtype=torch.float64) * entry.scale).to(tensor.dtype)
    uniform = torch.rand(tensor.shape, generator=generator, dtype=torch.float64)
    if entry.kind == "positive":
        return (1.0 - entry.scale + 2.0 * entry.scale * uniform).to(tensor.dtype)
    if entry.kind == "bias":
        sign = torch.where(torch.rand(tensor.shape, generator=generator) < 0.5, -1.0, 1.0).to(torch.float64)
        return (sign * (0.5 + uniform) * entry.scale).to(tensor.dtype)
    raise ValueError(f"randomise_routing_tensors: unknown kind {entry.kind!r} for {entry.pattern!r}")
