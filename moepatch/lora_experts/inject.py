"""Resolve ``lora_experts`` against a model (plan: every check, nothing changed) and install it (undoable).

Targets are matched by module path relative to the causal LM (``model.layers.7.self_attn.q_proj``, the keys of
GuiLoMo's files): an entry matches a path equal to it or ending in ``.<entry>``; ``re:<regex>`` matches whole paths.
The family's routers (top-k routers, extra routers, shared-expert gates) are never targeted unless named by their
full path.  Routed experts are adapted only when asked (``routed_experts: true``) or named explicitly: a broad name
such as ``gate_proj`` adapts dense and shared-expert projections only, because on a model with many routed experts it
would otherwise put most of the trainable parameters into them (MoLoRA defaults at Qwen3-30B-A3B size: billions).  An
entry names the routed experts explicitly when it matches a routed projection only *because of* the name of the
module that stores them: ``mlp.experts.gate_proj``, ``experts.w1``, a full path, ``re:.*experts.*`` (MoLM:
``experts``, ``output_experts``) do; ``gate_proj``, ``w1``, ``re:.*_proj`` also match the same path with that name
replaced by any other, so they do not.  ``nn.Linear`` projections (attention, dense MLPs, shared experts) get a
hook; routed experts' projections come from the family's expert-storage adapter (:mod:`model_patches.expert_storage`),
which runs each routed expert's set on exactly that expert's rows.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any
from typing import Literal
from typing import cast

import torch
import torch.distributed as dist
from safetensors.torch import load_file
from safetensors.torch import save_file
from torch import nn

from model_patches.expert_storage import RoutedProjection
from model_patches.expert_storage import storage_of
from model_patches.spec import FFN_ACTIVATIONS
from model_patches.spec import FFN_GATE_PROJECTIONS
from model_patches.spec import FFN_OUTPUT_PROJECTIONS
from model_patches.spec import KEY_VALUE_PROJECTIONS
from model_patches.structure import MoEModel
from model_patches.structure import decoder_layers
from model_patches.structure import identity_projections
from model_patches.structure import key_value_heads
from model_patches.structure import layer_indexer
from model_patches.structure import router_modules
from moepatch.errors import FieldError
from moepatch.errors import FieldProblems
from moepatch.feature import CONFIG_KEY
from moepatch.lora_experts.balance import AUX_ATTRIBUTE
from moepatch.lora_experts.balance import install_balance_hook
from moepatch.lora_experts.config import PER_EXPERT_RANK
from moepatch.lora_experts.config import WEIGHTS_NAME
from moepatch.lora_experts.config import LoraExpertsConfig
from moepatch.lora_experts.config import read_spec_file
from moepatch.lora_experts.config import routed_expert_path
from moepatch.lora_experts.layers import LoraExperts
from moepatch.lora_experts.layers import VectorExperts
from moepatch.lora_experts.routed import RoutedExpertSets
from moepatch.undo import UndoLog

ATTRIBUTE = "lora_experts"
MOV_INPUT_SCALED = FFN_OUTPUT_PROJECTIONS  # MoV scales the FFN intermediate: the input of these projections
GATE_PROJECTIONS = FFN_GATE_PROJECTIONS
ACTIVATIONS = FFN_ACTIVATIONS


@dataclass
class LoraTarget:
    """One adapted projection, fully resolved.

    ``storage`` is ``"linear"`` (an ``nn.Linear``) or the family's routed-expert storage; for routed experts
    ``path`` is ``<experts module>.<projection>`` (``gate_proj`` / ``up_proj`` / ``down_proj``; MoLM: the
    ``ParallelExperts`` module itself) and ``in_dims`` / ``out_dims`` hold one entry per routed expert.
    """

    path: str
    module: nn.Module
    storage: str
    projection: str | None
    layer: int | None
    placement: str  # "output" (LoRA delta or MoV on the output) or "input" (MoV on the input)
    in_dims: list[int]
    out_dims: list[int]
    num_experts: int
    ranks: list[int]
    top_k: int | None
    routed: RoutedProjection | None = None
    """The storage adapter's description, for a routed experts' projection."""
    allocation: list[tuple[int, list[int]]] | None = None
    """Routed experts: (LoRA-expert count, ranks) of each routed expert's set (``num_experts`` / ``ranks`` then
    hold the largest count and every rank, for descriptions)."""
    heads: int | None = None
    """MoV per head (keys / values): the heads of the output; ``None``: one mixture over the whole width."""
    group: str = ""
    """Where it sits, for the parameter report: one of :data:`GROUPS`."""
    activation: nn.Module | None = None
    """MoV on a gated block's down projection (``ffn_scaled: "gate_activation"``): the block's activation module,
    whose output ``act(gate x)`` the vectors scale (and the router reads) before the product with ``up x``, as the
    official fork's ``intermediate_conv``; the set still hangs on the down projection (``placement`` ``"input"``:
    for a fixed mixture both scale the same product, so merging folds it into the down projection's columns)."""

    def require_routed(self) -> RoutedProjection:
        """:attr:`routed` of a routed experts' projection; ``ValueError`` for an ``nn.Linear`` (or identity) one."""
        if self.routed is None:
            raise ValueError(f"{self.path}: not a routed experts' projection")
        return self.routed


