"""``moepatch env``: versions of moepatch and the packages it works with, to paste into a bug report."""

from __future__ import annotations

import argparse

ECOSYSTEM = ("torch", "transformers", "accelerate", "deepspeed", "peft", "lm_eval", "safetensors")
"""Packages whose versions change moepatch's behaviour (import names; the distribution uses ``-`` for ``_``)."""


def cmd_env(args: argparse.Namespace) -> int:
    """Print one ``name: version`` line per package (``not installed`` when absent) and whether CUDA is usable."""
    import importlib.metadata as metadata
    import platform

    import torch

    from moepatch import __version__

    print(f"moepatch: {__version__}")
    print(f"python: {platform.python_version()} ({platform.platform()})")
    for package in ECOSYSTEM:
        try:
            version = metadata.version(package.replace("_", "-"))
        except metadata.PackageNotFoundError:
            version = "not installed"
        print(f"{package}: {version}")
    print(f"cuda available: {torch.cuda.is_available()}")
    return 0
