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

The GSVs are architecture parameters of a DARTS-style bilevel optimisation: batches come in (train, valid) pairs; a
real AdamW step on the train batch gives ``w'``; the GSVs' gradient (:func:`architecture_gradient`, two forms, see
:data:`BILEVEL_MODES`) is applied by their own AdamW (3e-3, β = (0.5, 0.999), no weight decay); the weights are
restored and take an ordinary step on the train batch.  The default is what the official trainer computes (Zhang et
al., 2025, ``ArMoLA/src/mola_trainer_hacked.py``), the textbook second-order DARTS step (Liu et al., 2019) is the
other choice.  The recipe (:class:`SearchRecipe`) defaults to the official stage 1: the HF Trainer with its defaults
under ``ArMoLA/mola_training.py``, the LLaMA-2 script that the official README and ``run_train.sh`` run (its
``mola3_training.py`` twin for LLaMA-3 differs only in the balance loss: see :func:`search_config`).  The result is
exported as GuiLoMo's ``expert.json`` (``max(2, argmax + 1)`` experts per module) and ``rank.json`` (``argmax + 1``
per module and expert, all ``N_max`` experts), which ``"num_experts": "expert.json", "r": "rank.json"`` reads back
(:func:`stage_two_config` is the official stage-2 block).
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
from typing import cast

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm
from transformers import get_constant_schedule_with_warmup
from transformers import get_linear_schedule_with_warmup

from moepatch.lora_experts.config import DEFAULT_TARGETS
from moepatch.lora_experts.config import routed_expert_path
from moepatch.lora_experts.layers import LoraExperts
from moepatch.staged_output import staged_file

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
    weights: list[nn.Parameter] = []
    arch: list[nn.Parameter] = []
    for name, parameter in model.named_parameters():
        if parameter.requires_grad:
            (arch if any(marker in name for marker in ARCH_MARKERS) else weights).append(parameter)
    return weights, arch


def _grads(loss: torch.Tensor, parameters: list[nn.Parameter]) -> list[torch.Tensor]:
    grads = torch.autograd.grad(loss, parameters, allow_unused=True)
    return [torch.zeros_like(p) if g is None else g for p, g in zip(parameters, grads, strict=True)]


BILEVEL_MODES = ("official", "darts")
"""The GSVs' gradient (``d``: a weight-gradient direction, ``R = 0.01 / ‖d‖``, η the weights' learning rate):

* ``"official"`` — what GuiLoMo's trainer computes (``architect_step``): it never clears gradients between the virtual
  step's train backward and the validation backward (the ``zero_grad`` there is commented out) nor, for the GSVs,
  inside its Hessian-vector product (its ``zero_grad`` reaches the weights' optimizer only), so
  ``g = ∇α L_train(w) + ∇α L_val(w') + η · ∇α L_train(w − R d) / 2R`` with ``d = ∇w L_train(w) + ∇w L_val(w')``
  (``R = 0.01`` when ``d = 0``): the finite difference collapses to its ``w⁻`` term (the ``w⁺`` pass cancels and is
  skipped).  Its weights' optimizer keeps the virtual step's moment update: the trainer saves
  ``optimizer.state_dict()`` — references to the state tensors, which the step updates in place — and loads it back,
  which restores nothing but a still empty (first-step) state; the same calls are made here.  And its real step clips
  ``model.parameters()``: the GSVs' gradients (the one just applied plus the real step's) count in the clipping norm
  (:func:`search` does the same).
* ``"darts"`` — the textbook second-order step: ``g = ∇α L_val(w') − η · (∇α L_train(w + R d) − ∇α L_train(w − R d))
  / 2R`` with ``d = ∇w L_val(w')``, the weights' optimizer state restored exactly.
"""


def architecture_gradient(loss_fn: Any, train_batch: Any, valid_batch: Any, weights: list[nn.Parameter],
                          arch: list[nn.Parameter], optimizer: torch.optim.Optimizer, mode: str = "official"
                          ) -> list[torch.Tensor]:
    """The GSVs' gradient of one (train, valid) pair (GuiLoMo's ``architect_step``), ``mode`` one of
    :data:`BILEVEL_MODES`.

    ``loss_fn(batch)`` returns the scalar loss.  One real ``optimizer`` step on ``train_batch`` gives ``w'``; the
    weights are restored afterwards (and the optimizer state as ``mode`` says).
    """
    if mode not in BILEVEL_MODES:
        raise ValueError(f"bilevel: expected one of {BILEVEL_MODES}, got {mode!r}")
    if mode == "official":
        return _official_gradient(loss_fn, train_batch, valid_batch, weights, arch, optimizer)
    return _darts_gradient(loss_fn, train_batch, valid_batch, weights, arch, optimizer)


