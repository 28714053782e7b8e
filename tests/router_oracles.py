"""Routing oracles for the router kinds of transformers 5 MoE models, written from the published modeling files.

Everything here is re-derived from ``transformers/models/<type>/modeling_<type>.py`` of the installed transformers
(5.25), never from moepatch: the tests compare moepatch against these functions.  Nothing here imports moepatch or
``model_patches``.

What each model type keeps where (:func:`router_modules`, :func:`router_parameter_names`,
:func:`selection_bias_names`) is written out per type in :data:`_LAYOUTS`; how its router scores, chooses and
weights experts is written out per type in :data:`_RULES`, each entry naming the class it was read from.  The kinds:

* ``"B"`` softmax + selection bias: top-k of ``softmax(logits) + bias``, weights = the gathered *unbiased*
  probabilities (ERNIE 4.5: divided by ``clamp(sum, min=moe_norm_min)``; LongCat: × ``routed_scaling_factor``;
  LongCat's router scores ``n_routed_experts + zero_expert_num`` slots, the last ones being identity "zero experts").
* ``"C"`` top-k of the logits, weights = softmax over the k chosen logits (gpt-oss adds the router's linear bias;
  JetMoE hands its experts the (token, slot) pairs sorted by expert, which :func:`router_output` turns back into
  ``[N, k]``).
* ``"D"`` sigmoid + selection bias: top-k of ``sigmoid(logits) + bias``, weights = the gathered unbiased sigmoid,
  renormalised (with the file's epsilon, if any), × the file's scaling factor, if any.
* ``"E"`` = ``"D"`` with the DeepSeek-V3 group limit: experts in ``n_group`` groups, each group scored by the sum of
  its 2 best biased scores, the ``topk_group`` best groups kept and the others masked to -inf before the top-k;
  renormalised iff ``norm_topk_prob`` (sum + 1e-20), × ``routed_scaling_factor``.
* ``"F"`` Llama 4: top-k of the logits, sigmoid of the k chosen logits scattered into a dense [N, E] matrix (0 for
  the other experts) that scales every expert's input.
* ``"G"`` PhiMoE sparsemixer: always 2 experts, chosen one after the other (the second after masking the first),
  each weighted by a softmax over the logits within a relative threshold of the chosen one.  The oracles follow
  the deterministic eval path (training samples the choice with Gumbel noise).
* ``"I"`` Inkling: the router's weight scores ``n_routed_experts`` routed experts and, after them,
  ``n_shared_experts`` shared ones; top-k of ``sigmoid(logits)[:, :E] + bias`` (``sorted=False``); weights =
  ``exp(lp - logsumexp(lp))`` of ``lp = logsigmoid`` of the k chosen logits followed by the shared experts' logits,
  × ``route_scale`` × the learned ``global_scale``, cast to the hidden dtype; the last ``S`` columns are the shared
  experts' weights (:func:`oracle_shared_weights`), the router returns them as a fourth output.
* ``"R"`` Gemma 4: the router's input RMS-normalised (no scale), × its learned ``scale`` × ``hidden_size^-0.5``,
  the linear ``proj``; top-k of the float32 softmax, weights = the chosen probabilities renormalised, ×
  ``per_expert_scale`` of the chosen experts.  Its router and experts sit on the decoder layer itself, beside the
  dense ``mlp`` (``block_attr`` ``""``).
* ``"K"`` Kolibri: top-k of ``logits + bias`` (the bias is added to the raw logits, not to a sigmoid), weights =
  sigmoid of the k chosen logits, renormalised iff ``norm_topk_prob`` (no epsilon), no scaling.  (Kolibri and Ergo
  compute the logits with ``torch.mm(..., out_dtype=float32)`` on CUDA with bf16 inputs and grad off; the exact
  oracles follow that branch too.)
* ``"S"`` ZAYA (``ZayaRouter.forward``): the router's input ``[B, S, H]`` through ``down_proj`` (with bias), plus —
  from layer 1 on — the previous layer's router state × ``router_states_scale``, then the router MLP (``ZayaRMSNorm``
  → ``fc1`` → GELU → ``fc2`` → GELU → ``out_proj``) scoring ``E`` experts and one skip class (index ``E``); softmax
  over the ``E + 1`` classes in the logits' dtype; top-k of the float32 probabilities + ``balancing_biases``
  (``E + 1`` entries); weights = the gathered probabilities, 0 for the skip class.  The router hands a chosen skip
  class to its experts as expert 0 with weight 0; the oracles keep it as index ``E`` (weight 0) and
  :func:`router_output` maps the router's (expert 0, weight exactly 0) pairs back to ``E``.  Layers ≥ 1 get the state
  :func:`zaya_router_states` (the same in the oracles and :func:`router_output`).  C2R: the skip class is no expert,
  never masked; the allowed set is that of the token's first *expert* (its first choice, or the best expert where
  the skip class ranks first).

Every oracle takes one MoE layer's ``(block, router)`` pair as :func:`router_modules` returns it and the hidden
states the router receives (``[N, H]``; any leading shape is flattened).  ``exact=True`` follows the file's dtypes
and torch calls step by step, so its results equal the router's own output bit for bit; ``exact=False`` computes
the same rule in float64 from the same parameters (the float64 result may differ from the file's at near-ties of
the selection scores and, for PhiMoE in bfloat16, where the file's bfloat16 threshold test flips an expert in or out
of the sparsemixer's softmax).  Call the oracles outside ``torch.autocast``.

Bit-for-bit comparisons need the router to be called on the same batch as the oracle: elementwise kernels may round
an [N, k] batch and a differently shaped one differently (vectorised vs scalar paths).

Indices are returned in the order of the oracle's own ``torch.topk`` call (which follows the file's call); compare
chosen experts as sets per token: sort both the indices and the weights by index before comparing.

* ``"H"`` Doge's product keys (``DogeCDMoE.forward``, no router module of its own choosing): ``router_gate`` scores
  ``2K`` keys (``K = ⌊√E⌋``); the block views them as ``[2, N, K]``, which pairs the key scores of two tokens in each
  row (:func:`_doge_key_rows` writes out which); both rows sorted, expert ``i·K + j`` scored by ``x_i + y_j`` in the
  sorted keys' layout, top-k of those pair sums, softmax over the k, renormalised iff ``norm_topk_prob``.  The
  router's "output" (:func:`router_output`) is what the block hands on: the ids its ``down_embed`` looks up and the
  weights it multiplies the experts' activations by.  C2R: the first expert is the file's own first choice, the
  others the best allowed by the file's own ordering (its top-k over the pair sums, the others at -inf).

Two families scale the *experts' output* instead of the routing weights (Laguna, MiniMax-M3-VL): their routers'
weights carry no scaling factor, and :func:`expert_output_scale` gives the block's factor.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from collections.abc import Mapping
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

__all__ = [
    "COVERED_TYPES",
    "KIND",
    "SKIPPED_TYPES",
    "captured_choices",
    "causal_lm_adds_balance_loss",
    "expert_output_scale",
    "jetmoe_choice",
    "num_router_experts",
    "oracle_balance_loss",
    "oracle_c2r",
    "oracle_dense_scores",
    "oracle_doge_balance_loss",
    "oracle_doge_expert_scores",
    "oracle_logits",
    "oracle_route",
    "oracle_shared_weights",
    "router_modules",
    "router_output",
    "router_parameter_names",
    "router_top_k",
    "selection_bias_names",
    "zaya_router_states",
]


# --------------------------------------------------------------------------------------------------------------
# Where each type keeps its MoE block, router, experts and selection bias
# --------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Layout:
    """Where one model type keeps its MoE parts, relative to a decoder layer of ``model.model.layers``.

    ``block_attr`` / ``block_class``: the decoder-layer attribute holding the MoE block and the block's class name
    (layers holding another class, e.g. a dense MLP, are not MoE layers).  ``router_attr`` / ``experts_attr``: the
    block's attributes holding the router and the experts.  ``router_params``: the router's learned parameters
    (names relative to the router); ``optional_router_params``: further ones that exist only under some configs.
    ``bias``: the selection bias as ``"router.<path>"`` or ``"block.<path>"`` (``None``: the type has none).
    ``block_attr`` ``""``: the decoder layer itself is the block (Gemma 4).  ``extra_routers``: further routers
    (decoder-layer-relative paths, JetMoE's attention mixture) that freezing freezes too.
    """

    block_attr: str
    block_class: str
    router_attr: str
    router_params: tuple[str, ...] = ("weight",)
    optional_router_params: tuple[str, ...] = ()
    bias: str | None = None
    experts_attr: str = "experts"
    extra_routers: tuple[str, ...] = ()


def _ds3(block_class: str, block_attr: str = "mlp") -> _Layout:
    """The DeepSeek-V3 layout: ``<layer>.mlp`` → ``.gate`` (weight + ``e_score_correction_bias`` buffer)."""
    return _Layout(block_attr, block_class, "gate", bias="router.e_score_correction_bias")


_LAYOUTS: dict[str, _Layout] = {
    # DeepseekV3DecoderLayer.mlp = DeepseekV3MoE(gate=DeepseekV3TopkRouter, experts) from first_k_dense_replace on
    "deepseek_v3": _ds3("DeepseekV3MoE"),
    "glm4_moe": _ds3("Glm4MoeMoE"),
    "glm4_moe_lite": _ds3("Glm4MoeLiteMoE"),
    "kimi_linear": _ds3("KimiLinearMoE"),  # mlp_layer_types[i] == "sparse"
    "solar_open": _ds3("SolarOpenMoE"),
    "exaone_moe": _ds3("ExaoneMoeSparseMoEBlock"),
    "mimo_v2_flash": _ds3("MiMoV2FlashMoE"),
    "minicpm5_moe": _ds3("MiniCPM5MoeMoE"),
    "nemotron_h": _ds3("NemotronHMoE", block_attr="mixer"),  # NemotronHBlock.mixer where layers_block_type == "moe"
    "hy_v4": _ds3("HYV4MoE"),
    "deepseek_v32": _ds3("DeepseekV32MoE"),
    "glm_moe_dsa": _ds3("GlmMoeDsaMoE"),
    "bailing_hybrid": _ds3("BailingHybridMoE"),  # mlp_layer_types[i] == "sparse"
    "axk1": _ds3("AXK1MoE"),
    "dots3_note_text": _ds3("Dots3NoteTextMoE"),
    # MiniMaxM2SparseMoeBlock keeps the bias buffer itself and hands it to MiniMaxM2TopKRouter.forward
    "minimax_m2": _Layout("mlp", "MiniMaxM2SparseMoeBlock", "gate", bias="block.e_score_correction_bias"),
    "minimax_m3_vl_text": _Layout("mlp", "MiniMaxM3VLSparseMoeBlock", "gate", bias="router.e_score_correction_bias"),
    # Ernie4_5_MoeTopKRouter.moe_statics (Ernie4_5_MoeStatics) holds the bias as a [1, E] Parameter (no grad)
    "ernie4_5_moe": _Layout("mlp", "Ernie4_5_MoeSparseMoeBlock", "gate",
                            bias="router.moe_statics.e_score_correction_bias"),
    # LongcatFlashMoE.router = LongcatFlashTopkRouter(classifier = nn.Linear(bias=config.router_bias))
    "longcat_flash": _Layout("mlp", "LongcatFlashMoE", "router", router_params=("classifier.weight",),
                             optional_router_params=("classifier.bias",), bias="router.e_score_correction_bias"),
    # GptOssMLP.router = GptOssTopKRouter(weight, bias)
    "gpt_oss": _Layout("mlp", "GptOssMLP", "router", router_params=("weight", "bias")),
    "granitemoe": _Layout("block_sparse_moe", "GraniteMoeMoE", "router"),
    "granitemoeshared": _Layout("block_sparse_moe", "GraniteMoeSharedMoE", "router"),
    "granitemoehybrid": _Layout("block_sparse_moe", "GraniteMoeHybridMoE", "router"),
    "granitemoe_swa": _Layout("block_sparse_moe", "GraniteMoeSWAMoE", "router"),
    "aria_text": _Layout("mlp", "AriaTextMoELayer", "router"),
    # Llama4TextDecoderLayer.feed_forward = Llama4TextMoe(router=Llama4Router(nn.Linear)) for layer_idx in moe_layers
    "llama4_text": _Layout("feed_forward", "Llama4TextMoe", "router"),
    "phimoe": _Layout("mlp", "PhimoeSparseMoeBlock", "router"),
    # AfmoeSparseMoeBlock.router = AfmoeTokenChoiceRouter(gate = nn.Linear); the block keeps expert_bias
    "afmoe": _Layout("mlp", "AfmoeSparseMoeBlock", "router", router_params=("gate.weight",),
                     bias="block.expert_bias"),
    # LagunaTopKRouter keeps e_score_correction_bias as a Parameter (requires_grad=False)
    "laguna": _Layout("mlp", "LagunaSparseMoeBlock", "gate", bias="router.e_score_correction_bias"),
    "kolibri1": _Layout("mlp", "Kolibri1SparseMoeBlock", "gate", bias="router.e_score_correction_bias"),
    "kolibri1_1": _Layout("mlp", "Kolibri1_1SparseMoeBlock", "gate", bias="router.e_score_correction_bias"),
    "inkling2_text": _Layout("mlp", "Inkling2SparseMoeBlock", "gate", bias="router.e_score_correction_bias"),
    # InklingDecoderLayer.mlp = InklingMoE(gate=InklingTopkRouter(weight [E + S, H], global_scale [1], bias buffer))
    # where mlp_layer_types[i] == "sparse"
    "inkling_text": _Layout("mlp", "InklingMoE", "gate", router_params=("weight", "global_scale"),
                            bias="router.e_score_correction_bias"),
    # HYV3MoE keeps the bias buffer and hands it to HYV3TopKRouter.forward
    "hy_v3": _Layout("mlp", "HYV3MoE", "gate", bias="block.e_score_correction_bias"),
    # Gemma4TextDecoderLayer.router = Gemma4TextRouter(norm without weight, proj, scale [H], per_expert_scale [E])
    # and .experts, on the layer itself, when enable_moe_block
    "gemma4_text": _Layout("", "Gemma4TextDecoderLayer", "router",
                           router_params=("proj.weight", "scale", "per_expert_scale")),
    # JetMoeMoE.router = JetMoeTopKGating(layer = nn.Linear); experts input_linear / output_linear
    # (JetMoeParallelExperts); the attention's JetMoeMoA has its own JetMoeTopKGating
    "jetmoe": _Layout("mlp", "JetMoeMoE", "router", router_params=("layer.weight",), experts_attr="input_linear",
                      extra_routers=("self_attention.experts.router",)),
    # ZayaSparseMoeBlock.gate = ZayaRouter(down_proj, router_states_scale from layer 1 on, router_mlp, buffer
    # balancing_biases over E + 1 classes)
    "zaya": _Layout("mlp", "ZayaSparseMoeBlock", "gate",
                    router_params=("down_proj.weight", "down_proj.bias", "router_mlp.norm.weight",
                                   "router_mlp.fc1.weight", "router_mlp.fc1.bias", "router_mlp.fc2.weight",
                                   "router_mlp.fc2.bias", "router_mlp.out_proj.weight"),
                    optional_router_params=("router_states_scale",), bias="router.balancing_biases"),
    # DogeCDMoE.router_gate = nn.Linear(H, 2 * num_keys); routed experts are rows of down_embed / up_embed
    "doge": _Layout("mlp", "DogeCDMoE", "router_gate", experts_attr="down_embed"),
    # ErgoTopkRouter.linear = ErgoLinearWithFP32Output
    "ergo": _Layout("mlp", "ErgoMoE", "gate", router_params=("linear.weight",), bias="router.e_score_correction_bias"),
}

_ALIASES: dict[str, str] = {
    "sarvam_moe": "glm4_moe",  # AutoModelForCausalLM builds Glm4MoeForCausalLM for these configs
    "param2moe": "glm4_moe",
    "sarvam_mla": "deepseek_v3",  # ... and DeepseekV3ForCausalLM for this one
}


# --------------------------------------------------------------------------------------------------------------
# How each type's router scores, chooses and weights
# --------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Rule:
    """One router's rule as its modeling file writes it.

    ``logits``: how the file computes the router logits (see :func:`_exact_logits`).  ``renorm``: ``"always"``,
    ``"norm_topk_prob"`` (iff the router's flag), ``"never"`` or ``"clamp"`` (ERNIE: ``/ clamp(sum, min=norm_min)``);
    ``eps``: added to the sum before dividing.  ``scale``: the router attribute holding the factor the weights are
    multiplied by.  ``topk_sorted``: the ``sorted`` flag of the file's top-k call.  ``cast``: the weights' final
    dtype (``"hidden"``: the router input's; ``"hidden_then_float"``: the input's, then float32; ``"logits"``: the
    logits'; ``""``: as computed).  ``softcap``: Laguna's optional ``tanh`` soft cap of the logits.
    """

    kind: str
    source: str
    logits: str
    renorm: str = "never"
    eps: float = 0.0
    scale: str | None = None
    topk_sorted: bool = True
    cast: str = ""
    softcap: bool = False


def _ds3_rule(source: str) -> _Rule:
    """DeepseekV3TopkRouter.forward (copied verbatim into every type below that uses it)."""
    return _Rule("E", source, "fp32", renorm="norm_topk_prob", eps=1e-20, scale="routed_scaling_factor",
                 topk_sorted=False)


_RULES: dict[str, _Rule] = {
    "deepseek_v3": _ds3_rule("DeepseekV3TopkRouter"),
    "glm4_moe": _ds3_rule("Glm4MoeTopkRouter"),
    "glm4_moe_lite": _ds3_rule("Glm4MoeLiteTopkRouter"),
    "kimi_linear": _ds3_rule("KimiLinearTopkRouter"),
    "solar_open": _ds3_rule("SolarOpenTopkRouter"),
    "exaone_moe": _ds3_rule("ExaoneMoeTopkRouter"),
    "mimo_v2_flash": _ds3_rule("MiMoV2FlashTopkRouter"),
    "minicpm5_moe": _ds3_rule("MiniCPM5MoeTopkRouter (logits with autocast disabled)"),
    "nemotron_h": _ds3_rule("NemotronHTopkRouter"),
    "hy_v4": _ds3_rule("HYV4TopkRouter"),
    "deepseek_v32": _ds3_rule("DeepseekV32TopkRouter"),
    "glm_moe_dsa": _ds3_rule("GlmMoeDsaTopkRouter"),
    "bailing_hybrid": _ds3_rule("BailingHybridTopkRouter"),
    "axk1": _ds3_rule("AXK1TopkRouter"),
    "dots3_note_text": _ds3_rule("Dots3NoteTextTopkRouter"),
    # F.linear(h.to(W.dtype), W); sigmoid(logits.float()) + bias; topk(sorted=False); w /= w.sum() (no epsilon)
    "minimax_m2": _Rule("D", "MiniMaxM2TopKRouter", "weight_dtype", renorm="always", topk_sorted=False),
    "minimax_m3_vl_text": _Rule("D", "MiniMaxM3VLTopKRouter", "weight_dtype", renorm="always", topk_sorted=False),
    # router.gate(h).to(float32); sigmoid; topk(scores + expert_bias); w / (sum + 1e-20) * route_scale
    "afmoe": _Rule("D", "AfmoeTokenChoiceRouter", "input_then_fp32", renorm="always", eps=1e-20, scale="route_scale"),
    # F.linear(h, W).float(); optional tanh soft cap; sigmoid + bias.to(fp32); topk; w / sum; w.to(h.dtype)
    "laguna": _Rule("D", "LagunaTopKRouter", "input_then_fp32", renorm="always", cast="hidden", softcap=True),
    # F.linear(h.float(), W); ACT2FN[scoring_func] (sigmoid); topk(sorted=False); w / (sum + 1e-20) * rsf
    "inkling2_text": _Rule("D", "Inkling2TopKRouter", "input_fp32", renorm="always", eps=1e-20,
                           scale="routed_scaling_factor", topk_sorted=False),
    # autocast off: F.linear(h.float(), W.float()) over E + S rows; topk(sigmoid[:, :E] + bias.float(), sorted=False);
    # exp(lp - logsumexp(lp)) of lp = logsigmoid(cat(chosen, shared logits)) * route_scale * global_scale.float();
    # .to(h.dtype); split into the k routed and the S shared weights
    "inkling_text": _Rule("I", "InklingTopkRouter", "fp32", scale="route_scale", topk_sorted=False, cast="hidden"),
    # F.linear(h.float(), W.float()); sigmoid + bias (from the block); w / (sum + 1e-20) * router_scaling_factor
    "hy_v3": _Rule("D", "HYV3TopKRouter", "fp32", renorm="always", eps=1e-20, scale="router_scaling_factor",
                   topk_sorted=False),
    # ErgoLinearWithFP32Output (W.to(h.dtype), fp32 accumulation); w / (sum + 1e-20) * rsf; .to(h.dtype).float()
    "ergo": _Rule("D", "ErgoTopkRouter", "ergo", renorm="always", eps=1e-20, scale="routed_scaling_factor",
                  topk_sorted=False, cast="hidden_then_float"),
    # down_proj (+ state × router_states_scale) → RMSNorm → fc1 / fc2 GELU → out_proj over E + 1 classes; softmax;
    # topk(probs.to(float32) + balancing_biases); gather(probs); a skip choice → expert 0, weight 0
    "zaya": _Rule("S", "ZayaRouter", "zaya"),
    # softmax(fp32) + moe_statics bias; topk; w / clamp(sum, min=norm_min); w.to(h.dtype)
    "ernie4_5_moe": _Rule("B", "Ernie4_5_MoeTopKRouter", "fp32", renorm="clamp", cast="hidden"),
    # softmax over E + zero experts; topk(sorted=False) of scores + bias; w * routed_scaling_factor
    "longcat_flash": _Rule("B", "LongcatFlashTopkRouter", "fp32_classifier", scale="routed_scaling_factor",
                           topk_sorted=False, cast="logits"),
    # F.linear(h, W, b); topk; softmax(top, dtype=top.dtype)
    "gpt_oss": _Rule("C", "GptOssTopKRouter", "input_with_bias"),
    # F.linear(h, W).float(); topk; softmax(top).type_as(h)
    "granitemoe": _Rule("C", "GraniteMoeTopKRouter", "input_then_fp32", cast="hidden"),
    "granitemoeshared": _Rule("C", "GraniteMoeSharedTopKRouter", "input_then_fp32", cast="hidden"),
    "granitemoehybrid": _Rule("C", "GraniteMoeHybridTopKRouter", "input_then_fp32", cast="hidden"),
    "granitemoe_swa": _Rule("C", "GraniteMoeSWATopKRouter", "input_then_fp32", cast="hidden"),
    # F.linear(h, W); topk; softmax(top)
    "aria_text": _Rule("C", "AriaTextTopKRouter", "input"),
    # nn.Linear; topk(dim=1); full(-inf).scatter(top); sigmoid(.float()).to(dtype)
    "llama4_text": _Rule("F", "Llama4Router", "input"),
    # nn.Linear; sparsemixer(eval)
    "phimoe": _Rule("G", "PhimoeTopKRouter / sparsemixer", "input"),
    # F.linear(h.float(), W.float()) (CUDA: torch.mm(out_dtype=float32)); topk(logits + bias); sigmoid(top)
    "kolibri1": _Rule("K", "Kolibri1TopKRouter", "kolibri", renorm="norm_topk_prob"),
    "kolibri1_1": _Rule("K", "Kolibri1_1TopKRouter", "kolibri", renorm="norm_topk_prob"),
    # norm(h) * scale * hidden_size**-0.5; proj; softmax(dtype=float32); topk; w /= w.sum(); w * per_expert_scale[idx]
    "gemma4_text": _Rule("R", "Gemma4TextRouter", "gemma4", renorm="always"),
    # self.layer(h).float(); logits.topk(k, dim=1); softmax(top, dim=1).type_as(h); then sorted by expert
    "jetmoe": _Rule("C", "JetMoeTopKGating", "input_then_fp32", cast="hidden"),
}

KIND: dict[str, str] = {model_type: rule.kind for model_type, rule in _RULES.items()}
KIND.update({alias: KIND[target] for alias, target in _ALIASES.items()})
KIND["doge"] = "H"  # product keys, chosen inside DogeCDMoE.forward: its own functions below (_doge_*), no _Rule
"""model_type → router kind letter (see the module docstring)."""

COVERED_TYPES: tuple[str, ...] = tuple(sorted(KIND))
"""Every model type the oracles cover."""

SKIPPED_TYPES: dict[str, str] = {
    "granitemoe_shared": "no such model type: transformers calls it granitemoeshared (covered)",
    "deepseek_v4": "hash routing in some layers (kind H)",
    "axk2": "AXK2TopkRouter masks the dropped groups to 0.0 (not -inf) and skips the group limit when n_group is "
            "None; not covered",
    "lfm2_moe": "its default config does not build a model",
    "dots1": "its default config does not build a model",
}
"""Model types asked about or seen but not covered, with the reason."""


def _canonical(model_type: str) -> str:
    model_type = _ALIASES.get(model_type, model_type)
    if model_type not in _RULES and model_type not in _LAYOUTS:
        raise KeyError(f"router_oracles: no oracle for model type {model_type!r}; covered: {', '.join(COVERED_TYPES)}")
    return model_type


# --------------------------------------------------------------------------------------------------------------
# Where the routers are
# --------------------------------------------------------------------------------------------------------------


def _decoder_layers(model: torch.nn.Module) -> torch.nn.ModuleList:
    """``model.model.layers`` of a ``*ForCausalLM`` (or ``model.layers`` of the base model)."""
    inner = getattr(model, "model", None)
    if inner is not None and isinstance(getattr(inner, "layers", None), torch.nn.ModuleList):
        return inner.layers
    if isinstance(getattr(model, "layers", None), torch.nn.ModuleList):
        return model.layers
    raise ValueError(f"router_oracles: {type(model).__name__} has no model.layers / layers")


def _layer_prefix(model: torch.nn.Module) -> str:
    inner = getattr(model, "model", None)
    if inner is not None and isinstance(getattr(inner, "layers", None), torch.nn.ModuleList):
        return "model.layers"
    return "layers"


def router_modules(model: torch.nn.Module) -> dict[int, tuple[torch.nn.Module, torch.nn.Module]]:
    """Absolute decoder-layer index → (MoE block, router) for every MoE layer, from the type's known attributes.

    A layer is an MoE layer when its ``block_attr`` holds the type's MoE block class (or a subclass of it) with a
    router; the other layers (dense MLPs, attention / Mamba mixers, ``None``, a Gemma 4 layer without
    ``enable_moe_block``) are skipped.
    """
    layout = _LAYOUTS[_canonical(model.config.model_type)]
    found: dict[int, tuple[torch.nn.Module, torch.nn.Module]] = {}
    for index, layer in enumerate(_decoder_layers(model)):
        block = getattr(layer, layout.block_attr, None) if layout.block_attr else layer
        if block is not None and any(cls.__name__ == layout.block_class for cls in type(block).__mro__):
            router = getattr(block, layout.router_attr, None)
            if router is not None:
                found[index] = (block, router)
    return found


def _block_path(model: torch.nn.Module, index: int, layout: _Layout) -> str:
    """The block's full name (the decoder layer's own where ``block_attr`` is ``""``)."""
    prefix = f"{_layer_prefix(model)}.{index}"
    return f"{prefix}.{layout.block_attr}" if layout.block_attr else prefix


def _experts_module(model_type: str, block: torch.nn.Module) -> torch.nn.Module:
    return getattr(block, _LAYOUTS[_canonical(model_type)].experts_attr)


def _bias_path(model: torch.nn.Module, index: int) -> str | None:
    layout = _LAYOUTS[_canonical(model.config.model_type)]
    if layout.bias is None:
        return None
    owner, path = layout.bias.split(".", 1)
    prefix = _block_path(model, index, layout)
    return f"{prefix}.{layout.router_attr}.{path}" if owner == "router" else f"{prefix}.{path}"


def router_parameter_names(model: torch.nn.Module, include_selection_bias: bool = False) -> set[str]:
    """Full names (as in ``model.named_parameters()``) of the routers' learned parameters: what freezing must freeze.

    Selection biases are not included (even where the file stores them as a ``requires_grad=False`` Parameter:
    ERNIE 4.5, Laguna, AFMoE) unless ``include_selection_bias``.  Raises if a router holds a parameter that the
    type's layout does not name (the layout would be out of date).
    """
    model_type = _canonical(model.config.model_type)
    layout = _LAYOUTS[model_type]
    parameters = dict(model.named_parameters(remove_duplicate=False))
    bias_names = selection_bias_names(model)
    names: set[str] = set()
    for index, (_, router) in router_modules(model).items():
        prefix = f"{_block_path(model, index, layout)}.{layout.router_attr}"
        for relative in layout.router_params:
            if f"{prefix}.{relative}" not in parameters:
                raise ValueError(f"router_oracles: {model_type} router {prefix} has no parameter {relative}")
            names.add(f"{prefix}.{relative}")
        names.update(f"{prefix}.{relative}" for relative in layout.optional_router_params
                     if f"{prefix}.{relative}" in parameters)
        for relative, _ in router.named_parameters():
            full = f"{prefix}.{relative}"
            if full not in names and full not in bias_names:
                raise ValueError(f"router_oracles: {model_type} router parameter {full} is not in the layout")
    layers = _decoder_layers(model)
    for index in range(len(layers)):
        for path in layout.extra_routers:
            extra = layers[index].get_submodule(path)
            prefix = f"{_layer_prefix(model)}.{index}.{path}"
            names.update(f"{prefix}.{relative}" for relative, _ in extra.named_parameters())
    if include_selection_bias:
        names.update(name for name in bias_names if name in parameters)
    return names


def selection_bias_names(model: torch.nn.Module) -> set[str]:
    """Full names of the selection-bias tensors (buffers or no-grad Parameters).

    E.g. ``model.layers.1.mlp.gate.e_score_correction_bias`` (DeepSeek-V3), ``...mlp.e_score_correction_bias``
    (MiniMax-M2, HY-V3: on the block), ``...mlp.gate.moe_statics.e_score_correction_bias`` (ERNIE 4.5),
    ``...mlp.expert_bias`` (AFMoE).  Empty for the types without one.
    """
    tensors = {**dict(model.named_buffers(remove_duplicate=False)),
               **dict(model.named_parameters(remove_duplicate=False))}
    names: set[str] = set()
    for index in router_modules(model):
        path = _bias_path(model, index)
        if path is None:
            continue
        if path not in tensors:
            raise ValueError(f"router_oracles: {model.config.model_type} has no selection bias {path}")
        names.add(path)
    return names


def _selection_bias(model_type: str, block: torch.nn.Module, router: torch.nn.Module) -> torch.Tensor | None:
    layout = _LAYOUTS[_canonical(model_type)]
    if layout.bias is None:
        return None
    owner, path = layout.bias.split(".", 1)
    tensor: object = router if owner == "router" else block
    for part in path.split("."):
        tensor = getattr(tensor, part)
    assert isinstance(tensor, torch.Tensor)
    return tensor.detach()


def num_router_experts(model_type: str, router: torch.nn.Module) -> int:
    """Experts the router scores (LongCat: routed + zero experts; ZAYA: experts + the skip class)."""
    if _canonical(model_type) == "zaya":  # out_proj of the router MLP scores the classes (down_proj comes first)
        return int(router.router_mlp.out_proj.weight.shape[0])
    return int(_router_weight(model_type, router).shape[0])


def router_top_k(model_type: str, router: torch.nn.Module) -> int:
    """Experts chosen per token (PhiMoE's sparsemixer always chooses 2, whatever ``num_experts_per_tok`` says)."""
    return 2 if KIND[model_type] == "G" else _top_k(model_type, router)


def _top_k(model_type: str, router: torch.nn.Module) -> int:
    """The router's k (Gemma4TextRouter reads ``config.top_k_experts``; the others keep ``top_k``)."""
    if _canonical(model_type) == "gemma4_text":
        return int(router.config.top_k_experts)
    return int(router.top_k)


def expert_output_scale(model_type: str, block: torch.nn.Module) -> float:
    """The factor the block multiplies the experts' weighted sum by (1.0 where the weights carry the scaling).

    LagunaSparseMoeBlock.forward and MiniMaxM3VLSparseMoeBlock.forward: ``experts(...) * routed_scaling_factor``.
    """
    if _canonical(model_type) in ("laguna", "minimax_m3_vl_text"):
        return float(block.routed_scaling_factor)
    return 1.0


# --------------------------------------------------------------------------------------------------------------
# Logits
# --------------------------------------------------------------------------------------------------------------


def _router_weight(model_type: str, router: torch.nn.Module) -> torch.Tensor:
    relative = _LAYOUTS[_canonical(model_type)].router_params[0]
    tensor: object = router
    for part in relative.split("."):
        tensor = getattr(tensor, part)
    assert isinstance(tensor, torch.Tensor)
    return tensor.detach()


def _torch_at_least(major: int, minor: int) -> bool:
    version = tuple(int(part) for part in torch.__version__.split("+")[0].split(".")[:2])
    return version >= (major, minor)


def zaya_router_states(router: torch.nn.Module, hidden: torch.Tensor) -> torch.Tensor | None:
    """The state a ZAYA router from layer 1 on receives in these oracles and in :func:`router_output`:
    ``[1, N, router_hidden_size]`` standard-normal numbers, a fixed function of the token count ``N`` (``hidden`` is
    [N, H]), in the hidden states' dtype; ``None`` for layer 0, whose router adds no state (``use_eda`` off)."""
    if not router.use_eda:
        return None
    generator = torch.Generator().manual_seed(hidden.shape[0])
    state = torch.randn(1, hidden.shape[0], router.router_hidden_size, generator=generator)
    return state.to(hidden.device, hidden.dtype)


def _zaya_logits(router: torch.nn.Module, hidden: torch.Tensor, exact: bool) -> torch.Tensor:
    """ZayaRouter's logits [N, E + 1] (``hidden`` is [N, H]; the router runs on the block's [1, N, H]):
    ``down_proj`` (+ state × ``router_states_scale`` where ``use_eda``), then ZayaRouterMLP — ZayaRMSNorm (float32
    variance, ``weight * normed.to(input dtype)``), ``fc1`` → GELU, ``fc2`` → GELU, ``out_proj`` without bias.
    ``exact=False``: the same in float64."""
    def tensor(value: torch.Tensor) -> torch.Tensor:
        return value.detach() if exact else value.detach().double()

    mlp = router.router_mlp
    states = hidden[None] if exact else hidden[None].double()  # [1, N, H]
    state = zaya_router_states(router, hidden)
    states = F.linear(states, tensor(router.down_proj.weight), tensor(router.down_proj.bias))
    if router.use_eda and state is not None:
        states = states + tensor(state) * tensor(router.router_states_scale)
    input_dtype = states.dtype
    normed = states.to(torch.float32) if exact else states
    normed = normed * torch.rsqrt(normed.pow(2).mean(-1, keepdim=True) + mlp.norm.variance_epsilon)
    states = tensor(mlp.norm.weight) * normed.to(input_dtype)
    states = F.gelu(F.linear(states, tensor(mlp.fc1.weight), tensor(mlp.fc1.bias)))
    states = F.gelu(F.linear(states, tensor(mlp.fc2.weight), tensor(mlp.fc2.bias)))
    logits = F.linear(states, tensor(mlp.out_proj.weight))
    return logits.reshape(-1, logits.shape[-1])


def _exact_logits(model_type: str, router: torch.nn.Module, hidden: torch.Tensor) -> torch.Tensor:
    """The router logits in the file's dtypes (``hidden`` is [N, H])."""
    rule = _RULES[_canonical(model_type)]
    if rule.logits == "zaya":
        return _zaya_logits(router, hidden, exact=True)
    weight = _router_weight(model_type, router)
    if rule.logits == "gemma4":  # Gemma4TextRouter.forward, its Gemma4RMSNorm(with_scale=False) written out
        normed = hidden.float()
        normed = normed * torch.pow(normed.pow(2).mean(-1, keepdim=True) + router.eps, -0.5)
        scaled = normed.type_as(hidden) * router.scale.detach() * router.hidden_size ** -0.5
        logits = F.linear(scaled, weight)
    elif rule.logits == "fp32":  # F.linear(h.type(float32), W.type(float32))
        logits = F.linear(hidden.float(), weight.float())
    elif rule.logits == "fp32_classifier":  # LongCat: the classifier's bias (router_bias) is not used by forward
        logits = F.linear(hidden.float(), weight.float())
    elif rule.logits == "input_fp32":  # Inkling2: F.linear(h.float(), W)
        logits = F.linear(hidden.float(), weight)
    elif rule.logits == "weight_dtype":  # MiniMax: F.linear(h.to(W.dtype), W)
        logits = F.linear(hidden.to(weight.dtype), weight)
    elif rule.logits == "input_then_fp32":  # F.linear(h, W).float()
        logits = F.linear(hidden, weight).float()
    elif rule.logits == "input":  # nn.Linear without bias / F.linear(h, W)
        logits = F.linear(hidden, weight)
    elif rule.logits == "input_with_bias":  # gpt-oss: F.linear(h, W, b)
        logits = F.linear(hidden, weight, router.bias.detach())
    elif rule.logits == "kolibri":  # Kolibri1TopKRouter.forward
        if (hidden.is_cuda and hidden.dtype == weight.dtype and not torch.is_grad_enabled()
                and _torch_at_least(2, 8)):
            logits = torch.mm(hidden, weight.t(), out_dtype=torch.float32)
        else:
            logits = F.linear(hidden.type(torch.float32), weight.type(torch.float32))
    elif rule.logits == "ergo":  # ErgoLinearWithFP32Output.forward (cast_input_to_weight_dtype=False)
        weight = weight.to(hidden.dtype)
        if (hidden.is_cuda and hidden.dtype in (torch.float16, torch.bfloat16) and not torch.is_grad_enabled()
                and _torch_at_least(2, 8)):
            logits = torch.mm(hidden, weight.T, out_dtype=torch.float32)
        else:
            logits = F.linear(hidden.float(), weight.float())
    else:  # pragma: no cover - the table above is closed
        raise AssertionError(rule.logits)
    if rule.softcap and router.router_logit_softcapping > 0.0:  # LagunaTopKRouter: optional soft cap
        cap = router.router_logit_softcapping
        logits = torch.tanh(logits / cap) * cap
    return logits


def _float64_logits(model_type: str, router: torch.nn.Module, hidden: torch.Tensor) -> torch.Tensor:
    """The same logits in float64 from the same parameters (no intermediate rounding)."""
    rule = _RULES[_canonical(model_type)]
    if rule.logits == "zaya":
        return _zaya_logits(router, hidden, exact=False)
    weight = _router_weight(model_type, router).double()
    bias = router.bias.detach().double() if rule.logits == "input_with_bias" else None
    hidden = hidden.double()
    if rule.logits == "gemma4":
        hidden = hidden * torch.pow(hidden.pow(2).mean(-1, keepdim=True) + router.eps, -0.5)
        hidden = hidden * router.scale.detach().double() * router.hidden_size ** -0.5
    logits = F.linear(hidden, weight, bias)
    if rule.softcap and router.router_logit_softcapping > 0.0:
        cap = float(router.router_logit_softcapping)
        logits = torch.tanh(logits / cap) * cap
    return logits


def _flat(hidden: torch.Tensor) -> torch.Tensor:
    return hidden.detach().reshape(-1, hidden.shape[-1])


def oracle_logits(model_type: str, block: torch.nn.Module, router: torch.nn.Module,
                  hidden: torch.Tensor) -> torch.Tensor:
    """The router's logits [N, E] as the file computes them (its dtype; gpt-oss's linear bias included).

    These are the ``router_logits`` the router returns (Laguna: after its optional soft cap).  LongCat's
    ``classifier.bias`` (``router_bias``) exists but LongcatFlashTopkRouter.forward does not add it, so neither does
    this.
    """
    del block
    logits = _exact_logits(model_type, router, _flat(hidden))
    if KIND[_canonical(model_type)] == "I":  # InklingTopkRouter returns the routed experts' logits only
        return logits[..., :-int(router.n_shared_experts)]
    return logits


# --------------------------------------------------------------------------------------------------------------
# The family's choice and weights
# --------------------------------------------------------------------------------------------------------------


@dataclass
class _Scores:
    """One batch of tokens scored by one router: logits, unbiased scores, selection scores."""

    logits: torch.Tensor  # [N, E] ([N, E + S] for Inkling: its shared experts' logits last)
    scores: torch.Tensor  # [N, E] unbiased scores the weights are taken from (kinds B, D, E); the logits otherwise
    selection: torch.Tensor  # [N, E] what the top-k is taken over (bias included)
    hidden_dtype: torch.dtype
    exact: bool


def _score(model_type: str, block: torch.nn.Module, router: torch.nn.Module, hidden: torch.Tensor,
           exact: bool) -> _Scores:
    model_type = _canonical(model_type)
    rule = _RULES[model_type]
    hidden = _flat(hidden)
    logits = _exact_logits(model_type, router, hidden) if exact else _float64_logits(model_type, router, hidden)
    bias = _selection_bias(model_type, block, router)
    if bias is not None and not exact:
        bias = bias.double()
    if rule.kind == "I":  # sigmoid of all E + S logits; only the E routed experts' scores (+ bias) are chosen from
        shared = int(router.n_shared_experts)
        scores = torch.sigmoid(logits)
        selection = scores[..., :-shared] + (bias.float() if exact else bias)
    elif rule.kind in ("D", "E"):
        if model_type in ("minimax_m2", "minimax_m3_vl_text"):
            scores = torch.sigmoid(logits.float()) if exact else torch.sigmoid(logits)
        else:
            scores = torch.sigmoid(logits)
        if model_type == "laguna":  # scores + bias.to(scores.dtype)
            selection = scores + bias.to(scores.dtype)
        else:
            selection = scores + bias
    elif rule.kind == "S":  # ZAYA: softmax (logits' dtype); probs.detach().to(float32) + balancing_biases
        scores = torch.softmax(logits, dim=-1)
        selection = (scores.to(torch.float32) if exact else scores) + bias
    elif rule.kind == "R":  # Gemma 4: softmax(expert_scores, dim=-1, dtype=float32)
        scores = F.softmax(logits, dim=-1, dtype=torch.float32) if exact else F.softmax(logits, dim=-1)
        selection = scores
    elif model_type == "ernie4_5_moe":  # softmax(dim=1, dtype=float) then moe_statics: probs + bias.squeeze()
        scores = F.softmax(logits, dim=1, dtype=torch.float) if exact else F.softmax(logits, dim=1)
        selection = scores + bias.squeeze()
    elif model_type == "longcat_flash":  # logits.softmax(-1); scores.view(-1, E) + bias.unsqueeze(0)
        scores = logits.softmax(dim=-1)
        selection = scores.view(-1, scores.shape[-1]) + bias.unsqueeze(0)
    elif rule.kind == "K":  # topk(router_logits + bias)
        scores = logits
        selection = logits + bias
    else:  # kinds C, F, G choose on the logits
        scores = logits
        selection = logits
    return _Scores(logits, scores, selection, hidden.dtype, exact)


def _group_mask(router: torch.nn.Module, selection: torch.Tensor) -> torch.Tensor:
    """DeepseekV3TopkRouter's group limit: [N, E] bool, True for the experts of the ``topk_group`` kept groups.

    Groups of E / n_group consecutive experts, each scored by the sum of its 2 best selection scores; the
    ``topk_group`` best groups kept (``torch.topk(..., sorted=False)``).
    """
    num_tokens, num_experts = selection.shape
    groups = int(router.num_group)
    group_scores = selection.view(num_tokens, groups, num_experts // groups).topk(2, dim=-1)[0].sum(dim=-1)
    kept = torch.topk(group_scores, k=int(router.topk_group), dim=-1, sorted=False)[1]
    group_kept = torch.zeros_like(group_scores, dtype=torch.bool).scatter_(1, kept, True)
    return group_kept.repeat_interleave(num_experts // groups, dim=1)


def _renormalise(rule: _Rule, router: torch.nn.Module, weights: torch.Tensor) -> torch.Tensor:
    if rule.renorm == "always" or (rule.renorm == "norm_topk_prob" and router.norm_topk_prob):
        total = weights.sum(dim=-1, keepdim=True)
        return weights / (total + rule.eps) if rule.eps else weights / total
    if rule.renorm == "clamp":  # Ernie4_5_MoeTopKRouter: / clamp(sum, min=moe_norm_min)
        return weights / torch.clamp(weights.sum(dim=-1, keepdim=True), min=router.norm_min)
    return weights


def _sparsemixer_weight(router: torch.nn.Module, logits: torch.Tensor, chosen: torch.Tensor,
                        masked_first: torch.Tensor | None) -> torch.Tensor:
    """One sparsemixer multiplier (eval): softmax over the logits within the relative threshold of the chosen one.

    ``sparsemixer`` in modeling_phimoe.py: threshold = the chosen logit (the max of what is left);
    ``factor = |logits|.clamp(min=threshold)``; logits with ``(threshold - logit) / factor > 2 * jitter_eps`` are
    masked to -inf (for the second expert, the first is masked too); softmax; the chosen entry.
    """
    threshold = logits.gather(-1, chosen)
    factor = logits.abs().clamp(min=threshold)
    far = ((threshold - logits) / factor) > (2 * router.router_jitter_noise)
    base = logits if masked_first is None else torch.scatter(logits, -1, masked_first, float("-inf"))
    return torch.softmax(base.masked_fill(far, float("-inf")), dim=-1).gather(dim=-1, index=chosen)


def _weights(model_type: str, router: torch.nn.Module, scored: _Scores, indices: torch.Tensor) -> torch.Tensor:
    """The family's weights of the chosen ``indices`` [N, k], from the unmasked scores (the file's rule)."""
    model_type = _canonical(model_type)
    rule = _RULES[model_type]
    exact = scored.exact
    if rule.kind in ("B", "D", "E"):
        weights = scored.scores.gather(1, indices)
        weights = _renormalise(rule, router, weights)
        if rule.scale is not None:
            weights = weights * getattr(router, rule.scale)
    elif rule.kind == "C":
        top = scored.logits.gather(1, indices)
        weights = F.softmax(top, dim=1, dtype=top.dtype) if model_type == "gpt_oss" else torch.softmax(top, dim=-1)
    elif rule.kind == "F":  # sigmoid(full(-inf).scatter_(top).float()).to(dtype), read at the chosen entries
        top = scored.logits.gather(1, indices)
        weights = torch.sigmoid(top.float()).to(top.dtype) if exact else torch.sigmoid(top)
    elif rule.kind == "G":
        first, second = indices[:, :1], indices[:, 1:2]
        weights = torch.concat((_sparsemixer_weight(router, scored.logits, first, None),
                                _sparsemixer_weight(router, scored.logits, second, first)), dim=-1)
    elif rule.kind == "R":  # top_k_weights /= sum; top_k_weights * per_expert_scale[top_k_index]
        weights = _renormalise(rule, router, scored.scores.gather(1, indices))
        scale = router.per_expert_scale.detach()
        weights = weights * (scale if exact else scale.double())[indices]
    elif rule.kind == "K":  # router_logits.gather(idx).sigmoid(); / sum iff norm_topk_prob
        weights = _renormalise(rule, router, scored.logits.gather(1, indices).sigmoid())
    elif rule.kind == "S":  # gather(probs); the skip class (the last index) weighs 0
        weights = scored.scores.gather(1, indices)
        weights = weights.masked_fill(indices == scored.logits.shape[-1] - 1, 0)
    elif rule.kind == "I":  # the k routed weights of _inkling_weights (the shared experts' follow)
        weights = _inkling_weights(router, scored, indices)[..., : indices.shape[-1]]
    else:  # pragma: no cover
        raise AssertionError(rule.kind)
    if exact and rule.cast == "hidden":
        weights = weights.to(scored.hidden_dtype)
    elif exact and rule.cast == "hidden_then_float":
        weights = weights.to(scored.hidden_dtype).float()
    elif exact and rule.cast == "logits":
        weights = weights.to(scored.logits.dtype)
    return weights


def _inkling_weights(router: torch.nn.Module, scored: _Scores, indices: torch.Tensor) -> torch.Tensor:
    """InklingTopkRouter's ``[N, k + S]`` weights before the cast: the k chosen routed experts, then the S shared ones.

    ``cat([routed_logits.gather(-1, idx), shared_logits])`` → ``logsigmoid`` → ``exp(lp - logsumexp(lp))`` →
    ``× route_scale × global_scale.float()`` (float64 throughout when not exact).
    """
    shared = int(router.n_shared_experts)
    logits = scored.logits
    chosen = torch.cat([logits[..., :-shared].gather(-1, indices), logits[..., -shared:]], dim=-1)
    log_probs = F.logsigmoid(chosen)
    weights = torch.exp(log_probs - torch.logsumexp(log_probs, dim=-1, keepdim=True))
    global_scale = router.global_scale.detach()
    return weights * router.route_scale * (global_scale.float() if scored.exact else global_scale.double())


def oracle_shared_weights(model_type: str, block: torch.nn.Module, router: torch.nn.Module, hidden: torch.Tensor,
                          indices: torch.Tensor | None = None, exact: bool = True) -> torch.Tensor:
    """Inkling's fourth router output: the ``[N, S]`` weights (``shared_gammas``) of the shared experts, normalised
    together with the chosen ``indices`` (default: the family's own choice) and cast to the hidden dtype."""
    if KIND.get(model_type) != "I":
        raise ValueError(f"router_oracles: {model_type} weights no shared experts in its router")
    scored = _score(model_type, block, router, hidden, exact)
    if indices is None:
        indices = _family_choice(model_type, router, scored)
    weights = _inkling_weights(router, scored, indices)[..., indices.shape[-1]:]
    return weights.to(scored.hidden_dtype) if exact else weights


def _family_choice(model_type: str, router: torch.nn.Module, scored: _Scores) -> torch.Tensor:
    """The family's own chosen indices [N, k], in the order of its top-k call."""
    rule = _RULES[_canonical(model_type)]
    selection = scored.selection
    if rule.kind == "G":  # sparsemixer (eval): the max, then the max with the first masked out
        _, first = selection.max(dim=-1, keepdim=True)
        _, second = torch.scatter(selection, -1, first, float("-inf")).max(dim=-1, keepdim=True)
        return torch.concat((first, second), dim=-1)
    if rule.kind == "E":
        selection = selection.masked_fill(~_group_mask(router, selection), float("-inf"))
    return torch.topk(selection, k=_top_k(model_type, router), dim=-1, sorted=rule.topk_sorted)[1]


def oracle_route(model_type: str, block: torch.nn.Module, router: torch.nn.Module, hidden: torch.Tensor,
                 exact: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """The family's choice ``(indices [N, k] int64, weights [N, k])``, re-derived from the modeling file.

    ``exact=False``: in float64 (weights float64).  ``exact=True``: the file's dtypes and torch calls, to compare
    bit for bit with the router's own output (indices as sets per token, weights at matching indices).  Llama 4:
    the k chosen experts and their sigmoid values (:func:`oracle_dense_scores` gives the dense matrix).  PhiMoE:
    the eval sparsemixer (2 experts).  LongCat: indices ≥ n_routed_experts are zero experts.  Laguna /
    MiniMax-M3-VL: the router's weights (the block scales the experts' output, :func:`expert_output_scale`).
    """
    if _canonical(model_type) == "doge":
        return _doge_route(block, router, hidden, exact)
    scored = _score(model_type, block, router, hidden, exact)
    indices = _family_choice(model_type, router, scored)
    return indices, _weights(model_type, router, scored, indices)


def oracle_dense_scores(model_type: str, block: torch.nn.Module, router: torch.nn.Module, hidden: torch.Tensor,
                        exact: bool = False) -> torch.Tensor:
    """Llama 4's dense [N, E] score matrix: sigmoid of the chosen logits, 0 elsewhere (Llama4Router.forward)."""
    if KIND[model_type] != "F":
        raise ValueError(f"router_oracles: {model_type} has no dense score matrix (kind {KIND[model_type]})")
    scored = _score(model_type, block, router, hidden, exact)
    logits = scored.logits
    indices = torch.topk(logits, int(router.top_k), dim=1)[1]
    if exact:
        dense = torch.full_like(logits, float("-inf")).scatter_(1, indices, logits.gather(1, indices))
        return torch.sigmoid(dense.float()).to(dense.dtype)
    return torch.zeros_like(logits).scatter_(1, indices, torch.sigmoid(logits.gather(1, indices)))


# --------------------------------------------------------------------------------------------------------------
# C2R
# --------------------------------------------------------------------------------------------------------------


def _allowed_row(allowed_lists: Mapping[int, Sequence[int]] | Sequence[Sequence[int]] | torch.Tensor, first: int,
                 top_t: int | None, num_experts: int) -> torch.Tensor:
    """[E] bool: {first} ∪ the first ``top_t`` entries of first's list (a [E, E] bool matrix: its row ``first``)."""
    allowed = torch.zeros(num_experts, dtype=torch.bool)
    if isinstance(allowed_lists, torch.Tensor):
        allowed |= allowed_lists[first].detach().to("cpu", torch.bool)
    else:
        partners = list(allowed_lists[first])
        allowed[torch.tensor(partners[:top_t] if top_t is not None else partners, dtype=torch.long)] = True
    allowed[first] = True
    return allowed


def first_choice(model_type: str, block: torch.nn.Module, router: torch.nn.Module, hidden: torch.Tensor,
                 exact: bool = True) -> torch.Tensor:
    """``[N]`` int64: each token's first expert in the C2R sense — the best selection score (bias included) among
    the experts the family itself would choose (after the group limit; PhiMoE: the sparsemixer's first pick; ZAYA:
    the best of the ``E`` experts, the skip class left out, which is the family's first choice unless the skip class
    ranks first)."""
    model_type = _canonical(model_type)
    if model_type == "doge":  # column 0 of the file's own top-k of the pair sums
        pairs = _doge_pairs(block, router, hidden, exact)
        return pairs.experts.gather(1, _doge_first_positions(pairs)[:, None])[:, 0]
    rule = _RULES[model_type]
    scored = _score(model_type, block, router, hidden, exact)
    selection = scored.selection
    if rule.kind == "G":
        return selection.max(dim=-1)[1].to(torch.int64)
    if rule.kind == "S":
        return selection[:, :-1].max(dim=-1)[1].to(torch.int64)
    if rule.kind == "E":
        selection = selection.masked_fill(~_group_mask(router, selection), float("-inf"))
    return selection.max(dim=-1)[1].to(torch.int64)


def oracle_c2r(model_type: str, block: torch.nn.Module, router: torch.nn.Module, hidden: torch.Tensor,
               allowed_lists: Mapping[int, Sequence[int]] | Sequence[Sequence[int]] | torch.Tensor,
               top_t: int | None = None, exact: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Collaboration-constrained routing ``(indices [N, k] int64, weights [N, k])``, one token at a time.

    1. e1 = the family's own first choice: the best selection score (bias included) among the experts the family
       itself chooses (group-limited routers: after the group limit; PhiMoE: the sparsemixer's first expert).  ZAYA:
       the family's first choice among its ``E + 1`` classes stays chosen; e1 is that class when it is an expert,
       else (the skip class ranks first) the best expert.
    2. allowed = {e1} ∪ ``allowed_lists[e1][:top_t]`` (``top_t=None``: the whole list; a [E, E] bool tensor: its
       row e1, ``top_t`` unused).  ZAYA: and the skip class, in every allowed set (it is no expert).
    3. chosen = the k best allowed experts by the selection score (``torch.topk`` of the score with the others
       masked to -inf).  Group-limited routers: within the family's kept groups if at least k allowed experts lie
       there; otherwise every allowed expert in the kept groups plus the best allowed experts outside them (C2R then
       overrides the group limit for that token).  PhiMoE: e1, then the best allowed expert other than e1.
    4. weights = the family's weight rule on the chosen set, from the unmasked scores (sigmoid / softmax over all
       experts gathered and renormalised and scaled as the file does; softmax over the chosen logits for kind C;
       sigmoid of the chosen logits for Llama 4; the sparsemixer multipliers with thresholds at e1 and e2 for PhiMoE).

    ``exact=True`` scores in the file's dtypes (so a full list, ``top_t = E - 1``, reproduces the router bit for bit,
    ties included); ``exact=False`` in float64.  The order of the chosen experts is the oracle's: sort by index
    before comparing.  Raises ValueError where fewer than k experts are allowed.
    """
    model_type = _canonical(model_type)
    if model_type == "doge":
        return _doge_c2r(block, router, hidden, allowed_lists, top_t, exact)
    rule = _RULES[model_type]
    scored = _score(model_type, block, router, hidden, exact)
    num_tokens, num_classes = scored.selection.shape
    num_experts = num_classes - 1 if rule.kind == "S" else num_classes  # ZAYA's last class is the skip class
    top_k = router_top_k(model_type, router)
    all_indices = []
    for token in range(num_tokens):
        selection = scored.selection[token:token + 1]  # [1, E]: the same row the family's batched call sees
        device = selection.device
        if rule.kind == "E":
            kept = _group_mask(router, selection)[0]
        else:
            kept = torch.ones(num_classes, dtype=torch.bool, device=device)
        if rule.kind == "G":  # sparsemixer: the first expert is the max of the logits
            first = int(selection.max(dim=-1)[1][0])
        else:  # the best of the family's own choice (topk sorts best first)
            first = int(torch.topk(selection.masked_fill(~kept, float("-inf")), top_k, dim=-1)[1][0, 0])
        if first >= num_experts:  # ZAYA: the skip class ranks first; the allowed set is the best expert's
            first = int(selection[:, :num_experts].max(dim=-1)[1][0])
        allowed = _allowed_row(allowed_lists, first, top_t, num_experts).to(device)
        if rule.kind == "S":  # the skip class is in every allowed set
            allowed = torch.cat([allowed, torch.ones(1, dtype=torch.bool, device=device)])
        if int(allowed.sum()) < top_k:
            raise ValueError(f"router_oracles: token {token}: only {int(allowed.sum())} experts allowed for "
                             f"expert {first}, fewer than k={top_k}")
        if rule.kind == "G":
            rest = selection.masked_fill(~allowed, float("-inf")).clone()
            rest[0, first] = float("-inf")
            second = int(rest.max(dim=-1)[1][0])
            chosen = torch.tensor([[first, second]], device=device)
        else:
            inside = allowed & kept
            if int(inside.sum()) >= top_k:
                chosen = torch.topk(selection.masked_fill(~inside, float("-inf")), top_k, dim=-1,
                                    sorted=rule.topk_sorted)[1]
            else:  # the group limit cannot be met with allowed experts: all inside, then the best outside
                missing = top_k - int(inside.sum())
                outside = torch.topk(selection.masked_fill(~(allowed & ~kept), float("-inf")), missing, dim=-1)[1]
                chosen = torch.cat((inside.nonzero().reshape(1, -1), outside), dim=-1)
        all_indices.append(chosen)
    indices = torch.cat(all_indices).to(torch.int64)
    # the weight rule runs once on the whole batch: elementwise kernels round a [1, k] row and an [N, k] batch
    # differently (vectorised vs scalar paths), and the family runs it on the batch
    return indices, _weights(model_type, router, scored, indices)


# --------------------------------------------------------------------------------------------------------------
# Doge: product keys (kind H), chosen inside DogeCDMoE.forward
# --------------------------------------------------------------------------------------------------------------


def _doge_key_rows(router: torch.nn.Module, hidden: torch.Tensor, exact: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """The two rows of key scores each token is routed by, ``(x [N, K], y [N, K])``.

    DogeCDMoE.forward: ``router_logits = self.router_gate(hidden_states).view(2, bsz * seq_len, -1)``.  The
    ``[B, S, 2K]`` key scores are viewed as ``[2, N, K]``: the view splits the flat memory into ``2N`` chunks of ``K``
    scores, chunk ``c`` being token ``c // 2``'s first (``c`` even) or second (``c`` odd) ``K`` key scores; the view's
    first half is chunks ``0 .. N-1``, its second ``N .. 2N-1``.  Row ``n``, whose experts the block applies to token
    ``n``, is therefore ``x = chunk n``, ``y = chunk N + n``: the keys of tokens ``n // 2`` and ``(N + n) // 2``.
    Written out here by that index arithmetic, not by the view.  ``hidden`` is the block's input flattened to
    ``[N, H]`` (one sequence of the batch after the other); the router runs on ``[1, N, H]`` as the block runs it.
    """
    hidden = _flat(hidden)
    weight = router.weight.detach()
    keys = F.linear(hidden[None], weight) if exact else F.linear(hidden[None].double(), weight.double())
    keys = keys[0]  # [N, 2K]
    num_tokens, num_keys = keys.shape[0], keys.shape[1] // 2
    halves = keys.reshape(num_tokens, 2, num_keys)  # [N, 2, K]: each token's first and second K key scores
    first_chunk = torch.arange(num_tokens, device=keys.device)
    second_chunk = first_chunk + num_tokens
    return halves[first_chunk // 2, first_chunk % 2], halves[second_chunk // 2, second_chunk % 2]


@dataclass
class _DogePairs:
    """Every row's ``K²`` pair sums in the file's layout, and the expert each position stands for."""

    scores: torch.Tensor  # [N, K²]: position a·K + b = (a-th best x key) + (b-th best y key)
    experts: torch.Tensor  # [N, K²]: (id of that x key)·K + (id of that y key)
    top_k: int
    renormalise: bool


def _doge_pairs(block: torch.nn.Module, router: torch.nn.Module, hidden: torch.Tensor, exact: bool) -> _DogePairs:
    """DogeCDMoE.forward: ``router_logits.topk(self.num_keys, dim=-1)`` sorts each row of both halves (called here on
    the stacked ``[2, N, K]`` rows, as the file calls it on its view); ``all_scores`` = x-values[a] + y-values[b] and
    ``all_indices`` = x-ids[a]·K + y-ids[b], flattened to ``[N, K²]`` with ``a`` major."""
    x, y = _doge_key_rows(router, hidden, exact)
    num_tokens, num_keys = x.shape
    if num_keys != int(block.num_keys):
        raise ValueError(f"router_oracles: router_gate scores {2 * num_keys} keys, the block expects 2 × "
                         f"{int(block.num_keys)}")
    values, ids = torch.stack((x, y)).topk(num_keys, dim=-1)
    scores = (values[0][:, :, None] + values[1][:, None, :]).reshape(num_tokens, -1)
    experts = (ids[0][:, :, None] * num_keys + ids[1][:, None, :]).reshape(num_tokens, -1)
    return _DogePairs(scores, experts.to(torch.int64), int(block.top_k), bool(block.norm_topk_prob))


def oracle_doge_expert_scores(block: torch.nn.Module, router: torch.nn.Module, hidden: torch.Tensor,
                              exact: bool = False) -> torch.Tensor:
    """``[N, E]``: every expert's pair sum ``x_i + y_j`` at id ``i·K + j`` (row ``n`` from :func:`_doge_key_rows`);
    ``-inf`` for ids from ``K²`` on, which no pair reaches."""
    x, y = _doge_key_rows(router, hidden, exact)
    pairs = (x[:, :, None] + y[:, None, :]).reshape(x.shape[0], -1)
    scores = pairs.new_full((x.shape[0], int(block.num_experts)), float("-inf"))
    scores[:, : pairs.shape[1]] = pairs
    return scores


def _doge_weights(pairs: _DogePairs, positions: torch.Tensor) -> torch.Tensor:
    """``F.softmax(scores, dim=-1)`` over the chosen positions' pair sums, then ``/=`` its sum iff norm_topk_prob."""
    weights = F.softmax(pairs.scores.gather(1, positions), dim=-1)
    return weights / weights.sum(dim=-1, keepdim=True) if pairs.renormalise else weights


def _doge_route(block: torch.nn.Module, router: torch.nn.Module, hidden: torch.Tensor,
                exact: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """DogeCDMoE.forward's choice: ``all_scores.topk(self.top_k, dim=-1)`` positions, their expert ids, weights."""
    pairs = _doge_pairs(block, router, hidden, exact)
    positions = pairs.scores.topk(pairs.top_k, dim=-1)[1]
    return pairs.experts.gather(1, positions), _doge_weights(pairs, positions)


def _doge_first_positions(pairs: _DogePairs) -> torch.Tensor:
    """``[N]``: the position of each row's first choice (column 0 of the file's top-k call), one row at a time."""
    return torch.stack([torch.topk(pairs.scores[row:row + 1], pairs.top_k, dim=-1)[1][0, 0]
                        for row in range(pairs.scores.shape[0])])


def _doge_c2r(block: torch.nn.Module, router: torch.nn.Module, hidden: torch.Tensor,
              allowed_lists: Mapping[int, Sequence[int]] | Sequence[Sequence[int]] | torch.Tensor,
              top_t: int | None, exact: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """C2R on Doge's product keys, one token at a time (see :func:`oracle_c2r`): the first expert is the file's own
    first choice; the others the best allowed ones by the file's own ordering — its ``topk`` over the row's pair sums
    with the positions of experts the first one does not allow at -inf (the first put first, the last dropped, where
    more than k allowed positions tie with it and the call leaves it out); weights by the file's rule from the
    unmasked pair sums."""
    pairs = _doge_pairs(block, router, hidden, exact)
    num_experts, top_k = int(block.num_experts), pairs.top_k
    chosen = []
    for token, first_position in enumerate(_doge_first_positions(pairs).tolist()):
        row = pairs.scores[token:token + 1]  # [1, K²]
        first = int(pairs.experts[token, first_position])
        allowed = _allowed_row(allowed_lists, first, top_t, num_experts).to(row.device)[pairs.experts[token]]
        if int(allowed.sum()) < top_k:
            raise ValueError(f"router_oracles: token {token}: only {int(allowed.sum())} experts allowed for expert "
                             f"{first}, fewer than k={top_k}")
        positions = torch.topk(row.masked_fill(~allowed, float("-inf")), top_k, dim=-1)[1][0]
        if first_position not in positions.tolist():
            positions = torch.cat((positions.new_tensor([first_position]), positions[:-1]))
        chosen.append(positions)
    positions = torch.stack(chosen)
    # the weights on the whole batch, as the file computes them (a [1, k] row may round otherwise)
    return pairs.experts.gather(1, positions), _doge_weights(pairs, positions)


class _ProductsWith(TorchFunctionMode):
    """Records the right operand of the first product ``left * right`` whose left operand is ``lefts[0]``."""

    def __init__(self, lefts: list[torch.Tensor], seen: dict[str, torch.Tensor]) -> None:
        super().__init__()
        self.lefts, self.seen = lefts, seen

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if (getattr(func, "__name__", "") in ("mul", "__mul__") and "weights" not in self.seen and self.lefts
                and len(args) == 2 and args[0] is self.lefts[0]):
            self.seen["weights"] = args[1]
        return func(*args, **(kwargs or {}))


def _doge_block_output(block: torch.nn.Module, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor,
                                                                                torch.Tensor]:
    """Runs the block (whatever forward the instance has) on ``[1, N, H]``: ``(router_logits it returns, the expert
    ids [N, k] its ``down_embed`` looks up, the weights [N, k] it multiplies the experts' activations by)``.

    DogeCDMoE.forward: ``down_embed = self.down_embed(indices)`` (a forward pre-hook reads ``indices``);
    ``experts_weights = self.act_fn(experts_weights) * routing_weights`` (the block's first ``act_fn`` call; a
    torch-function mode reads the right operand of the product with its output)."""
    seen: dict[str, torch.Tensor] = {}
    activations: list[torch.Tensor] = []
    handles = [block.down_embed.register_forward_pre_hook(lambda module, args: seen.setdefault("indices", args[0])),
               block.act_fn.register_forward_hook(lambda module, args, output: activations.append(output))]
    try:
        with _ProductsWith(activations, seen):
            _, logits = block(_flat(hidden)[None])
    finally:
        for handle in handles:
            handle.remove()
    if "weights" not in seen:
        raise AssertionError("router_oracles: DogeCDMoE no longer multiplies act_fn(...) by the routing weights")
    return logits, seen["indices"].detach().clone(), seen["weights"].detach().clone()


def oracle_doge_balance_loss(router_logits_per_layer: Sequence[torch.Tensor], chosen_per_layer: Sequence[torch.Tensor],
                             num_experts: int, top_k: int, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """DogeForCausalLM's balance loss (``modeling_doge.load_balancing_loss_func``) in float64, counting the ACTUAL
    chosen experts.

    ``router_logits_per_layer``: what the causal LM records per layer, the blocks' ``[2, N, K]`` views (row ``n``:
    ``x = [0, n]``, ``y = [1, n]``).  Per row, every expert ``i·K + j`` has probability softmax over all ``K²`` pairs
    of ``x_i + y_j``; ``f_e`` = the chosen slots of expert ``e`` over all kept ``N·k`` slots of all layers (the file
    divides by the number of choices, not of tokens); ``P_e`` = the mean probability over the kept rows of all
    layers; loss = ``E · Σ_e f_e · P_e``.
    """
    counts = torch.zeros(num_experts, dtype=torch.float64)
    probability = torch.zeros(num_experts, dtype=torch.float64)
    rows = torch.zeros((), dtype=torch.float64)
    for view, chosen in zip(router_logits_per_layer, chosen_per_layer, strict=True):
        view = view.detach().to("cpu", torch.float64)
        num_rows, num_keys = view.shape[1], view.shape[2]
        pairs = (view[0][:, :, None] + view[1][:, None, :]).reshape(num_rows, num_keys * num_keys)  # by expert id
        chosen = chosen.detach().reshape(num_rows, -1).to("cpu", torch.int64)
        if chosen.shape[1] != top_k:
            raise ValueError(f"oracle_doge_balance_loss: {chosen.shape[1]} chosen experts per token, top_k={top_k}")
        keep = (torch.ones(num_rows, dtype=torch.float64) if attention_mask is None
                else attention_mask.detach().reshape(-1).to("cpu", torch.float64))
        counts.index_add_(0, chosen.reshape(-1), keep.repeat_interleave(top_k))
        probability[: num_keys * num_keys] += (torch.softmax(pairs, dim=-1) * keep[:, None]).sum(dim=0)
        rows += keep.sum()
    return num_experts * ((counts / (rows * top_k)) * (probability / rows)).sum()


# --------------------------------------------------------------------------------------------------------------
# The router's own output, and what the experts receive
# --------------------------------------------------------------------------------------------------------------


def _dense_to_choice(dense: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Nonzero entries of a dense [N, E] score matrix: indices [N, c] ascending (-1 padded) and their values."""
    nonzero = dense != 0
    width = int(nonzero.sum(dim=-1).max()) if dense.shape[0] else 0
    order = torch.sort((~nonzero).to(torch.int8), dim=-1, stable=True)[1][:, :width]
    indices = torch.where(nonzero.gather(1, order), order, torch.full_like(order, -1))
    values = torch.where(indices >= 0, dense.gather(1, order), torch.zeros((), dtype=dense.dtype))
    return indices, values


def router_output(model_type: str, block: torch.nn.Module, router: torch.nn.Module,
                  hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Calls the real router as its block does; returns ``(logits, indices, weights)``.

    MiniMax-M2 / HY-V3 pass the block's bias buffer, AFMoE its ``expert_bias`` (and a [1, N, H] input); Llama 4's
    dense matrix becomes its nonzero entries (indices ascending); Inkling's fourth output (the shared experts'
    weights) is left out; ZAYA gets a [1, N, H] input and :func:`zaya_router_states`, its fourth output (the state
    for the next layer) is left out and a chosen skip class (expert 0 with weight exactly 0) becomes index ``E``.
    Doge: the block itself runs on ``[1, N, H]`` (its router only scores keys): its ``[2, N, K]`` router logits, the
    ids its ``down_embed`` looks up and the weights it multiplies the experts' activations by
    (:func:`_doge_block_output`).
    """
    model_type = _canonical(model_type)
    hidden = hidden.reshape(-1, hidden.shape[-1])
    if model_type == "doge":  # the block chooses inside its forward: run it, read what its experts get
        return _doge_block_output(block, hidden)
    if model_type in ("minimax_m2", "hy_v3"):
        logits, weights, indices = router(hidden, block.e_score_correction_bias)
    elif model_type == "afmoe":
        logits, weights, indices = router(hidden[None], block.expert_bias)
    elif model_type == "llama4_text":
        dense, logits = router(hidden)
        indices, weights = _dense_to_choice(dense)
    elif model_type == "inkling_text":  # a fourth output: the shared experts' weights
        logits, weights, indices, _ = router(hidden)
    elif model_type == "zaya":  # [1, N, H] and a state as the block passes them; the fourth output is the next state
        logits, weights, indices, _ = router(hidden[None], router_states=zaya_router_states(router, hidden))
        indices = indices.masked_fill((indices == 0) & (weights == 0), int(router.num_experts))  # the skip class
    elif model_type == "jetmoe":  # (index_sorted_experts, batch_index, batch_gates, expert_size, logits)
        logits, indices, weights = jetmoe_choice(router(hidden), int(router.top_k))
    else:
        logits, weights, indices = router(hidden)
    return logits, indices, weights


def jetmoe_choice(output: tuple, top_k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(logits, indices [N, k], weights [N, k])`` from JetMoeTopKGating's hand-off: ``index_sorted_experts`` are
    the flat positions ``token * k + slot`` sorted by expert, ``expert_size`` the rows of each expert in that order,
    ``batch_gates`` the weights in that order."""
    index_sorted_experts, _, batch_gates, expert_size, logits = output
    experts = torch.cat([torch.full((size,), expert, dtype=torch.int64) for expert, size in enumerate(expert_size)])
    indices = torch.empty_like(index_sorted_experts)
    weights = torch.empty_like(batch_gates)
    indices[index_sorted_experts] = experts.to(indices.device)
    weights[index_sorted_experts] = batch_gates
    return logits, indices.view(-1, top_k), weights.view(-1, top_k)


@contextlib.contextmanager
def captured_choices(model: torch.nn.Module, source: str = "experts",
                     with_weights: bool = False) -> Iterator[dict[int, list]]:
    """Record, per MoE layer (absolute index), the experts chosen at every forward call: a list of [N, k] tensors.

    ``source="experts"``: the ``top_k_index`` the experts module receives (forward pre-hook; gpt-oss names it
    ``router_indices``); Llama 4: the nonzero entries of the dense score matrix the block scales the experts' input
    with (forward hook on the router).  LongCat with zero experts: the experts receive ``top_k_index`` with every
    zero-expert slot remapped to a real expert index with weight 0 (LongcatFlashMoE.forward); ``source="router"``
    records the router's own indices instead (zero experts as indices ≥ n_routed_experts).  JetMoE (both sources):
    its router's expert-sorted hand-off turned back into ``[N, k]``.  Doge (``source="experts"`` only): the expert
    ids ``DogeCDMoE.forward`` looks up in ``down_embed`` (its weights are not handed to a module: ``with_weights``
    is refused).  ZAYA: a skip choice reaches the experts as expert 0 with weight 0.  ``with_weights``: entries
    become ``(indices, weights)`` pairs.
    """
    if source not in ("experts", "router"):
        raise ValueError(f"captured_choices: source must be 'experts' or 'router', not {source!r}")
    model_type = _canonical(model.config.model_type)
    captured: dict[int, list] = {}
    handles = []

    def record(index: int, indices: torch.Tensor, weights: torch.Tensor) -> None:
        indices = indices.detach().reshape(-1, indices.shape[-1]).clone()
        entry = (indices, weights.detach().reshape(indices.shape).clone()) if with_weights else indices
        captured.setdefault(index, []).append(entry)

    if model_type == "doge" and (source == "router" or with_weights):
        raise ValueError("captured_choices: Doge's choice is made inside DogeCDMoE.forward; only its expert ids "
                         "(source='experts', no weights) can be captured")
    for index, (block, router) in router_modules(model).items():
        if model_type == "jetmoe":
            def sorted_hook(module, args, output, index=index):
                _, indices, weights = jetmoe_choice(output, int(module.top_k))
                record(index, indices, weights)

            handles.append(router.register_forward_hook(sorted_hook))
        elif model_type == "doge":  # DogeCDMoE.forward: down_embed(indices)
            def embed_hook(module, args, index=index):
                record(index, args[0], args[0])

            handles.append(block.down_embed.register_forward_pre_hook(embed_hook))
        elif model_type == "llama4_text":
            def dense_hook(module, args, output, index=index):
                record(index, *_dense_to_choice(output[0]))

            handles.append(router.register_forward_hook(dense_hook))
        elif source == "router":
            def router_hook(module, args, output, index=index):
                record(index, output[2], output[1])

            handles.append(router.register_forward_hook(router_hook))
        else:
            def experts_hook(module, args, kwargs, index=index):
                indices = args[1] if len(args) > 1 else kwargs.get("top_k_index", kwargs.get("router_indices"))
                weights = args[2] if len(args) > 2 else kwargs.get("top_k_weights", kwargs.get("routing_weights"))
                record(index, indices, weights)

            handles.append(_experts_module(model_type, block).register_forward_pre_hook(experts_hook,
                                                                                        with_kwargs=True))
    try:
        yield captured
    finally:
        for handle in handles:
            handle.remove()


# --------------------------------------------------------------------------------------------------------------
# Balance loss
# --------------------------------------------------------------------------------------------------------------

_ADDS_BALANCE_LOSS = frozenset({
    "minimax_m2", "minimax_m3_vl_text", "ernie4_5_moe", "gpt_oss", "granitemoe", "granitemoeshared",
    "granitemoehybrid", "granitemoe_swa", "phimoe", "laguna",
})


def causal_lm_adds_balance_loss(model_type: str) -> bool:
    """Whether the type's ``*ForCausalLM.forward`` adds ``router_aux_loss_coef × load_balancing_loss_func(...)``.

    It does so when ``output_router_logits`` is on (and adds it to the loss when labels are given), with
    ``(outputs.router_logits, num_experts, num_experts_per_tok, attention_mask)``.  The DeepSeek-V3-style,
    Llama 4, Aria, AFMoE, LongCat, Kolibri, Inkling, Inkling2, HY-V3/V4, Ergo and Gemma 4 causal LMs add no balance
    loss.  JetMoE adds ``aux_loss_coef ×`` the same function over the logits of *every* ``JetMoeTopKGating`` — the
    attention mixture's too, in call order — so it is not in this set (its test pools them itself).
    """
    return _canonical(model_type) in _ADDS_BALANCE_LOSS


def oracle_balance_loss(router_logits_per_layer: Sequence[torch.Tensor], chosen_per_layer: Sequence[torch.Tensor],
                        num_experts: int, top_k: int, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """transformers' ``load_balancing_loss_func`` in float64, counting the ACTUAL chosen experts.

    Per layer: P = softmax(router logits) over all experts (also for sigmoid routers: the file applies softmax to
    whatever logits the routers returned); the file's own count takes ``topk(P, top_k)``, this one the given
    ``chosen_per_layer`` [N, top_k].  Counts and probability sums are accumulated over all layers (padding rows
    weighted 0 by the flat ``attention_mask`` [B, S]), each divided by the total number of kept rows over all
    layers; loss = num_experts × Σ_e f_e · P_e.
    """
    counts = torch.zeros(num_experts, dtype=torch.float64)
    probability = torch.zeros(num_experts, dtype=torch.float64)
    rows = torch.zeros((), dtype=torch.float64)
    for logits, chosen in zip(router_logits_per_layer, chosen_per_layer, strict=True):
        logits = logits.detach().reshape(-1, logits.shape[-1]).to("cpu", torch.float64)
        chosen = chosen.detach().reshape(logits.shape[0], -1).to("cpu", torch.int64)
        if chosen.shape[1] != top_k:
            raise ValueError(f"oracle_balance_loss: {chosen.shape[1]} chosen experts per token, top_k={top_k}")
        keep = (torch.ones(logits.shape[0], dtype=torch.float64) if attention_mask is None
                else attention_mask.detach().reshape(-1).to("cpu", torch.float64))
        counts.index_add_(0, chosen.reshape(-1), keep.repeat_interleave(top_k))
        probability += (torch.softmax(logits, dim=-1) * keep[:, None]).sum(dim=0)
        rows += keep.sum()
    return num_experts * ((counts / rows) * (probability / rows)).sum()
