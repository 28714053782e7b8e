"""The ``c2r`` entry of the moepatch block, and the official C2R checkpoints' top-level fields, as one config."""

from __future__ import annotations

from dataclasses import dataclass
from dataclasses import field
from typing import Any

from moepatch.feature import CONFIG_KEY
from moepatch.validation import Problems
from moepatch.validation import is_int
from moepatch.validation import warn_unknown

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
    def parse(cls, data: Any, path: str, problems: Problems) -> C2RConfig | None:
        if data is None:
            return None
        if not isinstance(data, dict):
            problems.add(path, f"expected an object with top_t and collaborative_list (or path), got {data!r}")
            return None
        warn_unknown(data, {"top_t", "collaborative_list", "path", "aux_loss"}, path)
        known_problems = len(problems.messages)
        top_t: Any = data.get("top_t")  # a JSON value, checked below
        if not is_int(top_t):
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
