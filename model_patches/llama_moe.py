"""LLaMA-MoE (moepatch's transformers-5 implementation in ``moepatch.models.llama_moe``; published class names).

``model.layers[i].mlp`` is a ``LinearGLUMoELayer``: router ``mlp.gate`` (``TopKBalancedNoisyGate``: MLP
``gate_network`` Linear → Tanh → Linear, learned noise ``weight_noise`` in training only), experts
``mlp.calculator.experts`` (``LinearGLUExperts``: ``ParameterList``s ``weight_gate`` / ``weight_up`` /
``weight_down`` of ``[out, in]`` tensors).  The gate takes the top-(k+1) of its (noisy) logits through its
``select_experts`` seam, softmaxes the k chosen logits (the router probabilities: 0 for other experts) and returns
the published dict (``topK_indices``, ``topK_scores``, ``balance_loss``, ``load``, ``importance``).  Its CV²
balance loss is computed from the chosen experts, so it follows any routing override.  A remote-code copy that runs
is recognised by the same class names; as it has no ``select_experts`` seam, a routing override binds moepatch's gate
``forward`` (which routes through the seam) onto its gate instances, after checking their published attributes.
"""

from model_patches.registry import register
from model_patches.spec import FamilySpec
from model_patches.spec import RouterOutput
from model_patches.spec import RoutingRule

LLAMA_MOE = register(
    FamilySpec(
        name="llama_moe",
        model_types=("llama_moe",),
        block_classes=("LinearGLUMoELayer",),
        routing=RoutingRule(renormalize=True, weights_dtype="logits"),
        experts_attr="calculator.experts",
        router_output=RouterOutput(
            scores="topK_scores", scores_are="topk_probabilities", weights="topK_scores", indices="topK_indices"
        ),
        top_k_attr="num_selects",
        selection_method="select_experts",
        selection_kind="logits_top_k_plus_one",
        router_expert_parameters=("gate_network.2.weight", "weight_noise.weight"),
        per_expert_config=("size_experts",),
        expert_storage="parameter_list",
        seam_donor="moepatch.models.llama_moe.modeling_llama_moe:TopKBalancedNoisyGate",
        aux_loss_coef_attr=None,
        training_switches=(
            ("gate_noise", "gate_add_noise"),
            ("balance_loss", "gate_use_balance"),
            ("aux_loss_coef", "gate_balance_loss_weight"),
        ),
        gate_substring_note=(
            "router mlp.gate.gate_network.{0,2}.weight and noise projection mlp.gate.weight_noise.weight; experts' "
            "SwiGLU gate projections mlp.calculator.experts.weight_gate.{e}"
        ),
    )
)
