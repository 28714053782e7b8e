"""Renumber experts so that contiguous expert-parallel sharding gets a planned placement's locality.

Expert-parallel engines shard experts contiguously (experts ``0 .. E/D-1`` on device 0, ...).  To give such an
engine the groups of :func:`moepatch.tools.c2r.placement.plan_placement`, the experts are renumbered: new expert ``n``
of a layer is old expert ``permutation[n]``.  Routing is equivariant under renaming when *every* per-expert tensor of
the routing moves with the experts — the router rows, a per-expert linear bias of the logits, and the selection bias the
family's :class:`~model_patches.spec.RoutingRule` names (a buffer, or a parameter of another shape such as ``[1, E]``,
on the router or on the sparse block: it is not a router *parameter*, so it is taken from the rule, never guessed
from names), and every tensor of the expert modules the family declares (Ergo's per-expert ``post_expert_norm``
too) — and C2R lists are renumbered; rows and entries of classes the router scores that are no routed experts
(Inkling's shared experts, ZAYA's skip class) stay where they are.  Then the permuted model chooses the same experts
under the renaming and computes the same logits up to float32 rounding (tested).  Not bit for bit: a float32 softmax
sums the experts in id order, so renamed experts get weights that differ by one ulp, and eager experts also accumulate
outputs in id order.

Two renamings are refused, naming the layer and the field, before anything changes:

* one that moves an expert out of its **routing group** where the router has a group limit (DeepSeek-V3's
  ``n_group`` / ``topk_group``): a group is a fixed range of expert ids, so such a renaming changes which experts
  compete in a group, hence the choice itself (tested: the logits change);
* any renaming of a model whose exact routing rule moepatch does not know, or whose router or block holds a tensor
  with an expert axis that the rule does not declare: equivariance cannot be shown there.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Mapping
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from typing import Literal

import torch
from torch import nn

from model_patches.routing_rule import router_settings
from model_patches.spec import read_attribute
from model_patches.structure import MoEModel
from model_patches.structure import attribute_path
from model_patches.structure import describe
from moepatch.c2r.config import C2RConfig
from moepatch.c2r.selection import plan_c2r
from moepatch.config import CONFIG_KEY
from moepatch.expert_parallel.placement import write_placement_record
from moepatch.loading.pretrained import from_pretrained
from moepatch.staged_output import staged_folder
from moepatch.tools.c2r.placement import contiguous_group_lists
from moepatch.tools.c2r.placement import group_crossings

PERMUTATION_FILE = "expert_permutation.json"

Layout = Literal["rows", "leading_rows", "stacked_rows", "flat", "list"]
"""How a tensor carries the expert axis: ``"rows"`` ``[E, ...]``; ``"leading_rows"`` ``[E + S, ...]``, the routed
experts' rows first and, in place after them, those of the ``S`` classes the router also scores that are no routed
experts (Inkling's shared experts, :attr:`~model_patches.spec.RoutingRule.shared_logits`; ZAYA's skip class,
:attr:`~model_patches.spec.RoutingRule.skip_class`, in its router's ``out_proj`` weight and its ``[E + 1]`` selection
bias); ``"stacked_rows"`` ``[E·R, ...]`` (blocks of ``R`` rows); ``"flat"`` ``E`` entries in any shape with one axis
of size ``E`` (a selection bias ``[E]`` or ``[1, E]``); ``"list"`` a ``ParameterList`` of ``E`` entries."""


@dataclass(frozen=True)
class ExpertTensor:
    """One tensor of a layer that carries the expert axis, and how (see :data:`Layout`)."""

    name: str
    """Block-relative name (``gate.weight``, ``gate.e_score_correction_bias``, ``experts.down_proj``)."""
    tensor: torch.Tensor | nn.ParameterList
    layout: Layout


@dataclass(frozen=True)
class RoutingGroups:
    """A layer's group limit that binds: the router chooses only within the ``kept`` best of ``groups`` contiguous
    expert groups (expert ``e`` is in group ``e // (E / groups)``), ``kept < groups``."""

    groups: int
    kept: int
    fields: str
    """The router settings it comes from, for messages (``gate.num_group=4, gate.topk_group=2``)."""


def _check_permutation(permutation: Sequence[int], num_experts: int, layer: int) -> None:
    if sorted(permutation) != list(range(num_experts)):
        raise ValueError(f"expert permutation of layer {layer}: expected a permutation of 0..{num_experts - 1}, "
                         f"got {list(permutation)}")


def _block_relative(model: MoEModel, path: str) -> str:
    """A rule path (router-relative, or ``^name`` on the block) as a block-relative name for messages."""
    return path[1:] if path.startswith("^") else f"{model.family.router_attr}.{path}"


def routing_groups(model: MoEModel) -> dict[int, RoutingGroups]:
    """MoE layers whose router's group limit binds (``kept < groups``), from the family's rule; other layers absent.

    A limit that keeps every group masks nothing (``topk_group >= n_group``, e.g. a checkpoint with
    ``n_group = topk_group = 1``), so it does not constrain a renumbering.  Works on a meta-device skeleton (only
    settings are read).

    Raises:
        ValueError: the routing rule is not known (:attr:`MoEModel.routing_problem`): a limit cannot be ruled out.
    """
    model.require_renumbering("expert placement within routing groups")
    rule = model.family.routing
    found: dict[int, RoutingGroups] = {}
    for layer in model.layers:
        limit = rule.active_group_limit(layer.router, layer.block)
        if limit is None:
            continue
        settings = router_settings(rule, layer.router, layer.block, top_k=model.top_k)
        groups, kept = settings.groups, settings.kept_groups
        if groups is None or kept is None or groups <= 1 or kept >= groups:
            continue
        if model.num_experts % groups:
            raise ValueError(f"layer {layer.index}: {_block_relative(model, limit.groups)}={groups} does not divide "
                             f"the {model.num_experts} experts into equal routing groups")
        fields = f"{_block_relative(model, limit.groups)}={groups}, {_block_relative(model, limit.kept_groups)}={kept}"
        found[layer.index] = RoutingGroups(groups=groups, kept=kept, fields=fields)
    return found


def _selection_bias(model: MoEModel, index: int) -> ExpertTensor | None:
    """The selection bias the rule names for layer ``index`` (``None`` when the rule has none); its ``E`` entries
    must lie along one axis (``[E]``, ``[1, E]``), or be the first of ``E + 1`` (``[E + 1]``, the skip class last:
    ZAYA's ``balancing_biases``)."""
    rule = model.family.routing
    path = rule.selection_bias
    if path is None:
        return None
    layer, name = model.layer(index), _block_relative(model, path)
    tensor = read_attribute(layer.router, layer.block, path)
    if not isinstance(tensor, torch.Tensor):
        raise ValueError(f"layer {index}: the routing rule's selection bias {name} is not a tensor of this model; "
                         "cannot permute it with the experts")
    if rule.skip_class:  # the skip class's entry stays last
        if tuple(tensor.shape) != (model.num_experts + 1,):
            raise ValueError(f"layer {index}: selection bias {name} has shape {tuple(tensor.shape)}, not [E + 1 = "
                             f"{model.num_experts} + 1] (the experts' entries, then the skip class's); cannot permute")
        return ExpertTensor(name, tensor, "leading_rows")
    if tensor.numel() != model.num_experts or max(tensor.shape, default=0) != model.num_experts:
        raise ValueError(f"layer {index}: selection bias {name} has shape {tuple(tensor.shape)}, not "
                         f"E={model.num_experts} entries along one axis; cannot permute")
    return ExpertTensor(name, tensor, "flat")


def _undeclared(model: MoEModel, index: int, taken: set[int]) -> list[str]:
    """Tensors of the router (buffers) and of the block itself (its own parameters and buffers) with an axis of size
    ``E`` that nothing declares: a renumbering would leave them in the old order."""
    layer, num_experts, spec = model.layer(index), model.num_experts, model.family
    candidates = [(f"{spec.router_attr}.{name}", t) for name, t in layer.router.named_buffers()]
    candidates += [(name, t) for name, t in layer.block.named_buffers(recurse=False)]
    candidates += [(name, t) for name, t in layer.block.named_parameters(recurse=False)]
    return [name for name, tensor in candidates
            if id(tensor) not in taken and tensor.dim() and num_experts in tuple(tensor.shape)]


def _expert_tensors(model: MoEModel, index: int) -> list[ExpertTensor]:
    """Every tensor of layer ``index`` that carries the expert axis, per the family spec and rule; raises on anything
    else (a declared tensor of the wrong shape, an undeclared per-expert tensor)."""
    spec, layer, num_experts = model.family, model.layer(index), model.num_experts
    bias = _selection_bias(model, index)
    found: list[ExpertTensor] = []
    router_parameters = dict(layer.router.named_parameters())
    # rows the router scores after the routed experts' that stay in place: Inkling's shared experts, ZAYA's skip class
    shared = router_settings(spec.routing, layer.router, layer.block, top_k=model.top_k).shared_logits
    shared += int(spec.routing.skip_class)
    for name in spec.router_expert_parameters or tuple(router_parameters):
        if name not in router_parameters:
            raise ValueError(f"layer {index}: router has no parameter {name!r}")
        if bias is not None and router_parameters[name] is bias.tensor:
            continue  # a selection bias kept as a parameter (ERNIE's [1, E]): permuted below, by its own layout
        parameter = router_parameters[name]
        layout: Layout = ("leading_rows" if shared and parameter.dim() and parameter.shape[0] == num_experts + shared
                          else "rows")
        found.append(ExpertTensor(f"{spec.router_attr}.{name}", parameter, layout))
    stacked = spec.expert_storage == "stacked_rows"  # expert tensors stack each expert's rows: [E·R, ...]
    paths = spec.expert_modules or (spec.experts_attr,)
    for path in paths:
        module = attribute_path(layer.block, path)
        if not isinstance(module, nn.Module):
            raise ValueError(f"layer {index}: no expert module {path!r}")
        for name, child in module.named_children():
            if f"{path}.{name}" in paths:  # declared itself (Ergo's per-expert post_expert_norm): read as such
                continue
            if isinstance(child, nn.ParameterList) and len(child) == num_experts:
                found.append(ExpertTensor(f"{path}.{name}", child, "list"))
            elif any(True for _ in child.parameters()):
                raise ValueError(f"layer {index}: {path}.{name} holds parameters in an unknown layout")
        found.extend(ExpertTensor(f"{path}.{name}", p, "stacked_rows" if stacked else "rows")
                     for name, p in module.named_parameters(recurse=False))
    if bias is not None:
        found.append(bias)
    for entry in found:
        tensor = entry.tensor
        if entry.layout in ("list", "flat") or isinstance(tensor, nn.ParameterList):  # a ParameterList: "list"
            continue
        rows = tensor.shape[0] if tensor.dim() else 0
        if entry.layout == "stacked_rows":
            fits, want = rows > 0 and rows % num_experts == 0, f"[E·R = {num_experts}·R, ...]"
        elif entry.layout == "leading_rows" and entry is bias:
            fits, want = rows == num_experts + 1, f"[E + 1 = {num_experts} + 1]"
        elif entry.layout == "leading_rows":
            fits, want = rows == num_experts + shared, f"[E + S = {num_experts} + {shared}, ...]"
        else:
            fits, want = rows == num_experts, f"[E={num_experts}, ...]"
        if not fits:
            extra = ""
            if entry.layout == "rows" and 0 < rows < num_experts:
                extra = (f" (the router scores {num_experts} outputs but the experts hold {rows}: the other "
                         f"{num_experts - rows} are computation-free experts such as LongCat-Flash's zero experts, "
                         "which the model's own code maps by index)")
            raise ValueError(f"layer {index}: {entry.name} has shape {tuple(tensor.shape)}, not {want}{extra}; "
                             "cannot permute")
    undeclared = _undeclared(model, index, {id(entry.tensor) for entry in found})
    if undeclared:
        raise ValueError(f"layer {index}: {', '.join(undeclared)} has an axis of size E={num_experts} that the "
                         "family's routing rule does not declare (not its selection bias): a renumbering would leave "
                         "it in the old expert order; cannot permute")
    return found


def check_permutable(model: MoEModel, *, structure_only: bool = False) -> None:
    """Raise ``ValueError`` if the experts of ``model`` cannot be renumbered (works on a meta-device skeleton).

    A checkpoint carrying LoRA experts (``moepatch.lora_experts``) is refused: their weights live in a file beside the
    checkpoint and those on routed experts belong to expert ids, which a renumbering would silently detach.  So is a
    model whose exact routing rule is unknown: its router may hold per-expert state or a group limit that a renumbering
    would break.  ``structure_only=True`` (a weightless skeleton, whose probed rule is not known yet) checks what it
    can without the rule; the loaded model is checked in full before anything is written.
    """
    block = getattr(model.inner.config, CONFIG_KEY, None)
    if isinstance(block, dict) and block.get("lora_experts") not in (None, False):
        raise ValueError(f"{CONFIG_KEY}.lora_experts: the checkpoint carries LoRA experts, which a permuted copy would "
                         "not renumber (their weights are per routed expert); merge them into the base "
                         "(moepatch.tools.lora_experts.merge_into_base) or permute the checkpoint without them")
    if model.hashed_layers:
        router = type(model.layer(model.hashed_layers[0]).router).__name__
        raise ValueError(f"expert permutation: layers {list(model.hashed_layers)} route by a fixed hash of the token "
                         f"id ({router}): its token → expert table would have to be renumbered too, which moepatch "
                         "does not do")
    if structure_only and model.routing_problem is not None:
        return
    model.require_renumbering("expert permutation")
    for index in model.moe_layer_indices:
        _expert_tensors(model, index)


def check_permutations(model: MoEModel, permutations: Mapping[int, Sequence[int]]) -> None:
    """Raise ``ValueError`` naming the layer when a renumbering is not a permutation of the experts, names a layer
    that is not a MoE layer, or moves an expert out of its routing group (see :func:`routing_groups`)."""
    limited = routing_groups(model)
    for index, permutation in permutations.items():
        if index not in model.moe_layer_indices:
            raise ValueError(f"expert permutation of layer {index}: not a MoE layer (MoE layers are "
                             f"{model.moe_layer_indices})")
        _check_permutation(permutation, model.num_experts, index)
        if index not in limited:
            continue
        limit = limited[index]
        crossings = group_crossings(permutation, limit.groups)
        if crossings:
            size = model.num_experts // limit.groups
            new, old = crossings[0]
            raise ValueError(
                f"expert permutation of layer {index}: the router's group limit ({limit.fields}) chooses experts only "
                f"within the {limit.kept} best of {limit.groups} routing groups of {size} contiguous expert ids, so a "
                f"renumbering must map each group's ids onto themselves; new expert {new} would be old expert {old} "
                f"(group {new // size} ≠ group {old // size}; {len(crossings)} expert(s) cross groups), which changes "
                "which experts compete in a group and hence the routing"
            )


def permute_experts(model: MoEModel, permutations: Mapping[int, Sequence[int]]) -> None:
    """In place: in each listed MoE layer, new expert ``n`` becomes old expert ``permutations[layer][n]``.

    The family spec and rule say which tensors carry the expert axis: router rows producing the per-expert scores
    (and a per-expert logit bias), the rule's selection bias (buffer or parameter, on the router or the block),
    stacked ``[E, ...]`` expert tensors (reordered along dim 0), ``[E·R, ...]`` row stacks (blocks of ``R`` rows
    reordered) and per-expert ``ParameterList``s (entries reordered).
    Everything is checked before the first change (:func:`check_permutable`, :func:`check_permutations`).
    """
    check_permutable(model)
    check_permutations(model, permutations)
    plan = [(list(permutation), _expert_tensors(model, index)) for index, permutation in permutations.items()]
    with torch.no_grad():
        for permutation, entries in plan:
            for entry in entries:
                tensor = entry.tensor
                if isinstance(tensor, nn.ParameterList):
                    old_entries = list(tensor)
                    for new, old in enumerate(permutation):
                        tensor[new] = old_entries[old]
                    continue
                order = torch.tensor(permutation, device=tensor.device)
                if entry.layout == "leading_rows":  # [E + S, ...]: the shared / skip classes' rows stay in place
                    tensor[: len(permutation)].copy_(tensor[: len(permutation)][order])
                elif entry.layout == "flat":  # [E] or [1, E]: the E entries in memory order
                    tensor.copy_(tensor.reshape(-1)[order].reshape(tensor.shape))
                else:  # [E, ...], or [E·R, ...] stacked rows: move each expert's block of R rows
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
    *,
    ep_size: int | None = None,
    c2r_within_groups: bool = False,
) -> Path:
    """Load ``source``, renumber its experts and C2R lists, and save the result (with tokenizer) to ``output``.

    Also writes ``expert_permutation.json`` (``{layer: permutation}``, new id → old id) next to the weights, and,
    with ``ep_size`` (the expert-parallel size the renumbering places groups for), ``expert_placement.json``, which
    :func:`moepatch.expert_parallel.check_placement` reads to refuse loading the copy under another EP size.

    ``c2r_within_groups`` (needs ``ep_size``) also sets the copy's C2R to the placement's groups
    (:func:`set_group_c2r`): every token's experts then sit on its top-1 expert's device.

    Raises:
        ValueError: ``c2r_within_groups`` without ``ep_size``, or group lists this model's routing cannot take.
    """
    if c2r_within_groups and ep_size is None:
        raise ValueError("c2r_within_groups needs the ep_size the groups are placed for")
    source, final = Path(source), Path(output)

    model = from_pretrained(source, patch=False)  # moepatch's or transformers' classes, never the folder's code
    with staged_folder(final) as output:  # the renumbered checkpoint appears whole, or not at all
        _write_permuted(model, source, permutations, output,
                        group_c2r_ep_size=ep_size if c2r_within_groups else None)
        if ep_size is not None:
            write_placement_record(output, ep_size, permutations)
    return final