def _restore(weights: list[nn.Parameter], values: list[torch.Tensor]) -> None:
    with torch.no_grad():
        for w, value in zip(weights, values, strict=True):
            w.copy_(value)


def _shifted(weights: list[nn.Parameter], direction: list[torch.Tensor], alpha: float) -> None:
    with torch.no_grad():
        for w, d in zip(weights, direction, strict=True):
            w.add_(d, alpha=alpha)


def _official_gradient(loss_fn: Any, train_batch: Any, valid_batch: Any, weights: list[nn.Parameter],
                       arch: list[nn.Parameter], optimizer: torch.optim.Optimizer) -> list[torch.Tensor]:
    before = optimizer.state_dict()  # what the official trainer saves (and loads back at the end)
    saved = [w.detach().clone() for w in weights]
    eta = optimizer.param_groups[0]["lr"]
    count = len(weights)
    optimizer.zero_grad(set_to_none=True)
    raw = torch.autograd.grad(loss_fn(train_batch), weights + arch, allow_unused=True)
    for w, g in zip(weights, raw[:count], strict=True):
        w.grad = g  # a weight the loss does not reach keeps no gradient: AdamW leaves it (and its state) alone
    optimizer.step()  # w'
    optimizer.zero_grad(set_to_none=True)
    train = [torch.zeros_like(p) if g is None else g for p, g in zip(weights + arch, raw, strict=True)]
    valid = _grads(loss_fn(valid_batch), weights + arch)  # accumulated onto the train gradients, as the trainer does
    direction = [t + v for t, v in zip(train[:count], valid[:count], strict=True)]
    direct = [t + v for t, v in zip(train[count:], valid[count:], strict=True)]
    _restore(weights, saved)
    norm = float(torch.sqrt(cast(torch.Tensor, sum((d.float() * d.float()).sum() for d in direction))))
    radius = 0.01 / norm if norm > 0 else 0.01
    _shifted(weights, direction, -radius)
    minus = _grads(loss_fn(train_batch), arch)
    _restore(weights, saved)
    optimizer.load_state_dict(before)
    return [g + eta * m / (2 * radius) for g, m in zip(direct, minus, strict=True)]


