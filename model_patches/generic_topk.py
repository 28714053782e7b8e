"""Any other transformers 5 MoE with a token-choice router beside its experts, whatever the router's scoring rule.

Covers (tested) Qwen3-MoE, OLMoE and the DeepSeek-V3-style routers many models copy (GLM-4.5, Kimi-Linear,
EXAONE-MoE, MiMo-V2, MiniCPM-5, Solar-Open, ...).  The structure is read from the model, not declared: a decoder
layer's child is a sparse block when it holds an ``experts`` module and a ``gate`` / ``router`` module with a 2-D
logit weight ``[E, H]``; the block's attribute name (``mlp``, ``block_sparse_moe``, ``feed_forward``, ``mixer``), the
router's expert count and top-k attributes and the shared experts are taken from what is there.  That is enough for
every feature that needs only *where* routers and experts are.

The routing rule is **probed**, never guessed: candidate :class:`~model_patches.spec.RoutingRule` values built from
the router's attributes (a selection bias, a group limit, ``norm_topk_prob``, a routed scaling factor, ...) are run
by :func:`model_patches.routing_rule.execute` against the router class's own ``forward`` on random tokens, in float32
and bfloat16, and the first that is equal bit for bit (logits, weights, indices, dtypes) is the model's rule.  When
none is, the structure is still accepted and the features that re-run the rule (C2R, the balance loss on the actual
choice, the bias update) refuse with the probe's finding.
"""

from __future__ import annotations

import dataclasses
import inspect
import itertools
from dataclasses import dataclass
from typing import Any
from typing import Literal
from typing import SupportsInt
from typing import cast

import torch
from torch import nn

from model_patches.registry import register
from model_patches.routing_rule import probe_rule
from model_patches.spec import FamilySpec
from model_patches.spec import GroupLimit
from model_patches.spec import RouterOutput
from model_patches.spec import RoutingRule
from model_patches.spec import read_attribute
from model_patches.structure import find_layer_list

ROUTER_NAMES = ("gate", "router")
EXPERTS_NAMES = ("experts",)
WEIGHT_PATHS = ("weight", "classifier.weight", "gate.weight", "layer.weight", "wg.weight", "linear.weight")
NUM_EXPERTS_PATHS = ("num_experts", "n_routed_experts", "num_local_experts", "^num_experts", "^num_local_experts")
TOP_K_PATHS = ("top_k", "^top_k", "num_experts_per_tok", "^num_experts_per_tok")
SHARED_NAMES = ("shared_expert", "shared_experts", "shared_expert_gate", "shared_mlp")
SELECTION_BIAS_PATHS = ("e_score_correction_bias", "moe_statics.e_score_correction_bias", "^e_score_correction_bias",
                        "^expert_bias")
GROUP_ATTRS = (("num_group", "topk_group"), ("n_group", "topk_group"))
SCALING_PATHS = ("routed_scaling_factor", "router_scaling_factor", "route_scale")


@dataclass(frozen=True)
class _Parts:
    block_attr: str
    router_attr: str
    experts_attr: str
    weight_attr: str


def _parts_of(name: str, block: nn.Module) -> _Parts | None:
    """The router / experts / weight names when ``block`` (a decoder layer's child ``name``) is a sparse block."""
    children = dict(block.named_children())
    experts = next((n for n in EXPERTS_NAMES if isinstance(children.get(n), nn.Module)), None)
    if experts is None:
        return None
    for router_name in ROUTER_NAMES:
        router = children.get(router_name)
        if not isinstance(router, nn.Module):
            continue
        for path in WEIGHT_PATHS:
            weight = read_attribute(router, None, path)
            if isinstance(weight, torch.Tensor) and weight.dim() == 2 and weight.shape[0] > 1:
                return _Parts(name, router_name, experts, path)
    return None


def _first_int(router: nn.Module, block: nn.Module, paths: tuple[str, ...]) -> str | None:
    for path in paths:
        value = read_attribute(router, block, path)
        if isinstance(value, int) and not isinstance(value, bool):
            return path
    return None


def _block_bias_argument(router: nn.Module) -> bool:
    """Whether the router's ``forward`` takes a second argument: required, or named like a bias (LFM2-MoE's
    ``expert_bias=None``, which its block always passes)."""
    parameters = list(inspect.signature(type(router).forward).parameters.values())[2:]
    return any(p.kind == p.POSITIONAL_OR_KEYWORD and (p.default is inspect.Parameter.empty or "bias" in p.name)
               for p in parameters)


