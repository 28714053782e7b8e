"""DBRX in transformers 5 (``transformers/models/dbrx/modeling_dbrx.py``, v5.24.0).

Layers at ``transformer.blocks``; each block's ``ffn`` is a ``DbrxFFN``.  Its router ``ffn.router`` (``DbrxRouter``)
is only a bias-free ``nn.Linear`` ``layer`` (``[E, H]``) and returns the logits; the *block* chooses the experts in
``DbrxFFN.route_tokens_to_experts``: softmax over all experts in the logits' dtype, top-``k`` (``k`` = the block's
``top_k``, ``ffn_config.moe_top_k``), then division by the ``moe_normalize_expert_weights``-norm of the k weights
(1: renormalisation, ``None``: none; other norms are refused).  Experts ``ffn.experts.mlp`` (``DbrxExpertGLU``) keep
``w1`` / ``v1`` / ``w2`` as ``[E·I, H]`` stacks of rows.

What this means for moepatch: gate freezing, the structure view and exact ``remove()`` work; routing statistics and
routing overrides (C2R) need the chosen experts in a router's output and are refused; LoRA experts cannot adapt the
row-stacked experts and are refused on them.
"""

from model_patches.registry import register
from model_patches.spec import FamilySpec
from model_patches.spec import RouterRequirement
from model_patches.spec import RoutingRule

DBRX = register(
    FamilySpec(
        name="dbrx",
        model_types=("dbrx",),
        block_classes=("DbrxFFN",),
        routing=RoutingRule(renormalize="^moe_normalize_expert_weights", weights_dtype="logits",
                            softmax_dtype="logits"),
        layers_attr="blocks",
        block_attr="ffn",
        router_attr="router",
        num_experts_attr="layer.out_features",
        top_k_attr="^top_k",
        hidden_dim_attr="hidden_size",
        router_weight_attr="layer.weight",
        router_requirements=(
            RouterRequirement(
                attribute="^moe_normalize_expert_weights",
                allowed=(None, 1, 1.0),
                reason="the top-k weights are divided by their L{value} norm; only none or L1 (renormalisation) "
                       "is softmax → top-k",
            ),
        ),
        selection_outside_router=(
            "DbrxRouter returns only the logits and DbrxFFN.route_tokens_to_experts (a method, not a module) "
            "chooses the experts, so no router output carries the choice and no router-level selection step exists"
        ),
        expert_storage="stacked_rows",
        training_switches=(("balance_loss", "output_router_logits"),),
        gate_substring_note="nothing: DBRX names no parameter 'gate' (router ffn.router.layer, experts w1/v1/w2)",
    )
)