GROUPS = ("attention and other", "dense MLPs", "shared experts", "routers", "routed experts")
"""Target groups of the parameter report, told apart by the model's structure (never by family names)."""
OTHER_NAME = "moepatch_any_other_module"
"""Stands in for the routed experts' storage module when testing whether an entry names that module."""


def _matches(entry: str, path: str) -> bool:
    if entry.startswith("re:"):
        return re.fullmatch(entry[3:], path) is not None
    return path == entry or path.endswith("." + entry)


def _per_target(value: Any, path: str, layer: int | None, num_layers: int, where: str) -> int | None:
    if value is None or isinstance(value, int):
        return value
    if isinstance(value, list):
        if len(value) != num_layers:
            raise FieldError(where, f"{len(value)} entries, the model has {num_layers} layers")
        if layer is None:
            raise FieldError(where, f"{path} belongs to no decoder layer; use a dict keyed by module path")
        return value[layer]
    if isinstance(value, dict):
        if path not in value:
            raise FieldError(where, f"no entry for module {path!r}")
        return value[path]
    raise FieldError(where, f"expected an integer, a list per layer or a dict per module, got {value!r}")


def _count(value: Any, path: str, layer: int | None, num_layers: int, where: str) -> int:
    """:func:`_per_target` of a value every target must have (an expert count, a rank)."""
    count = _per_target(value, path, layer, num_layers, where)
    if count is None:
        raise FieldError(where, f"no value for module {path!r}")
    return count


def _ranks(value: Any, path: str, layer: int | None, num_layers: int, experts: int, where: str) -> list[int]:
    if isinstance(value, dict) and any(PER_EXPERT_RANK.match(key) for key in value):
        ranks = []
        for expert in range(experts):
            key = f"{path}.expertlora_E_vector_{expert}"
            if key not in value:
                raise FieldError(where, f"no rank for {key!r} (module {path!r} has {experts} experts)")
            ranks.append(int(value[key]))
        return ranks
    rank = _count(value, path, layer, num_layers, where)
    return [int(rank)] * experts


# --- per-routed-expert allocation (GuiLoMo files keyed <experts module>.<e>.<projection>) ---
def _routed_key(spec: Any, module_path: str, expert_path: str, suffix: str) -> str:
    """``expert_path`` where the dict ``spec`` has an entry for it (``suffix``: the per-expert rank key's tail), else
    ``module_path`` (one value for every routed expert)."""
    return expert_path if isinstance(spec, dict) and expert_path + suffix in spec else module_path


def _routed_allocation(num_experts: Any, ranks_spec: Any, target: LoraTarget, storage_path: str | None,
                       num_layers: int, where: str) -> list[tuple[int, list[int]]]:
    """(count, ranks) of every routed expert of ``target`` from per-routed-expert keys, falling back to its path."""
    allocation = []
    for expert in range(len(target.in_dims)):
        expert_path = routed_expert_path(storage_path or target.path.rsplit(".", 1)[0],
                                         None if storage_path else target.projection, expert)
        count = _count(num_experts, _routed_key(num_experts, target.path, expert_path, ""), target.layer,
                       num_layers, f"{where}.num_experts")
        ranks = ([] if ranks_spec is None else
                 _ranks(ranks_spec, _routed_key(ranks_spec, target.path, expert_path, ".expertlora_E_vector_0"),
                        target.layer, num_layers, count, f"{where}.r"))
        if target.top_k is not None and target.top_k > count:
            raise FieldError(f"{where}.top_k", f"{target.top_k} exceeds the {count} experts of {expert_path}")
        allocation.append((count, ranks))
    return allocation
# --- end of per-routed-expert allocation ---


def gate_and_activation(block: nn.Module | None) -> tuple[str | None, nn.Module | None]:
    """(name of the gate projection, activation module) of a feed-forward block; ``(None, None)``: not gated (its
    first projection, ``up_proj`` on LLaMA-style names, then feeds the activation alone)."""
    gate = next((name for name in GATE_PROJECTIONS if isinstance(getattr(block, name, None), nn.Module)), None)
    if gate is None:
        return None, None
    return gate, next((module for name in ACTIVATIONS
                       if isinstance(module := getattr(block, name, None), nn.Module)), None)


def _parent(root: nn.Module, path: str) -> nn.Module:
    return root.get_submodule(path.rsplit(".", 1)[0]) if "." in path else root


def _matched(entries: list[str], aliases: tuple[str, ...]) -> list[str]:
    return [entry for entry in entries if any(_matches(entry, alias) for alias in aliases)]


def names_storage(entry: str, alias: str, storage_path: str) -> bool:
    """Whether ``entry`` matches ``alias`` only through the name of the routed experts' storage module
    (``storage_path``): with that path component replaced by any other name it would no longer match."""
    if not _matches(entry, alias) or not (alias == storage_path or alias.startswith(storage_path + ".")):
        return False
    parts = alias.split(".")
    parts[storage_path.count(".")] = OTHER_NAME
    return not _matches(entry, ".".join(parts))


def _routed_hits(entries: list[str], candidate: RoutedProjection, storage_path: str, routed_experts: bool
                 ) -> tuple[list[str], list[str]]:
    """The entries that adapt ``candidate`` and those that reach it only by a broad name (left out by default)."""
    hits = _matched(entries, candidate.aliases)
    if routed_experts:
        return hits, []
    explicit = [entry for entry in hits if any(names_storage(entry, alias, storage_path)
                                               for alias in candidate.aliases)]
    return explicit, [entry for entry in hits if entry not in explicit]


def _group_prefixes(moe: MoEModel, names: dict[int, str]) -> list[tuple[str, str]]:
    """``(path prefix, group)`` of the MoE blocks (shared experts) and of the dense layers' MLP blocks."""
    prefixes = [(names[id(layer.block)], "shared experts") for layer in moe.layers if id(layer.block) in names]
    if not moe.family.block_attr:  # the decoder layer is the block (Gemma 4): only its shared experts are
        shared = moe.family.shared_expert_attrs
        prefixes = [(f"{prefix}.{name}", group) for prefix, group in prefixes for name in shared]
    for index in moe.dense_layers:
        block = moe.family.block_of(decoder_layers(moe)[index])
        if isinstance(block, nn.Module) and id(block) in names:
            prefixes.append((names[id(block)], "dense MLPs"))
    return prefixes


def _group_of(path: str, kind: str, is_router: bool, prefixes: list[tuple[str, str]]) -> str:
    if kind not in ("linear", "identity"):
        return "routed experts"
    if is_router:
        return "routers"
    return next((group for prefix, group in prefixes if path.startswith(prefix + ".")), "attention and other")


def expert_parameter_count(config: LoraExpertsConfig, target: LoraTarget) -> int:
    """Trainable parameters of the expert sets ``target`` gets (one set per routed expert for routed experts, with
    that expert's own allocation).

    LoRA experts: the router ``[E, in]`` and per expert ``A [r_e, in]``, ``B [out, r_e]``; MoV: ``δ [E, width]`` over
    the scaled tensor (``[heads, E, head_dim]`` per head) and the router ``[E, router input]`` — the projection's
    input with ``router_input: "hidden"``, else the scaled tensor (one head's slice per head).
    """
    sets = target.allocation or [(target.num_experts, target.ranks)] * len(target.in_dims)
    total = 0
    for fan_in, fan_out, (experts, ranks) in zip(target.in_dims, target.out_dims, sets, strict=True):
        if config.method == "mov":
            output = target.placement == "output"
            width = fan_out if output else fan_in
            router_in = fan_in if output and config.router_input == "hidden" else width // (target.heads or 1)
            total += experts * (width + router_in)
        else:
            total += experts * fan_in + sum(ranks) * (fan_in + fan_out)
    return total


def base_parameter_count(model: nn.Module) -> int:
    """The model's own parameters (full sizes also under ZeRO-3), LoRA experts already attached excluded."""
    marker = f".{ATTRIBUTE}."
    return sum(getattr(p, "ds_numel", p.numel()) for name, p in model.named_parameters() if marker not in name)


