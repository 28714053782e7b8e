"""C2R under exact ties: they resolve as the family's own top-k resolves them, never in collaboration-list order.

Exact ties at the top-k boundary are common in bf16/fp16.  ``top_t = E - 1`` must stay bit-identical to vanilla
routing with them (checked on real tiny models of every family with forced ties), and ``top_t < E - 1`` must keep
the official rule with ties broken by the family's ``torch.topk`` (checked against a per-token Python reference).
"""

from __future__ import annotations

import pytest
import torch
from family_facts import family_of
from helpers import logits_of

import moepatch
from model_patches.structure import describe
from moepatch.c2r.selection import allowed_table
from moepatch.c2r.selection import constrained_top_k_plus_one
from moepatch.c2r.selection import constrained_topk
from moepatch.testing import tiny

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
DTYPE_IDS = ["fp32", "bf16", "fp16"]

TIED = ((1, 6), (3, 4))
"""Expert pairs whose router rows are made equal: their scores tie exactly for every token."""


def reversed_ranking(num_layers: int, num_experts: int) -> list[list[list[int]]]:
    """Per layer and expert: the other experts from the highest index down, then the expert itself.

    List order is the opposite of expert-index order, so a selection that breaks ties in list order differs from
    the family's ``torch.topk`` on tied tokens.
    """
    return [[[e for e in reversed(range(num_experts)) if e != expert] + [expert] for expert in range(num_experts)]
            for _ in range(num_layers)]


def _score_rows(model: torch.nn.Module, router: torch.nn.Module) -> torch.Tensor:
    """The last layer of the router's expert-scoring network (written from each family's published definition)."""
    if family_of(model) == "llama_moe":
        return router.gate_network[2].weight  # Linear(H,E) → Tanh → Linear(E,E)
    if family_of(model) == "moduleformer":
        return router.w_gate[3].weight  # Linear(+bias) → GELU → Dropout → Linear(no bias)
    return router.weight  # transformers 5 routers: h · Wᵀ


def _force_ties(model: torch.nn.Module) -> None:
    with torch.no_grad():
        for layer in describe(model).layers:
            rows = _score_rows(model, layer.router)
            for copy, source in TIED:
                rows[copy] = rows[source]


def _capture_selection_scores(model: torch.nn.Module) -> tuple[list[torch.Tensor], list]:
    """Hooks recording, for each MoE layer, the scores ``[N, E]`` the family's own top-k runs over.

    transformers 5 routers: float32 softmax of the logits they return; MoLM: the probabilities it returns (activation
    dtype); LLaMA-MoE: the logits its gate network produces (eval: no noise).
    """
    family = family_of(model)
    seen: list[torch.Tensor] = []
    hooks = []
    for layer in describe(model).layers:
        if family == "llama_moe":
            hooks.append(layer.router.gate_network.register_forward_hook(lambda m, a, out: seen.append(out)))
        elif family == "moduleformer":
            hooks.append(layer.router.register_forward_hook(lambda m, a, out: seen.append(out[2])))
        else:
            hooks.append(layer.router.register_forward_hook(
                lambda m, a, out: seen.append(torch.softmax(out[0], dim=-1, dtype=torch.float32))))
    return seen, hooks


def _boundary_ties(scores: torch.Tensor, k: int) -> int:
    """Tokens whose k-th and (k+1)-th best scores are equal: the chosen set depends on how the tie is broken."""
    ordered = scores.sort(dim=-1, descending=True).values
    return int((ordered[:, k - 1] == ordered[:, k]).sum())


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_top_t_e_minus_1_is_bit_identical_to_vanilla_with_forced_ties(family, dtype):
    model = tiny.tiny_model(family).to(dtype)
    _force_ties(model)
    moe = describe(model)
    input_ids = torch.randint(3, model.config.vocab_size, (8, 48), generator=torch.Generator().manual_seed(0))
    batch = {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids)}

    seen, hooks = _capture_selection_scores(model)
    reference = logits_of(model, batch)
    for hook in hooks:
        hook.remove()
    assert len(seen) == len(moe.layers)
    for scores in seen:
        for copy, source in TIED:
            assert torch.equal(scores[:, copy], scores[:, source])  # the forced ties are exact
    ties = sum(_boundary_ties(scores, moe.top_k) for scores in seen)
    assert ties > 0, "no tie at the top-k boundary: the test would pass vacuously"

    ranking = reversed_ranking(moe.num_layers, moe.num_experts)
    handle = moepatch.apply(model, {"c2r": {"top_t": moe.num_experts - 1, "collaborative_list": ranking}})
    assert handle.c2r_routers == [f"{layer.name}.{moe.family.router_attr}" for layer in moe.layers]
    got = logits_of(model, batch)
    assert got.dtype == reference.dtype and torch.equal(got, reference), f"{ties} boundary ties"


