"""The ``"moepatch"`` block of a model's config.json, as validated dataclasses.

All moepatch fields live under one top-level key so that transformers 5's strict configs carry them through
``save_pretrained`` / ``from_pretrained`` untouched (an undeclared *top-level* attribute survives as a plain dict;
see tests/test_config.py)::

    {"moepatch": {"freeze_gate": "router", "routing_stats": {"layers": [-1]}}}

Loading is forward compatible: keys this version does not know (written by a newer moepatch) are ignored with a
:class:`~moepatch.errors.MoePatchWarning`; wrong types or values raise ``ValueError`` naming every bad field.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from dataclasses import field
from dataclasses import fields
from typing import Any

from moepatch.validation import Problems
from moepatch.validation import is_int
from moepatch.validation import warn_unknown

CONFIG_KEY = "moepatch"
FREEZE_MODES = ("router", "gate_substring")


_Problems = Problems
_warn_unknown = warn_unknown
_is_int = is_int


@dataclass
class RoutingStatsConfig:
    """Record routing statistics (hard top-k counts and router probability sums per layer and expert)."""

    enabled: bool = field(default=True, metadata={"help": "Record while the patch is applied."})
    layers: list[int] | None = field(
        default=None,
        metadata={
            "help": "Decoder-layer indices to record (negative counts from the last layer); null = every MoE layer."
        },
    )

    @classmethod
    def parse(cls, data: Any, path: str, problems: _Problems) -> RoutingStatsConfig | None:
        if data is None or data is False:
            return None
        if data is True:
            return cls()
        if not isinstance(data, dict):
            problems.add(path, f"expected an object, true or false, got {type(data).__name__} {data!r}")
            return None
        _warn_unknown(data, {f.name for f in fields(cls)}, path)
        result = cls()
        enabled = data.get("enabled", True)
        if not isinstance(enabled, bool):
            problems.add(f"{path}.enabled", f"expected true or false, got {enabled!r}")
        else:
            result.enabled = enabled
        layers = data.get("layers")
        if layers is not None:
            if not isinstance(layers, list):
                problems.add(f"{path}.layers", f"expected a list of layer indices or null, got {layers!r}")
            elif not layers:
                problems.add(f"{path}.layers", "empty list (use null for every MoE layer)")
            else:
                good = True
                for position, index in enumerate(layers):
                    if not _is_int(index):
                        problems.add(f"{path}.layers[{position}]", f"expected an integer layer index, got {index!r}")
                        good = False
                if good and len(set(layers)) != len(layers):
                    duplicates = sorted({i for i in layers if layers.count(i) > 1})
                    problems.add(f"{path}.layers", f"duplicate layer indices {duplicates}")
                if good:
                    result.layers = list(layers)
        return result

    def to_dict(self) -> dict[str, Any]:
        return {"enabled": self.enabled, "layers": None if self.layers is None else list(self.layers)}


C2R_AUX_LOSS_MODES = ("actual", "vanilla")


@dataclass
class C2RConfig:
    """Collaboration-constrained routing (C2R, Zhang et al., NAACL 2025): the top-1 expert is free, the other k-1
    come from its list.

    Two spellings are accepted: moepatch's ``{"moepatch": {"c2r": {"top_t": T, "collaborative_list": [...]}}}`` (or
    ``"path"`` to a JSON file holding the list), and the official C2R checkpoints' top-level ``"top_t"`` +
    ``"collaborative_list"`` fields, read unchanged.  The list is validated against the model in
    :func:`moepatch.c2r.plan_c2r`.
    """

    top_t: int = field(metadata={"help": "T: how many of the top-1 expert's collaborators are eligible (k-1..E-1)."})
    collaborative_list: list | None = field(
        default=None,
        metadata={"help": "[num_hidden_layers][E][E] rankings (most collaborative first, self last); null per layer "
                          "keeps that layer's vanilla routing."},
    )
    path: str | None = field(
        default=None, metadata={"help": "JSON file with a 'collaborative_list' (e.g. an official config.json)."}
    )
    aux_loss: str = field(
        default="actual",
        metadata={"help": "'actual': the load-balancing loss counts the experts C2R chose; 'vanilla': transformers' "
                          "recomputed vanilla top-k (the official code's behaviour)."},
    )
    source: str = field(default="moepatch", metadata={"help": "'moepatch' block or 'official' top-level fields."})

    @property
    def field_prefix(self) -> str:
        """How error messages name this block's fields."""
        return "" if self.source == "official" else f"{CONFIG_KEY}.c2r."

    @classmethod
    def parse(cls, data: Any, path: str, problems: _Problems) -> C2RConfig | None:
        if data is None:
            return None
        if not isinstance(data, dict):
            problems.add(path, f"expected an object with top_t and collaborative_list (or path), got {data!r}")
            return None
        _warn_unknown(data, {"top_t", "collaborative_list", "path", "aux_loss"}, path)
        known_problems = len(problems.messages)
        top_t = data.get("top_t")
        if not _is_int(top_t):
            problems.add(f"{path}.top_t", f"expected an integer, got {top_t!r}")
        listed, file = data.get("collaborative_list"), data.get("path")
        if (listed is None) == (file is None):
            problems.add(path, "give exactly one of collaborative_list and path")
        if listed is not None and not isinstance(listed, list):
            problems.add(f"{path}.collaborative_list", f"expected a [layers][E][E] list, got {type(listed).__name__}")
        if file is not None and not isinstance(file, str):
            problems.add(f"{path}.path", f"expected a file path, got {file!r}")
        aux_loss = data.get("aux_loss", "actual")
        if aux_loss not in C2R_AUX_LOSS_MODES:
            problems.add(f"{path}.aux_loss", f"expected one of {C2R_AUX_LOSS_MODES}, got {aux_loss!r}")
        if len(problems.messages) > known_problems:
            return None
        return cls(top_t=top_t, collaborative_list=listed, path=file, aux_loss=aux_loss)

    @classmethod
    def from_official(cls, config: Any) -> C2RConfig | None:
        """The official top-level ``top_t`` / ``collaborative_list`` fields of a config, or ``None`` if absent."""
        read = config.get if isinstance(config, dict) else lambda key: getattr(config, key, None)
        top_t, listed = read("top_t"), read("collaborative_list")
        if top_t is None and listed is None:
            return None
        problems = _Problems()
        if top_t is None or listed is None:
            missing = "top_t" if top_t is None else "collaborative_list"
            problems.add(missing, "the official C2R fields come as a pair: top_t and collaborative_list")
        elif not _is_int(top_t):
            problems.add("top_t", f"expected an integer, got {top_t!r}")
        elif not isinstance(listed, list):
            problems.add("collaborative_list", f"expected a [layers][E][E] list, got {type(listed).__name__}")
        problems.raise_if_any()
        return cls(top_t=top_t, collaborative_list=listed, source="official")

    def to_dict(self) -> dict[str, Any]:
        data: dict[str, Any] = {"top_t": self.top_t}
        if self.path is not None:
            data["path"] = self.path
        else:
            data["collaborative_list"] = self.collaborative_list
        data["aux_loss"] = self.aux_loss
        return data


