"""The router-kind table of docs/families.md (the README links it) says what the survey finds: every model type it
names has that kind in docs/router-kinds.md (itself checked against a fresh survey by test_family_survey.py) and the
outcome it claims for freezing / statistics, C2R and the bias update."""

from __future__ import annotations

import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _kind_rows() -> list[list[str]]:
    text = (REPO / "docs" / "families.md").read_text()
    start = text.index("| kind | model types (examples) |")
    table = text[start:text.index("\n\n", start)].splitlines()[2:]
    return [[cell.strip() for cell in line.strip().strip("|").split("|")] for line in table]


def _survey_rows() -> dict[str, dict[str, str]]:
    lines = (REPO / "docs" / "router-kinds.md").read_text().splitlines()
    header_at = next(i for i, line in enumerate(lines) if line.startswith("| model type |"))
    header = [cell.strip() for cell in lines[header_at].strip().strip("|").split("|")]
    rows = {}
    for line in lines[header_at + 2:]:
        if not line.startswith("|"):
            break
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        rows[cells[0]] = dict(zip(header, cells, strict=True))
    return rows


def test_every_type_the_readme_names_has_its_kind_and_outcomes_in_the_survey():
    survey = _survey_rows()
    checked = 0
    for kind, types, structure, c2r, bias in _kind_rows():
        letter = kind.split(" ")[0] if not kind.startswith("D + H") else "D + H"
        for model_type in re.findall(r"`([a-z0-9_]+)`", types):
            row = survey[model_type]
            if letter != "H":
                assert row["kind"] == letter, (model_type, row["kind"], letter)
            expected = "✅" if structure.startswith("✅") else None
            if expected:
                assert row["freeze_gate"].startswith("✅") and row["routing_stats"].startswith("✅"), model_type
            assert row["C2R"].startswith("✅") == c2r.startswith("✅"), (model_type, row["C2R"], c2r)
            assert row["bias_update"].startswith("✅") == bias.startswith("✅"), (model_type, row["bias_update"], bias)
            checked += 1
    assert checked >= 25
