"""GuiLoMo stage 1: straight-through GSV masks, the DARTS architecture gradient, the allocate command end to end."""

from __future__ import annotations

import json
import subprocess
import sys

import torch

import moepatch
from moepatch.lora_experts.guilomo import architecture_gradient
from moepatch.lora_experts.guilomo import expert_prefix_mask
from moepatch.lora_experts.guilomo import pairs
from moepatch.lora_experts.guilomo import rank_prefix_mask
from moepatch.testing import tiny


def test_expert_mask_forward_and_straight_through_backward():
    vector = torch.tensor([0.1, 0.2, 0.9, 0.3], requires_grad=True)
    mask = expert_prefix_mask(vector)
    assert torch.equal(mask, torch.tensor([0.5, 0.5, 0.5, -1e4]))  # experts 0..argmax stay routable
    upstream = torch.tensor([1.0, 2.0, 3.0, 4.0])
    mask.backward(upstream)
    gate = torch.sigmoid(vector.detach())
    assert torch.allclose(vector.grad, torch.tensor([0.0, 0.0, float((upstream * gate)[:3].sum()), 0.0]))
    first = torch.tensor([0.9, 0.1, 0.0], requires_grad=True)
    assert torch.equal(expert_prefix_mask(first), torch.tensor([0.5, 0.5, -1e4]))  # k forced >= 1: two experts


def test_rank_mask_forward_and_straight_through_backward():
    vector = torch.tensor([0.0, 1.0, 0.2], requires_grad=True)
    mask = rank_prefix_mask(vector)
    assert torch.equal(mask, torch.tensor([1.0, 1.0, 1e-4]))
    upstream = torch.tensor([2.0, -1.0, 5.0])
    mask.backward(upstream)
    gate = torch.sigmoid(vector.detach())
    expected = upstream * 1e-4
    expected[1] = (upstream * gate)[:2].sum()
    assert torch.allclose(vector.grad, expected)


def test_architecture_gradient_is_the_second_order_darts_formula():
    """Against the formula evaluated by hand on a toy problem (SGD step, so w' is known in closed form)."""
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
    got = architecture_gradient(loss, train, valid, [w], [a], optimizer)[0]
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
    experts = json.loads((checkpoint / "guilomo" / "expert.json").read_text())
    ranks = json.loads((checkpoint / "guilomo" / "rank.json").read_text())
    assert "model.layers.0.self_attn.q_proj" in experts and "model.layers.0.mlp.experts.down_proj" in experts
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
    routed = model.model.layers[0].mlp.experts.lora_experts["down_proj"].sets[5]
    assert routed.num_experts == experts["model.layers.0.mlp.experts.down_proj"]
