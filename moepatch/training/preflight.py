"""Every check a fine-tuning run makes before it loads a weight or writes a file.

The parsed values are checked by the argument dataclasses themselves; here are the checks of what they name: the
checkpoint folder and its config with every override (:func:`prepare_config`), the model and its moepatch block
planned on a weightless skeleton (:func:`check_model_structure`), the sources, the output folder against every
input, and the run mode's own combinations (:meth:`~moepatch.training.modes.base.RunMode.check`).  The tokenizer the
run loads first, before any data is read, is checked here too (:func:`load_tokenizer`).
"""

from __future__ import annotations

import tempfile
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

from transformers import AutoTokenizer
from transformers import TrainingArguments

from model_patches.structure import LayerIndexError
from model_patches.structure import MoEModel
from model_patches.structure import describe
from model_patches.structure import resolve_layer_indices
from moepatch.config import CONFIG_KEY
from moepatch.config import MoePatchConfig
from moepatch.config import write_config
from moepatch.data.synthetic import write_synthetic_sources
from moepatch.errors import CommandError
from moepatch.errors import FieldError
from moepatch.errors import MoePatchWarning
from moepatch.errors import UnsupportedModelError
from moepatch.errors import UsageError
from moepatch.errors import first_line
from moepatch.loading.block_file import read_moepatch_block
from moepatch.loading.pretrained import load_config
from moepatch.loading.skeleton import causal_lm_class
from moepatch.loading.skeleton import weightless_model
from moepatch.loading.skeleton import weights_problem
from moepatch.mixing.callback import DynamicSamplingArguments
from moepatch.patch import plan_patch
from moepatch.routing.training_options import apply_training_options
from moepatch.staged_output import refuse_output_in_inputs
from moepatch.task_experts.training import TaskExpertArguments
from moepatch.training.arguments import FLAGS
from moepatch.training.arguments import DataArguments
from moepatch.training.arguments import ModelArguments
from moepatch.training.arguments import RunArguments
from moepatch.training.distributed import expert_parallel_config
from moepatch.training.modes.registry import select_mode
from moepatch.training.modes.task_experts import refuse_unused_task_expert_flags
from moepatch.training.sources import source_names
from moepatch.validation import check_checkpoint_folder

StructureCheck = Callable[..., Any]
""":func:`check_model_structure`'s signature: ``(model_args, config, *, probe_layers=None)``."""


def check_inputs(model_args: ModelArguments, data_args: DataArguments, sampling_args: DynamicSamplingArguments,
                 training_args: TrainingArguments, expert_args: TaskExpertArguments | None = None, *,
                 check_structure: StructureCheck | None = None) -> list[str]:
    """Check everything the arguments name before anything is loaded or written; return the source names.

    The checkpoint folder and its config with every override (:func:`prepare_config`), the expert-parallel layout
    ``--ep_size`` asks for (a checkpoint renumbered for another EP size, a launch or an expert count it does not fit:
    :func:`~moepatch.training.distributed.expert_parallel_config`), the sources' files and folders,
    ``--initial_weights`` against the sources, ``--resume_from_checkpoint``, the output folder, and the combinations:
    dynamic mixing needs at least two sources and ``--max_steps`` (a weighted mixture is an infinite stream).  Two
    sources only warn (:class:`~moepatch.errors.MoePatchWarning`): their routing distances cannot tell them apart, so
    the update can only smooth the weights towards uniform.

    ``check_structure`` replaces :func:`check_model_structure` (the runner passes the one its module holds, so a
    test can replace it there).

    Raises:
        UsageError: naming the argument.
    """
    args = RunArguments(model_args, data_args, sampling_args, training_args, expert_args)
    config = prepare_config(model_args)
    refuse_output_in_arguments(args)
    expert_parallel_config(model_args, config)
    (check_structure or check_model_structure)(
        model_args, config, probe_layers=list(sampling_args.probe_layers) if data_args.dynamic_sampling else None)
    names = source_names(data_args)
    check_synthetic_target(data_args, args.output_dir, training_args.seed)
    mode = select_mode(args)
    if expert_args is not None and not expert_args.task_experts:
        refuse_unused_task_expert_flags(expert_args)
    notes = mode.check(args, names, config)  # warned once every check has passed: a refused run prints its error alone
    for note in notes:
        warnings.warn(note, MoePatchWarning, stacklevel=2)
    return names


