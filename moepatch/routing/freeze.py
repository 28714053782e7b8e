"""Gate freezing (``freeze_gate``; the Dynamic Data Mixing recipe of Zhu et al., 2024, freezes every *gate*).

Two rules, because "freeze the gate" means two different things in the literature:

``"router"`` (``freeze_gate: true``)
    Every parameter of every top-k router (``mlp.gate.weight`` in Qwen2-MoE, Mixtral, Qwen3-MoE, OLMoE).  Shared
    expert gates (Qwen2-MoE ``shared_expert_gate``) are *not* routers and stay trainable.
``"gate_substring"``
    The official Dynamic-Data-Mixing rule: every parameter whose qualified name contains ``"gate"``.  On the
    transformers 5 fused layout this includes ``mlp.experts.gate_up_proj``, i.e. the experts' gate **and up**
    projections (one tensor), plus Qwen2-MoE's ``shared_expert.gate_proj`` and ``shared_expert_gate`` and the
    ``gate_proj`` of dense MLP layers.  Each family file lists what it touches (``gate_substring_note``).

Frozen means ``requires_grad=False``: the parameter gets no ``.grad``, an optimizer built afterwards from
``requires_grad`` parameters (HF Trainer, DeepSpeed) does not hold it, and it stays unchanged by optimizer steps.
Apply freezing *before* ``deepspeed.initialize`` / FSDP wrapping so the engine sees the final trainable set.

Selection biases (DeepSeek-V3's ``e_score_correction_bias`` and its kin, added to the scores before the top-k only)
are not frozen by either rule: a buffer is no parameter (no gradient, no optimizer holds it) and ERNIE's bias
parameter has ``requires_grad=False`` already, so freezing leaves them exactly as they are; only the ``bias_update``
feature (:mod:`moepatch.routing.bias_update`) moves them.  The apply log and ``inspect`` say so for such routers.

Interaction with the load-balancing loss: freezing changes no loss.  If the model computes its auxiliary loss
(transformers adds ``router_aux_loss_coef * load_balancing_loss`` only with ``output_router_logits=True`` and labels),
its gradient still flows through the router logits into the hidden states, i.e. into attention, experts and
embeddings of earlier layers; only the frozen weights themselves stop moving (Dynamic Data Mixing, Zhu et al.,
2024, relies on this).
"""

from __future__ import annotations

from enum import Enum
from pathlib import Path
from typing import Any

import torch
from torch import nn

from model_patches.spec import read_attribute
from model_patches.structure import MoEModel
from model_patches.structure import extra_routers
from moepatch.feature import Feature
from moepatch.feature import Installed
from moepatch.feature import Planned
from moepatch.schema import ConfigEntry
from moepatch.undo import UndoLog
from moepatch.validation import Problems


def parameters_to_freeze(model: MoEModel, mode: str) -> list[tuple[str, nn.Parameter]]:
    """The ``(qualified name, parameter)`` pairs that ``mode`` freezes, names relative to ``model.root``.

    Raises:
        ValueError: ``mode`` is unknown, or the rule matches no parameter (freezing nothing is always a mistake).
    """
    named = list(model.root.named_parameters())
    if mode == "router":
        routers = [layer.router for layer in model.layers if layer.index not in model.hashed_layers]
        routers += extra_routers(model)
        router_ids = {id(p) for router in routers for p in router.parameters()}
        chosen = [(name, p) for name, p in named if id(p) in router_ids]
    elif mode == "gate_substring":
        chosen = [(name, p) for name, p in named if "gate" in name]
    else:
        raise ValueError(f"moepatch.freeze_gate: unknown mode {mode!r}; expected 'router' or 'gate_substring'")
    if not chosen:
        raise ValueError(
            f"moepatch.freeze_gate: rule {mode!r} matches no parameter of {type(model.root).__name__} "
            f"(family {model.family.name}); nothing would be frozen"
        )
    return chosen


class FrozenParameters(list):
    """The ``(name, parameter)`` pairs a plan freezes (a plain list to every reader), with a note on the routers'
    selection bias for the log line."""

    selection_bias_note: str | None = None