class _Planner:
    """One :func:`plan_lora_experts` run: the model's structure read once, and what the plan has found so far (the
    targets, every problem, the entries that matched)."""

    def __init__(self, moe: MoEModel, config: LoraExpertsConfig, base_dir: Path | None, where: str) -> None:
        self.moe, self.config, self.where = moe, config, where
        self.num_experts = read_spec_file(config.num_experts, base_dir, f"{where}.num_experts")
        self.ranks_spec = read_spec_file(config.r, base_dir, f"{where}.r") if config.method != "mov" else None
        self.routers = {id(router) for router in router_modules(moe)}
        self.identities = identity_projections(moe)
        self.layer_of = layer_indexer(moe)
        self.root = moe.inner
        self.names = {id(module): path for path, module in self.root.named_modules()}
        self.storage = storage_of(moe)
        self.routed = self.storage.projections(moe)
        self.routed_modules = {id(candidate.module) for candidate in self.routed}
        self.prefixes = _group_prefixes(moe, self.names)
        self.problems: list[tuple[str, str]] = []  # (config path, message)
        self.targets: list[LoraTarget] = []
        self.matched_entries: set[str] = set()
        self.broad: dict[str, tuple[str, str]] = {}  # entry → (a routed path it reached by a broad name only, an
        # explicit entry for it): left out unless routed_experts
        self.entries = config.target_modules
        # MoLoRA's defaults: the official fork adapts wi_0 (gate) and wo (down), not wi_1 (up); a block with no gate
        # projection has up_proj as its only wi, adapted too
        self.ungated_up = config.method == "molora" and config.default_targets
        self.activations: set[int] = set()

    def check_routed_layout(self) -> None:
        """``routed_experts: true`` on experts the storage cannot read."""
        if self.config.routed_experts and not self.routed:
            experts = type(self.moe.layers[0].experts).__name__
            self.problems.append((
                f"{self.where}.routed_experts", f"true, but {experts} stores its experts in a layout moepatch's "
                f"'{self.storage.kind}' expert storage does not read (no per-expert gate / up / down projections "
                "it can find); set routed_experts to false to adapt the other projections"))

    def add(self, path: str, module: nn.Module, kind: str, projection: str | None, in_dims: list[int],
            out_dims: list[int], candidate: RoutedProjection | None = None) -> None:
        """One matched projection as a target, or its problem."""
        config, where = self.config, self.where
        layer = self.layer_of(path)
        name = projection or path.rsplit(".", 1)[-1]
        placement = "input" if config.method == "mov" and name in MOV_INPUT_SCALED else "output"
        if config.method == "mov" and kind not in ("linear", "identity") and placement != "input":
            self.problems.append((f"{where}.target_modules", "MoV scales keys, values and the FFN intermediate; "
                                  f"{path} is a routed expert's input-side projection (use down_proj)"))
            return
        try:
            top_k = _per_target(config.top_k, path, layer, self.moe.num_layers, f"{where}.top_k")
            if candidate is not None:
                self._add_routed(LoraTarget(path, module, kind, projection, layer, placement, in_dims, out_dims, 0, [],
                                            top_k, candidate, group=_group_of(path, kind, False, self.prefixes)))
                return
            experts = _count(self.num_experts, path, layer, self.moe.num_layers, f"{where}.num_experts")
            ranks = ([] if self.ranks_spec is None else
                     _ranks(self.ranks_spec, path, layer, self.moe.num_layers, experts, f"{where}.r"))
        except FieldError as error:
            self.problems.append((error.field, error.message))
            return
        if top_k is not None and top_k > experts:
            self.problems.append((f"{where}.top_k", f"{top_k} exceeds the {experts} experts of {path}"))
            return
        activation = self._mov_activation(path, kind, placement)
        if activation is False:
            return
        heads = self._mov_heads(path, name, placement, out_dims)
        if heads is False:
            return
        self.targets.append(LoraTarget(path, module, kind, projection, layer, placement, in_dims, out_dims, experts,
                                       ranks, top_k, candidate, heads=heads,
                                       group=_group_of(path, kind, id(module) in self.routers, self.prefixes),
                                       activation=activation))

    def _add_routed(self, target: LoraTarget) -> None:
        """A routed experts' projection, allocated per routed expert (``ValueError`` on a bad allocation)."""
        storage_path = target.path if self.storage.one_projection_per_module else None
        target.allocation = _routed_allocation(self.num_experts, self.ranks_spec, target, storage_path,
                                               self.moe.num_layers, self.where)
        target.num_experts = max(count for count, _ in target.allocation)
        target.ranks = [rank for _, ranks in target.allocation for rank in ranks]
        self.targets.append(target)

    def _mov_activation(self, path: str, kind: str, placement: str) -> nn.Module | None | Literal[False]:
        """MoV on a gated block's down projection (``ffn_scaled: "gate_activation"``): the block's activation module
        (``None``: not such a target; ``False``: a problem, recorded)."""
        config = self.config
        if not (config.method == "mov" and placement == "input" and kind == "linear"
                and config.ffn_scaled != "down_input"):
            return None
        gate, activation = gate_and_activation(_parent(self.root, path))
        if gate is not None and (activation is None or id(activation) in self.activations):
            self.problems.append((f"{self.where}.ffn_scaled", f"{path}'s block is gated ({gate}) but has no "
                                  f"activation module of its own to scale act({gate} x) at; set ffn_scaled to "
                                  "'down_input'"))
            return False
        if activation is not None:
            self.activations.add(id(activation))
        return activation

    def _mov_heads(self, path: str, name: str, placement: str, out_dims: list[int]) -> int | None | Literal[False]:
        """MoV per head on keys / values: the heads of the output (``None``: one mixture over the whole width;
        ``False``: a problem, recorded)."""
        config = self.config
        if not (config.method == "mov" and config.per_head and placement == "output"
                and name in KEY_VALUE_PROJECTIONS):
            return None
        heads = key_value_heads(self.moe, out_dims[0])
        if heads is None:
            self.problems.append((f"{self.where}.per_head", f"{path} ({out_dims[0]} wide) is not a whole number of "
                                  "the model config's key/value heads; set per_head: false"))
            return False
        return heads

    def add_routed_projections(self) -> None:
        """The routed experts' projections the entries reach (broad names only with ``routed_experts``)."""
        config = self.config
        for candidate in self.routed:
            storage_path = self.names[id(candidate.module)]
            gated = any(other.module is candidate.module and other.projection in GATE_PROJECTIONS
                        for other in self.routed)
            extra = ["up_proj"] if self.ungated_up and candidate.projection == "up_proj" and not gated else []
            hits, left_out = _routed_hits(self.entries + extra, candidate, storage_path, config.routed_experts)
            for entry in left_out:
                self.broad.setdefault(entry, (candidate.path, _explicit_example(entry, candidate, storage_path)))
            if not hits:
                continue
            if config.method == "mov" and candidate.projection != "down_proj" and candidate.path not in self.entries:
                continue  # MoV scales the FFN intermediate only: input-side projections reached by a broad name
            problem = self._routed_problem(candidate)
            if problem is not None:
                self.problems.append((f"{self.where}.target_modules", f"{hits[0]!r} reaches {candidate.path}: "
                                      f"{problem}"))
                continue
            self.matched_entries.update(hits)
            self.add(candidate.path, candidate.module, self.storage.kind, candidate.projection,
                     list(candidate.in_dims), list(candidate.out_dims), candidate)

    def _routed_problem(self, candidate: RoutedProjection) -> str | None:
        """Why the routed experts' projection ``candidate`` cannot be adapted (``None``: it can)."""
        problem = self.storage.problem(candidate)
        if problem is None and candidate.held is None and getattr(candidate.module, "_is_expert_parallel", False):
            problem = (f"{type(candidate.module).__name__} is split by expert parallelism, which moepatch's "
                       f"'{self.storage.kind}' expert storage does not read (only fused experts are supported)")
        if problem is None and candidate.held is not None and (self.config.balance_loss is not None
                                                                or self.config.z_loss_coef):
            problem = ("under expert parallelism a process's routed experts receive rows of every process's batch, "
                       "whose padding it does not know, and a layer's balance term would need every process's "
                       "routers: the balance loss and z-loss are not supported on routed experts there (set "
                       "balance_loss to false and z_loss_coef to 0, or adapt only the other projections)")
        return problem

    def add_modules(self) -> None:
        """The other modules the entries match: ``nn.Linear`` projections, and MoV's identity keys / values."""
        root = self.root
        for path, module in root.named_modules():
            hits = [entry for entry in self.entries if _matches(entry, path)]
            if not hits and self.ungated_up and _matches("up_proj", path):
                hits = [] if gate_and_activation(_parent(root, path))[0] else ["up_proj"]
            if not hits or isinstance(module, (LoraExperts, VectorExperts)) or id(module) in self.routed_modules:
                continue
            if id(module) in self.routers and path not in self.entries:
                continue  # a router: only adapted when named by its full path
            if id(module) in self.identities and self.config.method == "mov":
                width = getattr(root.config, "hidden_size", None)  # keys / values that are the hidden states
                if width:
                    self.matched_entries.update(hits)
                    self.add(path, module, "identity", None, [width], [width])
                continue
            if not isinstance(module, nn.Linear):
                if any(self.names[id(target.module)].startswith(path + ".") for target in self.targets
                       if target.routed):
                    self.matched_entries.update(hits)  # a mixture module (e.g. an attention projection of experts)
                continue
            self.matched_entries.update(hits)
            self.add(path, module, "linear", None, [module.in_features], [module.out_features])

    def check_entries(self) -> None:
        """Every entry given must have matched (or be named in a problem already); something must be adapted."""
        where = self.where
        for entry in [] if self.config.default_targets else self.entries:
            if entry in self.matched_entries or any(repr(entry) in problem for _, problem in self.problems):
                continue
            if entry in self.broad:
                self.problems.append((
                    f"{where}.target_modules", f"{entry!r} reaches only routed experts ({self.broad[entry][0]}, "
                    f"...), which broad names leave out: set {where}.routed_experts to true or name the "
                    f"experts' module ({self.broad[entry][1]!r})"))
            else:
                self.problems.append((f"{where}.target_modules", f"{entry!r} matches no projection of "
                                      f"{type(self.root).__name__} (routers are only matched by full path)"))
        if not self.targets and not self.problems:
            self.problems.append((f"{where}.target_modules", "nothing to adapt" + (
                f"; {sorted(self.broad)} reach only routed experts: set {where}.routed_experts to true"
                if self.broad else "")))


