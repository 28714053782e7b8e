"""Where moepatch follows the official code of MoV / MoLoRA (Zadouri et al., 2024: the flaxformer fork's ``dense.py``),
GuiLoMo (Zhang et al., 2025: ``ArMoLA`` stage 1 and its trainer, ``MoLA_con`` stage 2).  Each test compares against a
transcription of the official function written here from the official code, never against moepatch's own code."""

from __future__ import annotations

import copy
import re
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import moepatch
from moepatch.cli import build_parser
from moepatch.cli.allocate import search_recipe
from moepatch.lora_experts.config import LoraExpertsConfig
from moepatch.lora_experts.layers import LoraExperts
from moepatch.lora_experts.layers import VectorExperts
from moepatch.testing import tiny
from moepatch.tools.lora_experts.guilomo import SearchRecipe
from moepatch.tools.lora_experts.guilomo import architecture_gradient
from moepatch.tools.lora_experts.guilomo import build_optimizers
from moepatch.tools.lora_experts.guilomo import search
from moepatch.tools.lora_experts.guilomo import search_config
from moepatch.tools.lora_experts.guilomo import stage_two_config
from moepatch.tools.lora_experts.importers import guilomo_block
from moepatch.tools.lora_experts.importers import mola_block
from moepatch.validation import Problems

LAYER = re.compile(r"\.layers\.(\d+)\.")


def _trained(module: nn.Module) -> nn.Module:
    """Non-zero B / δ (zero at initialisation), so every expert changes the output."""
    with torch.no_grad():
        for name, parameter in module.named_parameters():
            if "lora_B" in name or name.endswith("delta"):
                parameter.normal_(std=0.5)
    return module


def _unpadded_batch() -> dict[str, torch.Tensor]:
    batch = tiny.demo_batch()
    return {"input_ids": batch["input_ids"], "attention_mask": torch.ones_like(batch["attention_mask"])}


def _block_io(block: nn.Module, run) -> tuple[torch.Tensor, torch.Tensor]:
    """(input, output) of ``block`` during ``run()``."""
    seen = {}
    handle = block.register_forward_hook(lambda m, args, out: seen.update(x=args[0].detach(), y=out.detach()))
    try:
        run()
    finally:
        handle.remove()
    return seen["x"], seen["y"]


# --- 1. MoV on a gated feed-forward block ----------------------------------------------------------------------------


def _flaxformer_mov_mlp(x, wi_0, wi_1, wo, router, vectors):
    """The MoV fork's ``MlpBlock`` with ``activations=('silu', 'linear')`` and ``intermediate_conv=MoV`` (dense.py):
    ``x0 = act(wi_0 x)``; ``x0 = intermediate_conv(x0)`` — MoV: ``probs = softmax(router(x0))`` (float32, no bias),
    ``x0 * Σ_e probs_e · mov_scaling_e`` — then ``x1 = wi_1 x`` and ``wo(x0 · x1)``.  Float64."""
    x = x.double()
    x0 = F.silu(x @ wi_0.double().T)
    probs = torch.softmax(x0 @ router.double().T, dim=-1)
    x0 = x0 * (probs @ vectors.double())
    x1 = x @ wi_1.double().T
    return (x0 * x1) @ wo.double().T, probs


@pytest.mark.parametrize(("family", "block_path"), [
    ("qwen2_moe", "model.layers.1.mlp"),  # a dense layer
    ("qwen2_moe", "model.layers.0.mlp.shared_expert"),
    ("llama4_text", "model.layers.0.feed_forward"),  # activation_fn
    ("jamba", "model.layers.0.feed_forward"),
])
def test_mov_default_on_a_gated_block_scales_and_routes_on_act_gate(family, block_path):
    """The router reads act(gate x) and the vectors scale it before the product with up x: the official placement.
    (Routing on the product act(gate x)·(up x) — the earlier default — gives other router probabilities.)"""
    torch.manual_seed(0)
    model = tiny.tiny_model(family).eval()
    moepatch.apply(model, {"lora_experts": {"method": "mov", "num_experts": 4, "target_modules": ["down_proj"]}})
    block = model.get_submodule(block_path)
    assert type(getattr(block, "act_fn", None) or block.activation_fn).__name__ == "SiLUActivation"
    experts = _trained(block.down_proj.lora_experts)
    assert isinstance(experts, VectorExperts) and experts.router.weight.shape[1] == block.down_proj.in_features
    with torch.no_grad():
        x, y = _block_io(block, lambda: model(**tiny.demo_batch()))
    expected, probs = _flaxformer_mov_mlp(x, block.gate_proj.weight, block.up_proj.weight, block.down_proj.weight,
                                          experts.router.weight, experts.vectors())
    torch.testing.assert_close(y.double(), expected, atol=1e-5, rtol=1e-5)
    product = F.silu(x.double() @ block.gate_proj.weight.double().T) * (x.double() @ block.up_proj.weight.double().T)
    on_product = torch.softmax(product @ experts.router.weight.double().T, dim=-1)
    assert (on_product - probs).abs().max() > 1e-3  # the two router inputs really differ


