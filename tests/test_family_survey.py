"""``docs/router-kinds.md`` is what ``scripts/family_survey.py`` reports now.

The document says, per MoE model type of the installed transformers, which family moepatch resolves, its router
kind and whether each feature is accepted, refused (with moepatch's message) or broken.  A change of moepatch that
changes any of that fails here, naming the type and the feature, until the document is regenerated with
``python scripts/family_survey.py --markdown docs/router-kinds.md``.  The whole survey runs in process (every type is
tiny and the survey takes well under a minute on one CPU thread), so no row can drift unnoticed; it is skipped under
another transformers version than the one the document names.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCUMENT = ROOT / "docs" / "router-kinds.md"
sys.path.insert(0, str(ROOT / "scripts"))
import family_survey  # noqa: E402  (a script, not a package)

REGENERATE = "python scripts/family_survey.py --markdown docs/router-kinds.md"


def test_document_equals_a_fresh_survey() -> None:
    """Every row, reason and count of the document, against the survey run now (another transformers has other
    model types and defaults: the document describes the version it names, so the comparison needs that one)."""
    import transformers

    written = DOCUMENT.read_text()
    versions = family_survey.VERSIONS.search(written)
    assert versions is not None, f"{DOCUMENT.name} has no versions line"
    if versions["transformers"] != transformers.__version__:
        pytest.skip(f"{DOCUMENT.name} describes transformers {versions['transformers']}, this is "
                    f"{transformers.__version__}")
    with family_survey.quiet():
        rows = family_survey.survey(family_survey.survey_types(), timeout=120)
    difference = family_survey.first_difference(family_survey.render(rows), written)
    assert difference is None, f"{DOCUMENT.name} is out of date: {difference}; regenerate it with {REGENERATE}"


def test_document_covers_every_router_kind_type_and_the_anchor_families() -> None:
    """The types the router-kind tests build all have a row (a type dropped from the survey would go unchecked)."""
    from moepatch.testing import tiny_kinds

    rows = family_survey.parse(DOCUMENT.read_text())
    missing = [name for name in (*tiny_kinds.ROUTER_KIND_TYPES, "qwen2_moe", "mixtral") if name not in rows]
    assert not missing
    assert rows["deepseek_v3"]["tiny model"] == "tiny_kinds"  # the tiny model with random non-zero biases


def _doctored(text: str, model_type: str, column: str, value: str) -> str:
    """``text`` with the table cell of ``model_type`` in ``column`` set to ``value``."""
    lines = text.splitlines()
    header = next(line for line in lines if line.startswith(family_survey.TABLE_START))
    position = [cell.strip() for cell in header.strip().strip("|").split("|")].index(column)
    for number, line in enumerate(lines):
        if line.startswith(f"| {model_type} |"):
            cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
            assert cells[position] != value
            cells[position] = value
            lines[number] = "| " + " | ".join(cells) + " |"
    return "\n".join(lines) + "\n"


def test_check_refuses_a_doctored_document_naming_the_type_and_the_feature(tmp_path: Path, capsys) -> None:
    with family_survey.quiet():
        document = family_survey.render(family_survey.survey(["qwen2_moe"], timeout=120))
    written = tmp_path / "router-kinds.md"
    written.write_text(document)
    assert family_survey.main(["--types", "qwen2_moe", "--check", str(written)]) == 0

    written.write_text(_doctored(document, "qwen2_moe", "C2R", "❌"))
    assert family_survey.main(["--types", "qwen2_moe", "--check", str(written)]) == 1
    captured = capsys.readouterr()
    assert "qwen2_moe / C2R: the file has '❌', the survey gives '✅'" in captured.err
    assert "Traceback" not in captured.err


def test_first_difference_names_a_missing_reason_and_a_changed_header() -> None:
    text = DOCUMENT.read_text()
    reason = next(line for line in text.splitlines() if family_survey.REASON_LINE.match(line))
    model_type, column = family_survey.REASON_LINE.match(reason).group("type", "column")
    missing = family_survey.first_difference(text, text.replace(reason + "\n", ""))
    assert missing.startswith(f"{model_type} / {column} reason: the file has None")
    changed = text.replace("# What moepatch does", "# What moepatch did", 1)
    assert family_survey.first_difference(text, changed).startswith("line 1:")
