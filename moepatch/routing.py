"""The routing patch point: the one place where router logits become chosen experts and their weights.

Every supported family hands ``(router_logits, top_k_weights, top_k_index)`` from its router module to its experts
module.  moepatch changes routing in exactly one way: it replaces the router *instance's* ``forward`` with
:func:`routed_forward`, which reproduces the family's routing rule (:class:`~moepatch.spec.RoutingRule`) bit for bit
and delegates only the **selection step** (probabilities ``[N, E]`` → ``k`` experts) to an
:data:`ExpertSelector`.  With :func:`select_topk` as the selector the patched router is bit-identical to the
original (tested per family); C2R swaps in a collaboration-constrained selector.

Routing statistics (:class:`~moepatch.recorder.RoutingRecorder`) read the router's *output*, so they always report
the experts actually chosen, after any override installed here.
"""

from __future__ import annotations

import importlib
import types
from collections.abc import Callable
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

if TYPE_CHECKING:
    from moepatch.adapter import MoELayer
    from moepatch.adapter import MoEModel
    from moepatch.spec import FamilySpec
    from moepatch.undo import UndoLog

ExpertSelector = Callable[[torch.Tensor, int], "tuple[torch.Tensor, torch.Tensor]"]
"""``selector(probs [N, E] float32, k) -> (chosen_probs [N, k], chosen_index [N, k] int64)``.

``chosen_probs`` must be ``probs`` gathered at ``chosen_index``; renormalisation and the dtype cast are applied
afterwards by the family's routing rule, exactly as the unpatched router does.
"""

SelectorFactory = Callable[["MoELayer"], ExpertSelector]
"""Builds the selector of one MoE layer (C2R needs the layer's own collaboration table)."""


def select_topk(probs: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Vanilla top-k selection, the step every supported router performs."""
    return torch.topk(probs, k, dim=-1)


def route(
    hidden_states: torch.Tensor,
    weight: torch.Tensor,
    *,
    top_k: int,
    renormalize: bool,
    weights_dtype: str,
    selector: ExpertSelector = select_topk,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Reference routing: logits → float32 softmax over all experts → selection → optional renorm → cast.

    Args:
        hidden_states (`torch.Tensor` of shape `[N, H]`): flattened tokens fed to the router.
        weight (`torch.Tensor` of shape `[E, H]`): the router weight.
        top_k (`int`): experts per token.
        renormalize (`bool`): divide the chosen probabilities by their sum.
        weights_dtype (`str`): ``"logits"`` to cast the weights to the logits' dtype, ``"float32"`` to keep them.
        selector (`ExpertSelector`, *optional*, defaults to `select_topk`): the selection step.

    Returns:
        `(router_logits [N, E], top_k_weights [N, k], top_k_index [N, k])`, the transformers 5 router contract.
    """
    router_logits = F.linear(hidden_states, weight)  # [N, E]
    router_probs = torch.softmax(router_logits, dim=-1, dtype=torch.float)  # [N, E] float32
    top_value, top_index = selector(router_probs, top_k)  # [N, k], [N, k]
    if renormalize:
        top_value = top_value / top_value.sum(dim=-1, keepdim=True)
    if weights_dtype == "logits":
        top_value = top_value.to(router_logits.dtype)
    return router_logits, top_value, top_index


def routed_forward(
    router: nn.Module, *, top_k: int, hidden_dim: int, renormalize: bool, weights_dtype: str, selector: ExpertSelector
) -> Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """A replacement ``forward`` for one router instance, keeping the original's signature ``(hidden_states)``."""

    def forward(self: nn.Module, hidden_states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return route(
            hidden_states.reshape(-1, hidden_dim),
            self.weight,
            top_k=top_k,
            renormalize=renormalize,
            weights_dtype=weights_dtype,
            selector=selector,
        )

    return types.MethodType(forward, router)


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
            hidden_dim=int(getattr(router, spec.hidden_dim_attr)),
            renormalize=model.renormalize,
            weights_dtype=spec.routing.weights_dtype,
            selector=selector_for(layer),
        )
        undo.set_attribute(router, "forward", forward)
        patched.append(f"{layer.name}.{spec.router_attr}")
    return patched


def seam_donor(spec: FamilySpec) -> type:
    """The family's ``seam_donor`` class (imported on demand)."""
    module_name, _, class_name = (spec.seam_donor or "").partition(":")
    return getattr(importlib.import_module(module_name), class_name)


def selection_seam_problem(spec: FamilySpec, router: nn.Module) -> str | None:
    """Why a routing override cannot reach ``router``'s selection step, or ``None`` (checked before any change)."""
    if spec.selection_method is None or callable(getattr(router, spec.selection_method, None)):
        return None
    if spec.seam_donor is None:
        return f"{type(router).__name__} has no `{spec.selection_method}` selection step"
    problem = seam_donor(spec).seam_problem(router)
    if problem is not None:
        name, method = type(router).__name__, spec.selection_method
        return f"{name} has no `{method}` step and moepatch's gate cannot stand in for it: {problem}"
    return None


def probe_router(router: nn.Module, *, top_k: int, hidden_dim: int, tokens: int = 16) -> str | None:
    """Check that ``router`` follows the softmax → top-k contract; return a problem description or ``None``.

    Runs the router class's own ``forward`` on a few random tokens (no gradient, no hooks, ignoring any instance
    override such as a routing patch) and compares with :func:`route`, renormalised iff ``norm_topk_prob``.  Used to
    admit routers of families moepatch has no file for.
    """
    weight = getattr(router, "weight", None)
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2 or weight.numel() == 0:
        return "router has no materialised 2-D `weight` (a partitioned ZeRO-3 router cannot be probed)"
    if weight.device.type == "meta":
        return "router weight is on the meta device"
    generator = torch.Generator(device="cpu").manual_seed(0)
    hidden = torch.randn(tokens, hidden_dim, generator=generator).to(device=weight.device, dtype=weight.dtype)
    with torch.no_grad():
        try:
            output = type(router).forward(router, hidden)
        except Exception as error:  # a router with another signature is simply not this contract
            return f"router forward failed on [tokens, hidden] input: {error!r}"
        if not (isinstance(output, tuple) and len(output) == 3):
            return "router does not return (logits, weights, indices)"
        logits, weights, indices = output
        renormalize = bool(getattr(router, "norm_topk_prob", False))
        _, ref_weights, ref_indices = route(
            hidden, weight, top_k=top_k, renormalize=renormalize, weights_dtype="logits"
        )
        if indices.shape != ref_indices.shape or not torch.equal(indices, ref_indices):
            return "router's chosen experts differ from softmax → top-k"
        if weights.dtype != ref_weights.dtype or not torch.allclose(weights, ref_weights, atol=1e-6, rtol=1e-5):
            return "router's expert weights differ from the softmax probabilities (renormalised per norm_topk_prob)"
    return None
