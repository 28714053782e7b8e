"""``moepatch install``: make a checkpoint folder load already patched through ``trust_remote_code``.

Tools that never import moepatch (lm-eval, a plain Trainer script, a notebook) load checkpoints with
``AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True)``.  :func:`install` writes a small loader module
(``moepatch_loader.py``, no model code: it imports moepatch and calls :func:`moepatch.from_pretrained`) into the
folder and points the ``AutoConfig`` / ``AutoModelForCausalLM`` entries of config.json's ``auto_map`` at it.  The
original config.json is kept byte for byte beside it, and :func:`uninstall` puts it back and deletes what install
wrote.  Everything is validated before the folder is touched.

Note: transformers prefers a *locally registered* non-transformers class over ``auto_map``; in a process that has
imported moepatch, the families moepatch implements itself load through moepatch's own classes, which apply the same
config on load.
"""

from __future__ import annotations

import json
import os
from importlib import resources
from pathlib import Path
from typing import Any

from model_patches.structure import MoEModel
from model_patches.structure import describe
from moepatch._version import __version__
from moepatch.config import CONFIG_KEY
from moepatch.config import MoePatchConfig
from moepatch.loading.pretrained import LOADER_MODULE
from moepatch.loading.pretrained import load_config
from moepatch.loading.skeleton import weightless_model
from moepatch.patch import plan_each
from moepatch.patch import problem_lines
from moepatch.staged_output import staged_file
from moepatch.staged_output import write_text_atomically
from moepatch.validation import has_weights
from moepatch.validation import read_json_object

BACKUP_NAME = "config.json.moepatch-orig"
LOADER_FILE = f"{LOADER_MODULE}.py"
LOADER_AUTO_MAP = {
    "AutoConfig": f"{LOADER_MODULE}.MoePatchedConfig",
    "AutoModelForCausalLM": f"{LOADER_MODULE}.MoePatchedForCausalLM",
}


def _loader_source() -> str:
    template = resources.files("moepatch.loading.templates").joinpath("moepatch_loader.py").read_text(encoding="utf-8")
    marker = 'REQUIRED_MOEPATCH = "0.0.0"  # replaced by `moepatch install`'
    if marker not in template:
        raise RuntimeError("moepatch loader template is damaged (version marker missing)")
    return template.replace(marker, f'REQUIRED_MOEPATCH = "{__version__}"')


def block_problems(moe: MoEModel, model_config: Any) -> list[str]:
    """Every problem of the model config's moepatch block, each ``field: message``: the parse-time ones and those of
    planning the features that parsed against ``moe`` (layer indices), so a user fixes them all in one go
    (``moepatch install`` and ``moepatch inspect`` list the same)."""
    data = model_config.get(CONFIG_KEY) if isinstance(model_config, dict) else getattr(model_config, CONFIG_KEY, None)
    settings, problems = MoePatchConfig.parse_each(data)
    try:
        settings.adopt_outside_block(model_config)  # the official top-level C2R fields, as from_model reads them
    except ValueError as error:
        problems.extend(problem_lines(error))
    _, errors = plan_each(moe, settings)  # an UnsupportedModelError (the model, not the block) propagates
    return problems + [line for error in errors for line in problem_lines(error)]


def block_problems_error(config_file: Path, problems: list[str]) -> ValueError:
    """One error naming ``config_file`` (the file to edit) and listing every problem, counted."""
    if len(problems) == 1:
        return ValueError(f"{config_file}: invalid moepatch config: {problems[0]}")
    return ValueError(f"{config_file}: {len(problems)} problems in the moepatch config:\n  " + "\n  ".join(problems))


def check_installable(path: str | Path) -> None:
    """Validate the folder and its moepatch config without changing anything.

    Raises:
        ValueError: no config.json, the model family is not supported, or the moepatch config is invalid (naming
            config.json and every problem of its block).
    """

    folder = Path(path)
    config_file = folder / "config.json"
    if not config_file.is_file():
        raise ValueError(f"moepatch install: {folder} has no config.json")
    config = load_config(folder)
    moe = describe(weightless_model(config), verify=False)  # UnsupportedModelError (a ValueError) names the families
    problems = block_problems(moe, config)
    if problems:
        raise block_problems_error(config_file, problems)


def _auto_map(config: dict[str, Any]) -> dict[str, Any]:
    """The config's ``auto_map`` object (``{}`` when it has none, or not an object)."""
    auto_map = config.get("auto_map")
    return auto_map if isinstance(auto_map, dict) else {}


def _check_writable(folder: Path, names: tuple[str, ...]) -> None:
    """Every change ``install`` / ``uninstall`` makes must be possible before the first one is made."""

    if not os.access(folder, os.W_OK | os.X_OK):
        raise ValueError(f"{folder} is not writable")
    for name in names:
        if (folder / name).exists() and not os.access(folder / name, os.W_OK):
            raise ValueError(f"{folder / name} is not writable")


