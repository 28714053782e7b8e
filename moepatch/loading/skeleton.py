"""The model a config describes, built weightless on the meta device: what ``inspect``, ``install``, the commands
and ``scripts/finetune.py`` plan a patch against before any weight is loaded (a bad block fails in seconds, not
after a 100 GB load)."""

from __future__ import annotations

import copy
import math
from pathlib import Path
from typing import Any
from typing import cast

import torch
from torch import nn
from transformers import AutoModelForCausalLM

from moepatch.validation import read_json_object
from moepatch.validation import safetensors_shapes


def causal_lm_class(config: Any) -> type[nn.Module] | None:
    """The causal-LM class registered for the config's class (transformers' or one moepatch registers)."""

    mapping = AutoModelForCausalLM._model_mapping
    # transformers types every lazy auto mapping's values as the tokenizer mapping's (slow, fast) pair of classes;
    # the causal-LM mapping holds one class
    return cast("type[nn.Module]", mapping[type(config)]) if type(config) in mapping else None


def weightless_model(config: Any, *, trust_remote_code: bool = False) -> nn.Module:
    """The causal LM of ``config`` on the meta device.

    Built from the class itself, not ``from_config``, so that under an active DeepSpeed ZeRO-3 config no
    ``zero.Init`` partitioning starts; with ``trust_remote_code`` a folder's own ``auto_map`` class is used.

    Raises:
        ValueError: no causal-LM class is known for the config (the message names its model type).
        Exception: whatever the model's constructor raises for fields its config class accepted.
    """

    remote = isinstance(getattr(config, "auto_map", None), dict) and "AutoModelForCausalLM" in config.auto_map
    with torch.device("meta"):
        if trust_remote_code and remote:
            return AutoModelForCausalLM.from_config(config, trust_remote_code=True)
        model_class = causal_lm_class(config)
        if model_class is None:
            raise ValueError(f"no causal-LM class for model_type {getattr(config, 'model_type', None)!r} "
                             f"({type(config).__name__})")
        return model_class(copy.deepcopy(config))


def weights_problem(folder: Path, model: torch.nn.Module) -> str | None:
    """What is wrong with a checkpoint's weights as the config describes the model, from the safetensors headers
    alone (cheap: no tensor is read): missing, truncated or unreadable files, a sharded index naming files that are
    not there, tensors whose shape differs from the model's, or a total number of values that differs from the
    model's (another model's, or an incomplete one; transformers' checkpoint conversions rename and fuse tensors but
    never change that total).  ``None`` when they fit; pickled ``.bin`` weights are not opened (never unpickled)
    and not checked."""

    index = folder / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = read_json_object(index).get("weight_map")
        except ValueError as error:
            return str(error)
        if not isinstance(weight_map, dict) or not weight_map:
            return f"{index}: no weight_map"
        files = sorted({folder / str(name) for name in weight_map.values()})
    elif (folder / "model.safetensors").is_file():  # what transformers loads; lora_experts.safetensors & co. beside it
        files = [folder / "model.safetensors"]     # are not the model's weights
    else:
        files = sorted(folder.glob("*.safetensors"))
    if not files:
        return None if any(folder.glob("pytorch_model*.bin")) else f"{folder}: no weights (no *.safetensors)"
    stored: dict[str, tuple[int, ...]] = {}
    for file in files:
        try:
            stored.update(safetensors_shapes(file))
        except ValueError as error:
            return str(error)
    expected = {name: tuple(tensor.shape) for name, tensor in model.state_dict().items()}
    wrong = [(name, stored[name], shape) for name, shape in expected.items()
             if name in stored and stored[name] != shape]
    if wrong:
        name, found, shape = wrong[0]
        return (f"{files[0] if len(files) == 1 else folder}: {name} has shape {list(found)}, but config.json "
                f"describes {list(shape)} ({len(wrong)} tensor(s) differ): the weights are not this config's model")
    unique = {id(tensor): tensor for tensor in model.state_dict(keep_vars=True).values()}  # tied weights once
    expected_values = sum(tensor.numel() for tensor in unique.values())
    stored_values = sum(math.prod(shape) for shape in stored.values())
    if stored_values != expected_values:  # transformers' conversions rename and fuse tensors, never add values
        return (f"{files[0] if len(files) == 1 else folder}: the weights hold {stored_values:,} values, but the "
                f"{type(model).__name__} that config.json describes holds {expected_values:,}: they are not this "
                "config's model (or are incomplete)")
    return None
