"""The ``c2r`` entry of the moepatch block, and the official C2R checkpoints' top-level fields, as one config."""

from __future__ import annotations

from dataclasses import dataclass
from dataclasses import field
from typing import Any

from moepatch.feature import CONFIG_KEY
from moepatch.schema import Schema
from moepatch.schema import describe
from moepatch.schema import integer
from moepatch.schema import optional_text
from moepatch.validation import Problems
from moepatch.validation import is_int

C2R_AUX_LOSS_MODES = ("actual", "vanilla")


def _ranking_list(value: Any, path: str, problems: Problems) -> Any:
    """A ``[layers][E][E]`` list, or ``null`` (then ``path`` names the file holding it); checked against the model in
    :func:`moepatch.c2r.plan_c2r`."""
    if value is not None and not isinstance(value, list):
        problems.add(path, f"expected a [layers][E][E] list, got {type(value).__name__}")
    return value


@dataclass
class C2RConfig:
    """Collaboration-constrained routing (C2R, Zhang et al., NAACL 2025): the top-1 expert is free, the other k-1
    come from its list.

    Two spellings are accepted: moepatch's ``{"moepatch": {"c2r": {"top_t": T, "collaborative_list": [...]}}}`` (or
    ``"path"`` to a JSON file holding the list), and the official C2R checkpoints' top-level ``"top_t"`` +
    ``"collaborative_list"`` fields, read unchanged.  The list is validated against the model in
    :func:`moepatch.c2r.plan_c2r`.
    """

    top_t: int = field(metadata=describe("integer", "T: how many of the top-1 expert's collaborators are eligible "
                                                    "(k-1..E-1).", check=integer))
    collaborative_list: list | None = field(
        default=None,
        metadata=describe("[layers][E][E] list | null", "Rankings (most collaborative first, self last); null per "
                                                        "layer keeps that layer's vanilla routing.",
                          check=_ranking_list))
    path: str | None = field(
        default=None,
        metadata=describe("file path | null", "JSON file with a 'collaborative_list' (e.g. an official config.json).",
                          check=optional_text("a file path")))
    aux_loss: str = field(
        default="actual",
        metadata=describe("string", "'actual': the load-balancing loss counts the experts C2R chose; 'vanilla': "
                                    "transformers' recomputed vanilla top-k (the official code's behaviour).",
                          choices=C2R_AUX_LOSS_MODES))
    source: str = field(default="moepatch", metadata={"help": "'moepatch' block or 'official' top-level fields."})
    """Where the config was read (not a key of the block: the official fields stay where they are)."""

    @property
    def field_prefix(self) -> str:
        """How error messages name this block's fields."""
        return "" if self.source == "official" else f"{CONFIG_KEY}.c2r."

    @classmethod
    def parse(cls, data: Any, path: str, problems: Problems) -> C2RConfig | None:
        """The config from the block value (``None``: off); every bad field goes to ``problems``."""
        if data is None:
            return None
        if not isinstance(data, dict):
            problems.add(path, f"expected an object with top_t and collaborative_list (or path), got {data!r}")
            return None
        known_problems = len(problems.messages)
        values = C2R_SCHEMA.parse(data, path, problems)
        if (data.get("collaborative_list") is None) == (data.get("path") is None):
            problems.add(path, "give exactly one of collaborative_list and path")
        if values is None or len(problems.messages) > known_problems:
            top_t: Any = data.get("top_t")  # checked below
            if is_int(top_t) and top_t < 1:  # its range is checked when planned, which a broken entry never is
                problems.add(f"{path}.top_t", f"top_t must be at least 1 (k-1..E-1, checked against the model), "
                                              f"got {top_t}")
            return None
        return cls(**values)

    @classmethod
    def from_official(cls, config: Any) -> C2RConfig | None:
        """The official top-level ``top_t`` / ``collaborative_list`` fields of a config, or ``None`` if absent."""
        read = config.get if isinstance(config, dict) else lambda key: getattr(config, key, None)
        top_t: Any = read("top_t")  # the config's value, checked below
        listed = read("collaborative_list")
        if top_t is None and listed is None:
            return None
        problems = Problems()
        if top_t is None or listed is None:
            missing = "top_t" if top_t is None else "collaborative_list"
            problems.add(missing, "the official C2R fields come as a pair: top_t and collaborative_list")
        elif not is_int(top_t):
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


C2R_SCHEMA = Schema.of(C2RConfig)
"""The ``c2r`` entry's fields (``source`` is no key of the block)."""
