"""LoRA / (IA)³ experts (MoLoRA, MoV, MoLA / GuiLoMo) on every family, checked against independent computations."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

import moepatch
from moepatch.lora_experts.balance import router_balance_loss
from moepatch.lora_experts.layers import LoraExperts
from moepatch.lora_experts.layers import VectorExperts
from moepatch.lora_experts.routed import RoutedExpertSets
from moepatch.testing import tiny
from tests import family_facts

METHODS = {  # routed experts included: these tests mean every kind of projection
    "molora": {"method": "molora", "num_experts": 3, "r": 4, "routed_experts": True},
    "mov": {"method": "mov", "num_experts": 3, "routed_experts": True},
    "mola": {"method": "mola", "num_experts": 4, "top_k": 2, "r": 4, "balance_loss": True, "routed_experts": True},
}


def _labels(batch: dict) -> torch.Tensor:
    return batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)


def _lora_sets(model: torch.nn.Module) -> list[torch.nn.Module]:
    return [m for m in model.modules() if isinstance(m, (LoraExperts, VectorExperts))]


@pytest.mark.parametrize("method", sorted(METHODS))
def test_fresh_injection_is_bit_identical_and_reaches_routed_experts(family, method):
    model = tiny.tiny_model(family)
    batch = tiny.demo_batch()
    with torch.no_grad():
        reference = model(**batch).logits
    handle = moepatch.apply(model, {"lora_experts": METHODS[method]})
    with torch.no_grad():
        patched = model(**batch).logits
    assert torch.equal(reference, patched)
    assert any(isinstance(m, RoutedExpertSets) for m in model.modules())  # the routed experts are adapted too
    assert handle.lora_targets
    handle.remove()
    assert not _lora_sets(model) and all(p.requires_grad for p in model.parameters())
    with torch.no_grad():
        assert torch.equal(model(**batch).logits, reference)


@pytest.mark.parametrize("method", sorted(METHODS))
def test_training_changes_only_the_experts(family, method):
    model = tiny.tiny_model(family).train()
    moepatch.apply(model, {"lora_experts": METHODS[method]})
    base = {name: p.detach().clone() for name, p in model.named_parameters() if ".lora_experts." not in name}
    experts = {name: p.detach().clone() for name, p in model.named_parameters() if ".lora_experts." in name}
    assert all(not p.requires_grad for name, p in model.named_parameters() if name in base)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.0)
    batch = tiny.demo_batch()
    touched = set()
    for _ in range(3):
        loss = model(**batch, labels=_labels(batch)).loss
        loss.backward()
        touched |= {name for name, p in model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
        optimizer.step()
        optimizer.zero_grad()
    after = dict(model.named_parameters())
    assert all(torch.equal(value, after[name]) for name, value in base.items())
    changed = {name for name, value in experts.items() if not torch.equal(value, after[name])}
    assert touched <= set(experts) and changed <= touched  # only the experts get gradients; only they move
    assert len(changed) >= len(touched) // 2 and any("router" in name for name in changed)


def _reference_router(x: torch.Tensor, weight: torch.Tensor, top_k: int | None):
    probs = torch.softmax(x.double() @ weight.double().T, dim=-1)
    if top_k is None:
        return probs, None
    values, indices = probs.topk(top_k, dim=-1)
    dense = torch.zeros_like(probs).scatter(-1, indices, values / values.sum(-1, keepdim=True))
    return dense, indices


@pytest.mark.parametrize("top_k", [None, 1, 2, 3])
def test_mixture_equals_the_explicit_sum_over_experts(top_k):
    torch.manual_seed(0)
    layer = LoraExperts(12, 7, [2, 5, 3, 4], top_k=top_k, alpha=8.0)
    for b in layer.lora_B:
        torch.nn.init.normal_(b)  # B = 0 at init; make every expert count
    x = torch.randn(2, 9, 12)
    weights, indices = _reference_router(x, layer.router.weight, top_k)
    expected = torch.zeros(2, 9, 7, dtype=torch.float64)
    for e, rank in enumerate(layer.ranks):
        delta = (x.double() @ layer.lora_A[e].double().T) @ layer.lora_B[e].double().T * (8.0 / rank)
        expected += weights[..., e : e + 1] * delta
    torch.testing.assert_close(layer(x).double(), expected, atol=1e-5, rtol=1e-5)
    if top_k is not None:
        assert torch.equal(layer.router.last_indices.sort(-1).values, indices.sort(-1).values)


def test_vector_experts_equal_the_published_form():
    torch.manual_seed(0)
    layer = VectorExperts(6, 3)
    torch.nn.init.normal_(layer.delta)
    t = torch.randn(4, 6)
    probs, _ = _reference_router(t, layer.router.weight, None)
    expected = t.double() * (probs @ layer.vectors().double())  # t ⊙ Σ p_e v_e
    torch.testing.assert_close(layer(t).double(), expected, atol=1e-6, rtol=1e-6)


def _rows_per_routed_expert(received: list[tuple], num_experts: int) -> list[torch.Tensor]:
    """From the calls of one RoutedExpertSets (rows, expert_ids, ends, tokens, only): the rows of each routed expert."""
    rows = [[] for _ in range(num_experts)]
    for args in received:
        x, expert_ids, only = args[0], args[1], args[4] if len(args) > 4 else None
        for e in range(num_experts):
            rows[e].append(x if only == e else x[:0] if only is not None else x[expert_ids == e])
    return [torch.cat(r) if r else torch.empty(0) for r in rows]


def test_routed_expert_sets_see_exactly_the_routers_tokens(family):
    """Rows reaching routed expert e's LoRA set are the hidden states of the tokens the base router sent to e
    (grouped storages hand all rows with each row's routed expert; one-expert storages the rows of one)."""
    model = tiny.tiny_model(family)
    moepatch.apply(model, {"lora_experts": {"method": "molora", "num_experts": 2, "r": 2, "routed_experts": True}})
    batch = tiny.demo_batch()
    router_inputs, received = {}, {}
    routers = family_facts.moe_routers(model)
    handles = [router.register_forward_pre_hook(lambda m, a, layer=layer: router_inputs.__setitem__(layer, a[0]))
               for layer, router in routers.items()]
    first_sets = {}
    for name, module in model.named_modules():
        if isinstance(module, RoutedExpertSets) and (name.endswith("gate_proj") or name.endswith("mlpf.experts."
                                                                                                   "lora_experts")):
            layer = int(name.split(".")[2])
            first_sets[layer] = module
            handles.append(module.register_forward_pre_hook(
                lambda m, a, layer=layer: received.setdefault(layer, []).append(a)))
    with torch.no_grad():
        model(**batch)
    for handle in handles:
        handle.remove()
    k = family_facts.experts_and_top_k(model)[1]
    direction = torch.randn(model.config.hidden_size, dtype=torch.float64)
    for layer, router in routers.items():
        hidden = router_inputs[layer].reshape(-1, router_inputs[layer].shape[-1])
        scores = family_facts.router_logits(model, router, hidden)
        chosen = scores.topk(k, dim=-1).indices
        per_expert = _rows_per_routed_expert(received[layer], len(first_sets[layer].sets))
        for e in range(len(first_sets[layer].sets)):
            tokens = (chosen == e).any(dim=-1).nonzero().flatten()
            got = per_expert[e].reshape(-1, hidden.shape[-1])
            assert got.shape[0] == tokens.numel(), (layer, e)
            torch.testing.assert_close((got.double() @ direction).sort().values,
                                       (hidden[tokens].double() @ direction).sort().values)


def test_balance_loss_equals_independent_switch_loss_without_padding():
    model = tiny.tiny_model("qwen2_moe").train()
    moepatch.apply(model, {"lora_experts": {"method": "mola", "num_experts": 4, "top_k": 2, "r": 2,
                                            "target_modules": ["q_proj", "v_proj"],
                                            "balance_loss": {"coef": 0.01, "reduction": "mean"}}})
    inputs = {}
    for name, module in model.named_modules():
        if isinstance(module, LoraExperts):
            module.register_forward_pre_hook(lambda m, a, name=name: inputs.__setitem__(name, (m, a[0])))
    batch = tiny.demo_batch()
    output = model(**batch, labels=_labels(batch))
    lm = F.cross_entropy(output.logits[:, :-1].reshape(-1, output.logits.shape[-1]), _labels(batch)[:, 1:].reshape(-1))
    mask = batch["attention_mask"].reshape(-1).bool()
    terms = []
    for module, x in inputs.values():
        probs = torch.softmax(x.reshape(-1, x.shape[-1]).double() @ module.router.weight.double().T, dim=-1)[mask]
        chosen = probs.topk(2, dim=-1).indices
        share = torch.stack([(chosen == e).sum() for e in range(4)]).double() / (chosen.numel())
        terms.append(4 * (share * probs.mean(dim=0)).sum())
    expected = 0.01 * torch.stack(terms).mean()
    assert len(terms) == 8 and (batch["attention_mask"] == 0).any()  # q and v of 4 layers; the batch has padding
    torch.testing.assert_close((output.loss - lm).double(), expected, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(model.lora_experts_aux["balance_loss"].double(), torch.stack(terms).mean(),
                               atol=1e-6, rtol=1e-5)


def test_router_balance_loss_function_masks_padding():
    logits = torch.tensor([[2.0, 0.0, 0.0], [0.0, 3.0, 0.0], [9.0, 9.0, -9.0]])
    indices = logits.topk(1, dim=-1).indices
    masked = router_balance_loss(logits, indices, torch.tensor([True, True, False]))
    probs = logits[:2].double().softmax(-1)
    expected = 3 * ((torch.tensor([0.5, 0.5, 0.0], dtype=torch.float64)) * probs.mean(0)).sum()
    torch.testing.assert_close(masked.double(), expected)


def test_per_layer_lists_and_guilomo_files_shape_the_parameters(tmp_path):
    """MoLA lists per layer; GuiLoMo expert.json (per module) and rank.json (per expert) in the official key format."""
    checkpoint = tiny.save_tiny_checkpoint(tmp_path / "ckpt", "qwen2_moe")
    modules = [f"model.layers.{i}.self_attn.{p}" for i in range(4) for p in ("q_proj", "v_proj")]
    experts = {module: 2 + (i % 3) for i, module in enumerate(modules)}
    ranks = {f"{module}.expertlora_E_vector_{e}": 1 + (i + e) % 8 for i, module in enumerate(modules)
             for e in range(8)}  # rank.json lists all stage-1 experts; only the first expert.json[module] are used
    (checkpoint / "expert.json").write_text(json.dumps(experts, indent=4))
    (checkpoint / "rank.json").write_text(json.dumps(ranks, indent=4))
    config = json.loads((checkpoint / "config.json").read_text())
    config["moepatch"] = {"lora_experts": {"method": "mola", "target_modules": ["q_proj", "v_proj"],
                                           "num_experts": "expert.json", "r": "rank.json", "top_k": [1, 2, 2, 2]}}
    (checkpoint / "config.json").write_text(json.dumps(config))
    model = moepatch.from_pretrained(checkpoint)
    for module in modules:
        layer = model.get_submodule(module).lora_experts
        assert layer.num_experts == experts[module]
        assert [a.shape[0] for a in layer.lora_A] == [ranks[f"{module}.expertlora_E_vector_{e}"]
                                                      for e in range(experts[module])]
        assert [b.shape[1] for b in layer.lora_B] == layer.ranks
        assert layer.router.weight.shape == (experts[module], 32)
        assert layer.router.top_k == (1 if ".layers.0." in module else 2)

    mola = tiny.tiny_model("qwen2_moe")
    moepatch.apply(mola, {"lora_experts": {"method": "mola", "target_modules": ["o_proj"], "num_experts": [2, 4, 6, 8],
                                           "r": [1, 2, 3, 4], "top_k": 2}})
    for i in range(4):
        layer = mola.model.layers[i].self_attn.o_proj.lora_experts
        assert layer.num_experts == 2 * (i + 1) and set(layer.ranks) == {i + 1}


def test_save_and_load_round_trip(tmp_path, family):
    checkpoint = tiny.save_tiny_checkpoint(tmp_path / "ckpt", family,
                                           moepatch={"lora_experts": METHODS["mola"]})
    model = moepatch.from_pretrained(checkpoint).train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    batch = tiny.demo_batch()
    for _ in range(2):
        model(**batch, labels=_labels(batch)).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.eval()
    with torch.no_grad():
        reference = model(**batch).logits
    model.save_pretrained(tmp_path / "trained")
    reloaded = moepatch.from_pretrained(tmp_path / "trained")
    with torch.no_grad():
        assert torch.equal(reloaded(**batch).logits, reference)
    from transformers import AutoModelForCausalLM

    if family not in ("llama_moe", "moduleformer"):  # the base weights alone load in plain transformers
        plain = AutoModelForCausalLM.from_pretrained(tmp_path / "trained")
        assert not _lora_sets(plain)


def test_saved_files_and_merge_refusal(tmp_path):
    from safetensors.torch import load_file

    from moepatch.lora_experts import save_lora_experts
    from moepatch.tools.lora_experts import merge_into_base

    model = tiny.tiny_model("mixtral", moepatch={"lora_experts": METHODS["molora"]})
    moepatch.apply(model)
    for name, p in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.1)
    batch = tiny.demo_batch()
    with torch.no_grad():
        reference = model(**batch).logits
    model.save_pretrained(tmp_path)  # Mixtral: transformers renames keys on save; the experts keep theirs
    saved = json.loads((tmp_path / "config.json").read_text())["moepatch"]["lora_experts"]
    assert saved["weights"] == "lora_experts.safetensors"
    assert not any(".lora_experts." in key for key in load_file(str(tmp_path / "model.safetensors")))
    assert set(load_file(str(tmp_path / "lora_experts.safetensors"))) == {
        name for name, _ in model.named_parameters() if ".lora_experts." in name}
    reloaded = moepatch.from_pretrained(tmp_path)
    with torch.no_grad():
        assert torch.equal(reloaded(**batch).logits, reference)
    adapter_only = save_lora_experts(reloaded, tmp_path / "adapter")
    assert set(load_file(str(adapter_only))) == set(load_file(str(tmp_path / "lora_experts.safetensors")))
    with pytest.raises(ValueError, match="cannot be merged"):
        merge_into_base(reloaded)


@pytest.mark.parametrize(
    ("block", "message"),
    [
        ({"method": "moe"}, "lora_experts.method: expected one of"),
        ({"method": "mola", "top_k": None}, "MoLA routes top-k"),
        ({"method": "mov", "r": 4}, "MoV experts are (IA)³ vectors"),
        ({"method": "molora", "balance_loss": True}, "dense soft merge has no expert load"),
        ({"method": "mola", "num_experts": 2, "top_k": 3}, "top_k: 3 exceeds the 2 experts"),
        ({"method": "mola", "num_experts": [2, 2]}, "num_experts: 2 entries, the model has 4 layers"),
        ({"method": "mola", "target_modules": ["q_proj"], "num_experts": {"model.layers.0.self_attn.q_proj": 2}},
         "no entry for module 'model.layers.1.self_attn.q_proj'"),
        ({"method": "mola", "target_modules": ["q_proj"], "r": {"model.layers.0.self_attn.q_proj."
                                                                "expertlora_E_vector_0": 2}},
         "no rank for 'model.layers.0.self_attn.q_proj.expertlora_E_vector_1'"),
        ({"method": "molora", "target_modules": ["qproj"]}, "'qproj' matches no projection"),
        ({"method": "molora", "dropout": 1.5}, "dropout: expected a probability below 1"),
    ],
)
def test_bad_config_names_the_field_and_changes_nothing(block, message):
    model = tiny.tiny_model("qwen2_moe")
    before = {name: p.clone() for name, p in model.named_parameters()}
    with pytest.raises(ValueError, match=message.replace("(", "\\(").replace(")", "\\)").replace("[", "\\[")):
        moepatch.apply(model, {"lora_experts": block})
    assert {name for name, _ in model.named_parameters()} == set(before)
    assert all(p.requires_grad for p in model.parameters())


def test_routers_are_never_targeted_by_broad_names():
    model = tiny.tiny_model("qwen2_moe")
    handle = moepatch.apply(model, {"lora_experts": {"method": "molora", "target_modules": ["re:.*gate.*"],
                                                     "routed_experts": True}})
    assert not any(path.endswith("mlp.gate") or path.endswith("shared_expert_gate") for path in handle.lora_targets)
    assert any(path.endswith("experts.gate_proj") for path in handle.lora_targets)
    handle.remove()
    handle = moepatch.apply(model, {"lora_experts": {"method": "molora", "num_experts": 2,
                                                     "target_modules": ["model.layers.0.mlp.shared_expert_gate"]}})
    assert handle.lora_targets == ["model.layers.0.mlp.shared_expert_gate"]  # named by full path: adapted


def test_gradient_checkpointing(family):
    model = tiny.tiny_model(family).train()
    moepatch.apply(model, {"lora_experts": METHODS["mola"]})
    model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    batch = tiny.demo_batch()
    loss = model(**batch, labels=_labels(batch)).loss
    loss.backward()
    grads = [p.grad for name, p in model.named_parameters() if ".lora_experts." in name and p.grad is not None]
    assert grads and torch.isfinite(loss) and any(g.abs().sum() > 0 for g in grads)


@pytest.mark.parametrize("implementation", ["eager", "grouped_mm"])
def test_fused_experts_under_each_supported_implementation(implementation):
    """Bit-identical when fresh, and a trained delta equals the eager reference computed per expert by hand."""
    model = tiny.tiny_model("qwen2_moe")
    model.set_experts_implementation(implementation)
    batch = tiny.demo_batch()
    with torch.no_grad():
        reference = model(**batch).logits
    moepatch.apply(model, {"lora_experts": {"method": "molora", "num_experts": 2, "r": 2,
                                            "target_modules": ["mlp.experts.down_proj"]}})
    with torch.no_grad():
        assert torch.equal(model(**batch).logits, reference)
    experts = model.model.layers[0].mlp.experts
    for name, p in experts.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p)
    hidden = torch.randn(10, 32)
    top_k_index = torch.randint(0, 8, (10, 2))
    top_k_weights = torch.rand(10, 2)
    with torch.no_grad():
        got = experts(hidden, top_k_index, top_k_weights)
        expected = torch.zeros(10, 32, dtype=torch.float64)
        for t in range(10):
            for slot in range(2):
                e = int(top_k_index[t, slot])
                gate, up = (hidden[t].double() @ experts.gate_up_proj[e].double().T).chunk(2)
                inner = torch.nn.functional.silu(gate) * up
                lora = experts.lora_experts["down_proj"].sets[e]
                delta = lora(inner.float()[None])[0].double()
                expected[t] += top_k_weights[t, slot].double() * (inner @ experts.down_proj[e].double().T + delta)
    torch.testing.assert_close(got.double(), expected, atol=1e-4, rtol=1e-4)