def _tensor_path(router: nn.Module, block: nn.Module, paths: tuple[str, ...], experts: int) -> str | None:
    for path in paths:
        value = read_attribute(router, block, path)
        if isinstance(value, torch.Tensor) and value.numel() == experts:
            return path
    return None


def candidate_rules(router: nn.Module, block: nn.Module, *, num_experts: int) -> tuple[list[dict], list[dict]]:
    """The rule fields a probe tries for ``router``: ``(logit stage, decision stage)``, each a list of field dicts."""
    bias = read_attribute(router, None, "bias")
    logit_bias = "bias" if isinstance(bias, torch.Tensor) and bias.shape == (num_experts,) else None
    logit_stage = [dict(logits_dtype=dtype, logits_cast=logits_cast, logit_bias=logit_bias, no_autocast=no_autocast,
                        softcap="router_logit_softcapping" if hasattr(router, "router_logit_softcapping") else None)
                   for no_autocast in (False, True) for dtype in ("input", "float32", "weight")
                   for logits_cast in ("none", "float32")]
    selection_bias = _tensor_path(router, block, SELECTION_BIAS_PATHS, num_experts)
    groups = next((pair for pair in GROUP_ATTRS if isinstance(getattr(router, pair[0], None), int)
                   and isinstance(getattr(router, pair[1], None), int)), None)
    limits = (None,) if groups is None else tuple(
        GroupLimit(groups=groups[0], kept_groups=groups[1], score=score, fill=fill)
        for fill in ("-inf", "0") for score in ("top2_sum", "max"))
    norm = "norm_topk_prob" if isinstance(getattr(router, "norm_topk_prob", None), bool) else None
    scaling = next((path for path in SCALING_PATHS if isinstance(getattr(router, path, None), (int, float))), None)
    clamp = "norm_min" if isinstance(getattr(router, "norm_min", None), (int, float)) else None
    decision_stage = []
    for score in ("softmax", "sigmoid", "logits"):
        of_chosen = score == "logits"  # top-k of the logits, then softmax over the k: no renormalisation step
        for values in _product(
            sorted_topk=(True, False), weights_dtype=("logits", "float32", "input"), score_dtype=("float32", "logits"),
            renormalize=(False,) if of_chosen else ((norm,) if norm else (True, False)),
            renormalize_epsilon=(0.0,) if of_chosen else ((0.0, 1e-20) if score == "softmax" else (1e-20, 0.0, 1e-6)),
            scaling=(scaling, None) if scaling else (None,), group_limit=limits,
        ):
            decision_stage.append(dict(score=score, weights_from="softmax_of_chosen" if of_chosen else "scores",
                                       selection_bias=selection_bias, renormalize_min=clamp, **values))
    return logit_stage, decision_stage


def _product(**choices: tuple) -> list[dict]:
    return [dict(zip(choices, values, strict=True)) for values in itertools.product(*choices.values())]


def _caller(router: nn.Module, rule: RoutingRule) -> tuple[bool, Any]:
    """How the probe calls the router class's own forward: with the block's selection bias as its second argument
    when the rule says the block passes it."""
    bias_argument = rule.selection_bias_argument is not None

    def call(router_copy: nn.Module, block_copy: Any, hidden: torch.Tensor) -> Any:
        if bias_argument:
            assert rule.selection_bias is not None  # the bias the block passes is the rule's selection bias
            bias = read_attribute(router_copy, block_copy, rule.selection_bias)
            return type(router_copy).forward(router_copy, hidden, bias)
        return type(router_copy).forward(router_copy, hidden)

    return bias_argument, call


def probe_router_rule(router: nn.Module, block: nn.Module, *, top_k: int, num_experts: int,
                      weight_attr: str) -> tuple[RoutingRule | None, str]:
    """The exact rule of ``router`` among :func:`candidate_rules`, or ``(None, why not)``."""
    logit_stage, decision_stage = candidate_rules(router, block, num_experts=num_experts)
    bias_argument = _block_bias_argument(router)
    selection_paths = {fields["selection_bias"] for fields in decision_stage}
    if bias_argument and not any(path and path.startswith("^") for path in selection_paths):
        return None, (f"{type(router).__name__}.forward takes an argument besides the hidden states that is not the "
                      "block's selection bias (a hashed router or a router carrying state between layers)")

    base = RoutingRule(selection_bias_argument=1 if bias_argument else None,
                       selection_bias=next((p for p in selection_paths if p), None))
    _, call = _caller(router, base)
    rules = [dataclasses.replace(base, **decision) for decision in decision_stage]
    return probe_rule(router, block, rules, top_k=top_k, weight_attr=weight_attr, call=call, logit_fields=logit_stage)


