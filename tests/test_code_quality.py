"""The tools a contributor expects run as part of the suite (so CI runs them): ruff with the project's rules
(pycodestyle, pyflakes, isort, pyupgrade, bugbear, complexity ≤ 20; ``pyproject.toml``) on every Python folder, and
mypy on the packages listed in :data:`TYPED`."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LINTED = ("model_patches", "moepatch", "tests", "scripts", "benchmarks")
TYPED = ("moepatch", "model_patches")
"""What mypy checks clean (its settings in ``pyproject.toml``)."""


def _run(*command: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", *command], cwd=ROOT, capture_output=True, text=True, timeout=900)


def test_ruff_is_clean() -> None:
    done = _run("ruff", "check", "--no-cache", *LINTED)  # a cache keeps an import's old first-party verdict
    assert done.returncode == 0, done.stdout[-6000:] + done.stderr[-2000:]


def test_mypy_is_clean() -> None:
    done = _run("mypy", *TYPED)
    assert done.returncode == 0, done.stdout[-6000:] + done.stderr[-2000:]