def plan_lora_experts(moe: MoEModel, config: LoraExpertsConfig, base_dir: Path | None, where: str
                      ) -> list[LoraTarget]:
    """Every adapted projection with its expert count, ranks and top-k; ``ValueError`` listing every problem."""
    plan = _Planner(moe, config, base_dir, where)
    plan.check_routed_layout()
    plan.add_routed_projections()
    plan.add_modules()
    plan.check_entries()
    if plan.problems:
        raise FieldProblems("invalid moepatch config", plan.problems)
    return plan.targets


def _explicit_example(entry: str, candidate: RoutedProjection, storage_path: str) -> str:
    """An entry naming the routed experts that ``entry`` reached by a broad name: the matched path from the storage
    module's name on (``w1`` → ``experts.w1``), else the projection's own path from there (``experts.gate_proj``)."""
    start = storage_path.rfind(".") + 1
    alias = next((alias for alias in candidate.aliases if _matches(entry, alias) and alias.startswith(storage_path)),
                 candidate.path)
    return alias[start:]


def _expert_set(config: LoraExpertsConfig, target: LoraTarget, in_features: int, out_features: int,
                allocation: tuple[int, list[int]] | None = None) -> LoraExperts | VectorExperts:
    """The expert set of ``target`` (``allocation``: one routed expert's (count, ranks), default the target's)."""
    experts, ranks = allocation or (target.num_experts, target.ranks)
    if config.method == "mov":
        output = target.placement == "output"  # on an input (down_proj) the scaled tensor is the projection's input
        router_features = in_features if output and config.router_input == "hidden" else None
        return VectorExperts(out_features if output else in_features, experts, top_k=target.top_k,
                             renormalize=config.renormalize, router_init=config.router_init, heads=target.heads,
                             router_features=router_features)
    return LoraExperts(in_features, out_features, ranks, top_k=target.top_k, renormalize=config.renormalize,
                       alpha=config.alpha, dropout=config.dropout, router_init=config.router_init,
                       a_init="kaiming" if config.method == "mola" else "normal", scaling=config.scaling)


