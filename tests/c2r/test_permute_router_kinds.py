"""Renumbered experts on the router kinds beyond softmax → top-k: every per-expert routing tensor moves with them.

A renumbering must move the router weight rows, a per-expert linear bias (gpt-oss ``router.bias``) and the selection
bias the family's rule names — a router buffer (DeepSeek-V3), a ``[1, E]`` parameter of a router submodule (ERNIE) or
a buffer of the sparse block (MiniMax-M2) — and must keep every expert inside its routing group where the router has
a group limit.  Each test compares the permuted model with an identically built original on a padded batch: the same
logits up to float32 reordering, and chosen experts that are the permuted images of the original's.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager

import pytest
import torch
from transformers import AutoModelForCausalLM

from model_patches.routing_rule import selection_bias_of
from model_patches.structure import describe
from moepatch import cli
from moepatch.c2r import permutation
from moepatch.testing import tiny
from moepatch.testing.tiny_kinds import tiny_kind_model
from moepatch.tools.c2r.permutation import permute_experts
from moepatch.tools.c2r.permutation import routing_groups
from moepatch.tools.c2r.permutation import write_permuted_checkpoint

KINDS = ("deepseek_v3", "minimax_m2", "ernie4_5_moe", "gpt_oss", "mixtral")
"""Groups + router buffer bias, block buffer bias, [1, E] parameter bias, linear logit bias, softmax → top-k."""


def build(kind: str, **overrides: object) -> torch.nn.Module:
    """The tiny model of ``kind``, identical on every call (random non-zero selection biases, group limits)."""
    if kind == "mixtral":
        return tiny.tiny_model(kind, seed=0)
    return tiny_kind_model(kind, seed=0, **overrides)


@contextmanager
def choices_of(model: torch.nn.Module) -> Iterator[dict[int, torch.Tensor]]:
    """Absolute MoE layer → the ``[N, k]`` experts its router chose in the last call (where the family's router
    output holds them)."""
    moe = describe(model)
    position = moe.family.router_output.indices
    chosen: dict[int, torch.Tensor] = {}
    handles = [layer.router.register_forward_hook(
        lambda module, args, output, index=layer.index: chosen.__setitem__(index, output[position].detach().clone()))
        for layer in moe.layers]
    try:
        yield chosen
    finally:
        for handle in handles:
            handle.remove()


def run(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[int, torch.Tensor]]:
    with choices_of(model) as chosen, torch.no_grad():
        logits = model(**batch).logits
    return logits, chosen


def renumbering(model: torch.nn.Module, seed: int) -> dict[int, list[int]]:
    """A random renumbering per MoE layer, within routing groups where the router has a binding group limit."""
    moe = describe(model)
    generator = torch.Generator().manual_seed(seed)
    limits = routing_groups(moe)
    result = {}
    for index in moe.moe_layer_indices:
        groups = limits[index].groups if index in limits else 1
        size = moe.num_experts // groups
        result[index] = [g * size + int(e) for g in range(groups) for e in torch.randperm(size, generator=generator)]
        assert result[index] != list(range(moe.num_experts))
    return result


def same_choices(original: dict, permuted: dict, permutations: dict, real: torch.Tensor) -> bool:
    """New id ``n`` is old expert ``permutations[layer][n]``: the permuted model's choice, mapped back, is the
    original's (as a set per token: DeepSeek-V3 and MiniMax-M2 take an unsorted top-k)."""
    return all(
        torch.equal(torch.tensor(permutation)[permuted[layer]][real].sort(dim=-1).values,
                    original[layer][real].sort(dim=-1).values)
        for layer, permutation in permutations.items()
    )


