"""Refusals name the check that failed: the router's rule, a refused setting, or a declaration the probe contradicts."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from torch import nn
from transformers import AutoModelForCausalLM

import moepatch
from model_patches.routing_rule import probe_rule
from model_patches.spec import RoutingRule
from model_patches.structure import describe
from moepatch.errors import UnsupportedModelError
from moepatch.testing import tiny
from moepatch.testing import tiny_kinds

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "scripts"))
from family_survey import tiny_instance  # noqa: E402  (the survey's shrunk config defaults)

FORMERLY_REFUSED = ("jetmoe", "zaya")
"""Types refused before their family files (JetMoE's expert-sorted hand-off, ZAYA's router MLP): their shrunk default
configs now resolve to their own family."""


@pytest.mark.parametrize("model_type", FORMERLY_REFUSED)
def test_formerly_refused_types_resolve_with_their_default_configs(model_type):
    moe = describe(tiny_instance(model_type))
    assert moe.family.name == model_type and moe.layers


def test_zaya_selection_bias_over_a_skip_class_is_not_updated():
    """ZAYA's rule is exact (C2R and placement take it), but its ``balancing_biases`` holds an entry for the skip
    class too, which has no load: the bias update refuses by name and changes nothing."""
    model = tiny_kinds.tiny_kind_model("zaya")
    assert describe(model).routing_problem is None
    before = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    with pytest.raises(ValueError, match=r"bias_update: ZayaRouter \(zaya\) adds its selection bias `balancing_biases` "
                                         r"to 8 experts and a skip class"):
        moepatch.apply(model, {"bias_update": {"rate": 0.01}})
    assert all(torch.equal(tensor, before[name]) for name, tensor in model.state_dict().items())


@pytest.mark.parametrize(("model_type", "dense", "phrase"), [
    ("doge", {"is_moe": False}, r"doge: no sparse MoE block \(DogeCDMoE\) in any layer"),
    ("gemma4_text", {"enable_moe_block": False},
     r"gemma4_text: no sparse MoE block \(Gemma4TextDecoderLayer\) in any layer"),
])
def test_a_dense_configuration_of_an_moe_type_is_refused_by_name(model_type, dense, phrase):
    """Doge without ``is_moe`` and Gemma 4 without ``enable_moe_block`` build no router: refused, naming the block
    class looked for (a Gemma 4 decoder layer is the block only when it holds a router)."""
    with pytest.raises(UnsupportedModelError, match=phrase):
        describe(AutoModelForCausalLM.from_config(tiny_kinds.tiny_kind_config(model_type, **dense)))


def test_a_router_the_probe_cannot_match_keeps_the_structure_and_refuses_the_rule():
    """Inkling2 configured with a SiLU ``scoring_func`` scores experts by a function no candidate rule has: no rule is
    found, the structure serves freezing and statistics, and C2R refuses naming the router."""
    model = tiny_kinds.tiny_kind_model("inkling2_text", scoring_func="silu")
    moe = describe(model)
    assert moe.routing_problem is not None and "Inkling2TopKRouter" in moe.routing_problem
    with pytest.raises(ValueError, match="c2r.top_t: needs the exact routing rule .*Inkling2TopKRouter"):
        moepatch.apply(model, {"c2r": {"top_t": 1, "collaborative_list": [None] * moe.num_layers}})
    handle = moepatch.apply(model, {"freeze_gate": "router", "routing_stats": True})
    assert handle.frozen_parameters and handle.recorder is not None


@pytest.mark.parametrize(("overrides", "problem"), [
    ({"topk_method": "noaux_tc"}, "topk_method='noaux_tc': the router chooses with another method"),
    ({"topk_method": "group_limited_greedy", "n_group": 2, "topk_group": 1}, None),
    ({"routed_scaling_factor": 16.0}, None),
])
def test_deepseek_v2_settings_are_read_not_refused(overrides, problem):
    """Group-limited greedy and a scaling factor are part of the rule now; an unknown method is a routing problem
    (the structure is still usable), read even where nothing is probed."""
    model = tiny.tiny_model("deepseek_v2", **overrides)
    for verify in (True, False):
        moe = describe(model, verify=verify)
        if problem is None:
            assert moe.routing_problem is None
        else:
            assert problem in moe.routing_problem


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


PLAIN_RULE = RoutingRule(renormalize=False)
SOFTMAX_OVER_K_RULE = RoutingRule(score="logits", weights_from="softmax_of_chosen")


def _probe(router: nn.Module, rule: RoutingRule) -> str | None:
    """The probe's verdict on ``rule`` for ``router`` (``None``: equal bit for bit)."""
    accepted, why = probe_rule(router, None, [rule], top_k=2, weight_attr="weight",
                               call=lambda copy, block, hidden: type(copy).forward(copy, hidden))
    return None if accepted is not None else why