@dataclass(frozen=True, kw_only=True)
class GenericTopKRouterSpec(FamilySpec):
    """Structure read from the model, rule probed (see the module docstring)."""

    structural: bool = True

    def check_router(self, router: nn.Module, block: nn.Module, *, top_k: int) -> str | None:
        """Every layer's router must follow the rule probed on the first one, bit for bit."""
        if self.structural:
            return None
        _, call = _caller(router, self.routing)
        rule, why = probe_rule(router, block, [self.routing], top_k=top_k, weight_attr=self.router_weight_attr,
                               call=call)
        return None if rule is not None else f"{type(router).__name__} does not follow the probed rule ({why})"

    def specialise(self, model: nn.Module, *, verify: bool = True) -> FamilySpec | str:
        located = find_layer_list(model, self.layers_attr)
        if located is None:
            return f"no `{self.layers_attr}` module list on the base model (nor on a text decoder inside it)"
        _, layers = located
        found: dict[int, tuple[_Parts, nn.Module]] = {}
        for index, decoder_layer in enumerate(layers):
            for name, child in decoder_layer.named_children():
                parts = _parts_of(name, child)
                if parts is not None:
                    found[index] = (parts, child)
                    break
        if not found:
            return "no sparse MoE block (a child with `experts` and a `gate` / `router` holding an [E, H] weight)"
        parts, block = next(iter(found.values()))
        if any(other != parts for other, _ in found.values()):
            return "sparse blocks of different layers name their router, experts or weight differently"
        router = getattr(block, parts.router_attr)
        num_experts_attr = _first_int(router, block, NUM_EXPERTS_PATHS) or f"{parts.weight_attr}.shape.0"
        weight = read_attribute(router, block, parts.weight_attr)
        assert isinstance(weight, torch.Tensor)  # _parts_of found the block by this 2-D weight
        rows = int(weight.shape[0]) if weight.numel() else None
        matching = next((path for path in NUM_EXPERTS_PATHS if read_attribute(router, block, path) == rows), None)
        if rows is not None and matching is not None:
            # an expert count equal to the logits' width is what the router chooses among (LongCat's
            # n_routed_experts counts its zero-computation experts too; Inkling's extra row scores a shared expert)
            num_experts_attr = matching
        top_k_attr = _first_int(router, block, TOP_K_PATHS)
        if top_k_attr is None:
            return f"router {type(router).__name__} has no integer top-k attribute ({', '.join(TOP_K_PATHS)})"
        # integers (or values equal to the weight's row count) where the paths were chosen above
        num_experts = int(cast(SupportsInt, read_attribute(router, block, num_experts_attr)))
        top_k = int(cast(SupportsInt, read_attribute(router, block, top_k_attr)))
        rule, problem = RoutingRule(), None
        if verify:
            probed, why = probe_router_rule(router, block, top_k=top_k, num_experts=num_experts,
                                            weight_attr=parts.weight_attr)
            if probed is None:
                problem = f"no exact routing rule found for {type(router).__name__} ({why})"
            else:
                rule = probed
        else:
            problem = "the routing rule was not probed (structure-only view)"
        scores_are: Literal["sigmoid_logits", "logits"] = "sigmoid_logits" if rule.score == "sigmoid" else "logits"
        shared = tuple(name for name in SHARED_NAMES if isinstance(getattr(block, name, None), nn.Module))
        return dataclasses.replace(
            self,
            block_classes=tuple(sorted({type(b).__name__ for _, b in found.values()})),
            block_attr=parts.block_attr,
            router_attr=parts.router_attr,
            experts_attr=parts.experts_attr,
            router_weight_attr=parts.weight_attr,
            num_experts_attr=num_experts_attr,
            top_k_attr=top_k_attr,
            routing=rule,
            routing_problem=problem,
            router_output=RouterOutput(scores_are=scores_are),
            shared_expert_attrs=shared,
            structural=False,
        )


GENERIC_TOPK = register(
    GenericTopKRouterSpec(
        name="generic_topk",
        model_types=(),
        block_classes=(),
        routing=RoutingRule(renormalize="norm_topk_prob", weights_dtype="logits"),
        gate_substring_note="router mlp.gate.weight; fused experts mlp.experts.gate_up_proj (gate AND up halves)",
    ),
    fallback=True,
)
