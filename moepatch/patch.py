"""``moepatch.apply``: validate the whole config against the model, then patch the instance, reversibly.

Order of work, so that a failed ``apply`` never leaves a half-patched model:

1. parse and validate the config (``ValueError`` naming each bad field);
2. resolve the model's family (``UnsupportedModelError`` naming the class and the supported families);
3. plan every feature against the model (layer indices, parameters to freeze) — still no change;
4. only then change the model, recording each change in the handle's :class:`~moepatch.undo.UndoLog`.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from dataclasses import field
from pathlib import Path
from typing import Any

from torch import nn

from model_patches.structure import MoEModel
from model_patches.structure import describe
from model_patches.structure import resolve_layer_indices
from moepatch.c2r import C2RPlan
from moepatch.c2r import install_c2r
from moepatch.c2r import plan_c2r
from moepatch.config import CONFIG_KEY
from moepatch.config import MoePatchConfig
from moepatch.errors import MoePatchWarning
from moepatch.errors import UnsupportedModelError
from moepatch.freeze import freeze
from moepatch.freeze import parameters_to_freeze
from moepatch.recorder import RoutingRecorder
from moepatch.undo import UndoLog

logger = logging.getLogger("moepatch")

_HANDLE_ATTRIBUTE = "_moepatch_handle"


class PatchHandle:
    """What one :func:`apply` did to a model, and the means to undo it.

    Attributes:
        model: the model as given to :func:`apply`.
        config: the validated :class:`~moepatch.config.MoePatchConfig` in force.
        moe_model: the resolved :class:`~model_patches.structure.MoEModel` (``None`` for an empty handle of an
            unsupported model under ``strict=False``).
        frozen_parameters: qualified names of the parameters frozen by ``freeze_gate``.
        recorder: the :class:`~moepatch.recorder.RoutingRecorder` started by ``routing_stats`` (or ``None``).
        c2r_routers: qualified names of the routers whose selection C2R constrains.
        lora_targets: module paths that carry LoRA / (IA)³ experts.
    """

    def __init__(self, model: nn.Module, config: MoePatchConfig, moe_model: MoEModel | None) -> None:
        self.model = model
        self.config = config
        self.moe_model = moe_model
        self.frozen_parameters: list[str] = []
        self.recorder: RoutingRecorder | None = None
        self.c2r_routers: list[str] = []
        self.lora_targets: list[str] = []
        self._undo = UndoLog()
        self._active = True

    @property
    def active(self) -> bool:
        """False once :meth:`remove` has run."""
        return self._active

    @property
    def is_empty(self) -> bool:
        """True when this handle changed nothing in the model's behaviour."""
        return not (self.frozen_parameters or self.recorder is not None or self.c2r_routers or self.lora_targets)

    def remove(self) -> None:
        """Undo every change of this apply, newest first; the model is exactly as before. Idempotent."""
        if not self._active:
            return
        self._undo.undo()
        self._active = False

    def __enter__(self) -> PatchHandle:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.remove()

    def __repr__(self) -> str:
        family = self.moe_model.family.name if self.moe_model else None
        return (
            f"PatchHandle(family={family!r}, active={self._active}, frozen={len(self.frozen_parameters)}, "
            f"routing_stats={self.recorder is not None}, c2r_layers={len(self.c2r_routers)}, "
            f"lora_experts={len(self.lora_targets)})"
        )


@dataclass
class PatchPlan:
    """What :func:`apply` will change, computed (and validated) before anything is changed."""

    to_freeze: list[tuple[str, nn.Parameter]] = field(default_factory=list)
    stats_layers: list[int] | None = None
    c2r: C2RPlan | None = None
    lora_targets: list[Any] | None = None
    lora_weights: dict[str, Any] | None = None


def _checkpoint_dir(model: nn.Module) -> Path | None:
    name = getattr(getattr(model, "config", None), "_name_or_path", None)
    return Path(name) if name and Path(name).is_dir() else None


def plan_patch(moe_model: MoEModel, config: MoePatchConfig) -> PatchPlan:
    """Validate ``config`` against ``moe_model`` and return the plan; ``ValueError`` naming the field otherwise."""
    plan = PatchPlan()
    if config.c2r is not None:
        plan.c2r = plan_c2r(moe_model, config.c2r, _checkpoint_dir(moe_model.inner))
    if config.freeze_gate:
        plan.to_freeze = parameters_to_freeze(moe_model, config.freeze_gate)
    if config.lora_experts is not None:
        from moepatch.lora_experts.inject import plan_lora_experts
        from moepatch.lora_experts.inject import read_saved_lora_weights

        folder = _checkpoint_dir(moe_model.inner)
        plan.lora_targets = plan_lora_experts(moe_model, config.lora_experts, folder, f"{CONFIG_KEY}.lora_experts")
        plan.lora_weights = read_saved_lora_weights(folder, config.lora_experts)
    if config.routing_stats is not None and config.routing_stats.enabled:
        plan.stats_layers = resolve_layer_indices(
            moe_model, config.routing_stats.layers, f"{CONFIG_KEY}.routing_stats.layers"
        )
    return plan


