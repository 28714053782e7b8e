"""Parity of the LoRA-expert balance loss and GuiLoMo stage 1 with the official code (MoLA: Gao et al., 2024;
GuiLoMo: Zhang et al., 2025), each checked against an independent computation written here."""

from __future__ import annotations

import re

import pytest
import torch

import moepatch
from moepatch.cli import build_parser
from moepatch.cli.allocate import search_recipe
from moepatch.lora_experts.layers import LoraExperts
from moepatch.lora_experts.routed import RoutedExpertSets
from moepatch.testing import tiny
from moepatch.tools.lora_experts.guilomo import SearchLoraExperts
from moepatch.tools.lora_experts.guilomo import SearchRecipe
from moepatch.tools.lora_experts.guilomo import build_optimizers
from moepatch.tools.lora_experts.guilomo import export_allocation
from moepatch.tools.lora_experts.guilomo import search_config
from moepatch.tools.lora_experts.guilomo import to_search_layers
from moepatch.tools.lora_experts.guilomo import write_allocation

LAYER = re.compile(r"\.layers\.(\d+)\.")


def _unpadded_batch() -> dict[str, torch.Tensor]:
    batch = tiny.demo_batch()
    return {"input_ids": batch["input_ids"], "attention_mask": torch.ones_like(batch["attention_mask"])}


def _capture_inputs(model: torch.nn.Module) -> dict[str, tuple[LoraExperts, list[torch.Tensor]]]:
    """Every LoRA-expert set's input rows of the next forward, by module path (routed experts' sets run grouped:
    their rows are split by each row's routed expert)."""
    seen: dict[str, tuple[LoraExperts, list[torch.Tensor]]] = {}
    for name, module in model.named_modules():
        if isinstance(module, LoraExperts):
            seen[name] = (module, [])
            module.register_forward_pre_hook(lambda m, a, name=name: seen[name][1].append(a[0].detach()))
        if isinstance(module, RoutedExpertSets):
            module.register_forward_pre_hook(lambda m, a, name=name: _split_rows(seen, name, m, a))
    return seen


def _split_rows(seen: dict, name: str, sets: RoutedExpertSets, args: tuple) -> None:
    rows, expert_ids, only = args[0], args[1], args[4] if len(args) > 4 else None
    if only is None:  # grouped call (a call for one expert reaches that set's own hook)
        for e in range(len(sets.sets)):
            seen[f"{name}.sets.{e}"][1].append(rows[expert_ids == e].detach())


def _mola_obalance(seen: dict[str, tuple[LoraExperts, list[torch.Tensor]]], top_k: int) -> torch.Tensor:
    """MoLA's ``obalance``: per decoder layer, softmax over the concatenated router logits of the layer's projections,
    top-k one-hot counts / total, mean probability, times N; summed over layers."""
    per_layer: dict[int, list[torch.Tensor]] = {}
    for name, (module, inputs) in seen.items():
        rows = torch.cat([x.reshape(-1, x.shape[-1]) for x in inputs])
        logits = rows.double() @ module.router.weight.double().T
        per_layer.setdefault(int(LAYER.search(name).group(1)), []).append(logits)
    total = torch.zeros((), dtype=torch.float64)
    for logits in per_layer.values():
        logits = torch.cat(logits)
        n = logits.shape[-1]
        probs = torch.softmax(logits, dim=-1)
        counts = torch.nn.functional.one_hot(probs.topk(top_k, dim=-1).indices.reshape(-1), n).sum(dim=0).double()
        total = total + (counts / counts.sum() * probs.mean(dim=0)).sum() * n
    return total


@pytest.mark.parametrize("targets", [["q_proj", "k_proj", "v_proj", "o_proj"],
                                     ["q_proj", "v_proj", "down_proj"]])  # + routed experts, shared and dense MLPs
