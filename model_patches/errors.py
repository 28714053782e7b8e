"""The errors of the family layer: a model moepatch cannot patch (re-exported as ``moepatch.UnsupportedModelError``),
a family name no family answers to."""

from __future__ import annotations


class UnsupportedModelError(ValueError):
    """The model is not one of the MoE families moepatch knows how to patch; the message says which check failed."""


class UnknownFamilyError(ValueError):
    """No registered family is called ``name``; ``reason`` is the message without the field it is about, for a caller
    that names the field its own way (the config block's ``moepatch.family``)."""

    def __init__(self, name: str, known: list[str]) -> None:
        self.name = name
        self.reason = f"unknown family {name!r}; known families: {known}"
        super().__init__(f"moepatch.family: {self.reason}")
