"""Refusals name the check that failed: the router's rule, a refused setting, or a declaration the probe contradicts."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from model_patches.routing_rule import probe_router
from model_patches.structure import describe
from moepatch.errors import UnsupportedModelError
from moepatch.testing import tiny

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "scripts"))
from family_survey import tiny_instance  # noqa: E402  (the survey's shrunk config defaults)

REFUSED = {
    "gpt_oss": ("router adds a bias \\(`bias`\\)", "top-k of logits then softmax over the k"),
    "deepseek_v3": ("router adds a bias \\(`e_score_correction_bias`\\)", "grouped top-k"),
    "llama4_text": ("router scores experts with sigmoid",),
    "granitemoe": ("top-k of logits then softmax over the k", "router has no `norm_topk_prob`"),
}
"""Representative refused model types and the phrases their refusal must contain (from each modeling file)."""


@pytest.mark.parametrize("model_type", sorted(REFUSED))
def test_refused_model_types_name_their_reason(model_type):
    model = tiny_instance(model_type)
    with pytest.raises(UnsupportedModelError) as refusal:
        describe(model)
    message = str(refusal.value)
    assert "no sparse MoE block" not in message.split("generic_topk:")[0]
    for phrase in REFUSED[model_type]:
        assert pytest.importorskip("re").search(phrase, message), (phrase, message)


@pytest.mark.parametrize(("overrides", "phrase"), [
    ({"topk_method": "group_limited_greedy", "n_group": 2, "topk_group": 1},
     "topk_method='group_limited_greedy': only the greedy top-k"),
    ({"routed_scaling_factor": 16.0}, "routed_scaling_factor=16.0: the top-k weights are multiplied by 16.0"),
])
def test_deepseek_v2_settings_other_than_v2_lite_are_refused_by_name(overrides, phrase):
    model = tiny.tiny_model("deepseek_v2", **overrides)
    with pytest.raises(UnsupportedModelError, match=phrase):
        describe(model)
    with pytest.raises(UnsupportedModelError, match=phrase):
        describe(model, verify=False)  # a setting, read even where nothing is probed


class _SoftmaxOverKRouter(nn.Module):
    """Top-k of the logits, then softmax over the k chosen logits, while declaring no renormalisation."""

    def __init__(self, hidden: int, experts: int, top_k: int, scale: float = 1.0) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(experts, hidden) * scale)
        self.top_k, self.num_experts, self.hidden_dim, self.norm_topk_prob = top_k, experts, hidden, False

    def forward(self, hidden_states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        logits = nn.functional.linear(hidden_states.reshape(-1, self.hidden_dim), self.weight)
        values, index = torch.topk(logits, self.top_k, dim=-1)
        return logits, torch.softmax(values, dim=-1, dtype=torch.float).to(logits.dtype), index


@pytest.mark.parametrize("scale", [1.0, 30.0], ids=["spread", "saturated"])
def test_softmax_over_k_router_claiming_no_renormalisation_is_refused(scale):
    """Even a saturated router (top-k probabilities summing to ~1 on the first probe) is told apart."""
    torch.manual_seed(0)
    router = _SoftmaxOverKRouter(32, 8, 2, scale)
    problem = probe_router(router, top_k=2, hidden_dim=32, renormalize=False)
    assert problem is not None and "declares norm_topk_prob=False" in problem
    assert probe_router(router, top_k=2, hidden_dim=32, renormalize=True) is None  # the same maths, declared


def test_plain_router_claiming_renormalisation_is_refused():
    class Plain(_SoftmaxOverKRouter):
        def forward(self, hidden_states):
            logits = nn.functional.linear(hidden_states.reshape(-1, self.hidden_dim), self.weight)
            values, index = torch.topk(torch.softmax(logits, dim=-1, dtype=torch.float), self.top_k, dim=-1)
            return logits, values.to(logits.dtype), index

    plain = Plain(32, 8, 2)
    assert probe_router(plain, top_k=2, hidden_dim=32, renormalize=False) is None
    assert "not renormalised" in probe_router(plain, top_k=2, hidden_dim=32, renormalize=True)


@pytest.mark.parametrize(("argv", "message"), [
    (["--types", "mixtral,nosuch"], "--types: not MoE causal-LM model types of transformers .*: nosuch"),
    (["--timeout", "0"], "argument --timeout: expected a positive integer, got '0'"),
    (["--width", "-3"], "argument --width: expected a positive integer, got '-3'"),
])
def test_survey_refuses_bad_arguments_before_building_anything(argv, message, capsys):
    import re

    from family_survey import main

    with pytest.raises(SystemExit) as stopped:
        main(argv)
    captured = capsys.readouterr()
    assert stopped.value.code == 2 and re.search(message, captured.err) and "Traceback" not in captured.err
    assert captured.out == ""  # no table started
