"""Llama 4 text (``transformers/models/llama4/modeling_llama4.py``, v5.25).

``Llama4ForCausalLM.model.layers[i].feed_forward`` is a ``Llama4TextMoe`` for ``i`` in ``config.moe_layers`` (a
dense ``Llama4TextMLP`` otherwise).  Router ``feed_forward.router`` (``Llama4Router``, an ``nn.Linear`` ``[E, H]``):
top-k of the logits (sorted), then the chosen logits are scattered into an ``[N, E]`` matrix of ``-inf`` and passed
through a float32 sigmoid: the router returns ``(scores [N, E], logits)``, 0 for experts not chosen, and the block
scales **every** expert's input by that matrix (``experts`` runs all experts on all tokens; the always-on
``shared_expert`` is added).  Statistics read the choice from that dense matrix (its ``k`` largest entries).  The
experts (``gate_up_proj [E, H, 2I]``, one batched matmul over all experts) are the ``"scaled_dense"`` expert storage:
LoRA experts on them run on the rows the router sent each expert (:mod:`model_patches.expert_storage.scaled_dense`).
The causal LM adds no load-balancing loss.
"""

from model_patches.registry import register
from model_patches.spec import FamilySpec
from model_patches.spec import RouterOutput
from model_patches.spec import RoutingRule

LLAMA4 = register(
    FamilySpec(
        name="llama4",
        model_types=("llama4_text",),
        block_classes=("Llama4TextMoe",),
        routing=RoutingRule(score="logits", weights_from="sigmoid_of_chosen", dense_weights=True),
        block_attr="feed_forward",
        router_attr="router",
        router_output=RouterOutput(scores=1, scores_are="sigmoid_logits", weights=0, indices=None),
        shared_expert_attrs=("shared_expert",),
        expert_storage="scaled_dense",
        aux_loss_coef_attr=None,
        training_switches=(),
        gate_substring_note="fused experts feed_forward.experts.gate_up_proj; dense and shared MLPs' gate_proj",
    )
)
