"""peft's ``add_weighted_adapter``, extended to adapters on fused routed experts (peft ``target_parameters``).

peft merges LoRA on linear layers (``cat``: the weighted ``A``'s and the ``B``'s stacked along the rank axis;
``svd``: that sum truncated), but refuses any adapter with ``target_parameters`` — the only way peft reaches the
routed experts of a transformers-5 MoE, whose experts are one 3-D tensor ``[experts, …]``.  MELD's experts on an
MoE base may well adapt those experts, so :func:`add_weighted_adapter` lets peft merge every linear module and
merges the fused ones itself, in peft's own storage (:class:`peft.tuners.lora.layer.ParamWrapper`):

* ``lora_A`` is ``[experts·r, in]``, expert-major (``view(experts, r, in)``);
* ``lora_B`` is ``[out, r·experts]``, expert-minor (``view(out, r, experts)``);
* expert ``e``'s delta is ``scaling · B[:, :, e] @ A[e]``.

``cat`` stacks, for every expert, ``wᵢ·sᵢ/s·Aᵢ[e]`` and ``Bᵢ[:, :, e]`` along the rank axis (``s`` the merged
adapter's scaling): each expert's merged delta is exactly ``Σ wᵢ·sᵢ·Bᵢ[e]Aᵢ[e]``, the same rule peft applies to a
linear layer.  ``svd`` truncates each expert's weighted sum to the merged rank.  The merged adapter is a plain
peft adapter with the same ``target_parameters``: ``save_pretrained`` writes it and ``PeftModel.from_pretrained``
loads it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from peft.tuners.lora.layer import LoraLayer
from peft.tuners.lora.layer import ParamWrapper


def fused_wrappers(model: torch.nn.Module, adapters: Sequence[str]) -> list[Any]:
    """peft's ``ParamWrapper`` layers (LoRA on a parameter) that hold any of ``adapters``; ``ValueError`` when one
    holds only some of them (their ``target_parameters`` differ)."""
    found = []
    for name, module in model.named_modules():
        if not isinstance(module, ParamWrapper):
            continue
        held = [adapter for adapter in adapters if adapter in module.lora_A]
        if held and len(held) != len(adapters):
            missing = sorted(set(adapters) - set(held))
            raise ValueError(f"{name}.{module.parameter_name}: adapted by {held} but not by {missing}")
        if held:
            found.append(module)
    return found


def add_weighted_adapter(model: Any, adapters: Sequence[str], weights: Sequence[float], adapter_name: str,
                         combination_type: str = "cat", svd_rank: int | None = None) -> None:
    """``model.add_weighted_adapter(...)`` (peft, ``cat`` or ``svd``), also for adapters with ``target_parameters``.

    Without ``target_parameters`` this is peft's call, unchanged.  With them (all adapters must share the same
    set, as peft requires to load them together), peft merges the linear modules with the parameters hidden from
    its check, and every fused parameter is merged here (module docstring).  ``ValueError`` on any mismatch and for
    rsLoRA adapters (peft's merge gives the result scaling √r on top of the folded scalings); on any failure the
    half-built adapter is deleted, so a retry starts clean.
    """
    if combination_type not in ("cat", "svd"):
        raise ValueError(f"combination_type: expected 'cat' or 'svd', got {combination_type!r}")
    if adapter_name in model.peft_config:  # peft would return silently, keeping the old adapter under this name
        raise ValueError(f"adapter_name: {adapter_name!r} is already loaded")
    configs = [model.peft_config[adapter] for adapter in adapters]
    parameters = [tuple(sorted(getattr(config, "target_parameters", None) or ())) for config in configs]
    rslora = [adapter for adapter, config in zip(adapters, configs, strict=True)
              if getattr(config, "use_rslora", False)]
    if rslora:  # peft's cat / svd fold each scaling into A but give the merged adapter scaling √r, not 1
        raise ValueError(f"the adapters {rslora} use rsLoRA: peft's merge would be off by the merged scaling √r")
    if len(set(parameters)) > 1:
        raise ValueError(f"the adapters {list(adapters)} adapt different fused parameters "
                         f"{sorted(set(parameters))}: only adapters with the same target_parameters merge")
    if combination_type == "svd" and svd_rank is not None:
        narrow = _narrowest_linear(model, adapters)
        if narrow is not None and svd_rank > min(narrow[1]):
            raise ValueError(f"svd_rank: {svd_rank} exceeds the smaller side of {narrow[0]} ({narrow[1][0]}×"
                             f"{narrow[1][1]}); peft would write factors of another shape than its config says")
    wrappers = fused_wrappers(model, adapters) if any(parameters) else []
    original = [config.target_parameters for config in configs]
    try:
        try:
            for config in configs:  # peft's own check refuses target_parameters; its linear merge is what we want
                config.target_parameters = None if any(parameters) else config.target_parameters
            model.add_weighted_adapter(list(adapters), list(weights), adapter_name=adapter_name,
                                       combination_type=combination_type, svd_rank=svd_rank)
        finally:
            for config, value in zip(configs, original, strict=True):
                config.target_parameters = value
        if any(parameters):
            merged_config = model.peft_config[adapter_name]
            merged_config.target_parameters = list(original[0])
            for wrapper in wrappers:
                merge_fused(wrapper, adapters, weights, adapter_name, merged_config, combination_type)
    except BaseException:
        if adapter_name in model.peft_config:  # a half-built adapter would be taken for the merge later
            model.delete_adapter(adapter_name)
        raise


def _narrowest_linear(model: torch.nn.Module, adapters: Sequence[str]) -> tuple[str, tuple[int, int]] | None:
    """The linear LoRA layer (not a fused parameter) holding ``adapters`` with the smallest side, and its
    ``(out, in)``."""
    found: tuple[str, tuple[int, int]] | None = None
    for name, module in model.named_modules():
        if isinstance(module, LoraLayer) and not isinstance(module, ParamWrapper) and any(
                adapter in module.lora_A for adapter in adapters):
            assert module.out_features is not None and module.in_features is not None  # lora_A/B were built from them
            shape = (module.out_features, module.in_features)
            if found is None or min(shape) < min(found[1]):
                found = (name, shape)
    return found


@torch.no_grad()
def merge_fused(wrapper: Any, adapters: Sequence[str], weights: Sequence[float], adapter_name: str,
                config: Any, combination_type: str) -> None:
    """Add ``adapter_name`` to one ``ParamWrapper``: the ``cat`` (or ``svd``) merge of ``adapters``, expert by
    expert, at rank ``config.r`` and scaling ``config.lora_alpha / config.r``."""
    experts, rank = wrapper.num_experts, config.r
    wrapper.update_layer(adapter_name, rank, config.lora_alpha, config=config)
    scaling = wrapper.scaling[adapter_name]
    a_parts, b_parts = [], []
    for adapter, weight in zip(adapters, weights, strict=True):
        a = wrapper.lora_A[adapter].weight.double()
        b = wrapper.lora_B[adapter].weight.double()
        r = wrapper.r[adapter]
        a_parts.append(a.reshape(experts, r, a.shape[-1]) * (weight * wrapper.scaling[adapter] / scaling))
        b_parts.append(b.reshape(b.shape[0], r, experts))
    a_cat, b_cat = torch.cat(a_parts, dim=1), torch.cat(b_parts, dim=1)  # [E, Σr, in], [out, Σr, E]
    if combination_type == "svd":
        a_cat, b_cat = _truncate_per_expert(a_cat, b_cat, rank)
    stacked = a_cat.shape[1]
    if stacked > rank:
        raise ValueError(f"{wrapper.parameter_name}: the merged rank {stacked} exceeds the adapter's rank {rank}")
    a_new = a_cat.new_zeros(experts, rank, a_cat.shape[-1])
    b_new = b_cat.new_zeros(b_cat.shape[0], rank, experts)
    a_new[:, :stacked], b_new[:, :stacked] = a_cat, b_cat  # peft zero-pads a smaller stack the same way
    target_a, target_b = wrapper.lora_A[adapter_name].weight, wrapper.lora_B[adapter_name].weight
    target_a.copy_(a_new.reshape(experts * rank, -1).to(target_a.dtype))
    target_b.copy_(b_new.reshape(b_new.shape[0], rank * experts).to(target_b.dtype))
    target_a.requires_grad_(False)
    target_b.requires_grad_(False)


def _truncate_per_expert(a: torch.Tensor, b: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Each expert's ``B[:, :, e] @ A[e]`` truncated to its ``rank`` largest singular directions (``B = U·S``,
    ``A = Vᴴ``, as peft's svd merge)."""
    experts = a.shape[0]
    a_out = a.new_zeros(experts, rank, a.shape[-1])
    b_out = b.new_zeros(b.shape[0], rank, experts)
    for expert in range(experts):
        u, s, vh = torch.linalg.svd(b[:, :, expert] @ a[expert], full_matrices=False)
        kept = min(rank, s.shape[0])
        b_out[:, :kept, expert] = u[:, :kept] * s[:kept]
        a_out[expert, :kept] = vh[:kept]
    return a_out, b_out
