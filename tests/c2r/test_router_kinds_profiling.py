"""C2R profiling on every router kind: the co-activation counts are the experts each kind's router really chose
(read by the test's own hooks, ``router_oracles.captured_choices``), and the profiled C2R fields written into
config.json drive the routing of the reloaded checkpoint inside the allowed sets."""

from __future__ import annotations

import json
from itertools import product

import pytest
import torch
from router_oracles import captured_choices
from router_oracles import router_modules

import moepatch
from moepatch.cli import main as cli
from moepatch.testing import tiny
from moepatch.testing import tiny_kinds
from moepatch.tools.c2r.profiling import corpus_batches
from moepatch.tools.c2r.profiling import profile_coactivation


def _slow_count(model: torch.nn.Module, batches: list[dict], num_experts: int = 8,
                source: str = "router") -> dict[int, list[list[int]]]:
    """Per real token, per ordered pair of the experts its router chose, +1."""
    counts = {layer: [[0] * num_experts for _ in range(num_experts)] for layer in router_modules(model)}
    with torch.no_grad():
        for batch in batches:
            with captured_choices(model, source=source) as chosen:
                model(**batch)
            keep = batch["attention_mask"].reshape(-1).tolist()
            for layer in counts:
                for token, experts in enumerate(chosen[layer][0].tolist()):
                    if keep[token]:
                        for i, j in product(experts, experts):
                            counts[layer][i][j] += 1
    return counts


@pytest.mark.parametrize("family", [*tiny.KIND_FAMILIES, "inkling_text"])
def test_profile_counts_each_kinds_own_choice(family):
    """Inkling too: its router returns a fourth output (the shared experts' weights) after the choice."""
    model = tiny.tiny_model(family)
    batches = list(corpus_batches(tiny.tiny_tokenizer(), list(tiny.CORPUS), batch_size=5, seed=3))
    profile = profile_coactivation(model, batches, progress=False)
    slow = _slow_count(model, batches)
    assert profile.layers == sorted(slow)
    for slot, layer in enumerate(profile.layers):
        assert profile.matrices[slot].tolist() == slow[layer]


@pytest.mark.parametrize(("model_type", "num_experts"), [("gemma4_text", 8), ("jetmoe", 8), ("zaya", 8), ("doge", 16)])
def test_profile_counts_the_choice_of_routers_beyond_a_linear_top_k(model_type, num_experts):
    """Gemma 4's router beside the layer's MLP, JetMoE's expert-sorted hand-off, ZAYA's router MLP and Doge's product
    keys: the co-activation counts are the experts each model's experts really received (its tiny ZAYA never picks
    the skip class: its balancing bias is −1)."""
    model = tiny_kinds.tiny_kind_model(model_type)
    batches = list(corpus_batches(tiny.tiny_tokenizer(), list(tiny.CORPUS), batch_size=5, seed=3))
    profile = profile_coactivation(model, batches, progress=False)
    slow = _slow_count(model, batches, num_experts, source="experts")
    assert profile.layers == sorted(slow)
    for slot, layer in enumerate(profile.layers):
        assert profile.matrices[slot].tolist() == slow[layer]


@pytest.mark.parametrize("family", ["deepseek_v3", "gpt_oss", "inkling_text"])
def test_profiled_fields_drive_the_reloaded_checkpoint(family, tmp_path):
    """profile → top_t / collaborative_list in config.json → from_pretrained routes each token inside its first
    expert's allowed set (group limit, bias and all)."""
    checkpoint = tiny.save_tiny_checkpoint(tmp_path / "ckpt", family)
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(tiny.CORPUS))
    assert cli(["profile", str(checkpoint), "--data", str(corpus), "--top-t", "2", "--seed", "1"]) == 0
    config = json.loads((checkpoint / "config.json").read_text())
    assert config["top_t"] == 2
    model = moepatch.from_pretrained(checkpoint).eval()
    handle = moepatch.get_handle(model)
    assert handle.c2r_routers and handle.config.c2r.top_t == 2
    batch = tiny.demo_batch()
    with captured_choices(model, source="router") as chosen, torch.no_grad():
        model(**batch)
    for layer in router_modules(model):
        listed = config["collaborative_list"][layer]
        allowed = {e: {e, *listed[e][:2]} for e in range(8)}
        for experts in chosen[layer][0].tolist():
            assert any(set(experts) <= allowed[e] and e in experts for e in experts), experts


def test_doge_profile_under_c2r_counts_the_constrained_choice():
    """Doge's product keys under C2R: the co-activation counts are the experts its blocks really looked up (the C2R
    choice, read by the test's own hook on ``down_embed``), and every co-activated pair lies in its first expert's
    allowed set."""
    model = tiny_kinds.tiny_kind_model("doge")
    listed = tiny.random_collaborative_list(len(model.model.layers), 16, seed=4)
    moepatch.apply(model, {"c2r": {"top_t": 2, "collaborative_list": listed}})
    batches = list(corpus_batches(tiny.tiny_tokenizer(), list(tiny.CORPUS), batch_size=5, seed=3))
    profile = profile_coactivation(model, batches, progress=False)
    slow = _slow_count(model, batches, 16, source="experts")
    assert profile.layers == sorted(slow)
    for slot, layer in enumerate(profile.layers):
        assert profile.matrices[slot].tolist() == slow[layer]
        allowed = {e: {e, *listed[layer][e][:2]} for e in range(16)}
        pairs = [(i, j) for i in range(16) for j in range(16) if i != j and slow[layer][i][j]]
        assert pairs and all(j in allowed[i] or i in allowed[j] for i, j in pairs)


def test_profiled_fields_drive_the_reloaded_doge_checkpoint(tmp_path):
    """profile → top_t / collaborative_list in config.json → from_pretrained routes every Doge token inside its first
    expert's allowed set (product keys chosen inside the block, read where ``down_embed`` looks the experts up)."""
    checkpoint = tmp_path / "ckpt"
    tiny_kinds.tiny_kind_model("doge").save_pretrained(checkpoint)
    tiny.tiny_tokenizer().save_pretrained(checkpoint)
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(tiny.CORPUS))
    assert cli(["profile", str(checkpoint), "--data", str(corpus), "--top-t", "2", "--seed", "1",
                "--min-tokens", "100"]) == 0
    config = json.loads((checkpoint / "config.json").read_text())
    assert config["top_t"] == 2
    model = moepatch.from_pretrained(checkpoint).eval()
    handle = moepatch.get_handle(model)
    assert handle.c2r_routers and handle.config.c2r.top_t == 2
    with captured_choices(model) as chosen, torch.no_grad():
        model(**tiny.demo_batch())
    for layer in router_modules(model):
        listed = config["collaborative_list"][layer]
        allowed = {e: {e, *listed[e][:2]} for e in range(16)}
        for experts in chosen[layer][0].tolist():
            assert any(set(experts) <= allowed[e] and e in experts for e in experts), experts
