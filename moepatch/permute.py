"""Renumber experts so that contiguous expert-parallel sharding gets a planned placement's locality.

Expert-parallel engines shard experts contiguously (experts ``0 .. E/D-1`` on device 0, ...).  To give such an
engine the groups of :func:`moepatch.placement.plan_placement`, the experts are renumbered: new expert ``n`` of a
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

from moepatch.adapter import MoEModel
from moepatch.adapter import describe
from moepatch.config import CONFIG_KEY

PERMUTATION_FILE = "expert_permutation.json"


def _check_permutation(permutation: Sequence[int], num_experts: int, layer: int) -> None:
    if sorted(permutation) != list(range(num_experts)):
        raise ValueError(f"expert permutation of layer {layer}: expected a permutation of 0..{num_experts - 1}, "
                         f"got {list(permutation)}")


def permute_experts(model: MoEModel, permutations: Mapping[int, Sequence[int]]) -> None:
    """In place: in each listed MoE layer, new expert ``n`` becomes old expert ``permutations[layer][n]``.

    Every parameter of the router and of the experts module whose leading dimension is ``E`` is reordered (router
    rows; fused ``gate_up_proj`` / ``down_proj`` and their biases).  A parameter without that leading dimension means
    a layout this function does not know: it raises before changing anything.
    """
    plan: list[tuple[nn.Parameter, torch.Tensor]] = []
    for index, permutation in permutations.items():
        layer = model.layer(index)
        _check_permutation(permutation, model.num_experts, index)
        order = torch.tensor(list(permutation), dtype=torch.int64)
        for module in (layer.router, layer.experts):
            for name, parameter in module.named_parameters():
                if parameter.dim() == 0 or parameter.shape[0] != model.num_experts:
                    raise ValueError(f"layer {index}: {type(module).__name__}.{name} has shape "
                                     f"{tuple(parameter.shape)}, not [E={model.num_experts}, ...]; cannot permute")
                plan.append((parameter, order.to(parameter.device)))
    with torch.no_grad():
        for parameter, order in plan:
            parameter.copy_(parameter[order])


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
    trust_remote_code: bool = False,
) -> Path:
    """Load ``source``, renumber its experts and C2R lists, and save the result (with tokenizer) to ``output``.

    Also writes ``expert_permutation.json`` (``{layer: permutation}``, new id → old id) next to the weights.
    """
    from transformers import AutoModelForCausalLM

    source, output = Path(source), Path(output)
    model = AutoModelForCausalLM.from_pretrained(source, trust_remote_code=trust_remote_code)
    permute_experts(describe(model), permutations)
    config = model.config
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
