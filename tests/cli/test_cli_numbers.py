"""``place`` and ``profile`` never print or write a figure computed the wrong way.

* ``place`` on a top-4 checkpoint: copies per token equal the distinct devices counted from the routed tokens
  (recomputed here from the routers' inputs and weights); on that model's matrix file, the top-k is read from the
  file and copies per token are refused with the command to run instead.
* ``profile`` on a checkpoint that routes under C2R profiles vanilla routing unless ``--as-configured``.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from family_facts import moe_routers
from family_facts import selection_probabilities

from moepatch import cli
from moepatch.testing import tiny
from moepatch.tools.c2r.profiling import CoactivationProfile
from moepatch.tools.c2r.profiling import corpus_batches
from moepatch.tools.c2r.profiling import profile_coactivation

EP_SIZE = 2


@pytest.fixture(scope="module")
def top4_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("top4") / "ckpt"
    tiny.tiny_model("qwen2_moe", num_experts_per_tok=4).save_pretrained(path)
    tiny.tiny_tokenizer().save_pretrained(path)
    return path


def routed_copies_per_token(checkpoint: Path, ep_size: int) -> dict[int, float]:
    """Per MoE layer: mean over non-padding tokens of the distinct devices (contiguous placement) of the token's
    top-4 experts, recomputed from each router's input hidden states and weight (float64 softmax → top-k)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(checkpoint).eval()
    routers = moe_routers(model)
    num_experts, top_k = model.config.num_experts, model.config.num_experts_per_tok
    inputs: dict[int, list[torch.Tensor]] = {layer: [] for layer in routers}
    hooks = [router.register_forward_hook(lambda module, args, output, layer=layer: inputs[layer].append(args[0]))
             for layer, router in routers.items()]
    documents = list(tiny.CORPUS + tiny.DEMO_TEXTS)  # the command's default corpus, in its seeded order
    masks = []
    with torch.no_grad():
        for batch in corpus_batches(tiny.tiny_tokenizer(), documents, batch_size=4, max_length=512, seed=0):
            model(**batch)
            masks.append(batch["attention_mask"].reshape(-1).bool())
    for hook in hooks:
        hook.remove()
    mask = torch.cat(masks)
    result = {}
    for layer, router in routers.items():
        hidden = torch.cat([h.reshape(-1, h.shape[-1]) for h in inputs[layer]])[mask]
        chosen = selection_probabilities(model, router, hidden).topk(top_k, dim=-1).indices
        devices = chosen // (num_experts // ep_size)
        distinct = [len(set(row)) for row in devices.tolist()]
        result[layer] = sum(distinct) / len(distinct)
    return result


def test_place_top4_checkpoint_counts_routed_tokens(top4_checkpoint, capsys):
    assert cli.main(["place", str(top4_checkpoint), "--ep-size", str(EP_SIZE), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)["reports"]["vanilla"]
    assert report["top_k"] == 4
    expected = routed_copies_per_token(top4_checkpoint, EP_SIZE)
    got = {row["layer"]: row["contiguous_copies_per_token"] for row in report["layers"]}
    assert got.keys() == expected.keys()
    for layer in expected:
        assert got[layer] == pytest.approx(expected[layer], abs=1e-12)
    assert report["mean_contiguous_copies_per_token"] == pytest.approx(sum(expected.values()) / len(expected))
    assert all(row["copies_source"] == "indices" for row in report["layers"])


def test_place_top4_matrix_file_uses_its_top_k_and_refuses_pair_figures(top4_checkpoint, tmp_path, capsys):
    out = tmp_path / "profile"
    assert cli.main(["profile", str(top4_checkpoint), "--no-write-config", "--output", str(out)]) == 0
    capsys.readouterr()
    matrix = out / "coactivation.safetensors"
    assert CoactivationProfile.load(matrix).top_k == 4
    assert cli.main(["place", str(matrix), "--ep-size", str(EP_SIZE), "--json"]) == 0  # no --top-k needed
    result = json.loads(capsys.readouterr().out)
    report = result["reports"]["coactivation"]
    assert report["top_k"] == 4 and report["mean_contiguous_copies_per_token"] is None
    assert all(row["contiguous_copies_per_token"] is None for row in report["layers"])
    assert f"moepatch place CHECKPOINT --ep-size {EP_SIZE}" in result["notes"][0]
    assert cli.main(["place", str(matrix), "--ep-size", str(EP_SIZE), "--top-k", "2"]) == 2  # contradicts the file
    assert "--top-k: 2 contradicts top_k=4" in capsys.readouterr().err


@pytest.fixture(scope="module")
def c2r_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny Qwen2-MoE routing under C2R with top_t = 1 (each expert's one partner), saved with its fields."""
    path = tmp_path_factory.mktemp("c2r") / "ckpt"
    model = tiny.tiny_model("qwen2_moe")
    model.config.top_t, model.config.collaborative_list = 1, tiny.random_collaborative_list(4, 8, seed=3)
    model.save_pretrained(path)
    tiny.tiny_tokenizer().save_pretrained(path)
    return path


def _profile_of(model: torch.nn.Module) -> torch.Tensor:
    batches = corpus_batches(tiny.tiny_tokenizer(), list(tiny.CORPUS + tiny.DEMO_TEXTS), seed=0)
    return profile_coactivation(model, batches, progress=False).matrices


def test_profile_switches_c2r_off_by_default(c2r_checkpoint, tmp_path, capsys):
    import moepatch

    vanilla = _profile_of(tiny.tiny_model("qwen2_moe"))  # same weights, never patched
    constrained_model = moepatch.from_pretrained(c2r_checkpoint)
    assert moepatch.get_handle(constrained_model).c2r_routers
    constrained = _profile_of(constrained_model)
    assert not torch.equal(vanilla, constrained)

    config_before = (c2r_checkpoint / "config.json").read_text()
    assert cli.main(["profile", str(c2r_checkpoint), "--no-write-config", "--output", str(tmp_path / "v")]) == 0
    out = capsys.readouterr().out
    assert "vanilla routing" in out and "switched off for profiling" in out
    assert torch.equal(CoactivationProfile.load(tmp_path / "v" / "coactivation.safetensors").matrices, vanilla)

    assert cli.main(["profile", str(c2r_checkpoint), "--no-write-config", "--as-configured",
                     "--output", str(tmp_path / "c")]) == 0
    assert "C2R (as configured)" in capsys.readouterr().out
    assert torch.equal(CoactivationProfile.load(tmp_path / "c" / "coactivation.safetensors").matrices, constrained)
    assert (c2r_checkpoint / "config.json").read_text() == config_before


def test_profile_says_how_many_tokens_and_writes_from_enough(tmp_path, capsys):
    checkpoint = tiny.save_tiny_checkpoint(tmp_path / "ckpt", "qwen2_moe")
    assert cli.main(["profile", str(checkpoint), "--min-tokens", "100"]) == 0
    out = capsys.readouterr().out
    tokens = CoactivationProfile.load(checkpoint / "c2r_profile" / "coactivation.safetensors").tokens
    assert f"profiled {tokens} non-padding tokens" in out and tokens >= 100
    assert json.loads((checkpoint / "config.json").read_text())["top_t"] == 4  # E/2