def routing_tensors(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Per layer: the router's logit weight, its per-expert logit bias (if any) and the rule's selection bias."""
    moe = describe(model)
    rule = moe.family.routing
    found = {}
    for layer in moe.layers:
        found[f"{layer.index}.weight"] = moe.family.router_weight(layer.router).detach().clone()
        if rule.logit_bias:
            found[f"{layer.index}.logit_bias"] = getattr(layer.router, rule.logit_bias).detach().clone()
        bias = selection_bias_of(rule, layer.router, layer.block)
        if bias is not None:
            found[f"{layer.index}.selection_bias"] = bias.detach().clone()
    return found


@pytest.mark.parametrize("kind", KINDS)
def test_permuted_router_kinds_compute_the_same_function(kind: str, batch: dict[str, torch.Tensor]) -> None:
    """Logits agree to float32 rounding (the experts accumulate a token's outputs in id order; measured max |delta|
    about 2e-6) and the chosen experts are exactly the permuted images of the original's."""
    original, permuted = build(kind), build(kind)
    permutations = renumbering(permuted, seed=7)
    before = routing_tensors(permuted)
    permute_experts(describe(permuted), permutations)

    after = routing_tensors(permuted)
    for name, old in before.items():  # every per-expert routing tensor, in its own shape ([E], [1, E], [E, H])
        order = torch.tensor(permutations[int(name.split(".")[0])])
        want = old[order] if old.dim() == 2 and old.shape[0] > 1 else old.reshape(-1)[order].reshape(old.shape)
        assert torch.equal(after[name], want), name
    if kind in ("deepseek_v3", "minimax_m2", "ernie4_5_moe"):
        assert any(name.endswith("selection_bias") for name in after)
    if kind == "gpt_oss":
        assert any(name.endswith("logit_bias") for name in after)

    logits, chosen = run(original, batch)
    permuted_logits, permuted_chosen = run(permuted, batch)
    real = batch["attention_mask"].reshape(-1).bool()
    assert same_choices(chosen, permuted_chosen, permutations, real)
    torch.testing.assert_close(permuted_logits, logits, atol=1e-5, rtol=1e-5)


def test_inkling_renumbering_moves_the_routed_rows_and_keeps_the_shared_experts_rows(batch: dict[str, torch.Tensor]
                                                                                     ) -> None:
    """InklingTopkRouter's weight scores its E routed experts, then its shared experts (one more row here): a
    renumbering moves the first E rows with the experts and the selection bias, leaves the shared experts' rows and the
    learned global_scale where they are, and the permuted model computes the same function."""
    original, permuted = build("inkling_text"), build("inkling_text")
    moe = describe(permuted)
    permutations = renumbering(permuted, seed=7)
    before = {layer.index: (layer.router.weight.detach().clone(), layer.router.global_scale.detach().clone())
              for layer in moe.layers}
    permute_experts(moe, permutations)
    for layer in moe.layers:
        order = torch.tensor(permutations[layer.index])
        weight, global_scale = before[layer.index]
        assert weight.shape[0] == moe.num_experts + 1
        assert torch.equal(layer.router.weight[: moe.num_experts], weight[: moe.num_experts][order])
        assert torch.equal(layer.router.weight[moe.num_experts:], weight[moe.num_experts:])
        assert torch.equal(layer.router.global_scale, global_scale)

    logits, chosen = run(original, batch)
    permuted_logits, permuted_chosen = run(permuted, batch)
    real = batch["attention_mask"].reshape(-1).bool()
    assert same_choices(chosen, permuted_chosen, permutations, real)
    torch.testing.assert_close(permuted_logits, logits, atol=1e-5, rtol=1e-5)


def test_ergo_renumbering_moves_each_experts_output_norm(batch: dict[str, torch.Tensor]) -> None:
    """ErgoExperts RMS-normalises each expert's output with that expert's row of ``post_expert_norm.weight [E, H]``:
    a renumbering moves those rows with the experts (and the router rows and selection bias), and the permuted model
    computes the same function."""
    original, permuted = build("ergo"), build("ergo")
    moe = describe(permuted)
    with torch.no_grad():  # rows that differ, so that a norm left in the old order would show in the logits
        for layer in moe.layers:
            layer.experts.post_expert_norm.weight.uniform_(0.5, 1.5, generator=torch.Generator().manual_seed(0))
            original.model.layers[layer.index].mlp.experts.post_expert_norm.weight.copy_(
                layer.experts.post_expert_norm.weight)
    permutations = renumbering(permuted, seed=7)
    before = {layer.index: layer.experts.post_expert_norm.weight.detach().clone() for layer in moe.layers}
    permute_experts(moe, permutations)
    for layer in moe.layers:
        order = torch.tensor(permutations[layer.index])
        assert torch.equal(layer.experts.post_expert_norm.weight, before[layer.index][order])

    logits, chosen = run(original, batch)
    permuted_logits, permuted_chosen = run(permuted, batch)
    real = batch["attention_mask"].reshape(-1).bool()
    assert same_choices(chosen, permuted_chosen, permutations, real)
    torch.testing.assert_close(permuted_logits, logits, atol=1e-5, rtol=1e-5)


def _zaya(top_k: int = 2, skip_bias: float = 0.13) -> torch.nn.Module:
    """The tiny ZAYA choosing ``top_k`` classes (its published config refuses any k but 1), its skip class at
    ``skip_bias`` (−1 at init, which never lets it win) so that some tokens skip."""
    model = build("zaya")
    model.config.num_experts_per_tok = top_k
    for layer in model.model.layers:
        layer.mlp.gate.top_k = top_k
        with torch.no_grad():
            layer.mlp.gate.balancing_biases[-1] = skip_bias
    return model


def test_zaya_renumbering_moves_the_expert_classes_and_keeps_the_skip_class(batch: dict[str, torch.Tensor]) -> None:
    """ZayaRouter's ``out_proj`` scores E experts, then the skip class; ``balancing_biases`` has E + 1 entries the
    same way: a renumbering moves the experts' rows and entries, leaves the skip class's and the rest of the router
    MLP (and the router state it hands on) as they are, and the permuted model computes the same function, its skips
    included."""
    original, permuted = _zaya(), _zaya()
    moe = describe(permuted)
    permutations = renumbering(permuted, seed=7)
    router_state = {name: tensor.detach().clone() for name, tensor in permuted.state_dict().items() if ".gate." in name}
    permute_experts(moe, permutations)
    num_experts = moe.num_experts
    for layer in moe.layers:
        order = torch.tensor(permutations[layer.index])
        prefix = f"{layer.name}.gate."
        for name, tensor in layer.router.state_dict().items():
            old = router_state[prefix + name]
            if name in ("router_mlp.out_proj.weight", "balancing_biases"):
                assert old.shape[0] == num_experts + 1
                assert torch.equal(tensor[:num_experts], old[:num_experts][order]), name
                assert torch.equal(tensor[num_experts:], old[num_experts:]), name
            else:
                assert torch.equal(tensor, old), name

    def classes(model: torch.nn.Module) -> tuple[torch.Tensor, dict[int, torch.Tensor]]:
        """Logits, and per layer the classes chosen (a skip, handed over as expert 0 with weight 0, as index E)."""
        found: dict[int, torch.Tensor] = {}
        handles = [layer.router.register_forward_hook(
            lambda module, args, output, index=layer.index: found.__setitem__(
                index, output[2].masked_fill((output[2] == 0) & (output[1] == 0), num_experts)))
            for layer in describe(model).layers]
        with torch.no_grad():
            logits = model(**batch).logits
        for handle in handles:
            handle.remove()
        return logits, found

    logits, chosen = classes(original)
    permuted_logits, permuted_chosen = classes(permuted)
    real = batch["attention_mask"].reshape(-1).bool()
    assert any(bool((chosen[index][real] == num_experts).any()) for index in chosen)  # some tokens skip
    skip_stays = {index: [*permutation, num_experts] for index, permutation in permutations.items()}
    assert same_choices(chosen, permuted_chosen, skip_stays, real)
    torch.testing.assert_close(permuted_logits, logits, atol=1e-5, rtol=1e-5)


def test_a_renumbering_across_routing_groups_is_refused_and_would_change_the_routing(
    tmp_path, batch: dict[str, torch.Tensor], monkeypatch: pytest.MonkeyPatch
) -> None:
    """DeepSeek-V3 chooses within the 2 best of 4 groups of 2 contiguous ids: swapping experts 1 and 2 moves each
    into the other's group.  Refused by name, before any change or file; forced through, it changes the logits."""
    original, permuted = build("deepseek_v3"), build("deepseek_v3")
    moe = describe(permuted)
    crossing = {index: [0, 2, 1, 3, 4, 5, 6, 7] for index in moe.moe_layer_indices}
    state = {name: tensor.clone() for name, tensor in permuted.state_dict().items()}
    with pytest.raises(ValueError, match=r"expert permutation of layer 1: the router's group limit "
                                         r"\(gate\.num_group=4, gate\.topk_group=2\)"):
        permute_experts(moe, crossing)
    assert all(torch.equal(tensor, state[name]) for name, tensor in permuted.state_dict().items())

    source = tmp_path / "src"
    original.save_pretrained(source)
    with pytest.raises(ValueError, match="must map each group's ids onto themselves"):
        write_permuted_checkpoint(source, crossing, tmp_path / "dst")
    assert not (tmp_path / "dst").exists()

    monkeypatch.setattr(permutation, "check_permutations", lambda model, permutations: None)
    permute_experts(moe, crossing)  # every tensor moved as for an allowed renumbering; only the groups differ
    logits, chosen = run(original, batch)
    permuted_logits, permuted_chosen = run(permuted, batch)
    real = batch["attention_mask"].reshape(-1).bool()
    assert not same_choices(chosen, permuted_chosen, crossing, real)
    assert (permuted_logits - logits).abs().max() > 1e-2


def test_a_permuted_checkpoint_reloads_with_the_permuted_selection_bias(tmp_path, batch: dict[str, torch.Tensor]
                                                                        ) -> None:
    """save_pretrained → from_pretrained keeps the renumbered ``e_score_correction_bias`` buffer (transformers does
    not re-initialise it), so the reloaded copy routes as the original."""
    source = tmp_path / "src"
    original = build("deepseek_v3")
    original.save_pretrained(source)
    permutations = renumbering(original, seed=3)
    write_permuted_checkpoint(source, permutations, tmp_path / "dst")

    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "dst").eval()
    for layer in describe(reloaded).layers:
        old = original.model.layers[layer.index].mlp.gate.e_score_correction_bias
        assert torch.equal(layer.router.e_score_correction_bias, old[permutations[layer.index]])
    logits, chosen = run(original, batch)
    reloaded_logits, reloaded_chosen = run(reloaded, batch)
    assert same_choices(chosen, reloaded_chosen, permutations, batch["attention_mask"].reshape(-1).bool())
    torch.testing.assert_close(reloaded_logits, logits, atol=1e-5, rtol=1e-5)
    saved = json.loads((tmp_path / "dst" / "expert_permutation.json").read_text())
    assert {int(layer): order for layer, order in saved.items()} == permutations


