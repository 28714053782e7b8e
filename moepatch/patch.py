"""``moepatch.apply``: validate the whole config against the model, then patch the instance, reversibly.

Order of work, so that a failed ``apply`` never leaves a half-patched model:

1. parse and validate the config (``ValueError`` naming each bad field); refuse a model sharded for expert
   parallelism at another size than its checkpoint's experts were renumbered for (``expert_placement.json``);
2. resolve the model's family (``UnsupportedModelError`` naming the class and the supported families);
3. plan every feature against the model (layer indices, parameters to freeze) — still no change;
4. only then change the model, recording each change in the handle's :class:`~moepatch.undo.UndoLog`.
"""

from __future__ import annotations

import copy
import logging
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from dataclasses import field
from pathlib import Path
from typing import TYPE_CHECKING
from typing import Any

from torch import nn

from model_patches.structure import MoEModel
from model_patches.structure import describe
from moepatch.config import CONFIG_KEY
from moepatch.config import MoePatchConfig
from moepatch.errors import MoePatchWarning
from moepatch.errors import UnsupportedModelError
from moepatch.expert_parallel.layout import check_loaded_placement
from moepatch.feature import HANDLE_ATTRIBUTE
from moepatch.feature import Feature
from moepatch.feature import Installed
from moepatch.feature import Planned
from moepatch.feature import active_handle
from moepatch.feature import feature_named
from moepatch.feature import registered_features
from moepatch.undo import UndoLog

if TYPE_CHECKING:
    from moepatch.c2r.config import C2RConfig
    from moepatch.lora_experts.config import LoraExpertsConfig
    from moepatch.routing.bias_update import BiasUpdater
    from moepatch.routing.bias_update_config import BiasUpdateConfig
    from moepatch.routing.freeze import FreezeRule
    from moepatch.routing.recorder import RoutingRecorder
    from moepatch.routing.statistics import RoutingStatsConfig

logger = logging.getLogger("moepatch")


def _registered(name: str) -> Feature:
    """The feature registered under ``name`` (a plan names only registered features)."""
    feature = feature_named(name)
    if feature is None:
        raise KeyError(f"no moepatch feature {name!r}")
    return feature



class PatchHandle:
    """What one :func:`apply` did to a model, and the means to undo it.

    Attributes:
        model: the model as given to :func:`apply`.
        config: the validated :class:`~moepatch.config.MoePatchConfig` in force.
        moe_model: the resolved :class:`~model_patches.structure.MoEModel` (``None`` for an empty handle of an
            unsupported model under ``strict=False``).
        installed: each installed feature's part, by feature name (:class:`~moepatch.feature.Installed`).

    Each feature's part is also readable as attributes: ``frozen_parameters`` (``freeze_gate``), ``recorder``
    (the :class:`~moepatch.routing.recorder.RoutingRecorder` of ``routing_stats``), ``c2r_routers`` (``c2r``),
    ``lora_targets`` (``lora_experts``), ``bias_updater`` (``bias_update``); a feature that is off gives its empty
    value (``[]`` / ``None``).  ``handle.c2r``, ``handle.lora_experts``, ... are the features' configs in force
    (``handle.config.c2r``; ``None``: off).  The built-in features' attributes are typed properties; a feature
    registered elsewhere is reached the same way, untyped (``__getattr__``).
    """

    def __init__(self, model: nn.Module, config: MoePatchConfig, moe_model: MoEModel | None) -> None:
        self.model = model
        self.config = config
        self.moe_model = moe_model
        self.installed: dict[str, Installed] = {}
        self._undo = UndoLog()
        self._active = True

    def __getattr__(self, name: str) -> Any:
        if name.startswith("_") or name == "installed":
            raise AttributeError(name)
        for feature in registered_features():
            if name in feature.handle_attributes:
                part = self.installed.get(feature.name)
                return part.attributes[name] if part is not None else copy.copy(feature.handle_attributes[name])
        raise AttributeError(f"{type(self).__name__} has no attribute {name!r}")

    # -- the built-in features' parts, typed (each is what __getattr__ gives for any registered feature) -----------
    @property
    def recorder(self) -> RoutingRecorder | None:
        """The :class:`~moepatch.routing.recorder.RoutingRecorder` ``routing_stats`` keeps (``None``: off)."""
        return self.__getattr__("recorder")

    @property
    def frozen_parameters(self) -> list[str]:
        """Qualified names of the parameters ``freeze_gate`` froze (``[]``: off)."""
        return self.__getattr__("frozen_parameters")

    @property
    def c2r_routers(self) -> list[str]:
        """The routers ``c2r`` constrains (``[]``: off)."""
        return self.__getattr__("c2r_routers")

    @property
    def lora_targets(self) -> list[str]:
        """The modules ``lora_experts`` adapted (``[]``: off)."""
        return self.__getattr__("lora_targets")

    @property
    def bias_updater(self) -> BiasUpdater | None:
        """The updater ``bias_update`` runs after every optimizer step (``None``: off)."""
        return self.__getattr__("bias_updater")

    # -- the built-in features' configs in force ------------------------------------------------------------------
    @property
    def freeze_gate(self) -> FreezeRule | None:
        """``freeze_gate``'s rule in force."""
        return self.config.freeze_gate

    @property
    def routing_stats(self) -> RoutingStatsConfig | None:
        """``routing_stats``' config in force."""
        return self.config.routing_stats

    @property
    def c2r(self) -> C2RConfig | None:
        """``c2r``'s config in force (also one adopted from the official top-level fields)."""
        return self.config.c2r

    @property
    def lora_experts(self) -> LoraExpertsConfig | None:
        """``lora_experts``' config in force."""
        return self.config.lora_experts

    @property
    def bias_update(self) -> BiasUpdateConfig | None:
        """``bias_update``'s config in force."""
        return self.config.bias_update

    def require_moe_model(self) -> MoEModel:
        """:attr:`moe_model`; ``ValueError`` for the empty handle of an unsupported model (``strict=False``)."""
        if self.moe_model is None:
            raise ValueError(f"moepatch: {type(self.model).__name__} is not a supported MoE model; this handle "
                             "patched nothing (strict=False)")
        return self.moe_model

    @property
    def active(self) -> bool:
        """False once :meth:`remove` has run."""
        return self._active

    @property
    def is_empty(self) -> bool:
        """True when this handle changed nothing in the model's behaviour (no feature changed anything)."""
        return not any(part.changed for part in self.installed.values())

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
        parts = [self.installed[feature.name].summary if feature.name in self.installed else feature.off_summary
                 for feature in registered_features()]
        return f"PatchHandle(family={family!r}, active={self._active}" + "".join(f", {p}" for p in parts) + ")"


