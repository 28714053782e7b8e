"""The feature × family tables are true (the README's, and docs/families.md's of the six declarative families): every
cell of a config-driven row that says ✅ applies on a tiny real model of that column's family and does what the row
says, every cell that says "refused" is refused, and the columns are the families the registry resolves them to.
(The other rows are commands and workflows, each tested where it lives; the 72 model types of the survey are
checked against docs/router-kinds.md by tests/test_family_survey.py.)"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
import torch

import moepatch
from moepatch.testing import tiny

REPO = Path(__file__).resolve().parents[1]
COLUMNS = {
    "Qwen2-MoE / Qwen1.5-MoE": (("qwen2_moe", "qwen2_moe"),),
    "Mixtral": (("mixtral", "mixtral"),),
    "Qwen3-MoE": (("qwen3_moe", "generic_topk"),),
    "OLMoE": (("olmoe", "generic_topk"),),
    "other top-k-router MoEs¹": (("qwen3_moe", "generic_topk"), ("olmoe", "generic_topk")),
    "LLaMA-MoE²": (("llama_moe", "llama_moe"),),
    "MoLM²": (("moduleformer", "moduleformer"),),
}
"""README.md's columns → the tiny families each is checked on, with the registered family it must resolve to (the
"other" column is the probed ``generic_topk`` family, whose members Qwen3-MoE and OLMoE are)."""
NEW_COLUMNS = {"Qwen3.5-MoE": "qwen3_5_moe", "MiniMax": "minimax", "Jamba": "jamba", "DeepSeek-V2⁵": "deepseek_v2",
               "HunYuan-MoE-V1": "hunyuan_v1_moe", "DBRX": "dbrx"}
"""docs/families.md's table of the declarative families: column → tiny family (registered under the same name)."""
TABLES = {
    "README.md": ("| feature | Qwen2-MoE", COLUMNS),
    "docs/families.md": ("| feature | Qwen3.5-MoE",
                         {column: ((family, family),) for column, family in NEW_COLUMNS.items()}),
}


def _table(page: str = "README.md") -> tuple[list[str], dict[str, list[str]]]:
    lines = (REPO / page).read_text(encoding="utf-8").splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(TABLES[page][0]))
    columns = [cell.strip() for cell in lines[start].strip().strip("|").split("|")][1:]
    rows = {}
    for line in lines[start + 2:]:
        if not line.startswith("|"):
            break
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        rows[cells[0]] = cells[1:]
    return columns, rows


def _c2r_block(model: Any) -> dict[str, Any]:
    structure = moepatch.describe(model)
    experts = structure.num_experts
    ring = [[(e + j) % experts for j in range(1, experts)] + [e] for e in range(experts)]  # itself last
    moe_layers = set(structure.moe_layer_indices)  # the list is indexed by decoder layer; dense ones get null
    layers = [ring if index in moe_layers else None for index in range(model.config.num_hidden_layers)]
    return {"c2r": {"top_t": 1, "collaborative_list": layers}}


def _frozen(handle: Any, model: Any) -> bool:
    parameters = dict(model.named_parameters())
    return bool(handle.frozen_parameters) and not any(parameters[n].requires_grad for n in handle.frozen_parameters)


def _recorded(handle: Any, model: Any) -> bool:
    with torch.no_grad():
        model(**tiny.demo_batch())
    return handle.recorder is not None and int(handle.recorder.tokens.sum()) > 0


def _on_routed_experts(handle: Any, model: Any) -> bool:
    return any(re.search(r"(^|\.)experts(\.|$)", target) for target in handle.lora_targets)