def refuse_output_in_arguments(args: RunArguments) -> None:
    """The model being fine-tuned, its sources and the files naming its settings are never the output, inside it or
    around it (``--resume_from_checkpoint`` is not an input here: it lies inside the output by design)."""
    model_args, data_args = args.model, args.data

    def paths(entries: list[str] | None) -> list[str]:  # name=path entries
        return [entry.partition("=")[2] for entry in entries or [] if entry.partition("=")[2]]

    refuse_output_in_inputs(args.output_dir, "--output_dir", {
        "--model_name_or_path": Path(model_args.checkpoint), "--data_dir": data_args.data_dir or None,
        "--train_files": paths(data_args.train_files), "--probe_files": paths(data_args.probe_files),
        "--moepatch_config": model_args.moepatch_config or None,
        "--initial_weights": data_args.initial_weights or None})


def check_synthetic_target(data_args: DataArguments, output: Path, seed: int) -> None:
    """``--synthetic_data`` copies its sources to ``<output_dir>/data``: files already there that this run would not
    write byte for byte (a user's data, another seed's) are refused instead of overwritten.  The same command run
    again (finishing a killed run) writes the same files, so it passes."""
    if not data_args.generates_synthetic:
        return
    target = output / "data"
    if not target.exists():
        return
    with tempfile.TemporaryDirectory(prefix="moepatch_synthetic_check_") as scratch:
        write_synthetic_sources(scratch, seed=seed)
        for existing in sorted(path for path in target.rglob("*") if path.is_file()):
            fresh = Path(scratch) / existing.relative_to(target)
            if not fresh.is_file() or fresh.read_bytes() != existing.read_bytes():
                raise UsageError("--output_dir", f"{existing} exists and is not what --synthetic_data writes there "
                                                 "(it would be overwritten): choose another --output_dir, or move "
                                                 f"{target} away")


# ---------------------------------------------------------------------------------------------- model
def prepare_config(model_args: ModelArguments) -> Any:
    """The checkpoint's config with every override validated and applied (nothing is loaded yet).

    Raises:
        UsageError: naming the argument: no checkpoint folder or config.json, an unreadable config, no
            ``--moepatch_config`` file, a training option the family has no switch for.
        CommandError: naming the file and ``--moepatch_config``: its content is not JSON or not a valid block.
    """
    folder = check_checkpoint_folder(model_args.checkpoint, "--model_name_or_path")
    block = read_moepatch_block(model_args.moepatch_config, "--moepatch_config") if model_args.moepatch_config else None
    try:
        config = load_config(str(folder))
    except (ValueError, OSError, KeyError) as error:
        raise UsageError("--model_name_or_path", f"{folder / 'config.json'} cannot be read as a model config: "
                                                 f"{error}") from error
    if block is not None:
        write_config(config, block)
    if model_args.freeze_gate is not None:
        try:
            settings = MoePatchConfig.from_dict(getattr(config, CONFIG_KEY, None)).to_dict()  # block only
        except ValueError as error:
            raise UsageError("--model_name_or_path", f"{folder / 'config.json'}: {error}") from error
        settings["freeze_gate"] = None if model_args.freeze_gate == "none" else model_args.freeze_gate
        write_config(config, MoePatchConfig.from_dict(settings))
    try:
        apply_training_options(config, gate_noise=model_args.gate_noise, balance_loss=model_args.balance_loss,
                               aux_loss_coef=model_args.aux_loss_coef)
    except FieldError as error:  # each problem named by its option; the first option's flag is blamed
        raise error.as_usage_error({"model_type": "--model_name_or_path", **FLAGS}) from error
    return config


class _Misfit:
    """Turns a block that does not fit the model into the error naming where the block came from: ``--freeze_gate``
    when that flag's value is at fault, the ``--moepatch_config`` file whose block replaced the checkpoint's, or the
    checkpoint's config.json."""

    def __init__(self, model_args: ModelArguments) -> None:
        self.model_args = model_args
        self.config_file = Path(model_args.checkpoint) / "config.json"

    def __call__(self, error: BaseException, *, official_c2r: bool = False) -> Exception:
        text = str(error)
        if self.model_args.freeze_gate is not None and "freeze_gate" in text:
            return UsageError("--freeze_gate", text)
        block_file = self.model_args.moepatch_config
        if block_file and not official_c2r:  # the file's block replaced the checkpoint's: its content misfits
            return CommandError(f"{block_file} (--moepatch_config): {text}")
        return CommandError(f"{self.config_file}: {text}")


