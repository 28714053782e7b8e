"""A feature's checkpoint state goes through the ``Feature`` interface: ``save_feature_states`` /
``load_feature_states`` write and restore what the features added (LoRA experts' weights), so a trainer resuming a
checkpoint never names a feature's file."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import moepatch
from moepatch.feature import feature_state_keys
from moepatch.feature import load_feature_states
from moepatch.feature import save_feature_states
from moepatch.testing import tiny

BLOCK = {"lora_experts": {"method": "molora", "num_experts": 2, "r": 2, "target_modules": ["q_proj", "v_proj"]}}


def _patched(seed: int) -> torch.nn.Module:
    model = tiny.tiny_model("qwen2_moe", seed=0)
    moepatch.apply(model, BLOCK)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_experts" in name:
                parameter.copy_(torch.randn(parameter.shape, generator=generator))
    return model


def test_features_save_and_restore_their_own_state(tmp_path: Path) -> None:
    trained, fresh = _patched(1), _patched(2)
    keys = feature_state_keys(trained)
    assert keys and all("lora_experts" in key for key in keys)
    assert keys == {name for name, _ in trained.named_parameters() if "lora_experts" in name}
    written = save_feature_states(trained, tmp_path)
    assert [path.name for path in written] == ["lora_experts.safetensors"]
    assert [path.name for path in load_feature_states(fresh, tmp_path)] == ["lora_experts.safetensors"]
    expected, restored = trained.state_dict(), fresh.state_dict()
    assert all(torch.equal(expected[key], restored[key]) for key in keys)


def test_a_missing_state_file_is_named(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"lora_experts\.safetensors missing"):
        load_feature_states(_patched(1), tmp_path)


def test_a_model_without_feature_state_writes_and_reads_nothing(tmp_path: Path) -> None:
    model = tiny.tiny_model("qwen2_moe", seed=0)
    moepatch.apply(model, {"freeze_gate": "router"})
    assert feature_state_keys(model) == set()
    assert save_feature_states(model, tmp_path) == [] and load_feature_states(model, tmp_path) == []
    assert list(tmp_path.iterdir()) == []
