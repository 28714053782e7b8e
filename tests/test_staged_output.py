"""Staged writes land whole or not at all, and an output that would overwrite an input is refused."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from moepatch.errors import UsageError
from moepatch.staged_output import refuse_output_in_inputs
from moepatch.staged_output import staged_file
from moepatch.staged_output import staged_folder
from moepatch.staged_output import write_text_atomically


def _tree(root: Path) -> dict[str, bytes]:
    return {str(path.relative_to(root)): path.read_bytes() for path in sorted(root.rglob("*")) if path.is_file()}


def test_a_staged_file_replaces_its_target_only_on_success(tmp_path):
    target = tmp_path / "routes.jsonl"
    target.write_text("earlier\n")
    os.chmod(target, 0o640)
    with pytest.raises(RuntimeError), staged_file(target) as scratch:
        scratch.write_text("half")
        raise RuntimeError("killed")
    assert target.read_text() == "earlier\n" and sorted(p.name for p in tmp_path.iterdir()) == ["routes.jsonl"]
    with staged_file(target) as scratch:
        assert scratch.parent == tmp_path and scratch.suffix == ".jsonl" and scratch != target
        scratch.write_text("new\n")
        assert target.read_text() == "earlier\n"  # not visible before the block ends
    assert target.read_text() == "new\n" and oct(target.stat().st_mode & 0o777) == oct(0o640)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["routes.jsonl"]
    assert write_text_atomically(tmp_path / "sub" / "x.json", "{}").read_text() == "{}"


def test_a_staged_folder_swaps_whole_and_keeps_the_old_one_on_failure(tmp_path):
    target = tmp_path / "merged"
    (target / "a").mkdir(parents=True)
    (target / "a" / "w.bin").write_bytes(b"old")
    (target / "merges.json").write_text("[1]")
    before = _tree(target)
    with pytest.raises(KeyboardInterrupt), staged_folder(target, start_from_existing=True) as scratch:
        assert _tree(scratch) == before  # starts as a copy
        (scratch / "b").mkdir()
        (scratch / "merges.json").write_text("[1, 2]")
        raise KeyboardInterrupt
    assert _tree(target) == before and sorted(p.name for p in tmp_path.iterdir()) == ["merged"]
    with staged_folder(target, start_from_existing=True) as scratch:
        (scratch / "b").mkdir()
        (scratch / "b" / "w.bin").write_bytes(b"new")
    assert _tree(target) == {**before, "b/w.bin": b"new"}
    with staged_folder(target) as scratch:  # a fresh folder replaces the old one as a whole
        (scratch / "only.txt").write_text("x")
    assert _tree(target) == {"only.txt": b"x"} and sorted(p.name for p in tmp_path.iterdir()) == ["merged"]


def test_a_write_killed_between_its_two_moves_gets_the_old_folder_back(tmp_path):
    """The one window a kill can leave: the old folder moved aside, the new one not yet in place.  The next staged
    write puts the old folder back before anything else (and cleans the rest)."""
    aside = tmp_path / ".router.writing-old-abc"
    aside.mkdir()
    (aside / "router.json").write_text(json.dumps({"tasks": ["a"]}))
    (tmp_path / ".router.writing-xyz").mkdir()  # the half-written new folder
    with pytest.raises(RuntimeError), staged_folder(tmp_path / "router"):
        raise RuntimeError("fails again")
    assert _tree(tmp_path) == {"router/router.json": b'{"tasks": ["a"]}'}


@pytest.mark.parametrize(("output", "inputs", "message"), [
    ("in.jsonl", {"--input": "in.jsonl"}, "is the command's input (--input)"),
    ("ck/routes.jsonl", {"--model": "ck"}, "lies inside the command's input"),
    ("out", {"--data": "out/data.jsonl"}, "holds the command's input"),
    (".", {"--data": "out/data.jsonl"}, "holds the command's input"),
])
def test_outputs_over_inputs_are_refused_naming_both(tmp_path, monkeypatch, output, inputs, message):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "ck").mkdir()
    (tmp_path / "out").mkdir()
    (tmp_path / "in.jsonl").write_text("{}\n")
    with pytest.raises(UsageError, match="--output") as caught:
        refuse_output_in_inputs(output, "--output", inputs)
    assert message in str(caught.value)


def test_separate_outputs_and_links_to_inputs(tmp_path):
    (tmp_path / "in.jsonl").write_text("{}\n")
    (tmp_path / "link.jsonl").symlink_to(tmp_path / "in.jsonl")
    refuse_output_in_inputs(tmp_path / "routes.jsonl", "--routes", {"--input": tmp_path / "in.jsonl", "x": None})
    with pytest.raises(UsageError, match="is the command's input"):  # a link to the input is the input
        refuse_output_in_inputs(tmp_path / "link.jsonl", "--routes", {"--input": tmp_path / "in.jsonl"})


def test_one_check_for_every_command_lists_blame_and_default_outputs_inside_an_input(tmp_path):
    """Several files per flag; an output a command always writes inside an input (``CHECKPOINT/c2r_profile``) is
    allowed where the command says so, yet never the input or a folder around it; a folder the command always
    writes (``router/``) names the input's flag instead."""
    (tmp_path / "ck").mkdir()
    (tmp_path / "a.txt").write_text("a")
    with pytest.raises(UsageError, match=r"^--output: .* holds the command's input .*a\.txt \(--data\)"):
        refuse_output_in_inputs(tmp_path, "--output", {"--data": [tmp_path.parent / "b.txt", tmp_path / "a.txt"]})
    refuse_output_in_inputs(tmp_path / "ck" / "c2r_profile", "--output", {"model_path": tmp_path / "ck"},
                            output_may_lie_inside={"model_path"})
    for output in (tmp_path / "ck", tmp_path):
        with pytest.raises(UsageError, match="^--output: "):
            refuse_output_in_inputs(output, "--output", {"model_path": tmp_path / "ck"},
                                    output_may_lie_inside={"model_path"})
    (tmp_path / "router" / "encoder").mkdir(parents=True)
    with pytest.raises(UsageError, match=r"^--encoder: .*encoder lies inside .*router, which the command replaces"):
        refuse_output_in_inputs(tmp_path / "router", "output", {"--encoder": tmp_path / "router" / "encoder"},
                                blame_input=True)


