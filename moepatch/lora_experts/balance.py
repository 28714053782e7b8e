"""Load balancing (and router z-loss) of the LoRA-expert routers, joined to the model's loss in training.

The balance term is the Switch / Mixtral form ``N · Σ_e f_e · P_e`` (``f_e``: share of the top-k selections that went
to expert e, ``Σ f = 1``; ``P_e``: mean router probability), over **non-padding tokens only** — moepatch's fix, MoLA
counts padding.  ``balance_loss.reduction`` says which rows form one term and how terms add up:

* ``"layer"`` (default, MoLA's ``obalance``, Gao et al., 2024): per decoder layer, the rows of **all** adapted
  projections of the layer are pooled (their logits concatenated along the token axis, with their top-k choices) into
  one term with the layer's expert count N; the terms are summed over layers.  Routers of routed-expert sets belong
  to their decoder layer too.  Without padding this is exactly MoLA's value.  A layer whose routers do not all have
  the same expert count and top-k cannot be concatenated: its term is the sum of one term per router.  A router
  outside the decoder layers is a term of its own.
* ``"sum"`` / ``"mean"``: one term per router (per adapted module, per routed expert), summed or averaged.  ``"sum"``
  is GuiLoMo's stage-2 loss (Zhang et al., 2025, ``MoLA_con``): every module its own term with its own N, also where
  a layer's routers share (N, k) — which ``"layer"`` would pool into one term instead (common after GuiLoMo's
  ``max(2, ·)`` clipping of the searched counts), so GuiLoMo's stage-2 recipe and importer use ``"sum"``.

The optional z-loss is the mean squared log-sum-exp of the router logits, one term per router (averaged for
``"mean"``, summed otherwise).  A forward hook on the causal LM adds ``coef · balance + z_coef · z`` to
``output.loss`` when the model is training and a loss was computed; the last values are kept on the handle-visible
attribute ``lora_experts_aux`` of the model.
"""

from __future__ import annotations

from collections.abc import Callable
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from moepatch.lora_experts.config import LoraExpertsConfig
from moepatch.lora_experts.layers import ExpertRouter
from moepatch.routing.attention_mask import AttentionMaskReader
from moepatch.routing.aux_loss import switch_balance_loss

AUX_ATTRIBUTE = "lora_experts_aux"
"""Attribute of the causal LM holding the last training forward's balance / z-loss values."""


@dataclass
class RouterRows:
    """What one router saw in the last forward: ``logits [T, N]``, ``indices [T, k]`` (``None``: dense router) and
    the real-token ``mask [T]`` (``None``: every row counts)."""

    logits: torch.Tensor
    indices: torch.Tensor | None
    mask: torch.Tensor | None


