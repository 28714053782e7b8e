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

MANIFEST_NAME = "manifest.json"
EXPERTS_FOLDER = "experts"
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

    def check_tasks(self, tasks: list[str], flag: str = "tasks") -> None:
        """``ValueError`` naming ``flag`` for unknown or repeated tasks and for an empty list."""
        if not tasks:
            raise ValueError(f"{flag}: no task given")
        unknown = [task for task in tasks if task not in self.tasks]
        if unknown:
            raise ValueError(f"{flag}: unknown task(s) {unknown}; the experts are {self.tasks}")
        repeated = sorted({task for task in tasks if tasks.count(task) > 1})
        if repeated:
            raise ValueError(f"{flag}: task(s) {repeated} given more than once")

    def check_base(self, config: Any, where: str) -> None:
        """``ValueError`` when ``config`` (a model config) is not the kind of model the experts were trained on."""
        model_type, hidden = getattr(config, "model_type", None), getattr(config, "hidden_size", None)
        if (model_type, hidden) != (self.model_type, self.hidden_size):
            raise ValueError(f"{where}: a {model_type} model with hidden size {hidden}, but the experts in "
                             f"{self.folder} were trained on {self.base} ({self.model_type}, hidden size "
                             f"{self.hidden_size})")

    def to_dict(self) -> dict[str, Any]:
        return {"base": self.base, "model_type": self.model_type, "hidden_size": self.hidden_size,
                "experts": [asdict(expert) for expert in self.experts]}

    def write(self, folder: str | Path | None = None) -> Path:
        folder = Path(folder) if folder is not None else self.folder
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / MANIFEST_NAME
        path.write_text(json.dumps(self.to_dict(), indent=1) + "\n")
        return path


def manifest_folder(path: str | Path) -> Path:
    """``OUT`` (a training run's output, holding ``experts/``) or the ``experts`` folder itself → the folder that
    holds ``manifest.json``."""
    path = Path(path)
    if (path / MANIFEST_NAME).is_file():
        return path
    if (path / EXPERTS_FOLDER / MANIFEST_NAME).is_file():
        return path / EXPERTS_FOLDER
    raise ValueError(f"{path}: no {MANIFEST_NAME} here or in {path / EXPERTS_FOLDER} (train task experts first: "
                     "scripts/finetune.py --task_experts true)")


def read_manifest(path: str | Path, *, check_files: bool = True) -> ExpertManifest:
    """The manifest of ``path`` (see :func:`manifest_folder`), every field checked; ``check_files``: every expert's
    folder holds a peft adapter.  ``ValueError`` naming the field or file."""
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
    if not experts:
        raise ValueError(f"{file}: no experts")
    return ExpertManifest(data["base"], data["model_type"], data["hidden_size"], experts, folder)


def base_model(manifest: ExpertManifest) -> tuple[Any, Any]:
    """The patched base named by the manifest and the experts' tokenizer (a pad token set for batches)."""
    from transformers import AutoTokenizer

    import moepatch

    if not Path(manifest.base).is_dir():
        raise ValueError(f"output: the experts' base {manifest.base} (manifest.json 'base') is not a folder here")
    model = moepatch.from_pretrained(manifest.base)
    manifest.check_base(model.config, manifest.base)
    tokenizer = AutoTokenizer.from_pretrained(str(manifest.folder))
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer
