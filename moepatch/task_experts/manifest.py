"""``OUT/experts/manifest.json``: which task experts a run trained, where they are and what they adapt.

MELD (Yan et al., KDD 2024) keeps one peft LoRA folder per task; the manifest is what lets every later step (router,
merges, serving, vLLM export, lm-eval) find them without guessing from folder names, and check that an expert was
trained on the base it is about to be loaded on.  Paths are stored relative to the manifest, so the folder can be
moved as a whole.
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict
from dataclasses import dataclass
from dataclasses import field
from pathlib import Path
from typing import Any

from moepatch.errors import CommandError
from moepatch.errors import FieldError
from moepatch.staged_output import write_text_atomically

MANIFEST_NAME = "manifest.json"
EXPERTS_FOLDER = "experts"
ROUTER_FOLDER = "router"
ROUTER_CONFIG = "router.json"
ROUTER_WEIGHTS = "router.safetensors"
MERGED_FOLDER = "merged"
MERGES_FILE = "merges.json"
"""The names inside a run's ``experts`` folder, in this torch-free module so the CLI can name them before it
imports torch."""
TASK_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]*")
"""A task name is also a folder and a peft adapter name (which cannot hold a dot): letters, digits, ``_ -``, not
starting with a symbol."""


@dataclass
class TaskExpert:
    """One trained expert: a peft LoRA folder and what it was trained on."""

    task: str
    path: str  # relative to the manifest's folder
    rank: int
    alpha: float
    target_modules: list[str]
    target_parameters: list[str] = field(default_factory=list)
    train_loss: float | None = None
    examples: int = 0


@dataclass
class ExpertManifest:
    """The experts of one base model (``base``: the checkpoint they were trained on; ``model_type`` and
    ``hidden_size`` are checked against any base they are later loaded on)."""

    base: str
    model_type: str
    hidden_size: int
    experts: list[TaskExpert]
    folder: Path = field(default=Path("."), compare=False)
    complete: bool = True
    """False from the start of a ``--task_experts`` run until its last file (the tokenizer) is written: a run killed
    half-way leaves a manifest every command refuses as incomplete instead of one that looks finished."""
    planned: list[str] = field(default_factory=list)
    """The tasks the run set out to train (with the earlier run's experts it keeps): what an incomplete run lacks."""

    @property
    def tasks(self) -> list[str]:
        return [expert.task for expert in self.experts]

    def expert(self, task: str) -> TaskExpert:
        """The expert of ``task``; ``ValueError`` naming the known tasks otherwise."""
        for expert in self.experts:
            if expert.task == task:
                return expert
        raise ValueError(f"unknown task {task!r}: the experts in {self.folder / MANIFEST_NAME} are {self.tasks}")

    def expert_path(self, task: str) -> Path:
        return self.folder / self.expert(task).path

    def check_tasks(self, tasks: list[str], name: str = "tasks") -> None:
        """:class:`~moepatch.errors.FieldError` on ``name`` (the caller's name for ``tasks``) for unknown or
        repeated tasks and for an empty list."""
        if not tasks:
            raise FieldError(name, "no task given")
        unknown = [task for task in tasks if task not in self.tasks]
        if unknown:
            raise FieldError(name, f"unknown task(s) {unknown}; the experts are {self.tasks}")
        repeated = sorted({task for task in tasks if tasks.count(task) > 1})
        if repeated:
            raise FieldError(name, f"task(s) {repeated} given more than once")

    def check_base(self, config: Any, where: str) -> None:
        """``ValueError`` when ``config`` (a model config) is not the kind of model the experts were trained on."""
        model_type, hidden = getattr(config, "model_type", None), getattr(config, "hidden_size", None)
        if (model_type, hidden) != (self.model_type, self.hidden_size):
            raise ValueError(f"{where}: a {model_type} model with hidden size {hidden}, but the experts in "
                             f"{self.folder} were trained on {self.base} ({self.model_type}, hidden size "
                             f"{self.hidden_size}: {MANIFEST_NAME} 'model_type' / 'hidden_size')")

    def to_dict(self) -> dict[str, Any]:
        return {"base": self.base, "model_type": self.model_type, "hidden_size": self.hidden_size,
                "experts": [asdict(expert) for expert in self.experts], "complete": self.complete,
                "planned": list(self.planned)}

    def write(self, folder: str | Path | None = None) -> Path:
        """Write ``manifest.json`` in one move (a reader never sees half a manifest)."""
        folder = Path(folder) if folder is not None else self.folder
        return write_text_atomically(folder / MANIFEST_NAME, json.dumps(self.to_dict(), indent=1) + "\n")


def manifest_folder(path: str | Path) -> Path:
    """``OUT`` (a training run's output, holding ``experts/``) or the ``experts`` folder itself → the folder that
    holds ``manifest.json``."""
    path = Path(path)
    if (path / MANIFEST_NAME).is_file():
        return path
    if (path / EXPERTS_FOLDER / MANIFEST_NAME).is_file():
        return path / EXPERTS_FOLDER
    raise ValueError(f"{path}: no {MANIFEST_NAME} here or in {path / EXPERTS_FOLDER} (train task experts first: "
                     "`scripts/finetune.py --task_experts true`)")


def read_manifest(path: str | Path, *, check_files: bool = True, allow_incomplete: bool = False) -> ExpertManifest:
    """The manifest of ``path`` (see :func:`manifest_folder`), every field checked; ``check_files``: every expert's
    folder holds a peft adapter; ``allow_incomplete``: accept the manifest of a run that has not finished (only the
    training run that continues it does).  ``ValueError`` naming the field or file."""
    folder = manifest_folder(path)
    file = folder / MANIFEST_NAME
    try:
        data = json.loads(file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ValueError(f"{file}: not JSON ({error})") from None
    if not isinstance(data, dict) or not isinstance(data.get("experts"), list):
        raise ValueError(f"{file}: expected an object with an 'experts' list")
    for key, kind in (("base", str), ("model_type", str), ("hidden_size", int)):
        if not isinstance(data.get(key), kind):
            raise ValueError(f"{file}: {key}: expected a {kind.__name__}, got {data.get(key)!r}")
    complete, planned = data.get("complete", True), data.get("planned", [])
    if not isinstance(complete, bool):
        raise ValueError(f"{file}: complete: expected true or false, got {complete!r}")
    if not isinstance(planned, list) or not all(isinstance(task, str) for task in planned):
        raise ValueError(f"{file}: planned: expected a list of task names, got {planned!r}")
    experts = []
    for index, entry in enumerate(data["experts"]):
        where = f"{file}: experts[{index}]"
        if not isinstance(entry, dict):
            raise ValueError(f"{where}: expected an object")
        try:
            expert = TaskExpert(**entry)
        except TypeError as error:
            raise ValueError(f"{where}: {error}") from None
        if not isinstance(expert.task, str) or not TASK_NAME.fullmatch(expert.task):
            raise ValueError(f"{where}.task: expected a name of letters, digits, '_', '-', got {expert.task!r}")
        if not isinstance(expert.rank, int) or expert.rank < 1:
            raise ValueError(f"{where}.rank: expected an integer >= 1, got {expert.rank!r}")
        adapter = folder / expert.path
        if check_files and not (adapter / "adapter_config.json").is_file():
            raise ValueError(f"{where}: the expert of task {expert.task!r} is missing: no adapter_config.json in "
                             f"{adapter}")
        experts.append(expert)
    tasks = [expert.task for expert in experts]
    if len(set(tasks)) != len(tasks):
        raise ValueError(f"{file}: a task appears twice in {tasks}")
    if not complete and not allow_incomplete:
        missing = [task for task in planned if task not in tasks]
        raise ValueError(f"{file}: the run that wrote it did not finish (complete: false; trained {tasks} of the "
                         f"planned {planned}{f', missing {missing}' if missing else ''}): it was killed or failed. "
                         "Run `scripts/finetune.py --task_experts true --output_dir` with the same folder again to "
                         "finish it")
    if not experts and not allow_incomplete:
        raise ValueError(f"{file}: no experts")
    return ExpertManifest(data["base"], data["model_type"], data["hidden_size"], experts, folder, complete, planned)


def base_model(manifest: ExpertManifest) -> tuple[Any, Any]:
    """The patched base named by the manifest and the experts' tokenizer (a pad token set for batches)."""
    from transformers import AutoTokenizer

    import moepatch
    from moepatch.loading.pretrained import load_config
    from moepatch.loading.skeleton import weightless_model
    from moepatch.loading.skeleton import weights_problem

    if not Path(manifest.base).is_dir():
        raise ValueError(f"{manifest.folder / MANIFEST_NAME}: base: {manifest.base} is not a folder here (the "
                         "checkpoint the experts were trained on)")
    config = load_config(manifest.base)
    manifest.check_base(config, manifest.base)  # from config.json and the weights' headers, before the load
    problem = weights_problem(Path(manifest.base), weightless_model(config))
    if problem is not None:  # truncated or foreign weights would load as random values
        raise CommandError(f"the experts' base (manifest.json 'base'): {problem}")
    model = moepatch.from_pretrained(manifest.base, config=config)
    tokenizer = AutoTokenizer.from_pretrained(str(manifest.folder))
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer
