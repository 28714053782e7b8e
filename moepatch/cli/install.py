"""``moepatch install PATH`` / ``moepatch uninstall PATH``: make a checkpoint load already patched through
``trust_remote_code``, and undo it (the work and every check are :mod:`moepatch.loading.install`'s)."""

from __future__ import annotations

import argparse
from pathlib import Path


def cmd_install(args: argparse.Namespace) -> int:
    """Write moepatch's loader and the ``auto_map`` entries into the checkpoint."""
    from moepatch.cli.common import skeleton
    from moepatch.cli.common import weights_problem
    from moepatch.errors import CommandError
    from moepatch.loading.install import check_installable

    check_installable(Path(args.path))  # the folder and its moepatch block, as install itself checks them first
    problem = weights_problem(Path(args.path), skeleton(args.path, False)[1])
    if problem is not None:  # the headers alone: a truncated file or another model's weights, before any write
        raise CommandError(problem)
    from moepatch.loading.install import install

    loader = install(args.path, replace_auto_map=args.replace_auto_map)
    print(f"installed: {loader} and auto_map entries in {Path(args.path) / 'config.json'}")
    print("AutoModelForCausalLM.from_pretrained(PATH, trust_remote_code=True) now returns the patched model; "
          "`moepatch uninstall PATH` restores the folder")
    return 0


def cmd_uninstall(args: argparse.Namespace) -> int:
    """Restore config.json byte for byte and remove the loader (``--force`` when config.json was edited since)."""
    from moepatch.loading.install import uninstall

    uninstall(args.path, force=args.force)
    print(f"restored {Path(args.path) / 'config.json'} and removed the moepatch loader")
    return 0
