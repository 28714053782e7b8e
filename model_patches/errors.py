"""The error a model moepatch cannot patch raises (re-exported as ``moepatch.UnsupportedModelError``)."""

from __future__ import annotations


class UnsupportedModelError(ValueError):
    """The model is not one of the MoE families moepatch knows how to patch; the message says which check failed."""