def _skeleton_structure(config: Any, settings: MoePatchConfig, folder: Path, misfit: _Misfit) -> tuple[Any, MoEModel]:
    """The weightless model ``config`` builds and its MoE structure; a model moepatch cannot patch is refused."""
    config_file = folder / "config.json"
    model_class = causal_lm_class(config)
    if model_class is None:
        raise UnsupportedModelError(f"--model_name_or_path: {config_file}: no causal-LM class for model_type "
                                    f"{config.model_type!r} ({type(config).__name__})")
    try:
        skeleton = weightless_model(config)
    except Exception as error:
        first = first_line(error)
        raise CommandError(f"{config_file}: cannot build {model_class.__name__} from it ({first})") from None
    try:
        moe = describe(skeleton, family=settings.family, verify=False)
    except UnsupportedModelError as error:
        raise UnsupportedModelError(f"--model_name_or_path: {folder}: {error}") from None
    except ValueError as error:  # an unknown "family" in the block
        raise misfit(error) from None
    if not 1 <= moe.top_k <= moe.num_experts:
        raise UnsupportedModelError(f"--model_name_or_path: {config_file}: its routers choose top-{moe.top_k} of "
                                    f"{moe.num_experts} experts; expected 1 <= top-k <= experts")
    return skeleton, moe


def check_model_structure(model_args: ModelArguments, config: Any, *, probe_layers: list[int] | None = None) -> Any:
    """Check the model the run will load on a weightless (meta-device) skeleton built from ``config``; returns its
    :class:`~model_patches.structure.MoEModel`.

    A model moepatch cannot patch (a dense model, top-k outside ``[1, num_experts]``), a moepatch block that does not
    fit the model (a C2R list of the wrong shape, ...) and ``probe_layers`` that are no MoE layers are found here,
    before any weight is read.

    Raises:
        UnsupportedModelError: naming ``--model_name_or_path`` (exit status 2).
        UsageError: ``--freeze_gate`` does not fit; a bad ``--probe_layers``.
        CommandError: the checkpoint's own config.json (its moepatch block, official C2R fields) or the block of
            ``--moepatch_config`` (a file's content: named with the flag) does not fit; its weights are truncated or
            another model's (from the safetensors headers).
    """
    folder = Path(model_args.checkpoint)
    misfit = _Misfit(model_args)
    try:
        settings = MoePatchConfig.from_model(config)
    except ValueError as error:
        raise misfit(error) from None
    skeleton, moe = _skeleton_structure(config, settings, folder, misfit)
    if settings.c2r is not None and settings.c2r.source == "official":
        try:  # the checkpoint's top-level C2R fields, which a --moepatch_config block without "c2r" keeps
            plan_patch(moe, settings.only("c2r"))
        except ValueError as error:
            raise misfit(error, official_c2r=True) from None
    try:
        plan_patch(moe, settings)
    except ValueError as error:
        raise misfit(error) from None
    if probe_layers is not None:
        try:
            resolve_layer_indices(moe, probe_layers, "probe_layers")
        except LayerIndexError as error:  # each bad entry's message names its value
            raise UsageError("--probe_layers", "; ".join(message for _, message in error.problems)) from None
    problem = weights_problem(folder, skeleton)  # the headers alone: truncated or foreign weights, before the load
    if problem is not None:
        raise CommandError(problem)
    return moe


def load_tokenizer(path: str) -> Any:
    """The checkpoint's tokenizer; pad = unk, else eos when it has none (as the official scripts do).

    Raises:
        CommandError: naming the folder: no tokenizer can be built from it, or it encodes text to nothing (a
            folder without tokenizer.json / tokenizer_config.json still gives a tokenizer without a vocabulary).
    """
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
        encoded = tokenizer("moepatch checks its tokenizer", add_special_tokens=False)["input_ids"]
    except Exception as error:
        first = first_line(error)
        raise CommandError(f"{path}: no usable tokenizer ({first})") from None
    if not encoded:
        raise CommandError(f"{path}: no usable tokenizer (it encodes text to nothing: are tokenizer.json / "
                           "tokenizer_config.json there?)")
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.unk_token or tokenizer.eos_token
    return tokenizer


def resolve_prompt_format(asked: str, tokenizer: Any, model_path: str) -> str:
    """``--prompt_format`` resolved against the tokenizer: ``auto`` is its chat template when it has one."""
    has_template = bool(getattr(tokenizer, "chat_template", None))
    if asked == "auto":
        return "chat_template" if has_template else "vicuna"
    if asked == "chat_template" and not has_template:
        raise UsageError("--prompt_format", f"'chat_template' but the tokenizer of {model_path} has no chat template; "
                                            "use 'vicuna' or 'auto'")
    return asked


__all__ = ["check_inputs", "check_model_structure", "check_synthetic_target", "load_tokenizer", "prepare_config",
           "read_moepatch_block", "refuse_output_in_arguments", "resolve_prompt_format"]
