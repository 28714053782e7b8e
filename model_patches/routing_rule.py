"""A family's routing rule, executed: the one implementation of every router kind moepatch patches.

:func:`execute` runs a :class:`~model_patches.spec.RoutingRule` exactly as the family's router computes it — logits,
score function, selection bias, group limit, top-k, weights from the unbiased scores, renormalisation, scaling, dtype
— with the **selection step** (the top-k) delegated to an :data:`ExpertSelector`.  With the family's own selector
(:func:`vanilla_selector`) the result is bit-identical to the router (tested per kind); C2R swaps in a
collaboration-constrained selector and everything else stays the family's.

It is also the yardstick of :func:`probe_rule`, which admits routers of model types that have no family file: a rule
is accepted only when the executor reproduces the router's own ``forward`` bit for bit, in float32 and bfloat16.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any
from typing import Literal
from typing import SupportsFloat
from typing import SupportsInt
from typing import cast

import torch
import torch.nn.functional as F
from torch import nn

from model_patches import expert_sorted  # modules, their functions looked up at call time (tests swap them)
from model_patches import product_keys
from model_patches import sparsemixer
from model_patches.spec import GroupLimit
from model_patches.spec import RoutingRule
from model_patches.spec import read_attribute

ExpertSelector = Callable[..., "tuple[torch.Tensor, torch.Tensor]"]
"""``selector(selection [N, E], k[, ungrouped=...]) -> (values [N, k], indices [N, k] int64)``.