def test_balance_loss_ignores_what_padding_tokens_are(family):
    """Right padding: real tokens never see the pads, so a loss that leaves padding out cannot depend on the pad ids."""
    model = tiny.tiny_model(family).train()
    moepatch.apply(model, {"lora_experts": {**METHODS["mola"], "balance_loss": {"coef": 1.0, "reduction": "sum"}}})
    batch = tiny.demo_batch()
    other = {key: value.clone() for key, value in batch.items()}
    other["input_ids"][batch["attention_mask"] == 0] = 7
    losses = []
    for inputs in (batch, other):
        torch.manual_seed(0)
        losses.append(model(**inputs, labels=_labels(inputs)).loss)
        aux = model.lora_experts_aux["balance_loss"]
        assert aux > 0
    torch.testing.assert_close(losses[0], losses[1], rtol=1e-5, atol=1e-5)  # pads only reorder expert rows


def test_combines_with_c2r_and_freezing_and_applies_idempotently():
    from moepatch.testing.tiny import random_collaborative_list

    block = {"c2r": {"top_t": 3, "collaborative_list": random_collaborative_list(4, 8, seed=2)},
             "freeze_gate": "router"}
    model = tiny.tiny_model("qwen2_moe")
    batch = tiny.demo_batch()
    moepatch.apply(model, block)
    with torch.no_grad():
        c2r_only = model(**batch).logits
    handle = moepatch.apply(model, {**block, "lora_experts": METHODS["mola"]})
    assert len(handle.c2r_routers) == 3 and handle.frozen_parameters and handle.lora_targets
    with torch.no_grad():
        assert torch.equal(model(**batch).logits, c2r_only)  # fresh experts change nothing, C2R still routes
    assert moepatch.apply(model, {**block, "lora_experts": METHODS["mola"]}) is handle  # same config: same handle
    handle.remove()
    assert not _lora_sets(model)
