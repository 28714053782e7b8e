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
