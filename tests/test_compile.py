"""torch.compile readiness: C2R, routing statistics and LoRA experts on attention and on the routed experts together
trace into one graph, compile for forward and training, and the routed experts' sets never synchronise with the host.
"""

from __future__ import annotations

import warnings

import pytest
import torch
import torch._dynamo

import moepatch
from moepatch.lora_experts.grouped import _blockwise
from moepatch.lora_experts.grouped import exact_grouped_matmul
from moepatch.lora_experts.grouped import grouped_matmul
from moepatch.lora_experts.grouped import kernel_runs
from moepatch.lora_experts.routed import RoutedExpertSets
from moepatch.testing import tiny

ROUTED = ["q_proj", "v_proj", "mlp.experts.gate_proj", "mlp.experts.up_proj", "mlp.experts.down_proj"]
BLOCKS = {
    "mola": {"c2r": {"top_t": 3, "collaborative_list": tiny.random_collaborative_list(4, 8, seed=2)},
             "routing_stats": True,
             "lora_experts": {"method": "mola", "num_experts": 4, "top_k": 2, "r": 2, "target_modules": ROUTED}},
    "mov": {"routing_stats": True,
            "lora_experts": {"method": "mov", "num_experts": 4, "target_modules": ["v_proj", "mlp.experts.down_proj"]}},
}


def _patched(block: dict) -> torch.nn.Module:
    torch.manual_seed(0)
    model = tiny.tiny_model("qwen2_moe")
    handle = moepatch.apply(model, block)
    with torch.no_grad():  # trained-looking experts: B and δ away from zero, so the deltas matter
        for name, parameter in model.named_parameters():
            if "lora_B" in name or name.endswith(".delta"):
                parameter.normal_(std=0.05)
    model.handle = handle
    return model


def _labels(batch: dict) -> torch.Tensor:
    return batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)


@pytest.mark.parametrize("training", [False, True])
@pytest.mark.parametrize("block", sorted(BLOCKS))
def test_explain_finds_no_graph_break(block, training):
    """C2R + routing_stats + LoRA experts on attention and on the routed experts: one graph, no break (in training
    too: MoLA's per-expert dropout masks and the balance loss)."""
    model = _patched(BLOCKS[block]).train(training)
    assert any(isinstance(m, RoutedExpertSets) for m in model.modules())
    torch._dynamo.reset()
    batch = tiny.demo_batch()
    # called as torch.compile(model) calls it: the model's forward hooks (the LoRA experts' losses) in the same frame
    explained = torch._dynamo.explain(lambda **kwargs: model(**kwargs, labels=_labels(batch)))(**batch)
    reasons = [str(reason.reason).splitlines()[0] for reason in explained.break_reasons]
    assert explained.graph_break_count == 0, reasons
    assert explained.graph_count == 1


