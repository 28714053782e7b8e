"""A family's routing rule, executed: router logits → float32 softmax → selection → renormalisation → dtype cast.

:func:`route` is the reference every supported top-k router is equal to (the families' files declare their
:class:`~model_patches.spec.RoutingRule`; the tests check each family's router against it), the body of the routing
patch point in :mod:`moepatch.routing.seam`, and the yardstick of :func:`probe_router`, which admits routers of families
that have no file of their own.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

ExpertSelector = Callable[[torch.Tensor, int], "tuple[torch.Tensor, torch.Tensor]"]
"""``selector(probs [N, E] float32, k) -> (chosen_probs [N, k], chosen_index [N, k] int64)``.

``chosen_probs`` must be ``probs`` gathered at ``chosen_index``; renormalisation and the dtype cast are applied
afterwards by the family's routing rule, exactly as the unpatched router does.
"""

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
