"""C2R routing against a per-token numpy reference, official config files, validation, and the aux-loss fix."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from family_facts import HF_FAMILIES
from family_facts import family_of
from family_facts import renormalizes
from family_facts import router_choice
from family_facts import router_output_probabilities
from family_facts import selection_probabilities
from family_facts import size_overrides
from helpers import logits_of
from helpers import model_state as _state
from real_data import C2R_DATA
from routing_reference import independent_switch_loss
from routing_reference import moe_routers

import moepatch
from model_patches.structure import describe
from moepatch.testing import tiny

random_list = tiny.random_collaborative_list


def reference_routing(probs: np.ndarray, k: int, ranking: list, top_t: int, renormalize: bool):
    """The C2R rule, token by token, written from the paper's description."""
    indices, weights = [], []
    for p in probs:
        first = int(np.argmax(p))
        allowed = ranking[first][:top_t]
        rest = sorted(allowed, key=lambda e: -p[e])[: k - 1]
        chosen = [first] + rest
        w = np.array([p[e] for e in chosen])
        indices.append(chosen)
        weights.append(w / w.sum() if renormalize else w)
    return np.array(indices), np.array(weights)


def _family_model(family: str, num_experts: int, top_k: int, layers: int = 2) -> torch.nn.Module:
    return tiny.tiny_model(family, **size_overrides(family, num_experts, top_k, layers))


CASES = [(8, 2, 1), (8, 2, 4), (8, 2, 7), (8, 4, 3), (8, 4, 5), (8, 8, 7), (60, 2, 1), (60, 2, 30), (60, 4, 3),
         (60, 4, 30), (60, 4, 59), (60, 8, 12), (64, 2, 1), (64, 8, 7), (64, 8, 40), (64, 4, 63)]


@pytest.mark.parametrize(("num_experts", "top_k", "top_t"), CASES, ids=[f"E{e}-k{k}-T{t}" for e, k, t in CASES])
def test_routing_equals_reference_on_every_family(family, num_experts, top_k, top_t):
    model = _family_model(family, num_experts, top_k)
    ranking = random_list(2, num_experts, seed=num_experts * 100 + top_t)
    block = {"c2r": {"top_t": top_t, "collaborative_list": ranking}}
    if family == "llama_moe" and top_t < top_k and not (top_t == 1 and top_k == 2):
        with pytest.raises(ValueError, match="LLaMA-MoE's gate takes k of the first T"):
            moepatch.apply(model, block)
        return
    moepatch.apply(model, block)
    moe = describe(model)
    generator = torch.Generator().manual_seed(top_t)
    hidden = torch.randn(300, model.config.hidden_size, generator=generator)
    for layer in moe.layers:
        indices = _check_layer_routing(model, layer, hidden, top_k, ranking[layer.index], top_t)
        assert all(len(set(row)) == top_k for row in indices.tolist())  # never a duplicate expert


def _check_layer_routing(model, layer, hidden, top_k, ranking, top_t):
    """The patched router's choice and weights equal the numpy reference on the router's own probabilities.

    The reference selects on the probabilities the router produced (so float near-ties cannot flip), and those
    probabilities are checked against an independent computation from the router's parameters.
    """
    with torch.no_grad():
        output = layer.router(hidden)
    weights, indices = router_choice(model, output)
    independent = selection_probabilities(model, layer.router, hidden)
    if family_of(model) == "llama_moe":  # its gate returns only the chosen experts' probabilities
        probs = independent.float().numpy()
    else:
        own = router_output_probabilities(model, output)
        torch.testing.assert_close(own.double(), independent, atol=1e-6, rtol=0)
        probs = own.numpy()
    want_index, want_weight = reference_routing(probs, top_k, ranking, top_t, renormalizes(model))
    got = indices.numpy()
    for token in np.nonzero((got != want_index).any(axis=1))[0]:  # only exact ties may be broken differently
        first, *rest = got[token]
        assert probs[token, first] == probs[token].max() and set(rest) <= set(ranking[first][:top_t])
        assert sorted(probs[token, got[token]]) == sorted(probs[token, want_index[token]]), f"token {token}"
    assert (got == want_index).all(axis=1).mean() > 0.95
    np.testing.assert_allclose(np.sort(weights.double().numpy()), np.sort(want_weight), rtol=1e-5, atol=1e-6)
    return indices