def test_compiled_forward_and_training_step_equal_eager():
    block = {**BLOCKS["mola"], "lora_experts": {**BLOCKS["mola"]["lora_experts"], "dropout": 0.0}}  # same function
    batch = tiny.demo_batch()
    eager, compiled = _patched(block).train(), _patched(block).train()
    runs = {}
    for name, model in (("eager", eager), ("compiled", compiled)):
        torch._dynamo.reset()
        forward = torch.compile(model, fullgraph=True, backend="aot_eager") if name == "compiled" else model
        output = forward(**batch, labels=_labels(batch))
        output.loss.backward()
        grads = {key: p.grad.clone() for key, p in model.named_parameters() if p.grad is not None}
        runs[name] = (output.logits.detach(), output.loss.detach(), grads, model.handle.recorder.counts)
    (logits, loss, grads, counts), (c_logits, c_loss, c_grads, c_counts) = runs["eager"], runs["compiled"]
    torch.testing.assert_close(c_logits, logits, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(c_loss, loss, atol=1e-5, rtol=1e-5)
    assert set(c_grads) == set(grads) and any(".sets." in key for key in grads)  # routed sets are trained
    for key, grad in grads.items():
        torch.testing.assert_close(c_grads[key], grad, atol=1e-4, rtol=1e-3, msg=key)
    assert torch.equal(c_counts, counts) and counts.sum() > 0  # statistics counted once, exactly, when compiled


class _HostSyncCounter:
    """Counts calls of the tensor methods that read device data back to the host."""

    NAMES = ("tolist", "item", "cpu")

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.calls: list[str] = []
        for name in self.NAMES:
            original = getattr(torch.Tensor, name)
            monkeypatch.setattr(torch.Tensor, name, self._counting(name, original))

    def _counting(self, name, original):
        def method(tensor, *args, **kwargs):
            self.calls.append(name)
            return original(tensor, *args, **kwargs)

        return method


@pytest.mark.parametrize("kind", ["molora", "mola", "mov"])
def test_routed_expert_sets_never_read_back_to_the_host(kind, monkeypatch):
    """The routed experts' sets in eager mode (grouped storage: fused experts under grouped_mm) call no
    ``tolist`` / ``item`` / ``cpu``; the base model without them is the reference count (transformers' own calls)."""
    lora = {"molora": {"method": "molora", "num_experts": 2, "r": 2},
            "mola": {"method": "mola", "num_experts": 4, "top_k": 2, "r": 2},
            "mov": {"method": "mov", "num_experts": 4}}[kind]
    targets = ["mlp.experts.down_proj"] if kind == "mov" else ["mlp.experts.gate_proj", "mlp.experts.down_proj"]
    batch = tiny.demo_batch()
    counts = []
    for block in ({}, {"lora_experts": {**lora, "target_modules": targets}}):
        model = _patched(block)
        model(**batch)  # warm-up: lazy initialisation outside the counted call
        counter = _HostSyncCounter(monkeypatch)
        model(**batch)
        counts.append(counter.calls)
        monkeypatch.undo()
    assert counts[1] == counts[0]


@pytest.mark.parametrize("kind", ["molora", "mola", "mov"])
def test_routed_expert_sets_compile_with_fullgraph(kind):
    """The experts module alone (no transformers wrapper around it): ``fullgraph=True`` compiles and agrees."""
    lora = {"molora": {"method": "molora", "num_experts": 2, "r": 2},
            "mola": {"method": "mola", "num_experts": 4, "top_k": 2, "r": 2},
            "mov": {"method": "mov", "num_experts": 4}}[kind]
    model = _patched({"lora_experts": {**lora, "target_modules": ["mlp.experts.down_proj"]}})
    experts = model.model.layers[0].mlp.experts
    hidden = torch.randn(12, 32)
    index = torch.randint(0, 8, (12, 2))
    weights = torch.rand(12, 2)
    torch._dynamo.reset()
    compiled = torch.compile(experts, fullgraph=True, backend="aot_eager")
    with torch.no_grad():
        torch.testing.assert_close(compiled(hidden, index, weights), experts(hidden, index, weights), atol=1e-5,
                                   rtol=1e-5)


def _reference_grouped(rows: torch.Tensor, weight: torch.Tensor, groups: torch.Tensor) -> torch.Tensor:
    return torch.stack([rows[i].double() @ weight[groups[i]].double() for i in range(rows.shape[0])])


@pytest.mark.parametrize(("fan_in", "fan_out"), [(8, 4), (4, 12), (32, 3)])
def test_grouped_matmul_equals_a_product_per_row(fan_in, fan_out):
    """Both paths (torch's kernel where it runs, the blockwise product always), empty groups included."""
    torch.manual_seed(0)
    groups = torch.tensor([0, 0, 0, 2, 2, 3, 3, 3, 3])  # group 1 is empty
    ends = torch.tensor([3, 3, 5, 9], dtype=torch.int32)
    rows, weight = torch.randn(9, fan_in), torch.randn(4, fan_in, fan_out)
    expected = _reference_grouped(rows, weight, groups)
    torch.testing.assert_close(_blockwise(rows, weight, groups).double(), expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(grouped_matmul(rows, weight, ends, groups).double(), expected, atol=1e-5, rtol=1e-5)
    assert kernel_runs(rows, weight) == (fan_out % 4 == 0 and fan_in % 4 == 0 and hasattr(torch, "_grouped_mm"))


@pytest.mark.parametrize(("fan_in", "fan_out", "dtype"), [(8, 4, torch.float32), (32, 3, torch.float32),
                                                         (8, 4, torch.float64)])
def test_exact_grouped_matmul_equals_a_product_per_row_and_compiles(fan_in, fan_out, dtype):
    """The top-k LoRA experts' product: the kernel, or transformers' fallback operator (odd widths, float64), which
    ``torch.compile`` keeps in one graph."""
    torch.manual_seed(0)
    groups = torch.tensor([0, 0, 0, 2, 2, 3, 3, 3, 3])
    ends = torch.tensor([3, 3, 5, 9], dtype=torch.int32)
    rows, weight = torch.randn(9, fan_in, dtype=dtype), torch.randn(4, fan_in, fan_out, dtype=dtype)
    expected = _reference_grouped(rows, weight, groups)
    torch.testing.assert_close(exact_grouped_matmul(rows, weight, ends).double(), expected, atol=1e-5, rtol=1e-5)
    torch._dynamo.reset()
    compiled = torch.compile(exact_grouped_matmul, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(rows, weight, ends).double(), expected, atol=1e-5, rtol=1e-5)


def _sets(kind: str, num: int = 3) -> RoutedExpertSets:
    from moepatch.lora_experts.layers import LoraExperts
    from moepatch.lora_experts.layers import VectorExperts

    torch.manual_seed(1)
    if kind == "mov":
        sets = [VectorExperts(8, 4) for _ in range(num)]
        for expert_set in sets:
            torch.nn.init.normal_(expert_set.delta)
        return RoutedExpertSets(sets, "input")
    ranks = [[2, 2, 2], [2, 2, 2], [2, 2, 2]] if kind != "uneven" else [[2, 2, 2], [1, 3, 2], [4, 4, 4]]
    top_k = None if kind == "dense" else 2
    sets = [LoraExperts(8, 12, r, top_k=top_k) for r in ranks[:num]]
    for expert_set in sets:
        for b in expert_set.lora_B:
            torch.nn.init.normal_(b)
    return RoutedExpertSets(sets, "output")


def _reference_set(expert_set: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """One set's published formula, in float64: LoRA ``Σ_n w_n (α/r_n) B_n A_n x`` or MoV ``x ⊙ Σ_n p_n v_n``."""
    router = expert_set.router
    probs = torch.softmax(x.double() @ router.weight.double().T, dim=-1)
    if router.top_k is not None:
        values, indices = probs.topk(router.top_k, dim=-1)
        probs = torch.zeros_like(probs).scatter(-1, indices, values / values.sum(-1, keepdim=True))
    if hasattr(expert_set, "delta"):
        return x.double() * (probs @ (1 + expert_set.delta.double()))
    out = torch.zeros(x.shape[0], expert_set.out_features, dtype=torch.float64)
    for n, (a, b) in enumerate(zip(expert_set.lora_A, expert_set.lora_B, strict=True)):
        out += probs[:, n : n + 1] * (expert_set.scaling[n] * (x.double() @ a.double().T @ b.double().T))
    return out


@pytest.mark.parametrize("kind", ["dense", "topk", "mov", "uneven"])
def test_grouped_sets_equal_each_set_on_its_rows(kind):
    """Grouped over routed experts (stacked, or one after another for sets of different shapes) = each set's own
    formula on its rows; every set gets a gradient node (also the set of an expert without rows); each router keeps
    exactly its rows for the balance loss."""
    sets = _sets(kind)
    assert sets.stackable == (kind != "uneven")
    groups = torch.tensor([0, 0, 0, 0, 2, 2, 2])  # routed expert 1 got no row
    ends = torch.tensor([4, 4, 7], dtype=torch.int32)
    tokens = torch.tensor([5, 1, 0, 3, 2, 4, 6])
    rows = torch.randn(7, 8)
    got = sets.grouped(rows, groups, ends, tokens)
    expected = torch.cat([_reference_set(sets.sets[e], rows[groups == e]) for e in range(3)])
    torch.testing.assert_close(got.double(), expected, atol=1e-5, rtol=1e-5)
    got.square().sum().backward()
    for e, expert_set in enumerate(sets.sets):
        grads = [p.grad for p in expert_set.parameters()]
        assert all(g is not None for g in grads), e
        assert (sum(g.abs().sum() for g in grads) > 0) == (e != 1)
        router = expert_set.router
        if sets.stackable:
            assert torch.equal(router.last_logits[router.last_rows],
                               rows[groups == e].float() @ router.weight.float().T)
            assert torch.equal(router.last_tokens[router.last_rows], tokens[groups == e])
        else:
            assert torch.equal(router.last_tokens, tokens[groups == e])


def test_balance_loss_of_routed_sets_counts_each_sets_own_rows():
    """Per routed expert, the Switch term over exactly its rows (padding left out), as an independent sum."""
    model = tiny.tiny_model("qwen2_moe").train()
    moepatch.apply(model, {"lora_experts": {"method": "mola", "num_experts": 4, "top_k": 2, "r": 2,
                                            "target_modules": ["mlp.experts.down_proj"],
                                            "balance_loss": {"coef": 1.0, "reduction": "sum"}}})
    captured = []
    for module in model.modules():
        if isinstance(module, RoutedExpertSets):
            module.register_forward_pre_hook(lambda m, a: captured.append((m, a[0], a[1], a[3])))
    batch = tiny.demo_batch()
    model(**batch, labels=_labels(batch))
    real = batch["attention_mask"].reshape(-1).bool()
    terms = []
    for module, rows, groups, tokens in captured:
        for e, expert_set in enumerate(module.sets):
            mine = (groups == e) & real[tokens]
            if not mine.any():
                terms.append(torch.zeros((), dtype=torch.float64))
                continue
            probs = torch.softmax(rows[mine].double() @ expert_set.router.weight.double().T, dim=-1)
            chosen = probs.topk(2, dim=-1).indices
            share = torch.stack([(chosen == n).sum() for n in range(4)]).double() / chosen.numel()
            terms.append(4 * (share * probs.mean(dim=0)).sum())
    assert len(captured) == 3 and len(terms) == 3 * 8 and (batch["attention_mask"] == 0).any()  # 3 MoE layers
    torch.testing.assert_close(model.lora_experts_aux["balance_loss"].double(), torch.stack(terms).sum(), atol=1e-5,
                               rtol=1e-5)


def test_recorder_compiles_with_fullgraph_and_counts_as_eager():
    from moepatch.errors import MoePatchWarning

    batch = tiny.demo_batch()
    eager, compiled = _patched({"routing_stats": True}), _patched({"routing_stats": True})
    torch._dynamo.reset()
    with warnings.catch_warnings():
        warnings.simplefilter("error", MoePatchWarning)
        torch.compile(compiled, fullgraph=True, backend="aot_eager")(**batch)
        eager(**batch)
    recorders = eager.handle.recorder, compiled.handle.recorder
    assert torch.equal(recorders[1].counts, recorders[0].counts) and recorders[0].counts.sum() > 0
    torch.testing.assert_close(recorders[1].prob_sums, recorders[0].prob_sums)
    assert torch.equal(recorders[1].tokens, recorders[0].tokens)
