"""The ``bias_update`` feature: aux-loss-free load balancing by moving each router's selection bias.

DeepSeek-V3 (DeepSeek-AI, "DeepSeek-V3 Technical Report", 2024, §2.1.2) balances its experts without an auxiliary
loss: the router adds a per-expert *selection bias* ``b`` to its scores before the top-k only (the expert weights
never see it), and after every training step each bias moves by a fixed rate ``γ`` towards balance::

    b_i ← b_i + γ · sign(mean_load − load_i)        per MoE layer, load_i = tokens routed to expert i in the step

An overloaded expert's bias goes down, an underloaded one's up, an expert exactly at the mean keeps its bias.
transformers ships the biases (DeepSeek-V3 / GLM-4.5 / Kimi ``e_score_correction_bias`` buffers, ERNIE 4.5's
``moe_statics.e_score_correction_bias`` parameter, MiniMax-M2's buffer on the sparse block, ...) but never updates
them, so fine-tuning such a model leaves the biases fixed while the routers drift.  This feature applies the rule:

.. code-block:: json

    {"moepatch": {"bias_update": {"rate": 0.001, "layers": null}}}

``rate`` is ``γ`` (a positive, finite number; DeepSeek-V3 used 0.001 for most of its pre-training); ``layers``
(optional, like ``routing_stats``) names the decoder layers whose biases move, ``null`` = every MoE layer.  Where
the bias lives is read from the family's :class:`~model_patches.spec.RoutingRule` (``selection_bias``), never from a
family name.  A model whose routers have no selection bias (softmax → top-k routers such as Qwen2-MoE, gpt-oss's
top-k of logits) is refused, naming its router class; so is a model whose exact routing rule moepatch does not know
(the tensor at the rule's path is only known to be a selection bias once the rule was verified).

**What is counted.** ``load_i`` counts the (token, slot) assignments the layer's experts really received — read by a
:class:`~moepatch.routing.recorder.RoutingRecorder` through :func:`~moepatch.routing.tap.tap_routing`, so a routing
override (C2R) is counted as it chose — over the non-padding tokens of every *training-mode* forward since the last
update: all gradient-accumulation micro-batches of the step, each once (activation checkpointing's re-run of a
forward inside backward is not counted again).  Forwards in eval mode (evaluation, the probe rounds of dynamic data
mixing) are not training steps and are not counted.  When ``torch.distributed`` is initialised the loads are summed
over the ranks (an all-reduce of the default group, or :attr:`BiasUpdater.group`) so every data-parallel rank applies
the identical update; the sign makes the rule insensitive to a uniform scaling of the loads, so ranks that see the
same tokens (tensor parallelism) do not bias it.

**When.** :meth:`BiasUpdater.step` applies the update and resets the counts.  Call it after each optimizer step:
:meth:`BiasUpdater.attach` does so for a plain PyTorch loop (``optimizer.register_step_post_hook``);
:class:`BiasUpdateCallback` does so for the HF Trainer (``on_step_end``, after the optimizer step — also under
DeepSpeed, whose engine handles gradient accumulation; ``scripts/finetune.py`` adds it by itself when the model's
moepatch block has ``bias_update``).  With a raw DeepSpeed engine call ``step()`` after ``engine.step()`` at
gradient-accumulation boundaries.  The update is made in place under ``torch.no_grad`` in the bias's own dtype and
on its device (a bias kept in bfloat16 may be too coarse for a small rate: the first absorbed update warns).

**ZeRO-3.** A bias stored as a Parameter (ERNIE) is partitioned by ZeRO-3: the update gathers it with
``deepspeed.zero.GatheredParameters(..., modifier_rank=0)``, adds the (identical on every rank) step and lets
DeepSpeed re-partition it.  ``modifier_rank=None`` would not do: DeepSpeed discards (recent versions refuse)
in-place changes made under it.  Buffers (DeepSeek-V3, MiniMax-M2) are never partitioned.

**Frozen routers, C2R.** ``freeze_gate`` freezes the router's parameters; a selection-bias buffer is no parameter
and an ERNIE bias parameter has ``requires_grad=False`` already, so freezing never stops this update (and only this
update moves the bias).  A bias that is a *trainable* parameter is refused: the optimizer would move it as well.

**remove().** ``handle.remove()`` stops the updates (hooks, optimizer hooks; a Trainer callback still registered
does nothing afterwards) and **keeps the biases as trained**: they are the product of training like any optimizer-
updated weight (removing ``freeze_gate`` does not roll back the weights trained under it either).  This is the one
exception to "remove() restores the model exactly".  :meth:`BiasUpdater.restore_biases` puts back the values the
biases had before the first update, when that is what is wanted.

Example:
    ```python
    handle = moepatch.apply(model, {"bias_update": {"rate": 1e-3}, "freeze_gate": "router"})
    handle.bias_updater.attach(optimizer)        # plain loop: the biases move after every optimizer.step()
    ...
    trainer = Trainer(model=model, ..., callbacks=[BiasUpdateCallback(handle.bias_updater)])  # or the Trainer
    ```
"""

