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

from model_patches.spec import RoutingRule

ExpertSelector = Callable[[torch.Tensor, int], "tuple[torch.Tensor, torch.Tensor]"]
"""``selector(probs [N, E] float32, k) -> (chosen_probs [N, k], chosen_index [N, k] int64)``.

``chosen_probs`` must be ``probs`` gathered at ``chosen_index``; renormalisation and the dtype cast are applied
afterwards by the family's routing rule, exactly as the unpatched router does.
"""

def select_topk(probs: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Vanilla top-k selection, the step every supported router performs."""
    return torch.topk(probs, k, dim=-1)


def select_topk_unsorted(probs: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Vanilla top-k as DeepSeek-V2 calls it (``sorted=False``): same experts, the router's own order."""
    return torch.topk(probs, k, dim=-1, sorted=False)


def vanilla_selector(rule: RoutingRule) -> ExpertSelector:
    """The selection step the family's router itself performs (bit-identical outputs under a routing override)."""
    return select_topk if rule.sorted_topk else select_topk_unsorted


def route(
    hidden_states: torch.Tensor,
    weight: torch.Tensor,
    *,
    top_k: int,
    renormalize: bool,
    weights_dtype: str,
    selector: ExpertSelector = select_topk,
    logits_dtype: str = "input",
    softmax_dtype: str = "float32",
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Reference routing: logits → softmax over all experts → selection → optional renorm → cast.

    Args:
        hidden_states (`torch.Tensor` of shape `[N, H]`): flattened tokens fed to the router.
        weight (`torch.Tensor` of shape `[E, H]`): the router weight.
        top_k (`int`): experts per token.
        renormalize (`bool`): divide the chosen probabilities by their sum.
        weights_dtype (`str`): ``"logits"`` to cast the weights to the logits' dtype, ``"float32"`` to keep them.
        selector (`ExpertSelector`, *optional*, defaults to `select_topk`): the selection step.
        logits_dtype (`str`, *optional*, defaults to `"input"`): :attr:`RoutingRule.logits_dtype`.
        softmax_dtype (`str`, *optional*, defaults to `"float32"`): :attr:`RoutingRule.softmax_dtype`.

    Returns:
        `(router_logits [N, E], top_k_weights [N, k], top_k_index [N, k])`, the transformers 5 router contract.
    """
    if logits_dtype == "float32" or (logits_dtype == "float32_if_weight_is" and weight.dtype == torch.float32):
        hidden_states = hidden_states.float()
        weight = weight.float()
    router_logits = F.linear(hidden_states, weight)  # [N, E]
    top_value, top_index = choose_experts(router_logits, top_k=top_k, renormalize=renormalize,
                                          weights_dtype=weights_dtype, selector=selector, softmax_dtype=softmax_dtype)
    return router_logits, top_value, top_index


def choose_experts(
    router_logits: torch.Tensor,
    *,
    top_k: int,
    renormalize: bool,
    weights_dtype: str,
    selector: ExpertSelector = select_topk,
    softmax_dtype: str = "float32",
    renormalize_with: str = "sum",
) -> tuple[torch.Tensor, torch.Tensor]:
    """The rule's second half, from the logits ``[N, E]``: softmax → selection → optional renorm → cast.

    Returns ``(top_k_weights [N, k], top_k_index [N, k])``.  ``renormalize_with="l1_norm"`` divides by
    ``torch.norm(p=1)`` (DBRX) instead of the sum: the same value, computed the way the family computes it.
    """
    dtype = torch.float if softmax_dtype == "float32" else router_logits.dtype
    router_probs = torch.softmax(router_logits, dim=-1, dtype=dtype)  # [N, E]
    top_value, top_index = selector(router_probs, top_k)  # [N, k], [N, k]
    if renormalize:
        if renormalize_with == "l1_norm":
            top_value = top_value / torch.norm(top_value, p=1, dim=-1, keepdim=True)
        else:
            top_value = top_value / top_value.sum(dim=-1, keepdim=True)
    if weights_dtype == "logits":
        top_value = top_value.to(router_logits.dtype)
    return top_value, top_index


def route_by_rule(
    hidden_states: torch.Tensor, weight: torch.Tensor, rule: RoutingRule, *, top_k: int, renormalize: bool,
    selector: ExpertSelector | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """:func:`route` with every dtype and ordering setting taken from the family's ``rule``; ``selector=None``: the
    family's own (vanilla) selection."""
    return route(
        hidden_states,
        weight,
        top_k=top_k,
        renormalize=renormalize,
        weights_dtype=rule.weights_dtype,
        selector=vanilla_selector(rule) if selector is None else selector,
        logits_dtype=rule.logits_dtype,
        softmax_dtype=rule.softmax_dtype,
    )


_PROBE_SCALES = (1.0, 1e-2)
"""Input scales tried until the probe can tell renormalised from plain weights (a saturated router, whose top-k
probabilities already sum to about 1, cannot show the difference; smaller inputs spread its probabilities)."""


def probe_router(
    router: nn.Module, *, top_k: int, hidden_dim: int, renormalize: bool, tokens: int = 16
) -> str | None:
    """Check that ``router`` follows the softmax → top-k contract; return a problem description or ``None``.

    Runs the router class's own ``forward`` on a few random tokens (no gradient, no hooks, ignoring any instance
    override such as a routing patch) and compares, in float64 from the router's own logits, with the chosen
    probabilities both plain and renormalised.  The router is accepted only when its weights match the variant its
    declaration (``renormalize``) names within a few ulps of the weights' dtype **and** differ from the other variant
    by more than that: softmax over the k chosen logits equals the renormalised top-k probabilities exactly, so a
    router doing that while declaring no renormalisation is refused, never confused.
    """
    weight = getattr(router, "weight", None)
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2 or weight.numel() == 0:
        return "router has no materialised 2-D `weight` (a partitioned ZeRO-3 router cannot be probed)"
    if weight.device.type == "meta":
        return "router weight is on the meta device"
    generator = torch.Generator(device="cpu").manual_seed(0)
    base = torch.randn(tokens, hidden_dim, generator=generator)
    for scale in _PROBE_SCALES:
        hidden = (base * scale).to(device=weight.device, dtype=weight.dtype)
        with torch.no_grad():
            try:
                output = type(router).forward(router, hidden)
            except Exception as error:  # a router with another signature is simply not this contract
                return f"router forward failed on [tokens, hidden] input: {error!r}"
        if not (isinstance(output, tuple) and len(output) == 3):
            return "router does not return (logits, weights, indices)"
        verdict = _compare_weights(output, hidden, weight, top_k=top_k, renormalize=renormalize)
        if verdict != "inconclusive":
            return verdict
    return "probe inconclusive: the router saturates (top-k probabilities sum to about 1, or tie) at every probe scale"


def _compare_weights(
    output: tuple, hidden: torch.Tensor, weight: torch.Tensor, *, top_k: int, renormalize: bool
) -> str | None:
    """``None`` (accepted), a problem, or ``"inconclusive"`` when plain and renormalised weights coincide or the
    choices differ only between experts of equal (saturated) float32 probability."""
    logits, weights, indices = output
    _, ref_weights, ref_indices = route(hidden, weight, top_k=top_k, renormalize=renormalize, weights_dtype="logits")
    if indices.shape != ref_indices.shape:
        return "router's chosen experts differ from softmax → top-k"
    if not torch.equal(indices, ref_indices):
        probs = torch.softmax(F.linear(hidden, weight), dim=-1, dtype=torch.float)
        got, want = probs.gather(1, indices), probs.gather(1, ref_indices)
        tied = torch.equal(got.sort(dim=-1).values, want.sort(dim=-1).values)
        return "inconclusive" if tied else "router's chosen experts differ from softmax → top-k"  # ties: saturation
    if weights.dtype != ref_weights.dtype:
        return f"router's expert weights are {weights.dtype}, expected the logits' dtype {ref_weights.dtype}"
    chosen = torch.softmax(logits.double(), dim=-1).gather(1, indices)  # [N, k] float64
    renormalised = chosen / chosen.sum(dim=-1, keepdim=True)
    tolerance = 8 * torch.finfo(weights.dtype).eps  # weights are <= 1: a few ulps of their dtype, absolute
    declared, other = (renormalised, chosen) if renormalize else (chosen, renormalised)
    got = weights.double()
    if top_k == logits.shape[-1]:  # every expert chosen: the k probabilities sum to 1, renormalisation is moot
        return None if (got - declared).abs().max() <= tolerance else (
            "router's expert weights differ from the softmax probabilities")
    if (declared - other).abs().max() <= 4 * tolerance:
        return "inconclusive"
    if (got - declared).abs().max() <= tolerance:
        return None
    if (got - other).abs().max() <= tolerance:
        if renormalize:
            return "router's expert weights are not renormalised over the k, but it declares norm_topk_prob=True"
        return ("router's expert weights sum to 1 over the k (renormalised, e.g. top-k of logits then softmax over "
                "the k) but it declares norm_topk_prob=False")
    return "router's expert weights differ from the softmax probabilities (renormalised per norm_topk_prob)"