def test_mov_down_input_switch_routes_on_the_product():
    """``ffn_scaled: "down_input"`` (the documented switch): the down projection's input act(gate x)·(up x) is scaled
    and routed on."""
    torch.manual_seed(0)
    model = tiny.tiny_model("qwen2_moe").eval()
    moepatch.apply(model, {"lora_experts": {"method": "mov", "num_experts": 4, "target_modules": ["down_proj"],
                                            "ffn_scaled": "down_input"}})
    block = model.model.layers[1].mlp
    experts = _trained(block.down_proj.lora_experts)
    with torch.no_grad():
        x, y = _block_io(block, lambda: model(**tiny.demo_batch()))
    x = x.double()
    product = F.silu(x @ block.gate_proj.weight.double().T) * (x @ block.up_proj.weight.double().T)
    probs = torch.softmax(product @ experts.router.weight.double().T, dim=-1)
    expected = (product * (probs @ experts.vectors().double())) @ block.down_proj.weight.double().T
    torch.testing.assert_close(y.double(), expected, atol=1e-5, rtol=1e-5)


def test_ffn_scaled_is_checked_defaulted_and_kept_for_old_checkpoints():
    def parse(block):
        problems = Problems()
        return LoraExpertsConfig.parse(block, "moepatch.lora_experts", problems), problems.messages

    config, _ = parse({"method": "mov"})
    assert config.ffn_scaled == "gate_activation" and config.to_dict()["ffn_scaled"] == "gate_activation"
    # a block saved with trained weights before the choice existed was trained on the down projection's input
    assert parse({"method": "mov", "weights": "lora_experts.safetensors"})[0].ffn_scaled == "down_input"
    assert parse({"method": "mov", "ffn_scaled": "gate_activation", "weights": "w.safetensors"})[0].ffn_scaled == (
        "gate_activation")
    for block, message in (({"method": "mov", "ffn_scaled": "act"}, "moepatch.lora_experts.ffn_scaled: expected one"),
                           ({"method": "molora", "ffn_scaled": "down_input"},
                            "moepatch.lora_experts.ffn_scaled: only MoV")):
        assert any(problem.startswith(message) for problem in parse(block)[1])


def test_mov_gate_activation_merges_like_down_input():
    """One vector: both placements scale the same product, so the fold into down_proj's columns is exact."""
    torch.manual_seed(0)
    model = tiny.tiny_model("qwen2_moe").eval()
    moepatch.apply(model, {"lora_experts": {"method": "mov", "num_experts": 1, "target_modules": ["down_proj"]}})
    for module in model.modules():
        if isinstance(module, VectorExperts):
            _trained(module)
    batch = tiny.demo_batch()
    with torch.no_grad():
        patched = model(**batch).logits
    moepatch.tools.lora_experts.merge_into_base(model)
    assert not any(isinstance(m, VectorExperts) for m in model.modules())
    assert not model.model.layers[1].mlp.act_fn._forward_hooks
    with torch.no_grad():
        torch.testing.assert_close(model(**batch).logits, patched, atol=1e-5, rtol=1e-4)


# --- 6. MoLoRA's default feed-forward targets ------------------------------------------------------------------------


