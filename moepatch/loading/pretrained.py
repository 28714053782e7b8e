"""``moepatch.from_pretrained``: load a checkpoint with moepatch's classes and apply its config, never its .py files.

A published LLaMA-MoE folder carries an ``auto_map`` into its own modeling file, which cannot run on transformers 5;
a folder prepared by ``moepatch install`` carries an ``auto_map`` into moepatch's loader.  Either way this function
ignores ``auto_map``: the config class comes from ``model_type`` (transformers' own, or a family moepatch
registers), the model class from ``AutoModelForCausalLM``'s mapping, and the folder's Python files are never
imported.  The loaded model is then patched with :func:`moepatch.apply` from its config.json.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any
from typing import cast

from torch import nn
from transformers import AutoConfig
from transformers import AutoModelForCausalLM
from transformers import PreTrainedModel

from moepatch.config import MoePatchConfig
from moepatch.errors import BlockMisfitError
from moepatch.errors import CommandError
from moepatch.errors import UnsupportedModelError
from moepatch.errors import UsageError
from moepatch.errors import first_line
from moepatch.expert_parallel.layout import check_chosen_ep_implementation
from moepatch.expert_parallel.layout import check_expert_parallel_load
from moepatch.expert_parallel.layout import resolve_ep_implementation
from moepatch.expert_parallel.placement import distributed_ep_size
from moepatch.patch import apply

LOADER_MODULE = "moepatch_loader"

_NOT_FOR_LOCAL_CLASSES = ("trust_remote_code", "code_revision", "adapter_kwargs")


def load_config(path: str | Path, **kwargs: Any) -> Any:
    """The checkpoint's config via its ``model_type`` (transformers' or a moepatch family); ``auto_map`` ignored."""

    for name in _NOT_FOR_LOCAL_CLASSES:
        kwargs.pop(name, None)
    # AutoModel* ask for (config, unused_kwargs) through return_unused_kwargs=True; auto_map stays as it is here,
    # because AutoModel* decide from it whether to come back to moepatch's loader for the model.
    return AutoConfig.from_pretrained(path, trust_remote_code=False, **kwargs)


def drop_loader_auto_map(config: Any) -> None:
    """Forget ``auto_map`` entries pointing at moepatch's loader (a ``save_pretrained`` copy stays self-contained)."""
    auto_map = getattr(config, "auto_map", None)
    if isinstance(auto_map, dict):
        kept = {key: ref for key, ref in auto_map.items() if not str(ref).startswith(f"{LOADER_MODULE}.")}
        if kept:
            config.auto_map = kept
        else:
            del config.auto_map


