"""``moepatch place --write-permuted DIR --c2r-within-groups``: the renumbered copy routes with C2R whose lists are the
planned groups (``top_t = E / D - 1``), so every token's experts sit on its top-1 expert's device.

The copy's routing is checked against the choice written out here from its own router logits (top-1 = the vanilla
argmax; the other k-1 = the most probable experts of the top-1's contiguous group), not against moepatch's C2R code.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import moepatch
from moepatch.cli import main
from moepatch.testing import tiny
from moepatch.tools.c2r.placement import contiguous_group_lists


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny.save_tiny_checkpoint(tmp_path_factory.mktemp("groups") / "qwen2_moe", "qwen2_moe")


def test_lists_put_device_mates_first_and_self_last() -> None:
    lists = contiguous_group_lists(8, 2)
    assert lists[0] == [1, 2, 3, 4, 5, 6, 7, 0]
    assert lists[6] == [4, 5, 7, 0, 1, 2, 3, 6]
    for expert, row in enumerate(lists):
        assert sorted(row) == list(range(8)) and row[-1] == expert
        assert {other // 4 for other in row[:3]} == {expert // 4}
    with pytest.raises(ValueError, match="one expert per device"):
        contiguous_group_lists(8, 8)
    with pytest.raises(ValueError, match="not divisible"):
        contiguous_group_lists(8, 3)


def _choices_and_logits(model: torch.nn.Module) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Per MoE layer: the experts the router returned and its logits, for one batch of random tokens."""
    indices, logits = [], []

    def hook(module, inputs, output):
        logits.append(output[0].detach())
        indices.append(output[2].detach())

    routers = [layer.mlp.gate for layer in model.model.layers if hasattr(layer.mlp, "experts")]
    handles = [router.register_forward_hook(hook) for router in routers]
    try:
        with torch.no_grad():
            generator = torch.Generator().manual_seed(0)
            model(input_ids=torch.randint(3, model.config.vocab_size, (4, 16), generator=generator))
    finally:
        for handle in handles:
            handle.remove()
    return indices, logits


@pytest.mark.parametrize("ep_size", [2, 4])
def test_copy_routes_every_token_within_its_top1_group(checkpoint: Path, tmp_path: Path, ep_size: int) -> None:
    target = tmp_path / "placed"
    assert main(["place", str(checkpoint), "--ep-size", str(ep_size), "--write-permuted", str(target),
                 "--c2r-within-groups"]) == 0
    config = json.loads((target / "config.json").read_text())
    size = 8 // ep_size
    assert config["moepatch"]["c2r"]["top_t"] == size - 1
    model = moepatch.from_pretrained(target)
    indices, logits = _choices_and_logits(model)
    assert indices
    k = model.config.num_experts_per_tok
    for chosen, scores in zip(indices, logits, strict=True):
        probs = torch.softmax(scores.float(), dim=-1)
        top1 = probs.argmax(dim=-1, keepdim=True)
        experts = torch.arange(probs.size(-1))
        mates = ((experts // size).unsqueeze(0) == top1 // size) & (experts.unsqueeze(0) != top1)
        rest = probs.masked_fill(~mates, -1).topk(k - 1, dim=-1).indices
        expected = torch.cat([top1, rest], dim=-1)
        assert torch.equal(chosen.sort(dim=-1).values, expected.sort(dim=-1).values)
        assert bool(((chosen // size) == (chosen[:, :1] // size)).all())  # one device per token


def test_official_fields_are_replaced_in_place(tmp_path: Path) -> None:
    source = tmp_path / "official"
    model = tiny.tiny_model("qwen2_moe")
    model.config.top_t = 5
    model.config.collaborative_list = tiny.random_collaborative_list(model.config.num_hidden_layers, 8)
    model.save_pretrained(source)
    tiny.tiny_tokenizer().save_pretrained(source)
    target = tmp_path / "placed"
    assert main(["place", str(source), "--ep-size", "2", "--write-permuted", str(target), "--c2r-within-groups"]) == 0
    config = json.loads((target / "config.json").read_text())
    assert config["top_t"] == 3 and "c2r" not in config.get("moepatch", {})
    moe_layers = [i for i, row in enumerate(config["collaborative_list"]) if row is not None]
    assert moe_layers and all(config["collaborative_list"][i] == contiguous_group_lists(8, 2) for i in moe_layers)


@pytest.mark.parametrize(("argv", "flag"), [
    (["--ep-size", "2", "--c2r-within-groups"], "--c2r-within-groups: sets the C2R lists of the renumbered copy"),
    (["--ep-size", "8", "--write-permuted", "{out}", "--c2r-within-groups"], "--c2r-within-groups: a group of 1"),
])
def test_refused_before_anything_is_written(checkpoint: Path, tmp_path: Path, capsys, argv: list[str],
                                            flag: str) -> None:
    out = tmp_path / "out"
    code = main(["place", str(checkpoint), *[a.replace("{out}", str(out)) for a in argv]])
    assert code == 2
    captured = capsys.readouterr()
    assert flag in captured.err and "Traceback" not in captured.err
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_refused_for_a_matrix_file(tmp_path: Path, capsys) -> None:
    from real_data import LLAMA_MOE_MATRICES

    code = main(["place", str(LLAMA_MOE_MATRICES), "--ep-size", "2", "--c2r-within-groups"])
    assert code == 2
    assert "--c2r-within-groups: needs a checkpoint folder as SOURCE" in capsys.readouterr().err
