"""``moepatch profile CKPT --ep-size D``: the placement for the EP size that will be used, from the same profiling
run — the same report ``moepatch place CKPT --ep-size D`` gives for vanilla routing (same corpus, seed and batches),
written to ``placement.json``; an EP size that cannot shard the experts is refused before anything loads."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from moepatch.cli import main
from moepatch.testing import tiny


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny.save_tiny_checkpoint(tmp_path_factory.mktemp("profile-ep") / "qwen2_moe", "qwen2_moe")


def test_profile_reports_the_placement_place_reports(checkpoint: Path, tmp_path: Path, capsys) -> None:
    output = tmp_path / "profile"
    assert main(["profile", str(checkpoint), "--ep-size", "2", "--no-write-config", "--output", str(output)]) == 0
    printed = capsys.readouterr().out
    assert "== expert placement over 2 devices (vanilla routing, this run) ==" in printed
    profiled = json.loads((output / "placement.json").read_text())
    assert main(["place", str(checkpoint), "--ep-size", "2", "--json"]) == 0
    placed = json.loads(capsys.readouterr().out)["reports"]["vanilla"]
    assert profiled == placed


@pytest.mark.parametrize(("ep_size", "message"), [("3", "--ep-size: 3 does not divide the 8 experts"),
                                                  ("0", "--ep-size")])
def test_bad_ep_size_is_refused_before_anything_is_written(checkpoint: Path, tmp_path: Path, capsys, ep_size: str,
                                                           message: str) -> None:
    before = sorted(path.name for path in checkpoint.iterdir())
    try:
        code = main(["profile", str(checkpoint), "--ep-size", ep_size, "--output", str(tmp_path / "out")])
    except SystemExit as exit_:  # argparse's own refusal of a non-positive number
        code = exit_.code
    assert code == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert sorted(path.name for path in checkpoint.iterdir()) == before and not (tmp_path / "out").exists()