def selection_bias_note(model: MoEModel, frozen: list[tuple[str, nn.Parameter]]) -> str | None:
    """What freezing does to the routers' selection bias (``None`` when the routing rule names none).

    A selection bias only moves when the ``bias_update`` feature moves it; users freezing "the router" of a
    DeepSeek-V3-style model should not have to guess whether the bias was frozen with it.
    """
    path = model.family.routing.selection_bias
    if path is None or not model.layers:
        return None
    layer = model.layers[0]
    tensor = read_attribute(layer.router, layer.block, path)
    if not isinstance(tensor, torch.Tensor):
        return None
    shown = f"`{path.lstrip('^')}`" + (" of the MoE block" if path.startswith("^") else "")
    if not isinstance(tensor, nn.Parameter):
        what = "a buffer, not a parameter: left unchanged by freezing; only bias_update moves it"
    elif not tensor.requires_grad:
        what = "a parameter without gradient (requires_grad=False): left unchanged; only bias_update moves it"
    elif any(p is tensor for _, p in frozen):
        what = "a trainable parameter: frozen by this rule"
    else:
        what = "a trainable parameter this rule does not freeze"
    return f"selection bias {shown} is {what}"


def freeze(parameters: list[tuple[str, nn.Parameter]], undo: UndoLog) -> list[str]:
    """Set ``requires_grad=False`` on ``parameters`` (recorded in ``undo``); return their names."""
    for _, parameter in parameters:
        undo.set_requires_grad(parameter, False)
    return [name for name, _ in parameters]


class FreezeRule(str, Enum):
    """The ``freeze_gate`` config: which rule freezes (a ``str``, so ``config.freeze_gate == "router"`` holds)."""

    ROUTER = "router"
    GATE_SUBSTRING = "gate_substring"

    def __str__(self) -> str:
        return self.value

    def __repr__(self) -> str:
        return repr(self.value)


FREEZE_MODES = tuple(rule.value for rule in FreezeRule)


class FreezeGate(Feature):
    """``"freeze_gate": true | "router" | "gate_substring" | false``: stop routing parameters from training."""

    name = "freeze_gate"
    handle_attributes = {"frozen_parameters": []}
    off_summary = "frozen=0"

    def parse(self, data: Any, path: str, problems: Problems) -> FreezeRule | None:
        if data is None or data is False:
            return None
        if data is True:
            return FreezeRule.ROUTER
        if isinstance(data, str) and data in FREEZE_MODES:
            return FreezeRule(data)
        problems.add(path, f"expected true, false, 'router' or 'gate_substring', got {data!r}")
        return None

    def to_dict(self, config: FreezeRule) -> str:
        return config.value

    def config_entry(self) -> ConfigEntry:
        return ConfigEntry(self.name, 'true (= "router") | "router" | "gate_substring" | false',
                           "Freeze every top-k router's parameters ('router'), or every parameter whose name contains "
                           "'gate' ('gate_substring', the Dynamic Data Mixing code's rule).")

    def plan(self, structure: MoEModel, config: FreezeRule, checkpoint: Path | None) -> Planned:
        chosen = FrozenParameters(parameters_to_freeze(structure, config.value))
        chosen.selection_bias_note = selection_bias_note(structure, chosen)
        if structure.hashed_layers and config is FreezeRule.ROUTER:
            hashed = type(structure.layer(structure.hashed_layers[0]).router).__name__
            skipped = (f"layers {list(structure.hashed_layers)} left out: their router ({hashed}) chooses by a fixed "
                       "hash of the token id, so there is no learned choice to freeze")
            note = chosen.selection_bias_note
            chosen.selection_bias_note = skipped if note is None else f"{note}; {skipped}"
        return Planned(config, chosen)

    def install(self, structure: MoEModel, planned: Planned, undo: UndoLog) -> Installed:
        names = freeze(planned.detail, undo)
        return Installed({"frozen_parameters": names}, len(names), f"frozen={len(names)}")

    def describe(self, planned: Planned) -> str:
        note = getattr(planned.detail, "selection_bias_note", None)
        return f"freeze_gate={planned.config.value!r}: {len(planned.detail)} parameters" + (f"; {note}" if note else "")


FREEZE_GATE = FreezeGate()