# ---------------------------------------------------------------- the selection functions against a reference
def _tied_scores(tokens: int, num_experts: int, dtype: torch.dtype, seed: int) -> torch.Tensor:
    """Scores drawn from three exactly representable values: ties everywhere, at the maximum and at the cut."""
    generator = torch.Generator().manual_seed(seed)
    return (torch.randint(0, 3, (tokens, num_experts), generator=generator).float() / 4).to(dtype)


def reference_selection(scores: torch.Tensor, ranking: list[list[int]], top_t: int, k: int, m: int) -> list[list[int]]:
    """The C2R rule token by token: top-1 = the first maximal expert; the others = the best of its first ``top_t``
    collaborators, ties broken by the family's ``torch.topk(·, m, dim=-1)`` over a score row that keeps expert-index
    order (the experts outside the allowed set scored ``-inf``); the top-1 put first if that call left it out of the
    ``k`` selected columns (more than ``k`` allowed experts tied at the maximum)."""
    chosen = []
    for row in scores.tolist():
        first = row.index(max(row))
        allowed = {first, *ranking[first][:top_t]}
        masked = [value if expert in allowed else float("-inf") for expert, value in enumerate(row)]
        picked = torch.topk(torch.tensor([masked], dtype=scores.dtype), m, dim=-1).indices[0].tolist()
        chosen.append(picked if first in picked[:k] else [first] + picked[: m - 1])
    return chosen


def _check_official_rule(scores: torch.Tensor, indices: torch.Tensor, values: torch.Tensor,
                         ranking: list[list[int]], top_t: int, k: int) -> tuple[int, int]:
    """Tie-free facts of the rule per token: the first ``k`` columns hold the top-1 expert, every column holds it or
    one of its first ``top_t`` collaborators, and the scores are the top-1's then the best collaborators', best first.
    Returns (tokens tied at the cut, tokens with more than ``k`` allowed experts tied at the maximum)."""
    boundary = crowded = 0
    m = indices.shape[1]
    for row, got, got_values in zip(scores.tolist(), indices.tolist(), values.tolist(), strict=True):
        first = row.index(max(row))
        others = ranking[first][:top_t]
        best = sorted((row[e] for e in others), reverse=True)
        assert first in got[:k] and len(set(got)) == m and set(got) - {first} <= set(others)
        assert [row[e] for e in got] == [row[first]] + best[: m - 1]
        assert got_values == [row[e] for e in got]
        boundary += len(best) >= k and best[k - 2] == best[k - 1]
        crowded += sum(value == row[first] for value in best) >= k
    return boundary, crowded


SMALL_T = [(8, 2, 1), (8, 2, 3), (8, 4, 3), (8, 4, 5), (16, 2, 6), (16, 4, 9), (64, 4, 10)]


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize(("num_experts", "top_k", "top_t"), SMALL_T, ids=[f"E{e}-k{k}-T{t}" for e, k, t in SMALL_T])
def test_constrained_topk_with_ties_equals_reference(num_experts, top_k, top_t, dtype):
    ranking = tiny.random_collaborative_list(1, num_experts, seed=top_t)[0]
    allowed = allowed_table(torch.tensor([row[:top_t] for row in ranking]), num_experts)
    scores = _tied_scores(2000, num_experts, dtype, seed=num_experts + top_k)
    values, indices = constrained_topk(scores, top_k, allowed)
    assert values.dtype == dtype and indices.dtype == torch.int64
    boundary, crowded = _check_official_rule(scores, indices, values, ranking, top_t, top_k)
    if top_t >= top_k:  # (top_t = k - 1: no choice left) ties at the cut and at the maximum were exercised
        assert boundary > 0 and crowded > 0
    assert indices.tolist() == reference_selection(scores, ranking, top_t, top_k, top_k)

    # ties never follow list order: another order of the same first top_t entries chooses the same experts
    shuffled = [row[:top_t][::-1] + row[top_t:] for row in ranking]
    again = constrained_topk(scores, top_k, allowed_table(torch.tensor([row[:top_t] for row in shuffled]),
                                                          num_experts))
    assert torch.equal(again[1], indices) and torch.equal(again[0], values)