def test_layer_reduction_equals_mola_obalance_without_padding(targets):
    model = tiny.tiny_model("qwen2_moe").train()
    moepatch.apply(model, {"lora_experts": {"method": "mola", "num_experts": 4, "top_k": 2, "r": 2,
                                            "target_modules": targets, "routed_experts": True,
                                            "balance_loss": {"coef": 1.0}}})
    assert model.config.moepatch["lora_experts"]["balance_loss"]["reduction"] == "layer"  # the default
    seen = _capture_inputs(model)
    model(**_unpadded_batch())
    if "down_proj" in targets:
        assert any(".sets." in name and inputs for name, (_, inputs) in seen.items())  # routed sets pooled too
    torch.testing.assert_close(model.lora_experts_aux["balance_loss"].double(), _mola_obalance(seen, 2),
                               atol=1e-6, rtol=1e-5)


def test_layer_with_mixed_expert_counts_sums_one_term_per_router():
    """GuiLoMo allocations: routers of one layer with different N cannot be concatenated; that layer's term is the
    sum of the per-router terms (GuiLoMo's stage-2 loss), a layer with one N stays pooled."""
    model = tiny.tiny_model("qwen2_moe").train()
    counts = {f"model.layers.{i}.self_attn.{p}": (2 if i == 0 and p == "q_proj" else 4)
              for i in range(4) for p in ("q_proj", "v_proj")}
    moepatch.apply(model, {"lora_experts": {"method": "mola", "num_experts": counts, "top_k": 2, "r": 2,
                                            "target_modules": ["q_proj", "v_proj"],
                                            "balance_loss": {"coef": 1.0, "reduction": "layer"}}})
    seen = _capture_inputs(model)
    model(**_unpadded_batch())
    layer0 = {name: entry for name, entry in seen.items() if ".layers.0." in name}
    others = {name: entry for name, entry in seen.items() if ".layers.0." not in name}
    expected = sum(_mola_obalance({name: entry}, 2) for name, entry in layer0.items()) + _mola_obalance(others, 2)
    torch.testing.assert_close(model.lora_experts_aux["balance_loss"].double(), expected, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("reduction", ["layer", "sum", "mean"])
def test_padding_rows_change_nothing_in_every_reduction(reduction):
    """Appending padding columns (right padding: the real tokens never see them) leaves every value unchanged."""
    model = tiny.tiny_model("qwen2_moe").train()
    moepatch.apply(model, {"lora_experts": {"method": "mola", "num_experts": 4, "top_k": 2, "r": 2, "z_loss_coef": 1.0,
                                            "balance_loss": {"coef": 1.0, "reduction": reduction}}})
    batch = tiny.demo_batch()
    padded = {"input_ids": torch.cat([batch["input_ids"], torch.full((batch["input_ids"].shape[0], 3), 7)], dim=1),
              "attention_mask": torch.cat([batch["attention_mask"],
                                           torch.zeros(batch["attention_mask"].shape[0], 3, dtype=torch.long)], dim=1)}
    values = []
    for inputs in (batch, padded):
        model(**inputs)
        values.append(dict(model.lora_experts_aux))
    for key in ("balance_loss", "z_loss"):
        torch.testing.assert_close(values[0][key], values[1][key], atol=1e-6, rtol=1e-5)


def test_bad_reduction_names_the_field():
    model = tiny.tiny_model("qwen2_moe")
    with pytest.raises(ValueError, match=r"moepatch\.lora_experts\.balance_loss\.reduction"):
        moepatch.apply(model, {"lora_experts": {"method": "mola", "balance_loss": {"reduction": "layers"}}})


def test_last_expert_rank_scaling_matches_guilomo_stage_two():
    torch.manual_seed(0)
    ranks, alpha = [2, 4, 3], 16.0
    per_expert = LoraExperts(8, 6, ranks, top_k=2, alpha=alpha)
    last = LoraExperts(8, 6, ranks, top_k=2, alpha=alpha, scaling="last_expert_rank")
    last.load_state_dict(per_expert.state_dict())
    for b in last.lora_B:
        torch.nn.init.normal_(b)
    x = torch.randn(5, 8)
    weights = last.router(x).double()
    expected = sum(weights[:, [e]] * (alpha / ranks[-1]) * (x.double() @ last.lora_A[e].double().T
                                                            @ last.lora_B[e].double().T) for e in range(3))
    torch.testing.assert_close(last(x).double(), expected, atol=1e-5, rtol=1e-5)
    assert per_expert.scaling == [alpha / r for r in ranks]
    model = tiny.tiny_model("qwen2_moe")
    moepatch.apply(model, {"lora_experts": {"method": "mola", "target_modules": ["q_proj"], "r": [1, 2, 3, 4],
                                            "scaling": "last_expert_rank"}})
    assert model.model.layers[2].self_attn.q_proj.lora_experts.scaling == [16.0 / 3] * 8
    with pytest.raises(ValueError, match=r"moepatch\.lora_experts\.scaling"):
        moepatch.apply(tiny.tiny_model("qwen2_moe"), {"lora_experts": {"method": "mola", "scaling": "last"}})


def test_per_routed_expert_allocation_round_trip(tmp_path):
    """search layers → export (one GSV set per routed expert) → expert.json / rank.json → apply: every routed expert
    of a routed projection gets its own searched count and ranks."""
    torch.manual_seed(0)
    block = search_config(["q_proj", "down_proj"], 4, 4, routed_experts=True)
    search_model = tiny.tiny_model("qwen2_moe")
    moepatch.apply(search_model, {"lora_experts": block})
    to_search_layers(search_model, 4)
    with torch.no_grad():
        for module in search_model.modules():
            if isinstance(module, SearchLoraExperts):
                module.router_expert_vector.copy_(torch.randn(4))
                for vector in module.expertlora_E_vector:
                    vector.copy_(torch.randn(4))
    allocation = export_allocation(search_model)
    routed_keys = [key for key in allocation["expert"] if ".mlp.experts." in key]
    routed_key = re.compile(r"model\.layers\.\d+\.mlp\.experts\.\d+\.down_proj")
    assert routed_keys and all(routed_key.fullmatch(key) for key in routed_keys)
    assert len({allocation["expert"][k] for k in routed_keys}) > 1  # the routed experts really differ
    write_allocation(allocation, tmp_path)
    model = tiny.tiny_model("qwen2_moe")
    model.config._name_or_path = str(tmp_path)
    moepatch.apply(model, {"lora_experts": {"method": "mola", "target_modules": ["q_proj", "down_proj"],
                                            "routed_experts": True, "num_experts": "expert.json", "r": "rank.json",
                                            "top_k": 2}})
    for name, module in search_model.named_modules():
        match = re.fullmatch(r"(model\.layers\.\d+\.mlp\.experts)\.lora_experts\.down_proj\.sets\.(\d+)", name)
        if match is None:
            continue
        key = f"{match[1]}.{match[2]}.down_proj"
        applied = model.get_submodule(name)
        count, ranks = module.allocation()
        assert applied.num_experts == allocation["expert"][key] == count
        assert applied.ranks == ranks[:count] == [allocation["rank"][f"{key}.expertlora_E_vector_{i}"]
                                                  for i in range(count)]


def test_per_routed_expert_keys_fall_back_to_the_projection_key():
    """A routed expert without its own key takes the projection's entry (counts and per-expert ranks alike)."""
    paths = ["model.layers.0.mlp.experts.down_proj", "model.layers.2.mlp.experts.down_proj",
             "model.layers.3.mlp.experts.down_proj", "model.layers.0.mlp.shared_expert.down_proj",
             "model.layers.1.mlp.down_proj", "model.layers.2.mlp.shared_expert.down_proj",
             "model.layers.3.mlp.shared_expert.down_proj"]
    counts = {**dict.fromkeys(paths, 2), "model.layers.0.mlp.experts.5.down_proj": 3}
    ranks = {f"{path}.expertlora_E_vector_{i}": 2 for path in paths for i in range(2)}
    ranks |= {f"model.layers.0.mlp.experts.5.down_proj.expertlora_E_vector_{i}": 1 + i for i in range(3)}
    model = tiny.tiny_model("qwen2_moe")
    moepatch.apply(model, {"lora_experts": {"method": "mola", "target_modules": ["down_proj"], "num_experts": counts,
                                            "r": ranks, "routed_experts": True}})
    sets = model.model.layers[0].mlp.experts.lora_experts["down_proj"].sets
    assert [s.ranks for s in sets] == [[1, 2, 3] if e == 5 else [2, 2] for e in range(len(sets))]
    missing = {key: value for key, value in ranks.items() if not key.startswith("model.layers.2.mlp.experts.down")}
    with pytest.raises(ValueError, match=r"moepatch\.lora_experts\.r: no rank for 'model\.layers\.2\.mlp\.experts"):
        moepatch.apply(tiny.tiny_model("qwen2_moe"), {"lora_experts": {
            "method": "mola", "target_modules": ["down_proj"], "num_experts": counts, "r": missing,
            "routed_experts": True}})


def test_stage_one_recipe_defaults_are_the_official_ones_and_flags_override(tmp_path):
    checkpoint = tiny.save_tiny_checkpoint(tmp_path / "ckpt", "qwen2_moe")
    parser = build_parser()
    defaults = search_recipe(parser.parse_args(["allocate", str(checkpoint)]))
    assert defaults == SearchRecipe() == SearchRecipe(lr=3e-4, weight_decay=0.0, warmup_steps=100, schedule="linear",
                                                      max_grad_norm=1.0, arch_lr=3e-3, arch_betas=(0.5, 0.999),
                                                      arch_weight_decay=0.0, bilevel="official")
    assert parser.parse_args(["allocate", str(checkpoint)]).lora_dropout == 0.05
    block = search_config(["q_proj"], 8, 8)
    assert block["dropout"] == 0.05 and block["balance_loss"] == {"coef": 1e-3 / 8, "reduction": "layer"}
    override = search_recipe(parser.parse_args([
        "allocate", str(checkpoint), "--weight-decay", "0.01", "--warmup-steps", "0", "--lr-schedule", "constant",
        "--max-grad-norm", "0", "--arch-betas", "0.9", "0.99", "--arch-weight-decay", "1e-3", "--lr", "1e-3",
        "--bilevel", "darts"]))
    assert override == SearchRecipe(lr=1e-3, weight_decay=0.01, warmup_steps=0, schedule="constant", max_grad_norm=0.0,
                                    arch_lr=3e-3, arch_betas=(0.9, 0.99), arch_weight_decay=1e-3, bilevel="darts")


@pytest.mark.parametrize("recipe", [SearchRecipe(), SearchRecipe(warmup_steps=3, schedule="constant", lr=1e-2)])
def test_optimizers_and_schedule_follow_the_recipe(recipe):
    """The HF Trainer's linear schedule with warm-up, written out: lr·s/w during warm-up, then lr·(S−s)/(S−w)."""
    weights, arch = [torch.nn.Parameter(torch.zeros(2))], [torch.nn.Parameter(torch.zeros(2))]
    steps = 150
    weight_optimizer, arch_optimizer, scheduler = build_optimizers(weights, arch, recipe, steps)
    assert weight_optimizer.defaults["weight_decay"] == recipe.weight_decay
    assert (arch_optimizer.defaults["lr"], arch_optimizer.defaults["betas"], arch_optimizer.defaults["weight_decay"]
            ) == (recipe.arch_lr, recipe.arch_betas, recipe.arch_weight_decay)
    seen = []
    for _ in range(steps):
        seen.append(weight_optimizer.param_groups[0]["lr"])
        weight_optimizer.step()
        scheduler.step()
    w = recipe.warmup_steps
    if recipe.schedule == "linear":
        expected = [recipe.lr * (s / w if s < w else max(0.0, (steps - s) / (steps - w))) for s in range(steps)]
    else:
        expected = [recipe.lr * min(1.0, s / w) for s in range(steps)]
    assert seen == pytest.approx(expected, rel=1e-9, abs=1e-15)