``selection`` is exactly the vector the family's ``torch.topk`` runs over (scores + selection bias, experts of dropped
groups masked); where the rule has a group limit the executor also passes ``ungrouped=`` (the same vector before the
group mask) and ``kept=`` (the ``[N, E]`` mask of the kept groups) so that a constrained selector can look outside
the kept groups.  ``values`` must be ``selection``
gathered at ``indices``; the executor computes the weights from the unmasked scores afterwards.  Where the rule has a
:attr:`~model_patches.spec.RoutingRule.skip_class` (ZAYA), ``selection`` is ``[N, E + 1]``, its last column the skip
class, which a selector may choose like an expert.
"""


def select_topk(probs: torch.Tensor, k: int, **_: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """Vanilla top-k selection, sorted (``torch.topk``'s default)."""
    return torch.topk(probs, k, dim=-1)


def select_topk_unsorted(probs: torch.Tensor, k: int, **_: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """Vanilla top-k as DeepSeek-V2 / V3 call it (``sorted=False``): same experts, the router's own order."""
    return torch.topk(probs, k, dim=-1, sorted=False)


_TensorFunction = Callable[[torch.Tensor], torch.Tensor]
"""A module or function a rule names by path and calls on a tensor (Gemma 4's input norm, Ergo's logit linear,
DeepSeek-V4's score function)."""


def _tensor_at(router: nn.Module | _WeightHolder, path: str) -> torch.Tensor:
    """The tensor at router-relative ``path``, which the rule names as one (the logit weight, a bias, a learned
    scale); not checked here: a rule that does not fit its router fails where the value is used."""
    return cast(torch.Tensor, read_attribute(router, None, path))


def _function_at(router: nn.Module | _WeightHolder, path: str) -> _TensorFunction:
    """The module (or function) at router-relative ``path``, which the rule names as one; not checked here."""
    return cast(_TensorFunction, read_attribute(router, None, path))


def vanilla_selector(rule: RoutingRule) -> ExpertSelector:
    """The selection step the family's router itself performs (bit-identical outputs under a routing override)."""
    return select_topk if rule.sorted_topk else select_topk_unsorted


@dataclass(frozen=True)
class RouterSettings:
    """A rule's per-instance values, read once from a router and its block (patch time, or a probe)."""

    top_k: int
    renormalize: bool
    scaling: float | None = None
    clamp_min: float | None = None
    softcap: float | None = None
    groups: int | None = None
    kept_groups: int | None = None
    group_limit: GroupLimit | None = None
    weight_attr: str = "weight"
    jitter: float = 0.0
    input_jitter: float = 0.0
    shared_logits: int = 0
    """``S`` of :attr:`RoutingRule.shared_logits`: the router's last ``S`` logits score its shared experts."""


def router_settings(rule: RoutingRule, router: nn.Module, block: nn.Module | None, *, top_k: int,
                    weight_attr: str = "weight") -> RouterSettings:
    """Read the values ``rule`` names from ``router`` (and its sparse ``block``)."""

    # the rule's paths name numbers (ints, floats, 0-d tensors); float() / int() fail on anything else
    def number(path: str | None) -> float | None:
        value = None if path is None else read_attribute(router, block, path)
        return None if value is None else float(cast(SupportsFloat, value))

    limit = rule.active_group_limit(router, block)
    groups = kept = None
    if limit is not None:
        groups = int(cast(SupportsInt, read_attribute(router, block, limit.groups)))
        kept = int(cast(SupportsInt, read_attribute(router, block, limit.kept_groups)))
    softcap = number(rule.softcap)
    return RouterSettings(
        top_k=top_k,
        renormalize=rule.renormalizes(router, block),
        scaling=number(rule.scaling),
        clamp_min=number(rule.renormalize_min),
        softcap=softcap if softcap and softcap > 0 else None,
        groups=groups,
        kept_groups=kept,
        group_limit=limit,
        weight_attr=weight_attr,
        jitter=number(rule.jitter) or 0.0,
        input_jitter=number(rule.input_jitter) or 0.0,
        shared_logits=int(number(rule.shared_logits) or 0),
    )


def router_logits(rule: RoutingRule, settings: RouterSettings, router: nn.Module | _WeightHolder,
                  hidden: torch.Tensor) -> torch.Tensor:
    """Step 1 of the rule: the router's logits ``[N, E]`` from the flattened hidden states ``[N, H]``."""
    if rule.input_norm is not None:  # Gemma 4: the router normalises and scales its input before the linear
        hidden = _function_at(router, rule.input_norm)(hidden)
    for path in rule.input_scales:  # a learned [H] vector or a number (Gemma 4's H^-0.5)
        hidden = hidden * cast("torch.Tensor | float", read_attribute(router, None, path))
    if rule.logits_module is not None:
        return _function_at(router, rule.logits_module)(hidden)
    weight = _tensor_at(router, settings.weight_attr)
    bias = _tensor_at(router, rule.logit_bias) if rule.logit_bias else None
    float32_weight = weight.dtype == torch.float32
    if (rule.logits_dtype == "float32_mm_out" and hidden.is_cuda and hidden.dtype == weight.dtype
            and not torch.is_grad_enabled()):
        return torch.mm(hidden, weight.t(), out_dtype=torch.float32)
    if rule.logits_dtype in ("float32", "float32_mm_out") or (rule.logits_dtype == "float32_if_weight_is"
                                                              and float32_weight):
        hidden, weight = hidden.float(), weight.float()
    elif rule.logits_dtype == "weight":
        hidden = hidden.to(weight.dtype)
    logits = F.linear(hidden, weight) if bias is None else F.linear(hidden, weight, bias)
    if rule.logits_cast == "float32":
        logits = logits.float()
    if settings.softcap is not None:
        logits = torch.tanh(logits / settings.softcap) * settings.softcap
    return logits


def scores_of(rule: RoutingRule, logits: torch.Tensor) -> torch.Tensor:
    """Step 2: the score of every expert (softmax, sigmoid, or the logits themselves)."""
    if rule.score == "softmax":
        return torch.softmax(logits, dim=-1, dtype=torch.float if rule.score_dtype == "float32" else logits.dtype)
    if rule.score == "sigmoid":
        return (logits.float() if rule.score_dtype == "float32" else logits).sigmoid()
    return logits





def group_mask(settings: RouterSettings, selection: torch.Tensor) -> torch.Tensor:
    """The ``[N, E]`` boolean mask of the experts in each token's kept groups (the family's own computation)."""
    limit, groups, kept_groups = settings.group_limit, settings.groups, settings.kept_groups
    # router_settings reads both counts wherever the limit applies
    assert limit is not None and groups is not None and kept_groups is not None
    per_group = selection.shape[-1] // groups
    grouped = selection.view(-1, groups, per_group)
    if limit.score == "max":
        group_scores = grouped.max(dim=-1).values
    else:
        group_scores = grouped.topk(2, dim=-1)[0].sum(dim=-1)
    group_idx = torch.topk(group_scores, k=kept_groups, dim=-1, sorted=False)[1]
    kept = torch.zeros_like(group_scores)
    kept.scatter_(1, group_idx, 1)
    return kept.unsqueeze(-1).expand(-1, groups, per_group).reshape(-1, selection.shape[-1]).bool()


def selection_scores(
    rule: RoutingRule, settings: RouterSettings, scores: torch.Tensor, bias: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """Step 3 before the top-k: ``(selection, ungrouped, kept)`` — what the family's top-k runs over (bias added,
    dropped groups masked) and, where there is a group limit, the same before the mask and the ``[N, E]`` mask of
    the kept groups (``None`` otherwise)."""
    if rule.selection_dtype == "float32":  # ZAYA: probs.detach().to(float32) + bias (the top-k takes no gradient)
        scores = scores.detach().float()
    selection = scores if bias is None else scores + bias.reshape(-1)
    if settings.group_limit is None:
        return selection, None, None
    fill = float("-inf") if settings.group_limit.fill == "-inf" else 0.0
    kept = group_mask(settings, selection)
    return selection.masked_fill(~kept, fill), selection, kept


def expert_weights(
    rule: RoutingRule, settings: RouterSettings, logits: torch.Tensor, scores: torch.Tensor, indices: torch.Tensor,
    input_dtype: torch.dtype, *, weights_scale: torch.Tensor | None = None,
) -> torch.Tensor:
    """Step 4: the weights of the chosen experts (``[N, k]``, or the dense ``[N, E]`` matrix of Llama 4; ``[N, k + S]``
    where the router also weights ``S`` shared experts, their logits being the last ``S`` of ``logits``).

    ``weights_scale`` is the tensor at :attr:`RoutingRule.weights_scale`, read by the caller at call time."""
    if rule.weights_from == "sigmoid_of_chosen" and rule.dense_weights:
        dense = torch.full_like(logits, float("-inf")).scatter_(1, indices, logits.gather(1, indices))
        return torch.sigmoid(dense.float()).to(dense.dtype)
    if rule.weights_from == "sigmoid_of_chosen":
        weights = logits.gather(1, indices).sigmoid()
    elif rule.weights_from == "softmax_of_chosen":  # in float32 (Cohere2-MoE) or the logits' own dtype (gpt-oss)
        chosen = logits.gather(1, indices)
        weights = torch.softmax(chosen, dim=-1, dtype=torch.float) if rule.score_dtype == "float32" else (
            torch.softmax(chosen, dim=-1))
    elif rule.weights_from == "logsigmoid_softmax_of_chosen":  # Inkling: the shared experts join the normalisation
        shared = settings.shared_logits
        chosen = (logits[..., :-shared] if shared else logits).gather(-1, indices)
        if shared:
            chosen = torch.cat([chosen, logits[..., -shared:]], dim=-1)
        log_probs = F.logsigmoid(chosen)
        weights = torch.exp(log_probs - torch.logsumexp(log_probs, dim=-1, keepdim=True))
    else:
        weights = scores.gather(1, indices)
    if settings.renormalize:
        if settings.clamp_min is not None:
            weights = weights / torch.clamp(weights.sum(dim=-1, keepdim=True), min=settings.clamp_min)
        elif rule.renormalize_with == "l1_norm":
            weights = weights / torch.norm(weights, p=1, dim=-1, keepdim=True)
        elif rule.renormalize_epsilon:
            weights = weights / (weights.sum(dim=-1, keepdim=True) + rule.renormalize_epsilon)
        else:
            weights = weights / weights.sum(dim=-1, keepdim=True)
    if settings.scaling is not None:
        weights = weights * settings.scaling
    if weights_scale is not None:
        weights = weights * weights_scale.float()
    if rule.weights_dtype == "logits":
        weights = weights.to(logits.dtype)
    elif rule.weights_dtype == "input":
        weights = weights.to(input_dtype)
    elif rule.weights_dtype == "input_float32":
        weights = weights.to(input_dtype).float()
    return weights


def decide(
    rule: RoutingRule, settings: RouterSettings, logits: torch.Tensor, *, input_dtype: torch.dtype,
    selector: ExpertSelector | None = None, bias: torch.Tensor | None = None, training: bool = False,
    score_module: Callable[[torch.Tensor], torch.Tensor] | None = None, weights_scale: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Steps 2–4 from the logits: ``(weights, indices [N, k])`` (weights ``[N, k]``, ``[N, E]`` when dense, ``[N, k +
    S]`` with shared experts, whose ``S`` logits close ``logits`` and take no part in the selection).

    A sparsemixer or product-key rule asks the selector only which experts a first pick allows (its ``allowed_for``
    attribute, set by constrained selectors such as C2R's) and chooses in its own order; the vanilla selector has
    none.  A product-key rule's ``logits`` are the block's ``[2, N, √E]`` view of its key scores."""
    if rule.selection == "sparsemixer":
        return sparsemixer.sparsemixer(logits, settings.jitter, training, getattr(selector, "allowed_for", None))
    if rule.selection == "product_keys":
        return product_keys.product_key_choice(logits, settings.top_k, settings.renormalize,
                                               getattr(selector, "allowed_for", None))
    scores = scores_of(rule, logits) if score_module is None else score_module(logits)
    # scored over all E + S logits, then sliced, as Inkling does (an elementwise kernel may round another shape apart)
    routed = scores[..., :-settings.shared_logits] if settings.shared_logits else scores
    selection, ungrouped, kept = selection_scores(rule, settings, routed, bias)
    selector = vanilla_selector(rule) if selector is None else selector
    if ungrouped is None:
        _, indices = selector(selection, settings.top_k)
    else:
        _, indices = selector(selection, settings.top_k, ungrouped=ungrouped, kept=kept)
    scale = {} if weights_scale is None else {"weights_scale": weights_scale}
    weights = expert_weights(rule, settings, logits, scores, indices, input_dtype, **scale)
    if rule.skip_class:  # ZAYA: a chosen skip class (the last index) reaches the experts as expert 0 with weight 0
        skipped = indices == logits.shape[-1] - 1
        weights, indices = weights.masked_fill(skipped, 0), indices.masked_fill(skipped, 0)
    return weights, indices


def execute(
    rule: RoutingRule, settings: RouterSettings, router: nn.Module | _WeightHolder, hidden_states: torch.Tensor, *,
    selector: ExpertSelector | None = None, bias: torch.Tensor | None = None, call_args: tuple[Any, ...] = (),
    call_kwargs: dict[str, Any] | None = None,
) -> tuple[Any, ...]:
    """The router's forward by ``rule``: ``(logits, weights, indices)``, ``(dense weights, logits)`` (Llama 4), JetMoE's
    expert-sorted hand-off (:attr:`~model_patches.spec.RoutingRule.expert_sorted`),
    ``(routed logits [N, E], weights [N, k], indices, shared weights [N, S])`` (Inkling's shared experts), or
    ``(logits [N, E + 1], weights, indices, state for the next layer)`` (ZAYA's
    :attr:`~model_patches.spec.RoutingRule.logits_function`).

    ``bias`` is the selection bias (read by the caller from :attr:`RoutingRule.selection_bias` or the forward's
    argument); ``selector=None`` is the family's own top-k.  ``call_args`` / ``call_kwargs`` are the router call's
    further arguments, which only a :attr:`~model_patches.spec.RoutingRule.logits_function` reads (ZAYA's
    ``router_states``).  The outputs are tensors but for JetMoE's ``expert_size`` (a list of ints) and ZAYA's state
    (whatever its :attr:`~model_patches.spec.RoutingRule.logits_function` hands on).
    """
    training = bool(getattr(router, "training", False))
    if training and settings.input_jitter > 0:  # in place on the caller's tensor, as the family's router does
        hidden_states *= torch.empty_like(hidden_states).uniform_(1.0 - settings.input_jitter,
                                                                  1.0 + settings.input_jitter)
    score_module = None
    if rule.score == "module":
        assert rule.score_module is not None  # a "module" score names its module
        score_module = _function_at(router, rule.score_module)
    scale = _tensor_at(router, rule.weights_scale) if rule.weights_scale else None
    carried: tuple[Any, ...] = ()
    with (torch.autocast(device_type=hidden_states.device.type, enabled=False) if rule.no_autocast
          else contextlib.nullcontext()):
        if rule.logits_function is not None:  # ZAYA: the family's logit step, which also hands a state on
            logits, state = rule.logits_function(router, hidden_states, *call_args, **(call_kwargs or {}))
            logits, carried = logits.reshape(-1, logits.shape[-1]), (state,)
        else:
            weight = _tensor_at(router, settings.weight_attr)
            logits = router_logits(rule, settings, router, hidden_states.reshape(-1, weight.shape[-1]))
        weights, indices = decide(rule, settings, logits, input_dtype=hidden_states.dtype, selector=selector,
                                  bias=bias, training=training, score_module=score_module, weights_scale=scale)
    if rule.expert_scale is not None:  # Gemma 4: × per_expert_scale[top_k_index], after every other weight step
        weights = weights * _tensor_at(router, rule.expert_scale)[indices]
    if rule.expert_sorted:  # JetMoE: the choice handed over as expert-sorted rows
        return expert_sorted.pack(logits, weights, indices)
    if rule.dense_weights:
        return weights, logits
    shared = settings.shared_logits
    if shared:  # the last S columns weight the shared experts (contiguous copies, as the router makes them)
        return (logits[..., :-shared], weights[..., :settings.top_k].contiguous(), indices,
                weights[..., -shared:].contiguous())
    return (logits, weights, indices, *carried)


def selection_bias_of(rule: RoutingRule, router: nn.Module, block: nn.Module | None) -> torch.Tensor | None:
    """The selection-bias tensor the rule names (``None`` when the rule has none)."""
    if rule.selection_bias is None:
        return None
    value = read_attribute(router, block, rule.selection_bias)
    return value if isinstance(value, torch.Tensor) else None


# ---------------------------------------------------------------------------------------------- the kind-A reference
def route(
    hidden_states: torch.Tensor,
    weight: torch.Tensor,
    *,
    top_k: int,
    renormalize: bool,
    weights_dtype: Literal["logits", "float32", "input", "input_float32"],
    selector: ExpertSelector = select_topk,
    logits_dtype: Literal["input", "float32", "float32_if_weight_is", "weight", "float32_mm_out"] = "input",
    softmax_dtype: Literal["float32", "logits"] = "float32",
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """softmax → top-k routing from a bare ``[E, H]`` weight (the transformers 5 top-k router contract): the
    executor with a kind-A rule.  Returns ``(router_logits [N, E], top_k_weights [N, k], top_k_index [N, k])``."""
    rule = RoutingRule(renormalize=renormalize, weights_dtype=weights_dtype, logits_dtype=logits_dtype,
                       score_dtype=softmax_dtype)
    holder = _WeightHolder(weight)
    logits, weights, indices = execute(rule, RouterSettings(top_k=top_k, renormalize=renormalize), holder,
                                       hidden_states, selector=selector)
    return logits, weights, indices


class _WeightHolder:
    """Lets :func:`route` hand a bare weight tensor to :func:`execute` (which reads ``router.weight``)."""

    def __init__(self, weight: torch.Tensor) -> None:
        self.weight = weight


# ---------------------------------------------------------------------------------------------- the generic probe
_PROBE_TOKENS = 24
_PROBE_DTYPES = (torch.float32, torch.bfloat16)
_PROBE_SCALES = (1.0, 1e-2, 300.0)
"""Input scales of the probe: ordinary, small (spread probabilities tell renormalisation apart) and huge (scores
underflow to 0, where an epsilon added to a sum shows)."""


def probe_rule(
    router: nn.Module, block: nn.Module | None, candidates: list[RoutingRule], *, top_k: int, weight_attr: str,
    call: Callable[[nn.Module, Any, torch.Tensor], Any], logit_fields: list[dict] | None = None,
) -> tuple[RoutingRule | None, str]:
    """The first of ``candidates`` that reproduces ``router`` bit for bit, or ``(None, why the first failed)``.

    ``call(router_copy, block_tensors, hidden)`` runs the router class's own forward (never an instance override)
    the way its block calls it.  Each candidate runs through :func:`execute` on random tokens at two input scales, on
    copies of the router in float32, bfloat16 and its own dtype (a rule right in one dtype only would break
    bit-identity after
    ``model.to(torch.bfloat16)``); logits, weights and indices must be equal, dtype included.  ``logit_fields``
    (field dicts of the logit step) are tried first on the logits alone; the first that fits is set on every
    candidate.
    """
    weight = read_attribute(router, None, weight_attr)
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2 or weight.numel() == 0:
        return None, "router has no materialised 2-D logit weight (a partitioned ZeRO-3 router cannot be probed)"
    if weight.device.type == "meta":
        return None, "router weight is on the meta device"
    copies = _probe_copies(router, block)
    generator = torch.Generator(device="cpu").manual_seed(0)
    base = torch.randn(_PROBE_TOKENS, weight.shape[1], generator=generator)
    own = next((t.dtype for t in router.parameters() if t.is_floating_point()), torch.float32)
    settings: list[tuple[nn.Module, Any, torch.Tensor, bool]] = []
    for dtype, (router_copy, block_copy) in copies.items():
        settings += [(router_copy, block_copy, (base * scale).to(weight.device, dtype), False)
                     for scale in _PROBE_SCALES]
    float_copy, float_block = copies[torch.float32]
    underflow = _underflow_rows(weight, generator)
    if underflow is not None:  # every expert's logit near -120: sigmoid scores underflow, an epsilon shows
        settings.append((float_copy, float_block, underflow.to(weight.device), False))
    # a float32 router fed bfloat16 activations (from_pretrained keeps some routers in float32), and one run under
    # bfloat16 autocast (mixed-precision training): a rule right only in plain float32 would break there
    settings.append((float_copy, float_block, base.to(weight.device, torch.bfloat16), False))
    settings.append((float_copy, float_block, base.to(weight.device), True))
    biased = _bias_decides(float_copy, float_block, candidates, generator)
    if biased is not None:  # a selection bias of mixed sign large enough to decide: fills and groups must be right
        settings += [(biased[0], biased[1], (base * scale).to(weight.device), False) for scale in (1.0, 30.0)]
    runs, failure = [], None
    for router_copy, block_copy, hidden, autocast in settings:
        output = None
        for shaped in (hidden, hidden.unsqueeze(0)):  # some routers take [tokens, H], others [batch, seq, H]
            with torch.no_grad(), _maybe_autocast(shaped, autocast):
                try:
                    output = call(router_copy, block_copy, shaped)
                    break
                except Exception as error:  # another signature or a dtype the router does not run in
                    failure = f"router forward failed on random {hidden.dtype} tokens: {error!r}"
        if output is not None:
            runs.append((router_copy, block_copy, shaped, output, autocast))
    if not any(run[2].dtype == own and not run[4] for run in runs):  # it must at least run in its own dtype
        return None, failure or "router forward failed on random tokens"
    closest = "no candidate rule"
    if logit_fields:  # stage 1: the logit fields, on the logits alone (a handful of runs instead of every rule)
        first = candidates[0]
        matching = [fields for fields in logit_fields if all(
            _logits_equal(dataclasses.replace(first, **fields), r, b, h, o, a, top_k=top_k, weight_attr=weight_attr)
            for r, b, h, o, a in runs)]
        if not matching:
            return None, "router's logits differ from F.linear of its weight in every dtype handling tried"
        candidates = [dataclasses.replace(rule, **matching[0]) for rule in candidates]
    for rule in candidates:
        verdict = None
        for router_copy, block_copy, hidden, output, autocast in runs:
            with _maybe_autocast(hidden, autocast):
                verdict = _compare(rule, router_copy, block_copy, hidden, output, top_k=top_k,
                                   weight_attr=weight_attr)
            if verdict is not None:
                break
        if verdict is None:
            return rule, ""
        closest = verdict if closest == "no candidate rule" else closest
    return None, closest


def _underflow_rows(weight: torch.Tensor, generator: torch.Generator) -> torch.Tensor | None:
    """Hidden states whose logits are all about -120 (least squares through the router weight), or ``None`` where the
    weight cannot reach every target (more experts than hidden units)."""
    matrix = weight.detach().to("cpu", torch.float64)
    experts, hidden = matrix.shape
    if experts > hidden:
        return None
    targets = -120.0 + torch.randn(8, experts, generator=generator, dtype=torch.float64)
    solution = torch.linalg.lstsq(matrix, targets.T).solution.T  # [8, H]: W · h = target
    return solution.float()


def _maybe_autocast(hidden: torch.Tensor, enabled: bool) -> Any:
    if not enabled:
        return contextlib.nullcontext()
    return torch.autocast(device_type=hidden.device.type, dtype=torch.bfloat16)


def _bias_decides(router: nn.Module, block: Any, candidates: list[RoutingRule],
                  generator: torch.Generator) -> tuple[nn.Module, Any] | None:
    """A further float32 copy whose selection bias (the candidates' path) is random, of mixed sign and large enough
    to decide the choice, or ``None`` without one: zero-initialised biases would hide how the rule uses them."""
    path = next((rule.selection_bias for rule in candidates if rule.selection_bias), None)
    if path is None:
        return None
    router_copy = copy.deepcopy(router)
    block_copy = copy.copy(block)
    if path.startswith("^") and block_copy is not None:
        name = path[1:]
        setattr(block_copy, name, getattr(block, name).clone())
    bias = read_attribute(router_copy, block_copy, path)
    if not isinstance(bias, torch.Tensor):
        return None
    with torch.no_grad():
        bias.copy_((torch.randn(bias.shape, generator=generator) * 2.0).to(bias.dtype))
    return router_copy, block_copy


def _probe_copies(router: nn.Module, block: nn.Module | None
                  ) -> dict[torch.dtype, tuple[nn.Module, _TensorsOf | None]]:
    """Detached copies of the router (and the block's own tensors) in each probe dtype; the model is never touched."""
    found = {}
    own = next((t.dtype for t in router.parameters() if t.is_floating_point()), torch.float32)
    for dtype in dict.fromkeys((*_PROBE_DTYPES, own)):
        router_copy = copy.deepcopy(router).to(dtype)
        block_copy = None
        if block is not None:
            block_copy = _TensorsOf(block, dtype)
        found[dtype] = (router_copy, block_copy)
    return found


class _TensorsOf:
    """A block's own (non-module) parameters and buffers, copied into ``dtype``, and its plain attributes: what a
    rule reads from the block (``^e_score_correction_bias``, ``^top_k``) without copying the experts."""

    def __init__(self, block: nn.Module, dtype: torch.dtype) -> None:
        for name, value in vars(block).items():
            if not name.startswith("_"):
                setattr(self, name, value)
        for name, tensor in list(block.named_parameters(recurse=False)) + list(block.named_buffers(recurse=False)):
            value = tensor.detach().clone()
            setattr(self, name, value.to(dtype) if value.is_floating_point() else value)


def _compare(rule: RoutingRule, router: nn.Module, block: Any, hidden: torch.Tensor, output: Any, *, top_k: int,
             weight_attr: str) -> str | None:
    if not isinstance(output, tuple) or len(output) < 2:
        return "router does not return a tuple"
    settings = router_settings(rule, router, block, top_k=top_k, weight_attr=weight_attr)
    bias = selection_bias_of(rule, router, block)
    if rule.selection_bias is not None and bias is None:
        return f"no selection bias at `{rule.selection_bias}`"
    try:
        with torch.no_grad():
            expected = execute(rule, settings, router, hidden, bias=bias)
    except Exception as error:  # a candidate that does not fit this router's attributes
        return f"rule does not run on this router: {error!r}"
    if rule.dense_weights:
        got = output[:2]
    else:
        if len(output) < len(expected):
            return f"router does not return the rule's {len(expected)} outputs"
        got = output[:len(expected)]
    # fewer outputs than names for most rules: zip stops at the shortest
    for name, mine, theirs in zip(("logits", "weights", "indices", "shared weights"), expected, got, strict=False):
        if not isinstance(theirs, torch.Tensor) or mine.shape != theirs.shape or mine.dtype != theirs.dtype:
            return f"router's {name} have another shape or dtype than the rule's"
        if not _same(mine, theirs):
            return f"router's {name} differ from the rule's"
    return None


def _same(mine: torch.Tensor, theirs: Any) -> bool:
    """Equal shape, dtype and values, NaN where NaN (a huge probe input may overflow both)."""
    if not isinstance(theirs, torch.Tensor) or mine.shape != theirs.shape or mine.dtype != theirs.dtype:
        return False
    if torch.equal(mine, theirs):
        return True
    if not mine.is_floating_point():
        return False
    both_nan = mine.isnan() & theirs.isnan()
    return bool(((mine == theirs) | both_nan).all())


def _logits_equal(rule: RoutingRule, router: nn.Module, block: Any, hidden: torch.Tensor, output: Any,
                  autocast: bool, *, top_k: int, weight_attr: str) -> bool:
    if not isinstance(output, tuple) or len(output) < 2:
        return False
    theirs = output[1] if rule.dense_weights else output[0]
    try:
        settings = router_settings(rule, router, block, top_k=top_k, weight_attr=weight_attr)
        weight = _tensor_at(router, weight_attr)
        with torch.no_grad(), _maybe_autocast(hidden, autocast and not rule.no_autocast):
            mine = router_logits(rule, settings, router, hidden.reshape(-1, weight.shape[-1]))
    except Exception:  # a candidate that does not fit this router's attributes
        return False
    return _same(mine, theirs)