def test_top_t_e_minus_1_is_bit_identical_to_vanilla(family, batch):
    model = tiny.tiny_model(family)
    reference = logits_of(model, batch)
    moe = describe(model)
    handle = moepatch.apply(model, {"c2r": {"top_t": 7, "collaborative_list": random_list(moe.num_layers, 8, 0)}})
    assert handle.c2r_routers == [f"{layer.name}.gate" for layer in moe.layers]
    assert torch.equal(logits_of(model, batch), reference)


def test_c2r_changes_routing_and_remove_restores(batch):
    model = tiny.tiny_model("qwen2_moe")
    reference, before = logits_of(model, batch), _state(model)
    buffers = dict(model.named_buffers())
    handle = moepatch.apply(model, {"c2r": {"top_t": 1, "collaborative_list": random_list(4, 8, 1)}})
    assert not torch.equal(logits_of(model, batch), reference)
    assert "model.layers.0.mlp.gate.c2r_candidates" in dict(model.named_buffers())
    assert "c2r_candidates" not in str(list(model.state_dict()))  # never saved
    handle.remove()
    assert _state(model) == before and dict(model.named_buffers()).keys() == buffers.keys()
    assert torch.equal(logits_of(model, batch), reference)


def test_recorded_choices_stay_inside_the_allowed_pairs(batch):
    """Profiling-style check (the official profiling check): no co-activation outside cand[e1]."""
    model = tiny.tiny_model("mixtral")
    ranking = random_list(3, 8, 7)
    moepatch.apply(model, {"c2r": {"top_t": 2, "collaborative_list": ranking}})
    seen = {}
    hooks = [router.register_forward_hook(lambda m, a, out, i=i: seen.__setitem__(i, out[2]))
             for i, router in moe_routers(model).items()]
    with torch.no_grad():
        model(**batch)
    for hook in hooks:
        hook.remove()
    for layer, indices in seen.items():
        for first, *rest in indices.tolist():
            assert set(rest) <= set(ranking[layer][first][:2])


def test_dense_layers_and_null_entries():
    model = tiny.tiny_model("qwen2_moe")  # layer 1 dense
    ranking = random_list(4, 8, 2)
    ranking[1] = "ignored for a dense layer"
    ranking[3] = None  # explicit: vanilla routing on layer 3
    handle = moepatch.apply(model, {"c2r": {"top_t": 3, "collaborative_list": ranking}})
    assert handle.c2r_routers == ["model.layers.0.mlp.gate", "model.layers.2.mlp.gate"]
    assert "forward" not in model.model.layers[3].mlp.gate.__dict__


def test_config_path_and_round_trip(tmp_path, batch):
    ranking = random_list(3, 8, 3)
    list_file = tmp_path / "c2r_list.json"
    list_file.write_text(json.dumps({"collaborative_list": ranking}))
    model = tiny.tiny_model("olmoe")
    moepatch.apply(model, {"c2r": {"top_t": 2, "path": str(list_file)}})
    patched_logits = logits_of(model, batch)
    model.save_pretrained(tmp_path / "ckpt")
    loaded = moepatch.tiny.AutoModelForCausalLM.from_pretrained(tmp_path / "ckpt").eval()
    handle = moepatch.apply(loaded)
    assert handle.config.c2r.path == str(list_file) and len(handle.c2r_routers) == 3
    assert torch.equal(logits_of(loaded, batch), patched_logits)
    inline = tiny.tiny_model("olmoe")
    moepatch.apply(inline, {"c2r": {"top_t": 2, "collaborative_list": ranking}})
    assert torch.equal(logits_of(inline, batch), patched_logits)


def _official(name: str) -> dict:
    path = C2R_DATA / name
    return json.loads(path.read_text())


