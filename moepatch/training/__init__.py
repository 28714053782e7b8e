"""The fine-tuning runner behind ``scripts/finetune.py`` and its run modes.

* :mod:`~moepatch.training.arguments` — the argument dataclasses and the values they accept;
* :mod:`~moepatch.training.toolkit` — generic tools for ``HfArgumentParser`` commands (recipes, ``--debug``, the
  argument an error is about, repeated flags, ``TrainingArguments`` checks);
* :mod:`~moepatch.training.parsing` — :func:`parse_arguments`, the five argument objects of a run;
* :mod:`~moepatch.training.sources` — where the sources are, their initial weights;
* :mod:`~moepatch.training.preflight` — every check before a weight is loaded or a file written;
* :mod:`~moepatch.training.distributed` — expert parallelism, DeepSpeed's process group, barriers;
* :mod:`~moepatch.training.modes` — dynamic mixing, static mixture, plain epochs, task experts;
* :mod:`~moepatch.training.runner` — :func:`run` and :func:`main`.

``moepatch.mixing.finetune`` and ``moepatch.finetune``, the earlier paths, resolve to
:mod:`moepatch.training.runner`, which keeps their names.
"""

from __future__ import annotations

from moepatch.training.arguments import EP_IMPLEMENTATIONS
from moepatch.training.arguments import FREEZE_CHOICES
from moepatch.training.arguments import PROMPT_FORMAT_CHOICES
from moepatch.training.arguments import SOURCE_FLAGS
from moepatch.training.arguments import DataArguments
from moepatch.training.arguments import ModelArguments
from moepatch.training.arguments import RunArguments
from moepatch.training.distributed import expert_parallel_config
from moepatch.training.modes.base import PreparedRun
from moepatch.training.modes.base import RunMode
from moepatch.training.modes.registry import MODES
from moepatch.training.modes.registry import select_mode
from moepatch.training.parsing import parse_arguments
from moepatch.training.preflight import check_inputs
from moepatch.training.preflight import check_model_structure
from moepatch.training.preflight import load_tokenizer
from moepatch.training.preflight import prepare_config
from moepatch.training.preflight import read_moepatch_block
from moepatch.training.runner import main
from moepatch.training.runner import rounds_table
from moepatch.training.runner import run
from moepatch.training.sources import read_initial_weights
from moepatch.training.sources import source_names
from moepatch.training.sources import source_paths

__all__ = ["EP_IMPLEMENTATIONS", "FREEZE_CHOICES", "MODES", "PROMPT_FORMAT_CHOICES", "SOURCE_FLAGS", "DataArguments",
           "ModelArguments", "PreparedRun", "RunArguments", "RunMode", "check_inputs", "check_model_structure",
           "expert_parallel_config", "load_tokenizer", "main", "parse_arguments", "prepare_config",
           "read_initial_weights", "read_moepatch_block", "rounds_table", "run", "select_mode", "source_names",
           "source_paths"]
