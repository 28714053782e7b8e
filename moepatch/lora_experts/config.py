"""``moepatch.lora_experts`` in config.json: which method, where, how many experts of which rank.

Per-layer and per-module values follow the published tools: an int for every target, a list indexed by decoder
layer (MoLA's ``--number_experts`` / ``--lora_r`` / ``--top_k``), a dict keyed by full module path (GuiLoMo's
``expert.json``), per-expert ranks keyed ``<module path>.expertlora_E_vector_<i>`` (GuiLoMo's ``rank.json``), or the
path of such a JSON file (relative paths resolve against the checkpoint folder).  A routed experts' projection may be
allocated per routed expert, keyed ``<experts module>.<e>.<projection>`` (see :func:`routed_expert_path`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from dataclasses import field
from pathlib import Path
from typing import Any

from moepatch.schema import Check
from moepatch.schema import Schema
from moepatch.schema import boolean
from moepatch.schema import describe
from moepatch.schema import non_negative_number
from moepatch.schema import optional_text
from moepatch.schema import probability
from moepatch.validation import Problems
from moepatch.validation import read_json_beside

WEIGHTS_NAME = "lora_experts.safetensors"
"""The file beside a checkpoint that holds its trained LoRA experts (``save_pretrained`` writes it)."""

ROUTER_INITS = ("normal_0.02", "kaiming")
REDUCTIONS = ("layer", "sum", "mean")
SCALINGS = ("per_expert", "last_expert_rank")
ROUTER_INPUTS = ("scaled", "hidden")  # MoV: the tensor being scaled (its code) or the projection's input (figure)
FFN_SCALED = ("gate_activation", "down_input")
"""MoV on a gated feed-forward block: ``"gate_activation"`` scales ``act(gate x)`` before the product with ``up x``
and routes on it (the official flaxformer fork's ``intermediate_conv`` on ``act(wi_0 x)``); ``"down_input"`` scales
the down projection's input ``act(gate x)·(up x)`` and routes on that product (moepatch's earlier default)."""
METHOD_DEFAULTS: dict[str, dict[str, Any]] = {
    # MoLoRA (configs/molora.gin): the official fork adapts q, k, v, o, wi_0 (the gated branch, before the
    # activation) and wo — not wi_1 (up).  On a feed-forward block with no gate projection, up_proj is its wi and is
    # adapted too (see inject.py).
    "molora": {"target_modules": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "down_proj"],
               "num_experts": 10, "r": 4},
    # MoV (configs/mov.gin and its code): (IA)³ vectors on keys, values and the feed-forward output, per head.
    "mov": {"target_modules": ["k_proj", "v_proj", "down_proj"], "num_experts": 30, "per_head": True},
    # MoLA's training flags (--lora_dropout 0.05, top-2, Kaiming routers); GuiLoMo's stage 2 runs as "mola" with its
    # expert.json / rank.json allocations (moepatch.tools.lora_experts.importers.guilomo_block).
    "mola": {"target_modules": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
             "num_experts": 8, "top_k": 2, "dropout": 0.05, "router_init": "kaiming"},
}
"""The one table of per-method defaults; a field not named for a method takes its declared default."""
METHODS = tuple(METHOD_DEFAULTS)
DEFAULT_TARGETS = {method: tuple(values["target_modules"]) for method, values in METHOD_DEFAULTS.items()}
PER_EXPERT_RANK = re.compile(r"^(?P<module>.+)\.expertlora_E_vector_(?P<expert>\d+)$")
NOT_MOV = tuple(method for method in METHODS if method != "mov")
MOV_ONLY = "only MoV (method 'mov') has this choice"
VECTORS_HAVE_NO = "MoV experts are (IA)³ vectors: they have no "


def routed_expert_path(experts_path: str, projection: str | None, expert: int) -> str:
    """The key of routed expert ``expert``'s projection in GuiLoMo files: ``<experts module>.<e>.<projection>``, the
    name transformers-4 gave a per-expert module (``model.layers.0.mlp.experts.3.gate_proj``); ``<module>.<e>`` when
    the storage module is the projection itself (``projection`` None)."""
    return f"{experts_path}.{expert}" if projection is None else f"{experts_path}.{expert}.{projection}"


def _size_spec(*, per_expert: bool, allow_dict: bool = True, optional: bool = False) -> Check:
    """The shape-level check of a count / rank spec (an int, a list per layer, a dict per module, a JSON file)."""

    def check(value: Any, path: str, problems: Problems) -> Any:
        if not (optional and value is None):
            _check_spec(value, path, problems, minimum=1, per_expert=per_expert, allow_dict=allow_dict)
        return value

    return check


def _module_names(value: Any, path: str, problems: Problems) -> Any:
    """A non-empty list of module names (one name alone is a list of one); a ``re:`` entry must compile."""
    names = [value] if isinstance(value, str) else value
    if not isinstance(names, list) or not names or not all(isinstance(name, str) and name for name in names):
        problems.add(path, f"expected a non-empty list of module names, got {names!r}")
        return names
    for position, name in enumerate(names):
        if name.startswith("re:"):
            try:
                re.compile(name[3:])
            except re.error as error:  # found here, not when the first path is matched against it
                problems.add(f"{path}[{position}]", f"{name!r} is not a regular expression ({error})")
    return list(names)


def _balance_loss(value: Any, path: str, problems: Problems) -> BalanceLossConfig | None:
    """``true`` (the defaults), ``false`` / ``null`` (off), or ``{coef, reduction}``."""
    if value is True:
        value = {}
    if isinstance(value, dict):
        before = len(problems.messages)
        values = BALANCE_LOSS_SCHEMA.parse(value, path, problems) or {}
        return BalanceLossConfig(**values) if len(problems.messages) == before else None
    if value not in (None, False):  # 0 == False: a 0 switches it off as well
        problems.add(path, f"expected true, false or {{coef, reduction}}, got {value!r}")
    return None


@dataclass
class BalanceLossConfig:
    """Switch-style load balancing of the LoRA-expert routers (top-k modes only), padding excluded."""

    coef: float = field(default=1e-3, metadata=describe("number >= 0", "Coefficient of the balance loss.",
                                                        check=non_negative_number))
    reduction: str = field(
        default="layer",
        metadata=describe("string", "'layer': MoLA's per-layer pooled term, summed; 'sum' / 'mean': one term per "
                                    "router.", choices=REDUCTIONS))

    def to_dict(self) -> dict[str, Any]:
        return {"coef": self.coef, "reduction": self.reduction}


BALANCE_LOSS_SCHEMA = Schema.of(BalanceLossConfig, unknown_keys="ignore")


@dataclass
class LoraExpertsConfig:
    """The validated ``lora_experts`` block (values still unresolved against a model: see ``plan``).

    The fields are declared in the order they are checked; per-method defaults live in :data:`METHOD_DEFAULTS`.
    """

    method: str = field(metadata=describe("string", "Which mixture of LoRA experts: MoLoRA, MoV ((IA)³ vectors) or "
                                                    "MoLA (GuiLoMo allocations run as 'mola').", choices=METHODS))
    target_modules: list[str] = field(
        default_factory=list,
        metadata=describe("list of module names (or one name)",
                          "Projections to adapt: short names, dotted suffixes, full paths or 're:' + a pattern; not "
                          "given: the method's defaults, entries a family lacks skipped.", check=_module_names))
    routed_experts: bool = field(
        default=False,
        metadata=describe("bool", "Broad names (gate_proj, re:.*_proj) reach the routed experts too "
                                  "(docs/lora-experts.md).",
                          check=boolean))
    num_experts: Any = field(
        default=None,
        metadata=describe("int | list per layer | {module: n} | JSON file", "LoRA experts per adapted module.",
                          check=_size_spec(per_expert=False)))
    r: Any = field(
        default=8,
        metadata=describe("int | list per layer | {module: r} | {module.expertlora_E_vector_i: r} | JSON file",
                          "LoRA rank of each expert (per expert with GuiLoMo's rank.json keys).",
                          check=_size_spec(per_expert=True), methods=NOT_MOV, other_methods=VECTORS_HAVE_NO + "rank"))
    top_k: Any = field(
        default=None,
        metadata=describe("null | int | list per layer", "Experts mixed per token; null: a dense soft merge of all.",
                          check=_size_spec(per_expert=False, allow_dict=False, optional=True)))
    renormalize: bool = field(
        default=True,
        metadata=describe("bool", "Top-k weights renormalised over the k (MoLA); false: a masked softmax (MoV's code).",
                          check=boolean))
    router_input: str = field(
        default="scaled",
        metadata=describe("string", "MoV: route on the tensor being scaled ('scaled', its code) or the projection's "
                                    "input ('hidden', its figure).", choices=ROUTER_INPUTS, methods=("mov",),
                          other_methods=MOV_ONLY))
    ffn_scaled: str = field(
        default="gate_activation",
        metadata=describe("string", "MoV on gated feed-forward blocks: 'gate_activation' scales act(gate x) before the "
                                    "product with up x (the official fork); 'down_input' the down projection's input. "
                                    "A block with trained weights but no ffn_scaled keeps 'down_input'.",
                          choices=FFN_SCALED, methods=("mov",), other_methods=MOV_ONLY))
    per_head: bool = field(
        default=False,
        metadata=describe("bool", "MoV on keys / values: vectors [heads, E, head_dim], a router per head.",
                          check=boolean, methods=("mov",), other_methods=MOV_ONLY))
    alpha: float = field(default=16.0, metadata=describe("number >= 0", "LoRA alpha (scaling alpha / r).",
                                                         check=non_negative_number))
    dropout: float = field(default=0.0, metadata=describe("number in [0, 1)", "Dropout on the experts' input.",
                                                          check=probability))
    z_loss_coef: float = field(default=0.0, metadata=describe("number >= 0", "Router z-loss coefficient.",
                                                              check=non_negative_number))
    scaling: str = field(
        default="per_expert",
        metadata=describe("string", "'per_expert': alpha / r_e per expert; 'last_expert_rank': GuiLoMo stage 2's "
                                    "alpha / r_last for all.", choices=SCALINGS, methods=NOT_MOV,
                          other_methods=VECTORS_HAVE_NO + "LoRA scaling"))
    router_init: str = field(default="normal_0.02", metadata=describe("string", "Initialisation of the routers.",
                                                                      choices=ROUTER_INITS))
    balance_loss: BalanceLossConfig | None = field(
        default=None,
        metadata=describe("true | false | {coef, reduction}", "Switch-style balance loss of the routers (top-k only).",
                          check=_balance_loss, nested=BalanceLossConfig))
    train_base: bool = field(default=False, metadata=describe("bool", "Leave the base model's weights trainable.",
                                                              check=boolean))
    weights: str | None = field(
        default=None,
        metadata=describe("file name | null", "Safetensors file (beside the checkpoint) with the trained experts.",
                          check=optional_text("a file name")))
    default_targets: bool = False  # target_modules not given: entries a family lacks are skipped, not refused

    @classmethod
    def parse(cls, data: Any, path: str, problems: Problems) -> LoraExpertsConfig | None:
        """The config from the block value (``None`` / ``false``: off); every bad field goes to ``problems``."""
        if data is None or data is False:
            return None
        if not isinstance(data, dict):
            problems.add(path, f"expected an object with a 'method', got {data!r}")
            return None
        values = LORA_EXPERTS_SCHEMA.parse(data, path, problems)
        if values is None:  # no valid method: none of its defaults is known
            return None
        config = cls(**values, default_targets="target_modules" not in data)
        if "ffn_scaled" not in data and data.get("weights"):
            # A saved checkpoint's block always names ffn_scaled (to_dict writes it); one with trained weights but no
            # ffn_scaled was trained before the choice existed, on the down projection's input: keep what it learned.
            config.ffn_scaled = "down_input"
        config._check_top_k_use(data, path, problems)
        return config

    def _check_top_k_use(self, data: dict[str, Any], path: str, problems: Problems) -> None:
        """What needs top-k routing (MoLA, ``renormalize``, ``balance_loss``) when ``top_k`` is null."""
        if self.top_k is not None:
            return
        if self.method == "mola":
            problems.add(f"{path}.top_k", "MoLA routes top-k: give an int or a list per layer")
        if "renormalize" in data and isinstance(self.renormalize, bool):
            problems.add(f"{path}.renormalize", "only top-k routing is renormalised: set top_k")
        if data.get("balance_loss") is True or isinstance(data.get("balance_loss"), dict):
            problems.add(f"{path}.balance_loss", "a dense soft merge has no expert load to balance: set top_k")

    def to_dict(self) -> dict[str, Any]:
        data: dict[str, Any] = {"method": self.method}
        if not self.default_targets:
            data["target_modules"] = list(self.target_modules)
        if self.routed_experts:
            data["routed_experts"] = True
        data |= {"num_experts": self.num_experts, "top_k": self.top_k, "alpha": self.alpha,
                 "dropout": self.dropout, "router_init": self.router_init,
                "z_loss_coef": self.z_loss_coef, "train_base": self.train_base}
        if self.top_k is not None:
            data["renormalize"] = self.renormalize
        if self.method != "mov":
            data["r"] = self.r
        if self.scaling != "per_expert":
            data["scaling"] = self.scaling
        if self.method == "mov":
            data |= {"router_input": self.router_input, "ffn_scaled": self.ffn_scaled, "per_head": self.per_head}
        if self.balance_loss is not None:
            data["balance_loss"] = self.balance_loss.to_dict()
        if self.weights is not None:
            data["weights"] = self.weights
        return data


LORA_EXPERTS_SCHEMA = Schema.of(LoraExpertsConfig, selector="method", by_method=METHOD_DEFAULTS)
"""The ``lora_experts`` fields, with each method's defaults."""


