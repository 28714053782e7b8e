"""Each command that writes files, failing at its last write, leaves every target exactly as it was: ``profile``
(matrices, heatmap, the C2R fields of config.json), ``place --write-permuted`` (a renumbered checkpoint) and
``allocate`` (GuiLoMo's expert.json / rank.json)."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from moepatch import cli
from moepatch.testing import tiny

DISK_FULL = OSError(28, "No space left on device")


def _tree(root: Path) -> dict[str, str]:
    """Every file under ``root`` (hidden ones included: a staging folder left behind is a change too)."""
    return {str(path.relative_to(root)): hashlib.sha256(path.read_bytes()).hexdigest()
            for path in sorted(root.rglob("*")) if path.is_file()}


@pytest.fixture()
def checkpoint(tmp_path) -> Path:
    return tiny.save_tiny_checkpoint(tmp_path / "ck", "qwen2_moe")


def test_profile_failing_at_the_config_write_leaves_outputs_and_config_as_they_were(checkpoint, monkeypatch, capsys):
    assert cli.main(["profile", str(checkpoint), "--no-write-config"]) == 0  # an earlier profile's outputs
    before = _tree(checkpoint.parent)
    import moepatch.tools.c2r.profiling as profiling

    def failing(*args, **kwargs):
        raise DISK_FULL

    monkeypatch.setattr(profiling, "write_c2r_fields", failing)
    assert cli.main(["profile", str(checkpoint), "--seed", "3"]) == 1
    assert "No space left on device" in capsys.readouterr().err
    assert _tree(checkpoint.parent) == before


def test_place_failing_after_saving_the_weights_leaves_no_checkpoint(checkpoint, tmp_path, monkeypatch, capsys):
    import moepatch.tools.c2r.permutation as permutation

    real_copy = permutation.shutil.copy2

    def failing_copy(source, target, *args, **kwargs):
        if Path(source).name.startswith("tokenizer"):
            raise DISK_FULL
        return real_copy(source, target, *args, **kwargs)

    monkeypatch.setattr(permutation.shutil, "copy2", failing_copy)
    before = _tree(tmp_path)
    assert cli.main(["place", str(checkpoint), "--ep-size", "2", "--max-tokens", "96",
                     "--write-permuted", str(tmp_path / "permuted")]) == 1
    assert "No space left on device" in capsys.readouterr().err
    assert _tree(tmp_path) == before
    assert not (tmp_path / "permuted").exists()


def test_allocate_failing_at_its_second_file_leaves_the_first_as_it_was(checkpoint, tmp_path, monkeypatch, capsys):
    output = tmp_path / "guilomo"
    output.mkdir()
    (output / "expert.json").write_text("{\"earlier\": 1}")
    import moepatch.staged_output as staged

    real = staged.staged_file

    def failing(target):
        if Path(target).name == "rank.json":
            raise DISK_FULL
        return real(target)

    monkeypatch.setattr(staged, "staged_file", failing)
    before = _tree(tmp_path)
    assert cli.main(["allocate", str(checkpoint), "--output", str(output), "--examples", "16", "--batch-size", "4",
                     "--max-length", "48", "--max-experts", "2", "--max-rank", "4", "--target-modules", "q_proj"]) == 1
    assert "No space left on device" in capsys.readouterr().err
    assert _tree(tmp_path) == before
