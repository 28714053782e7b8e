"""Write single-expert LoRA sets as a standard peft LoRA adapter (``adapter_config.json`` +
``adapter_model.safetensors``) that ``PeftModel.from_pretrained(base, directory)`` loads on the unpatched model.

* ``nn.Linear`` projections → ``target_modules`` (full module paths), ``lora_A [r, in]`` / ``lora_B [out, r]`` as
  stored, ``lora_alpha`` as configured.
* Routed experts → ``target_parameters`` (peft ≥ 0.17 ``ParamWrapper``) on the 3-D ``[E, out, in]`` parameter the
  family's storage adapter names.  peft keeps one rank-``r`` LoRA per routed expert: ``lora_A [E·r, in]`` expert-major
  (rows ``e·r .. (e+1)·r``), ``lora_B [out, r·E]`` expert-minor (column ``k·E + e``), so that
  ``ΔW_e = scaling · B[:, :, e] A_e`` after ``B.reshape(out, r, E)``.  Projections sharing one parameter (gate and
  up halves of ``gate_up_proj``) are stacked exactly: ``A`` concatenated, ``B`` block-diagonal over the out rows,
  ranks added.  Several wrapped parameters of one module nest (the first one wrapped is innermost, reached through
  ``base_layer.``), which the saved key names follow.

A set with several experts, MoV (an (IA)³ scale, not a LoRA) and routed experts in a storage peft has no layout for
are refused with the reason, before anything is written.
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass
from dataclasses import field
from pathlib import Path
from typing import TypeVar

import torch
from peft import LoraConfig
from safetensors.torch import save_file
from torch import nn

from model_patches.expert_storage import storage_of
from moepatch.lora_experts.layers import LoraExperts
from moepatch.tools.lora_experts.merge import FEATURE
from moepatch.tools.lora_experts.merge import ExpertSetSite
from moepatch.tools.lora_experts.merge import expert_set_sites
from moepatch.tools.lora_experts.merge import lora_handle

PEFT_PREFIX = "base_model.model."
"""Where peft's saved keys start (the adapter's name, ``default``, is left out of saved keys)."""
ADAPTER_WEIGHTS = "adapter_model.safetensors"


@dataclass
class PeftTarget:
    """One peft LoRA: a module (``target_modules``) or a parameter (``target_parameters``), and its tensors."""

    key: str
    """The full module path, or ``<module path>.<parameter>``."""
    lora_a: torch.Tensor
    lora_b: torch.Tensor
    rank: int
    alpha: float
    is_parameter: bool
    state_prefix: str = ""
    """Module path of the (possibly nested) peft layer holding ``lora_A`` / ``lora_B``."""


@dataclass
class _SharedParameter:
    """The routed projections reaching one 3-D parameter, with their out-row offsets."""

    module_path: str
    parameter: str
    out_rows: int
    parts: dict[int, list[ExpertSetSite]] = field(default_factory=dict)
    """First out row of each projection → its sets, one per routed expert in order."""


def export_problem(site: ExpertSetSite, method: str, has_layout: bool) -> str | None:
    """Why peft's LoRA adapter cannot express this expert set, or ``None``."""
    path = site.target.path
    if method == "mov":
        return (f"{path}: MoV experts are (IA)³ scales, not LoRA pairs (a single-expert MoV merges exactly with "
                "merge_into_base)")
    if site.expert_set.num_experts != 1:
        return (f"{path}: {site.expert_set.num_experts} experts mixed per token by a router — a peft LoRA is one "
                "fixed low-rank update")
    if site.target.storage not in ("linear", "identity") and not has_layout:
        return f"{path}: peft's target_parameters has no layout for {site.target.storage!r} routed experts"
    return None


def _lora_set(site: ExpertSetSite) -> LoraExperts:
    """The LoRA experts of ``site`` (:func:`export_problem` refuses MoV's vector experts first)."""
    if not isinstance(site.expert_set, LoraExperts):
        raise ValueError(f"{site.target.path}: MoV experts are (IA)³ scales, not LoRA pairs")
    return site.expert_set


def _linear_target(site: ExpertSetSite, alpha: float) -> PeftTarget:
    expert_set = _lora_set(site)
    return PeftTarget(site.target.path, expert_set.lora_A[0].detach(), expert_set.lora_B[0].detach(),
                      expert_set.ranks[0], alpha, False, site.target.path)


def _parameter_target(shared: _SharedParameter, alpha: float) -> PeftTarget:
    """Stack the projections of one parameter into peft's per-expert block layout (see the module docstring)."""
    parts = sorted(shared.parts.items())
    ranks = [_lora_set(sites[0]).ranks[0] for _, sites in parts]
    rank = sum(ranks)
    scale = alpha / ranks[0]
    num_experts = len(parts[0][1])
    a_blocks, b_blocks = [], []
    for expert in range(num_experts):
        expert_sets = [_lora_set(sites[expert]) for _, sites in parts]  # this routed expert's, one per projection
        b = expert_sets[0].lora_B[0].detach().float().new_zeros(shared.out_rows, rank)
        a_rows = []
        column = 0
        for (first_row, _), own_rank, expert_set in zip(parts, ranks, expert_sets, strict=True):
            lora_a, lora_b = expert_set.lora_A[0].detach().float(), expert_set.lora_B[0].detach().float()
            a_rows.append(lora_a)
            factor = expert_set.scaling[0] / scale  # exactly 1 unless the projections' ranks differ
            b[first_row : first_row + lora_b.shape[0], column : column + own_rank] = lora_b * factor
            column += own_rank
        a_blocks.append(torch.cat(a_rows, dim=0))
        b_blocks.append(b)
    lora_a = torch.cat(a_blocks, dim=0)  # [E·r, in], expert-major
    lora_b = torch.stack(b_blocks, dim=-1).reshape(shared.out_rows, rank * num_experts)  # column k·E + e
    return PeftTarget(f"{shared.module_path}.{shared.parameter}", lora_a, lora_b, rank, scale * rank, True)


