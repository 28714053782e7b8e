"""Version gates: moepatch refuses, at import, a transformers outside 5.x or a too-old torch."""

from __future__ import annotations

import pytest
from packaging.version import Version

from moepatch import compat


@pytest.mark.parametrize("version", ["4.57.1", "6.0.0", "3.0.0"])
def test_unsupported_transformers_fails_with_an_actionable_message(monkeypatch, version):
    monkeypatch.setattr(compat, "TRANSFORMERS_VERSION", Version(version))
    monkeypatch.setattr(compat.transformers, "__version__", version)
    with pytest.raises(ImportError, match=rf"found transformers {version}.*pip install 'transformers>=5.0.0,<6.0.0'"):
        compat.check_versions()


def test_old_torch_fails(monkeypatch):
    monkeypatch.setattr(compat, "TORCH_VERSION", Version("2.1.0"))
    with pytest.raises(ImportError, match="torch==2.13.0"):
        compat.check_versions()


def test_installed_versions_pass():
    compat.check_versions()
    assert compat.current_backward_task_id() == -1