def test_a_target_that_takes_no_file_is_refused_and_the_check_changes_nothing(tmp_path):
    from moepatch.staged_output import check_writable_target

    stamp = (tmp_path.stat().st_mtime_ns, sorted(tmp_path.iterdir()))
    assert check_writable_target(tmp_path / "new" / "out", "--output") == tmp_path / "new" / "out"
    assert (tmp_path.stat().st_mtime_ns, sorted(tmp_path.iterdir())) == stamp  # probed, then put back
    (tmp_path / "file").write_text("x")
    for path, folder, message in ((tmp_path / "file", True, "is a file"), (tmp_path, False, "is a folder"),
                                  (tmp_path / "file" / "sub", True, "lies under the file"),
                                  ("", True, "empty path")):
        with pytest.raises(UsageError, match=f"^--out: .*{message}"):
            check_writable_target(path, "--out", folder=folder)
    for place in ("/proc", "/sys"):
        if Path(place).is_dir():
            with pytest.raises(UsageError, match=f"^--out: {place}/x cannot be written: {place} does not accept"):
                check_writable_target(f"{place}/x", "--out")


def test_a_failing_write_names_the_target_in_words(tmp_path):
    """A full disk (or any OSError) while a staged write is written: a CommandError naming the target and the
    reason — no ``[Errno 28]``, no temporary name — and the target untouched."""
    from moepatch.errors import CommandError

    target = tmp_path / "routes.jsonl"
    target.write_text("earlier\n")
    with pytest.raises(CommandError) as caught, staged_file(target) as scratch:
        scratch.write_text("half")
        raise OSError(28, "No space left on device", str(scratch))
    assert str(caught.value) == f"{target}: could not be written (No space left on device); it was left as it was"
    with pytest.raises(CommandError, match=r"merged: could not be written \(Permission denied: /elsewhere/x\)"), \
            staged_folder(tmp_path / "merged"):
        raise PermissionError(13, "Permission denied", "/elsewhere/x")
    assert _tree(tmp_path) == {"routes.jsonl": b"earlier\n"}
