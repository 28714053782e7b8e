"""The one interface every moepatch feature is written against, and the registry of features.

A feature is what one key of the ``"moepatch"`` block of config.json does to a model (``freeze_gate``,
``routing_stats``, ``c2r``, ``lora_experts``).  :class:`~moepatch.config.MoePatchConfig`,
:class:`~moepatch.patch.PatchHandle`, :func:`moepatch.apply`, ``moepatch inspect`` and the apply log iterate over
:func:`registered_features`; none of them names a feature.  Adding one means writing its subpackage (a config
type, the four methods below) and one more entry in the :func:`register_features` call of ``moepatch/__init__.py``.

The life of a feature in one :func:`moepatch.apply`:

1. :meth:`Feature.parse` turns the block's value into the feature's config (``None``: off), recording every bad
   field with its path in a :class:`~moepatch.validation.Problems`;
2. :meth:`Feature.plan` checks that config against the resolved model structure and computes every change —
   still changing nothing — and returns a :class:`Planned` carrying its config;
3. :meth:`Feature.install` makes the changes, each through the handle's :class:`~moepatch.undo.UndoLog`, and
   returns its part of the handle (:class:`Installed`);
4. :meth:`Feature.describe` says in one line (more for ``inspect``) what the plan does.

:meth:`Feature.config_entry` describes what the feature's block entry accepts (its fields are declared once, on the
config dataclass: :mod:`moepatch.schema`), for ``moepatch inspect --help-config`` and docs/configuration.md.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING
from typing import Any
from typing import ClassVar

from moepatch.schema import ConfigEntry

if TYPE_CHECKING:
    from torch import nn

    from model_patches.structure import MoEModel
    from moepatch.undo import UndoLog
    from moepatch.validation import Problems

CONFIG_KEY = "moepatch"
"""The top-level config.json key holding moepatch's block (transformers 5 carries undeclared top-level keys)."""

HANDLE_ATTRIBUTE = "_moepatch_handle"
"""The model attribute holding its active :class:`~moepatch.patch.PatchHandle`."""


def active_handle(model: nn.Module) -> Any | None:
    """The active :class:`~moepatch.patch.PatchHandle` of ``model`` or ``None`` (:func:`moepatch.get_handle`, typed).

    Here, below :mod:`moepatch.patch`, so that a feature's own helpers (``bias_update_callbacks``) reach their handle
    without importing the module that imports every feature's config type.
    """
    handle = model.__dict__.get(HANDLE_ATTRIBUTE)
    return handle if handle is not None and handle.active else None


@dataclass
class Planned:
    """What one feature will change, computed and validated before anything is changed."""

    config: Any
    """The feature's parsed config, as planned."""
    detail: Any
    """The feature's own plan (parameters to freeze, constrained layers, LoRA targets, ...)."""


@dataclass
class Installed:
    """One feature's part of a :class:`~moepatch.patch.PatchHandle`."""

    attributes: dict[str, Any]
    """Exposed on the handle (``handle.frozen_parameters``, ``handle.recorder``, ...)."""
    changed: int
    """How many things the feature changed (parameters, routers, modules); 0 means it changed nothing."""
    summary: str
    """``key=value`` for the handle's ``repr``."""