def _flaxformer_molora_mlp(x, block):
    """The fork's ``MlpBlock`` on branch ``lora``: ``x = wi_0(inputs) + lora_intermediate_conv(inputs)`` for the
    first dense only, ``act``, times ``wi_1(inputs)`` (no LoRA), then ``wo(x) + lora_output_conv(x)``; each LoRA conv
    a dense mixture ``Σ_e p_e · (α/r) B_e A_e`` under a softmax router on that conv's input.  Float64."""
    def molora(experts, inputs):
        probs = torch.softmax(inputs @ experts.router.weight.double().T, dim=-1)
        return sum(probs[..., [e]] * (experts.scaling[e] * inputs @ experts.lora_A[e].double().T
                                      @ experts.lora_B[e].double().T) for e in range(experts.num_experts))

    x = x.double()
    x0 = x @ block.gate_proj.weight.double().T + molora(block.gate_proj.lora_experts, x)
    h = F.silu(x0) * (x @ block.up_proj.weight.double().T)
    return h @ block.down_proj.weight.double().T + molora(block.down_proj.lora_experts, h)


def test_molora_default_targets_are_the_forks_gate_and_down():
    torch.manual_seed(0)
    model = tiny.tiny_model("qwen2_moe").eval()
    handle = moepatch.apply(model, {"lora_experts": {"method": "molora", "num_experts": 3}})
    names = {path.rsplit(".", 1)[-1] for path in handle.lora_targets}
    assert names == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "down_proj"}
    block = model.model.layers[1].mlp
    assert not hasattr(block.up_proj, "lora_experts")
    _trained(block.gate_proj.lora_experts)
    _trained(block.down_proj.lora_experts)
    with torch.no_grad():
        x, y = _block_io(block, lambda: model(**tiny.demo_batch()))
    torch.testing.assert_close(y.double(), _flaxformer_molora_mlp(x, block), atol=1e-5, rtol=1e-5)


class _UngatedMLP(nn.Module):
    """A feed-forward block without a gate (``down(act(up x))``): its up_proj is the fork's ``wi``."""

    def __init__(self, hidden: int, width: int) -> None:
        super().__init__()
        self.up_proj, self.down_proj = nn.Linear(hidden, width, bias=False), nn.Linear(width, hidden, bias=False)
        self.act_fn = nn.SiLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act_fn(self.up_proj(x)))


def test_molora_defaults_adapt_up_proj_where_a_block_has_no_gate():
    model = tiny.tiny_model("qwen2_moe")
    model.model.layers[1].mlp = _UngatedMLP(model.config.hidden_size, model.config.intermediate_size)
    handle = moepatch.apply(model, {"lora_experts": {"method": "molora", "num_experts": 2}})
    assert "model.layers.1.mlp.up_proj" in handle.lora_targets  # wi of a block with no gate
    assert not any(p.endswith("up_proj") and p != "model.layers.1.mlp.up_proj" for p in handle.lora_targets)
    handle.remove()
    handle = moepatch.apply(model, {"lora_experts": {"method": "molora", "num_experts": 2,
                                                     "target_modules": ["gate_proj", "down_proj"]}})
    assert not any(p.endswith("up_proj") for p in handle.lora_targets)  # explicit names are taken as given


# --- 2. GuiLoMo stage 2's balance loss -------------------------------------------------------------------------------


def _router_logits(model: nn.Module) -> dict[str, list[torch.Tensor]]:
    """Each LoRA-expert router's float64 logits of the next forward, recomputed from its input."""
    seen: dict[str, list[torch.Tensor]] = {}
    for name, module in model.named_modules():
        if isinstance(module, LoraExperts):
            seen[name] = []
            module.register_forward_pre_hook(lambda m, a, name=name: seen[name].append(
                a[0].detach().reshape(-1, a[0].shape[-1]).double() @ m.router.weight.double().T))
    return seen


