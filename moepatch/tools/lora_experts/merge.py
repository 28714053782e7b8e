"""Fold single-expert LoRA / (IA)³ sets into the base weights, exactly, and remove every trace of them.

A set with one expert is a fixed function: the router's softmax over a single logit is exactly 1 (top-1 of one
expert renormalises to 1 as well), so ``Δ(x) = (α / r) · B A x`` is the plain LoRA ``ΔW = (α / r) · B A`` and MoV's
``t ⊙ (1 + δ)`` is (IA)³ — a scale of the weight's rows (output placement, bias included) or of its columns (input
placement).  Anything with more than one expert mixes the experts with per-token router weights, which no fixed
weight reproduces: such sets are refused, each named, before anything is changed.

The expert sets leave through the patch handle's undo log (modules, hooks, replaced forwards, frozen flags, the
config block all restored), then the deltas are added to the base weights — through the family's expert-storage
adapter for routed experts — and the other features of the patch are applied again without ``lora_experts``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING
from typing import cast

import torch
from torch import nn

from model_patches.expert_storage import storage_of
from model_patches.structure import MoEModel
from moepatch.config import MoePatchConfig
from moepatch.config import write_config
from moepatch.lora_experts.inject import ATTRIBUTE
from moepatch.lora_experts.inject import LoraTarget
from moepatch.lora_experts.inject import plan_lora_experts
from moepatch.lora_experts.layers import LoraExperts
from moepatch.lora_experts.layers import VectorExperts
from moepatch.lora_experts.routed import RoutedExpertSets
from moepatch.patch import apply
from moepatch.patch import checkpoint_folder
from moepatch.patch import get_handle

if TYPE_CHECKING:
    from moepatch.patch import PatchHandle

FEATURE = "lora_experts"


@dataclass
class ExpertSetSite:
    """One expert set of an adapted projection: ``routed_expert`` is ``None`` for an ``nn.Linear`` (or identity)."""

    target: LoraTarget
    expert_set: LoraExperts | VectorExperts
    routed_expert: int | None


def lora_handle(model: nn.Module) -> PatchHandle:
    """The active patch handle that installed LoRA experts on ``model`` (or on a module inside it, e.g. a PEFT
    wrapper's base model); ``ValueError`` when the model carries none."""

    for module in model.modules():
        handle = get_handle(module)
        if handle is not None and FEATURE in handle.installed:
            return handle
    raise ValueError("lora_experts: the model carries no LoRA experts (apply a lora_experts config first)")


def expert_set_sites(handle: PatchHandle) -> list[ExpertSetSite]:
    """Every installed expert set with the projection it adapts (re-planned from the handle's config)."""

    moe: MoEModel = handle.require_moe_model()
    config = handle.config.features[FEATURE]
    targets = plan_lora_experts(moe, config, checkpoint_folder(moe.inner), f"moepatch.{FEATURE}")
    one_per_module = storage_of(moe).one_projection_per_module
    sites = []
    for target in targets:
        attached = getattr(target.module, ATTRIBUTE)  # an expert set, RoutedExpertSets or a ModuleDict of them
        if target.storage in ("linear", "identity"):
            sites.append(ExpertSetSite(target, attached, None))
            continue
        routed = cast(RoutedExpertSets, attached if one_per_module else attached[target.projection])
        if routed.held is not None:
            raise ValueError(f"lora_experts: {target.path} holds only the routed experts {routed.held.start}.."
                             f"{routed.held.stop - 1} of this process (expert parallelism): save the LoRA experts "
                             "(save_pretrained gathers every process's) and merge or export them on a single-process "
                             "model")
        sites.extend(ExpertSetSite(target, cast("LoraExperts | VectorExperts", expert_set), e)
                     for e, expert_set in enumerate(routed.sets))
    return sites


def fold_problem(site: ExpertSetSite) -> str | None:
    """Why this expert set cannot be folded into a weight, or ``None``."""
    expert_set = site.expert_set
    if expert_set.num_experts != 1:
        return (f"{site.target.path}: {expert_set.num_experts} experts mixed per token (top_k="
                f"{expert_set.router.top_k}) — token-dependent routing cannot be folded into one weight")
    if site.target.storage == "identity":
        return f"{site.target.path}: an (IA)³ scale of a projection that is the identity has no weight to fold into"
    return None


def _single_vector(expert_set: VectorExperts) -> torch.Tensor:
    """δ of a one-expert MoV set over the whole width (float32): ``delta[0]``, or per head ``delta[:, 0]`` laid
    out head after head as the projection's output is."""
    delta = expert_set.delta.detach().float()
    return delta[0] if expert_set.heads is None else delta[:, 0].reshape(-1)


def weight_delta(site: ExpertSetSite, weight: torch.Tensor) -> torch.Tensor:
    """ΔW (float32, ``[out, in]``) of a single-expert set on a projection whose ``[out, in]`` weight is ``weight``."""
    expert_set = site.expert_set
    if isinstance(expert_set, LoraExperts):
        a, b = expert_set.lora_A[0].float(), expert_set.lora_B[0].float()
        return expert_set.scaling[0] * (b @ a)
    delta = _single_vector(expert_set)  # the (IA)³ vector is 1 + δ: W·diag(1+δ) − W = W·diag(δ)
    if site.target.placement == "input":
        return weight.float() * delta[None, :]
    return weight.float() * delta[:, None]


def plan_folds(handle: PatchHandle) -> list[Callable[[], None]]:
    """One closure per expert set adding its ΔW to the base (computed now, applied later); ``ValueError`` naming
    every set that cannot be folded."""
    sites = expert_set_sites(handle)
    problems = list(dict.fromkeys(p for p in map(fold_problem, sites) if p is not None))  # once per projection
    if problems:
        raise ValueError("lora_experts: these expert sets cannot be merged into the base weights (nothing changed):\n  "
                         + "\n  ".join(problems))
    storage = storage_of(handle.require_moe_model())
    folds: list[Callable[[], None]] = []
    with torch.no_grad():
        for site in sites:
            target = site.target
            if site.routed_expert is None:
                folds.append(_linear_fold(site, cast(nn.Linear, target.module)))  # "linear" storage: an nn.Linear
                continue
            projection = target.require_routed().projection
            weight = storage.expert_weight(target.module, projection, site.routed_expert)
            folds.append(partial(storage.fold, target.module, projection, site.routed_expert,
                                 weight_delta(site, weight)))
    return folds


def _linear_fold(site: ExpertSetSite, module: nn.Linear) -> Callable[[], None]:
    delta = weight_delta(site, module.weight)
    bias_scale = None
    if isinstance(site.expert_set, VectorExperts) and site.target.placement == "output" and module.bias is not None:
        bias_scale = _single_vector(site.expert_set).clone()

    def fold() -> None:
        module.weight.add_(delta.to(module.weight.dtype))
        if bias_scale is not None:
            module.bias.add_((module.bias.float() * bias_scale).to(module.bias.dtype))

    return fold


def merge_into_base(model: nn.Module) -> PatchHandle | None:
    """Fold single-expert LoRA / (IA)³ experts into the base weights and remove the expert modules.

    Exact for every set with one expert (``num_experts: 1``): plain LoRA on linear projections and on each routed
    expert (fused, ``ParameterList``, ``ParallelExperts`` and row-stacked storages), (IA)³ scales of a projection's
    output (weight rows and bias) or input (weight columns).  Sets with several experts are refused — each is mixed
    with per-token router weights, so no fixed weight reproduces it — naming every such module; the model is then
    left exactly as it was.

    The patch is removed through its undo log (no hook, replaced forward or extra attribute stays), the
    ``lora_experts`` block leaves ``model.config.moepatch`` (a saved merged model loads as a plain one), and the
    patch's other features, if any, are applied again.

    Args:
        model (`nn.Module`): a model patched by ``moepatch.apply`` with a ``lora_experts`` block.

    Returns:
        `PatchHandle` or `None`: the handle of the re-applied other features (the earlier handle is inactive), or
        ``None`` when ``lora_experts`` was the only feature.

    Raises:
        ValueError: the model carries no LoRA experts, or some expert set cannot be folded (nothing changed).

    Example:
        ```python
        moepatch.apply(model, {"lora_experts": {"method": "molora", "num_experts": 1, "r": 8}})
        ...  # train
        merge_into_base(model)  # plain weights again: W + (α / r)·B A
        model.save_pretrained("merged")
        ```
    """

    handle = lora_handle(model)
    folds = plan_folds(handle)
    remaining = handle.config.copy()
    setattr(remaining, FEATURE, None)
    patched = handle.model
    handle.remove()
    with torch.no_grad():
        for fold in folds:
            fold()
    stored = MoePatchConfig.from_model(patched)
    if getattr(stored, FEATURE) is not None:  # the block came with the model: the merged model has no experts
        setattr(stored, FEATURE, None)
        write_config(patched, stored)
    return None if remaining.is_empty else apply(patched, remaining)