from __future__ import annotations

import functools
import logging
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING
from typing import Any

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle
from transformers import TrainerCallback

from model_patches.routing_rule import selection_bias_of
from model_patches.spec import read_attribute
from model_patches.structure import LayerIndexError
from model_patches.structure import MoEModel
from model_patches.structure import resolve_layer_indices
from moepatch.errors import MoePatchWarning
from moepatch.feature import Feature
from moepatch.feature import Installed
from moepatch.feature import Planned
from moepatch.feature import active_handle
from moepatch.routing.bias_update_config import BIAS_UPDATE_SCHEMA
from moepatch.routing.bias_update_config import BiasUpdateConfig
from moepatch.routing.recorder import RoutingRecorder
from moepatch.schema import ConfigEntry
from moepatch.validation import Problems

if TYPE_CHECKING:
    from moepatch.undo import UndoLog

logger = logging.getLogger("moepatch")

__all__ = [
    "BIAS_UPDATE",
    "AuxLossFreeBalancing",
    "BiasTarget",
    "BiasUpdate",
    "BiasUpdateCallback",  # noqa: F822 (built on first access by the module's __getattr__)
    "BiasUpdateConfig",
    "BiasUpdater",
    "bias_update_callbacks",
    "plan_bias_targets",
]


# ---------------------------------------------------------------------------------------------- plan
@dataclass(frozen=True)
class BiasTarget:
    """Where one MoE layer's selection bias lives: read anew at every update (``model.to()`` replaces buffers)."""

    layer: int
    """Absolute decoder-layer index."""
    name: str
    """Qualified name of the bias tensor in the model (``model.layers.1.mlp.gate.e_score_correction_bias``)."""
    router: nn.Module
    block: nn.Module
    path: str
    """The rule's ``selection_bias`` path (``^`` = on the block)."""

    def tensor(self) -> torch.Tensor:
        """The bias tensor now (the same object as planned unless the model was moved or reloaded since)."""
        value = read_attribute(self.router, self.block, self.path)
        if not isinstance(value, torch.Tensor):  # checked when planned; only a model changed since gets here
            raise RuntimeError(f"moepatch.bias_update: the selection bias {self.name} is gone from layer {self.layer}")
        return value


def _full_shape(tensor: torch.Tensor) -> tuple[int, ...]:
    """The tensor's shape, also for a ZeRO-3 partitioned parameter (whose local ``shape`` is empty)."""
    return tuple(getattr(tensor, "ds_shape", tensor.shape))


def _partitioned(tensor: torch.Tensor) -> bool:
    """A DeepSpeed ZeRO-3 parameter (its data lives in shards between forwards)."""
    return hasattr(tensor, "ds_id")


def _tensor_names(root: nn.Module) -> dict[int, str]:
    names = {id(t): n for n, t in root.named_buffers(remove_duplicate=False)}
    names.update({id(t): n for n, t in root.named_parameters(remove_duplicate=False)})
    return names