@pytest.mark.parametrize(
    ("file", "family", "layers", "experts", "top_k"),
    [("qwen1.5-moe-a2.7b.topt30.config.json", "qwen2_moe", 24, 60, 4),
     ("llama-moe-v1-3_5b-2_8.topt5.config.json", "llama_moe", 32, 8, 2),
     ("llama-moe-v1-3_5b-2_8.topt5.config.json", "mixtral", 32, 8, 2)],
    ids=["qwen1.5-moe-topt30", "llama-moe-topt5", "llama-moe-list-on-mixtral"],
)
def test_official_config_files_drive_routing_unchanged(tmp_path, file, family, layers, experts, top_k):
    official = _official(file)
    top_t, ranking = official["top_t"], official["collaborative_list"]
    assert (len(ranking), len(ranking[0]), len(ranking[0][0])) == (layers, experts, experts)
    model = _family_model(family, experts, top_k, layers=layers)
    model.config.top_t, model.config.collaborative_list = top_t, ranking  # the official top-level fields
    model.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["top_t"] == top_t and saved["collaborative_list"] == ranking
    loaded = moepatch.tiny.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    handle = moepatch.apply(loaded)  # no moepatch block at all
    assert handle.config.c2r.source == "official" and len(handle.c2r_routers) == layers
    moe = describe(loaded)
    hidden = torch.randn(200, loaded.config.hidden_size)
    for layer in (moe.layers[0], moe.layers[-1]):
        _check_layer_routing(loaded, layer, hidden, top_k, ranking[layer.index], top_t)
    assert "c2r" not in (getattr(loaded.config, "moepatch", None) or {})  # official fields stay top-level


def _bad(ranking_edit, top_t=3, layers=4):
    ranking = random_list(layers, 8, 5)
    ranking_edit(ranking)
    return {"c2r": {"top_t": top_t, "collaborative_list": ranking}}


def _set(path, value):
    def edit(ranking):
        target = ranking
        for index in path[:-1]:
            target = target[index]
        target[path[-1]] = value
    return edit


MALFORMED = [
    ({"c2r": {"top_t": 8, "collaborative_list": random_list(4, 8, 5)}}, r"top_t = 8 = number of experts.*duplicate"),
    ({"c2r": {"top_t": 9, "collaborative_list": random_list(4, 8, 5)}}, r"moepatch.c2r.top_t: top_t must be in"),
    ({"c2r": {"top_t": 0, "collaborative_list": random_list(4, 8, 5)}}, r"moepatch.c2r.top_t: top_t must be in"),
    ({"c2r": {"top_t": "5", "collaborative_list": random_list(4, 8, 5)}}, r"moepatch.c2r.top_t: expected an integer"),
    ({"c2r": {"top_t": 3}}, r"moepatch.c2r: give exactly one of collaborative_list and path"),
    ({"c2r": {"top_t": 3, "collaborative_list": {"0": []}}}, r"moepatch.c2r.collaborative_list: expected a"),
    ({"c2r": {"top_t": 3, "collaborative_list": random_list(3, 8, 5)}}, r"has 3 layer entries but the model has 4"),
    (_bad(_set([0], random_list(1, 8, 0)[0][:7])), r"collaborative_list\[0\]: expected 8 rows"),
    (_bad(_set([2, 5], [1, 2, 3, 4])), r"collaborative_list\[2\]\[5\]: expected a ranking of all 8"),
    (_bad(_set([0, 3, 0], 8)), r"collaborative_list\[0\]\[3\]\[0\]: expert id 8 is out of range"),
    (_bad(_set([0, 3, 0], -1)), r"collaborative_list\[0\]\[3\]\[0\]: expert id -1 is out of range"),
    (_bad(_set([3, 2, 1], 1.0)), r"collaborative_list\[3\]\[2\]\[1\]: expected an expert id"),
    (_bad(_set([3, 2, 1], True)), r"collaborative_list\[3\]\[2\]\[1\]: expected an expert id"),
    (_bad(lambda r: r[2][6].__setitem__(1, r[2][6][0])), r"collaborative_list\[2\]\[6\]: expert \d appears more"),
    (_bad(lambda r: r[0].__setitem__(4, [4] + [e for e in range(8) if e != 4])),
     r"collaborative_list\[0\]\[4\]: lists expert 4 itself at position 0, before the top_t = 3 cut"),
    (_bad(_set([0], None) if False else _set([2], "dense?")), r"collaborative_list\[2\]: expected 8 rows"),
    (_bad(_set([0, 1], None)), r"collaborative_list\[0\]\[1\]: expected a ranking"),
    ({"c2r": {"top_t": 3, "path": "/nonexistent/list.json"}}, r"moepatch.c2r.path: file '/nonexistent/list.json'"),
    ({"c2r": {"top_t": 3, "collaborative_list": random_list(4, 8, 5), "aux_loss": "none"}},
     r"moepatch.c2r.aux_loss: expected one of"),
]


