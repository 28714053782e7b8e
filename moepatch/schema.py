"""Declarative config fields: each feature declares its fields once, and one parser checks a block against them.

A feature's config dataclass describes each field of its block entry where the field is defined::

    top_t: int = field(metadata=describe("integer", "T: how many ...", check=integer))

(:func:`describe` keeps HF's ``metadata={"help": ...}`` convention and adds the JSON type users write, the check, the
choices, the methods it applies to).  :class:`Schema` reads those declarations back; :meth:`Schema.parse` walks a
block's dict against them and records EVERY problem with its path in a :class:`~moepatch.validation.Problems`, so
the checks, the defaults, ``moepatch inspect --help-config`` and docs/configuration.md all come from one place and
cannot drift apart.  What a declaration cannot say — a check across fields (``renormalize`` needs ``top_k``) — stays
in the feature's ``parse``, after the generic walk.

A config whose block entry chooses among methods (``lora_experts``' ``method``) names that field the schema's
*selector*; its per-method defaults come from one table (``by_method``), and a field meant for some methods only
(``methods``) is reported when given for another.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
from collections.abc import Callable
from collections.abc import Mapping
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any
from typing import Final

from moepatch.validation import Problems
from moepatch.validation import is_int
from moepatch.validation import is_number
from moepatch.validation import warn_unknown

__all__ = ["REQUIRED", "ConfigEntry", "Field", "Schema", "boolean", "describe", "format_entries", "integer",
           "layer_indices", "markdown_table", "non_negative_number", "optional_text", "positive_number",
           "probability"]

SCHEMA_KEY: Final = "moepatch.schema"
"""The dataclass-field metadata key holding a field's :class:`Field` declaration."""


class _Required:
    """The default of a field the user must give (a sentinel: ``None`` is a real default)."""

    def __repr__(self) -> str:
        return "REQUIRED"


REQUIRED: Final = _Required()

Check = Callable[[Any, str, Problems], Any]
"""Checks one value at a path: records its problems and returns the value to keep (converted where the config stores
another type, e.g. ``int`` → ``float``)."""


@dataclass(frozen=True)
class Field:
    """One key of a config block: what users write, what it defaults to, and how it is checked."""

    name: str
    """The key in the block."""
    kind: str
    """The JSON value users write, as the docs show it (``"integer"``, ``"list of layer indices | null"``)."""
    help: str
    """What the field does (``moepatch inspect --help-config``, docs/configuration.md)."""
    default: Any = REQUIRED
    """The value when the key is absent; :data:`REQUIRED` when it must be given."""
    check: Check | None = None
    """The value's check (after ``choices``); ``None``: any value of the listed choices, or any value at all."""
    choices: tuple[Any, ...] | None = None
    """The only values accepted (``expected one of (...), got X``)."""
    by_method: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    """Per-method defaults that replace :attr:`default` (filled from the schema's ``by_method`` table)."""
    methods: tuple[str, ...] | None = None
    """The methods the field applies to (``None``: all); given for another method it is reported (its value is still
    checked: every problem in one go)."""
    other_methods: str = ""
    """The message for a field given for a method outside :attr:`methods`."""
    missing: str = ""
    """The message for a required field that is absent (empty: its value is checked as ``null``)."""
    nested: tuple[Field, ...] = ()
    """The fields of an object value (``balance_loss``'s ``coef``, ``reduction``), for the docs."""

    @property
    def shown_kind(self) -> str:
        """:attr:`kind`, or the choices themselves when the field has some (``"actual" | "vanilla"``)."""
        return " | ".join(shown(choice) for choice in self.choices) if self.choices is not None else self.kind

    @property
    def required(self) -> bool:
        """The user must give this field."""
        return self.default is REQUIRED

    def default_for(self, method: Any) -> Any:
        """The default under ``method`` (a fresh copy: a list default is never shared between configs);
        ``None`` for a required field."""
        value = self.by_method.get(method, self.default) if isinstance(method, str) else self.default
        return None if value is REQUIRED else copy.deepcopy(value)

    def check_value(self, value: Any, path: str, problems: Problems) -> Any:
        """``value`` checked against :attr:`choices` and :attr:`check`; the value to keep."""
        if self.choices is not None and value not in self.choices:
            problems.add(path, f"expected one of {self.choices}, got {value!r}")
            return value
        return self.check(value, path, problems) if self.check is not None else value


