"""Gemma 4 text (``transformers/models/gemma4/modeling_gemma4.py``, v5.25).

With ``enable_moe_block`` every ``Gemma4TextDecoderLayer`` holds, beside its dense ``mlp``, a ``router``
(``Gemma4TextRouter``) and ``experts`` (``Gemma4TextExperts``, fused ``gate_up_proj [E, 2I, H]`` / ``down_proj
[E, H, I]``); the layer runs the dense MLP and the experts on the same residual and adds their (normalised) outputs.
There is no MoE block module: the sparse block is the decoder layer itself (``block_attr=""``), and the dense ``mlp``
is its always-on shared expert.  The router: its input RMS-normalised without a scale, × the learned per-channel
``scale`` × ``hidden_size^-0.5``, the linear ``proj`` ``[E, H]``, float32 softmax over all experts, ``torch.topk``
(sorted), renormalised, × ``per_expert_scale[top_k_index]``; it returns ``(probabilities, weights, indices)``.
``proj.weight`` and ``per_expert_scale`` follow an expert renumbering (``scale`` is per hidden unit).  The causal LM
adds no load-balancing loss.
"""

from torch import nn

from model_patches.registry import register
from model_patches.spec import FamilySpec
from model_patches.spec import RouterOutput
from model_patches.spec import RoutingRule


class Gemma4TextSpec(FamilySpec):
    """A decoder layer is a sparse block only when it holds the router (``enable_moe_block``): the class is the same
    with or without one."""

    def is_sparse_block(self, module: nn.Module) -> bool:
        return super().is_sparse_block(module) and isinstance(getattr(module, self.router_attr, None), nn.Module)


GEMMA4_TEXT = register(
    Gemma4TextSpec(
        name="gemma4_text",
        model_types=("gemma4_text",),
        block_classes=("Gemma4TextDecoderLayer",),
        routing=RoutingRule(input_norm="norm", input_scales=("scale", "scalar_root_size"), renormalize=True,
                            weights_dtype="float32", expert_scale="per_expert_scale"),
        block_attr="",
        router_attr="router",
        router_output=RouterOutput(scores_are="probabilities"),
        num_experts_attr="proj.out_features",
        top_k_attr="config.top_k_experts",
        router_weight_attr="proj.weight",
        router_expert_parameters=("proj.weight", "per_expert_scale"),
        shared_expert_attrs=("mlp",),
        aux_loss_coef_attr=None,
        training_switches=(),
        gate_substring_note=("the dense mlp.gate_proj, the fused experts.gate_up_proj (gate AND up halves) and the "
                             "per-layer-input per_layer_input_gate (not a router); the router (router.proj) has no "
                             "'gate' in its name"),
    )
)