def _write_permuted(model: Any, source: Path, permutations: Mapping[int, Sequence[int]], output: Path, *,
                    group_c2r_ep_size: int | None = None) -> None:
    """Renumber ``model`` (loaded from ``source``) and save it with its tokenizer and permutation to ``output``
    (with C2R within the groups of ``group_c2r_ep_size`` devices when given)."""
    moe = describe(model)
    check_permutable(moe)
    if group_c2r_ep_size is not None:
        group_c2r = group_c2r_config(moe, group_c2r_ep_size, sorted(permutations))  # refused before anything changes
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
            if not isinstance(listed, list):
                raise ValueError(f"{list_path}: holds no 'collaborative_list' list")
            output.mkdir(parents=True, exist_ok=True)
            (output / "c2r_list.json").write_text(
                json.dumps({"collaborative_list": renumber_collaborative_list(listed, permutations)})
            )
            c2r["path"] = "c2r_list.json"
        setattr(config, CONFIG_KEY, {**block, "c2r": c2r})
    if group_c2r_ep_size is not None:
        set_group_c2r(config, group_c2r)
    model.save_pretrained(output)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json", "merges.txt",
                 "tokenizer.model", "chat_template.jinja"):
        if (source / name).exists():
            shutil.copy2(source / name, output / name)
    (output / PERMUTATION_FILE).write_text(
        json.dumps({str(layer): list(p) for layer, p in permutations.items()}, indent=1)
    )