def _mola_con_balance(logits: dict[str, list[torch.Tensor]], num_experts: dict[str, int], top_k: list[int]
                      ) -> torch.Tensor:
    """``MoLA_con``'s ``load_balancing_loss_func``: for every layer and every module of it, softmax, top-k of that
    layer, one-hot with the module's ``num_experts`` summed and normalised (tokens per expert), mean probability,
    ``Σ tokens · prob × num_experts[module]``, added to ``overall_loss``."""
    overall = torch.zeros((), dtype=torch.float64)
    for name, pieces in logits.items():
        module = name.removesuffix(".lora_experts")
        routing_weights = torch.softmax(torch.cat(pieces), dim=-1)
        _, selected = torch.topk(routing_weights, top_k[int(LAYER.search(name).group(1))], dim=-1)
        expert_mask = F.one_hot(selected.reshape(-1), num_experts[module]).sum(dim=-2)
        tokens_per_expert = expert_mask / expert_mask.sum()
        overall = overall + (tokens_per_expert * routing_weights.mean(dim=0)).sum() * num_experts[module]
    return overall


ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")


def _allocation(layers: int) -> tuple[dict[str, int], dict[str, int]]:
    """A searched allocation: most modules clipped to 2 experts (layers whose routers then share (N, k)), some 3."""
    experts = {f"model.layers.{i}.self_attn.{p}": 3 if (i, p) in ((0, "o_proj"), (2, "q_proj")) else 2
               for i in range(layers) for p in ATTENTION}
    ranks = {f"{m}.expertlora_E_vector_{e}": 1 + (e % 2) for m, n in experts.items() for e in range(n)}
    return experts, ranks


@pytest.mark.parametrize("make", ["stage_two_config", "guilomo_block"])
def test_guilomo_stage_two_balance_is_one_term_per_module_times_its_n(make):
    torch.manual_seed(0)
    model = tiny.tiny_model("qwen2_moe").train()
    experts, ranks = _allocation(model.config.num_hidden_layers)
    if make == "stage_two_config":
        block = stage_two_config(experts, ranks, top_k=2, targets=list(ATTENTION))
    else:
        block = guilomo_block(experts=experts, ranks=ranks, top_k=2, target_modules=list(ATTENTION))
    assert block["balance_loss"] == {"coef": 1e-3, "reduction": "sum"}
    moepatch.apply(model, {"lora_experts": block})
    seen = _router_logits(model)
    model(**_unpadded_batch())
    official = 1e-3 * _mola_con_balance(seen, experts, [2] * model.config.num_hidden_layers)
    got = block["balance_loss"]["coef"] * model.lora_experts_aux["balance_loss"].double()
    torch.testing.assert_close(got, official, atol=1e-7, rtol=1e-5)
    assert official > 1e-3 * model.config.num_hidden_layers * 1.5  # MoLA's "layer" pools 2-expert layers to ~1 each


def test_the_shipped_stage_two_config_is_the_official_recipe():
    import json
    from pathlib import Path

    shipped = Path(__file__).parents[2] / "configs" / "moepatch" / "lora_experts_guilomo.json"
    block = json.loads(shipped.read_text())["moepatch"]["lora_experts"]
    assert block == stage_two_config()
    problems = Problems()
    config = LoraExpertsConfig.parse(block, "moepatch.lora_experts", problems)
    assert not problems.messages and config.balance_loss.reduction == "sum" and config.scaling == "last_expert_rank"


def test_mola_keeps_the_per_layer_reduction():
    assert mola_block(number_experts=2, lora_r=4, top_k=2)["top_k"] == 2
    assert "balance_loss" not in mola_block(number_experts=2, lora_r=4, top_k=2)  # mola_training.py: obalance off
    assert mola_block(number_experts=2, lora_r=4, top_k=2, obalance=True)["balance_loss"] == {
        "coef": 1e-3, "reduction": "layer"}
    assert "balance_loss" not in guilomo_block(experts={}, ranks={}, top_k=2, obalance=False)
    with pytest.raises(ValueError, match="obalance: expected true or false"):
        guilomo_block(experts={}, ranks={}, top_k=2, obalance="yes")


# --- 5. GuiLoMo stage 1's balance loss -------------------------------------------------------------------------------


