"""Gate noise, the balance loss and its coefficient as family-independent training options.

The dynamic-mixing paper keeps the model's gate noise and balance loss while the gates are frozen, and ablates each
(Dynamic Data Mixing, Zhu et al., 2024, Table 3; the official code switches them with ``--additional_config``
JSON merged into config.json).  Each
family declares in :attr:`model_patches.spec.FamilySpec.training_switches` which config.json field carries which option,
so a run says ``balance_loss=False`` instead of knowing that LLaMA-MoE calls it ``gate_use_balance`` and Qwen2-MoE
adds its balance loss only when ``output_router_logits`` is on.  The options are config fields read when the model is
built, so they are applied to the config *before* loading (:func:`apply_training_options`), never to a live model.
"""

from __future__ import annotations

import math
from typing import Any

from model_patches import registry
from model_patches.spec import FamilySpec
from moepatch.errors import FieldError
from moepatch.errors import FieldProblems

TRAINING_OPTIONS: dict[str, type] = {"gate_noise": bool, "balance_loss": bool, "aux_loss_coef": float}
"""Option name → value type."""


def family_of_config(config: Any, family: str | None = None) -> FamilySpec:
    """The family claiming ``config.model_type`` (or ``family`` by name); the structural fallback otherwise."""
    if family is not None:
        return registry.get_family(family)
    claimed = registry.family_for_model_type(getattr(config, "model_type", None))
    if claimed is not None:
        return claimed
    fallbacks = registry.fallback_families()
    if not fallbacks:
        raise FieldError("model_type", f"{getattr(config, 'model_type', None)!r}: no moepatch family")
    return fallbacks[0]


def training_overrides(config: Any, family: str | None = None, **options: Any) -> dict[str, Any]:
    """The config changes that realise ``options`` (``None`` values are left as the config has them).

    Raises:
        FieldProblems: an unknown option, a wrong type, a negative or non-finite coefficient, an option the family
            has no switch for, or a switch field missing from ``config``; one message lists every problem, each
            named by its option.
        FieldError: ``model_type``: no family claims the config and none is a fallback.
    """
    spec = family_of_config(config, family)
    switches = dict(spec.training_switches)
    problems: list[tuple[str, str]] = []
    overrides = {}
    for name, value in options.items():
        if value is None:
            continue
        if name not in TRAINING_OPTIONS:
            problems.append((name, f"unknown training option (known: {', '.join(TRAINING_OPTIONS)})"))
            continue
        kind = TRAINING_OPTIONS[name]
        if kind is bool and not isinstance(value, bool):
            problems.append((name, f"expected true or false, got {value!r}"))
            continue
        if kind is float:
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
                problems.append((name, f"expected a finite number >= 0, got {value!r}"))
                continue
            value = float(value)
        if name not in switches:
            offered = ", ".join(switches) or "none"
            problems.append((name, f"family {spec.name!r} has no such switch (it offers: {offered})"))
            continue
        field = switches[name]
        if not _has_field(config, field):
            problems.append((name, f"the {type(config).__name__} has no field {field!r} (family {spec.name!r})"))
            continue
        overrides[field] = value
    if problems:
        raise FieldProblems("training options", problems)
    return overrides


def apply_training_options(config: Any, family: str | None = None, **options: Any) -> dict[str, Any]:
    """Validate all ``options``, then set them on ``config``; return ``{config field: value}`` of what changed."""
    overrides = training_overrides(config, family, **options)
    for field, value in overrides.items():
        owner_path, _, name = field.rpartition(".")
        owner = _read_field(config, owner_path) if owner_path else config
        if isinstance(owner, dict):  # a sub-config kept as a plain dict
            owner[name] = value
        else:
            setattr(owner, name, value)
    return overrides


def _read_field(config: Any, path: str) -> Any:
    """The value at dotted ``path`` (a sub-config such as DBRX's ``ffn_config``), or raise ``AttributeError``."""
    value = config
    for part in path.split("."):
        if isinstance(value, dict):
            if part not in value:
                raise AttributeError(part)
            value = value[part]
        else:
            value = getattr(value, part)
    return value


def _has_field(config: Any, path: str) -> bool:
    try:
        _read_field(config, path)
    except AttributeError:
        return False
    return True


__all__ = ["TRAINING_OPTIONS", "apply_training_options", "family_of_config", "training_overrides"]
