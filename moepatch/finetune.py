"""Fine-tune a MoE checkpoint with moepatch's options: the engine behind ``scripts/finetune.py``.

Arguments are four dataclasses read by ``HfArgumentParser`` — :class:`ModelArguments`, :class:`DataArguments`,
:class:`~moepatch.dynamic_sampling.DynamicSamplingArguments` and transformers' ``TrainingArguments`` (so
``--deepspeed CONFIG``, ``--bf16``, ``--use_cpu``, ``--resume_from_checkpoint`` ... are the Trainer's own).  A
``--recipe FILE.json`` supplies defaults for any of them (the files in ``configs/``); command-line flags win.

The run: read the checkpoint's config, apply the overrides (a moepatch block from ``--moepatch_config``,
``--freeze_gate``, gate noise / balance loss / aux coefficient), load through :func:`moepatch.from_pretrained` (so the
config.json's C2R, freeze and statistics settings are applied; under ZeRO-3 the weights load partitioned), tokenise
the sources, then train with dynamic mixing (:class:`~moepatch.dynamic_sampling.MixtureTrainer` and
:class:`~moepatch.dynamic_sampling.DynamicSamplingCallback`), a static mixture, or plain epochs over the concatenated
sources.  The final model is saved with its moepatch block, ready for ``moepatch.apply`` / ``AutoModelForCausalLM``.
Runs under ``python``, ``torchrun``, ``deepspeed`` and ``accelerate launch``.
"""

from __future__ import annotations

import json
import logging
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from dataclasses import field
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

FREEZE_CHOICES = ("router", "gate_substring", "none")


@dataclass
class ModelArguments:
    """Which checkpoint, and the moepatch options that override its config.json."""

    model_name_or_path: str | None = field(default=None, metadata={"help": "Checkpoint folder (required)."})
    moepatch_config: str | None = field(
        default=None, metadata={"help": "JSON file holding a moepatch block; replaces the checkpoint's block."}
    )
    freeze_gate: str | None = field(
        default=None,
        metadata={"help": "'router', 'gate_substring' (seed 001: every parameter named *gate*) or 'none'; "
                          "default: the config.json's setting."},
    )
    gate_noise: bool | None = field(default=None, metadata={"help": "Gate noise in training (LLaMA-MoE)."})
    balance_loss: bool | None = field(default=None, metadata={"help": "Add the family's balance loss to the loss."})
    aux_loss_coef: float | None = field(default=None, metadata={"help": "Coefficient of the balance loss."})


@dataclass
class DataArguments:
    """Training sources (named jsonl files or folders) and their fixed probe splits."""

    data_dir: str | None = field(
        default=None,
        metadata={"help": "Folder with train/<name>.jsonl (or train/<name>/*.jsonl) and optional dev/<name>.jsonl."},
    )
    train_files: list[str] | None = field(default=None, metadata={"help": "name=path entries (jsonl or folder)."})
    probe_files: list[str] | None = field(default=None, metadata={"help": "name=path probe (dev) files."})
    probe_size: int = field(default=80, metadata={"help": "Probe examples per source taken from train without a "
                                                          "probe file (the paper uses about 80)."})
    prompt_format: str = field(default="auto", metadata={"help": "'chat_template', 'vicuna', or 'auto'."})
    max_length: int = field(default=2048, metadata={"help": "Truncate examples to this many tokens."})
    initial_weights: str | None = field(
        default=None, metadata={"help": "JSON file {source: weight} (the official prob_map); default uniform."}
    )
    dynamic_sampling: bool = field(default=True, metadata={"help": "Re-weight the sources from routing statistics."})
    synthetic_data: bool = field(
        default=False, metadata={"help": "Generate the embedded four-task data into <output_dir>/data and use it."}
    )