def _armola_balance(logits: dict[str, list[torch.Tensor]], num_experts: list[int], top_k: list[int], times_n: bool
                    ) -> torch.Tensor:
    """``ArMoLA``'s ``load_balancing_loss_func``: per layer the concatenated logits of its modules, softmax, top-k,
    tokens per expert · mean probability summed — times ``num_experts[layer]`` in ``mola_modeling_llama3_hacked.py``
    (``mola3_training.py``), not in ``mola_modeling_llama_hacked.py`` (``mola_training.py``)."""
    per_layer: dict[int, list[torch.Tensor]] = {}
    for name, pieces in logits.items():
        per_layer.setdefault(int(LAYER.search(name).group(1)), []).extend(pieces)
    overall = torch.zeros((), dtype=torch.float64)
    for layer, pieces in per_layer.items():
        routing_weights = torch.softmax(torch.cat(pieces), dim=-1)
        _, selected = torch.topk(routing_weights, top_k[layer], dim=-1)
        expert_mask = F.one_hot(selected.reshape(-1), num_experts[layer]).sum(dim=-2)
        layer_loss = (expert_mask / expert_mask.sum() * routing_weights.mean(dim=0)).sum()
        overall = overall + (layer_loss * num_experts[layer] if times_n else layer_loss)
    return overall


@pytest.mark.parametrize(("balance", "times_n"), [("mola_training", False), ("mola3_training", True)])
def test_stage_one_balance_follows_the_chosen_official_script(balance, times_n):
    torch.manual_seed(0)
    model = tiny.tiny_model("qwen2_moe").train()
    block = search_config(list(ATTENTION), 4, 2, balance=balance)
    moepatch.apply(model, {"lora_experts": block})
    seen = _router_logits(model)
    model(**_unpadded_batch())
    layers = model.config.num_hidden_layers
    official = 1e-3 * _armola_balance(seen, [4] * layers, [2] * layers, times_n)
    got = block["balance_loss"]["coef"] * model.lora_experts_aux["balance_loss"].double()
    torch.testing.assert_close(got, official, atol=1e-9, rtol=1e-5)
    assert search_config(list(ATTENTION), 4, 2) == search_config(list(ATTENTION), 4, 2, balance="mola_training")
    with pytest.raises(ValueError, match="balance: expected one of"):
        search_config(list(ATTENTION), 4, 2, balance="llama3")


# --- 3. and 4. GuiLoMo's bilevel step and GSV optimiser --------------------------------------------------------------


ARCH_NAMES = ["router_expert_vector", "expertlora_E_vector"]


class _Toy(nn.Module):
    """Weights ``w``, ``u`` and a GSV ``router_expert_vector``; ``forward(**batch).loss`` as a causal LM's."""

    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.randn(5))
        self.u = nn.Parameter(torch.randn(5))
        self.router_expert_vector = nn.Parameter(torch.randn(5))

    def forward(self, target: torch.Tensor) -> SimpleNamespace:
        a = self.router_expert_vector
        fit = ((torch.tanh(self.w * a) + self.u * torch.sigmoid(a) - target) ** 2).sum()
        loss = fit + 0.1 * (self.w ** 2 * a).sum()
        return SimpleNamespace(loss=loss)


def _concat(xs):
    return torch.cat([x.view(-1) for x in xs])


