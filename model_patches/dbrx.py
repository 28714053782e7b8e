"""DBRX in transformers 5 (``transformers/models/dbrx/modeling_dbrx.py``, v5.24.0).

Layers at ``transformer.blocks``; each block's ``ffn`` is a ``DbrxFFN``.  Its router ``ffn.router`` (``DbrxRouter``)
is only a bias-free ``nn.Linear`` ``layer`` (``[E, H]``) and returns the logits; the *block* chooses the experts in
``DbrxFFN.route_tokens_to_experts``: softmax over all experts in the logits' dtype, top-``k`` (``k`` = the block's
``top_k``, ``ffn_config.moe_top_k``), then division by the ``moe_normalize_expert_weights``-norm of the k weights
(1: renormalisation, ``None``: none; other norms are refused).  Experts ``ffn.experts.mlp`` (``DbrxExpertGLU``) keep
``w1`` / ``v1`` / ``w2`` as ``[E·I, H]`` stacks of rows.

What this means for moepatch: the router's output is the logits and the choice is read where the block hands it to
its experts (``experts(hidden, top_k_index, top_k_weights)``), so routing statistics and the balance loss on the
actual choice see the experts really used; a routing override (C2R) replaces ``route_tokens_to_experts`` on the
block instance (softmax in the logits' dtype, the selector, division by ``torch.norm(p=1)``); LoRA experts run
inside the experts' per-expert loop (:mod:`model_patches.expert_storage.stacked_rows`); renumbering experts moves
blocks of ``ffn_hidden_size`` rows.
"""

from model_patches.registry import register
from model_patches.spec import BlockSelection
from model_patches.spec import FamilySpec
from model_patches.spec import RouterRequirement
from model_patches.spec import RoutingRule

DBRX = register(
    FamilySpec(
        name="dbrx",
        model_types=("dbrx",),
        block_classes=("DbrxFFN",),
        routing=RoutingRule(renormalize="^moe_normalize_expert_weights", weights_dtype="logits",
                            score_dtype="logits", renormalize_with="l1_norm"),
        layers_attr="blocks",
        block_attr="ffn",
        router_attr="router",
        num_experts_attr="layer.out_features",
        top_k_attr="^top_k",
        router_weight_attr="layer.weight",
        router_requirements=(
            RouterRequirement(
                attribute="^moe_normalize_expert_weights",
                allowed=(None, 1, 1.0),
                reason="the top-k weights are divided by their L{value} norm; only none or L1 (renormalisation) "
                       "is softmax → top-k",
            ),
        ),
        selection_in_block=BlockSelection(method="route_tokens_to_experts", indices_argument=(1, "top_k_index"),
                                          weights_argument=(2, "top_k_weights")),
        expert_modules=("experts.mlp",),
        expert_storage="stacked_rows",
        training_switches=(("balance_loss", "output_router_logits"), ("aux_loss_coef", "ffn_config.moe_loss_weight")),
        gate_substring_note="nothing: DBRX names no parameter 'gate' (router ffn.router.layer, experts w1/v1/w2)",
    )
)
