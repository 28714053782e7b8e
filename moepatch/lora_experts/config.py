"""``moepatch.lora_experts`` in config.json: which method, where, how many experts of which rank.

Per-layer and per-module values follow the published tools: an int for every target, a list indexed by decoder
layer (MoLA's ``--number_experts`` / ``--lora_r`` / ``--top_k``), a dict keyed by full module path (GuiLoMo's
``expert.json``), per-expert ranks keyed ``<module path>.expertlora_E_vector_<i>`` (GuiLoMo's ``rank.json``), or the
path of such a JSON file (relative paths resolve against the checkpoint folder).  A routed experts' projection may be
allocated per routed expert, keyed ``<experts module>.<e>.<projection>`` (see :func:`routed_expert_path`).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from dataclasses import field
from pathlib import Path
from typing import Any

from moepatch.validation import read_json_beside
from moepatch.validation import warn_unknown

WEIGHTS_NAME = "lora_experts.safetensors"
"""The file beside a checkpoint that holds its trained LoRA experts (``save_pretrained`` writes it)."""

METHODS = ("molora", "mov", "mola")
ROUTER_INITS = ("normal_0.02", "kaiming")
REDUCTIONS = ("layer", "sum", "mean")
SCALINGS = ("per_expert", "last_expert_rank")
ROUTER_INPUTS = ("scaled", "hidden")  # MoV: the tensor being scaled (its code) or the projection's input (figure)
FFN_SCALED = ("gate_activation", "down_input")
"""MoV on a gated feed-forward block: ``"gate_activation"`` scales ``act(gate x)`` before the product with ``up x``
and routes on it (the official flaxformer fork's ``intermediate_conv`` on ``act(wi_0 x)``); ``"down_input"`` scales
the down projection's input ``act(gate x)·(up x)`` and routes on that product (moepatch's earlier default)."""
DEFAULT_TARGETS = {
    # MoLoRA: the official fork adapts q, k, v, o, wi_0 (the gated branch, before the activation) and wo — not wi_1
    # (up).  On a feed-forward block with no gate projection, up_proj is its wi and is adapted too (see inject.py).
    "molora": ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "down_proj"),
    "mola": ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"),
    "mov": ("k_proj", "v_proj", "down_proj"),
}
DEFAULT_EXPERTS = {"molora": 10, "mola": 8, "mov": 30}  # MoV: configs/mov.gin; MoLoRA: configs/molora.gin
DEFAULT_DROPOUT = {"molora": 0.0, "mola": 0.05, "mov": 0.0}  # MoLA: --lora_dropout 0.05
PER_EXPERT_RANK = re.compile(r"^(?P<module>.+)\.expertlora_E_vector_(?P<expert>\d+)$")


def routed_expert_path(experts_path: str, projection: str | None, expert: int) -> str:
    """The key of routed expert ``expert``'s projection in GuiLoMo files: ``<experts module>.<e>.<projection>``, the
    name transformers-4 gave a per-expert module (``model.layers.0.mlp.experts.3.gate_proj``); ``<module>.<e>`` when
    the storage module is the projection itself (``projection`` None)."""
    return f"{experts_path}.{expert}" if projection is None else f"{experts_path}.{expert}.{projection}"


@dataclass
class BalanceLossConfig:
    """Switch-style load balancing of the LoRA-expert routers (top-k modes only), padding excluded."""

    coef: float = 1e-3
    reduction: str = "layer"  # "layer": MoLA's per-layer pooled term, summed; "sum" / "mean": one term per router

    def to_dict(self) -> dict[str, Any]:
        return {"coef": self.coef, "reduction": self.reduction}


@dataclass
class LoraExpertsConfig:
    """The validated ``lora_experts`` block (values still unresolved against a model: see ``plan``)."""

    method: str
    target_modules: list[str] = field(default_factory=list)
    routed_experts: bool = False  # broad names (gate_proj, re:.*_proj) reach routed experts too; see inject.py
    num_experts: Any = None  # int | list per layer | {module: n} | str (JSON file)
    r: Any = 8  # int | list per layer | {module: r} | {module.expertlora_E_vector_i: r} | str
    top_k: Any = None  # None (dense soft merge) | int | list per layer
    renormalize: bool = True  # top-k weights renormalised over the k (MoLA); False: masked softmax (MoV's code)
    router_input: str = "scaled"  # MoV: "scaled" (the tensor being scaled, MoV's code) | "hidden" (projection input)
    ffn_scaled: str = "gate_activation"  # MoV on gated FFN blocks: see FFN_SCALED
    per_head: bool = False  # MoV on keys / values: vectors [heads, E, head_dim], a router per head (MoVAttention)
    alpha: float = 16.0
    scaling: str = "per_expert"  # α / r_e per expert | "last_expert_rank": GuiLoMo stage 2's α / r_last for all
    dropout: float = 0.0
    router_init: str = "normal_0.02"
    balance_loss: BalanceLossConfig | None = None
    z_loss_coef: float = 0.0
    train_base: bool = False
    weights: str | None = None  # safetensors file (beside the checkpoint) holding the trained LoRA experts
    default_targets: bool = False  # target_modules not given: entries a family lacks are skipped, not refused

    @classmethod
    def parse(cls, data: Any, path: str, problems: Any) -> LoraExpertsConfig | None:
        if data is None or data is False:
            return None
        if not isinstance(data, dict):
            problems.add(path, f"expected an object with a 'method', got {data!r}")
            return None
        warn_unknown(data, {"method", "target_modules", "routed_experts", "num_experts", "r", "top_k", "renormalize",
                             "router_input", "ffn_scaled", "per_head", "alpha", "scaling", "dropout", "router_init",
                             "balance_loss", "z_loss_coef", "train_base", "weights"}, path)
        method = data.get("method")
        if method not in METHODS:
            problems.add(f"{path}.method", f"expected one of {METHODS}, got {method!r}")
            return None
        result = cls(method=method)
        result._parse_targets(data, path, problems)
        result._parse_sizes(data, path, problems)
        result._parse_routing(data, path, problems)
        result._parse_numbers(data, path, problems)
        result._parse_init(data, path, problems)
        result._parse_balance(data, path, problems)
        train_base = data.get("train_base", False)
        if not isinstance(train_base, bool):
            problems.add(f"{path}.train_base", f"expected true or false, got {train_base!r}")
        result.train_base = bool(train_base)
        weights = data.get("weights")
        if weights is not None and not isinstance(weights, str):
            problems.add(f"{path}.weights", f"expected a file name, got {weights!r}")
        result.weights = weights
        return result

    def _parse_targets(self, data: dict[str, Any], path: str, problems: Any) -> None:
        """``target_modules`` (the method's defaults when not given) and ``routed_experts``."""
        self.default_targets = "target_modules" not in data
        targets = data.get("target_modules", list(DEFAULT_TARGETS[self.method]))
        if isinstance(targets, str):
            targets = [targets]
        if not isinstance(targets, list) or not targets or not all(isinstance(t, str) and t for t in targets):
            problems.add(f"{path}.target_modules", f"expected a non-empty list of module names, got {targets!r}")
        else:
            self.target_modules = list(targets)
        routed = data.get("routed_experts", False)
        if not isinstance(routed, bool):
            problems.add(f"{path}.routed_experts", f"expected true or false, got {routed!r}")
        self.routed_experts = routed is True

    def _parse_sizes(self, data: dict[str, Any], path: str, problems: Any) -> None:
        """``num_experts``, ``r`` (not MoV's) and ``top_k`` (MoLA's is required), with the method's defaults."""
        method = self.method
        self.num_experts = data.get("num_experts", DEFAULT_EXPERTS[method])
        _check_spec(self.num_experts, f"{path}.num_experts", problems, minimum=1, per_expert=False)
        self.r = data.get("r", 8 if method != "molora" else 4)
        if method != "mov":
            _check_spec(self.r, f"{path}.r", problems, minimum=1, per_expert=True)
        elif "r" in data:
            problems.add(f"{path}.r", "MoV experts are (IA)³ vectors: they have no rank")
        self.top_k = data.get("top_k", 2 if method == "mola" else None)
        if self.top_k is not None:
            _check_spec(self.top_k, f"{path}.top_k", problems, minimum=1, per_expert=False, allow_dict=False)
        if method == "mola" and self.top_k is None:
            problems.add(f"{path}.top_k", "MoLA routes top-k: give an int or a list per layer")

    def _parse_numbers(self, data: dict[str, Any], path: str, problems: Any) -> None:
        """``alpha``, ``dropout`` (a probability below 1) and ``z_loss_coef``: finite numbers >= 0."""
        for name, default in (("alpha", 16.0), ("dropout", DEFAULT_DROPOUT[self.method]), ("z_loss_coef", 0.0)):
            value = data.get(name, default)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
                problems.add(f"{path}.{name}", f"expected a finite number >= 0, got {value!r}")
            else:
                setattr(self, name, float(value))
        if not self.dropout < 1:
            problems.add(f"{path}.dropout", f"expected a probability below 1, got {self.dropout}")

    def _parse_init(self, data: dict[str, Any], path: str, problems: Any) -> None:
        """``scaling`` (LoRA only) and ``router_init``, with the method's defaults."""
        self.scaling = data.get("scaling", "per_expert")
        if self.scaling not in SCALINGS:
            problems.add(f"{path}.scaling", f"expected one of {SCALINGS}, got {self.scaling!r}")
        elif self.method == "mov" and "scaling" in data:
            problems.add(f"{path}.scaling", "MoV experts are (IA)³ vectors: they have no LoRA scaling")
        self.router_init = data.get("router_init", "kaiming" if self.method == "mola" else "normal_0.02")
        if self.router_init not in ROUTER_INITS:
            problems.add(f"{path}.router_init", f"expected one of {ROUTER_INITS}, got {self.router_init!r}")

    def _parse_balance(self, data: dict[str, Any], path: str, problems: Any) -> None:
        """``balance_loss``: true (the defaults), false / absent, or ``{coef, reduction}``; top-k routing only."""
        balance = data.get("balance_loss")
        if balance is True:
            balance = {}
        if isinstance(balance, dict):
            coef, reduction = balance.get("coef", 1e-3), balance.get("reduction", "layer")
            if isinstance(coef, bool) or not isinstance(coef, (int, float)) or not math.isfinite(coef) or coef < 0:
                problems.add(f"{path}.balance_loss.coef", f"expected a finite number >= 0, got {coef!r}")
            elif reduction not in REDUCTIONS:
                problems.add(f"{path}.balance_loss.reduction", f"expected one of {REDUCTIONS}, got {reduction!r}")
            else:
                self.balance_loss = BalanceLossConfig(float(coef), reduction)
            if self.top_k is None:
                problems.add(f"{path}.balance_loss", "a dense soft merge has no expert load to balance: set top_k")
        elif balance not in (None, False):
            problems.add(f"{path}.balance_loss", f"expected true, false or {{coef, reduction}}, got {balance!r}")

    def _parse_routing(self, data: dict[str, Any], path: str, problems: Any) -> None:
        """``renormalize`` (top-k only), and MoV's ``router_input``, ``ffn_scaled`` and ``per_head``."""
        self.renormalize = data.get("renormalize", True)
        if not isinstance(self.renormalize, bool):
            problems.add(f"{path}.renormalize", f"expected true or false, got {self.renormalize!r}")
        elif "renormalize" in data and self.top_k is None:
            problems.add(f"{path}.renormalize", "only top-k routing is renormalised: set top_k")
        for name in ("router_input", "ffn_scaled", "per_head"):
            if name in data and self.method != "mov":
                problems.add(f"{path}.{name}", "only MoV (method 'mov') has this choice")
        self.router_input = data.get("router_input", "scaled")
        if self.router_input not in ROUTER_INPUTS:
            problems.add(f"{path}.router_input", f"expected one of {ROUTER_INPUTS}, got {self.router_input!r}")
        # A saved checkpoint's block always names ffn_scaled (to_dict writes it); one with trained weights but no
        # ffn_scaled was trained before the choice existed, on the down projection's input: keep what it learned.
        self.ffn_scaled = data.get("ffn_scaled", "down_input" if data.get("weights") else "gate_activation")
        if self.ffn_scaled not in FFN_SCALED:
            problems.add(f"{path}.ffn_scaled", f"expected one of {FFN_SCALED}, got {self.ffn_scaled!r}")
        self.per_head = data.get("per_head", self.method == "mov")
        if not isinstance(self.per_head, bool):
            problems.add(f"{path}.per_head", f"expected true or false, got {self.per_head!r}")

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


def _check_spec(value: Any, path: str, problems: Any, *, minimum: int, per_expert: bool, allow_dict: bool = True
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
