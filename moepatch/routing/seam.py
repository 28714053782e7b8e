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
from typing import Any
from typing import ClassVar
from typing import Protocol

import torch
from torch import nn

from model_patches.routing_rule import ExpertSelector
from model_patches.routing_rule import RouterSettings
from model_patches.routing_rule import decide
from model_patches.routing_rule import execute
from model_patches.routing_rule import route
from model_patches.routing_rule import router_settings
from model_patches.routing_rule import select_topk
from model_patches.routing_rule import selection_bias_of
from model_patches.routing_rule import vanilla_selector
from model_patches.spec import RoutingRule

if TYPE_CHECKING:
    from model_patches.spec import FamilySpec
    from model_patches.structure import MoELayer
    from model_patches.structure import MoEModel
    from moepatch.undo import UndoLog

SelectorFactory = Callable[["MoELayer"], ExpertSelector]
"""Builds the selection step of one MoE layer (C2R needs the layer's own collaboration table)."""

__all__ = ["ExpertSelector", "SelectorFactory", "block_selection", "layer_settings", "override_selection", "route",
           "routed_forward", "seam_donor", "select_topk", "selection_seam_problem", "vanilla_selector"]


def routed_forward(
    router: nn.Module, block: nn.Module | None, rule: RoutingRule, settings: RouterSettings, selector: ExpertSelector,
) -> Callable[..., tuple[torch.Tensor, ...]]:
    """A replacement ``forward`` for one router instance: the family's rule run by
    :func:`model_patches.routing_rule.execute` with ``selector`` choosing.

    Keeps the router's call signature: ``(hidden_states)``, ``(hidden_states, selection_bias)`` where the block
    passes the bias (:attr:`RoutingRule.selection_bias_argument`), or ``(hidden_states, router_states=...)`` where the
    family's :attr:`RoutingRule.logits_function` reads further arguments (ZAYA's router state, handed from layer to
    layer).  The logit weight and the selection bias are read at call time (they follow ``.to()`` and a bias update).
    """

    def forward(self: nn.Module, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> tuple[torch.Tensor, ...]:
        position = rule.selection_bias_argument
        if position is not None and len(args) >= position:
            bias = args[position - 1]
        else:
            bias = selection_bias_of(rule, self, block)
        return execute(rule, settings, self, hidden_states, selector=selector, bias=bias, call_args=args,
                       call_kwargs=kwargs)

    return types.MethodType(forward, router)


def block_selection(
    block: nn.Module, rule: RoutingRule, settings: RouterSettings, selector: ExpertSelector
) -> Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]:
    """A replacement for the sparse block's own selection method (:class:`~model_patches.spec.BlockSelection`):
    ``(router_logits [N, E]) -> (weights [N, k], indices [N, k])`` by the family's rule, with ``selector`` choosing
    (a product-key rule's ``router_logits`` are the block's ``[2, N, √E]`` view of its key scores)."""

    def choose(self: nn.Module, router_logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return decide(rule, settings, router_logits, input_dtype=router_logits.dtype, selector=selector)

    return types.MethodType(choose, block)


def layer_settings(model: MoEModel, layer: MoELayer) -> RouterSettings:
    """The family's rule values of one layer's router (read at patch time)."""
    spec = model.family
    return router_settings(spec.routing, layer.router, layer.block, top_k=model.top_k,
                           weight_attr=spec.router_weight_attr)


def override_selection(
    model: MoEModel, selector_for: SelectorFactory, layers: list[int] | None, undo: UndoLog
) -> list[str]:
    """Replace the selection step of the routers of ``layers`` (absolute indices; ``None`` = all MoE layers).

    Only the router instances are touched (their ``forward``, or the family's ``selection_method``) or, where the
    block chooses, the block instance (its selection method, and its ``forward`` where the family's
    :attr:`~model_patches.spec.BlockSelection.forward` moves an inline selection into that method); the change is
    recorded in ``undo``.
    Returns the qualified names of the patched routers.
    """
    spec = model.family
    chosen = model.layers if layers is None else [model.layer(i) for i in layers]
    chosen = [layer for layer in chosen if layer.index not in model.hashed_layers]  # no learned choice to override
    patched = []
    for layer in chosen:
        router = layer.router
        if spec.selection_in_block is not None:  # the block chooses from the router's logits: replace its method
            selection = spec.selection_in_block
            method = block_selection(layer.block, spec.routing, layer_settings(model, layer), selector_for(layer))
            if selection.forward is not None:  # the block chooses inline: the family's forward calls the method
                undo.set_attribute(layer.block, "forward", types.MethodType(selection.forward, layer.block))
            undo.set_attribute(layer.block, selection.method, method)
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
        forward = routed_forward(router, layer.block, spec.routing, layer_settings(model, layer), selector_for(layer))
        undo.set_attribute(router, "forward", forward)
        patched.append(f"{layer.name}.{spec.router_attr}")
    return patched


class SeamDonor(Protocol):
    """A family's ``seam_donor`` class: moepatch's router whose ``forward`` has the selection seam, the helpers that
    forward calls (copied onto a router lacking them) and the check that a router can take that forward."""

    SEAM_HELPERS: ClassVar[tuple[str, ...]]

    def forward(self, *args: Any, **kwargs: Any) -> Any: ...

    @classmethod
    def seam_problem(cls, router: nn.Module) -> str | None: ...


def seam_donor(spec: FamilySpec) -> type[SeamDonor]:
    """The family's ``seam_donor`` class (imported on demand)."""
    module_name, _, class_name = (spec.seam_donor or "").partition(":")
    return getattr(importlib.import_module(module_name), class_name)


def selection_seam_problem(spec: FamilySpec, router: nn.Module, block: nn.Module | None = None) -> str | None:
    """Why a routing override cannot reach the selection step of ``router`` (in sparse block ``block``), or ``None``
    (checked before any change)."""
    if spec.selection_in_block is not None:
        selection = spec.selection_in_block
        if block is not None and selection.forward is not None:  # the family's forward brings the step along
            return None if selection.forward_problem is None else selection.forward_problem(block)
        if block is None or not callable(getattr(block, selection.method, None)):
            return f"{type(block).__name__} has no `{selection.method}` selection step"
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
