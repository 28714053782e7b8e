"""JetMoE (``transformers/models/jetmoe/modeling_jetmoe.py``, v5.25).

Every ``model.layers[i].mlp`` is a ``JetMoeMoE``.  Router ``mlp.router`` (``JetMoeTopKGating``, its logits from the
bias-free linear ``layer`` ``[E, H]``, cast to float32): top-k of the logits (sorted), softmax over the k chosen
logits, cast to the hidden states' dtype.  It hands its experts the (token, slot) pairs sorted by expert —
``(index_sorted_experts, batch_index, batch_gates, expert_size, logits)`` (:mod:`model_patches.expert_sorted`) — and
the experts are two ``JetMoeParallelExperts`` (``input_linear`` gate and up in one, ``output_linear``; ``weight [E,
out, in]``) called with those rows.  The attention is a mixture of experts too (``self_attention.experts``, a
``JetMoeMoA`` with its own ``JetMoeTopKGating``): its routers are frozen with the others and pooled into the balance
loss as transformers pools them (every ``JetMoeTopKGating`` output is recorded), but statistics and routing
overrides act on the MLP mixture only.  The causal LM adds ``aux_loss_coef × load_balancing_loss_func`` with
``output_router_logits``.
"""

from model_patches import expert_sorted
from model_patches.registry import register
from model_patches.spec import FamilySpec
from model_patches.spec import RouterOutput
from model_patches.spec import RoutingRule

JETMOE = register(
    FamilySpec(
        name="jetmoe",
        model_types=("jetmoe",),
        block_classes=("JetMoeMoE",),
        routing=RoutingRule(logits_cast="float32", score="logits", score_dtype="logits",
                            weights_from="softmax_of_chosen", weights_dtype="input", expert_sorted=True),
        router_attr="router",
        experts_attr="input_linear",
        router_output=RouterOutput(scores=4, reader=expert_sorted.read),
        router_weight_attr="layer.weight",
        expert_modules=("input_linear", "output_linear"),
        expert_storage="parallel",
        extra_routers=("self_attention.experts.router",),
        aux_loss_coef_attr="aux_loss_coef",
        training_switches=(("balance_loss", "output_router_logits"), ("aux_loss_coef", "aux_loss_coef")),
        gate_substring_note=("nothing: JetMoE names no parameter 'gate' (routers mlp.router.layer and "
                             "self_attention.experts.router.layer, experts input_linear / output_linear)"),
    )
)