@dataclass
class PatchPlan:
    """What :func:`apply` will change, computed (and validated) before anything is changed: one
    :class:`~moepatch.feature.Planned` per enabled feature, in install order."""

    planned: dict[str, Planned] = field(default_factory=dict)

    def __getitem__(self, name: str) -> Any:
        """The named feature's own plan (``plan["c2r"]``), or ``None`` when that feature is off."""
        if feature_named(name) is None:
            raise KeyError(f"no moepatch feature {name!r}")
        planned = self.planned.get(name)
        return planned.detail if planned is not None else None

    def describe(self) -> list[str]:
        """Each planned feature's description (``moepatch inspect``, the apply log)."""
        return [_registered(name).describe(planned) for name, planned in self.planned.items()]


def checkpoint_folder(model: nn.Module) -> Path | None:
    """The folder the model was loaded from, where features find files named relative to the checkpoint."""
    name = getattr(getattr(model, "config", None), "_name_or_path", None)
    return Path(name) if name and Path(name).is_dir() else None


def problem_lines(error: ValueError) -> list[str]:
    """Each problem ``error`` reports, as ``field: message``: a :class:`~moepatch.errors.FieldProblems` (or a layer
    list's :class:`~model_patches.structure.LayerIndexError`) carries its problems one by one, so a command lists and
    counts them singly; any other error is one problem."""
    listed = getattr(error, "problems", None)
    if isinstance(listed, list) and listed and all(isinstance(item, tuple) and len(item) == 2 for item in listed):
        return [f"{field}: {message}" for field, message in listed]
    return [str(error)]


def plan_each(moe_model: MoEModel, config: MoePatchConfig) -> tuple[PatchPlan, list[ValueError]]:
    """Plan every enabled feature, keeping each failing feature's error instead of stopping at the first, so a
    block's problems are all reported in one go; the plan holds the features that planned.  An
    ``UnsupportedModelError`` (the model, not the block) is raised at once."""
    plan, errors = PatchPlan(), []
    folder = checkpoint_folder(moe_model.inner)
    for feature in registered_features():
        settings = config.features.get(feature.name)
        if settings is not None:
            try:
                plan.planned[feature.name] = feature.plan(moe_model, settings, folder)
            except UnsupportedModelError:
                raise
            except ValueError as error:
                errors.append(error)
    return plan, errors


def plan_patch(moe_model: MoEModel, config: MoePatchConfig) -> PatchPlan:
    """Validate ``config`` against ``moe_model`` and return the plan; ``ValueError`` naming the field otherwise
    (the feature's own error when one feature fails, one naming every problem when several do)."""
    plan, errors = plan_each(moe_model, config)
    if len(errors) == 1:
        raise errors[0]
    if errors:
        raise ValueError("; ".join(line for error in errors for line in problem_lines(error)))
    return plan


def get_handle(model: nn.Module) -> PatchHandle | None:
    """The active handle of ``model``, or ``None`` if moepatch has not patched it."""
    return active_handle(model)


def _resolve_config(model: nn.Module, config: MoePatchConfig | dict[str, Any] | None) -> MoePatchConfig:
    if config is None:
        return MoePatchConfig.from_model(model)
    resolved = MoePatchConfig.from_dict(config)
    resolved.adopt_outside_block(getattr(model, "config", {}))  # an official C2R checkpoint keeps its routing
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
        ValueError: a config field is invalid (the message names it, and the layer where relevant); or the model
            was sharded for expert parallelism at a size other than the one its checkpoint's experts were renumbered
            for (naming ``expert_placement.json`` and both sizes). The model is left untouched.
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
    # a copy renumbered for another EP size, loaded by plain from_pretrained (which does not read its record)
    check_loaded_placement(model, checkpoint_folder(model))
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
    for name, planned in plan.planned.items():
        handle.installed[name] = _registered(name).install(moe_model, planned, undo)
    undo.set_attribute(model, HANDLE_ATTRIBUTE, handle)
    logger.info(
        "moepatch: %s (%s), %d MoE layers; %s",
        type(model).__name__,
        moe_model.family.name,
        len(moe_model.layers),
        "; ".join(line.splitlines()[0] for line in plan.describe()) or "no feature enabled",
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