def install_lora_experts(moe: MoEModel, targets: list[LoraTarget], config: LoraExpertsConfig, undo: UndoLog,
                         weights: dict[str, torch.Tensor] | None = None) -> list[LoraExperts | VectorExperts]:
    """Attach the expert sets and their hooks / forwards; freeze the base unless ``train_base``; load ``weights``;
    route saving through :func:`install_saving` and add the balance-loss hook.  Returns every expert set created.
    """
    if not config.train_base:
        for parameter in moe.inner.parameters():
            if parameter.requires_grad:
                undo.set_requires_grad(parameter, False)
    created: list[LoraExperts | VectorExperts] = []
    grouped: dict[int, tuple[nn.Module, dict[str, RoutedExpertSets], list[RoutedProjection]]] = {}
    reference = next(moe.inner.parameters()).device
    for target in targets:
        device = next(target.module.parameters(), torch.empty(0, device=reference)).device
        if target.storage in ("linear", "identity"):
            expert_set = _expert_set(config, target, target.in_dims[0], target.out_dims[0]).to(device)
            undo.add_module(target.module, ATTRIBUTE, expert_set)
            if target.activation is not None:  # MoV on a gated block: act(gate x) scaled before the product with up x
                handle = target.activation.register_forward_hook(partial(_scale_activation, target.module))
            elif target.placement == "input":
                handle = target.module.register_forward_pre_hook(_scale_input)
            else:
                handle = target.module.register_forward_hook(_scale_output if config.method == "mov" else _add_delta)
            undo.add_hook(handle)
            created.append(expert_set)
            continue
        routed, allocation = target.routed, target.allocation
        if routed is None or allocation is None:  # the plan gives every routed experts' target both
            raise ValueError(f"{target.path}: a routed experts' target without its projection and allocation")
        held = routed.held  # under expert parallelism: this process's routed experts only
        experts = range(len(target.in_dims)) if held is None else held
        sets = [_expert_set(config, target, target.in_dims[e], target.out_dims[e], allocation[e]) for e in experts]
        created.extend(sets)
        entry = grouped.setdefault(id(target.module), (target.module, {}, []))
        entry[1][routed.projection] = RoutedExpertSets(sets, target.placement, held, len(target.in_dims)).to(device)
        entry[2].append(routed)
    storage = storage_of(moe)
    for module, per_projection, projections in grouped.values():
        if storage.one_projection_per_module:  # the module is the projection: its sets hang on it directly
            (only,) = per_projection.values()
            undo.add_module(module, ATTRIBUTE, only)
        else:
            undo.add_module(module, ATTRIBUTE, nn.ModuleDict(per_projection))
        storage.attach(module, per_projection, projections, undo)
    for expert_set in created:  # new modules start in training mode: follow the model's (dropout off in eval)
        expert_set.train(moe.inner.training)
    if weights is not None:
        load_lora_weights(moe.inner, weights)
    install_saving(moe.inner, undo)

    undo.add_callback(lambda: moe.inner.__dict__.pop(AUX_ATTRIBUTE, None))  # the hook's last values go too
    if config.balance_loss is not None or config.z_loss_coef:  # nothing to add otherwise: no hook, no work
        undo.add_hook(install_balance_hook(moe.inner, [expert_set.router for expert_set in created], config,
                                           layer_indexer(moe)))
    return created


