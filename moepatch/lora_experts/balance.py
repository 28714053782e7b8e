"""Load balancing (and router z-loss) of the LoRA-expert routers, joined to the model's loss in training.

Per adapted module with a top-k router (Switch / Mixtral form, as MoLA): ``N · Σ_e f_e · P_e`` with ``f_e`` the
share of the module's top-k choices that went to expert e and ``P_e`` its mean router probability — both over
**non-padding tokens only** (MoLA counts padding).  Modules are reduced by ``"sum"`` (MoLA) or ``"mean"``.  The
optional z-loss is the mean squared log-sum-exp of the router logits.  A forward hook on the causal LM adds
``coef · balance + z_coef · z`` to ``output.loss`` when the model is training and a loss was computed; the last
values are kept on the handle-visible attribute ``lora_experts_aux`` of the model.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from moepatch.lora_experts.config import LoraExpertsConfig
from moepatch.lora_experts.layers import ExpertRouter
from moepatch.routing.attention_mask import AttentionMaskReader
from moepatch.routing.aux_loss import switch_balance_loss

AUX_ATTRIBUTE = "lora_experts_aux"
"""Attribute of the causal LM holding the last training forward's balance / z-loss values."""


def router_balance_loss(logits: torch.Tensor, indices: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """``N · Σ_e f_e P_e`` of one router (``f`` per selection): ``logits [T, N]``, ``indices [T, k]``, ``mask [T]``
    (True = real token)."""
    return switch_balance_loss([logits.float()], [indices], logits.shape[-1], [mask], per_choice=True)


def router_z_loss(logits: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    z = torch.logsumexp(logits.float(), dim=-1) ** 2
    if mask is None:
        return z.mean()
    keep = mask.to(z.dtype)
    return (z * keep).sum() / keep.sum().clamp(min=1)


def _token_mask(attention_mask: Any, logits: torch.Tensor, tokens: torch.Tensor | None) -> torch.Tensor | None:
    """Real-token mask of the router's rows: all tokens in order, or the rows' token indices (routed experts)."""
    if not isinstance(attention_mask, torch.Tensor) or attention_mask.dim() != 2:
        return None
    flat = attention_mask.reshape(-1).bool().to(logits.device)
    if tokens is not None:
        return flat[tokens.to(flat.device)] if tokens.numel() == logits.shape[0] else None
    return flat if flat.numel() == logits.shape[0] else None


def install_balance_hook(model: nn.Module, routers: list[ExpertRouter], config: LoraExpertsConfig) -> Any:
    """Register the loss hook on ``model`` (the causal LM); returns the hook handle."""
    balance, z_coef = config.balance_loss, config.z_loss_coef
    read_mask = AttentionMaskReader(model.forward)

    def hook(module: nn.Module, args: tuple, kwargs: dict, output: Any) -> Any:
        used = [router for router in routers if router.last_logits is not None]
        if not module.training or not used:
            return output
        attention_mask = read_mask(args, kwargs)
        balance_terms, z_terms = [], []
        for router in used:
            logits = router.last_logits.reshape(-1, router.num_experts)
            mask = _token_mask(attention_mask, logits, router.last_tokens)
            own = getattr(router, "last_rows", None)  # routed-expert sets share their rows: this router's mask
            if own is not None:
                mask = own if mask is None else mask & own
            if balance is not None and router.last_indices is not None:
                indices = router.last_indices.reshape(-1, router.last_indices.shape[-1])
                balance_terms.append(router_balance_loss(logits, indices, mask))
            if z_coef:
                z_terms.append(router_z_loss(logits, mask))
            router.last_logits = router.last_indices = router.last_tokens = router.last_rows = None  # refilled
        total = None
        values: dict[str, torch.Tensor] = {}
        if balance_terms:
            stacked = torch.stack(balance_terms)
            values["balance_loss"] = stacked.sum() if balance.reduction == "sum" else stacked.mean()
            total = balance.coef * values["balance_loss"]
        if z_terms:
            stacked = torch.stack(z_terms)
            values["z_loss"] = stacked.sum() if balance is None or balance.reduction == "sum" else stacked.mean()
            total = z_coef * values["z_loss"] if total is None else total + z_coef * values["z_loss"]
        module.__dict__[AUX_ATTRIBUTE] = {key: value.detach() for key, value in values.items()}
        loss = output.get("loss") if hasattr(output, "get") else None
        if total is not None and loss is not None:
            output["loss"] = loss + total.to(loss.device, loss.dtype)
        return output

    return model.register_forward_hook(hook, with_kwargs=True)
