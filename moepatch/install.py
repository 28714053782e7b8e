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
from importlib import resources
from pathlib import Path
from typing import Any

from moepatch.loading import LOADER_MODULE

BACKUP_NAME = "config.json.moepatch-orig"
LOADER_FILE = f"{LOADER_MODULE}.py"
LOADER_AUTO_MAP = {
    "AutoConfig": f"{LOADER_MODULE}.MoePatchedConfig",
    "AutoModelForCausalLM": f"{LOADER_MODULE}.MoePatchedForCausalLM",
}


def _loader_source() -> str:
    from moepatch import __version__

    template = resources.files("moepatch.templates").joinpath("moepatch_loader.py").read_text(encoding="utf-8")
    marker = 'REQUIRED_MOEPATCH = "0.0.0"  # replaced by `moepatch install`'
    if marker not in template:
        raise RuntimeError("moepatch loader template is damaged (version marker missing)")
    return template.replace(marker, f'REQUIRED_MOEPATCH = "{__version__}"')


def check_installable(path: str | Path) -> None:
    """Validate the folder and its moepatch config without changing anything.

    Raises:
        ValueError: no config.json, the model family is not supported, or the moepatch config is invalid.
    """
    import torch

    from moepatch.adapter import describe
    from moepatch.config import MoePatchConfig
    from moepatch.loading import load_config
    from moepatch.patch import plan_patch

    folder = Path(path)
    if not (folder / "config.json").is_file():
        raise ValueError(f"moepatch install: {folder} has no config.json")
    config = load_config(folder)
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(config)
    moe = describe(skeleton, verify=False)  # UnsupportedModelError (a ValueError) names the families
    plan_patch(moe, MoePatchConfig.from_model(config))


def install(path: str | Path) -> Path:
    """Write the loader and the ``auto_map`` entries into ``path`` (idempotent); return the loader file.

    ``uninstall`` restores config.json as it was before the first ``install``: edit config.json after uninstalling.
    """
    folder = Path(path)
    check_installable(folder)
    backup = folder / BACKUP_NAME
    config_file = folder / "config.json"
    current: dict[str, Any] = json.loads(config_file.read_text())
    if backup.exists():
        original_auto_map = json.loads(backup.read_text()).get("auto_map")
    else:
        original_auto_map = current.get("auto_map")
        backup.write_bytes(config_file.read_bytes())
    installed = {**current, "auto_map": {**(original_auto_map or {}), **LOADER_AUTO_MAP}}
    config_file.write_text(json.dumps(installed, indent=2) + "\n")
    loader = folder / LOADER_FILE
    loader.write_text(_loader_source(), encoding="utf-8")
    return loader


def uninstall(path: str | Path) -> None:
    """Restore config.json byte for byte and delete the loader; ``ValueError`` if the folder was not installed."""
    folder = Path(path)
    backup = folder / BACKUP_NAME
    if not backup.exists():
        raise ValueError(f"moepatch uninstall: {folder} was not prepared by `moepatch install` (no {BACKUP_NAME})")
    (folder / "config.json").write_bytes(backup.read_bytes())
    (folder / LOADER_FILE).unlink(missing_ok=True)
    backup.unlink()
