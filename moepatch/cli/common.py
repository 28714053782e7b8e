"""Checks several commands run on a checkpoint before loading it: its structure from a weightless skeleton, its
moepatch block planned on that skeleton, its tokenizer.  Each failure names config.json or the folder, so a broken
checkpoint is reported in one line before any weight is loaded or any file is written."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from model_patches.structure import MoEModel
from moepatch.errors import CommandError
from moepatch.errors import FieldError
from moepatch.errors import FieldProblems
from moepatch.errors import UsageError
from moepatch.errors import first_line
from moepatch.loading.skeleton import weights_problem

CORPUS_FLAGS = {"paths": "--data"}
"""The flag of :func:`~moepatch.tools.c2r.profiling.read_corpus`'s ``paths`` in ``profile`` and ``place``."""


def read_corpus_files(paths: list[str], text_field: str) -> list[str]:
    """The documents of ``--data``; a missing file or a corpus without a document is a failed check naming
    ``--data`` (exit 1: the flag was given well formed, what it names holds nothing to profile)."""
    from moepatch.tools.c2r.profiling import read_corpus

    try:
        return read_corpus(paths, text_field)
    except FieldError as error:
        raise error.as_command_error(CORPUS_FLAGS) from None


def skeleton(path: str | Path, trust_remote_code: bool) -> tuple[Any, torch.nn.Module]:
    """The checkpoint's config and a weightless (meta-device) model built from it: structure without loading."""
    from transformers import AutoConfig

    from moepatch.errors import UnsupportedModelError
    from moepatch.loading.pretrained import drop_loader_auto_map
    from moepatch.loading.skeleton import weightless_model
    from moepatch.validation import read_json_object

    path = str(path)
    config_file = Path(path) / "config.json"
    try:
        raw = read_json_object(config_file)
    except ValueError as error:
        raise CommandError(str(error)) from None
    if "model_type" not in raw:
        raise CommandError(f"{config_file}: no model_type field")
    try:
        config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    except Exception as error:  # unknown model_type, or a field of the wrong type (transformers' strict configs)
        model_type = raw.get("model_type")
        raise CommandError(f"{config_file}: cannot build a config for model_type={model_type!r}: "
                           f"{first_line(error)}") from None
    drop_loader_auto_map(config)  # `moepatch install`'s loader: the skeleton is moepatch's (or transformers') class
    try:
        model = weightless_model(config, trust_remote_code=trust_remote_code)
    except ValueError as error:
        raise UnsupportedModelError(f"{config_file}: {type(config).__name__} is not a causal LM "
                                    f"({first_line(error)})") from None
    except Exception as error:  # fields that pass the config class but not the model's constructor
        raise CommandError(f"{config_file}: cannot build the model it describes: {first_line(error)}") from None
    return config, model


def structure(path: Path, trust_remote_code: bool = False) -> MoEModel:
    """The checkpoint's MoE structure from a weightless skeleton: checks arguments without loading weights."""
    from model_patches.structure import describe

    return describe(skeleton(path, trust_remote_code)[1], verify=False)


def checked_block(checkpoint: Path, trust_remote_code: bool = False) -> tuple[Any, MoEModel]:
    """The checkpoint's structure, with its own moepatch block and C2R fields planned on the skeleton, and its
    weights checked from their headers (:func:`weights_problem`): a broken block or truncated / foreign weights are
    reported naming config.json or the file before any weight is loaded.  Returns ``(config, moe)``."""
    from model_patches.structure import describe
    from moepatch.config import MoePatchConfig
    from moepatch.patch import plan_patch

    config, model = skeleton(checkpoint, trust_remote_code)
    try:
        settings = MoePatchConfig.from_model(config)
    except ValueError as error:
        raise CommandError(f"{checkpoint / 'config.json'}: {error}") from None
    moe = describe(model, family=settings.family, verify=False)
    try:
        plan_patch(moe, settings)
    except ValueError as error:
        raise CommandError(f"{checkpoint / 'config.json'}: {error}") from None
    _check_weights(checkpoint, model)
    return config, moe


def _check_weights(checkpoint: Path, model: torch.nn.Module) -> None:
    """:func:`weights_problem` as a :class:`CommandError` (exit 1, naming the file): found from the headers, before
    transformers' load would print its report of missing and unexpected keys."""
    problem = weights_problem(Path(checkpoint), model)
    if problem is not None:
        raise CommandError(problem)


def check_block_on_skeleton(checkpoint: Path, block: dict[str, Any], argument: str) -> int:
    """Plan a moepatch block on the weightless skeleton: a bad block (or truncated / foreign weights) fails before
    any weight is loaded.

    Returns the narrowest ``min(in, out)`` width of the projections the block's LoRA experts adapt (0 without
    any), the most rank a LoRA expert can use there.
    """
    from model_patches.structure import describe
    from moepatch.config import MoePatchConfig
    from moepatch.patch import plan_patch

    model = skeleton(checkpoint, False)[1]
    moe = describe(model, verify=False)
    try:
        plan = plan_patch(moe, MoePatchConfig.from_dict(block))
    except FieldProblems as error:  # the argument built the block: its problems, not the block's key paths
        raise UsageError(argument, "; ".join(message for _, message in error.problems)) from error
    except ValueError as error:  # chained: a caller may read the fields
        raise UsageError(argument, str(error)) from error
    _check_weights(checkpoint, model)
    lora = plan["lora_experts"]
    widths = [min(min(t.in_dims), min(t.out_dims)) for t in (lora.targets if lora is not None else ())
              if getattr(t, "in_dims", None) and getattr(t, "out_dims", None)]
    return min(widths, default=0)


def check_ep_size(num_experts: int, ep_size: int) -> None:
    """``--ep-size`` must divide the experts: expert parallelism hosts the same number on every device."""
    if num_experts % ep_size:
        raise UsageError("--ep-size", f"{ep_size} does not divide the {num_experts} experts (expert parallelism "
                                      "hosts the same number of experts on every device)")


def load_tokenizer(checkpoint: Path, trust_remote_code: bool = False) -> Any:
    """The checkpoint's tokenizer; a missing or broken one is named, not a traceback."""
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(checkpoint, trust_remote_code=trust_remote_code)
    except Exception as error:
        raise CommandError(f"{checkpoint}: no usable tokenizer ({first_line(error)})") from None
    try:
        encoded = tokenizer("moepatch checks its tokenizer")["input_ids"]
    except Exception:  # a tokenizer object without a vocabulary
        encoded = []
    if not encoded:
        raise CommandError(f"{checkpoint}: no usable tokenizer (it encodes text to nothing: are tokenizer.json / "
                           "tokenizer_config.json there?)")
    return tokenizer