class _OfficialTrainer:
    """GuiLoMo's ``Trainer`` (``ArMoLA/src/mola_trainer_hacked.py``), the parts one step runs, transcribed line by
    line: ``create_optimizer`` / ``create_optimizer_arch`` (AdamW; every GSV group takes ``args.weight_decay``),
    ``training_step`` (``architect_step`` between ``optimizer.state_dict()`` and ``optimizer.load_state_dict``),
    ``_compute_unrolled_model``, ``_hessian_vector_product``, ``architect_step``, then the HF loop's clipping, step,
    scheduler step and ``model.zero_grad()``."""

    def __init__(self, model, lr, steps, warmup, weight_decay=0.0, max_grad_norm=1.0):
        from transformers import get_linear_schedule_with_warmup

        self.model, self.arch_parameters_names, self.max_grad_norm = model, ARCH_NAMES, max_grad_norm
        weights = [p for n, p in model.named_parameters() if not any(a in n for a in ARCH_NAMES)]
        arch = [p for n, p in model.named_parameters() if any(a in n for a in ARCH_NAMES)]
        self.optimizer = torch.optim.AdamW([{"params": weights, "weight_decay": weight_decay}], lr=lr,
                                           betas=(0.9, 0.999), eps=1e-8)
        self.optimizer_arch = torch.optim.AdamW([{"params": arch, "weight_decay": weight_decay}], lr=3e-3,
                                                betas=(0.5, 0.999), eps=1e-8)
        self.lr_scheduler = get_linear_schedule_with_warmup(self.optimizer, warmup, steps)
        self.captured_dalpha = None

    def compute_loss(self, model, inputs):
        return model(**inputs).loss

    def _is_arch(self, name):
        return any(item in name for item in self.arch_parameters_names)

    def _compute_unrolled_model(self, inputs_train, optimizer):
        optimizer.zero_grad()
        loss = self.compute_loss(self.model, inputs_train)
        loss.backward()
        optimizer.step()

    def _hessian_vector_product(self, vector, input, r=1e-2):
        norm = _concat(list(vector.values())).norm()
        R = torch.tensor(r) if norm.item() == 0.0 else r / norm
        model_parameters = {n: v for n, v in self.model.named_parameters() if not self._is_arch(n) and v.requires_grad}
        for n, v in vector.items():
            model_parameters[n].data.add_(v, alpha=R)
        self.optimizer.zero_grad()
        loss = self.compute_loss(self.model, input)
        loss.backward()
        grads_p = {n: v.grad.clone() for n, v in self.model.named_parameters()
                   if self._is_arch(n) and v.requires_grad if v.grad is not None}
        for n, v in vector.items():
            model_parameters[n].data.sub_(v, alpha=2 * R)
        self.optimizer.zero_grad()
        loss = self.compute_loss(self.model, input)
        loss.backward()
        grads_n = {n: v.grad.clone() for n, v in self.model.named_parameters()
                   if self._is_arch(n) and v.requires_grad if v.grad is not None}
        for n, v in vector.items():
            model_parameters[n].data.add_(v, alpha=R)
        return {n: (x - grads_n[n]).div_(2 * R) for n, x in grads_p.items()}

    def architect_step(self, model, eta, inputs_train, inputs_valid):
        self.optimizer_arch.zero_grad()
        with torch.no_grad():
            param_values = {n: p.detach().clone() for n, p in model.named_parameters()
                            if not self._is_arch(n) and p.requires_grad}
            param_gradients = {n: p.grad.clone() if p.grad is not None else None for n, p in model.named_parameters()
                               if not self._is_arch(n) and p.requires_grad}
        self._compute_unrolled_model(inputs_train, self.optimizer)
        # self.optimizer.zero_grad()  -- commented out in the official trainer
        loss = self.compute_loss(model, inputs_valid)
        loss.backward()
        dalpha = {n: v.grad.data.clone() for n, v in model.named_parameters()
                  if self._is_arch(n) and v.requires_grad if v.grad is not None}
        vector = {n: v.grad.data.clone() for n, v in model.named_parameters()
                  if not self._is_arch(n) and v.requires_grad if v.grad is not None}
        for n, p in model.named_parameters():
            if n in param_values:
                p.data.copy_(param_values[n])
                if param_gradients[n] is None:
                    p.grad = None
                elif p.grad is None:
                    p.grad = param_gradients[n].clone()
                else:
                    p.grad.copy_(param_gradients[n])
        implicit_grads = self._hessian_vector_product(vector, inputs_train)
        for n, g in dalpha.items():
            g.data.sub_(implicit_grads[n].data, alpha=eta)
        for n, v in model.named_parameters():
            if self._is_arch(n) and v.requires_grad:
                dalpha_data = dalpha.get(n, torch.zeros_like(v)).data
                if v.grad is None:
                    v.grad = dalpha_data.clone()
                else:
                    v.grad.data.copy_(dalpha_data)
        self.captured_dalpha = {n: g.clone() for n, g in dalpha.items()}
        self.optimizer_arch.step()
        for n, p in model.named_parameters():
            if n in param_values:
                if param_gradients[n] is None:
                    p.grad = None
                elif p.grad is None:
                    p.grad = param_gradients[n].clone()
                else:
                    p.grad.copy_(param_gradients[n])

    def training_step(self, model, inputs_train, inputs_valid):
        before_optimizer_state = self.optimizer.state_dict()
        self.architect_step(model=model, eta=self.lr_scheduler.get_last_lr()[0], inputs_train=inputs_train,
                            inputs_valid=inputs_valid)
        self.optimizer.load_state_dict(before_optimizer_state)
        loss = self.compute_loss(model, inputs_train)
        loss.backward()
        return loss.detach()

    def step(self, inputs_train, inputs_valid):  # the HF Trainer's inner loop around training_step
        loss = self.training_step(self.model, inputs_train, inputs_valid)
        nn.utils.clip_grad_norm_(self.model.parameters(), self.max_grad_norm)
        self.optimizer.step()
        self.lr_scheduler.step()
        self.model.zero_grad()
        return loss