class Feature:
    """Base class of a feature: name, config parsing, plan, install, describe.

    Subclasses set :attr:`name` (the key in the block), :attr:`handle_attributes` (what the handle exposes when
    the feature is off) and :attr:`off_summary`, and implement the methods that raise ``NotImplementedError``.
    """

    name: ClassVar[str]
    """Key of the feature in the ``"moepatch"`` block."""
    handle_attributes: ClassVar[dict[str, Any]] = {}
    """Handle attributes and their values when the feature is not installed (copied per handle)."""
    off_summary: ClassVar[str]
    """The handle's ``repr`` entry when the feature is not installed (``frozen=0``)."""
    remembers_off: ClassVar[bool] = False
    """Keep an explicit ``"<name>": false`` in the block (it overrides settings found outside the block)."""

    def parse(self, data: Any, path: str, problems: Problems) -> Any | None:
        """The feature's config from the block value ``data`` (``None``: off); bad fields go to ``problems``."""
        raise NotImplementedError

    def to_dict(self, config: Any) -> Any:
        """The JSON value written back to the block; ``parse(to_dict(c))`` gives ``c`` again."""
        raise NotImplementedError

    def config_entry(self) -> ConfigEntry:
        """What the block entry accepts: its forms and declared fields (``moepatch inspect --help-config``).

        The default says only what the class docstring says; features with fields return their schema's fields.
        """
        summary = (type(self).__doc__ or "").strip().splitlines()
        return ConfigEntry(self.name, forms="see its page", help=summary[0] if summary else "")

    def enabled(self, config: Any) -> bool:
        """Whether ``config`` changes anything (a parsed config can still say "off", e.g. ``enabled: false``)."""
        return config is not None

    def adopt(self, model_config: Any) -> Any | None:
        """A config found outside the block in the model's config (e.g. official top-level fields), or ``None``.

        Asked only when the block has no entry for the feature and did not switch it off.
        """
        return None

    def is_outside_block(self, config: Any) -> bool:
        """True for a config adopted from outside the block (not written back into the block)."""
        return False

    def plan(self, structure: MoEModel, config: Any, checkpoint: Path | None) -> Planned:
        """Validate ``config`` against ``structure``; ``ValueError`` naming the field otherwise.  Changes nothing."""
        raise NotImplementedError

    def install(self, structure: MoEModel, planned: Planned, undo: UndoLog) -> Installed:
        """Make the planned changes, each recorded in ``undo``."""
        raise NotImplementedError

    def describe(self, planned: Planned) -> str:
        """What the plan does: one line for the apply log; ``inspect`` prints further lines when given."""
        raise NotImplementedError

    def field_path(self) -> str:
        """How messages name this feature's block entry (``moepatch.c2r``)."""
        return f"{CONFIG_KEY}.{self.name}"

    # -- checkpoint state: what the feature added to the model and keeps in its own files beside the weights --------
    def state_keys(self, model: nn.Module) -> set[str]:
        """Keys of ``model.state_dict()`` the feature added (kept in its own files, not in the model's weights)."""
        return set()

    def save_state(self, model: nn.Module, folder: Path) -> list[Path]:
        """Write the feature's checkpoint files into ``folder``; the files written (none by default)."""
        return []

    def load_state(self, model: nn.Module, folder: Path) -> list[Path]:
        """Restore what :meth:`save_state` wrote into ``folder``; the files read.  ``ValueError`` naming the file when
        the model carries the feature's state and ``folder`` lacks it."""
        return []


_FEATURES: dict[str, Feature] = {}


def register_feature(feature: Feature) -> Feature:
    """Add ``feature``; features are planned and installed in registration order, undone in reverse."""
    if feature.name in _FEATURES:
        raise ValueError(f"moepatch feature {feature.name!r} is already registered")
    if feature.name in ("family", "ep_implementation", "moepatch_version"):
        raise ValueError(f"{feature.name!r} is a field of the moepatch block itself, not a feature name")
    _FEATURES[feature.name] = feature
    return feature


def register_features(*features: Feature) -> None:
    """Register several features, in this order."""
    for feature in features:
        register_feature(feature)


def registered_features() -> tuple[Feature, ...]:
    """Every registered feature, in registration (= install) order."""
    return tuple(_FEATURES.values())


def feature_named(name: str) -> Feature | None:
    """The feature registered under ``name``, or ``None``."""
    return _FEATURES.get(name)


def feature_state_keys(model: nn.Module) -> set[str]:
    """Every ``state_dict`` key some feature added to ``model`` (the rest are the model's own weights)."""
    return set().union(*(feature.state_keys(model) for feature in registered_features()))


def save_feature_states(model: nn.Module, folder: str | Path) -> list[Path]:
    """Every feature's checkpoint files for ``model``, written into ``folder`` (a trainer never names them)."""
    return [path for feature in registered_features() for path in feature.save_state(model, Path(folder))]


def load_feature_states(model: nn.Module, folder: str | Path) -> list[Path]:
    """Restore every feature's state of ``model`` from a checkpoint ``folder``; the files read."""
    return [path for feature in registered_features() for path in feature.load_state(model, Path(folder))]