def plan_bias_targets(structure: MoEModel, layers: list[int] | None, field_path: str) -> list[BiasTarget]:
    """Check that the selected layers' routers have a selection bias the update may move; change nothing.

    Raises:
        ValueError: naming ``field_path``: the routing rule is not known exactly, the routers have no selection bias,
            a layer lacks the tensor, or the tensor is not a floating ``[E]``-sized non-trainable tensor.
    """
    structure.require_routing_rule(field_path)
    rule = structure.family.routing
    router_class = type(structure.layers[0].router).__name__
    if rule.selection_bias is None:
        raise ValueError(
            f"{field_path}: {router_class} ({structure.family.name}) has no selection bias (a per-expert bias added "
            f"to the scores for the top-k only): its router chooses the top-k of its {rule.selects_on}; the "
            "aux-loss-free bias update (DeepSeek-V3, §2.1.2) moves such a bias, so there is nothing to update"
        )
    if rule.skip_class:
        raise ValueError(
            f"{field_path}: {router_class} ({structure.family.name}) adds its selection bias `{rule.selection_bias}` "
            f"to {structure.num_experts} experts and a skip class, which chooses no expert and so has no load to "
            "balance: the aux-loss-free bias update (one entry per expert, moved by that expert's load) does not "
            "say how to move the skip class's entry, and moepatch does not guess"
        )
    indices = resolve_layer_indices(structure, layers, f"{field_path}.layers")
    hashed = [index for index in indices if index in structure.hashed_layers]
    if layers is None:  # every MoE layer with a learned choice
        indices = [index for index in indices if index not in hashed]
    elif hashed:
        raise ValueError(f"{field_path}.layers: layers {hashed} route by a fixed hash of the token id "
                         f"({type(structure.layer(hashed[0]).router).__name__}): no selection bias to balance")
    names = _tensor_names(structure.root)
    targets, problems = [], []
    for index in indices:
        layer = structure.layer(index)
        where = f"layer {index} ({type(layer.router).__name__})"
        tensor = selection_bias_of(rule, layer.router, layer.block)
        if tensor is None:
            problems.append(f"{where}: its router has no selection bias at `{rule.selection_bias}`")
            continue
        name = names.get(id(tensor), f"{layer.name}.{rule.selection_bias.lstrip('^')}")
        shape = _full_shape(tensor)
        if not tensor.is_floating_point():
            problems.append(f"{where}: selection bias {name} has dtype {tensor.dtype}; expected a floating dtype")
        elif int(torch.Size(shape).numel()) != structure.num_experts or max(shape, default=0) != structure.num_experts:
            problems.append(f"{where}: selection bias {name} has shape {list(shape)}; expected one entry per routed "
                            f"expert ({structure.num_experts})")
        elif isinstance(tensor, nn.Parameter) and tensor.requires_grad:
            problems.append(f"{where}: selection bias {name} is a trainable parameter (requires_grad=True): the "
                            "optimizer would move it as well; set requires_grad=False")
        else:
            targets.append(BiasTarget(index, name, layer.router, layer.block, rule.selection_bias))
    if problems:  # one problem per layer, each counted by the commands that list them
        raise LayerIndexError([(field_path, problem) for problem in problems])
    return targets


# ---------------------------------------------------------------------------------------------- loads
@dataclass(frozen=True)
class BiasUpdate:
    """What one :meth:`BiasUpdater.step` did (kept as :attr:`BiasUpdater.last_update`)."""

    step: int
    """1 for the first update of this updater."""
    layers: list[int]
    """Absolute decoder-layer indices, the rows of the tensors below."""
    local_loads: torch.Tensor
    """int64 ``[L, E]``: this rank's loads (expert slots over non-padding tokens) since the previous update."""
    loads: torch.Tensor
    """int64 ``[L, E]``: the loads summed over the ranks (= :attr:`local_loads` in a single process)."""
    signs: torch.Tensor
    """int64 ``[L, E]`` in ``{-1, 0, 1}``: ``sign(mean_load − load_i)``; each bias moved by ``rate · sign``."""
    rate: float

    @property
    def mean_loads(self) -> torch.Tensor:
        """float64 ``[L]``: the mean load of each layer."""
        return self.loads.double().mean(dim=1)

    @property
    def max_violation(self) -> torch.Tensor:
        """float64 ``[L]``: ``(max_i load_i − mean) / mean`` (DeepSeek-V3's MaxVio; 0 when nothing was routed)."""
        mean = self.mean_loads
        return torch.where(mean > 0, (self.loads.double().amax(dim=1) - mean) / mean.clamp_min(1e-30),
                           torch.zeros_like(mean))


@contextmanager
def _gathered(tensors: list[torch.Tensor], *, modify: bool) -> Iterator[None]:
    """Full ZeRO-3 partitioned parameters among ``tensors`` (a collective), to read or to change alike on every rank.

    To change them, ``modifier_rank=0``: on exit rank 0's (identical) values are broadcast and DeepSpeed re-partitions
    with the change kept; under ``modifier_rank=None`` DeepSpeed drops (recent versions refuse) in-place changes.
    """
    partitioned = [t for t in tensors if _partitioned(t)]
    if not partitioned:
        yield
        return
    import deepspeed

    with deepspeed.zero.GatheredParameters(partitioned, modifier_rank=0 if modify else None):
        yield


class BiasUpdater:
    """Counts the loads of the selected MoE layers and moves their selection biases after each step.

    Built by ``moepatch.apply`` for ``"bias_update"`` (``handle.bias_updater``); see the module docstring for what is
    counted, when to call :meth:`step` and what :meth:`remove` keeps.

    Args:
        structure (`MoEModel`): the model's resolved structure.
        targets (`list[BiasTarget]`): the planned biases (:func:`plan_bias_targets`).
        rate (`float`): ``γ``.
        group (*optional*): the ``torch.distributed`` group of the data-parallel ranks (default: the whole world).
    """

    def __init__(self, structure: MoEModel, targets: list[BiasTarget], rate: float, *, group: Any = None) -> None:
        self.structure = structure
        self.targets = list(targets)
        self.rate = float(rate)
        self.group = group
        self.layers = [target.layer for target in self.targets]
        self.steps = 0
        self.last_update: BiasUpdate | None = None
        self._recorder = RoutingRecorder(structure.root, self.layers, structure=structure, training_only=True)
        self._optimizer_hooks: list[RemovableHandle] = []
        self._initial: list[torch.Tensor] | None = None
        self._warned_absorbed = False
        self._active = False

    # ------------------------------------------------------------------ life
    @property
    def active(self) -> bool:
        """True between :meth:`start` and :meth:`remove`."""
        return self._active

    def start(self) -> BiasUpdater:
        """Start counting (idempotent)."""
        self._recorder.start()
        self._active = True
        return self

    def remove(self) -> None:
        """Stop counting and updating: routing hooks and optimizer hooks go; the biases keep their trained values."""
        self._recorder.stop()
        for hook in self._optimizer_hooks:
            hook.remove()
        self._optimizer_hooks.clear()
        self._recorder.reset()
        self._active = False

    def attach(self, optimizer: torch.optim.Optimizer) -> RemovableHandle:
        """Run :meth:`step` after every ``optimizer.step()`` (a plain PyTorch loop); removed by :meth:`remove`.

        With gradient accumulation the optimizer steps once per accumulated step, so every micro-batch counts
        towards that step's loads.  A step skipped by ``GradScaler`` (inf gradients) runs no hook: its loads count
        towards the next step.
        """
        self._require_active()
        def after_step(optimizer: torch.optim.Optimizer, args: tuple, kwargs: dict) -> None:
            self.step()

        hook = optimizer.register_step_post_hook(after_step)
        self._optimizer_hooks.append(hook)
        return hook

    def _require_active(self) -> None:
        if not self._active:
            raise RuntimeError("moepatch.bias_update: this updater was removed (handle.remove()); apply again to "
                               "update the biases")

    # ------------------------------------------------------------------ loads
    @property
    def pending_loads(self) -> torch.Tensor:
        """int64 ``[L, E]``: this rank's loads counted since the last update (not yet summed over ranks)."""
        return self._recorder.counts

    def reset(self) -> None:
        """Drop the loads counted so far (the Trainer callback calls it when training begins)."""
        self._recorder.reset()

    # ------------------------------------------------------------------ update
    def step(self) -> BiasUpdate:
        """Apply ``b_i ← b_i + rate · sign(mean_load − load_i)`` to every selected layer from the loads since the
        last step, then reset the counts.

        A collective when ``torch.distributed`` is initialised (the all-reduce of the loads; under ZeRO-3 also the
        gather of a partitioned bias): call it on every rank.

        Returns:
            `BiasUpdate`: the local and summed loads and the signs applied (also :attr:`last_update`).
        """
        self._require_active()
        local = self._recorder.counts
        loads = self._recorder.all_reduce(self.group).counts
        self._recorder.reset()
        num_experts = loads.shape[1]
        # sign(mean − load_i) = sign(total − E·load_i): exact in integers, no rounding of the mean
        signs = torch.sign(loads.sum(dim=1, keepdim=True) - num_experts * loads)
        tensors = [target.tensor() for target in self.targets]
        with _gathered(tensors, modify=True), torch.no_grad():
            if self._initial is None:
                self._initial = [tensor.detach().clone() for tensor in tensors]
            absorbed = []
            for target, tensor, sign in zip(self.targets, tensors, signs, strict=True):
                delta = sign.to(device=tensor.device, dtype=tensor.dtype).reshape(tensor.shape) * self.rate
                before = tensor.detach().clone()
                tensor.add_(delta)
                if not self._warned_absorbed and bool(((tensor == before) & (delta != 0)).any()):
                    absorbed.append(f"{target.name} ({tensor.dtype})")
        if absorbed:
            self._warned_absorbed = True
            warnings.warn(f"moepatch.bias_update: a step of {self.rate} left some entries of {', '.join(absorbed)} "
                          "unchanged (below the dtype's resolution at their value); keep the biases in float32 or "
                          "raise the rate", MoePatchWarning, stacklevel=2)
        self.steps += 1
        self.last_update = BiasUpdate(self.steps, list(self.layers), local, loads, signs, self.rate)
        if logger.isEnabledFor(logging.DEBUG):
            logger.debug("moepatch.bias_update: step %d, max violation per layer %s", self.steps,
                         [round(v, 4) for v in self.last_update.max_violation.tolist()])
        return self.last_update

    def biases(self) -> dict[int, torch.Tensor]:
        """Absolute layer → a CPU copy of its selection bias as it is now (gathered under ZeRO-3: a collective)."""
        tensors = [target.tensor() for target in self.targets]
        with _gathered(tensors, modify=False):
            return {target.layer: tensor.detach().cpu().clone()
                    for target, tensor in zip(self.targets, tensors, strict=True)}

    def restore_biases(self) -> None:
        """Put back the values the biases had before this updater's first update (also after :meth:`remove`).

        Nothing to do when no update ran.  A collective under ZeRO-3 (the gather of partitioned biases).
        """
        if self._initial is None:
            return
        tensors = [target.tensor() for target in self.targets]
        with _gathered(tensors, modify=True), torch.no_grad():
            for tensor, initial in zip(tensors, self._initial, strict=True):
                tensor.copy_(initial.to(device=tensor.device, dtype=tensor.dtype))

    def __repr__(self) -> str:
        return (f"BiasUpdater(rate={self.rate}, layers={self.layers}, steps={self.steps}, "
                f"active={self._active})")


