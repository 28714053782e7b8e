"""MoLM / ModuleFormer (moepatch's transformers-5 implementation in ``moepatch.models.moduleformer``).

``transformer.h[i].mlpf`` is the MLP mixture (class ``MoE``): router ``mlpf.gate`` (``top_k_gating``: an MLP
``w_gate``, softmax over all experts in the activation dtype, top-k of the raw probabilities — no renormalisation,
no scale) returning ``(top_k_indices, top_k_gates, probs)``; experts ``mlpf.experts`` / ``mlpf.output_experts``
(``ParallelExperts``, ``[E, in, out]``).  The selection seam is the gate's ``select_experts(probs, k)``.  The attention
is a mixture too (``attn.q_proj``, same classes): its gate is frozen with the routers, but statistics and routing
overrides act on the MLP mixture only.  MoLM's own aux loss (``mi`` / ``switch``) is computed inside the gate from the
chosen experts, so it already follows any override.
"""

from model_patches.registry import register
from model_patches.spec import FamilySpec
from model_patches.spec import RouterOutput
from model_patches.spec import RoutingRule

MODULEFORMER = register(
    FamilySpec(
        name="moduleformer",
        model_types=("moduleformer",),
        block_classes=("MoE",),
        routing=RoutingRule(renormalize=False, weights_dtype="logits"),
        layers_attr="h",
        block_attr="mlpf",
        router_output=RouterOutput(indices=0, weights=1, scores=2, scores_are="probabilities"),
        selection_method="select_experts",
        extra_routers=("attn.q_proj.gate",),
        identity_projections=("attn.k_proj", "attn.v_proj"),
        router_expert_parameters=("w_gate.3.weight",),
        expert_modules=("experts", "output_experts"),
        expert_storage="parallel",
        aux_loss_coef_attr=None,
        training_switches=(("aux_loss_coef", "aux_loss_weight"),),
        gate_substring_note="MLP router mlpf.gate.w_gate.* and attention-expert router attn.q_proj.gate.w_gate.*",
    )
)