def from_pretrained(
    path: str | Path, *model_args: Any, patch: bool = True, strict: bool = True, **kwargs: Any
) -> nn.Module:
    """Load a causal LM checkpoint with moepatch's or transformers' classes and apply its moepatch config.

    Args:
        path (`str` or `Path`): checkpoint folder (config.json and weights).
        patch (`bool`, *optional*, defaults to `True`): apply the config.json's moepatch block / official C2R fields
            (with ``False`` the block is not read at all, its ``ep_implementation`` included).
        strict (`bool`, *optional*, defaults to `True`): passed to :func:`moepatch.apply`.
        kwargs: passed to the model class's ``from_pretrained`` (``dtype``, ``device_map``, ...); ``config`` may be
            given; ``trust_remote_code`` is ignored (no code from the folder is ever run). A ``distributed_config``
            (a transformers ``DistributedConfig`` or a dict of its fields) is checked against the checkpoint before
            anything is loaded (:func:`moepatch.expert_parallel.check_expert_parallel_load`); under expert
            parallelism (``ep_size`` above 1) with its ``ep_implementation`` left at ``"auto"``, the block's
            ``ep_implementation`` is used (on a copy of it); any other name the caller gives wins.

    Returns:
        The model; ``moepatch.get_handle(model)`` returns its patch handle.

    Raises:
        FieldError: (a ``ValueError``) the ``distributed_config`` does not fit the checkpoint, naming the field:
            it is not a ``DistributedConfig`` or a dict, a size in it is not an integer >= 1
            (``distributed_config.ep_size``), ``ep_implementation`` is a name transformers does not know or needs
            another layout (``all_reduce``: ``ep_size == tp_size``; the block's choice too), ``ep_size`` does not
            divide the routed experts or the model has no expert-parallel plan.
        ValueError: the checkpoint's experts were renumbered for another expert-parallel size, or its
            ``expert_placement.json`` is malformed or not this checkpoint's (naming the file).
        BlockMisfitError: (a ``ValueError``, with ``apply``'s message) the block does not fit the model (a block
            that does not even parse is refused before loading when a ``distributed_config`` asks for EP).
    """

    for name in _NOT_FOR_LOCAL_CLASSES:
        kwargs.pop(name, None)
    config = kwargs.pop("config", None)
    if config is None:
        config = load_config(path)
    distributed_config = kwargs.get("distributed_config")
    check_expert_parallel_load(path, config, distributed_config)  # before any weight or process group
    if isinstance(distributed_config, Mapping) and not isinstance(distributed_config, dict):
        distributed_config = kwargs["distributed_config"] = dict(distributed_config)  # transformers takes a dict
    if patch and distributed_ep_size(distributed_config) > 1:
        resolved = resolve_ep_implementation(distributed_config, _block_ep_implementation(config))
        if resolved is not distributed_config:  # the block's choice: its layout condition checked too
            check_chosen_ep_implementation(resolved, f"the moepatch block of {Path(path) / 'config.json'}")
        kwargs["distributed_config"] = resolved
    mapping = AutoModelForCausalLM._model_mapping
    if type(config) not in mapping:
        raise ValueError(
            f"moepatch.from_pretrained: no causal-LM class for model_type {config.model_type!r} "
            f"({type(config).__name__}); supported by transformers or registered by moepatch"
        )
    # a class: transformers types every lazy auto mapping's values as the tokenizer mapping's (slow, fast) pair
    model_class = cast("type[PreTrainedModel]", mapping[type(config)])
    if getattr(model_class, "applies_moepatch_on_load", False):  # moepatch's own classes apply on load
        kwargs["moepatch_apply"] = False
    loaded = model_class.from_pretrained(path, *model_args, config=config, **kwargs)
    model = loaded[0] if isinstance(loaded, tuple) else loaded  # output_loading_info=True gives (model, info)
    drop_loader_auto_map(model.config)
    if patch:
        try:
            apply(model, strict=strict)
        except UnsupportedModelError:
            raise
        except ValueError as error:  # the block does not fit: said as such, so a caller can name config.json
            raise BlockMisfitError(str(error)) from error
    return loaded


def _block_ep_implementation(config: Any) -> str | None:
    """The moepatch block's ``ep_implementation`` (``None``: the block names none).

    Raises:
        BlockMisfitError: the block does not parse (what ``apply`` would refuse after the load, said before it).
    """
    try:
        return MoePatchConfig.from_model(config).ep_implementation
    except ValueError as error:
        raise BlockMisfitError(str(error)) from error


def load_for_command(path: str | Path, *, patch: bool = True, **kwargs: Any) -> nn.Module:
    """:func:`from_pretrained` for commands: an unreadable or incomplete checkpoint is refused, naming the folder.

    A weight the model expects but the folder lacks would be randomly initialised — a profile, placement or
    fine-tune of such a model is meaningless — so missing keys are an error here (``from_pretrained`` itself only
    lets transformers report them).

    Raises:
        CommandError: the weights cannot be read (truncated or foreign files) or some are missing.
        ValueError: a ``distributed_config`` that does not fit the checkpoint, as :func:`from_pretrained` says it.
    """

    distributed_config = kwargs.get("distributed_config")
    if distributed_config is not None:  # its refusals name their field (or expert_placement.json), not the weights
        check_expert_parallel_load(path, kwargs.get("config") or load_config(path), distributed_config)
    try:
        loaded = from_pretrained(path, patch=patch, output_loading_info=True, **kwargs)
    except (CommandError, UsageError, UnsupportedModelError):
        raise
    except Exception as error:  # safetensors raises its own SafetensorError for a truncated file
        if isinstance(error, BlockMisfitError):
            raise ValueError(f"{Path(path) / 'config.json'}: {error}") from None
        first = first_line(error)
        raise CommandError(f"{path}: cannot load the checkpoint's weights ({first})") from None
    model, info = loaded if isinstance(loaded, tuple) else (loaded, {})
    missing = sorted(info.get("missing_keys", ()) if isinstance(info, dict) else ())
    if missing:
        shown = ", ".join(missing[:4]) + (f" and {len(missing) - 4} more" if len(missing) > 4 else "")
        raise CommandError(f"{path}: the checkpoint lacks {len(missing)} weight(s) the model needs ({shown}); "
                           "they would be random — is this the right folder?")
    return model

