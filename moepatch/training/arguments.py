"""The arguments of a fine-tuning run: moepatch's own dataclasses, the values they accept, and the bundle of all five.

``HfArgumentParser`` reads :class:`ModelArguments`, :class:`DataArguments`,
:class:`~moepatch.mixing.callback.DynamicSamplingArguments`, transformers' ``TrainingArguments`` and
:class:`~moepatch.task_experts.training.TaskExpertArguments`; each field is the flag ``--<field>``.  Every value is
checked in ``__post_init__``, so a bad one is refused (naming its flag) before anything is read or loaded.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from dataclasses import field
from pathlib import Path

from transformers import TrainingArguments

from moepatch.data.sources import named_paths
from moepatch.errors import FieldError
from moepatch.errors import UsageError
from moepatch.mixing.callback import DynamicSamplingArguments
from moepatch.task_experts.training import TaskExpertArguments
from moepatch.training.toolkit import flags_of
from moepatch.validation import is_int
from moepatch.validation import is_number

FREEZE_CHOICES = ("router", "gate_substring", "none")
PROMPT_FORMAT_CHOICES = ("auto", "chat_template", "vicuna")
EP_IMPLEMENTATIONS = ("auto", "moepatch_dedup", "all_to_all")
"""``--ep_implementation`` choices: transformers' dispatches that train, and moepatch's (``all_reduce`` is
inference-only, so it is not offered for fine-tuning)."""

SOURCE_FLAGS = {"data_dir": "--data_dir", "train_files": "--train_files", "probe_files": "--probe_files"}
"""How this script spells the fields of :func:`moepatch.data.sources.discover_sources`."""

DYNAMIC_ONLY = ("update_every", "eta", "c", "distance", "criterion", "probe_layers", "probe_batch_size", "plot")
"""Options of :class:`~moepatch.mixing.callback.DynamicSamplingArguments` that only the probe rounds read
(``sampling_seed`` also seeds a static mixture's draws and the probe subsets)."""


@dataclass
class ModelArguments:
    """Which checkpoint, and the moepatch options that override its config.json."""

    model_name_or_path: str | None = field(
        default=None, metadata={"help": "Checkpoint folder holding config.json (required; nothing is downloaded)."}
    )
    moepatch_config: str | None = field(
        default=None, metadata={"help": "JSON file holding a moepatch block (or a config.json with one); replaces the "
                                        "checkpoint's block."}
    )
    freeze_gate: str | None = field(
        default=None,
        metadata={"help": "'router' (the top-k routers' weights), 'gate_substring' (every parameter whose name "
                          "contains 'gate', as in Dynamic Data Mixing, Zhu et al., 2024) or 'none'; default: the "
                          "config.json's setting."},
    )
    gate_noise: bool | None = field(default=None, metadata={"help": "Gate noise in training (LLaMA-MoE)."})
    balance_loss: bool | None = field(default=None, metadata={"help": "Add the family's balance loss to the loss."})
    aux_loss_coef: float | None = field(default=None, metadata={"help": "Coefficient of the balance loss (>= 0)."})
    ep_size: int | None = field(
        default=None,
        metadata={"help": "Expert parallelism over this many processes (>= 2; launch with torchrun "
                          "--nproc_per_node EP_SIZE; not with --deepspeed): each rank holds num_experts / EP_SIZE "
                          "routed experts and trains on its own batches, FSDP2 sharding the dense weights "
                          "(transformers' DistributedConfig(tp_size=1, fsdp_size=EP_SIZE, ep_size=EP_SIZE)). A "
                          "checkpoint renumbered by `moepatch place --write-permuted` for another EP size "
                          "(expert_placement.json) is refused."},
    )
    ep_implementation: str = field(
        default="auto",
        metadata={"help": "How tokens reach the experts under --ep_size: 'moepatch_dedup' (one row per token and "
                          "destination rank), 'all_to_all' (transformers: one row per token and expert), 'auto' "
                          "(the default: the ep_implementation of the checkpoint's moepatch block when it names "
                          "one, else transformers' choice)."},
    )

    def __post_init__(self) -> None:
        if not self.model_name_or_path:
            raise UsageError("--model_name_or_path", "required: the checkpoint folder (holding config.json) to "
                                                     "fine-tune")
        if self.moepatch_config is not None and not self.moepatch_config:
            raise UsageError("--moepatch_config", "expected a JSON file, got an empty path")
        if self.freeze_gate is not None and self.freeze_gate not in FREEZE_CHOICES:
            raise UsageError("--freeze_gate", f"expected one of {', '.join(FREEZE_CHOICES)}, got {self.freeze_gate!r}")
        coef = self.aux_loss_coef
        if coef is not None and not (is_number(coef) and math.isfinite(coef) and coef >= 0):
            raise UsageError("--aux_loss_coef", f"expected a finite number >= 0, got {coef!r}")
        self._check_expert_parallelism()

    def _check_expert_parallelism(self) -> None:
        """``--ep_size`` and ``--ep_implementation``, which only means something with it."""
        if self.ep_size is not None and not (is_int(self.ep_size) and self.ep_size >= 2):
            raise UsageError("--ep_size", f"expected an integer >= 2 (processes sharing the experts; 1 is no expert "
                                          f"parallelism: leave --ep_size out), got {self.ep_size!r}")
        if self.ep_implementation not in EP_IMPLEMENTATIONS:
            raise UsageError("--ep_implementation",
                             f"expected one of {', '.join(EP_IMPLEMENTATIONS)}, got {self.ep_implementation!r}")
        if self.ep_size is None and self.ep_implementation != "auto":
            raise UsageError("--ep_implementation", "only takes effect with --ep_size")

    @property
    def checkpoint(self) -> str:
        """``model_name_or_path``, which ``__post_init__`` requires (``None`` is only its parser default)."""
        assert self.model_name_or_path, "ModelArguments.__post_init__ refuses a missing --model_name_or_path"
        return self.model_name_or_path


@dataclass
class DataArguments:
    """Training sources (named jsonl files or folders) and their fixed probe splits."""

    data_dir: str | None = field(
        default=None,
        metadata={"help": "Folder with train/<name>.jsonl (or train/<name>/*.jsonl) and optional dev/<name>.jsonl "
                          "(the probe set of source <name>)."},
    )
    train_files: list[str] | None = field(default=None, metadata={"help": "name=path entries (jsonl or folder)."})
    probe_files: list[str] | None = field(default=None, metadata={"help": "name=path probe (dev) files of sources "
                                                                          "named by --train_files or --data_dir."})
    probe_size: int = field(
        default=80,
        metadata={"help": "Probe examples per source (>= 1; Dynamic Data Mixing, Zhu et al., 2024, probes about 80). "
                          "With a dev/<name>.jsonl or --probe_files entry: a fixed subset of that file drawn with "
                          "--sampling_seed (all of it when it is smaller; the official dev sets hold 1,000 per "
                          "source); without one: a fixed, seeded sample held out of the source's train records."},
    )
    prompt_format: str = field(
        default="auto",
        metadata={"help": "'chat_template', 'vicuna', or 'auto' (the tokenizer's chat template when it has one)."},
    )
    max_length: int = field(default=2048, metadata={"help": "Truncate examples to this many tokens (>= 1)."})
    initial_weights: str | None = field(
        default=None,
        metadata={"help": "JSON file {source: weight} (the official prob_map): one finite weight >= 0 per source "
                          "(> 0 with dynamic mixing); default uniform."},
    )
    dynamic_sampling: bool = field(
        default=True,
        metadata={"help": "Re-weight the sources from routing statistics (needs --max_steps and at least two "
                          "sources; with exactly two the weights cannot move apart)."},
    )
    synthetic_data: bool = field(
        default=False, metadata={"help": "Generate the embedded four-task data into <output_dir>/data and use it."}
    )

    def __post_init__(self) -> None:
        self._check_sources()
        if not (is_int(self.probe_size) and self.probe_size >= 1):
            raise UsageError("--probe_size", f"expected an integer >= 1 (probe examples per source), got "
                                             f"{self.probe_size!r}")
        if self.prompt_format not in PROMPT_FORMAT_CHOICES:
            raise UsageError("--prompt_format", f"expected one of {', '.join(PROMPT_FORMAT_CHOICES)}, got "
                                                f"{self.prompt_format!r}")
        if not (is_int(self.max_length) and self.max_length >= 1):
            raise UsageError("--max_length", f"expected an integer >= 1 (tokens per example), got {self.max_length!r}")
        if self.initial_weights is not None and not self.initial_weights:
            raise UsageError("--initial_weights", "expected a JSON file, got an empty path")

    def _check_sources(self) -> None:
        """Some training data is named, in one way, and every ``name=path`` entry is well formed (the files
        themselves are checked by :func:`moepatch.training.sources.source_paths`)."""
        if self.data_dir is not None and not self.data_dir:
            raise UsageError("--data_dir", "expected a folder, got an empty path")
        if self.synthetic_data and (self.data_dir or self.train_files or self.probe_files):
            given = "--data_dir" if self.data_dir else "--train_files" if self.train_files else "--probe_files"
            raise UsageError("--synthetic_data", f"writes and uses its own four sources; do not combine it with "
                                                 f"{given}")
        if not (self.data_dir or self.train_files or self.synthetic_data):
            raise UsageError("--data_dir", "no training data given: pass --data_dir DIR, --train_files name=path ... "
                                           "or --synthetic_data")
        for field_name in ("train_files", "probe_files"):
            try:
                named_paths(getattr(self, field_name), field_name)
            except FieldError as error:
                raise error.as_usage_error(SOURCE_FLAGS) from None

    @property
    def generates_synthetic(self) -> bool:
        """``--synthetic_data`` without sources of its own: the run writes the embedded tasks and trains on them."""
        return bool(self.synthetic_data and not (self.data_dir or self.train_files))

    @property
    def is_mixture(self) -> bool:
        """Drawn from a weighted mixture (dynamic, or static with ``--initial_weights``) rather than plain epochs."""
        return bool(self.dynamic_sampling or self.initial_weights)


ARGUMENT_TYPES = (ModelArguments, DataArguments, DynamicSamplingArguments, TrainingArguments, TaskExpertArguments)
"""The dataclasses ``HfArgumentParser`` reads, in the order :func:`~moepatch.training.parse_arguments` returns them."""

FLAGS = flags_of(ARGUMENT_TYPES)
"""``{field: flag}`` of every argument of a run, to name the flag of a library's
:class:`~moepatch.errors.FieldError`."""


@dataclass
class RunArguments:
    """The five parsed argument objects of one run, passed together to the pre-flight checks and the run modes."""

    model: ModelArguments
    data: DataArguments
    sampling: DynamicSamplingArguments
    training: TrainingArguments
    experts: TaskExpertArguments | None = None

    @property
    def output_dir(self) -> Path:
        """``--output_dir``, which parsing requires (transformers types it optional)."""
        assert self.training.output_dir, "parse_arguments refuses a missing --output_dir"
        return Path(self.training.output_dir)


__all__ = ["ARGUMENT_TYPES", "DYNAMIC_ONLY", "EP_IMPLEMENTATIONS", "FLAGS", "FREEZE_CHOICES", "PROMPT_FORMAT_CHOICES",
           "SOURCE_FLAGS", "DataArguments", "ModelArguments", "RunArguments"]
