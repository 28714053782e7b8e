"""The embedded default: tiny checkpoints save and load through the real transformers loading code."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM
from transformers import AutoTokenizer

from moepatch.testing import tiny


def test_checkpoint_loads_with_auto_classes(family, tmp_path):
    path = tiny.save_tiny_checkpoint(tmp_path, family, seed=3)
    assert (path / "config.json").exists() and (path / "model.safetensors").exists()
    assert (path / "tokenizer.json").exists()
    model = AutoModelForCausalLM.from_pretrained(path).eval()
    tokenizer = AutoTokenizer.from_pretrained(path)
    batch = tiny.demo_batch(tokenizer)
    with torch.no_grad():
        assert torch.equal(model(**batch).logits, tiny.tiny_model(family, seed=3)(**batch).logits)
    assert model.config.model_type == family


def test_tokenizer_is_offline_and_pads():
    tokenizer = tiny.tiny_tokenizer()
    assert tokenizer.pad_token_id == 0 and tokenizer.eos_token == "</s>"
    text = "Freezing the gate keeps routing fixed."
    assert tokenizer.decode(tokenizer(text)["input_ids"]) == text
    batch = tiny.demo_batch(tokenizer)
    assert (batch["attention_mask"] == 0).any() and batch["input_ids"].max() < len(tokenizer)


def test_seed_determinism_and_unknown_family():
    a, b = tiny.tiny_model("mixtral", seed=1), tiny.tiny_model("mixtral", seed=1)
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values(), strict=True))
    with pytest.raises(ValueError, match="unknown family"):
        tiny.tiny_config("no_such_moe")
