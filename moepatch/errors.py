"""Exception and warning types raised by moepatch."""

from __future__ import annotations


class MoePatchWarning(UserWarning):
    """A user-actionable warning from moepatch (unknown config keys, statistics that cannot be masked, ...)."""


class UnsupportedModelError(ValueError):
    """The model is not one of the MoE families moepatch knows how to patch."""
