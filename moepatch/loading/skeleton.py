"""The model a config describes, built weightless on the meta device: what ``inspect``, ``install``, the commands
and ``scripts/finetune.py`` plan a patch against before any weight is loaded (a bad block fails in seconds, not
after a 100 GB load)."""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn


def causal_lm_class(config: Any) -> type[nn.Module] | None:
    """The causal-LM class registered for the config's class (transformers' or one moepatch registers)."""
    from transformers import AutoModelForCausalLM

    mapping = AutoModelForCausalLM._model_mapping
    return mapping[type(config)] if type(config) in mapping else None


def weightless_model(config: Any, *, trust_remote_code: bool = False) -> nn.Module:
    """The causal LM of ``config`` on the meta device.

    Built from the class itself, not ``from_config``, so that under an active DeepSpeed ZeRO-3 config no
    ``zero.Init`` partitioning starts; with ``trust_remote_code`` a folder's own ``auto_map`` class is used.

    Raises:
        ValueError: no causal-LM class is known for the config (the message names its model type).
        Exception: whatever the model's constructor raises for fields its config class accepted.
    """
    from transformers import AutoModelForCausalLM

    remote = isinstance(getattr(config, "auto_map", None), dict) and "AutoModelForCausalLM" in config.auto_map
    with torch.device("meta"):
        if trust_remote_code and remote:
            return AutoModelForCausalLM.from_config(config, trust_remote_code=True)
        model_class = causal_lm_class(config)
        if model_class is None:
            raise ValueError(f"no causal-LM class for model_type {getattr(config, 'model_type', None)!r} "
                             f"({type(config).__name__})")
        return model_class(copy.deepcopy(config))