# ---------------------------------------------------------------------------------------------- arguments
def _recipe_argv(recipe: dict[str, Any]) -> list[str]:
    argv = []
    for key, value in recipe.items():
        if key.startswith("_"):  # "_comment" and friends
            continue
        values = value if isinstance(value, list) else [value]
        argv.append(f"--{key}")
        argv.extend("true" if v is True else "false" if v is False else str(v) for v in values)
    return argv


def parse_arguments(argv: Sequence[str] | None = None) -> tuple[Any, ...]:
    """``(model_args, data_args, sampling_args, training_args)`` from ``argv`` (``--recipe`` defaults first)."""
    from transformers import HfArgumentParser
    from transformers import TrainingArguments

    from moepatch.dynamic_sampling import DynamicSamplingArguments

    argv = list(sys.argv[1:] if argv is None else argv)
    if "--recipe" in argv:
        at = argv.index("--recipe")
        recipe_path = Path(argv[at + 1])
        recipe = json.loads(recipe_path.read_text())
        argv = _recipe_argv(recipe) + argv[:at] + argv[at + 2 :]
    parser = HfArgumentParser((ModelArguments, DataArguments, DynamicSamplingArguments, TrainingArguments))
    parsed = parser.parse_args_into_dataclasses(args=argv)
    model_args, data_args = parsed[0], parsed[1]
    problems = []
    if not model_args.model_name_or_path:
        problems.append("--model_name_or_path: required")
    if model_args.freeze_gate is not None and model_args.freeze_gate not in FREEZE_CHOICES:
        problems.append(f"--freeze_gate: expected one of {FREEZE_CHOICES}, got {model_args.freeze_gate!r}")
    if not (data_args.data_dir or data_args.train_files or data_args.synthetic_data):
        problems.append("data: give --data_dir, --train_files or --synthetic_data")
    if problems:
        parser.error("; ".join(problems))
    return tuple(parsed)


def _named_paths(entries: Sequence[str] | None, flag: str) -> dict[str, Path]:
    result = {}
    for entry in entries or ():
        name, sep, path = entry.partition("=")
        if not sep or not name or not path:
            raise ValueError(f"{flag}: expected name=path, got {entry!r}")
        if name in result:
            raise ValueError(f"{flag}: source {name!r} given twice")
        result[name] = Path(path)
    return result


def source_paths(data_args: DataArguments) -> dict[str, tuple[Path, Path | None]]:
    """``{name: (train, probe or None)}`` in sorted name order (the official order of matrices and weights)."""
    train = _named_paths(data_args.train_files, "--train_files")
    probe = _named_paths(data_args.probe_files, "--probe_files")
    if data_args.data_dir:
        root = Path(data_args.data_dir)
        if not (root / "train").is_dir():
            raise ValueError(f"--data_dir: {root} has no train/ folder")
        for entry in sorted((root / "train").iterdir()):
            name = entry.stem if entry.suffix == ".jsonl" else entry.name
            if entry.is_dir() or entry.suffix == ".jsonl":
                train.setdefault(name, entry)
                dev = root / "dev" / f"{name}.jsonl"
                if dev.is_file():
                    probe.setdefault(name, dev)
    unknown = sorted(set(probe) - set(train))
    if unknown:
        raise ValueError(f"--probe_files: {unknown} name no training source (sources: {sorted(train)})")
    if not train:
        raise ValueError("data: no training source found")
    return {name: (train[name], probe.get(name)) for name in sorted(train)}