def test_routing_state_the_rule_does_not_cover_is_refused() -> None:
    """A per-expert router buffer the rule does not declare would stay in the old order; a router whose exact rule is
    unknown (DeepSeek-V4's hashed layers) may hold such state or a group limit: both refused by name, nothing
    changed."""
    model = tiny.tiny_model("qwen2_moe", seed=0)
    moe = describe(model)
    moe.layers[0].router.register_buffer("expert_load", torch.arange(8.0))
    with pytest.raises(ValueError, match=r"layer 0: gate\.expert_load has an axis of size E=8 that the family's"):
        permute_experts(moe, {0: list(reversed(range(8)))})
    assert torch.equal(moe.layers[0].router.expert_load, torch.arange(8.0))

    hashed = describe(tiny_kind_model("deepseek_v4", seed=0))
    with pytest.raises(ValueError, match=r"expert permutation: layers \[0\] route by a fixed hash of the token id"):
        permute_experts(hashed, {i: list(reversed(range(hashed.num_experts))) for i in hashed.moe_layer_indices})


def test_place_plans_within_routing_groups_and_writes_a_permuted_copy(tmp_path, capsys, batch) -> None:
    """``moepatch place`` on a group-limited checkpoint (2 routing groups of 4, 1 kept): over 4 devices each group is
    split over 2 devices and planned inside itself; over 2 devices every device hosts one whole group, so the plan is
    the contiguous placement.  The permuted copy keeps every expert in its group and computes the same logits."""
    source = tmp_path / "src"
    original = build("deepseek_v3", n_group=2, topk_group=1)
    original.save_pretrained(source)
    tiny.tiny_tokenizer().save_pretrained(source)

    target = tmp_path / "ep4"
    status = cli.main(["place", str(source), "--ep-size", "4", "--json", "--max-tokens", "96",
                       "--write-permuted", str(target)])
    assert status == 0
    reports = json.loads(capsys.readouterr().out)["reports"]
    rows = reports["vanilla"]["layers"]
    assert [row["layer"] for row in rows] == [1, 2] and {row["routing_groups"] for row in rows} == {2}
    for row in rows:
        order = [expert for group in row["groups"] for expert in group]
        assert all(new // 4 == old // 4 for new, old in enumerate(order))
        assert row["planned_copies_per_token"] <= row["contiguous_copies_per_token"]
    written = json.loads((target / "expert_permutation.json").read_text())
    assert all(new // 4 == old // 4 for order in written.values() for new, old in enumerate(order))
    copy = AutoModelForCausalLM.from_pretrained(target).eval()
    torch.testing.assert_close(run(copy, batch)[0], run(original, batch)[0], atol=1e-5, rtol=1e-5)

    assert cli.main(["place", str(source), "--ep-size", "2", "--max-tokens", "96"]) == 0
    text = capsys.readouterr().out
    assert "0 1 2 3 | 4 5 6 7" in text and "the plan is the contiguous placement" in text


def test_place_refuses_to_permute_a_router_whose_rule_is_unknown(tmp_path, capsys) -> None:
    """Refused after loading, before profiling, naming the flag and the router; nothing is written.  (Inkling2 with
    a SiLU ``scoring_func``: a score function none of the probe's candidate rules has.)"""
    source = tmp_path / "src"
    tiny_kind_model("inkling2_text", seed=0, scoring_func="silu").save_pretrained(source)
    tiny.tiny_tokenizer().save_pretrained(source)
    status = cli.main(["place", str(source), "--ep-size", "2", "--write-permuted", str(tmp_path / "dst")])
    error = capsys.readouterr().err
    assert status == 1 and "Traceback" not in error
    assert "--write-permuted" in error and "expert permutation: needs the exact routing rule" in error
    assert "Inkling2TopKRouter" in error and "profiling" not in error
    assert not (tmp_path / "dst").exists()

    assert cli.main(["place", str(source), "--ep-size", "2", "--max-tokens", "32"]) == 0  # the report alone: a note
    assert "note: the routers' exact routing rule is unknown" in capsys.readouterr().out


@pytest.mark.parametrize(("settings", "expected"), [
    ({}, {}),  # greedy top-k: no group limit
    ({"topk_method": "group_limited_greedy", "n_group": 4, "topk_group": 2}, {1: (4, 2), 2: (4, 2)}),
    ({"topk_method": "group_limited_greedy", "n_group": 4, "topk_group": 4}, {}),  # every group kept: masks nothing
])
def test_routing_groups_follow_the_routers_own_settings(settings: dict, expected: dict) -> None:
    """DeepSeek-V2 limits its choice to groups only with ``topk_method="group_limited_greedy"``; a limit that keeps
    every group constrains no renumbering."""
    found = routing_groups(describe(tiny.tiny_model("deepseek_v2", seed=0, **settings)))
    assert {index: (limit.groups, limit.kept) for index, limit in found.items()} == expected