def _check_spec(value: Any, path: str, problems: Problems, *, minimum: int, per_expert: bool, allow_dict: bool = True
                ) -> None:
    """Shape-level checks of an int / list / dict / file spec (values against the model come later)."""
    if isinstance(value, str):
        return  # a JSON file, read when the model is known
    if isinstance(value, bool):
        problems.add(path, f"expected an integer, a list per layer, a dict per module or a JSON file, got {value!r}")
    elif isinstance(value, int):
        if value < minimum:
            problems.add(path, f"expected >= {minimum}, got {value}")
    elif isinstance(value, list):
        for index, item in enumerate(value):
            if isinstance(item, bool) or not isinstance(item, int) or item < minimum:
                problems.add(f"{path}[{index}]", f"expected an integer >= {minimum}, got {item!r}")
    elif isinstance(value, dict) and allow_dict:
        for key, item in value.items():
            if isinstance(item, bool) or not isinstance(item, int) or item < minimum:
                problems.add(f"{path}[{key!r}]", f"expected an integer >= {minimum}, got {item!r}")
            if not per_expert and PER_EXPERT_RANK.match(key):
                problems.add(f"{path}[{key!r}]", "per-expert keys (expertlora_E_vector_<i>) are for ranks (r)")
    else:
        problems.add(path, f"expected an integer, a list per layer{', a dict per module' if allow_dict else ''} "
                           f"or a JSON file, got {value!r}")


def read_spec_file(value: Any, base_dir: str | Path | None, path: str) -> Any:
    """A spec given as a JSON file name → its content (GuiLoMo's expert.json / rank.json are plain dicts)."""
    if not isinstance(value, str):
        return value
    return read_json_beside(value, base_dir, path)