def peft_targets(model: nn.Module) -> tuple[list[PeftTarget], float]:
    """The peft LoRAs reproducing the model's LoRA experts and the ``lora_dropout`` to declare; ``ValueError``
    naming every expert set peft cannot express."""
    handle = lora_handle(model)
    config = handle.config.features[FEATURE]
    moe = handle.require_moe_model()
    storage = storage_of(moe)
    names = {id(module): path for path, module in moe.inner.named_modules()}
    sites = expert_set_sites(handle)
    layouts = {id(site): storage.peft_parameter(site.target.module, site.target.require_routed().projection)
               for site in sites if site.routed_expert is not None}
    problems = list(dict.fromkeys(  # one line per projection, not per routed expert
        problem for site in sites
        if (problem := export_problem(site, config.method, layouts.get(id(site)) is not None)) is not None))
    if problems:
        raise ValueError("lora_experts: cannot export as a peft LoRA adapter (nothing was written):\n  "
                         + "\n  ".join(problems))
    targets = [_linear_target(site, config.alpha) for site in sites if site.routed_expert is None]
    shared: dict[tuple[int, str], _SharedParameter] = {}
    for site in sites:
        if site.routed_expert is None:
            continue
        layout = layouts[id(site)]
        if layout is None:  # export_problem refused it above
            raise ValueError(f"{site.target.path}: peft's target_parameters has no layout for these routed experts")
        parameter, first_row, out_rows = layout
        module = site.target.module
        entry = shared.setdefault((id(module), parameter), _SharedParameter(names[id(module)], parameter, out_rows))
        entry.parts.setdefault(first_row, []).append(site)
    by_module: dict[str, list[PeftTarget]] = {}
    for entry in shared.values():
        by_module.setdefault(entry.module_path, []).append(_parameter_target(entry, config.alpha))
    for module_path, members in by_module.items():
        _nest(moe.inner.get_submodule(module_path), module_path, members)
        targets.extend(members)
    dropout = config.dropout if not by_module else 0.0  # peft's ParamWrapper refuses dropout (inference: no effect)
    return targets, dropout


def _nest(module: nn.Module, module_path: str, members: list[PeftTarget]) -> None:
    """peft wraps a module's targeted parameters in the order the module registers them, each wrapper around the
    previous one: the first is innermost (``base_layer.`` once per wrapper outside it)."""
    order = [name for name, _ in module.named_parameters(recurse=False)]
    members.sort(key=lambda target: order.index(target.key.rpartition(".")[2]))
    for index, target in enumerate(members):
        target.state_prefix = module_path + ".base_layer" * (len(members) - 1 - index)


_T = TypeVar("_T")


def _most_common(values: list[_T]) -> _T:
    return Counter(values).most_common(1)[0][0]


def export_peft(model: nn.Module, directory: str | Path) -> Path:
    """Write the model's single-expert LoRA experts as a standard peft LoRA adapter.

    ``PeftModel.from_pretrained(base, directory)`` on the unpatched base model then computes what the patched model
    computes (within float rounding): linear projections through ``target_modules``, fused routed experts through
    ``target_parameters`` (peft ≥ 0.17).  Ranks and alphas that differ between targets go to ``rank_pattern`` /
    ``alpha_pattern`` (exact-path patterns).  ``lora_dropout`` is the configured dropout, or 0 when routed experts
    are exported (peft's ``ParamWrapper`` refuses dropout).

    Args:
        model (`nn.Module`): a model patched with ``lora_experts`` whose sets all have one expert.
        directory (`str` or `Path`): the adapter folder (created).

    Returns:
        `Path`: the folder.

    Raises:
        ValueError: a set peft cannot express (several experts, MoV, routed experts stored in a layout peft has no
            ``target_parameters`` form for), each named; nothing is written.
        ImportError: peft is not installed (``pip install moepatch[peft]``).

    Example:
        ```python
        moepatch.apply(model, {"lora_experts": {"method": "molora", "num_experts": 1, "r": 8}})
        ...  # train
        export_peft(model, "adapter")
        peft_model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_id), "adapter")
        ```
    """
    targets, dropout = peft_targets(model)
    handle = lora_handle(model)
    linear = [t for t in targets if not t.is_parameter]
    parameters = [t for t in targets if t.is_parameter]
    rank = _most_common([t.rank for t in targets])
    alpha = _most_common([t.alpha for t in targets])
    config = LoraConfig(
        r=rank, lora_alpha=alpha,  # type: ignore[arg-type]  # peft annotates int; α is any number (α/r scaling)
        lora_dropout=dropout, bias="none", task_type="CAUSAL_LM",
        target_modules=[t.key for t in linear], target_parameters=[t.key for t in parameters] or None,
        rank_pattern={re.escape(t.key): t.rank for t in targets if t.rank != rank},
        alpha_pattern={re.escape(t.key): t.alpha for t in targets if t.alpha != alpha},
        base_model_name_or_path=getattr(getattr(handle.require_moe_model().inner, "config", None), "_name_or_path",
                                        None),
    )
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    config.save_pretrained(str(directory))
    tensors = {}
    for target in targets:
        prefix = PEFT_PREFIX + target.state_prefix
        tensors[f"{prefix}.lora_A.weight"] = target.lora_a.float().cpu().contiguous()
        tensors[f"{prefix}.lora_B.weight"] = target.lora_b.float().cpu().contiguous()
    save_file(tensors, str(directory / ADAPTER_WEIGHTS), metadata={"format": "pt"})
    return directory
