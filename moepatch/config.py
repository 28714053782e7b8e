"""The ``"moepatch"`` block of a model's config.json, as validated dataclasses.

All moepatch fields live under one top-level key so that transformers 5's strict configs carry them through
``save_pretrained`` / ``from_pretrained`` untouched (an undeclared *top-level* attribute survives as a plain dict;
see tests/test_config.py)::

    {"moepatch": {"freeze_gate": "router", "routing_stats": {"layers": [-1]}}}

Loading is forward compatible: keys this version does not know (written by a newer moepatch) are ignored with a
:class:`~moepatch.errors.MoePatchWarning`; wrong types or values raise ``ValueError`` naming every bad field.
"""

from __future__ import annotations

from dataclasses import dataclass
from dataclasses import field
from typing import Any
from typing import Generic
from typing import TypeVar
from typing import overload

from model_patches import registry
from model_patches.errors import UnknownFamilyError
from moepatch._version import __version__
from moepatch.c2r.config import C2RConfig
from moepatch.expert_parallel.layout import ep_implementation_problem
from moepatch.feature import CONFIG_KEY
from moepatch.feature import feature_named
from moepatch.feature import registered_features
from moepatch.lora_experts.config import LoraExpertsConfig
from moepatch.routing.bias_update_config import BiasUpdateConfig
from moepatch.routing.freeze import FreezeRule
from moepatch.routing.statistics import RoutingStatsConfig
from moepatch.schema import ConfigEntry
from moepatch.schema import Schema
from moepatch.schema import describe
from moepatch.validation import Problems
from moepatch.validation import warn_unknown

__all__ = ["CONFIG_KEY", "MoePatchConfig", "config_schema", "write_config"]

_BLOCK_FIELDS = ("family", "ep_implementation", "moepatch_version")

FeatureConfigT = TypeVar("FeatureConfigT")


class FeatureConfig(Generic[FeatureConfigT]):
    """A typed attribute of :class:`MoePatchConfig` for one built-in feature: ``config.c2r`` reads (and assigning it
    writes) ``config.features["c2r"]``, ``None`` when the feature is off — as every registered feature is reachable by
    ``__getattr__``, but with its config type known to type checkers."""

    def __set_name__(self, owner: type, name: str) -> None:
        self.name = name

    @overload
    def __get__(self, config: None, owner: type) -> FeatureConfig[FeatureConfigT]: ...

    @overload
    def __get__(self, config: MoePatchConfig, owner: type) -> FeatureConfigT | None: ...

    def __get__(self, config: MoePatchConfig | None, owner: type) -> Any:
        return self if config is None else config.features.get(self.name)

    def __set__(self, config: MoePatchConfig, value: FeatureConfigT | None) -> None:
        if value is None:
            config.features.pop(self.name, None)
        else:
            config.features[self.name] = value


def _check_ep_implementation(value: Any, path: str, problems: Problems) -> Any:
    """``null``, or an ``ep_implementation`` name transformers' ``EPImplementationInterface`` knows (moepatch's
    ``"moepatch_dedup"`` among them once moepatch is imported)."""
    if value is not None:
        problem = ep_implementation_problem(value)
        if problem is not None:
            problems.add(path, problem)
    return value