def install(path: str | Path, *, replace_auto_map: bool = False) -> Path:
    """Write the loader and the ``auto_map`` entries into ``path`` (idempotent); return the loader file.

    ``uninstall`` restores config.json as it was before the first ``install``: edit config.json after uninstalling.
    Everything is checked (the folder, its weights, its moepatch config, an ``auto_map`` that can take the entries,
    a readable backup, write permission) before anything is written.

    Args:
        path (`str` or `Path`): the checkpoint folder.
        replace_auto_map (`bool`, *optional*, defaults to `False`): replace ``auto_map`` entries of the folder's
            own code (``AutoConfig`` / ``AutoModelForCausalLM`` pointing at its ``.py`` files, as published
            LLaMA-MoE folders have); refused otherwise.  ``uninstall`` puts them back.

    Raises:
        ValueError: naming config.json and the entries, for an ``auto_map`` of other code without
            ``replace_auto_map``; and for every other check above.
    """

    folder = Path(path)
    check_installable(folder)
    if not has_weights(folder):
        raise ValueError(f"{folder} holds no weights (no *.safetensors or pytorch_model*.bin); install makes a "
                         "checkpoint load patched, so it needs one")
    backup = folder / BACKUP_NAME
    config_file = folder / "config.json"
    current = read_json_object(config_file)
    original = read_json_object(backup) if backup.exists() else current
    original_auto_map = original.get("auto_map")
    if original_auto_map is not None and not isinstance(original_auto_map, dict):
        raise ValueError(f"{config_file}: auto_map must be an object {{\"AutoModelForCausalLM\": ...}}, got "
                         f"{type(original_auto_map).__name__}")
    current_auto_map = _auto_map(current)
    foreign = {key: value for key, value in current_auto_map.items()
               if key in LOADER_AUTO_MAP and value != LOADER_AUTO_MAP[key]}
    if foreign and not replace_auto_map:
        shown = ", ".join(f"auto_map.{key} = {value!r}" for key, value in foreign.items())
        raise ValueError(f"{config_file}: {shown}: the folder's own code, which install would replace with "
                         "moepatch's loader (uninstall puts it back); run `moepatch install --replace-auto-map` "
                         "(replace_auto_map=True) to do so")
    _check_writable(folder, ("config.json", BACKUP_NAME, LOADER_FILE))

    installed = {**current, "auto_map": {**(original_auto_map or {}), **LOADER_AUTO_MAP}}
    loader = folder / LOADER_FILE
    made = [path for path in (loader, backup) if not path.exists()]
    try:  # the loader and the backup first, config.json last: a failure at any point leaves the folder as it was
        write_text_atomically(loader, _loader_source())
        if not backup.exists():  # byte for byte: uninstall restores exactly this
            with staged_file(backup) as scratch:
                scratch.write_bytes(config_file.read_bytes())
        write_text_atomically(config_file, json.dumps(installed, indent=2) + "\n")
    except BaseException:
        for path in made:
            path.unlink(missing_ok=True)
        raise
    return loader


SHAPE_FIELDS = ("model_type", "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
                "intermediate_size", "moe_intermediate_size", "vocab_size", "num_experts", "num_local_experts",
                "n_routed_experts")
"""config.json fields that fix the weights' shapes: a backup that differs in one is another model's config."""


def uninstall(path: str | Path, *, force: bool = False) -> None:
    """Restore config.json byte for byte and delete the loader; ``ValueError`` if the folder was not installed.

    config.json edited since ``install`` (other than moepatch's ``auto_map`` entries) would lose the edits: that is
    refused unless ``force``.
    """
    folder = Path(path)
    backup = folder / BACKUP_NAME
    if not backup.exists():
        raise ValueError(f"moepatch uninstall: {folder} was not prepared by `moepatch install` (no {BACKUP_NAME})")
    original = read_json_object(backup)
    if not force:
        current = read_json_object(folder / "config.json")
        original_auto_map = _auto_map(original)
        if current != {**original, "auto_map": {**original_auto_map, **LOADER_AUTO_MAP}}:
            changed = sorted(key for key in set(current) | set(original) if key != "auto_map"
                             and current.get(key) != original.get(key))
            raise ValueError(f"{folder / 'config.json'} was edited since `moepatch install` (fields {changed}); "
                             "uninstall restores the file as it was before install and would lose those edits: "
                             "copy them, or run `moepatch uninstall --force` (force=True)")
    else:  # edits are given up, but never for a backup that describes another model than the weights'
        current = read_json_object(folder / "config.json")
        differs = [key for key in SHAPE_FIELDS if key in current and current.get(key) != original.get(key)]
        if differs:
            key = differs[0]
            raise ValueError(f"{backup} describes another model than {folder / 'config.json'} ({key}: "
                             f"{original.get(key)!r} in the backup, {current.get(key)!r} now): restoring it would "
                             "leave a config that does not fit the weights, even with force; nothing changed")
    _check_writable(folder, ("config.json", BACKUP_NAME, LOADER_FILE))

    with staged_file(folder / "config.json") as scratch:  # restored in one move: never half a config
        scratch.write_bytes(backup.read_bytes())
    (folder / LOADER_FILE).unlink(missing_ok=True)
    backup.unlink()
