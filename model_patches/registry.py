"""Registry of model families, keyed by name and scoped by ``config.model_type``.

Family files in ``model_patches/`` call :func:`register` at import; ``import model_patches`` imports every family
file, so the registry is complete whenever the package is (callers go through the package:
``model_patches.get_family``).  A family claims ``model_type`` values exactly; a model whose ``model_type`` no
family claims may still be handled by a *fallback* family (the generic top-k router description), which checks the
model's structure and probes its routers before accepting it.
"""

from __future__ import annotations

from model_patches.errors import UnknownFamilyError
from model_patches.spec import FamilySpec

_FAMILIES: dict[str, FamilySpec] = {}
_FALLBACKS: list[str] = []


def register(spec: FamilySpec, *, fallback: bool = False) -> FamilySpec:
    """Add a family; ``fallback=True`` makes it a candidate for models no family claims by ``model_type``."""
    if spec.name in _FAMILIES:
        raise ValueError(f"model family {spec.name!r} is already registered")
    for other in _FAMILIES.values():
        overlap = set(other.model_types) & set(spec.model_types)
        if overlap:
            raise ValueError(f"model_type {sorted(overlap)} claimed by both {other.name!r} and {spec.name!r}")
    _FAMILIES[spec.name] = spec
    if fallback:
        _FALLBACKS.append(spec.name)
    return spec


def families() -> dict[str, FamilySpec]:
    """All registered families by name."""
    return dict(_FAMILIES)


def get_family(name: str) -> FamilySpec:
    """The family called ``name``; :class:`~model_patches.errors.UnknownFamilyError` (a ``ValueError`` naming the
    field ``moepatch.family``) otherwise."""
    if name not in _FAMILIES:
        raise UnknownFamilyError(name, sorted(_FAMILIES))
    return _FAMILIES[name]


def family_for_model_type(model_type: str | None) -> FamilySpec | None:
    """The family that claims ``model_type``, or ``None``."""
    for spec in _FAMILIES.values():
        if spec.claims(model_type):
            return spec
    return None


def fallback_families() -> list[FamilySpec]:
    """Families tried, in registration order, for a ``model_type`` nobody claims."""
    return [_FAMILIES[name] for name in _FALLBACKS]


def supported_summary() -> str:
    """One line naming every family and the model types it claims (for error messages)."""
    parts = []
    for spec in _FAMILIES.values():
        claimed = ", ".join(spec.model_types) if spec.model_types else "structural match"
        parts.append(f"{spec.name} ({claimed})")
    return "; ".join(parts)