def describe(kind: str, help: str, *, check: Check | None = None, choices: tuple[Any, ...] | None = None,
             methods: tuple[str, ...] | None = None, other_methods: str = "", missing: str = "",
             nested: type | None = None) -> dict[str, Any]:
    """The metadata of a config dataclass field (``dataclasses.field(default=..., metadata=describe(...))``).

    The field's name and default come from the dataclass field itself, so each is written once; ``nested`` names the
    dataclass of an object value whose own fields the docs list under this one.
    """
    declared = Field("", kind, help, check=check, choices=choices, methods=methods, other_methods=other_methods,
                     missing=missing, nested=Schema.of(nested).fields if nested is not None else ())
    return {"help": help, SCHEMA_KEY: declared}


@dataclass(frozen=True)
class Schema:
    """The declared fields of one config object, in the order they are checked (= reported)."""

    fields: tuple[Field, ...]
    selector: str | None = None
    """The field choosing the method whose defaults apply (checked first; a bad one stops the walk)."""
    unknown_keys: str = "warn"
    """``"warn"``: keys no field declares warn and are ignored (written by a newer moepatch); ``"ignore"``."""

    @classmethod
    def of(cls, config_type: type, *, selector: str | None = None,
           by_method: Mapping[str, Mapping[str, Any]] | None = None, unknown_keys: str = "warn") -> Schema:
        """The fields ``config_type`` (a dataclass) declares with :func:`describe`, in its field order.

        ``by_method`` is the one table of per-method defaults: ``{method: {field: default}}``.
        """
        table = by_method or {}
        declared = []
        for item in dataclasses.fields(config_type):
            spec = item.metadata.get(SCHEMA_KEY)
            if spec is None:  # not a key of the block (e.g. where a config came from)
                continue
            if item.default is not dataclasses.MISSING:
                default = item.default
            elif item.default_factory is not dataclasses.MISSING:
                default = item.default_factory()
            else:
                default = REQUIRED
            methods = {method: values[item.name] for method, values in table.items() if item.name in values}
            declared.append(dataclasses.replace(spec, name=item.name, default=default, by_method=methods))
        return cls(tuple(declared), selector, unknown_keys)

    @property
    def names(self) -> tuple[str, ...]:
        """The keys the block may hold."""
        return tuple(item.name for item in self.fields)

    def field(self, name: str) -> Field:
        """The field declared as ``name``."""
        return next(item for item in self.fields if item.name == name)

    def parse(self, data: Mapping[str, Any], path: str, problems: Problems) -> dict[str, Any] | None:
        """Every field's value (given, or its default under the chosen method), checked; every problem goes to
        ``problems`` with its path (``<path>.<field>``), in field order.

        A bad value is kept as given (a config with problems is only read for its messages).  ``None`` when the
        selector is bad: no default of any other field is known then.
        """
        if self.unknown_keys == "warn":
            warn_unknown(dict(data), set(self.names), path, stacklevel=5)
        values: dict[str, Any] = {}
        method: Any = None
        for item in self.fields:
            where = f"{path}.{item.name}"
            given = item.name in data
            if given and item.methods is not None and method not in item.methods:
                problems.add(where, item.other_methods)
            if not given and item.required and item.missing:
                problems.add(where, item.missing)
                continue
            before = len(problems.messages)
            values[item.name] = item.check_value(data[item.name] if given else item.default_for(method), where,
                                                 problems)
            if item.name == self.selector:
                if len(problems.messages) > before:
                    return None
                method = values[item.name]
        return values


# ---------------------------------------------------------------------------------------------- checks
def boolean(value: Any, path: str, problems: Problems) -> Any:
    """``true`` or ``false``."""
    if not isinstance(value, bool):
        problems.add(path, f"expected true or false, got {value!r}")
    return value


def integer(value: Any, path: str, problems: Problems) -> Any:
    """An integer (JSON's ``true`` is not one)."""
    if not is_int(value):
        problems.add(path, f"expected an integer, got {value!r}")
    return value


def non_negative_number(value: Any, path: str, problems: Problems) -> Any:
    """A finite number >= 0, kept as a float."""
    if not is_number(value) or not math.isfinite(value) or value < 0:
        problems.add(path, f"expected a finite number >= 0, got {value!r}")
        return value
    return float(value)


def positive_number(value: Any, path: str, problems: Problems) -> Any:
    """A finite number > 0, kept as a float."""
    if not is_number(value) or not math.isfinite(value) or value <= 0:
        problems.add(path, f"expected a positive, finite number, got {value!r}")
        return value
    return float(value)


def probability(value: Any, path: str, problems: Problems) -> Any:
    """A finite number in [0, 1), kept as a float (a dropout rate: 1 would drop everything)."""
    before = len(problems.messages)
    kept = non_negative_number(value, path, problems)
    if len(problems.messages) == before and not kept < 1:
        problems.add(path, f"expected a probability below 1, got {kept}")
    return kept


