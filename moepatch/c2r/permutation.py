"""Renumber experts so that contiguous expert-parallel sharding gets a planned placement's locality.

Expert-parallel engines shard experts contiguously (experts ``0 .. E/D-1`` on device 0, ...).  To give such an
engine the groups of :func:`moepatch.c2r.placement.plan_placement`, the experts are renumbered: new expert ``n`` of a
layer is old expert ``permutation[n]``.  Routing is equivariant under renaming (router rows move with the experts,
C2R lists are renumbered): the permuted model chooses the same experts under the renaming and computes the same
logits up to float32 rounding (tested).  Not bit for bit: the routers' float32 softmax sums the experts in id order,
so renamed experts get weights that differ by one ulp, and eager experts also accumulate outputs in id order.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Mapping
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from model_patches.structure import MoEModel
from model_patches.structure import attribute_path
from model_patches.structure import describe
from moepatch.config import CONFIG_KEY

PERMUTATION_FILE = "expert_permutation.json"


def _check_permutation(permutation: Sequence[int], num_experts: int, layer: int) -> None:
    if sorted(permutation) != list(range(num_experts)):
        raise ValueError(f"expert permutation of layer {layer}: expected a permutation of 0..{num_experts - 1}, "
                         f"got {list(permutation)}")


def _expert_tensors(model: MoEModel, index: int) -> list[tuple[str, nn.Parameter | nn.ParameterList]]:
    """Every tensor of layer ``index`` that carries the expert axis, per the family spec; raises on anything else."""
    spec, layer, num_experts = model.family, model.layer(index), model.num_experts
    found: list[tuple[str, nn.Parameter | nn.ParameterList]] = []
    router_parameters = dict(layer.router.named_parameters())
    for name in spec.router_expert_parameters or tuple(router_parameters):
        if name not in router_parameters:
            raise ValueError(f"layer {index}: router has no parameter {name!r}")
        found.append((f"{spec.router_attr}.{name}", router_parameters[name]))
    for path in spec.expert_modules or (spec.experts_attr,):
        module = attribute_path(layer.block, path)
        if not isinstance(module, nn.Module):
            raise ValueError(f"layer {index}: no expert module {path!r}")
        for name, child in module.named_children():
            if isinstance(child, nn.ParameterList) and len(child) == num_experts:
                found.append((f"{path}.{name}", child))
            elif any(True for _ in child.parameters()):
                raise ValueError(f"layer {index}: {path}.{name} holds parameters in an unknown layout")
        found.extend((f"{path}.{name}", p) for name, p in module.named_parameters(recurse=False))
    stacked = spec.expert_storage == "stacked_rows"  # expert tensors stack each expert's rows: [E·R, ...]
    for name, tensor in found:
        if not isinstance(tensor, nn.Parameter):
            continue
        rows = tensor.shape[0] if tensor.dim() else 0
        if stacked and not name.startswith(f"{spec.router_attr}."):
            fits, want = rows > 0 and rows % num_experts == 0, f"[E·R = {num_experts}·R, ...]"
        else:
            fits, want = rows == num_experts, f"[E={num_experts}, ...]"
        if not fits:
            raise ValueError(f"layer {index}: {name} has shape {tuple(tensor.shape)}, not {want}; cannot permute")
    return found


def check_permutable(model: MoEModel) -> None:
    """Raise ``ValueError`` if the experts of ``model`` cannot be renumbered (works on a meta-device skeleton).

    A checkpoint carrying LoRA experts (``moepatch.lora_experts``) is refused: their weights live in a file beside the
    checkpoint and those on routed experts belong to expert ids, which a renumbering would silently detach.
    """
    block = getattr(model.inner.config, CONFIG_KEY, None)
    if isinstance(block, dict) and block.get("lora_experts") not in (None, False):
        raise ValueError(f"{CONFIG_KEY}.lora_experts: the checkpoint carries LoRA experts, which a permuted copy would "
                         "not renumber (their weights are per routed expert); merge them into the base "
                         "(moepatch.lora_experts.merge_into_base) or permute the checkpoint without them")
    for index in model.moe_layer_indices:
        _expert_tensors(model, index)


def permute_experts(model: MoEModel, permutations: Mapping[int, Sequence[int]]) -> None:
    """In place: in each listed MoE layer, new expert ``n`` becomes old expert ``permutations[layer][n]``.

    The family spec says which tensors carry the expert axis: router rows producing the per-expert scores, stacked
    ``[E, ...]`` expert tensors (reordered along dim 0), ``[E·R, ...]`` row stacks (blocks of ``R`` rows reordered)
    and per-expert ``ParameterList``s (entries reordered).
    Everything is checked before the first change.
    """
    plan = []
    for index, permutation in permutations.items():
        _check_permutation(permutation, model.num_experts, index)
        plan.append((list(permutation), _expert_tensors(model, index)))
    with torch.no_grad():
        for permutation, tensors in plan:
            for _, tensor in tensors:
                if isinstance(tensor, nn.ParameterList):
                    entries = list(tensor)
                    for new, old in enumerate(permutation):
                        tensor[new] = entries[old]
                else:  # [E, ...], or [E·R, ...] stacked rows: move each expert's block of R rows
                    order = torch.tensor(permutation, device=tensor.device)
                    per_expert = tensor.view(len(permutation), -1, *tensor.shape[1:])
                    tensor.copy_(per_expert[order].reshape(tensor.shape))


def renumber_collaborative_list(listed: list, permutations: Mapping[int, Sequence[int]]) -> list:
    """The ``[L][E][E]`` list under the renaming (rows reordered, ids mapped); other layers unchanged."""
    renumbered = list(listed)
    for index, permutation in permutations.items():
        rows = listed[index]
        if rows is None:
            continue
        new_id = {old: new for new, old in enumerate(permutation)}
        renumbered[index] = [[new_id[old] for old in rows[old_expert]] for old_expert in permutation]
    return renumbered


def write_permuted_checkpoint(
    source: str | Path,
    permutations: Mapping[int, Sequence[int]],
    output: str | Path,
) -> Path:
    """Load ``source``, renumber its experts and C2R lists, and save the result (with tokenizer) to ``output``.

    Also writes ``expert_permutation.json`` (``{layer: permutation}``, new id → old id) next to the weights.
    """
    source, output = Path(source), Path(output)
    from moepatch.loading.pretrained import from_pretrained

    model = from_pretrained(source, patch=False)  # moepatch's or transformers' classes, never the folder's code
    moe = describe(model)
    check_permutable(moe)
    permute_experts(moe, permutations)
    config = model.config
    for name in moe.family.per_expert_config:
        rows = getattr(config, name, None)
        if isinstance(rows, list):
            setattr(config, name, [
                [row[old] for old in permutations[index]] if index in permutations and isinstance(row, list) else row
                for index, row in enumerate(rows)
            ])
    if isinstance(getattr(config, "collaborative_list", None), list):
        config.collaborative_list = renumber_collaborative_list(config.collaborative_list, permutations)
    block: dict[str, Any] | None = getattr(config, CONFIG_KEY, None)
    if isinstance(block, dict) and isinstance(block.get("c2r"), dict):
        c2r = dict(block["c2r"])
        if isinstance(c2r.get("collaborative_list"), list):
            c2r["collaborative_list"] = renumber_collaborative_list(c2r["collaborative_list"], permutations)
        elif isinstance(c2r.get("path"), str):
            list_path = Path(c2r["path"]) if Path(c2r["path"]).is_absolute() else source / c2r["path"]
            listed = json.loads(list_path.read_text())
            listed = listed.get("collaborative_list") if isinstance(listed, dict) else listed
            output.mkdir(parents=True, exist_ok=True)
            (output / "c2r_list.json").write_text(
                json.dumps({"collaborative_list": renumber_collaborative_list(listed, permutations)})
            )
            c2r["path"] = "c2r_list.json"
        setattr(config, CONFIG_KEY, {**block, "c2r": c2r})
    model.save_pretrained(output)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json", "merges.txt",
                 "tokenizer.model", "chat_template.jinja"):
        if (source / name).exists():
            shutil.copy2(source / name, output / name)
    (output / PERMUTATION_FILE).write_text(
        json.dumps({str(layer): list(p) for layer, p in permutations.items()}, indent=1)
    )
    return output