@pytest.mark.parametrize(("block", "message"), MALFORMED, ids=[m[:40] for _, m in MALFORMED])
def test_malformed_c2r_config_raises_and_leaves_model_untouched(block, message, batch):
    model = tiny.tiny_model("qwen2_moe")  # 4 layers, layer 1 dense, 8 experts, top-2
    before, reference = _state(model), logits_of(model, batch)
    with pytest.raises(ValueError, match=message):
        moepatch.apply(model, block)
    assert _state(model) == before and torch.equal(logits_of(model, batch), reference)


def test_official_fields_must_come_in_pairs():
    model = tiny.tiny_model("qwen2_moe")
    model.config.top_t = 3
    with pytest.raises(ValueError, match="collaborative_list: the official C2R fields come as a pair"):
        moepatch.apply(model)
    model.config.collaborative_list = random_list(4, 8, 0)
    model.config.collaborative_list[2][0][0] = 0
    with pytest.raises(ValueError, match=r"^collaborative_list\[2\]\[0\]"):  # named as the top-level field
        moepatch.apply(model)


# ---------------------------------------------------------------- load-balancing loss on the actual choice
def _aux_model(family: str) -> torch.nn.Module:
    return tiny.tiny_model(family, output_router_logits=True, router_aux_loss_coef=0.1)


@pytest.mark.parametrize("family", HF_FAMILIES)
def test_aux_loss_equals_transformers_under_vanilla_equivalent_routing(family, batch):
    model = _aux_model(family)
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    with torch.no_grad():
        want = model(**batch, labels=labels)
    moe = describe(model)
    moepatch.apply(model, {"c2r": {"top_t": 7, "collaborative_list": random_list(moe.num_layers, 8, 0)}})
    with torch.no_grad():
        got = model(**batch, labels=labels)
    assert "forward" in model.__dict__
    assert torch.equal(got.aux_loss, want.aux_loss) and torch.equal(got.loss, want.loss)
    assert len(got.router_logits) == len(want.router_logits)
    assert all(torch.equal(a, b) for a, b in zip(got.router_logits, want.router_logits, strict=True))


@pytest.mark.parametrize("family", HF_FAMILIES)
def test_aux_loss_counts_the_experts_c2r_chose(family, batch):
    model = _aux_model(family)
    moe = describe(model)
    moepatch.apply(model, {"c2r": {"top_t": 1, "collaborative_list": random_list(moe.num_layers, 8, 4)}})
    chosen = []
    hooks = [layer.router.register_forward_hook(lambda m, a, out: chosen.append(out[2]) and None)
             for layer in moe.layers]
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    model.train()
    out = model(**batch, labels=labels)
    for hook in hooks:
        hook.remove()
    expected = independent_switch_loss(out.router_logits, chosen, 8, batch["attention_mask"])
    assert abs(out.aux_loss.item() - expected) < 1e-5
    # transformers' own function recomputes vanilla top-k and gives another value
    from transformers.models.qwen2_moe.modeling_qwen2_moe import load_balancing_loss_func

    vanilla = load_balancing_loss_func(out.router_logits, 8, 2, batch["attention_mask"]).item()
    assert abs(vanilla - expected) > 1e-4
    lm_only = model.loss_function(out.logits, labels, model.config.vocab_size)
    torch.testing.assert_close(out.loss, lm_only + 0.1 * out.aux_loss)
    out.loss.backward()
    assert all(layer.router.weight.grad is not None for layer in moe.layers)