def _experts_on(module: nn.Module) -> nn.Module:
    """The expert set attached to ``module`` (``<projection>.lora_experts``)."""
    return cast(nn.Module, module.lora_experts)


def _add_delta(module: nn.Module, inputs: tuple, output: torch.Tensor) -> torch.Tensor:
    return output + _experts_on(module)(inputs[0])


def _scale_output(module: nn.Module, inputs: tuple, output: torch.Tensor) -> torch.Tensor:
    return _experts_on(module)(output, inputs[0])


def _scale_input(module: nn.Module, inputs: tuple) -> tuple:
    return (_experts_on(module)(inputs[0]), *inputs[1:])


def _scale_activation(owner: nn.Module, module: nn.Module, inputs: tuple, output: torch.Tensor) -> torch.Tensor:
    """The activation's output ``act(gate x)`` scaled by the vectors hanging on the down projection ``owner``."""
    return _experts_on(owner)(output)


def lora_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The LoRA-expert tensors of ``model`` (keys as in ``model.state_dict()``)."""
    marker = f".{ATTRIBUTE}."
    return {key: value for key, value in model.state_dict().items() if marker in key}


def held_elsewhere(model: nn.Module) -> Callable[[str], bool]:
    """Under expert parallelism: whether a LoRA-expert key of the whole model (a saved file's) names a set of a routed
    expert another process holds — ``<projection>.sets.<e>.…`` with ``e`` outside this process's ``held`` range."""
    sharded = {f"{name}.sets.": module for name, module in model.named_modules()
               if isinstance(module, RoutedExpertSets) and module.held is not None}

    def elsewhere(key: str) -> bool:
        for prefix, module in sharded.items():
            if key.startswith(prefix):
                expert = key[len(prefix):].split(".", 1)[0]
                held = module.held if module.held is not None else range(module.total)  # sharded: never None
                return expert.isdigit() and int(expert) < module.total and int(expert) not in held
        return False

    return elsewhere


def expert_sharded(model: nn.Module) -> bool:
    """Whether ``model`` carries routed-expert sets split over processes by expert parallelism."""
    return any(isinstance(module, RoutedExpertSets) and module.held is not None for module in model.modules())


def gather_expert_shards(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Every process's LoRA-expert ``tensors`` (each its own routed experts' sets, the rest equal) in one dict, on
    the CPU: a collective, every process of the default group calls it (as ``save_pretrained`` of a model loaded
    with a ``DistributedConfig`` already requires)."""

    local = {key: value.detach().cpu() for key, value in tensors.items()}
    shards: list[dict[str, torch.Tensor] | None] = [None] * dist.get_world_size()
    dist.all_gather_object(shards, local)
    merged: dict[str, torch.Tensor] = {}
    for shard in shards:
        for key, value in (shard or {}).items():
            merged.setdefault(key, value)
    return merged


def full_lora_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """:func:`lora_state_dict` of the whole model: under expert parallelism every process's routed-expert sets,
    gathered (a collective then; see :func:`gather_expert_shards`), what a single-process model loads."""
    tensors = lora_state_dict(model)
    return gather_expert_shards(tensors) if expert_sharded(model) else tensors


def load_lora_weights(model: nn.Module, weights: dict[str, torch.Tensor]) -> None:
    """Copy saved LoRA-expert tensors in; every key and shape must match (named in the error otherwise).  Under
    expert parallelism each process takes its own routed experts' sets from a whole model's tensors (the keys of
    the sets other processes hold are expected, and skipped)."""
    own = lora_state_dict(model)
    elsewhere = held_elsewhere(model)
    weights = {key: value for key, value in weights.items() if key in own or not elsewhere(key)}
    missing, unexpected = sorted(set(own) - set(weights)), sorted(set(weights) - set(own))
    wrong = [key for key in own if key in weights and tuple(own[key].shape) != tuple(weights[key].shape)]
    if missing or unexpected or wrong:
        details = [f"missing {missing[:4]}" if missing else "", f"unexpected {unexpected[:4]}" if unexpected else "",
                   "shape mismatch " + ", ".join(f"{k}: saved {tuple(weights[k].shape)} vs {tuple(own[k].shape)}"
                                                 for k in wrong[:4]) if wrong else ""]
        raise ValueError("lora_experts weights do not match the configured experts: "
                         + "; ".join(d for d in details if d))
    with torch.no_grad():
        parameters = dict(model.named_parameters())
        for key, value in weights.items():
            parameters[key].copy_(value.to(dtype=parameters[key].dtype, device=parameters[key].device))


def read_saved_lora_weights(folder: Path | None, config: LoraExpertsConfig) -> dict[str, torch.Tensor] | None:
    """The trained experts named by ``config.weights`` (a safetensors file beside the checkpoint), or ``None``."""

    if folder is None or config.weights is None:
        return None
    file = folder / config.weights
    if not file.is_file():
        raise ValueError(f"moepatch.lora_experts.weights: {file} not found")
    return load_file(str(file))


def write_expert_file(tensors: dict[str, torch.Tensor], path: Path) -> Path:
    """Write LoRA-expert tensors (any device) to a safetensors file."""

    save_file({key: value.detach().cpu().contiguous() for key, value in tensors.items()}, str(path))
    return path


def install_saving(model: nn.Module, undo: UndoLog) -> None:
    """Keep the experts out of the model's own safetensors and write them to their own file on every save.

    transformers rewrites key names on save for some families (Mixtral's ``mlp`` → ``block_sparse_moe``, fused
    experts split per expert), which would scramble the experts' keys; so ``save_pretrained`` (also the Trainer's,
    checkpoints included) skips them and writes ``lora_experts.safetensors`` beside the weights, with the config
    block pointing at it.  A ``state_dict`` passed to ``save_pretrained`` (DeepSpeed ZeRO-3 gathers one) is used.
    Under expert parallelism the file holds every process's routed-expert sets (gathered: call ``save_pretrained``
    on every process, as transformers requires for a model loaded with a ``DistributedConfig``), so it loads into a
    single-process model, and into an EP model of any size (each process takes its own).
    """

    keys = set(lora_state_dict(model))
    ignored = set(getattr(model, "_keys_to_ignore_on_save", None) or ()) | keys
    undo.set_attribute(model, "_keys_to_ignore_on_save", ignored)
    original = cast(Callable[..., Any], model.save_pretrained)  # Module.__getattr__ types it Tensor | Module

    def save_pretrained(save_directory: str | Path, *args: Any, **kwargs: Any) -> Any:
        state_dict = kwargs.get("state_dict")
        source = state_dict if state_dict is not None else lora_state_dict(model)
        tensors = {key: value for key, value in source.items() if key in keys}
        if expert_sharded(model):  # every process's routed experts' sets in the one file (collective)
            tensors = gather_expert_shards(tensors)
        block = dict(getattr(model.config, CONFIG_KEY, None) or {})
        if "lora_experts" in block and tensors:
            block["lora_experts"] = {**block["lora_experts"], "weights": WEIGHTS_NAME}
            setattr(model.config, CONFIG_KEY, block)
        result = original(save_directory, *args, **kwargs)
        main = kwargs.get("is_main_process", True)
        writes = getattr(model, "should_save_on_this_rank", None)  # transformers: rank 0 only when distributed
        if tensors and (writes(main) if writes is not None else main):
            write_expert_file(tensors, Path(save_directory) / WEIGHTS_NAME)
        if expert_sharded(model):  # every process returns once the file is there, as from transformers' own save

            dist.barrier()
        return result

    undo.set_attribute(model, "save_pretrained", save_pretrained)
    gather = getattr(model, "gather_sharded_state_dict_for_save", None)
    if gather is not None and getattr(model, "is_distributed_loading_by_transformers", False):
        # loaded with DistributedConfig and a data-parallel size > 1: transformers gathers the full state dict
        # from the model itself after applying _keys_to_ignore_on_save, so the experts would come back into the
        # model's safetensors (and load as unexpected keys); drop them from what it gathered
        def gather_without_experts(*args: Any, **kwargs: Any) -> dict:
            return {key: value for key, value in gather(*args, **kwargs).items() if key not in keys}

        undo.set_attribute(model, "gather_sharded_state_dict_for_save", gather_without_experts)
