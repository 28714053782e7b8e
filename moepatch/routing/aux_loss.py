"""Load-balancing loss on the experts actually chosen.

transformers' MoE causal LMs (Qwen2-MoE, Mixtral, Qwen3-MoE, OLMoE, ... v5.24) add ``router_aux_loss_coef *
load_balancing_loss_func(router_logits, E, k, attention_mask)`` to the loss when ``output_router_logits`` is on, and
that function **recomputes vanilla top-k from the logits**. Under a routing override (C2R) the experts that really
receive the tokens differ, so the "fraction of tokens per expert" term is wrong.
:func:`install_actual_choice_aux_loss` wraps the causal LM's ``forward`` on the instance: the original forward runs
with ``output_router_logits=False`` (so transformers computes no loss term and records no logits), router hooks
collect each layer's ``(router_logits, top_k_index)`` (:func:`~moepatch.routing.tap.tap_routing`), and the same
Switch-Transformer formula is evaluated with the real choices; ``loss``, ``aux_loss`` and ``router_logits`` of the
output are filled exactly where transformers puts them. With vanilla routing the result equals transformers' value
(tested).  A family whose causal LM has its own formula (:attr:`~model_patches.spec.FamilySpec.balance_loss`: Doge's
product-key loss, normalised per choice) keeps it, fed the real choices.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import types
from collections.abc import Sequence
from typing import Any
from typing import cast

import torch
from torch import nn

from model_patches.structure import MoELayer
from model_patches.structure import MoEModel
from model_patches.structure import extra_routers
from moepatch.routing.attention_mask import AttentionMaskReader
from moepatch.routing.tap import tap_routing
from moepatch.undo import UndoLog


def switch_balance_loss(
    router_logits: Sequence[torch.Tensor],
    selected_experts: Sequence[torch.Tensor],
    num_experts: int,
    row_masks: Sequence[torch.Tensor | None] | None = None,
    *,
    per_choice: bool = False,
) -> torch.Tensor:
    """The Switch-Transformer balance loss ``E · Σ_e f_e · P_e`` over the rows of several routers pooled together.

    The one implementation of the balance loss in moepatch: the MoE model's (all layers pooled, as transformers'
    ``load_balancing_loss_func``) and the LoRA-expert routers' (one router or one decoder layer's routers pooled).

    Args:
        router_logits (`Sequence[torch.Tensor]`): per router, ``[R, E]`` logits (gradients flow through).
        selected_experts (`Sequence[torch.Tensor]`): per router, ``[R, k]`` experts chosen for each row.
        num_experts (`int`): ``E``.
        row_masks (`Sequence[torch.Tensor | None]`, *optional*): per router, ``[R]`` (1 / True = a real token);
            padding rows count in neither ``f`` nor ``P``.
        per_choice (`bool`, *optional*, defaults to `False`): ``f_e`` as the share of all ``R·k`` selections
            (Switch / MoLA, ``Σ f = 1``); ``False``: selections per row (transformers, ``Σ f = k``).

    Returns:
        `torch.Tensor`: the scalar loss, in the same order of operations as transformers 5.24's
        ``load_balancing_loss_func`` so that the model's vanilla choices reproduce its value.
    """
    device = router_logits[0].device
    # histc avoids bincount's host sync; CPU/MPS need floats, CUDA integers for determinism (as transformers does).
    histc_dtype = torch.float32 if device.type in ("cpu", "mps") else torch.int32
    tokens_per_expert_sum = torch.zeros(num_experts, dtype=torch.float32, device=device)
    router_prob_sum = torch.zeros(num_experts, dtype=torch.float32, device=device)
    total_rows: torch.Tensor | float = 0.0
    masks = list(row_masks) if row_masks is not None else [None] * len(router_logits)
    choices = selected_experts[0].shape[-1]
    for logits, chosen, mask in zip(router_logits, selected_experts, masks, strict=True):
        routing_weights = torch.nn.functional.softmax(logits.to(device), dim=-1)  # [R, E]
        chosen = chosen.to(device)  # [R, k]
        if mask is None:
            tokens_per_expert_sum = tokens_per_expert_sum + torch.histc(
                chosen.reshape(-1).to(histc_dtype), bins=num_experts, min=0, max=num_experts
            )
            router_prob_sum = router_prob_sum + routing_weights.float().sum(dim=0)
            total_rows = total_rows + routing_weights.shape[0]
        else:
            keep = mask.reshape(-1).to(device=device, dtype=torch.float32)
            tokens_per_expert_sum = tokens_per_expert_sum + torch.zeros(
                num_experts, dtype=torch.float32, device=device
            ).scatter_add_(0, chosen.reshape(-1), keep.repeat_interleave(chosen.shape[-1]))
            router_prob_sum = router_prob_sum + (routing_weights.float() * keep.unsqueeze(-1)).sum(dim=0)
            total_rows = total_rows + keep.sum()
    if not isinstance(total_rows, float):
        total_rows = total_rows.clamp(min=1)  # every row padding: no loss rather than 0 / 0
    tokens_per_expert = tokens_per_expert_sum / total_rows
    if per_choice:
        tokens_per_expert = tokens_per_expert / choices
    router_prob_per_expert = router_prob_sum / total_rows
    return torch.sum(tokens_per_expert * router_prob_per_expert.unsqueeze(0)) * num_experts


def load_balancing_loss(
    router_logits: Sequence[torch.Tensor],
    selected_experts: Sequence[torch.Tensor],
    num_experts: int,
    attention_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """The MoE model's balance loss over all layers, with ``f`` from the given choices (transformers' formula).

    Args:
        router_logits (`Sequence[torch.Tensor]`): per MoE layer, ``[N, E]`` router logits (gradients flow through).
        selected_experts (`Sequence[torch.Tensor]`): per MoE layer, ``[N, k]`` experts that received each token.
        num_experts (`int`): ``E``.
        attention_mask (`torch.Tensor`, *optional*): ``[batch, seq]``; padding tokens are excluded.
    """
    masks = None if attention_mask is None else [attention_mask] * len(router_logits)
    return switch_balance_loss(router_logits, selected_experts, num_experts, masks)


def _arguments(signature: inspect.Signature, args: tuple, kwargs: dict) -> dict[str, Any]:
    """All call arguments by name (the ``**kwargs`` of the signature flattened in)."""
    bound = signature.bind_partial(*args, **kwargs)
    flat: dict[str, Any] = {}
    for name, value in bound.arguments.items():
        if signature.parameters[name].kind is inspect.Parameter.VAR_KEYWORD:
            flat.update(value)
        else:
            flat[name] = value
    return flat


def _router_only(router: nn.Module) -> MoELayer:
    """An extra router as a layer of its own: no block, no experts (``None``: only its router is read)."""
    none = cast(nn.Module, None)  # MoELayer types a real layer's block and experts
    return MoELayer(-1, "", none, router, none)


def _pooled_routers(model: MoEModel) -> list[MoELayer]:
    """The routers transformers pools into the balance loss: every MoE layer's, and every extra router of the same
    class (transformers records ``router_logits`` by router class: JetMoE's attention-mixture gates are
    ``JetMoeTopKGating`` too).  An extra router is never re-routed, so its actual choice is its own."""
    recorded = {type(layer.router) for layer in model.layers}
    extra = [_router_only(router) for router in extra_routers(model) if type(router) in recorded]
    return list(model.layers) + extra


def install_actual_choice_aux_loss(model: MoEModel, undo: UndoLog) -> bool:
    """Wrap the causal LM's ``forward`` (instance only) so its balance loss uses the chosen experts.

    Returns ``False`` (and changes nothing) when the model computes no balance loss (no
    ``family.aux_loss_coef_attr`` on it, e.g. a bare base model).
    """
    coef_attr = model.family.aux_loss_coef_attr
    causal_lm = model.inner
    scores_are = model.family.router_output.scores_are
    if coef_attr is None or not hasattr(causal_lm, coef_attr) or scores_are not in ("logits", "sigmoid_logits"):
        return False
    own = model.family.balance_loss
    original = causal_lm.forward
    signature = inspect.signature(original)
    read_mask = AttentionMaskReader(original)

    def forward(self: nn.Module, *args: Any, **kwargs: Any) -> Any:
        attention_mask = read_mask(args, kwargs)
        arguments = _arguments(signature, args, kwargs)
        wanted = arguments.get("output_router_logits")
        if wanted is None:
            wanted = getattr(self.config, "output_router_logits", False)
        if not wanted:
            return original(*args, **kwargs)
        return_dict = arguments.pop("return_dict", None)
        arguments["output_router_logits"] = False
        captured: list[tuple[torch.Tensor, torch.Tensor]] = []

        def capture(scores: torch.Tensor, indices: torch.Tensor) -> None:
            captured.append((scores, indices))

        handles = [handle for layer in _pooled_routers(model)
                   for handle in tap_routing(model, layer, capture, raw=own is not None)]
        try:
            outputs = original(**arguments, return_dict=True)
        finally:
            for handle in handles:
                handle.remove()
        if not captured:
            return outputs if return_dict is not False else outputs.to_tuple()
        if own is not None:  # the family's own formula over the router logits it records (Doge's product keys)
            logits = tuple(own.router_logits(c[0]) for c in captured)
            aux = own.loss(logits, [c[1] for c in captured], model.num_experts, model.top_k, attention_mask)
        else:
            logits = tuple(c[0] for c in captured)
            aux = load_balancing_loss(logits, [c[1] for c in captured], model.num_experts, attention_mask)
        loss = outputs.get("loss")
        if loss is not None:
            loss = loss + getattr(self, coef_attr) * aux.to(loss.device)
        # a new output object keeps the fields in transformers' order (matters for return_dict=False tuples)
        outputs = dataclasses.replace(outputs, loss=loss, aux_loss=aux, router_logits=logits)
        return outputs if return_dict is not False else outputs.to_tuple()

    # keep the signature visible: the Trainer drops every batch column the forward does not name
    functools.update_wrapper(forward, getattr(original, "__func__", original))
    undo.set_attribute(causal_lm, "forward", types.MethodType(forward, causal_lm))
    return True
