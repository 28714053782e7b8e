"""Permuted checkpoints compute the same logits; the place command reports and writes them."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from family_facts import HF_FAMILIES
from family_facts import capture_choices
from family_facts import num_layers
from helpers import ROUTED_NEW_FAMILIES
from helpers import logits_of
from real_data import LLAMA_MOE_MATRICES
from transformers import AutoModelForCausalLM

import moepatch
from model_patches.structure import describe
from moepatch.testing import tiny
from moepatch.testing.tiny import random_collaborative_list as random_list
from moepatch.tools.c2r.permutation import permute_experts
from moepatch.tools.c2r.permutation import renumber_collaborative_list
from moepatch.tools.c2r.permutation import write_permuted_checkpoint


def _loaded(path):
    model = AutoModelForCausalLM.from_pretrained(path).eval()
    moepatch.apply(model)
    return model


def _routing(model, batch):
    with capture_choices(model) as chosen:
        logits = logits_of(model, batch)
    return logits, chosen


@pytest.mark.parametrize("family", ["qwen2_moe", "mixtral", "olmoe", "llama_moe", "moduleformer", *ROUTED_NEW_FAMILIES])
@pytest.mark.parametrize("c2r", ["none", "moepatch", "official"])
def test_permuted_checkpoint_computes_the_same_function(tmp_path, batch, family, c2r):
    """Same experts chosen (under the renaming) and the same logits.

    Bit-identity is not reachable: every family's router takes a float32 softmax whose denominator sums the experts
    in id order, so renamed experts get routing weights that differ by one ulp (measured 6e-8), and the eager experts
    add a token's expert outputs in id order too.  The router logits themselves are exactly permuted, the chosen
    experts are identical under the renaming, and the logits agree to float32 rounding (measured max |delta| 2e-6).
    """
    model = tiny.tiny_model(family)
    ranking = random_list(num_layers(model), 8, 3)
    if c2r == "moepatch":
        model.config.moepatch = {"c2r": {"top_t": 2, "collaborative_list": ranking}}
    elif c2r == "official":
        model.config.top_t, model.config.collaborative_list = 2, ranking
    model.save_pretrained(tmp_path / "src")
    tiny.tiny_tokenizer().save_pretrained(tmp_path / "src")
    moe = describe(tiny.tiny_model(family))
    generator = torch.Generator().manual_seed(5)
    permutations = {layer: torch.randperm(8, generator=generator).tolist() for layer in moe.moe_layer_indices}
    write_permuted_checkpoint(tmp_path / "src", permutations, tmp_path / "dst")

    logits, chosen = _routing(_loaded(tmp_path / "src"), batch)
    permuted_logits, permuted_chosen = _routing(_loaded(tmp_path / "dst"), batch)
    real = batch["attention_mask"].reshape(-1).bool()  # padding rows of Qwen3.5-MoE / MiniMax are zero vectors:
    for layer, permutation in permutations.items():  # all E experts tie there.  New id n is old expert permutation[n]
        assert torch.equal(torch.tensor(permutation)[permuted_chosen[layer]][real], chosen[layer][real])
    torch.testing.assert_close(permuted_logits, logits, atol=1e-5, rtol=1e-5)

    if family in HF_FAMILIES:
        original, permuted = describe(_loaded(tmp_path / "src")), describe(_loaded(tmp_path / "dst"))
        for layer in moe.moe_layer_indices:  # router row n of the permuted model is row permutation[n] of the original
            old_rows = original.layer(layer).router.weight[permutations[layer]]
            assert torch.equal(permuted.layer(layer).router.weight, old_rows)
    saved = json.loads((tmp_path / "dst" / "expert_permutation.json").read_text())
    assert {int(k): v for k, v in saved.items()} == permutations


def test_renumbered_list_keeps_self_last_and_maps_ids():
    ranking = random_list(1, 4, 0)
    permutation = [2, 0, 3, 1]  # new id -> old id
    renumbered = renumber_collaborative_list(ranking, {0: permutation})
    new_of_old = {old: new for new, old in enumerate(permutation)}
    for new in range(4):
        assert renumbered[0][new][-1] == new
        assert renumbered[0][new] == [new_of_old[e] for e in ranking[0][permutation[new]]]


def test_bad_permutation_is_refused_before_any_change():
    model = tiny.tiny_model("mixtral")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match="layer 2: expected a permutation of 0..7"):
        permute_experts(describe(model), {0: list(range(8)), 2: [0, 0, 1, 2, 3, 4, 5, 6]})
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_place_cli_json_on_a_checkpoint(tmp_path):
    model = tiny.tiny_model("qwen2_moe")
    model.config.top_t, model.config.collaborative_list = 3, random_list(4, 8, 1)
    model.save_pretrained(tmp_path / "ckpt")
    tiny.tiny_tokenizer().save_pretrained(tmp_path / "ckpt")
    result = subprocess.run(
        [sys.executable, "-m", "moepatch.cli", "place", str(tmp_path / "ckpt"), "--ep-size", "4", "--json",
         "--write-permuted", str(tmp_path / "perm")], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert set(report["reports"]) == {"vanilla", "c2r"}
    for routing in ("vanilla", "c2r"):
        rows = report["reports"][routing]["layers"]
        assert [row["layer"] for row in rows] == [0, 2, 3]
        for row in rows:
            assert sorted(e for group in row["groups"] for e in group) == list(range(8))
            assert row["planned_copies_per_token"] <= row["contiguous_copies_per_token"] + 1e-12
    permuted = json.loads((tmp_path / "perm" / "expert_permutation.json").read_text())
    groups = {row["layer"]: row["groups"] for row in report["reports"]["c2r"]["layers"]}
    assert all(permuted[str(layer)] == [e for g in groups[layer] for e in g] for layer in groups)


def test_place_cli_on_the_official_matrices():
    path = LLAMA_MOE_MATRICES
    result = subprocess.run([sys.executable, "-m", "moepatch.cli", "place", str(path), "--ep-size", "2", "--json"],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    reports = json.loads(result.stdout)["reports"]
    assert {"base_collaboration", "topt_5_collaboration"} <= set(reports)
    base = reports["base_collaboration"]
    assert len(base["layers"]) == 32
    assert base["mean_planned_copies_per_token"] < base["mean_contiguous_copies_per_token"]


def test_a_checkpoint_with_lora_experts_is_refused_before_anything_is_written(tmp_path):
    """LoRA experts on routed experts belong to expert ids: a renumbered copy would detach them, so place refuses."""
    source = tiny.save_tiny_checkpoint(tmp_path / "src", "qwen2_moe",
                                       moepatch={"lora_experts": {"method": "molora", "num_experts": 2, "r": 2}})
    moepatch.from_pretrained(source).save_pretrained(source)  # writes lora_experts.safetensors beside it
    result = subprocess.run([sys.executable, "-m", "moepatch.cli", "place", str(source), "--ep-size", "2",
                             "--write-permuted", str(tmp_path / "dst")], capture_output=True, text=True)
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert "moepatch.lora_experts: the checkpoint carries LoRA experts" in result.stderr
    assert not (tmp_path / "dst").exists()
    with pytest.raises(ValueError, match="carries LoRA experts"):
        write_permuted_checkpoint(source, {0: list(range(8))}, tmp_path / "dst2")
    assert not (tmp_path / "dst2").exists()