def test_aux_loss_vanilla_mode_keeps_transformers_behaviour(batch):
    model = _aux_model("mixtral")
    moepatch.apply(model, {"c2r": {"top_t": 1, "collaborative_list": random_list(3, 8, 4), "aux_loss": "vanilla"}})
    assert "forward" not in model.__dict__
    with torch.no_grad():
        out = model(**batch)
    from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func

    assert torch.equal(out.aux_loss, load_balancing_loss_func(out.router_logits, 8, 2, batch["attention_mask"]))


def test_tuple_outputs_and_no_router_logits_pass_through(batch):
    model = tiny.tiny_model("qwen2_moe")
    moepatch.apply(model, {"c2r": {"top_t": 1, "collaborative_list": random_list(4, 8, 4)}})
    with torch.no_grad():
        plain = model(**batch)
        as_tuple = model(**batch, output_router_logits=True, return_dict=False)
    assert plain.aux_loss is None and plain.router_logits is None
    with torch.no_grad():
        with_aux = model(**batch, output_router_logits=True)
    assert isinstance(as_tuple, tuple) and len(as_tuple) == len(with_aux.to_tuple())
    assert torch.equal(as_tuple[0], with_aux.aux_loss) and torch.equal(as_tuple[1], plain.logits)


def test_c2r_false_switches_official_fields_off(batch):
    model = tiny.tiny_model("qwen2_moe")
    reference = logits_of(model, batch)
    model.config.top_t, model.config.collaborative_list = 1, random_list(4, 8, 0)
    on = moepatch.apply(model)
    assert on.c2r_routers and not torch.equal(logits_of(model, batch), reference)
    off = moepatch.apply(model, {"c2r": False})
    assert not off.c2r_routers and torch.equal(logits_of(model, batch), reference)
    assert model.config.moepatch["c2r"] is False


@pytest.mark.parametrize(("num_experts", "top_k", "top_t"), [(8, 2, 1), (8, 2, 2), (8, 2, 5), (8, 4, 6), (16, 4, 15)])
def test_llama_moe_rule_gives_k_plus_one_candidates(num_experts, top_k, top_t):
    """The official LLaMA-MoE rule: [e1, the k best of row[:T]] (T = 1: [e1, row[0], row[1]]), logits gathered,
    best first."""
    from moepatch.c2r.selection import constrained_top_k_plus_one

    ranking = random_list(1, num_experts, seed=top_t)[0]
    width = 2 if top_t == 1 else top_t
    candidates = torch.tensor([row[:width] for row in ranking])
    logits = torch.randn(200, num_experts, generator=torch.Generator().manual_seed(top_k))
    values, indices = constrained_top_k_plus_one(logits, top_k, candidates, top_t)
    for token, z in enumerate(logits.tolist()):
        first = max(range(num_experts), key=lambda e: z[e])
        row = ranking[first]
        rest = row[:2] if top_t == 1 else sorted(row[:top_t], key=lambda e: -z[e])[:top_k]
        assert indices[token].tolist() == [first] + rest
        assert values[token].tolist() == [z[e] for e in [first] + rest]


def test_wrapped_forward_keeps_its_signature():
    """HF Trainer drops batch columns the forward's signature does not name: the aux-loss wrapper must keep it."""
    import inspect

    model = tiny.tiny_model("qwen2_moe")
    before = list(inspect.signature(model.forward).parameters)
    moepatch.apply(model, {"c2r": {"top_t": 1, "collaborative_list": random_list(4, 8, 4)}})
    assert model.forward.__func__ is not type(model).forward  # the wrapper is installed ...
    assert list(inspect.signature(model.forward).parameters) == before  # ... and still names input_ids, labels
