"""Why a model no family fits is refused: find its MoE block and name the routing check that fails.

:func:`model_patches.structure.describe` asks this module when no family accepts a model, so the refusal says what the
router does (sigmoid scores, a bias or groups before top-k, softmax over the k chosen logits, scaled weights, a choice
made outside the router, ...) instead of "no sparse MoE block".  Everything is read from the module tree and one
probe of the router on random tokens: no table of ``model_type`` names.  The words are a diagnosis for people; only
the families' own checks decide what is accepted.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

_ROUTER_NAMES = ("gate", "router")
_GROUP_ATTRS = ("n_group", "num_group", "num_groups", "n_groups")
_PROBE_TOKENS = 16


def diagnose(model: nn.Module) -> str | None:
    """The refusal reason for the first MoE block of ``model``, or ``None`` when it has no routed experts at all."""
    for name, module in model.named_modules():
        found = _router_of(module)
        if found is None:
            continue
        router_name, router, weight = found
        where = f"MoE block `{name}` ({type(module).__name__}), router `{router_name}` ({type(router).__name__})"
        return f"{where}: " + "; ".join(_findings(module, router, weight))
    experts = next((name for name, module in model.named_modules() if "expert" in type(module).__name__.lower()), None)
    if experts is not None:
        return f"experts at `{experts}` but no router module with an [E, H] weight beside them"
    return None


def _router_of(block: nn.Module) -> tuple[str, nn.Module, torch.Tensor] | None:
    """``(name, router, weight [E, H])`` when ``block`` holds routed experts next to a gate / router child."""
    children = dict(block.named_children())
    if not any("expert" in name and "shared" not in name for name in children):
        return None
    for name, child in children.items():
        if not any(word in name for word in _ROUTER_NAMES) or "shared" in name:
            continue
        for _, parameter in child.named_parameters():
            if parameter.dim() == 2 and parameter.shape[0] > 1:
                return name, child, parameter
    return None


def _findings(block: nn.Module, router: nn.Module, weight: torch.Tensor) -> list[str]:
    """Every property of the router that departs from softmax → top-k (at least one sentence)."""
    num_experts = weight.shape[0]
    findings = []
    own = list(block.named_parameters(recurse=False)) + list(block.named_buffers(recurse=False))
    for name, tensor in list(router.named_parameters()) + list(router.named_buffers()) + own:
        if "bias" in name and tensor.dim() == 1 and tensor.shape[0] == num_experts:
            findings.append(f"router adds a bias (`{name}`) to the expert scores before top-k")
    for attr in _GROUP_ATTRS:
        groups = getattr(router, attr, None) or getattr(block, attr, None)
        if isinstance(groups, int) and groups > 1:
            findings.append(f"grouped top-k ({attr}={groups}: experts are chosen within the best groups only)")
            break
    if weight.device.type == "meta":
        return findings or ["router weight is on the meta device; its rule cannot be probed"]
    findings.extend(_probe(block, router, weight))
    return findings or ["the router routes like softmax → top-k but the block matches no family's structure"]


def _probe(block: nn.Module, router: nn.Module, weight: torch.Tensor) -> list[str]:
    """Run the router's class ``forward`` on random tokens and classify how its weights relate to its logits."""
    generator = torch.Generator(device="cpu").manual_seed(0)
    hidden = torch.randn(_PROBE_TOKENS, weight.shape[1], generator=generator).to(weight.device, weight.dtype)
    output = None
    for shaped in (hidden, hidden.unsqueeze(0)):
        try:
            with torch.no_grad():
                output = type(router).forward(router, shaped)
            break
        except Exception as error:  # some routers want [batch, seq, hidden]; report the last failure
            failure = f"router forward failed on random tokens: {error!r}"
    if output is None:
        return [failure]
    tensors = [t for t in (output if isinstance(output, (tuple, list)) else (output,)) if isinstance(t, torch.Tensor)]
    rows = [t.reshape(_PROBE_TOKENS, -1) for t in tensors if t.numel() % _PROBE_TOKENS == 0]
    indices = next((t for t in rows if not t.is_floating_point()), None)
    if indices is None:
        dense = next((t for t in rows if t.shape[1] == weight.shape[0] and bool((t == 0).any())), None)
        if dense is None:
            return [f"router returns only its [N, E] scores; the experts are chosen outside it, in "
                    f"{type(block).__name__}"]
        indices = torch.topk(dense.double(), int((dense[0] != 0).sum()), dim=-1).indices
        weights = dense.gather(1, indices)
    else:
        k = indices.shape[1]
        found = next((t for t in rows if t.is_floating_point() and t.shape[1] == k), None)
        if found is None:
            return ["router returns expert indices without their weights"]
        weights = found
    return _classify(router, hidden, weight, indices.long(), weights.double())


def _classify(
    router: nn.Module, hidden: torch.Tensor, weight: torch.Tensor, indices: torch.Tensor, weights: torch.Tensor
) -> list[str]:
    with torch.no_grad():
        logits = F.linear(hidden.double(), weight.double())
        bias = getattr(router, "bias", None)
        if isinstance(bias, torch.Tensor) and bias.shape == (weight.shape[0],):
            logits = logits + bias.double()
    tolerance = 1e-3 if weights.dtype == torch.float32 else 1e-2  # a diagnosis, not an acceptance test
    k = indices.shape[1]
    if not torch.equal(torch.sort(indices, dim=-1).values, torch.sort(torch.topk(logits, k).indices, dim=-1).values):
        return ["router's chosen experts are not the top-k of its logits (grouped, biased or noisy selection)"]

    def ratio_is_constant(reference: torch.Tensor) -> float | None:
        ratio = weights / reference.gather(1, indices)
        spread = (ratio - ratio.mean()).abs().max()
        return float(ratio.mean()) if spread <= tolerance * ratio.abs().mean() else None

    probs = torch.softmax(logits, dim=-1)
    sigmoid = torch.sigmoid(logits)
    renormalised = probs / probs.gather(1, indices).sum(dim=-1, keepdim=True)
    scale = ratio_is_constant(probs)
    if scale is not None:
        if abs(scale - 1) > tolerance:
            return [f"router multiplies the top-k weights by {scale:g} (a routed scaling factor)"]
        return [_declaration_gap(router, renormalises=False)]
    scale = ratio_is_constant(renormalised)
    if scale is not None:
        if abs(scale - 1) > tolerance:
            return [f"router renormalises the top-k weights and multiplies them by {scale:g} (a routed scaling factor)"]
        return [_declaration_gap(router, renormalises=True)]
    if ratio_is_constant(sigmoid) is not None or ratio_is_constant(
            sigmoid / sigmoid.gather(1, indices).sum(dim=-1, keepdim=True)) is not None:
        return ["router scores experts with sigmoid, not softmax"]
    return ["router's weights are neither softmax nor sigmoid probabilities of its logits"]


def _declaration_gap(router: nn.Module, *, renormalises: bool) -> str:
    """A softmax → top-k router that no family accepts: say what its declaration lacks."""
    flag = getattr(router, "norm_topk_prob", None)
    if renormalises and not isinstance(flag, bool):
        return ("top-k of logits then softmax over the k (the renormalised top-k probabilities), and the router has no "
                "`norm_topk_prob` declaring the renormalisation")
    if not isinstance(flag, bool):
        return "block found but router has no `norm_topk_prob` (softmax → top-k without renormalisation)"
    if flag != renormalises:
        return f"router declares norm_topk_prob={flag} but its weights are {'' if renormalises else 'not '}renormalised"
    return "softmax → top-k router whose block or attributes match no family (a family file would support it)"
