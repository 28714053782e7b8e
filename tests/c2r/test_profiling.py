"""C2R profiling against a slow, obvious per-token count; the written config.json round-trips and drives routing."""

from __future__ import annotations

import json
import subprocess
import sys
from itertools import product

import pytest
import torch
from family_facts import capture_choices
from helpers import ROUTED_NEW_FAMILIES
from routing_reference import moe_routers
from transformers import AutoModelForCausalLM

import moepatch
from moepatch.testing import tiny
from moepatch.tools.c2r.profiling import CoactivationProfile
from moepatch.tools.c2r.profiling import collaborative_ranking
from moepatch.tools.c2r.profiling import corpus_batches
from moepatch.tools.c2r.profiling import profile_coactivation
from moepatch.tools.c2r.profiling import read_corpus


def _slow_count(model, batches):
    """Per token, per ordered pair of its chosen experts, +1 — the official script's loop, padding excluded."""
    routers = moe_routers(model)
    counts = {layer: [[0] * 8 for _ in range(8)] for layer in routers}
    with torch.no_grad():
        for batch in batches:
            with capture_choices(model) as chosen:
                model(**batch)
            keep = batch["attention_mask"].reshape(-1).tolist()
            for layer in routers:
                for token, experts in enumerate(chosen[layer].tolist()):
                    if keep[token]:
                        for i, j in product(experts, experts):
                            counts[layer][i][j] += 1
    return counts


@pytest.mark.parametrize("family", ["qwen2_moe", "mixtral", *ROUTED_NEW_FAMILIES])
def test_profile_equals_slow_count(family):
    model = tiny.tiny_model(family)
    batches = list(corpus_batches(tiny.tiny_tokenizer(), list(tiny.CORPUS), batch_size=5, seed=3))
    profile = profile_coactivation(model, batches, progress=False)
    slow = _slow_count(model, batches)
    assert profile.layers == sorted(slow)
    for slot, layer in enumerate(profile.layers):
        assert profile.matrices[slot].tolist() == slow[layer]
    assert torch.equal(profile.matrices, profile.matrices.transpose(1, 2))
    off_diagonal = profile.matrices.sum((1, 2)) - profile.matrices.diagonal(dim1=1, dim2=2).sum(-1)
    assert off_diagonal.tolist() == [profile.tokens * 2 * 1] * len(profile.layers)  # tokens × k × (k-1)
    real_tokens = sum(int(b["attention_mask"].sum()) for b in batches)
    assert profile.tokens == real_tokens


def test_ranking_is_deterministic_with_self_last():
    matrix = torch.tensor([[9, 3, 3, 0], [3, 9, 5, 1], [3, 5, 9, 1], [0, 1, 1, 9]])
    ranking = collaborative_ranking(matrix)
    assert ranking.tolist() == [[1, 2, 3, 0], [2, 0, 3, 1], [1, 0, 3, 2], [1, 2, 0, 3]]


def test_profiling_under_c2r_records_only_allowed_pairs():
    model = tiny.tiny_model("mixtral")
    from moepatch.testing.tiny import random_collaborative_list as random_list

    ranking = random_list(3, 8, 9)
    moepatch.apply(model, {"c2r": {"top_t": 1, "collaborative_list": ranking}})
    profile = profile_coactivation(model, corpus_batches(tiny.tiny_tokenizer(), list(tiny.CORPUS)), progress=False)
    for slot, layer in enumerate(profile.layers):
        for i in range(8):
            for j in range(8):
                allowed = i == j or j == ranking[layer][i][0] or i == ranking[layer][j][0]
                assert allowed or profile.matrices[slot, i, j] == 0


def test_max_tokens_and_save_load(tmp_path):
    model = tiny.tiny_model("olmoe")
    batches = corpus_batches(tiny.tiny_tokenizer(), list(tiny.CORPUS), batch_size=2)
    profile = profile_coactivation(model, batches, max_tokens=30, progress=False)
    assert 30 <= profile.tokens < 30 + 2 * 64
    path = profile.save(tmp_path / "m.safetensors")
    again = CoactivationProfile.load(path)
    assert torch.equal(again.matrices, profile.matrices) and again.layers == profile.layers
    assert again.tokens == profile.tokens and again.top_k == 2


def test_read_corpus_formats(tmp_path):
    (tmp_path / "a.txt").write_text("first document\n\nsecond document\n")
    (tmp_path / "b.jsonl").write_text(json.dumps({"text": "third"}) + "\n" + json.dumps({"content": "x"}) + "\n")
    with pytest.raises(ValueError, match=r"b.jsonl:2: expected a JSON object with a string 'text'"):
        read_corpus([tmp_path / "a.txt", tmp_path / "b.jsonl"])
    (tmp_path / "b.jsonl").write_text(json.dumps({"text": "third"}) + "\n")
    assert read_corpus([tmp_path / "a.txt", tmp_path / "b.jsonl"]) == ["first document", "second document", "third"]


def test_cli_profile_writes_config_that_round_trips_and_drives_routing(tmp_path):
    checkpoint = tiny.save_tiny_checkpoint(tmp_path / "ckpt", "qwen2_moe")
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(tiny.CORPUS))
    result = subprocess.run([sys.executable, "-m", "moepatch.cli", "profile", str(checkpoint), "--data", str(corpus),
                             "--top-t", "3", "--seed", "1"], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    config = json.loads((checkpoint / "config.json").read_text())
    assert config["top_t"] == 3 and len(config["collaborative_list"]) == 4 and config["collaborative_list"][1] is None
    profile = CoactivationProfile.load(checkpoint / "c2r_profile" / "coactivation.safetensors")
    assert config["collaborative_list"][0] == collaborative_ranking(profile.matrices[0]).tolist()
    assert (checkpoint / "c2r_profile" / "coactivation.png").stat().st_size > 1000

    # independent: the same profile in-process (same seed → same document order)
    model = AutoModelForCausalLM.from_pretrained(checkpoint).eval()
    batches = corpus_batches(tiny.tiny_tokenizer(), read_corpus([corpus]), seed=1)
    model_without_c2r = tiny.tiny_model("qwen2_moe")
    assert torch.equal(profile_coactivation(model_without_c2r, batches, progress=False).matrices, profile.matrices)

    handle = moepatch.apply(model)  # the written official fields drive routing
    assert handle.config.c2r.source == "official" and handle.config.c2r.top_t == 3
    assert handle.c2r_routers == ["model.layers.0.mlp.gate", "model.layers.2.mlp.gate", "model.layers.3.mlp.gate"]