LLAMA_T = [(8, 2, 2), (8, 2, 5), (8, 4, 6), (16, 4, 9)]


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize(("num_experts", "top_k", "top_t"), LLAMA_T, ids=[f"E{e}-k{k}-T{t}" for e, k, t in LLAMA_T])
def test_llama_moe_rule_with_ties_equals_reference(num_experts, top_k, top_t, dtype):
    ranking = tiny.random_collaborative_list(1, num_experts, seed=top_t)[0]
    candidates = torch.tensor([row[:top_t] for row in ranking])
    logits = _tied_scores(2000, num_experts, dtype, seed=num_experts * top_k) - 0.25
    values, indices = constrained_top_k_plus_one(logits, top_k, candidates, top_t, allowed_table(candidates,
                                                                                                 num_experts))
    boundary, crowded = _check_official_rule(logits, indices, values, ranking, top_t, top_k)
    assert boundary > 0 and crowded > 0
    assert indices.tolist() == reference_selection(logits, ranking, top_t, top_k, top_k + 1)
    built_here = constrained_top_k_plus_one(logits, top_k, candidates, top_t)  # table built from the candidates
    assert torch.equal(built_here[0], values) and torch.equal(built_here[1], indices)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize(("num_experts", "top_k"), [(8, 1), (8, 2), (8, 4), (60, 4), (64, 8)])
def test_full_table_is_the_family_topk_call_ties_included(num_experts, top_k, dtype):
    """top_t = E - 1: every expert allowed, so the result is torch.topk's own, even with > k tied maxima."""
    ranking = reversed_ranking(1, num_experts)[0]
    candidates = torch.tensor([row[: num_experts - 1] for row in ranking])
    allowed = allowed_table(candidates, num_experts)
    assert bool(allowed.all())
    scores = torch.cat([_tied_scores(500, num_experts, dtype, seed=top_k), torch.zeros(4, num_experts, dtype=dtype)])
    want_values, want_indices = torch.topk(scores, top_k, dim=-1)  # probs_top_k families
    values, indices = constrained_topk(scores, top_k, allowed)
    assert torch.equal(indices, want_indices) and torch.equal(values, want_values)
    maxima = (scores == scores.max(dim=-1, keepdim=True).values).sum(dim=-1)  # [N] experts tied at the maximum
    assert (maxima > top_k).any() and _boundary_ties(scores, top_k) > 0
    if top_k < num_experts - 1:  # LLaMA-MoE: the gate's logits.topk(min(k + 1, E), dim=1)
        want_values, want_indices = scores.topk(top_k + 1, dim=1)
        values, indices = constrained_top_k_plus_one(scores, top_k, candidates, num_experts - 1, allowed)
        assert torch.equal(indices, want_indices) and torch.equal(values, want_values)


def test_allowed_table_marks_the_expert_and_its_first_top_t():
    candidates = torch.tensor([[2, 1], [0, 3], [3, 0], [1, 2]])
    want = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 1], [1, 0, 1, 1], [0, 1, 1, 1]], dtype=torch.bool)
    assert torch.equal(allowed_table(candidates, 4), want)


def test_c2r_buffers_are_built_once_and_never_saved():
    model = tiny.tiny_model("mixtral")
    moe = describe(model)
    ranking = tiny.random_collaborative_list(moe.num_layers, 8, 3)
    handle = moepatch.apply(model, {"c2r": {"top_t": 3, "collaborative_list": ranking}})
    router = moe.layers[0].router
    allowed = router.c2r_allowed
    assert allowed.dtype == torch.bool and allowed.shape == (8, 8)
    for expert in range(8):
        assert allowed[expert].nonzero().flatten().tolist() == sorted([expert, *ranking[0][expert][:3]])
    with torch.no_grad():
        model(**tiny.demo_batch())
    assert router.c2r_allowed is allowed  # not rebuilt per forward
    assert not any("c2r_" in name for name in model.state_dict())
    handle.remove()
    assert not any("c2r_" in name for name, _ in model.named_buffers())