def _batches(count: int) -> list[dict[str, torch.Tensor]]:
    generator = torch.Generator().manual_seed(1)
    return [{"target": torch.randn(5, generator=generator)} for _ in range(count)]


def test_official_architecture_gradient_equals_the_trainers_on_a_toy_model():
    """One ``architect_step`` after a first full step (the weights' optimizer has state): the GSV gradient the
    official trainer hands its GSV optimizer, the weights restored, the optimizer's moments as the trainer leaves
    them (the virtual step's update kept)."""
    torch.manual_seed(0)
    ours, official = _Toy(), _Toy()
    train, valid = _batches(2)
    trainer = _OfficialTrainer(official, lr=1e-2, steps=10, warmup=0)
    trainer.step(train, valid)
    ours.load_state_dict(official.state_dict())
    weights, arch = [ours.w, ours.u], [ours.router_expert_vector]
    optimizer = torch.optim.AdamW(weights, lr=1e-2, weight_decay=0.0)
    optimizer.load_state_dict(copy.deepcopy(trainer.optimizer.state_dict()))
    start = [w.detach().clone() for w in weights]
    trainer.training_step(official, train, valid)
    got = architecture_gradient(lambda batch: ours(**batch).loss, train, valid, weights, arch, optimizer)
    torch.testing.assert_close(got[0], trainer.captured_dalpha["router_expert_vector"], atol=1e-5, rtol=1e-5)
    assert all(torch.equal(w.detach(), s) for w, s in zip(weights, start, strict=True))
    for mine, theirs in ((ours.w, official.w), (ours.u, official.u)):
        for key in ("step", "exp_avg", "exp_avg_sq"):
            torch.testing.assert_close(optimizer.state[mine][key], trainer.optimizer.state[theirs][key])
    assert float(optimizer.state[ours.w]["step"]) == 2  # the first real step and this virtual one
    optimizer.load_state_dict(copy.deepcopy(trainer.optimizer.state_dict()))
    darts = architecture_gradient(lambda batch: ours(**batch).loss, train, valid, weights, arch, optimizer, "darts")
    assert (darts[0] - got[0]).abs().max() > 1e-3  # the textbook step is another gradient
    assert float(optimizer.state[ours.w]["step"]) == 2  # and restores the optimizer state exactly
    with pytest.raises(ValueError, match="bilevel: expected one of"):
        architecture_gradient(lambda batch: ours(**batch).loss, train, valid, weights, arch, optimizer, "first")


def test_search_follows_the_official_trainer_step_by_step():
    """Three (train, valid) pairs through ``search`` and through the official trainer: GSVs, weights (the weights'
    optimizer keeps the virtual step's moments, as there) and losses agree."""
    torch.manual_seed(0)
    ours, official = _Toy(), _Toy()
    official.load_state_dict(ours.state_dict())
    batches = _batches(6)
    recipe = SearchRecipe(lr=1e-2, warmup_steps=1)
    result = search(ours, batches, recipe=recipe, progress=False)
    trainer = _OfficialTrainer(official, lr=1e-2, steps=3, warmup=1)
    losses = [trainer.step(batches[i], batches[i + 1]).item() for i in (0, 2, 4)]
    assert result["loss_trace"] == pytest.approx(losses, rel=1e-5)
    for name, parameter in ours.named_parameters():
        torch.testing.assert_close(parameter, official.get_parameter(name), atol=1e-5, rtol=1e-5)


