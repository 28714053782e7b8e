"""A running remote-code LLaMA-MoE gate (a repaired copy of the published class, no select_experts seam) is
recognised by its class names and patched like moepatch's own: freeze, statistics and C2R."""

from __future__ import annotations

import pytest
import torch
from helpers import logits_of
from helpers import model_state as _state
from torch import nn

import moepatch
from moepatch.testing import tiny


class TopKBalancedNoisyGate(nn.Module):
    """The published gate (the LLaMA-MoE release's modeling file), as a user's repaired remote-code copy has it."""

    def __init__(self, input_size: int, num_experts: int, num_selects: int, noise_epsilon: float = 1e-2) -> None:
        super().__init__()
        self.input_size, self.num_experts, self.num_selects = input_size, num_experts, num_selects
        self.gate_network_type, self.use_softmax, self.warned = "mlp", True, False
        self.gate_network = nn.Sequential(nn.Linear(input_size, num_experts, bias=False), nn.Tanh(),
                                          nn.Linear(num_experts, num_experts, bias=False))
        self.softmax = nn.Softmax(1)
        self.weight_noise = nn.Linear(input_size, num_experts, bias=False)
        self.softplus = nn.Softplus()
        self.normal = torch.distributions.Normal(0.0, 1.0)
        self.mean, self.std = 0.0, 1.0
        self.use_balance, self.balance_loss_weight = True, 1e-2
        self.add_noise, self.noise_epsilon = True, noise_epsilon

    def cv_squared(self, x: torch.Tensor, eps: float = 1e-10) -> torch.Tensor:
        if x.shape[0] == 1:
            return torch.tensor(0.0, device=x.device)
        return x.float().var() / (x.float().mean() ** 2 + eps)

    def forward(self, x: torch.Tensor) -> dict:
        logits = self.gate_network(x)  # eval path of the published forward: no noise
        top_logits, top_indices = logits.topk(min(self.num_selects + 1, self.num_experts), dim=1)
        top_k_logits, top_k_indices = top_logits[:, : self.num_selects], top_indices[:, : self.num_selects]
        top_k_scores = self.softmax(top_k_logits.to(torch.float32)).to(logits.dtype)
        scores_filtered = torch.zeros_like(logits).scatter(1, top_k_indices, top_k_scores)
        importance = scores_filtered.sum(0)
        load = (scores_filtered > 0).sum(0)
        balance_loss = (self.cv_squared(importance) + self.cv_squared(load)) * self.balance_loss_weight
        return {"topK_indices": top_k_indices, "topK_scores": top_k_scores, "balance_loss": balance_loss,
                "load": load, "importance": importance}


def _with_remote_gates(model: nn.Module) -> nn.Module:
    for layer in model.model.layers:
        native = layer.mlp.gate
        remote = TopKBalancedNoisyGate(native.input_size, native.num_experts, native.num_selects)
        remote.load_state_dict(native.state_dict())
        layer.mlp.gate = remote
    return model.eval()


C2R = {"c2r": {"top_t": 2, "collaborative_list": tiny.random_collaborative_list(2, 8, 1)}}


def test_remote_gate_is_faithful_and_patched_like_the_native_one(batch):
    native = tiny.tiny_model("llama_moe")
    remote = _with_remote_gates(tiny.tiny_model("llama_moe"))
    assert torch.equal(logits_of(remote, batch), logits_of(native, batch))  # the fixture reproduces the gate
    assert moepatch.describe(remote).family.name == "llama_moe"

    before = _state(remote)
    handle = moepatch.apply(remote, {**C2R, "freeze_gate": "router", "routing_stats": True})
    moepatch.apply(native, C2R)
    assert len(handle.c2r_routers) == 2 and all("forward" in d.mlp.gate.__dict__ for d in remote.model.layers)
    assert torch.equal(logits_of(remote, batch), logits_of(native, batch))  # routes under C2R like moepatch's gate
    assert int(handle.recorder.tokens[0]) == int(batch["attention_mask"].sum())
    assert len(handle.frozen_parameters) == 6
    handle.remove()
    assert _state(remote) == before


def test_remote_gate_without_the_published_attributes_is_refused(batch):
    remote = _with_remote_gates(tiny.tiny_model("llama_moe"))
    for layer in remote.model.layers:
        del layer.mlp.gate.use_softmax
    before = _state(remote)
    with pytest.raises(ValueError, match=r"layer 0: TopKBalancedNoisyGate has no `select_experts` step .* "
                                         r"missing published gate attributes \['use_softmax'\]"):
        moepatch.apply(remote, C2R)
    assert _state(remote) == before