@dataclass
class MoePatchConfig:
    """Everything moepatch does to a model, as read from ``config.json["moepatch"]``.

    Three fields belong to the block itself (``family``, ``ep_implementation``, ``moepatch_version``); every other
    key is a registered feature (:mod:`moepatch.feature`), read as an attribute: ``config.c2r``,
    ``config.freeze_gate`` (``None`` when the feature is off).  The built-in features' attributes are typed
    (:class:`FeatureConfig`); a feature registered elsewhere is reached the same way, untyped.

    ``ep_implementation`` is a loading choice, not a feature: it patches no forward, so a block holding only it is
    empty (:attr:`is_empty`) and ``apply`` changes nothing; the loaders read it (:func:`moepatch.from_pretrained`).
    """

    family: str | None = field(
        default=None,
        metadata=describe("family name | null", "Force a model family by name instead of choosing it from model_type."),
    )
    ep_implementation: str | None = field(
        default=None,
        metadata=describe(
            "EP implementation name | null",
            "How tokens reach the experts when the model is loaded under expert parallelism (ep_size > 1) by "
            "moepatch.from_pretrained, a folder prepared by `moepatch install` or scripts/finetune.py: a name "
            "transformers' EPImplementationInterface knows (\"moepatch_dedup\": one row per token and destination "
            "rank; \"all_to_all\": one per token and expert). Used where the DistributedConfig's ep_implementation "
            "is \"auto\", its default (finetune.py: --ep_implementation not given); any other name given there "
            "wins. Patches nothing: without expert parallelism it has no effect.",
            check=_check_ep_implementation,
        ),
    )
    moepatch_version: str | None = field(
        default=None,
        metadata=describe("version string", "Version of moepatch that wrote this block (stamped by to_dict)."),
    )
    features: dict[str, Any] = field(default_factory=dict)
    """Parsed config of each enabled feature, by feature name."""
    switched_off: set[str] = field(default_factory=set)
    """Features the block switched off explicitly (``"c2r": false``), so settings outside the block are ignored."""

    freeze_gate = FeatureConfig[FreezeRule]()
    routing_stats = FeatureConfig[RoutingStatsConfig]()
    c2r = FeatureConfig[C2RConfig]()
    lora_experts = FeatureConfig[LoraExpertsConfig]()
    bias_update = FeatureConfig[BiasUpdateConfig]()

    def __getattr__(self, name: str) -> Any:
        if name != "features" and feature_named(name) is not None:
            return self.features.get(name)
        raise AttributeError(f"{type(self).__name__} has no attribute {name!r}")

    def __setattr__(self, name: str, value: Any) -> None:
        if feature_named(name) is not None and not isinstance(getattr(type(self), name, None), FeatureConfig):
            if value is None:
                self.features.pop(name, None)
            else:
                self.features[name] = value
        else:
            object.__setattr__(self, name, value)

    def copy(self) -> MoePatchConfig:
        """A copy whose feature table can change without touching this one."""
        return MoePatchConfig(family=self.family, ep_implementation=self.ep_implementation,
                              moepatch_version=self.moepatch_version, features=dict(self.features),
                              switched_off=set(self.switched_off))

    def only(self, *names: str) -> MoePatchConfig:
        """A copy keeping just the named features (to plan one of them on its own)."""
        kept = self.copy()
        kept.features = {name: value for name, value in self.features.items() if name in names}
        return kept

    @classmethod
    def from_dict(cls, data: Any, path: str = CONFIG_KEY) -> MoePatchConfig:
        """Validate and build a config; ``ValueError`` names every bad field, unknown keys warn."""
        if data is None:
            return cls()
        if isinstance(data, MoePatchConfig):
            return data.copy()  # resolving settings outside the block must not touch the caller's config
        result, problems = cls._parse(data, path)
        problems.raise_if_any()
        return result

    @classmethod
    def parse_each(cls, data: Any, path: str = CONFIG_KEY) -> tuple[MoePatchConfig, list[str]]:
        """The features that parsed, and every parse-time problem (``"path: message"``) instead of raising.

        ``moepatch inspect`` / ``install`` list a block's problems in one go: the structure-dependent checks (layer
        indices) of the features that did parse are planned too, so a bad layer is reported beside a bad rate.
        """
        if data is None or isinstance(data, MoePatchConfig):
            return cls.from_dict(data, path), []
        result, problems = cls._parse(data, path)
        return result, list(problems.messages)

    @classmethod
    def _parse(cls, data: Any, path: str) -> tuple[MoePatchConfig, Problems]:
        """:meth:`from_dict`'s work: the config of every feature that parsed, and the problems of the others."""
        problems = Problems()
        if not isinstance(data, dict):
            problems.add(path, f"expected an object (a JSON dict), got {type(data).__name__} {data!r}")
            return cls(), problems
        warn_unknown(data, {*_BLOCK_FIELDS, *(feature.name for feature in registered_features())}, path)
        result = cls()

        family = data.get("family")
        if family is not None:
            if not isinstance(family, str):
                problems.add(f"{path}.family", f"expected a family name, got {family!r}")
            else:
                try:
                    registry.get_family(family)
                    result.family = family
                except UnknownFamilyError as error:
                    problems.add(f"{path}.family", error.reason)

        for feature in registered_features():
            value = data.get(feature.name)
            if value is False and feature.remembers_off:
                result.switched_off.add(feature.name)
                continue
            known_problems = len(problems.messages)
            parsed = feature.parse(value, f"{path}.{feature.name}", problems)
            if parsed is not None and len(problems.messages) == known_problems:  # a feature with problems is dropped
                result.features[feature.name] = parsed

        if "ep_implementation" in data:
            known_problems = len(problems.messages)
            chosen = _check_ep_implementation(data["ep_implementation"], f"{path}.ep_implementation", problems)
            if len(problems.messages) == known_problems:
                result.ep_implementation = chosen

        version = data.get("moepatch_version")
        if version is not None and not isinstance(version, str):
            problems.add(f"{path}.moepatch_version", f"expected a version string, got {version!r}")
        else:
            result.moepatch_version = version
        return result, problems

    @classmethod
    def from_model(cls, model_or_config: Any) -> MoePatchConfig:
        """Read the block from a model (``model.config.moepatch``) or a config object / dict.

        Settings that live outside the block (the official C2R checkpoints' top-level ``top_t`` /
        ``collaborative_list``) are adopted too, so such checkpoints work unchanged.
        """
        config = getattr(model_or_config, "config", model_or_config)
        data = config.get(CONFIG_KEY) if isinstance(config, dict) else getattr(config, CONFIG_KEY, None)
        result = cls.from_dict(data)
        result.adopt_outside_block(config)
        return result

    def adopt_outside_block(self, model_config: Any) -> None:
        """Adopt each feature's settings found outside the block, unless the block has its own or switched it off."""
        for feature in registered_features():
            if feature.name not in self.features and feature.name not in self.switched_off:
                adopted = feature.adopt(model_config)
                if adopted is not None:
                    self.features[feature.name] = adopted

    add_official_c2r = adopt_outside_block  # the name of earlier releases

    @property
    def is_empty(self) -> bool:
        """True when no feature is enabled (applying it changes nothing)."""
        return not any(feature.enabled(self.features[feature.name])
                       for feature in registered_features() if feature.name in self.features)

    def to_dict(self) -> dict[str, Any]:
        """The JSON block, stamped with this moepatch version; ``from_dict(to_dict())`` round-trips."""

        data: dict[str, Any] = {}
        if self.family is not None:
            data["family"] = self.family
        if self.ep_implementation is not None:
            data["ep_implementation"] = self.ep_implementation
        for feature in registered_features():
            if feature.name in self.features:
                value = self.features[feature.name]
                if not feature.is_outside_block(value):  # settings found outside the block stay there
                    data[feature.name] = feature.to_dict(value)
            elif feature.name in self.switched_off:
                data[feature.name] = False
        data["moepatch_version"] = __version__
        return data

    def same_features(self, other: MoePatchConfig) -> bool:
        """Equal apart from the version stamp (what idempotent ``apply`` compares), outside-block settings too."""
        return self.to_dict() == other.to_dict() and self.features == other.features


def config_schema() -> tuple[ConfigEntry, ...]:
    """What the ``"moepatch"`` block accepts: each registered feature's entry (its forms, and its fields with type,
    default, per-method defaults and help), then the block's own ``family``, ``ep_implementation`` and
    ``moepatch_version``.

    The fields are read from the declarations the parsers check against (:mod:`moepatch.schema`), so this is what
    ``moepatch inspect --help-config`` prints and what docs/configuration.md is generated from.
    """
    own = [ConfigEntry(item.name, item.kind, item.help) for item in Schema.of(MoePatchConfig).fields]
    return (*(feature.config_entry() for feature in registered_features()), *own)


def write_config(model_or_config: Any, config: MoePatchConfig | dict[str, Any]) -> None:
    """Store ``config`` as ``<config>.moepatch`` so ``save_pretrained`` writes it into config.json."""
    target = getattr(model_or_config, "config", model_or_config)
    setattr(target, CONFIG_KEY, MoePatchConfig.from_dict(config).to_dict())
