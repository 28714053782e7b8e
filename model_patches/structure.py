"""Resolve a model instance into the parts features work on: its family, MoE layers, routers and experts.

:func:`describe` is the only code that walks a model's module tree; every feature receives the resulting
:class:`MoEModel` and never looks for ``mlp`` or ``gate`` itself.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError
from importlib.metadata import version
from typing import Protocol
from typing import cast

import torch
from torch import nn

from model_patches import registry
from model_patches.diagnosis import diagnose
from model_patches.errors import UnsupportedModelError
from model_patches.spec import FamilySpec
from model_patches.spec import read_attribute


@dataclass(frozen=True)
class MoELayer:
    """One sparse MoE block of a model."""

    index: int
    """Absolute decoder-layer index."""
    name: str
    """Qualified name of the block inside the model given to :func:`describe` (``model.layers.3.mlp``)."""
    block: nn.Module
    router: nn.Module
    experts: nn.Module


@dataclass(frozen=True)
class MoEModel:
    """The MoE structure of one model instance, as seen through its :class:`~model_patches.spec.FamilySpec`."""

    family: FamilySpec
    root: nn.Module
    """The model as given (a PEFT wrapper stays the root, so parameter names match the user's optimizer)."""
    inner: nn.Module
    """The transformers model inside any wrapper (the ``*ForCausalLM`` that computes the losses)."""
    decoder: nn.Module
    """The module whose forward receives the user's ``attention_mask``: the owner of the layer list, or the base model
    of a multimodal wrapper around its text decoder (whose forward gets the masks already built)."""
    num_layers: int
    layers: tuple[MoELayer, ...]
    dense_layers: tuple[int, ...]
    num_experts: int
    top_k: int
    renormalize: bool
    hashed_layers: tuple[int, ...] = ()
    """MoE layers whose router chooses by a fixed hash of the token id (:attr:`FamilySpec.hashed_routers`)."""
    layer_list: nn.ModuleList | None = None
    """The decoder layers (dense and MoE); ``None``: the decoder's ``layers_attr`` list (:func:`decoder_layers`)."""
    routing_problem: str | None = None
    """Why the family's :class:`~model_patches.spec.RoutingRule` does not describe these routers (a setting it does not
    cover, a probe that found no exact rule, every router hashed), or ``None``.  Features that only need
    *where* the routers and experts are (freezing, statistics, LoRA experts, task experts, data mixing, loading) work
    either way; those that re-run the rule (C2R, the balance loss on the actual choice, the bias update) refuse with
    it."""

    def require_routing_rule(self, field: str) -> None:
        """``ValueError`` naming ``field`` when the routing rule is not known exactly (:attr:`routing_problem`)."""
        if self.routing_problem is not None:
            raise ValueError(f"{field}: needs the exact routing rule of the model's routers, and moepatch does not "
                             f"have it for {type(self.inner).__name__} ({self.family.name}): {self.routing_problem}")

    def require_renumbering(self, field: str) -> None:
        """``ValueError`` naming ``field`` when the experts cannot be renumbered: the routing rule is not known exactly,
        or the family says why its experts are not addressed by per-expert rows
        (:attr:`~model_patches.spec.FamilySpec.renumbering_problem`: Doge's product keys)."""
        self.require_routing_rule(field)
        if self.family.renumbering_problem is not None:
            raise ValueError(f"{field}: {type(self.inner).__name__} ({self.family.name}): "
                             f"{self.family.renumbering_problem}")

    @property
    def moe_layer_indices(self) -> list[int]:
        return [layer.index for layer in self.layers]

    def layer(self, index: int) -> MoELayer:
        """The MoE layer with absolute index ``index`` (callers validate the index first)."""
        for layer in self.layers:
            if layer.index == index:
                return layer
        raise KeyError(index)


def decoder_layers(model: MoEModel) -> nn.ModuleList:
    """The decoder's layer list (dense and MoE layers)."""
    if model.layer_list is not None:
        return model.layer_list
    return getattr(model.decoder, model.family.layers_attr)


def extra_routers(model: MoEModel) -> list[nn.Module]:
    """The family's ``extra_routers`` of every decoder layer (e.g. ModuleFormer's attention-expert gates)."""
    found = []
    for decoder_layer in decoder_layers(model):
        for path in model.family.extra_routers:
            module = attribute_path(decoder_layer, path)
            if isinstance(module, nn.Module):
                found.append(module)
    return found


def router_modules(model: MoEModel) -> list[nn.Module]:
    """Every module that routes: the top-k routers, the extra routers, and shared-expert gates (a shared expert's
    one-output gate is a router of its own)."""
    found = [layer.router for layer in model.layers]
    for layer in model.layers:
        for name in model.family.shared_expert_attrs:
            module = getattr(layer.block, name, None)
            if isinstance(module, nn.Linear) and module.out_features == 1:
                found.append(module)
    return found + extra_routers(model)


def identity_projections(model: MoEModel) -> dict[int, int]:
    """``id(module) -> decoder layer index`` of the family's ``identity_projections`` (width-preserving identities)."""
    found = {}
    for index, decoder_layer in enumerate(decoder_layers(model)):
        for path in model.family.identity_projections:
            module = attribute_path(decoder_layer, path)
            if isinstance(module, nn.Module):
                found[id(module)] = index
    return found


def key_value_heads(model: MoEModel, width: int) -> int | None:
    """How many attention heads a key / value projection's output of ``width`` holds, from the model config:
    transformers' ``num_key_value_heads`` (else ``num_attention_heads``, which MoLM's config maps onto its
    ``n_head``); ``None`` when the config has neither, or ``width`` is not a whole number of heads (of the config's
    ``head_dim``, when it states one)."""
    config = model.inner.config
    heads = getattr(config, "num_key_value_heads", None) or getattr(config, "num_attention_heads", None)
    if not isinstance(heads, int) or heads < 1 or width % heads:
        return None
    head_dim = getattr(config, "head_dim", None)
    return heads if not isinstance(head_dim, int) or heads * head_dim == width else None


def layer_indexer(model: MoEModel) -> Callable[[str], int | None]:
    """A function giving the decoder-layer index of a module path (relative to ``model.inner``), ``None`` for
    paths outside the decoder layers."""
    names = {id(module): name for name, module in model.inner.named_modules()}
    prefixes = [(names[id(layer)], index) for index, layer in enumerate(decoder_layers(model)) if id(layer) in names]

    def index_of(path: str) -> int | None:
        for prefix, index in prefixes:
            if path == prefix or path.startswith(prefix + "."):
                return index
        return None

    return index_of


def device_of(module: nn.Module) -> torch.device:
    """Device of the module's first materialised parameter (CPU when it has none, or only meta ones)."""
    for parameter in module.parameters():
        if parameter.device.type != "meta":
            return parameter.device
    return torch.device("cpu")


def attribute_path(module: object, path: str) -> object:
    """``module.a.b.c`` for ``path`` ``"a.b.c"``; ``None`` when a step is missing."""
    for part in path.split("."):
        module = getattr(module, part, None)
    return module


class _Wrapper(Protocol):
    """A PEFT-style wrapper around a transformers model."""

    def get_base_model(self) -> nn.Module: ...


def _unwrap(model: nn.Module) -> nn.Module:
    """Peel PEFT-style wrappers (``get_base_model``) and return the transformers model."""
    seen = set()
    while hasattr(model, "get_base_model") and id(model) not in seen:
        seen.add(id(model))
        inner = cast(_Wrapper, model).get_base_model()
        if inner is model:
            break
        model = inner
    return model


TEXT_DECODER_ATTRS = ("language_model",)
"""Where a multimodal base model keeps its text decoder (transformers' ``*ForConditionalGeneration``: Gemma 4, ...)."""


def find_layer_list(model: nn.Module, layers_attr: str) -> tuple[nn.Module, nn.ModuleList] | None:
    """``(decoder, layers)``: the module called with the user's ``attention_mask`` and the ``layers_attr`` module list
    of decoder layers it runs, or ``None``.

    The list is the base model's own, else that of its text decoder (:data:`TEXT_DECODER_ATTRS`).  A multimodal
    wrapper's decoder stays its base model: the text decoder inside is called with the masks the wrapper built (Gemma
    4: a dict of 4-D masks per attention kind), from which padding cannot be read.
    """
    base = getattr(model, "base_model", model)
    candidates = (base, model, getattr(model, "model", None))  # Llama4ForCausalLM: base_model is itself
    for candidate in candidates:
        layers = getattr(candidate, layers_attr, None)
        if candidate is not None and isinstance(layers, nn.ModuleList):
            return candidate, layers
    for candidate in candidates:
        for name in TEXT_DECODER_ATTRS:
            layers = getattr(getattr(candidate, name, None), layers_attr, None)
            if candidate is not None and isinstance(layers, nn.ModuleList):
                return candidate, layers
    return None


def _model_type(model: nn.Module) -> str | None:
    config = getattr(model, "config", None)
    return getattr(config, "model_type", None)


def _text_model_type(model: nn.Module) -> str | None:
    """The ``model_type`` of the text part of a multimodal config (``get_text_config()``; Gemma 4's ``gemma4`` →
    ``gemma4_text``), ``None`` when the config has no separate one: the family of a wrapper's text decoder is the
    wrapper's, its layers found inside (:func:`find_layer_list`)."""
    get_text_config = getattr(getattr(model, "config", None), "get_text_config", None)
    if not callable(get_text_config):
        return None
    try:
        text_type = getattr(get_text_config(), "model_type", None)
    except Exception:  # a config whose text part cannot be read (remote code) has none moepatch can use
        return None
    return text_type if text_type != _model_type(model) else None


def _group_capacity_problem(spec: FamilySpec, layer: MoELayer, top_k: int) -> str | None:
    """A group limit whose kept groups hold fewer than k experts makes the router choose dropped experts (weight 0 or
    a -inf score): a case the rule does not express."""
    limit = spec.routing.active_group_limit(layer.router, layer.block)
    if limit is None:
        return None
    groups = read_attribute(layer.router, layer.block, limit.groups)
    kept = read_attribute(layer.router, layer.block, limit.kept_groups)
    experts = read_attribute(layer.router, layer.block, spec.num_experts_attr)
    if (not (isinstance(groups, int) and isinstance(kept, int) and isinstance(experts, int)) or groups < 1
            or experts % groups):
        return f"group limit {limit.groups}={groups!r} does not split the {experts!r} experts into equal groups"
    if kept * (experts // groups) < top_k:
        return (f"group limit keeps {kept} of {groups} groups of {experts // groups} experts, fewer than top-{top_k}: "
                "the router then chooses experts of dropped groups, which moepatch's rule does not express")
    return None


def _try_family(model: nn.Module, root: nn.Module, spec: FamilySpec, verify: bool) -> MoEModel | str:
    """Build the :class:`MoEModel` for ``spec`` or return why ``model`` does not fit it."""
    found = find_layer_list(model, spec.layers_attr)
    if found is None:
        return (f"no `{spec.layers_attr}` module list on the base model (nor on a text decoder "
                f"`{'` / `'.join(TEXT_DECODER_ATTRS)}` inside it)")
    decoder, layer_list = found
    prefix = {id(module): name for name, module in root.named_modules()}
    moe_layers, dense = [], []
    for index, decoder_layer in enumerate(layer_list):
        block = spec.block_of(decoder_layer)
        if block is None or not spec.is_sparse_block(block):
            dense.append(index)
            continue
        router = attribute_path(block, spec.router_attr)
        experts = attribute_path(block, spec.experts_attr)
        if not isinstance(router, nn.Module) or not isinstance(experts, nn.Module):
            return f"layer {index}: sparse block has no `{spec.router_attr}` router or `{spec.experts_attr}` experts"
        moe_layers.append(MoELayer(index, prefix.get(id(block), f"layers.{index}"), block, router, experts))
    if not moe_layers:
        return f"no sparse MoE block ({', '.join(spec.block_classes) or 'top-k router block'}) in any layer"

    def router_int(layer: MoELayer, attr: str) -> int | str:
        value = read_attribute(layer.router, layer.block, attr)
        owner = "sparse block" if attr.startswith("^") else "router"
        return value if isinstance(value, int) else f"layer {layer.index}: {owner} has no integer `{attr.lstrip('^')}`"

    first = moe_layers[0]
    num_experts, top_k = router_int(first, spec.num_experts_attr), router_int(first, spec.top_k_attr)
    if isinstance(num_experts, str):
        return num_experts
    if isinstance(top_k, str):
        return top_k
    if num_experts < 1 or not 1 <= top_k <= num_experts:
        return (f"layer {first.index}: router chooses top-{top_k} of {num_experts} experts; expected "
                f"1 <= top-k <= experts (check the config's expert count and experts per token)")
    hashed = tuple(layer.index for layer in moe_layers
                   if {cls.__name__ for cls in type(layer.router).__mro__} & set(spec.hashed_routers))
    learned = [layer for layer in moe_layers if layer.index not in hashed]
    if learned:
        first = learned[0]
    renormalize = spec.routing.renormalizes(first.router, first.block)
    routing_problem = spec.routing_problem
    for layer in moe_layers:
        if (router_int(layer, spec.num_experts_attr), router_int(layer, spec.top_k_attr)) != (num_experts, top_k):
            return f"layer {layer.index}: expert count or top-k differs from layer {first.index}"
        if routing_problem is not None or layer.index in hashed:
            continue
        if spec.routing.renormalizes(layer.router, layer.block) != renormalize:
            routing_problem = f"layer {layer.index}: renormalisation differs from layer {first.index}"
            continue
        problem = spec.requirement_problem(layer.router, layer.block) or _group_capacity_problem(spec, layer, top_k)
        if problem is None and verify:
            problem = spec.check_router(layer.router, layer.block, top_k=top_k)
        if problem is not None:
            routing_problem = f"layer {layer.index}: {problem}"
    return MoEModel(
        family=spec,
        root=root,
        inner=model,
        decoder=decoder,
        num_layers=len(layer_list),
        layers=tuple(moe_layers),
        dense_layers=tuple(dense),
        num_experts=num_experts,
        top_k=top_k,
        renormalize=renormalize,
        hashed_layers=hashed,
        layer_list=layer_list,
        routing_problem=routing_problem if learned else f"every MoE layer's router is hashed ({spec.hashed_routers})",
    )


def describe(model: nn.Module, family: str | None = None, *, verify: bool = True) -> MoEModel:
    """Resolve ``model`` into its MoE structure.

    Args:
        model (`nn.Module`): a transformers MoE model (a ``*ForCausalLM``, its base model, or a PEFT wrapper).
        family (`str`, *optional*): force a family by name instead of choosing it from ``config.model_type`` (for
            a multimodal wrapper no family claims: its text config's, ``get_text_config().model_type``).
        verify (`bool`, *optional*, defaults to `True`): let families that probe their routers do so; ``False``
            only for structure-only views (``moepatch inspect`` on a meta-device skeleton).

    Raises:
        UnsupportedModelError: no family fits; the message names the model class, its ``model_type``, why each
            candidate family was rejected, and the supported families.
        ValueError: ``family`` names no registered family.
    """
    inner = _unwrap(model)
    model_type = _model_type(inner)
    if family is not None:
        candidates = [registry.get_family(family)]
    else:
        claimed = registry.family_for_model_type(model_type)
        candidates = [claimed] if claimed is not None else registry.fallback_families()
        text_family = None if claimed is not None else registry.family_for_model_type(_text_model_type(inner))
        if text_family is not None:  # a multimodal wrapper: its text decoder's family first, the fallback after
            candidates = [text_family, *candidates]
    reasons = []
    for spec in candidates:
        if spec.structural:  # a fallback reads the attribute names (and probes the rule) of this very model
            specialised = spec.specialise(inner, verify=verify)
            if isinstance(specialised, str):
                reasons.append(f"{spec.name}: {specialised}")
                continue
            spec = specialised
        result = _try_family(inner, model, spec, verify)
        if isinstance(result, MoEModel):
            return result
        forced = f" (the family was forced by moepatch.family = {family!r})" if family is not None else ""
        reasons.append(f"{spec.name}: {result}{forced}")
    if family is None and claimed is None:  # only the structural fallback was tried: say what the router does
        diagnosis = diagnose(inner)
        if diagnosis is not None:
            reasons.insert(0, diagnosis)

    try:
        __version__ = version("moepatch")
    except PackageNotFoundError:  # a source tree on sys.path, not installed
        __version__ = "(source)"

    raise UnsupportedModelError(
        f"moepatch {__version__} cannot patch {type(inner).__name__} (model_type={model_type!r}): "
        + ("; ".join(reasons) or "no family fits")
        + f". Supported families: {registry.supported_summary()}."
    )


class LayerIndexError(ValueError):
    """Every bad entry of one layer list as ``(field, message)`` pairs (``problems``), so a command can list and count
    them one by one; the text joins them with ``; ``."""

    def __init__(self, problems: list[tuple[str, str]]) -> None:
        self.problems = problems
        super().__init__("; ".join(f"{field}: {message}" for field, message in problems))


def resolve_layer_indices(model: MoEModel, layers: list[int] | None, field: str) -> list[int]:
    """Turn user layer indices (negative = from the last decoder layer) into sorted absolute MoE-layer indices.

    Every routing-statistics entry point (``RoutingRecorder``, ``routing_stats``, probe layers) resolves its layers
    here.

    Raises:
        ValueError: naming ``field``, the offending entry and the model's MoE layers, when an index is not an
            integer, is out of range, is repeated, or points at a dense layer.
    """
    if layers is None:
        return model.moe_layer_indices
    moe = set(model.moe_layer_indices)
    resolved: list[int] = []
    problems: list[tuple[str, str]] = []
    for position, index in enumerate(layers):
        where = f"{field}[{position}]"
        if not isinstance(index, int) or isinstance(index, bool):
            problems.append((where, f"expected an integer layer index, got {index!r}"))
            continue
        absolute = index + model.num_layers if index < 0 else index
        if not 0 <= absolute < model.num_layers:
            problems.append(
                (where, f"layer {index} does not exist (the model has {model.num_layers} decoder layers)")
            )
        elif absolute not in moe:
            problems.append((where, f"layer {index} is a dense layer; MoE layers are {sorted(moe)}"))
        elif absolute in resolved:
            problems.append((where, f"layer {index} is listed twice"))
        else:
            resolved.append(absolute)
    if problems:
        raise LayerIndexError(problems)
    return sorted(resolved)