# ---------------------------------------------------------------------------------------------- feature
class AuxLossFreeBalancing(Feature):
    """``"bias_update": {"rate": γ}``: the aux-loss-free balancing update of the routers' selection biases."""

    name = "bias_update"
    handle_attributes = {"bias_updater": None}
    off_summary = "bias_update=False"

    def parse(self, data: Any, path: str, problems: Problems) -> BiasUpdateConfig | None:
        return BiasUpdateConfig.parse(data, path, problems)

    def to_dict(self, config: BiasUpdateConfig) -> dict[str, Any]:
        return config.to_dict()

    def config_entry(self) -> ConfigEntry:
        return ConfigEntry(self.name, '{"rate": 0.001, "layers": [...] | null} | false',
                           "Aux-loss-free balancing: move each router's selection bias after every optimizer step "
                           "(DeepSeek-V3).", BIAS_UPDATE_SCHEMA.fields)

    def plan(self, structure: MoEModel, config: BiasUpdateConfig, checkpoint: Path | None) -> Planned:
        return Planned(config, plan_bias_targets(structure, config.layers, self.field_path()))

    def install(self, structure: MoEModel, planned: Planned, undo: UndoLog) -> Installed:
        updater = BiasUpdater(structure, planned.detail, planned.config.rate).start()
        undo.add_callback(updater.remove)
        return Installed({"bias_updater": updater}, len(planned.detail), f"bias_update_layers={len(planned.detail)}")

    def describe(self, planned: Planned) -> str:
        targets = planned.detail
        path = targets[0].path
        where = f"`{path.lstrip('^')}`" + (" of the MoE blocks" if path.startswith("^") else "")
        return (f"bias_update: rate {planned.config.rate} on the selection biases of MoE layers "
                f"{[t.layer for t in targets]} ({where}), after every optimizer step")


