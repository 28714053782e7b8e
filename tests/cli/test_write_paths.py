"""Each command that writes files, failing at its last write, leaves every target exactly as it was and says so in
words: ``profile`` (matrices, heatmap, the C2R fields of config.json), ``place --write-permuted`` (a renumbered
checkpoint) and ``allocate`` (GuiLoMo's expert.json / rank.json).  A full disk is named with the target and the
reason — never ``OSError: [Errno 28]`` or the temporary name.  Outputs that cannot be written at all (``/proc``,
``/sys``) and outputs that hold the command's input are refused before any work."""

from __future__ import annotations

import contextlib
import hashlib
from pathlib import Path

import pytest

from moepatch import cli
from moepatch.testing import tiny

DISK_FULL = OSError(28, "No space left on device")


def _tree(root: Path) -> dict[str, str | None]:
    """Every entry under ``root`` (hidden ones included: a staging folder left behind is a change too): a file's
    bytes (as a digest), a folder's presence."""
    return {str(path.relative_to(root)): hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else None
            for path in sorted(root.rglob("*"))}


def _clean_failure(err: str, target: Path) -> None:
    """The message of a write that failed: the target and the reason in words, nothing raw."""
    assert f"{target}: could not be written (No space left on device" in err, err
    assert "Errno" not in err and "OSError" not in err and "Traceback" not in err and ".writing-" not in err, err


@pytest.fixture()
def checkpoint(tmp_path) -> Path:
    return tiny.save_tiny_checkpoint(tmp_path / "ck", "qwen2_moe")


def test_profile_failing_at_the_config_write_leaves_outputs_and_config_as_they_were(checkpoint, monkeypatch, capsys):
    assert cli.main(["profile", str(checkpoint), "--no-write-config"]) == 0  # an earlier profile's outputs
    before = _tree(checkpoint.parent)
    import moepatch.staged_output as staged
    import moepatch.tools.c2r.profiling as profiling

    def full_disk(target, text):  # the disk fills up while config.json's new copy is written
        with staged.staged_file(target) as scratch:
            scratch.write_text(text[:10])
            raise DISK_FULL

    monkeypatch.setattr(profiling, "write_text_atomically", full_disk)
    assert cli.main(["profile", str(checkpoint), "--seed", "3"]) == 1
    _clean_failure(capsys.readouterr().err, checkpoint / "config.json")
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
    _clean_failure(capsys.readouterr().err, tmp_path / "permuted")
    assert _tree(tmp_path) == before
    assert not (tmp_path / "permuted").exists()


ALLOCATE = ["--examples", "16", "--batch-size", "4", "--max-length", "48", "--max-experts", "2", "--max-rank", "4",
            "--target-modules", "q_proj"]


def test_allocate_failing_at_its_second_file_leaves_the_first_as_it_was(checkpoint, tmp_path, monkeypatch, capsys):
    output = tmp_path / "guilomo"
    output.mkdir()
    (output / "expert.json").write_text("{\"earlier\": 1}")
    import moepatch.tools.lora_experts.guilomo as staged  # the allocation writer's binding of staged_file

    real = staged.staged_file

    @contextlib.contextmanager
    def failing(target):
        with real(target) as scratch:
            if Path(target).name == "rank.json":  # the disk fills up while rank.json is written
                raise DISK_FULL
            yield scratch

    monkeypatch.setattr(staged, "staged_file", failing)
    before = _tree(tmp_path)
    assert cli.main(["allocate", str(checkpoint), "--output", str(output), *ALLOCATE]) == 1
    _clean_failure(capsys.readouterr().err, output / "rank.json")
    assert _tree(tmp_path) == before


def test_profile_into_the_folder_holding_the_checkpoint_is_refused(checkpoint, monkeypatch, capsys):
    """``profile CK --output PARENT``: the staged output folder would copy PARENT (CK included), the fields would be
    written into CK/config.json and the swap would put the old copy back over them — exit 0, fields lost.  Refused
    before profiling; config.json and every file beside it unchanged."""
    import moepatch.tools.c2r.pipeline as pipeline

    monkeypatch.setattr(pipeline, "profile_checkpoint", lambda *a, **k: pytest.fail("profiled before the refusal"))
    before = _tree(checkpoint.parent)
    assert cli.main(["profile", str(checkpoint), "--output", str(checkpoint.parent)]) == 2
    err = capsys.readouterr().err
    assert f"--output: {checkpoint.parent} holds the command's input {checkpoint} (model_path)" in err, err
    assert "Traceback" not in err
    assert _tree(checkpoint.parent) == before


@pytest.mark.parametrize("place", ["/proc", "/sys"])
@pytest.mark.parametrize("command", ["profile", "allocate"])
def test_an_output_that_cannot_be_written_is_refused_before_the_work(checkpoint, monkeypatch, capsys, place, command):
    """``/proc`` and ``/sys`` take no new file (``os.access`` says yes to root): refused naming the flag, before the
    profile or the search runs — not ``[Errno 2]`` / ``PermissionError`` after it."""
    if not Path(place).is_dir():
        pytest.skip(f"no {place} here")
    import moepatch.tools.c2r.pipeline as pipeline
    import moepatch.tools.lora_experts.allocate as allocate

    monkeypatch.setattr(pipeline, "profile_checkpoint", lambda *a, **k: pytest.fail("profiled before the refusal"))
    monkeypatch.setattr(allocate, "search_checkpoint", lambda *a, **k: pytest.fail("searched before the refusal"))
    before = _tree(checkpoint.parent)
    extra = ALLOCATE if command == "allocate" else []
    with pytest.raises(SystemExit) as stop:  # checked by the argument's type: argparse's usage error
        cli.main([command, str(checkpoint), "--output", f"{place}/moepatch-out", *extra])
    assert stop.value.code == 2
    err = capsys.readouterr().err
    assert f"--output: {place}/moepatch-out cannot be written" in err, err
    assert "Errno" not in err and "Error:" not in err and "Traceback" not in err
    assert _tree(checkpoint.parent) == before