def test_darts_search_is_the_textbook_step():
    """``bilevel: "darts"``: the same search loop with the GSV gradient of Liu et al. (2019), written out here."""
    torch.manual_seed(0)
    ours = _Toy()
    start = {k: v.clone() for k, v in ours.state_dict().items()}
    batches = _batches(2)
    search(ours, batches, recipe=SearchRecipe(lr=1e-2, warmup_steps=0, schedule="constant", bilevel="darts"),
           progress=False)

    def loss(w, u, a, batch):  # _Toy's loss as a function of its parameters
        fit = ((torch.tanh(w * a) + u * torch.sigmoid(a) - batch["target"]) ** 2).sum()
        return fit + 0.1 * (w ** 2 * a).sum()

    w, u, a = (start[k].clone().requires_grad_() for k in ("w", "u", "router_expert_vector"))
    gw, gu = torch.autograd.grad(loss(w, u, a, batches[0]), (w, u))
    adam = torch.optim.AdamW([w, u], lr=1e-2, weight_decay=0.0)  # the virtual step w' = one AdamW step
    w.grad, u.grad = gw, gu
    adam.step()
    d_w, d_u, d_a = torch.autograd.grad(loss(w, u, a, batches[1]), (w, u, a))
    eps = 0.01 / torch.sqrt((d_w ** 2).sum() + (d_u ** 2).sum())
    w0, u0 = start["w"], start["u"]
    (plus,) = torch.autograd.grad(loss(w0 + eps * d_w, u0 + eps * d_u, a, batches[0]), a)
    (minus,) = torch.autograd.grad(loss(w0 - eps * d_w, u0 - eps * d_u, a, batches[0]), a)
    gradient = d_a - 1e-2 * (plus - minus) / (2 * eps)
    arch = torch.nn.Parameter(start["router_expert_vector"].clone())
    arch.grad = gradient
    torch.optim.AdamW([arch], lr=3e-3, betas=(0.5, 0.999), weight_decay=0.0).step()
    torch.testing.assert_close(ours.router_expert_vector.detach(), arch.detach(), atol=1e-5, rtol=1e-5)


def test_gsv_optimizer_has_the_official_weight_decay():
    """The official ``create_optimizer_arch`` gives every GSV group ``args.weight_decay`` (TrainingArguments' default,
    the scripts set none) — its ``arch_weight_decay=1e-3`` is never read."""
    from transformers import TrainingArguments

    official_decay = TrainingArguments(output_dir="unused").weight_decay
    recipe = SearchRecipe()
    assert recipe.arch_weight_decay == official_decay == 0.0 and recipe.bilevel == "official"
    weights, arch = [nn.Parameter(torch.ones(3))], [nn.Parameter(torch.ones(3))]
    _, arch_optimizer, _ = build_optimizers(weights, arch, recipe, 10)
    assert [group["weight_decay"] for group in arch_optimizer.param_groups] == [official_decay]
    reference = nn.Parameter(torch.ones(3))
    official = torch.optim.AdamW([{"params": [reference], "weight_decay": official_decay}], lr=3e-3,
                                 betas=(0.5, 0.999), eps=1e-8)
    for parameter in (arch[0], reference):
        parameter.grad = torch.tensor([0.5, -1.0, 2.0])
    arch_optimizer.step()
    official.step()
    assert torch.equal(arch[0].detach(), reference.detach())


def test_cli_defaults_and_switches(tmp_path):
    checkpoint = tiny.save_tiny_checkpoint(tmp_path / "ckpt", "qwen2_moe")
    parser = build_parser()
    defaults = parser.parse_args(["allocate", str(checkpoint)])
    assert search_recipe(defaults) == SearchRecipe()
    assert defaults.stage_one_balance == "mola_training"
    switched = parser.parse_args(["allocate", str(checkpoint), "--bilevel", "darts", "--arch-weight-decay", "1e-3",
                                  "--stage-one-balance", "mola3_training"])
    assert search_recipe(switched) == SearchRecipe(bilevel="darts", arch_weight_decay=1e-3)
    assert switched.stage_one_balance == "mola3_training"


@pytest.mark.parametrize(("field", "value"), [("bilevel", "first_order"), ("arch_weight_decay", -1.0),
                                              ("schedule", "cosine"), ("lr", 0.0), ("warmup_steps", 1.5),
                                              ("arch_betas", (0.5,)), ("max_grad_norm", float("nan"))])
def test_recipe_fields_are_checked_by_name(field, value):
    with pytest.raises(ValueError, match=rf"SearchRecipe\.{field}: expected"):
        SearchRecipe(**{field: value})
