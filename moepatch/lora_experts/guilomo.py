"""GuiLoMo stage 1: learn per-module expert counts and per-expert ranks with GuidedSelection Vectors (GSVs).

Every adapted projection carries ``N_max`` LoRA experts of rank ``r_max`` (A and B ~ N(0, 0.02), a per-rank scale
``lora_E`` initialised to one) plus two kinds of GSV (each initialised to ``softmax(randn)``):

* an **expert GSV** ``router_expert_vector [N_max]``: with ``g = sigmoid(v)`` and ``k = argmax g`` (at least 1), the
  router logits get ``+0.5`` on experts ``0..k`` and ``-1e4`` beyond, so only a prefix of experts is routable;
  backward passes, at index ``k`` only, the cumulative sum of ``grad ⊙ g`` up to ``k``;
* a **rank GSV** per expert ``expertlora_E_vector_<i> [r_max]``: mask ``1`` on ranks ``0..argmax`` and ``1e-4``
  beyond, multiplying the rows of A; backward: the cumulative sum of ``grad ⊙ g`` at the argmax, ``1e-4·grad``
  elsewhere.

As in the official code, the straight-through function is applied to ``g = sigmoid(v)``, so the gradient reaching
``v`` is the above times ``σ'(v) = g (1 − g)`` (autograd through the sigmoid).

The GSVs are architecture parameters of a DARTS-style bilevel optimisation (second order, finite differences):
batches come in (train, valid) pairs; a real AdamW step on the train batch gives ``w'``; ``∇α L_val(w')`` minus
``η · (∇α L_train(w + ε d) − ∇α L_train(w − ε d)) / 2ε`` (``d = ∇w L_val(w')``, ``ε = 0.01 / ‖d‖``, η the weight
learning rate) is the GSVs' gradient, applied by their own AdamW (3e-3, β = (0.5, 0.999), wd 1e-3); the weights are
restored and take an ordinary step on the train batch.  The recipe (:class:`SearchRecipe`) defaults to the official
stage 1 (Zhang et al., 2025: the HF Trainer with its defaults under ``ArMoLA/mola3_training.py``).  The result is
exported as GuiLoMo's ``expert.json`` (``max(2, argmax + 1)`` experts per module) and ``rank.json`` (``argmax + 1``
per module and expert, all ``N_max`` experts), which ``"num_experts": "expert.json", "r": "rank.json"`` reads back.
Each routed expert of a routed projection is searched with its own GSVs and written under its own key,
``<experts module>.<e>.<projection>`` (the transformers-4 per-expert module name).
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from moepatch.lora_experts.config import routed_expert_path
from moepatch.lora_experts.layers import LoraExperts

ARCH_MARKERS = ("router_expert_vector", "expertlora_E_vector")
_SET_PATH = re.compile(r"^(?P<owner>.+)\.lora_experts(?:\.(?P<projection>[a-z_]+))?(?:\.sets\.(?P<expert>\d+))?$")


class _PrefixMask(torch.autograd.Function):
    """Straight-through prefix mask of a gated GSV ``g = σ(v)``: ``inside`` on indices ``0..k``
    (``k = max(argmax g, min_k)``), ``outside`` beyond; backward (with respect to ``g``) puts the cumulative
    ``Σ_{j≤k} grad_j · g_j`` at ``k`` and ``grad · leak`` elsewhere."""

    @staticmethod
    def forward(ctx: Any, gate: torch.Tensor, inside: float, outside: float, min_k: int, leak: float
                ) -> torch.Tensor:
        k = max(min_k, int(gate.argmax()))
        mask = torch.full_like(gate, outside)
        mask[: k + 1] = inside
        ctx.save_for_backward(gate)
        ctx.k, ctx.leak = k, leak
        return mask

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple:
        (gate,) = ctx.saved_tensors
        result = grad * ctx.leak
        result[ctx.k] = (grad * gate)[: ctx.k + 1].sum()
        return result, None, None, None, None


def expert_prefix_mask(vector: torch.Tensor) -> torch.Tensor:
    """Additive router-logit mask of an expert GSV (straight-through prefix on ``σ(v)``; see the module docstring)."""
    return _PrefixMask.apply(torch.sigmoid(vector), 0.5, -1e4, 1, 0.0)


def rank_prefix_mask(vector: torch.Tensor) -> torch.Tensor:
    """Multiplicative per-rank mask of a rank GSV (straight-through prefix on ``σ(v)``; see the module docstring)."""
    return _PrefixMask.apply(torch.sigmoid(vector), 1.0, 1e-4, 0, 1e-4)


def _gsv(size: int) -> nn.Parameter:
    return nn.Parameter(torch.softmax(torch.randn(size), dim=0))


class SearchLoraExperts(LoraExperts):
    """Stage-1 layer: N_max experts of rank r_max with expert / rank GSVs and per-rank scales."""

    def __init__(self, in_features: int, out_features: int, max_experts: int, max_rank: int, *, top_k: int = 2,
                 alpha: float = 16.0, dropout: float = 0.0) -> None:
        super().__init__(in_features, out_features, [max_rank] * max_experts, top_k=top_k, alpha=alpha,
                         dropout=dropout, router_init="kaiming", a_init="normal")
        for b in self.lora_B:
            nn.init.normal_(b, std=0.02)  # GuiLoMo stage 1: B is not zero
        self.lora_E = nn.ParameterList(nn.Parameter(torch.ones(max_rank)) for _ in range(max_experts))
        self.router_expert_vector = _gsv(max_experts)
        self.expertlora_E_vector = nn.ParameterList(_gsv(max_rank) for _ in range(max_experts))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = F.linear(x.float(), self.router.weight.float()) + expert_prefix_mask(self.router_expert_vector)
        scales = [self.lora_E[e] * rank_prefix_mask(self.expertlora_E_vector[e]) for e in range(self.num_experts)]
        a = torch.cat([self.lora_A[e] * scales[e][:, None] for e in range(self.num_experts)], dim=0)
        return self.mix(x, self.router.mixing_weights(logits), a)

    def allocation(self) -> tuple[int, list[int]]:
        """(expert count, rank of each of the N_max experts) as GuiLoMo exports them."""
        experts = max(2, int(self.router_expert_vector.detach().argmax()) + 1)
        return experts, [int(v.detach().argmax()) + 1 for v in self.expertlora_E_vector]


def split_parameters(model: nn.Module) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
    """(weights, architecture parameters) among the trainable parameters."""
    weights, arch = [], []
    for name, parameter in model.named_parameters():
        if parameter.requires_grad:
            (arch if any(marker in name for marker in ARCH_MARKERS) else weights).append(parameter)
    return weights, arch


def _grads(loss: torch.Tensor, parameters: list[nn.Parameter]) -> list[torch.Tensor]:
    grads = torch.autograd.grad(loss, parameters, allow_unused=True)
    return [torch.zeros_like(p) if g is None else g for p, g in zip(parameters, grads)]


def architecture_gradient(loss_fn: Any, train_batch: Any, valid_batch: Any, weights: list[nn.Parameter],
                          arch: list[nn.Parameter], optimizer: torch.optim.Optimizer) -> list[torch.Tensor]:
    """The second-order DARTS gradient of the architecture parameters (GuiLoMo's ``architect_step``).

    ``loss_fn(batch)`` returns the scalar loss.  One real ``optimizer`` step on ``train_batch`` gives ``w'``; the
    gradient is ``∇α L_val(w') − η·(∇α L_train(w⁺) − ∇α L_train(w⁻)) / 2ε`` with ``w± = w ± ε·∇w L_val(w')`` and
    ``ε = 0.01 / ‖∇w L_val(w')‖``.  Weights and optimizer state are restored afterwards.
    """
    saved = [w.detach().clone() for w in weights]
    saved_state = {id(p): {k: (v.clone() if torch.is_tensor(v) else v) for k, v in state.items()}
                   for p, state in optimizer.state.items()}
    eta = optimizer.param_groups[0]["lr"]
    optimizer.zero_grad(set_to_none=True)
    loss_fn(train_batch).backward(inputs=weights)
    optimizer.step()  # w' (a real step, as GuiLoMo does)
    optimizer.zero_grad(set_to_none=True)
    valid_loss = loss_fn(valid_batch)
    grads = _grads(valid_loss, weights + arch)
    d_weights, d_arch = grads[: len(weights)], grads[len(weights) :]
    with torch.no_grad():
        for w, value in zip(weights, saved):
            w.copy_(value)
    norm = torch.sqrt(sum((d * d).sum() for d in d_weights))
    epsilon = 0.01 / float(norm) if float(norm) > 0 else 0.0
    if epsilon == 0.0:
        implicit = [torch.zeros_like(a) for a in arch]
    else:
        with torch.no_grad():
            for w, d in zip(weights, d_weights):
                w.add_(d, alpha=epsilon)
        plus = _grads(loss_fn(train_batch), arch)
        with torch.no_grad():
            for w, d in zip(weights, d_weights):
                w.sub_(d, alpha=2 * epsilon)
        minus = _grads(loss_fn(train_batch), arch)
        with torch.no_grad():
            for w, value in zip(weights, saved):
                w.copy_(value)
        implicit = [(p - m) / (2 * epsilon) for p, m in zip(plus, minus)]
    optimizer.state.clear()
    for p in weights:
        if id(p) in saved_state:
            optimizer.state[p] = saved_state[id(p)]
    return [da - eta * hv for da, hv in zip(d_arch, implicit)]


def pairs(batches: Iterable[Any]) -> Iterator[tuple[Any, Any]]:
    """(train, valid) pairs: batches 2i and 2i+1, the last one reused when the count is odd."""
    pending = None
    last = None
    for batch in batches:
        last = batch
        if pending is None:
            pending = batch
        else:
            yield pending, batch
            pending = None
    if pending is not None:
        yield pending, last


SCHEDULES = ("linear", "constant")


@dataclass(frozen=True)
class SearchRecipe:
    """Stage-1 optimisation; the defaults are the official recipe (``ArMoLA/mola3_training.py`` on the HF Trainer).

    The weights: AdamW (lr 3e-4, weight decay 0 — ``TrainingArguments``' default, the script sets none), the Trainer's
    default linear schedule with the script's 100 warm-up steps (one step = one train/valid pair), gradients clipped
    to norm 1.0 (``max_grad_norm``; 0 disables).  The GSVs: AdamW 3e-3, β = (0.5, 0.999), weight decay 1e-3 — the
    value the script passes (``TrainingArguments_arch(arch_weight_decay=1e-3)``); 0 gives the reading that the
    decay is negligible on the GSVs' scale.
    """

    lr: float = 3e-4
    weight_decay: float = 0.0
    warmup_steps: int = 100
    schedule: str = "linear"
    max_grad_norm: float = 1.0
    arch_lr: float = 3e-3
    arch_betas: tuple[float, float] = (0.5, 0.999)
    arch_weight_decay: float = 1e-3


def build_optimizers(weights: list[nn.Parameter], arch: list[nn.Parameter], recipe: SearchRecipe, steps: int
                     ) -> tuple[torch.optim.Optimizer, torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler]:
    """(weight AdamW, GSV AdamW, the weights' learning-rate schedule over ``steps`` steps) of ``recipe``, with
    transformers' own schedule functions (the Trainer's)."""
    from transformers import get_constant_schedule_with_warmup
    from transformers import get_linear_schedule_with_warmup

    weight_optimizer = torch.optim.AdamW(weights, lr=recipe.lr, weight_decay=recipe.weight_decay)
    arch_optimizer = torch.optim.AdamW(arch, lr=recipe.arch_lr, betas=recipe.arch_betas,
                                       weight_decay=recipe.arch_weight_decay)
    if recipe.schedule == "linear":
        scheduler = get_linear_schedule_with_warmup(weight_optimizer, recipe.warmup_steps, steps)
    else:
        scheduler = get_constant_schedule_with_warmup(weight_optimizer, recipe.warmup_steps)
    return weight_optimizer, arch_optimizer, scheduler


def search(model: nn.Module, batches: list[dict[str, torch.Tensor]], *, epochs: int = 1,
           recipe: SearchRecipe = SearchRecipe(), progress: bool = True) -> dict[str, Any]:
    """Run the bilevel search on a model carrying :class:`SearchLoraExperts`; returns the export (see
    :func:`export_allocation`) and the loss trace."""
    from tqdm import tqdm

    weights, arch = split_parameters(model)
    if not arch:
        raise ValueError("guilomo search: the model has no GuidedSelection Vectors (inject SearchLoraExperts first)")
    schedule = [pair for _ in range(epochs) for pair in pairs(batches)]
    weight_optimizer, arch_optimizer, scheduler = build_optimizers(weights, arch, recipe, len(schedule))
    model.train()

    def loss_fn(batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return model(**batch).loss

    trace = []
    for train_batch, valid_batch in tqdm(schedule, desc="GuiLoMo search", disable=not progress):
        gradient = architecture_gradient(loss_fn, train_batch, valid_batch, weights, arch, weight_optimizer)
        for parameter, grad in zip(arch, gradient):
            parameter.grad = grad
        arch_optimizer.step()
        arch_optimizer.zero_grad(set_to_none=True)
        weight_optimizer.zero_grad(set_to_none=True)
        loss = loss_fn(train_batch)
        loss.backward(inputs=weights)
        if recipe.max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(weights, recipe.max_grad_norm)
        weight_optimizer.step()
        scheduler.step()
        weight_optimizer.zero_grad(set_to_none=True)
        trace.append(loss.item())
    return {**export_allocation(model), "loss_trace": trace}


def export_allocation(model: nn.Module) -> dict[str, dict[str, int]]:
    """GuiLoMo's two files as dicts: ``expert`` {module path: count}, ``rank`` {module.expertlora_E_vector_i: r}."""
    experts: dict[str, int] = {}
    ranks: dict[str, int] = {}
    for path, module in model.named_modules():
        if not isinstance(module, SearchLoraExperts):
            continue
        match = _SET_PATH.match(path)
        owner = match["owner"]
        if match["expert"] is not None:  # a routed expert's set: its own allocation, under its per-expert name
            owner = routed_expert_path(owner, match["projection"], int(match["expert"]))
        count, per_expert = module.allocation()
        experts[owner] = count
        ranks.update({f"{owner}.expertlora_E_vector_{i}": rank for i, rank in enumerate(per_expert)})
    return {"expert": experts, "rank": ranks}


def write_allocation(allocation: dict[str, Any], folder: str | Path) -> tuple[Path, Path]:
    """``expert.json`` and ``rank.json`` (indent 4, as GuiLoMo's ``save_rankandexp_num.py``)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    expert, rank = folder / "expert.json", folder / "rank.json"
    expert.write_text(json.dumps(allocation["expert"], indent=4))
    rank.write_text(json.dumps(allocation["rank"], indent=4))
    return expert, rank


def search_config(targets: list[str], max_experts: int, max_rank: int, top_k: int = 2, dropout: float = 0.05,
                  routed_experts: bool = False) -> dict[str, Any]:
    """The lora_experts block that builds the stage-1 model (swapped for SearchLoraExperts by ``to_search_layers``):
    LoRA dropout 0.05 and the balance loss of the official stage 1 — per layer, pooled, summed over layers, with
    coefficient 1e-3 but **without** the factor N (the official stage-1 loss leaves it out), i.e. moepatch's
    ``"layer"`` value times ``1e-3 / N_max``.  ``routed_experts``: broad target names reach the routed experts too
    (one GSV set per routed expert)."""
    return {"method": "mola", "target_modules": targets, "routed_experts": routed_experts, "num_experts": max_experts,
            "r": max_rank, "top_k": top_k, "dropout": dropout,
            "balance_loss": {"coef": 1e-3 / max_experts, "reduction": "layer"}}


def to_search_layers(model: nn.Module, max_rank: int) -> int:
    """Replace every injected :class:`LoraExperts` (on linear projections and routed experts) by a
    :class:`SearchLoraExperts` of the same shape; returns how many."""
    replaced = 0
    for _, parent in list(model.named_modules()):
        for name, child in list(parent.named_children()):
            if type(child) is LoraExperts:
                top_k = child.router.top_k or 2
                search_layer = SearchLoraExperts(child.in_features, child.out_features, child.num_experts, max_rank,
                                                 top_k=top_k, alpha=child.scaling[0] * child.ranks[0],
                                                 dropout=getattr(child.dropout, "p", 0.0))
                parent._modules[name] = search_layer.to(child.router.weight.device)
                replaced += 1
    return replaced