def optional_text(expected: str) -> Check:
    """A string or ``null``; otherwise ``expected <expected>, got X``."""

    def check(value: Any, path: str, problems: Problems) -> Any:
        if value is not None and not isinstance(value, str):
            problems.add(path, f"expected {expected}, got {value!r}")
        return value

    check.__doc__ = f"A string ({expected}) or null."
    return check


def layer_indices(*, unique: bool) -> Check:
    """A non-empty list of decoder-layer indices (negative counts from the last layer), or ``null`` for every MoE
    layer; ``unique``: a repeated index is reported too."""

    def check(value: Any, path: str, problems: Problems) -> Any:
        if value is None:
            return None
        if not isinstance(value, list):
            problems.add(path, f"expected a list of layer indices or null, got {value!r}")
            return value
        if not value:
            problems.add(path, "empty list (use null for every MoE layer)")
            return value
        wrong = [position for position, index in enumerate(value) if not is_int(index)]
        for position in wrong:
            problems.add(f"{path}[{position}]", f"expected an integer layer index, got {value[position]!r}")
        if unique and not wrong and len(set(value)) != len(value):
            problems.add(path, f"duplicate layer indices {sorted({i for i in value if value.count(i) > 1})}")
        return list(value)

    check.__doc__ = "Decoder-layer indices" + (", each once" if unique else "") + ", or null."
    return check


# ---------------------------------------------------------------------------------------------- description
@dataclass(frozen=True)
class ConfigEntry:
    """One key of the ``"moepatch"`` block as users write it: the forms of its value and, for an object, its fields."""

    name: str
    """The key in the block (a feature's name, or the block's own ``family`` / ``moepatch_version``)."""
    forms: str
    """The values the key accepts (``'{"top_t": T, ...}', false``)."""
    help: str
    """What the key does."""
    fields: tuple[Field, ...] = ()
    """The fields of its object form, in the order they are checked."""


def shown(value: Any) -> str:
    """A default as users write it in config.json (``null``, ``true``, ``["q_proj", ...]``)."""
    if value is REQUIRED:
        return "required"
    try:
        return json.dumps(value, ensure_ascii=False)
    except TypeError:
        return repr(value)


def _field_rows(fields: Sequence[Field], prefix: str = "") -> list[tuple[str, Field]]:
    """``(dotted name, field)`` of ``fields`` and their nested fields, in order."""
    rows = []
    for item in fields:
        rows.append((prefix + item.name, item))
        rows.extend(_field_rows(item.nested, f"{prefix}{item.name}."))
    return rows


def _notes(item: Field, *, code: bool = False) -> list[str]:
    """The per-method defaults and the method restriction of a field, as short phrases (values in backticks for
    markdown with ``code``)."""
    quote = "`" if code else ""
    notes = [f"{method}: {quote}{shown(value)}{quote}" for method, value in item.by_method.items()]
    if item.methods is not None:
        notes.append(f"only for {' / '.join(item.methods)}")
    return notes


def format_entries(entries: Sequence[ConfigEntry]) -> str:
    """The schema as plain text: each entry, then each field with its type, default and help."""
    lines = []
    for entry in entries:
        lines.append(f"{entry.name}: {entry.forms}")
        lines.append(f"    {entry.help}")
        for name, item in _field_rows(entry.fields):
            notes = _notes(item)
            lines.append(f"  {entry.name}.{name}  ({item.shown_kind}; default {shown(item.default)}"
                         + (f"; {'; '.join(notes)}" if notes else "") + ")")
            lines.append(f"      {item.help}")
        lines.append("")
    return "\n".join(lines)


def markdown_table(entries: Sequence[ConfigEntry]) -> str:
    """The schema as one markdown table per entry with fields (``docs/configuration.md``)."""
    parts = []
    for entry in entries:
        parts.append(f"## `{entry.name}`\n\n{entry.help}\n\nValue: `{entry.forms}`\n")
        if entry.fields:
            rows = ["| field | type | default | meaning |", "|---|---|---|---|"]
            for name, item in _field_rows(entry.fields):
                default = "required" if item.required else f"`{shown(item.default)}`"
                default += "".join(f"; {note}" for note in _notes(item, code=True))
                rows.append(f"| `{name}` | {_cell(item.shown_kind)} | {_cell(default)} | {_cell(item.help)} |")
            parts.append("\n".join(rows) + "\n")
    return "\n".join(parts)


def _cell(text: str) -> str:
    """``text`` safe inside a markdown table cell."""
    return text.replace("|", "\\|").replace("\n", " ")