def router_balance_loss(logits: torch.Tensor, indices: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """``N · Σ_e f_e P_e`` of one router (``f`` per selection): ``logits [T, N]``, ``indices [T, k]``, ``mask [T]``
    (True = real token)."""
    return pooled_balance_loss([RouterRows(logits, indices, mask)])


def _choices(rows: RouterRows) -> torch.Tensor:
    """The top-k choices ``[T, k]`` of a router that has them (a dense router has no balance term)."""
    if rows.indices is None:
        raise ValueError("balance loss: a dense router (no top-k choices) has no balance term")
    return rows.indices


def pooled_balance_loss(rows: Sequence[RouterRows]) -> torch.Tensor:
    """One Switch term over the rows of several routers with the same expert count and top-k, pooled (MoLA's
    concatenation of a layer's router logits)."""
    return switch_balance_loss([r.logits.float() for r in rows], [_choices(r) for r in rows],
                               rows[0].logits.shape[-1], [r.mask for r in rows], per_choice=True)


def layer_balance_loss(rows: Sequence[RouterRows]) -> torch.Tensor:
    """The term of one decoder layer: its routers pooled when they share expert count and top-k, else the sum of one
    term per router."""
    shapes = {(r.logits.shape[-1], _choices(r).shape[-1]) for r in rows}
    if len(shapes) == 1:
        return pooled_balance_loss(rows)
    return torch.stack([pooled_balance_loss([r]) for r in rows]).sum()


def balance_loss(rows: Sequence[RouterRows], layers: Sequence[int | None], reduction: str) -> torch.Tensor:
    """The balance value of the routers' ``rows`` (``layers``: each router's decoder layer) under ``reduction``."""
    if reduction != "layer":
        terms = torch.stack([pooled_balance_loss([r]) for r in rows])
        return terms.sum() if reduction == "sum" else terms.mean()
    groups: dict[Any, list[RouterRows]] = {}
    for index, (row, layer) in enumerate(zip(rows, layers, strict=True)):
        groups.setdefault(("router", index) if layer is None else layer, []).append(row)
    return torch.stack([layer_balance_loss(group) for group in groups.values()]).sum()


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


def router_layers(model: nn.Module, routers: Sequence[ExpertRouter], layer_of: Callable[[str], int | None]
                  ) -> list[int | None]:
    """The decoder layer of each router, from its module path in ``model`` (``None``: outside the layers)."""
    paths = {id(module): path for path, module in model.named_modules()}
    return [layer_of(paths[id(router)]) if id(router) in paths else None for router in routers]


def _collect(routers: Sequence[ExpertRouter], attention_mask: Any) -> list[tuple[int, RouterRows]]:
    """(position, rows) of every router that ran, emptying them for the next forward."""
    collected = []
    for position, router in enumerate(routers):
        if router.last_logits is None:
            continue
        logits = router.last_logits.reshape(-1, router.num_experts)
        chosen = router.last_indices
        indices = None if chosen is None else chosen.reshape(-1, chosen.shape[-1])
        mask = _token_mask(attention_mask, logits, router.last_tokens)
        own = getattr(router, "last_rows", None)  # routed-expert sets share their rows: this router's own rows
        if own is not None:
            mask = own if mask is None else mask & own
        collected.append((position, RouterRows(logits, indices, mask)))
        router.last_logits = router.last_indices = router.last_tokens = router.last_rows = None  # refilled
    return collected


def install_balance_hook(model: nn.Module, routers: list[ExpertRouter], config: LoraExpertsConfig,
                         layer_of: Callable[[str], int | None]) -> Any:
    """Register the loss hook on ``model`` (the causal LM); ``layer_of`` maps a module path of ``model`` to its
    decoder layer (:func:`model_patches.structure.layer_indexer`).  Returns the hook handle."""
    balance, z_coef = config.balance_loss, config.z_loss_coef
    layers = router_layers(model, routers, layer_of)
    read_mask = AttentionMaskReader(model.forward)

    def hook(module: nn.Module, args: tuple, kwargs: dict, output: Any) -> Any:
        if not module.training or not any(router.last_logits is not None for router in routers):
            return output
        collected = _collect(routers, read_mask(args, kwargs))
        total = None
        values: dict[str, torch.Tensor] = {}
        balanced = [(position, rows) for position, rows in collected if rows.indices is not None]
        if balance is not None and balanced:
            values["balance_loss"] = balance_loss([rows for _, rows in balanced],
                                                  [layers[position] for position, _ in balanced], balance.reduction)
            total = balance.coef * values["balance_loss"]
        if z_coef:
            stacked = torch.stack([router_z_loss(rows.logits, rows.mask) for _, rows in collected])
            values["z_loss"] = stacked.mean() if balance is not None and balance.reduction == "mean" else stacked.sum()
            total = z_coef * values["z_loss"] if total is None else total + z_coef * values["z_loss"]
        module.__dict__[AUX_ATTRIBUTE] = {key: value.detach() for key, value in values.items()}
        loss = output.get("loss") if hasattr(output, "get") else None
        if total is not None and loss is not None:
            output["loss"] = loss + total.to(loss.device, loss.dtype)
        return output

    return model.register_forward_hook(hook, with_kwargs=True)