# ---------------------------------------------------------------------------------------------- model
def prepare_config(model_args: ModelArguments) -> Any:
    """The checkpoint's config with every override validated and applied (nothing is loaded yet)."""
    from moepatch.config import CONFIG_KEY
    from moepatch.config import MoePatchConfig
    from moepatch.config import write_config
    from moepatch.loading import load_config
    from moepatch.training_options import apply_training_options

    config = load_config(model_args.model_name_or_path)
    if model_args.moepatch_config:
        block = json.loads(Path(model_args.moepatch_config).read_text())
        block = block.get(CONFIG_KEY, block)  # a whole config.json-like file or just the block
        write_config(config, MoePatchConfig.from_dict(block))
    if model_args.freeze_gate is not None:
        settings = MoePatchConfig.from_dict(getattr(config, CONFIG_KEY, None)).to_dict()  # block only
        settings["freeze_gate"] = None if model_args.freeze_gate == "none" else model_args.freeze_gate
        write_config(config, MoePatchConfig.from_dict(settings))
    apply_training_options(config, gate_noise=model_args.gate_noise, balance_loss=model_args.balance_loss,
                           aux_loss_coef=model_args.aux_loss_coef)
    return config


def load_tokenizer(path: str) -> Any:
    """The checkpoint's tokenizer; pad = unk, else eos when it has none (as the official scripts do)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.unk_token or tokenizer.eos_token
    return tokenizer


# ---------------------------------------------------------------------------------------------- run
def run(model_args: ModelArguments, data_args: DataArguments, sampling_args: Any, training_args: Any) -> dict:
    """Train and save; returns a summary (sources, rounds, final weights, output folder)."""
    import torch
    from transformers import DataCollatorForSeq2Seq
    from transformers import set_seed

    from moepatch.data import load_source
    from moepatch.dynamic_sampling import ROUNDS_FILE
    from moepatch.dynamic_sampling import DynamicSamplingCallback
    from moepatch.dynamic_sampling import MixtureTrainer
    from moepatch.dynamic_sampling import ResumingTrainer
    from moepatch.dynamic_sampling import sampling_horizon
    from moepatch.loading import from_pretrained
    from moepatch.mixture import DynamicMixtureSampler
    from moepatch.mixture import MixtureDataset

    set_seed(training_args.seed)
    _init_deepspeed_comm(training_args)
    output_dir = Path(training_args.output_dir)
    if data_args.synthetic_data and not (data_args.data_dir or data_args.train_files):
        from moepatch.synthetic import write_synthetic_sources

        data_args.data_dir = str(output_dir / "data")
        if training_args.process_index == 0:
            write_synthetic_sources(data_args.data_dir, seed=training_args.seed)
        _barrier()
    paths = source_paths(data_args)  # validated before the model is loaded
    config = prepare_config(model_args)
    tokenizer = load_tokenizer(model_args.model_name_or_path)
    prompt_format = data_args.prompt_format
    if prompt_format == "auto":
        prompt_format = "chat_template" if getattr(tokenizer, "chat_template", None) else "vicuna"
    sources = [
        load_source(name, train, tokenizer, probe_path=probe, probe_size=data_args.probe_size,
                    seed=sampling_args.sampling_seed, prompt_format=prompt_format, max_length=data_args.max_length)
        for name, (train, probe) in paths.items()
    ]
    names = [source.name for source in sources]
    initial = _initial_weights(data_args.initial_weights, names)

    model = from_pretrained(model_args.model_name_or_path, config=config, dtype=torch.float32)
    model.config.use_cache = False
    collator = DataCollatorForSeq2Seq(tokenizer, label_pad_token_id=-100, return_tensors="pt")
    summary: dict[str, Any] = {"sources": names, "prompt_format": prompt_format,
                               "train_examples": [len(s.train) for s in sources]}
    if data_args.dynamic_sampling or initial is not None:
        if training_args.max_steps <= 0:
            raise ValueError("--max_steps: a weighted mixture is an infinite stream; give the number of steps")
        sampler = DynamicMixtureSampler([len(s.train) for s in sources], initial, seed=sampling_args.sampling_seed,
                                        horizon=sampling_horizon(training_args))
        callbacks = []
        if data_args.dynamic_sampling:
            callbacks.append(DynamicSamplingCallback(sampler, names, [s.probe for s in sources], collator,
                                                     sampling_args))
        trainer = MixtureTrainer(model=model, args=training_args, train_dataset=MixtureDataset([s.train for s in
                                 sources]), data_collator=collator, callbacks=callbacks, mixture_sampler=sampler)
    else:
        train = [example for source in sources for example in source.train]
        trainer = ResumingTrainer(model=model, args=training_args, train_dataset=train, data_collator=collator)
        sampler = None
    result = trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
    trainer.save_model(str(output_dir))
    if trainer.is_world_process_zero():
        tokenizer.save_pretrained(str(output_dir))
    summary["train_loss"] = result.training_loss
    summary["loss_history"] = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    summary["world_size"] = training_args.world_size
    summary["deepspeed_zero_stage"] = _zero_stage(trainer)
    summary["global_step"] = trainer.state.global_step
    rounds_path = output_dir / ROUNDS_FILE
    summary["rounds"] = (
        [json.loads(line) for line in rounds_path.read_text().splitlines() if line.strip()]
        if rounds_path.exists() else []
    )
    if sampler is not None:
        summary["final_weights"] = sampler.weights
    if trainer.is_world_process_zero():
        (output_dir / "moepatch_finetune_summary.json").write_text(json.dumps(summary, indent=1))
    return summary


def _zero_stage(trainer: Any) -> int | None:
    """The ZeRO stage DeepSpeed ran with (``None`` without DeepSpeed): proof a launcher did not drop it."""
    if not getattr(trainer, "is_deepspeed_enabled", False):
        return None
    return int(trainer.accelerator.state.deepspeed_plugin.zero_stage)


def _initial_weights(path: str | None, names: list[str]) -> list[float] | None:
    if path is None:
        return None
    given = json.loads(Path(path).read_text())
    if not isinstance(given, dict) or sorted(given) != names:
        raise ValueError(f"--initial_weights: {path} must map exactly the sources {names} to weights")
    return [float(given[name]) for name in names]


def _init_deepspeed_comm(training_args: Any) -> None:
    """Make DeepSpeed's communication layer see the process group before the model is built.

    Under ZeRO-3 ``from_pretrained`` builds the model inside ``deepspeed.zero.Init``, which sizes batches with
    DeepSpeed's own world size — 1 unless ``deepspeed.init_distributed`` ran.  With ``use_cpu`` the Trainer's set-up
    initialises torch.distributed (gloo) but not DeepSpeed's view of it, and the batch-size check then fails.
    """
    if not training_args.deepspeed:
        return
    _ = training_args.device  # the Trainer's distributed set-up (torch.distributed, gloo on CPU)
    import deepspeed
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        deepspeed.init_distributed(dist_backend=dist.get_backend())


def _barrier() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def rounds_table(rounds: list[dict]) -> tuple[list[str], list[list[str]]]:
    """Header and rows of a weights-per-round table (initial weights first)."""
    if not rounds:
        return [], []
    names = rounds[0]["sources"]
    rows = [["0 (initial)"] + [f"{w:.3f}" for w in rounds[0]["old_weights"]]]
    rows += [[str(r["step"])] + [f"{w:.3f}" for w in r["new_weights"]] for r in rounds]
    return ["step"] + names, rows


def main(argv: Sequence[str] | None = None) -> int:
    """Parse, train, print the weights per round; destroys the process group at the end (cleaner exits)."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    model_args, data_args, sampling_args, training_args = parse_arguments(argv)
    summary = run(model_args, data_args, sampling_args, training_args)
    if training_args.process_index == 0:
        header, rows = rounds_table(summary["rounds"])
        if rows:
            widths = [max(len(str(cell)) for cell in column) for column in zip(header, *rows)]
            for row in [header, *rows]:
                print("  ".join(str(cell).rjust(width) for cell, width in zip(row, widths)))
        print(f"moepatch finetune: done, {summary['global_step']} steps, model saved to {training_args.output_dir}")
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
    return 0


__all__ = ["DataArguments", "ModelArguments", "main", "parse_arguments", "prepare_config", "rounds_table", "run",
           "source_paths"]