def group_c2r_config(moe: MoEModel, ep_size: int, layers: Sequence[int]) -> C2RConfig:
    """C2R within the placement's groups for ``layers`` (renumbered: contiguous groups of ``E / ep_size``), checked
    against ``moe``'s routing: ``top_t = E / D - 1`` and :func:`moepatch.tools.c2r.placement.contiguous_group_lists` on
    those layers, vanilla (``null``) on the others.

    Raises:
        ValueError: the groups cannot hold a token's k experts, or the routing refuses the lists (a group limit that
            the lists would starve, an unknown rule), naming why.
    """

    size = moe.num_experts // ep_size
    if size < moe.top_k:
        raise ValueError(f"a group of {size} experts per device cannot hold a token's {moe.top_k} experts: C2R within "
                         f"groups needs at least top_k = {moe.top_k} experts per device (a smaller EP size)")
    lists = contiguous_group_lists(moe.num_experts, ep_size)
    chosen = set(layers)
    config = C2RConfig(top_t=size - 1, collaborative_list=[lists if index in chosen else None
                                                           for index in range(moe.num_layers)])
    plan_c2r(moe, config)
    return config


def set_group_c2r(config: Any, group_c2r: C2RConfig) -> None:
    """Write ``group_c2r`` into a model config in place of its C2R: the official top-level fields where the checkpoint
    uses them, the moepatch block's ``c2r`` entry where it has one (a ``path`` is replaced), the block's entry when
    there is neither."""
    official = getattr(config, "collaborative_list", None) is not None or getattr(config, "top_t", None) is not None
    if official:
        config.top_t = group_c2r.top_t
        config.collaborative_list = group_c2r.collaborative_list
    block = getattr(config, CONFIG_KEY, None)
    block = dict(block) if isinstance(block, dict) else {}
    if official and not isinstance(block.get("c2r"), dict):
        return
    previous = block.get("c2r")
    if not isinstance(previous, dict):
        previous = {}
    entry = {key: value for key, value in previous.items() if key not in ("path", "collaborative_list", "top_t")}
    block["c2r"] = {**entry, "top_t": group_c2r.top_t, "collaborative_list": group_c2r.collaborative_list}
    setattr(config, CONFIG_KEY, block)
