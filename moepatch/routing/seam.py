"""The routing patch point: the one place where router logits become chosen experts and their weights.

Every supported family hands ``(router_logits, top_k_weights, top_k_index)`` from its router module to its experts
module (or, like DBRX, chooses in a method of the sparse block from the router's logits).  moepatch changes routing
in exactly one way: it replaces the router *instance's* ``forward`` with
:func:`routed_forward` (the block's selection method with :func:`block_selection` where the block chooses), which
reproduces the family's routing rule (:class:`~model_patches.spec.RoutingRule`, applied by
:func:`model_patches.routing_rule.route`) bit for bit
and delegates only the **selection step** (probabilities ``[N, E]`` → ``k`` experts) to an
:data:`ExpertSelector`.  With :func:`select_topk` as the selector the patched router is bit-identical to the
original (tested per family); C2R swaps in a collaboration-constrained selector.

Routing statistics (:class:`~moepatch.routing.recorder.RoutingRecorder`) read the choice where the model hands it
to its experts (:mod:`moepatch.routing.tap`), so they always report the experts actually chosen, after any override
installed here.
"""

from __future__ import annotations

import importlib
import types
from collections.abc import Callable
from typing import TYPE_CHECKING

import torch
from torch import nn

from model_patches.routing_rule import ExpertSelector
from model_patches.routing_rule import choose_experts
from model_patches.routing_rule import route
from model_patches.routing_rule import select_topk
from model_patches.routing_rule import vanilla_selector
from model_patches.spec import RoutingRule
from model_patches.spec import read_attribute

if TYPE_CHECKING:
    from model_patches.spec import FamilySpec
    from model_patches.structure import MoELayer
    from model_patches.structure import MoEModel
    from moepatch.undo import UndoLog

SelectorFactory = Callable[["MoELayer"], ExpertSelector]
"""Builds the selection step of one MoE layer (C2R needs the layer's own collaboration table)."""

__all__ = ["ExpertSelector", "SelectorFactory", "block_selection", "override_selection", "route", "routed_forward",
           "seam_donor", "select_topk", "selection_seam_problem", "vanilla_selector"]

def routed_forward(
    router: nn.Module, *, top_k: int, hidden_dim: int, renormalize: bool, weights_dtype: str, selector: ExpertSelector,
    rule: RoutingRule | None = None, weight_attr: str = "weight",
) -> Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """A replacement ``forward`` for one router instance, keeping the original's signature ``(hidden_states)``.

    ``rule`` supplies the family's logits / softmax dtypes (default: the transformers 5 top-k router's); the logit
    weight is read at call time from the family's ``router_weight_attr`` path ``weight_attr`` (it follows ``.to()``).
    """
    rule = rule or RoutingRule(weights_dtype=weights_dtype)

    def forward(self: nn.Module, hidden_states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return route(
            hidden_states.reshape(-1, hidden_dim),
            read_attribute(self, None, weight_attr),
            top_k=top_k,
            renormalize=renormalize,
            weights_dtype=weights_dtype,
            selector=selector,
            logits_dtype=rule.logits_dtype,
            softmax_dtype=rule.softmax_dtype,
        )

    return types.MethodType(forward, router)


def block_selection(
    block: nn.Module, *, top_k: int, renormalize: bool, rule: RoutingRule, selector: ExpertSelector
) -> Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]:
    """A replacement for the sparse block's own selection method (:class:`~model_patches.spec.BlockSelection`):
    ``(router_logits [N, E]) -> (weights [N, k], indices [N, k])`` by the family's rule, with ``selector`` choosing."""

    def choose(self: nn.Module, router_logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return choose_experts(
            router_logits,
            top_k=top_k,
            renormalize=renormalize,
            weights_dtype=rule.weights_dtype,
            selector=selector,
            softmax_dtype=rule.softmax_dtype,
            renormalize_with=rule.renormalize_with,
        )

    return types.MethodType(choose, block)


def override_selection(
    model: MoEModel, selector_for: SelectorFactory, layers: list[int] | None, undo: UndoLog
) -> list[str]:
    """Replace the selection step of the routers of ``layers`` (absolute indices; ``None`` = all MoE layers).

    Only the router instances are touched (their ``forward``, or the family's ``selection_method``); the change is
    recorded in ``undo``.
    Returns the qualified names of the patched routers.
    """
    spec = model.family
    chosen = model.layers if layers is None else [model.layer(i) for i in layers]
    patched = []
    for layer in chosen:
        router = layer.router
        if spec.selection_in_block is not None:  # the block chooses from the router's logits: replace its method
            method = block_selection(layer.block, top_k=model.top_k, renormalize=model.renormalize,
                                     rule=spec.routing, selector=selector_for(layer))
            undo.set_attribute(layer.block, spec.selection_in_block.method, method)
            patched.append(f"{layer.name}.{spec.router_attr}")
            continue
        if spec.selection_method is not None:  # the router has its own selection seam: replace just that
            if not callable(getattr(router, spec.selection_method, None)):
                donor = seam_donor(spec)  # a remote-code copy without the seam: give it moepatch's forward
                undo.set_attribute(router, "forward", types.MethodType(donor.forward, router))
                for helper in donor.SEAM_HELPERS:
                    if not hasattr(router, helper):
                        undo.set_attribute(router, helper, getattr(donor, helper))
            undo.set_attribute(router, spec.selection_method, selector_for(layer))
            patched.append(f"{layer.name}.{spec.router_attr}")
            continue
        forward = routed_forward(
            router,
            top_k=model.top_k,
            hidden_dim=int(read_attribute(router, layer.block, spec.hidden_dim_attr)),
            renormalize=model.renormalize,
            weights_dtype=spec.routing.weights_dtype,
            selector=selector_for(layer),
            rule=spec.routing,
            weight_attr=spec.router_weight_attr,
        )
        undo.set_attribute(router, "forward", forward)
        patched.append(f"{layer.name}.{spec.router_attr}")
    return patched


def seam_donor(spec: FamilySpec) -> type:
    """The family's ``seam_donor`` class (imported on demand)."""
    module_name, _, class_name = (spec.seam_donor or "").partition(":")
    return getattr(importlib.import_module(module_name), class_name)


def selection_seam_problem(spec: FamilySpec, router: nn.Module, block: nn.Module | None = None) -> str | None:
    """Why a routing override cannot reach the selection step of ``router`` (in sparse block ``block``), or ``None``
    (checked before any change)."""
    if spec.selection_in_block is not None:
        method = spec.selection_in_block.method
        if block is None or not callable(getattr(block, method, None)):
            return f"{type(block).__name__} has no `{method}` selection step"
        return None
    if spec.selection_method is None or callable(getattr(router, spec.selection_method, None)):
        return None
    if spec.seam_donor is None:
        return f"{type(router).__name__} has no `{spec.selection_method}` selection step"
    problem = seam_donor(spec).seam_problem(router)
    if problem is not None:
        name, method = type(router).__name__, spec.selection_method
        return f"{name} has no `{method}` step and moepatch's gate cannot stand in for it: {problem}"
    return None