def _darts_gradient(loss_fn: Any, train_batch: Any, valid_batch: Any, weights: list[nn.Parameter],
                    arch: list[nn.Parameter], optimizer: torch.optim.Optimizer) -> list[torch.Tensor]:
    saved = [w.detach().clone() for w in weights]
    saved_state = {id(p): {k: (v.clone() if torch.is_tensor(v) else v) for k, v in state.items()}
                   for p, state in optimizer.state.items()}
    eta = optimizer.param_groups[0]["lr"]
    optimizer.zero_grad(set_to_none=True)
    loss_fn(train_batch).backward(inputs=weights)
    optimizer.step()  # w' (a real step, as GuiLoMo does)
    optimizer.zero_grad(set_to_none=True)
    grads = _grads(loss_fn(valid_batch), weights + arch)
    d_weights, d_arch = grads[: len(weights)], grads[len(weights) :]
    _restore(weights, saved)
    norm = torch.sqrt(cast(torch.Tensor, sum((d * d).sum() for d in d_weights)))
    epsilon = 0.01 / float(norm) if float(norm) > 0 else 0.0
    if epsilon == 0.0:
        implicit = [torch.zeros_like(a) for a in arch]
    else:
        _shifted(weights, d_weights, epsilon)
        plus = _grads(loss_fn(train_batch), arch)
        _shifted(weights, d_weights, -2 * epsilon)
        minus = _grads(loss_fn(train_batch), arch)
        _restore(weights, saved)
        implicit = [(p - m) / (2 * epsilon) for p, m in zip(plus, minus, strict=True)]
    optimizer.state.clear()
    for p in weights:
        if id(p) in saved_state:
            optimizer.state[p] = saved_state[id(p)]
    return [da - eta * hv for da, hv in zip(d_arch, implicit, strict=True)]


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
    """Stage-1 optimisation; the defaults are the official recipe (``ArMoLA/mola_training.py`` on GuiLoMo's HF
    Trainer).

    The weights: AdamW (lr 3e-4, weight decay 0 — ``TrainingArguments``' default, the script sets none), the Trainer's
    default linear schedule with the script's 100 warm-up steps (one step = one train/valid pair), gradients clipped
    to norm 1.0 (``max_grad_norm``; 0 disables).  The GSVs: AdamW 3e-3, β = (0.5, 0.999), weight decay 0 — the script
    passes ``TrainingArguments_arch(arch_weight_decay=1e-3)`` but the trainer never reads it: its GSV optimizer takes
    the *weights'* ``weight_decay`` (0), so ``arch_weight_decay=1e-3`` is a deliberate departure.  ``bilevel``: the
    GSVs' gradient, one of :data:`BILEVEL_MODES` (``"official"``: the trainer's; ``"darts"``: the textbook step).
    Values are checked on creation (``ValueError`` naming the field).
    """

    lr: float = 3e-4
    weight_decay: float = 0.0
    warmup_steps: int = 100
    schedule: str = "linear"
    max_grad_norm: float = 1.0
    arch_lr: float = 3e-3
    arch_betas: tuple[float, float] = (0.5, 0.999)
    arch_weight_decay: float = 0.0
    bilevel: str = "official"

    def __post_init__(self) -> None:
        for name in ("lr", "arch_lr"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < float("inf"):
                raise ValueError(f"SearchRecipe.{name}: expected a finite number > 0, got {value!r}")
        for name in ("weight_decay", "max_grad_norm", "arch_weight_decay"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < float("inf"):
                raise ValueError(f"SearchRecipe.{name}: expected a finite number >= 0, got {value!r}")
        if isinstance(self.warmup_steps, bool) or not isinstance(self.warmup_steps, int) or self.warmup_steps < 0:
            raise ValueError(f"SearchRecipe.warmup_steps: expected an integer >= 0, got {self.warmup_steps!r}")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"SearchRecipe.schedule: expected one of {SCHEDULES}, got {self.schedule!r}")
        betas = self.arch_betas
        if not (isinstance(betas, tuple) and len(betas) == 2 and all(
                isinstance(b, (int, float)) and not isinstance(b, bool) and 0 <= b < 1 for b in betas)):
            raise ValueError(f"SearchRecipe.arch_betas: expected two numbers in [0, 1), got {betas!r}")
        if self.bilevel not in BILEVEL_MODES:
            raise ValueError(f"SearchRecipe.bilevel: expected one of {BILEVEL_MODES}, got {self.bilevel!r}")


def build_optimizers(weights: list[nn.Parameter], arch: list[nn.Parameter], recipe: SearchRecipe, steps: int
                     ) -> tuple[torch.optim.Optimizer, torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler]:
    """(weight AdamW, GSV AdamW, the weights' learning-rate schedule over ``steps`` steps) of ``recipe``, with
    transformers' own schedule functions (the Trainer's)."""

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

    weights, arch = split_parameters(model)
    if not arch:
        raise ValueError("guilomo search: the model has no GuidedSelection Vectors (inject SearchLoraExperts first)")
    schedule = [pair for _ in range(epochs) for pair in pairs(batches)]
    weight_optimizer, arch_optimizer, scheduler = build_optimizers(weights, arch, recipe, len(schedule))
    model.train()

    def loss_fn(batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return model(**batch).loss

    # official: the trainer clips model.parameters(), so the GSVs' gradients (the one just applied, plus this step's
    # train gradient on top) count in the norm the weights' gradients are clipped by
    clipped = weights + arch if recipe.bilevel == "official" else weights
    trace = []
    for train_batch, valid_batch in tqdm(schedule, desc="GuiLoMo search", disable=not progress):
        gradient = architecture_gradient(loss_fn, train_batch, valid_batch, weights, arch, weight_optimizer,
                                         recipe.bilevel)
        for parameter, grad in zip(arch, gradient, strict=True):
            parameter.grad = grad
        arch_optimizer.step()
        weight_optimizer.zero_grad(set_to_none=True)
        loss = loss_fn(train_batch)
        loss.backward(inputs=clipped)
        if recipe.max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(clipped, recipe.max_grad_norm)
        weight_optimizer.step()
        scheduler.step()
        weight_optimizer.zero_grad(set_to_none=True)
        arch_optimizer.zero_grad(set_to_none=True)
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
        if match is None:  # every expert set hangs at <projection>.lora_experts (<storage>.sets.<e> when routed)
            raise ValueError(f"guilomo: {path} is not where an expert set is attached")
        owner = match["owner"]
        if match["expert"] is not None:  # a routed expert's set: its own allocation, under its per-expert name
            owner = routed_expert_path(owner, match["projection"], int(match["expert"]))
        count, per_expert = module.allocation()
        experts[owner] = count
        ranks.update({f"{owner}.expertlora_E_vector_{i}": rank for i, rank in enumerate(per_expert)})
    return {"expert": experts, "rank": ranks}


def write_allocation(allocation: dict[str, Any], folder: str | Path) -> tuple[Path, Path]:
    """``expert.json`` and ``rank.json`` (indent 4, as GuiLoMo's ``save_rankandexp_num.py``)."""
    return write_allocation_files(allocation["expert"], allocation["rank"], folder)


def write_allocation_files(experts: dict[str, Any], ranks: dict[str, Any], folder: str | Path) -> tuple[Path, Path]:
    """Write the pair ``expert.json`` / ``rank.json`` as a pair: both are staged beside their targets and moved into
    place only once both are written, so a failure leaves the earlier pair as it was (never a new expert.json
    beside an old rank.json)."""

    folder = Path(folder)
    expert, rank = folder / "expert.json", folder / "rank.json"
    with staged_file(expert) as expert_scratch, staged_file(rank) as rank_scratch:
        expert_scratch.write_text(json.dumps(experts, indent=4), encoding="utf-8")
        rank_scratch.write_text(json.dumps(ranks, indent=4), encoding="utf-8")
    return expert, rank


STAGE_ONE_BALANCES = ("mola_training", "mola3_training")
"""The official stage-1 balance loss, per decoder layer (the layer's routers pooled), summed over layers, coefficient
1e-3: ``"mola_training"`` — ``ArMoLA/mola_training.py`` (LLaMA-2 modeling, the script the README and ``run_train.sh``
run) leaves the Switch factor N out; ``"mola3_training"`` — ``ArMoLA/mola3_training.py`` (LLaMA-3 modeling) keeps it."""


def search_config(targets: list[str], max_experts: int, max_rank: int, top_k: int = 2, dropout: float = 0.05,
                  routed_experts: bool = False, balance: str = "mola_training") -> dict[str, Any]:
    """The lora_experts block that builds the stage-1 model (swapped for SearchLoraExperts by ``to_search_layers``):
    LoRA dropout 0.05 and the balance loss of the official stage 1 (``balance``, one of :data:`STAGE_ONE_BALANCES`):
    moepatch's ``"layer"`` reduction (``N · Σ f P`` per layer, summed) with coefficient ``1e-3 / N_max`` — no factor
    N, ``ArMoLA/mola_training.py`` — or ``1e-3`` — with N, ``ArMoLA/mola3_training.py``.  ``routed_experts``: broad
    target names reach the routed experts too (one GSV set per routed expert)."""
    if balance not in STAGE_ONE_BALANCES:
        raise ValueError(f"balance: expected one of {STAGE_ONE_BALANCES}, got {balance!r}")
    coef = 1e-3 / max_experts if balance == "mola_training" else 1e-3
    return {"method": "mola", "target_modules": targets, "routed_experts": routed_experts, "num_experts": max_experts,
            "r": max_rank, "top_k": top_k, "dropout": dropout, "balance_loss": {"coef": coef, "reduction": "layer"}}


def stage_two_config(experts: Any = "expert.json", ranks: Any = "rank.json", *, top_k: Any = 2,
                     targets: list[str] | None = None, alpha: float = 16.0, dropout: float = 0.05,
                     routed_experts: bool = False) -> dict[str, Any]:
    """The lora_experts block of GuiLoMo's stage 2 (``MoLA_con``) on the stage-1 files: MoLA layers with the searched
    expert counts and ranks, kaiming routers, dropout 0.05, every expert of a module scaled by ``α / r_last``
    (``"scaling": "last_expert_rank"``, as its layer does) and its balance loss (``--obalance True`` in the README):
    **one term per module**, each with that module's own N, summed, coefficient 1e-3 — moepatch's ``"sum"``
    reduction, not MoLA's per-layer ``"layer"`` (which pools a layer's routers whenever they share (N, k), common
    after the ``max(2, ·)`` clipping)."""
    return {"method": "mola", "target_modules": list(targets or DEFAULT_TARGETS["mola"]),
            "routed_experts": routed_experts, "num_experts": experts, "r": ranks, "top_k": top_k, "alpha": alpha,
            "dropout": dropout, "router_init": "kaiming", "scaling": "last_expert_rank",
            "balance_loss": {"coef": 1e-3, "reduction": "sum"}}


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
