"""GuiLoMo stage 1: straight-through GSV masks, the DARTS architecture gradient, the allocate command end to end."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

import moepatch
from moepatch.testing import tiny
from moepatch.tools.lora_experts.guilomo import architecture_gradient
from moepatch.tools.lora_experts.guilomo import expert_prefix_mask
from moepatch.tools.lora_experts.guilomo import pairs
from moepatch.tools.lora_experts.guilomo import rank_prefix_mask


class _OfficialExpertSTE(torch.autograd.Function):
    """GuiLoMo's expert straight-through function, written from the official description: applied to g = σ(v)."""

    @staticmethod
    def forward(ctx, g):
        k = max(1, int(g.argmax()))
        ctx.save_for_backward(g)
        ctx.k = k
        mask = torch.full_like(g, -1e4)
        mask[: k + 1] = 0.5
        return mask

    @staticmethod
    def backward(ctx, grad):
        (g,) = ctx.saved_tensors
        out = torch.zeros_like(grad)
        out[ctx.k] = torch.cumsum(grad * g, dim=0)[ctx.k]
        return out


class _OfficialRankSTE(torch.autograd.Function):
    """GuiLoMo's rank straight-through function: mask 1 up to the argmax, 1e-4 beyond; backward cumsum at the
    argmax, grad · 1e-4 elsewhere (with respect to g = σ(v))."""

    @staticmethod
    def forward(ctx, g):
        k = int(g.argmax())
        ctx.save_for_backward(g)
        ctx.k = k
        mask = torch.full_like(g, 1e-4)
        mask[: k + 1] = 1.0
        return mask

    @staticmethod
    def backward(ctx, grad):
        (g,) = ctx.saved_tensors
        out = grad * 1e-4
        out[ctx.k] = torch.cumsum(grad * g, dim=0)[ctx.k]
        return out


@pytest.mark.parametrize(("ours", "official", "values", "expected_mask"), [
    (expert_prefix_mask, _OfficialExpertSTE, [0.1, 0.2, 0.9, 0.3], [0.5, 0.5, 0.5, -1e4]),
    (expert_prefix_mask, _OfficialExpertSTE, [0.9, 0.1, 0.0], [0.5, 0.5, -1e4]),  # k forced >= 1: two experts
    (rank_prefix_mask, _OfficialRankSTE, [0.0, 1.0, 0.2], [1.0, 1.0, 1e-4]),
    (rank_prefix_mask, _OfficialRankSTE, [-0.3, 2.0, 0.4, 1.5, -2.0], [1.0, 1.0, 1e-4, 1e-4, 1e-4]),
])
def test_gsv_masks_and_gradients_equal_the_official_functions_on_sigmoid(ours, official, values, expected_mask):
    """Forward masks, and v.grad equal to the official Function applied to σ(v) (so σ'(v) reaches the GSV)."""
    torch.manual_seed(0)
    vector = torch.tensor(values, requires_grad=True)
    reference = torch.tensor(values, requires_grad=True)
    upstream = torch.randn(len(values))
    mask = ours(vector)
    assert torch.equal(mask, torch.tensor(expected_mask))
    official_mask = official.apply(torch.sigmoid(reference))
    assert torch.equal(mask, official_mask)
    mask.backward(upstream)
    official_mask.backward(upstream)
    torch.testing.assert_close(vector.grad, reference.grad, rtol=0, atol=0)
    gate = torch.sigmoid(torch.tensor(values))
    k = int((mask == mask[0]).sum()) - 1
    by_hand = (upstream * gate)[: k + 1].sum() * gate[k] * (1 - gate[k])  # the straight-through value times σ'(v_k)
    torch.testing.assert_close(vector.grad[k], by_hand)


