"""Gate freezing, both rules, every family, verified through a real optimizer step."""

from __future__ import annotations

import pytest
import torch
from family_facts import router_parameter_pattern
from helpers import FAMILIES
from helpers import ROUTED_NEW_FAMILIES

import moepatch


def _expected(model: torch.nn.Module, mode: str) -> set[str]:
    """Independent statement of each rule over the parameter names."""
    names = [name for name, _ in model.named_parameters()]
    if mode == "router":
        pattern = router_parameter_pattern(model.config.model_type)
        return {name for name in names if pattern.search(name)}
    return {name for name in names if "gate" in name}


@pytest.mark.parametrize(("family", "mode"), [
    (family, mode) for mode in ("router", "gate_substring") for family in (*FAMILIES, *ROUTED_NEW_FAMILIES)
    if (family, mode) != ("dbrx", "gate_substring")  # DBRX names no parameter 'gate': refused (test_new_families)
])
def test_freeze_survives_a_real_optimizer_step(family, model, batch, mode):
    expected = _expected(model, mode)
    handle = moepatch.apply(model, {"freeze_gate": mode})
    assert set(handle.frozen_parameters) == expected
    experts_gate = {"llama_moe": "experts.weight_gate.", "moduleformer": None}.get(family, "experts.gate_up_proj")
    if mode == "gate_substring" and experts_gate:  # experts' gate projections are hit too
        assert any(experts_gate in name for name in expected)
    params = dict(model.named_parameters())
    before = {name: p.detach().clone() for name, p in params.items()}

    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    in_optimizer = {id(p) for group in optimizer.param_groups for p in group["params"]}
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    loss = model(**batch, labels=labels).loss
    loss.backward()
    optimizer.step()

    for name, p in params.items():
        if name in expected:
            assert not p.requires_grad, name
            assert id(p) not in in_optimizer, name
            assert p.grad is None, name
            assert torch.equal(p.detach(), before[name]), name
    trainable = [name for name in params if name not in expected]
    assert any(not torch.equal(params[name].detach(), before[name]) for name in trainable)


def test_router_mode_leaves_shared_expert_gate_trainable():
    from moepatch.testing import tiny

    model = tiny.tiny_model("qwen2_moe")
    handle = moepatch.apply(model, {"freeze_gate": True})
    assert not any("shared_expert" in name for name in handle.frozen_parameters)
    assert model.model.layers[0].mlp.shared_expert_gate.weight.requires_grad


def test_hf_trainer_optimizer_excludes_frozen_parameters(tmp_path):
    """The optimizer HF Trainer builds holds none of the frozen parameters."""
    from transformers import Trainer
    from transformers import TrainingArguments

    from moepatch.testing import tiny

    model = tiny.tiny_model("mixtral")
    handle = moepatch.apply(model, {"freeze_gate": "router"})
    args = TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to=[], save_strategy="no")
    optimizer = Trainer(model=model, args=args).create_optimizer()
    held = {id(p) for group in optimizer.param_groups for p in group["params"]}
    frozen = {id(p) for name, p in model.named_parameters() if name in handle.frozen_parameters}
    assert frozen and not (held & frozen)
    assert len(held) == sum(1 for p in model.parameters() if p.requires_grad)


def test_freeze_is_undone_by_remove(model):
    handle = moepatch.apply(model, {"freeze_gate": "gate_substring"})
    handle.remove()
    assert all(p.requires_grad for p in model.parameters())