ROWS: dict[str, tuple[Any, Any]] = {
    '`freeze_gate: "router"`': ({"freeze_gate": "router"}, _frozen),
    '`freeze_gate: "gate_substring"`': ({"freeze_gate": "gate_substring"}, _frozen),
    "`RoutingRecorder` / `routing_stats`": ({"routing_stats": True}, _recorded),
    "C2R routing (`c2r`, official `top_t` / `collaborative_list`)": (
        _c2r_block, lambda handle, model: len(handle.c2r_routers) == len(moepatch.describe(model).layers)),
    "LoRA experts (MoLoRA, MoV, MoLA) on attention / dense / shared-expert projections⁴": (
        {"lora_experts": {"method": "molora", "num_experts": 2, "r": 2, "target_modules": ["q_proj", "v_proj"]}},
        lambda handle, model: any(".self_attn." in target for target in handle.lora_targets)),
    "LoRA experts on the routed experts (each sees only its own tokens)⁴": (
        {"lora_experts": {"method": "molora", "num_experts": 2, "r": 2, "routed_experts": True}}, _on_routed_experts),
    '`freeze_gate: "router"` (exactly the router parameters)': ({"freeze_gate": "router"}, _frozen),
    "LoRA experts (MoLA's default targets, `routed_experts: true`: attention `*_proj` and routed experts)": (
        {"lora_experts": {"method": "mola", "num_experts": 2, "r": 2, "routed_experts": True}}, _on_routed_experts),
}
"""Row → (the moepatch block, or a function of the model giving it; what a ✅ cell must then hold)."""
CELLS: dict[str, tuple[Any, Any]] = {
    "MoV on keys / values only": (
        {"lora_experts": {"method": "mov", "num_experts": 2}},
        lambda handle, model: bool(handle.lora_targets) and all(
            target.rsplit(".", 1)[-1] in ("k_proj", "v_proj") for target in handle.lora_targets)),
}
"""A cell that is neither ✅ nor "refused": the start of its text → (the block; what must hold)."""



@pytest.mark.parametrize("page", TABLES)
def test_the_columns_are_the_families_they_name(page: str) -> None:
    columns, rows = _table(page)
    expected = TABLES[page][1]
    assert columns == list(expected)
    assert len(set(ROWS) & set(rows)) >= 3, f"{page}: the checked rows are missing from its family table"
    for checks in expected.values():
        for family, registered in checks:
            assert moepatch.describe(tiny.tiny_model(family)).family.name == registered, family


def _cells() -> list[tuple[str, str, str, str]]:
    cells = []
    for page, (_, expected) in TABLES.items():
        columns, rows = _table(page)
        cells += [(row, column, family, rows[row][columns.index(column)])
                  for row in ROWS if row in rows for column in columns for family, _ in expected.get(column, ())]
    return cells


@pytest.mark.parametrize(("row", "column", "family", "cell"), _cells(),
                         ids=lambda value: str(value)[:24])
def test_each_config_cell_holds(row: str, column: str, family: str, cell: str) -> None:
    block, holds = ROWS[row]
    model = tiny.tiny_model(family).eval()
    block = block(model) if callable(block) else block
    if cell.startswith("✅"):
        handle = moepatch.apply(model, block)
        assert holds(handle, model), (row, column, cell)
    elif cell.startswith("refused"):
        with pytest.raises(ValueError):
            moepatch.apply(model, block)
    else:
        special = next(key for key in CELLS if cell.startswith(key))  # every other cell is described here
        block, holds = CELLS[special]
        handle = moepatch.apply(model, block)
        assert holds(handle, model), (row, column, cell)


@pytest.mark.parametrize("family", tiny.TINY_FAMILIES)
def test_apply_with_every_feature_off_is_bit_identical_and_remove_restores(family: str) -> None:
    columns, rows = _table()
    assert all(cell.startswith("✅") for cell in rows["`apply` / `remove`, bit-identical when off"])
    model = tiny.tiny_model(family).eval()
    batch = tiny.demo_batch()
    with torch.no_grad():
        before = model(**batch).logits
        handle = moepatch.apply(model, {})
        patched = model(**batch).logits
        handle.remove()
        after = model(**batch).logits
    assert torch.equal(before, patched) and torch.equal(before, after)