def test_architecture_gradient_is_the_second_order_darts_formula():
    """``mode="darts"`` against the formula evaluated by hand on a toy problem (SGD step, so w' is known in closed
    form); the official trainer's form is tested in test_official_fidelity.py."""
    torch.manual_seed(0)
    w = torch.nn.Parameter(torch.randn(5))
    a = torch.nn.Parameter(torch.randn(5))
    train, valid = torch.randn(5), torch.randn(5)

    def loss(batch, w_=None, a_=None):
        w_ = w if w_ is None else w_
        a_ = a if a_ is None else a_
        return ((torch.tanh(w_ * a_) - batch) ** 2).sum() + 0.1 * (w_ ** 2 * a_).sum()

    optimizer = torch.optim.SGD([w], lr=0.1)
    w0 = w.detach().clone()
    got = architecture_gradient(loss, train, valid, [w], [a], optimizer, mode="darts")[0]
    assert torch.equal(w.detach(), w0)  # weights restored
    # by hand
    w_var = w0.clone().requires_grad_(True)
    a_var = a.detach().clone().requires_grad_(True)
    (g_train,) = torch.autograd.grad(loss(train, w_var, a_var), w_var)
    w_prime = (w0 - 0.1 * g_train).requires_grad_(True)
    d_w, d_a = torch.autograd.grad(loss(valid, w_prime, a_var), (w_prime, a_var))
    epsilon = 0.01 / d_w.norm()
    (plus,) = torch.autograd.grad(loss(train, w0 + epsilon * d_w, a_var), a_var)
    (minus,) = torch.autograd.grad(loss(train, w0 - epsilon * d_w, a_var), a_var)
    expected = d_a - 0.1 * (plus - minus) / (2 * epsilon)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-4)


def test_batches_pair_up_as_train_and_valid():
    assert list(pairs([1, 2, 3, 4, 5])) == [(1, 2), (3, 4), (5, 5)]


def test_allocate_writes_official_files_that_drive_stage_two(tmp_path):
    checkpoint = tiny.save_tiny_checkpoint(tmp_path / "ckpt", "qwen2_moe")
    done = subprocess.run([sys.executable, "-m", "moepatch.cli", "allocate", str(checkpoint), "--max-experts", "4",
                           "--max-rank", "4", "--examples", "16", "--batch-size", "4", "--max-length", "48",
                           "--target-modules", "q_proj", "v_proj", "down_proj", "experts.down_proj"],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    # the printed hint names the files as config.json's fields find them (relative names: beside config.json)
    assert '"num_experts": "guilomo/expert.json", "r": "guilomo/rank.json"' in done.stdout
    experts = json.loads((checkpoint / "guilomo" / "expert.json").read_text())
    ranks = json.loads((checkpoint / "guilomo" / "rank.json").read_text())
    assert "model.layers.0.self_attn.q_proj" in experts and "model.layers.0.mlp.experts.5.down_proj" in experts
    assert "model.layers.0.mlp.experts.down_proj" not in experts  # routed experts: one allocation each
    assert "model.layers.1.mlp.down_proj" in experts  # the dense layer's projection
    assert all(2 <= n <= 4 for n in experts.values())
    assert set(ranks) == {f"{m}.expertlora_E_vector_{i}" for m in experts for i in range(4)}
    assert all(1 <= r <= 4 for r in ranks.values())
    model = tiny.tiny_model("qwen2_moe")
    model.config._name_or_path = str(checkpoint / "guilomo")  # relative files resolve against the checkpoint
    targets = ["q_proj", "v_proj", "down_proj", "experts.down_proj"]  # the routed experts named explicitly
    moepatch.apply(model, {"lora_experts": {"method": "mola", "target_modules": targets,
                                            "num_experts": "expert.json", "r": "rank.json", "top_k": 2}})
    q = model.model.layers[0].self_attn.q_proj.lora_experts
    assert q.num_experts == experts["model.layers.0.self_attn.q_proj"]
    assert q.ranks == [ranks[f"model.layers.0.self_attn.q_proj.expertlora_E_vector_{i}"] for i in range(q.num_experts)]
    for e, routed in enumerate(model.model.layers[0].mlp.experts.lora_experts["down_proj"].sets):
        key = f"model.layers.0.mlp.experts.{e}.down_proj"
        assert routed.num_experts == experts[key]
        assert routed.ranks == [ranks[f"{key}.expertlora_E_vector_{i}"] for i in range(routed.num_experts)]