@pytest.mark.parametrize("scale", [1.0, 30.0], ids=["spread", "saturated"])
def test_softmax_over_k_router_is_not_taken_for_plain_softmax(scale):
    """Even a saturated router (top-k probabilities summing to ~1 on the first probe) is told apart."""
    torch.manual_seed(0)
    router = _SoftmaxOverKRouter(32, 8, 2, scale)
    assert _probe(router, PLAIN_RULE) in ("router's weights differ from the rule's",
                                          "router's indices differ from the rule's")  # saturated: ties in softmax
    assert _probe(router, SOFTMAX_OVER_K_RULE) is None


def test_plain_router_is_not_taken_for_softmax_over_k():
    class Plain(_SoftmaxOverKRouter):
        def forward(self, hidden_states):
            logits = nn.functional.linear(hidden_states.reshape(-1, self.hidden_dim), self.weight)
            values, index = torch.topk(torch.softmax(logits, dim=-1, dtype=torch.float), self.top_k, dim=-1)
            return logits, values.to(logits.dtype), index

    plain = Plain(32, 8, 2)
    assert _probe(plain, PLAIN_RULE) is None
    assert _probe(plain, SOFTMAX_OVER_K_RULE) == "router's weights differ from the rule's"


@pytest.mark.parametrize(("argv", "message"), [
    (["--types", "mixtral,nosuch"], "--types: not MoE causal-LM model types of transformers .*: nosuch"),
    (["--timeout", "0"], "argument --timeout: expected a positive integer, got '0'"),
    (["--width", "-3"], "argument --width: expected a positive integer, got '-3'"),
    (["--check", "no/such/file.md"], "--check: no/such/file.md is not a file"),
    (["--markdown", "no/such/folder/doc.md"], "--markdown: no/such/folder/doc.md is not a writable file path"),
    (["--structure-only", "--markdown", "out.md"], "--structure-only: the document needs the features"),
])
def test_survey_refuses_bad_arguments_before_building_anything(argv, message, capsys):
    import re

    from family_survey import main

    with pytest.raises(SystemExit) as stopped:
        main(argv)
    captured = capsys.readouterr()
    assert stopped.value.code == 2 and re.search(message, captured.err) and "Traceback" not in captured.err
    assert captured.out == ""  # no table started


def test_doge_with_a_non_square_expert_count_keeps_the_structure_and_refuses_the_rule():
    """Doge's product keys reach only ⌊√E⌋² experts: with E = 15 the rule is refused by name (C2R could find fewer
    than k reachable experts in an allowed set), the structure still serves statistics and freezing."""
    model = tiny_kinds.tiny_kind_model("doge", num_experts=15)
    moe = describe(model)
    assert moe.routing_problem is not None and "num_experts=15: the product keys reach only" in moe.routing_problem
    before = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    with pytest.raises(ValueError, match=r"c2r.top_t: needs the exact routing rule .*a square expert count"):
        moepatch.apply(model, {"c2r": {"top_t": 3, "collaborative_list": [None] * moe.num_layers}})
    assert all(torch.equal(tensor, before[name]) for name, tensor in model.state_dict().items())
    handle = moepatch.apply(model, {"freeze_gate": "router", "routing_stats": True})
    assert handle.frozen_parameters and handle.recorder is not None


def test_doge_renumbering_is_refused_naming_the_product_keys():
    """Doge's rule is exact, but its experts are key pairs: renumbering them is refused with that reason."""
    moe = describe(tiny_kinds.tiny_kind_model("doge"))
    assert moe.routing_problem is None
    with pytest.raises(ValueError, match=r"expert permutation: DogeForCausalLM \(doge\): DogeCDMoE addresses its "
                                         r"experts by product keys"):
        moe.require_renumbering("expert permutation")


def test_doge_placement_is_refused_naming_the_product_keys():
    from moepatch.tools.c2r.permutation import check_permutable

    with pytest.raises(ValueError, match="DogeCDMoE addresses its experts by product keys"):
        check_permutable(describe(tiny_kinds.tiny_kind_model("doge")))