@dataclass
class MoePatchConfig:
    """Everything moepatch does to a model, as read from ``config.json["moepatch"]``."""

    family: str | None = field(
        default=None, metadata={"help": "Force a model family by name instead of choosing it from model_type."}
    )
    freeze_gate: str | None = field(
        default=None,
        metadata={
            "help": (
                "Freeze routing parameters: 'router' (true) freezes the top-k routers' weights; 'gate_substring' "
                "freezes every parameter whose name contains 'gate' (the Dynamic Data Mixing rule, Zhu et al., "
                "2024); false/null freezes nothing."
            )
        },
    )
    routing_stats: RoutingStatsConfig | None = field(
        default=None, metadata={"help": "Record routing statistics while applied (see RoutingRecorder)."}
    )
    c2r: C2RConfig | None = field(default=None, metadata={"help": "Collaboration-constrained routing (C2RConfig)."})
    lora_experts: Any = field(
        default=None, metadata={"help": "LoRA / (IA)³ expert layers (moepatch.lora_experts.config.LoraExpertsConfig)."}
    )
    c2r_off: bool = field(
        default=False,
        metadata={"help": "Set by \"c2r\": false: vanilla routing even if official C2R fields are in config.json."},
    )
    moepatch_version: str | None = field(
        default=None, metadata={"help": "Version of moepatch that wrote this block (stamped by to_dict)."}
    )

    @classmethod
    def from_dict(cls, data: Any, path: str = CONFIG_KEY) -> MoePatchConfig:
        """Validate and build a config; ``ValueError`` names every bad field, unknown keys warn."""
        if data is None:
            return cls()
        if isinstance(data, MoePatchConfig):
            return dataclasses.replace(data)  # a copy: resolving official C2R fields must not touch the caller's
        problems = _Problems()
        if not isinstance(data, dict):
            problems.add(path, f"expected an object (a JSON dict), got {type(data).__name__} {data!r}")
            problems.raise_if_any()
        _warn_unknown(data, {f.name for f in fields(cls)} - {"c2r_off"}, path)
        result = cls()

        family = data.get("family")
        if family is not None:
            if not isinstance(family, str):
                problems.add(f"{path}.family", f"expected a family name, got {family!r}")
            else:
                from model_patches import registry

                try:
                    registry.get_family(family)
                    result.family = family
                except ValueError as error:
                    problems.add(f"{path}.family", str(error).split(": ", 1)[1])

        freeze = data.get("freeze_gate")
        if freeze is True:
            result.freeze_gate = "router"
        elif freeze in FREEZE_MODES:
            result.freeze_gate = freeze
        elif freeze is not None and freeze is not False:
            problems.add(f"{path}.freeze_gate", f"expected true, false, 'router' or 'gate_substring', got {freeze!r}")

        result.routing_stats = RoutingStatsConfig.parse(data.get("routing_stats"), f"{path}.routing_stats", problems)
        if data.get("c2r") is False:
            result.c2r_off = True
        else:
            result.c2r = C2RConfig.parse(data.get("c2r"), f"{path}.c2r", problems)

        from moepatch.lora_experts.config import LoraExpertsConfig

        result.lora_experts = LoraExpertsConfig.parse(data.get("lora_experts"), f"{path}.lora_experts", problems)

        version = data.get("moepatch_version")
        if version is not None and not isinstance(version, str):
            problems.add(f"{path}.moepatch_version", f"expected a version string, got {version!r}")
        else:
            result.moepatch_version = version
        problems.raise_if_any()
        return result

    @classmethod
    def from_model(cls, model_or_config: Any) -> MoePatchConfig:
        """Read the block from a model (``model.config.moepatch``) or a config object / dict.

        The official C2R top-level fields (``top_t``, ``collaborative_list``) are picked up too when the block has
        no ``c2r`` entry of its own, so official C2R checkpoints work unchanged.
        """
        config = getattr(model_or_config, "config", model_or_config)
        data = config.get(CONFIG_KEY) if isinstance(config, dict) else getattr(config, CONFIG_KEY, None)
        result = cls.from_dict(data)
        result.add_official_c2r(config)
        return result

    def add_official_c2r(self, model_config: Any) -> None:
        """Adopt the official top-level C2R fields of ``model_config`` unless this block has its own or says off."""
        if self.c2r is None and not self.c2r_off:
            self.c2r = C2RConfig.from_official(model_config)

    @property
    def is_empty(self) -> bool:
        """True when no feature is enabled (applying it changes nothing)."""
        return (
            self.freeze_gate is None
            and (self.routing_stats is None or not self.routing_stats.enabled)
            and self.c2r is None
            and self.lora_experts is None
        )

    def to_dict(self) -> dict[str, Any]:
        """The JSON block, stamped with this moepatch version; ``from_dict(to_dict())`` round-trips."""
        from moepatch._version import __version__

        data: dict[str, Any] = {}
        if self.family is not None:
            data["family"] = self.family
        if self.freeze_gate is not None:
            data["freeze_gate"] = self.freeze_gate
        if self.routing_stats is not None:
            data["routing_stats"] = self.routing_stats.to_dict()
        if self.c2r is not None and self.c2r.source != "official":  # official fields stay at the top level
            data["c2r"] = self.c2r.to_dict()
        elif self.c2r_off:
            data["c2r"] = False
        if self.lora_experts is not None:
            data["lora_experts"] = self.lora_experts.to_dict()
        data["moepatch_version"] = __version__
        return data

    def same_features(self, other: MoePatchConfig) -> bool:
        """Equal apart from the version stamp (what idempotent ``apply`` compares)."""
        return self.to_dict() == other.to_dict() and self.c2r == other.c2r


def write_config(model_or_config: Any, config: MoePatchConfig | dict[str, Any]) -> None:
    """Store ``config`` as ``<config>.moepatch`` so ``save_pretrained`` writes it into config.json."""
    target = getattr(model_or_config, "config", model_or_config)
    setattr(target, CONFIG_KEY, MoePatchConfig.from_dict(config).to_dict())
