"""Shared checks: JSON files named in config fields, read once for every feature."""

from __future__ import annotations

import json

import pytest

from moepatch.validation import read_json_beside
from moepatch.validation import read_json_object


def test_relative_names_are_found_beside_the_checkpoint_first(tmp_path, monkeypatch):
    checkpoint, elsewhere = tmp_path / "ckpt", tmp_path / "cwd"
    checkpoint.mkdir(), elsewhere.mkdir()
    (checkpoint / "list.json").write_text(json.dumps({"where": "checkpoint"}))
    (elsewhere / "list.json").write_text(json.dumps({"where": "cwd"}))
    (elsewhere / "only_here.json").write_text(json.dumps([1, 2]))
    monkeypatch.chdir(elsewhere)
    assert read_json_beside("list.json", checkpoint, "f") == {"where": "checkpoint"}
    assert read_json_beside("only_here.json", checkpoint, "f") == [1, 2]
    assert read_json_beside(str(elsewhere / "list.json"), checkpoint, "f") == {"where": "cwd"}


def test_missing_and_malformed_files_name_the_field_and_file(tmp_path):
    with pytest.raises(ValueError, match=r"^moepatch\.c2r\.path: file .*absent\.json' not found"):
        read_json_beside("absent.json", tmp_path, "moepatch.c2r.path")
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(ValueError, match=r"^moepatch\.lora_experts\.r: .*bad\.json is not JSON \(.*line 1\)"):
        read_json_beside("bad.json", tmp_path, "moepatch.lora_experts.r")
    (tmp_path / "list.json").write_text("[1]")
    with pytest.raises(ValueError, match=r"list\.json: expected a JSON object, got list"):
        read_json_object(tmp_path / "list.json")
    with pytest.raises(ValueError, match=r"bad\.json: not a readable JSON file"):
        read_json_object(tmp_path / "bad.json")