BIAS_UPDATE = AuxLossFreeBalancing()


# ---------------------------------------------------------------------------------------------- Trainer
@functools.lru_cache(maxsize=1)
def _callback_class() -> type:
    """:class:`BiasUpdateCallback`, built on first use: importing the Trainer's callback module costs ``import
    moepatch`` time that only training needs."""

    class BiasUpdateCallback(TrainerCallback):
        """HF Trainer callback running :meth:`BiasUpdater.step` after every optimizer step (``on_step_end``).

        The Trainer calls ``on_step_end`` once per optimizer step — after the gradient-accumulation micro-batches,
        after DeepSpeed's ``engine.step()`` — on every rank, as the all-reduce of the loads needs.  Loads counted
        before training begins (a forward the user ran in training mode) are dropped at ``on_train_begin``.  After
        ``handle.remove()`` it does nothing.

        Args:
            updater (`BiasUpdater`): ``handle.bias_updater``.
        """

        def __init__(self, updater: BiasUpdater) -> None:
            if not isinstance(updater, BiasUpdater):
                raise TypeError(f"BiasUpdateCallback: expected a BiasUpdater (handle.bias_updater), got "
                                f"{type(updater).__name__}")
            self.updater = updater

        def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> Any:
            if self.updater.active:
                self.updater.reset()
            return control

        def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> Any:
            # A step the loss scaler skipped (fp16 inf / NaN gradients: accelerate's ``step_was_skipped``, DeepSpeed's
            # overflow) moved no weight: the biases wait too, and its loads count towards the next step — as with
            # :meth:`BiasUpdater.attach`, whose post-step hook such a step never runs.
            if self.updater.active and not getattr(kwargs.get("optimizer"), "step_was_skipped", False):
                self.updater.step()
            return control

    BiasUpdateCallback.__module__ = __name__
    BiasUpdateCallback.__qualname__ = "BiasUpdateCallback"
    return BiasUpdateCallback


def __getattr__(name: str) -> Any:
    if name == "BiasUpdateCallback":
        return _callback_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def bias_update_callbacks(model: nn.Module) -> list[Any]:
    """``[BiasUpdateCallback(...)]`` when ``model`` is patched with ``bias_update``, else ``[]`` (for Trainers)."""

    handle = active_handle(model)
    updater = handle.bias_updater if handle is not None else None
    return [_callback_class()(updater)] if updater is not None else []