def get_handle(model: nn.Module) -> PatchHandle | None:
    """The active handle of ``model``, or ``None`` if moepatch has not patched it."""
    handle = model.__dict__.get(_HANDLE_ATTRIBUTE)
    return handle if handle is not None and handle.active else None


def _resolve_config(model: nn.Module, config: MoePatchConfig | dict[str, Any] | None) -> MoePatchConfig:
    if config is None:
        return MoePatchConfig.from_model(model)
    resolved = MoePatchConfig.from_dict(config)
    resolved.add_official_c2r(getattr(model, "config", {}))  # an official C2R checkpoint keeps its routing
    return resolved


def apply(
    model: nn.Module, config: MoePatchConfig | dict[str, Any] | None = None, *, strict: bool = True
) -> PatchHandle:
    """Patch ``model`` (the instance only) according to its moepatch config.

    Args:
        model (`nn.Module`): a transformers MoE model instance (``*ForCausalLM``, base model or PEFT wrapper).
        config (`MoePatchConfig` or `dict`, *optional*): the moepatch block; defaults to ``model.config.moepatch``.
            When given, it is also written to ``model.config.moepatch`` (so ``save_pretrained`` keeps it) and
            restored by ``remove()``.
        strict (`bool`, *optional*, defaults to `True`): raise for a model no family fits; with ``False`` warn and
            return an empty handle.

    Returns:
        `PatchHandle`: call ``remove()`` to restore the model exactly.  Applying the same config again returns the
        same handle; a different config replaces the previous patch (after the new one has been validated).

    Raises:
        ValueError: a config field is invalid (the message names it, and the layer where relevant); the model is
            left untouched.
        UnsupportedModelError: ``strict`` and the model is not supported.

    Example:
        ```python
        handle = moepatch.apply(model, {"freeze_gate": "router", "routing_stats": {"layers": [-1]}})
        model(**batch)
        print(handle.recorder.counts)
        handle.remove()
        ```
    """
    cfg = _resolve_config(model, config)
    try:
        moe_model = describe(model, family=cfg.family)
    except UnsupportedModelError:
        if strict:
            raise
        warnings.warn(
            f"moepatch: {type(model).__name__} is not supported; returning it unpatched (strict=False)",
            MoePatchWarning,
            stacklevel=2,
        )
        return PatchHandle(model, cfg, None)

    plan = plan_patch(moe_model, cfg)  # every check that can fail, before any change

    existing = get_handle(model)
    if existing is not None:
        if existing.config.same_features(cfg):
            return existing
        existing.remove()

    # ---- execute
    handle = PatchHandle(model, cfg, moe_model)
    undo = handle._undo
    if config is not None:
        undo.set_attribute(model.config, CONFIG_KEY, cfg.to_dict())
    if plan.to_freeze:
        handle.frozen_parameters = freeze(plan.to_freeze, undo)
    if plan.c2r is not None:
        handle.c2r_routers = install_c2r(moe_model, plan.c2r, undo)
    if plan.lora_targets is not None:
        from moepatch.lora_experts.inject import install_lora_experts

        install_lora_experts(moe_model, plan.lora_targets, cfg.lora_experts, undo, plan.lora_weights)
        handle.lora_targets = [target.path for target in plan.lora_targets]
    if plan.stats_layers is not None:
        handle.recorder = RoutingRecorder(model, plan.stats_layers).start()
        undo.add_callback(handle.recorder.stop)
    undo.set_attribute(model, _HANDLE_ATTRIBUTE, handle)
    logger.info(
        "moepatch: %s (%s), %d MoE layers; C2R on %d routers; froze %d parameters (%s); routing statistics on %s; "
        "LoRA experts on %d modules",
        type(model).__name__,
        moe_model.family.name,
        len(moe_model.layers),
        len(handle.c2r_routers),
        len(handle.frozen_parameters),
        cfg.freeze_gate,
        plan.stats_layers or "no layers",
        len(handle.lora_targets),
    )
    return handle


@contextmanager
def patched(
    model: nn.Module, config: MoePatchConfig | dict[str, Any] | None = None, *, strict: bool = True
) -> Iterator[PatchHandle]:
    """``with moepatch.patched(model, cfg) as handle:`` — apply on entry, remove on exit."""
    handle = apply(model, config, strict=strict)
    try:
        yield handle
    finally:
        handle.remove()
