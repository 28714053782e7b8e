"""README.md and docs/ stay true: the README is a front door, every relative link resolves, every code block marked
runnable runs as written, the architecture page names every package of the layer contract, the config table names
every registered feature, the configuration page is generated from the declared fields, and the families page lists
every registered family.

A block is runnable when the line right before its fence is ``<!-- runnable -->``.  It runs in a fresh folder that
holds ``./ckpt`` (a tiny Qwen2-MoE checkpoint, as the pages say to make one) and a ``scripts`` link to the
repository's: a ``python`` block with ``python -c``, a ``bash`` block with ``bash -e -c``, with the repository root on
``PYTHONPATH`` and this interpreter's ``bin`` first on ``PATH`` (so ``moepatch`` is this checkout's).  Mark only
blocks that run in seconds on a CPU without network.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from moepatch.testing import tiny

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"
DOCS = REPO / "docs"
PAGES = [README, *sorted(DOCS.glob("*.md"))]
MAX_README_LINES = 200
RUNNABLE = "<!-- runnable -->"
FENCE = re.compile(r"^```(\w*)\s*$")
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")
BLOCK_FIELDS = {"family", "moepatch_version"}
"""Keys of the moepatch block that are not features (the block's own)."""


def _name(page: Path) -> str:
    return page.relative_to(REPO).as_posix()


def _prose(text: str) -> str:
    """``text`` without fenced code blocks and inline code spans (whose brackets are not links)."""
    text = re.sub(r"^```.*?^```[ \t]*$", "", text, flags=re.M | re.S)
    return re.sub(r"`[^`\n]*`", "", text)


def slug(heading: str) -> str:
    """GitHub's anchor of a heading: lower case, punctuation dropped (``-`` and ``_`` kept), spaces → ``-``."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def anchors(page: Path) -> set[str]:
    found: set[str] = set()
    seen: dict[str, int] = {}
    in_code = False
    for line in page.read_text(encoding="utf-8").splitlines():
        if line.startswith("```"):
            in_code = not in_code
        elif not in_code and (match := re.match(r"^#{1,6}\s+(.*?)\s*#*\s*$", line)):
            base = slug(match.group(1))
            count = seen.get(base, 0)
            seen[base] = count + 1
            found.add(base if count == 0 else f"{base}-{count}")
    return found


def runnable_blocks() -> list[tuple[str, str, str]]:
    """``(id, language, code)`` of every block marked runnable, in page order."""
    blocks = []
    for page in PAGES:
        lines = page.read_text(encoding="utf-8").splitlines()
        for at, line in enumerate(lines):
            if line.strip() != RUNNABLE:
                continue
            fence = FENCE.match(lines[at + 1]) if at + 1 < len(lines) else None
            assert fence, f"{_name(page)}:{at + 1}: {RUNNABLE} must be right before a ``` fence"
            end = next(i for i in range(at + 2, len(lines)) if lines[i].startswith("```"))
            blocks.append((f"{_name(page)}:{at + 3}", fence.group(1), "\n".join(lines[at + 2:end]) + "\n"))
    return blocks


BLOCKS = runnable_blocks()


def test_the_readme_is_a_front_door():
    lines = README.read_text(encoding="utf-8").splitlines()
    assert len(lines) <= MAX_README_LINES, f"README.md has {len(lines)} lines; move detail into docs/"
    # .ci/run runs these two blocks exactly as written
    for marker in ("<!-- main-command -->", "<!-- test-command -->"):
        at = lines.index(marker)
        assert lines[at + 1] == "```bash", marker
    assert any(block_id.startswith("README.md:") and language == "python" for block_id, language, _ in BLOCKS), \
        "the README's quick start must be marked runnable"


@pytest.mark.parametrize("page", PAGES, ids=_name)
def test_every_relative_link_resolves(page: Path):
    broken = []
    for target in LINK.findall(_prose(page.read_text(encoding="utf-8"))):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target):  # https:, mailto: ...
            continue
        path, _, anchor = target.partition("#")
        resolved = (page.parent / path).resolve() if path else page
        if not resolved.exists():
            broken.append(f"{target}: no such file")
        elif anchor and resolved.suffix == ".md" and anchor not in anchors(resolved):
            broken.append(f"{target}: no heading #{anchor} in {resolved.relative_to(REPO)}")
    assert broken == [], f"{_name(page)}: {broken}"


def test_no_page_points_outside_the_repository():
    for page in PAGES:
        text = page.read_text(encoding="utf-8")
        assert "../shared" not in text and "shared/specs" not in text, _name(page)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny.save_tiny_checkpoint(tmp_path_factory.mktemp("docs") / "ckpt", "qwen2_moe")


@pytest.mark.parametrize(("block_id", "language", "code"), BLOCKS, ids=[block[0] for block in BLOCKS])
def test_every_runnable_block_runs_as_written(block_id: str, language: str, code: str, checkpoint: Path,
                                              tmp_path: Path):
    shutil.copytree(checkpoint, tmp_path / "ckpt")
    (tmp_path / "scripts").symlink_to(REPO / "scripts")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
               PATH=os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")]),
               HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", MPLBACKEND="Agg")
    if language == "python":
        command = [sys.executable, "-c", code]
    elif language == "bash":
        command = ["bash", "-e", "-c", code]
    else:
        pytest.fail(f"{block_id}: a runnable block must be python or bash, not {language!r}")
    result = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, f"{block_id} failed:\n{code}\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"


def test_the_architecture_page_names_every_package_of_the_layer_contract():
    from test_architecture import LAYERS

    text = (DOCS / "architecture.md").read_text(encoding="utf-8")
    rows = {line.split("|")[1].strip(): line for line in text.splitlines() if line.startswith("| ")}
    for layer, packages in LAYERS:
        assert layer in rows, f"docs/architecture.md: no row for the layer {layer!r}"
        missing = [package for package in packages if f"`{package}`" not in rows[layer]]
        assert missing == [], f"docs/architecture.md: the {layer!r} row does not name {missing}"
    order = [row for row in rows if row in dict(LAYERS)]
    assert order == [layer for layer, _ in LAYERS], "docs/architecture.md: the layers are not in LAYERS' order"


def _config_table() -> dict[str, str]:
    """The README's config table: field → its row."""
    lines = README.read_text(encoding="utf-8").splitlines()
    start = lines.index("| field | values | meaning | docs |")
    table = {}
    for line in lines[start + 2:]:
        if not line.startswith("|"):
            break
        match = re.match(r"^\| `([a-z0-9_]+)` \|", line)
        assert match, f"README.md config table: a row that names no field: {line}"
        table[match.group(1)] = line
    return table


def test_the_config_table_lists_every_registered_feature_with_its_page():
    import moepatch  # noqa: F401  (registers the features)
    from moepatch.feature import registered_features

    table = _config_table()
    features = {feature.name for feature in registered_features()}
    assert features - set(table) == set(), "README.md's config table misses these features"
    assert set(table) - features - BLOCK_FIELDS == set(), "README.md's config table names fields the block lacks"
    for name in features:
        assert re.search(r"\]\(docs/[a-z0-9-]+\.md(#[a-z0-9_-]+)?\)", table[name]), f"{name}: no link to its page"


def test_the_configuration_page_is_generated_from_the_declared_fields():
    """docs/configuration.md is what ``python scripts/config_docs.py`` writes from the features' declared fields, so
    every field the parsers accept is on the page, with the defaults they apply."""
    import importlib.util

    import moepatch

    spec = importlib.util.spec_from_file_location("config_docs", REPO / "scripts" / "config_docs.py")
    assert spec is not None and spec.loader is not None
    config_docs = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(config_docs)
    page = (DOCS / "configuration.md").read_text(encoding="utf-8")
    assert page == config_docs.configuration_page(), "docs/configuration.md is stale: run python scripts/config_docs.py"
    for entry in moepatch.config_schema():
        assert f"## `{entry.name}`" in page, entry.name
        for item in entry.fields:
            assert f"| `{item.name}` |" in page, f"{entry.name}.{item.name}"


def test_the_families_page_lists_every_registered_family_and_its_model_types():
    from model_patches import registry

    lines = (DOCS / "families.md").read_text(encoding="utf-8").splitlines()
    start = lines.index("| `family` | model types it claims |")
    listed = {}
    for line in lines[start + 2:]:
        if not line.startswith("|"):
            break
        name, types = (cell.strip() for cell in line.strip().strip("|").split("|"))
        listed[name.strip("`")] = tuple(re.findall(r"`([a-z0-9_]+)`", types))
    assert listed == {name: spec.model_types for name, spec in registry.families().items()}
