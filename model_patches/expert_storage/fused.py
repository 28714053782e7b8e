"""transformers 5 fused experts: every class decorated with ``use_experts_implementation`` (Qwen2-MoE, Mixtral,
Qwen3-MoE, OLMoE, gpt-oss, Aria, Ergo, Nemotron-H, ...), in each layout the decorator's flags describe.

The decorator sets on each instance how its weights are laid out, and transformers' own implementations read those
flags, so moepatch reads them too (:class:`FusedLayout`):

* ``has_gate``: gate and up are one input tensor ``gate_up_proj`` (projections ``gate_proj`` / ``up_proj``), or the
  experts are gate-less (``up_proj`` alone, then ``act_fn``; Nemotron-H, Ergo);
* ``is_transposed``: ``[E, in, out]`` tensors applied as ``x @ W_e`` (gpt-oss, Aria, Ergo) instead of ``[E, out, in]``;
* ``is_concatenated``: the gate half then the up half of ``gate_up_proj``'s output, or gate at even and up at odd
  output columns (gpt-oss, whose ``_apply_gate`` reads ``[..., ::2]`` / ``[..., 1::2]``);
* ``has_bias``: ``<input>_bias [E, out]`` and ``down_proj_bias [E, H]`` added after each product (gpt-oss);
* ``has_post_expert_norm``: ``post_expert_norm`` applied to each route's output before its routing weight.

Deltas reach these experts through transformers' own experts-implementation interface: moepatch registers one more
implementation (:data:`IMPLEMENTATION`) in ``ALL_EXPERTS_FUNCTIONS`` and gives each adapted experts module its own
shallow copy of the config naming it, so the class's dispatching ``forward`` calls it — for that module only; the
model's config, its other experts and ``save_pretrained`` are untouched.  The implementation performs the same
operations as the one the model was using (``grouped_mm``, through transformers' grouped linear, or the class's own
``eager`` loop: ``x @ W_e`` for transposed tensors, ``F.linear`` otherwise, biases added after the product) and adds
each expert's deltas between them — on the gate / up columns where the layout puts them — so fresh deltas that are
exactly zero leave the output bit-identical.  A class whose own ``forward`` wraps the dispatch (Ergo repeats every
token once per route and norms each route before the weighted sum) hands the implementation more rows than tokens;
the adapter records the rows of the module's own call so that each route's row keeps its token's index.

Under transformers' expert parallelism (``DistributedConfig(ep_size=N)``) the weights are ``DTensor`` shards of whole
experts and ``num_experts`` is the per-process count: :meth:`FusedExperts.held_experts` reads which global ids this
process holds (its ``ep`` mesh coordinate), each projection lists them (``RoutedProjection.held``) so features create
deltas for those experts only, and the implementation, which the EP dispatch calls with local ids, zeroes the routes
to other processes' experts (the sentinel id ``num_experts``) as transformers' own ``grouped_mm`` does.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from collections.abc import Mapping
from dataclasses import dataclass
from typing import ClassVar
from typing import Protocol
from typing import TypeGuard
from typing import cast

import torch
from torch import nn
from transformers.integrations.moe import ExpertsInterface
from transformers.integrations.moe import _grouped_linear  # the grouped GEMM transformers' grouped_mm uses
from transformers.integrations.moe import use_experts_implementation

from model_patches.expert_storage.base import ChangeLog
from model_patches.expert_storage.base import ExpertStorage
from model_patches.expert_storage.base import RoutedDeltas
from model_patches.expert_storage.base import RoutedProjection
from model_patches.expert_storage.base import RowGroups
from model_patches.expert_storage.base import deltas_of
from model_patches.expert_storage.base import shape_of

IMPLEMENTATION = "moepatch_routed_deltas"
"""The experts implementation registered in transformers' ``ALL_EXPERTS_FUNCTIONS``."""
BASE_CONFIG = "_routed_deltas_base_config"
"""Attribute of an adapted experts module: its original config, whose experts implementation is the base one."""
CALL_ROWS = "_routed_deltas_call_rows"
"""Attribute of an adapted experts module whose class wraps the dispatch: the row count of its last call."""
BASE_IMPLEMENTATIONS = ("grouped_mm", "eager", None)


@dataclass(frozen=True)
class FusedLayout:
    """How one fused experts module stores its projections (the flags ``use_experts_implementation`` sets)."""

    gated: bool = True
    """``gate_up_proj`` holds gate and up; ``False``: ``up_proj`` alone, followed by ``act_fn``."""
    transposed: bool = False
    """``[E, in, out]`` applied as ``x @ W_e``; ``False``: ``[E, out, in]`` applied as ``F.linear(x, W_e)``."""
    concatenated: bool = True
    """Gate columns first, then up; ``False``: gate at even, up at odd columns of ``gate_up_proj``'s output."""
    biased: bool = False
    """``<input>_bias [E, out]`` and ``down_proj_bias [E, H]`` added after each product."""
    post_norm: bool = False
    """``post_expert_norm`` runs on each route's output before its routing weight."""

    @property
    def input_name(self) -> str:
        """The input projection's tensor: ``gate_up_proj``, or ``up_proj`` for gate-less experts."""
        return "gate_up_proj" if self.gated else "up_proj"


class _FusedExperts(Protocol):
    """What moepatch reads from a fused experts module besides its layout flags and its input projection (named by
    the layout, read by name): a typed view of the module, nothing is checked at run time (:meth:`FusedExperts.problem`
    checks what an adapted module must have)."""

    num_experts: int
    down_proj: torch.Tensor
    down_proj_bias: torch.Tensor
    act_fn: Callable[[torch.Tensor], torch.Tensor]
    post_expert_norm: Callable[[torch.Tensor], torch.Tensor]

    def _apply_gate(self, gate_up_out: torch.Tensor) -> torch.Tensor: ...


def flagged_layout(experts: nn.Module) -> FusedLayout:
    """The layout of ``experts`` from the flags ``use_experts_implementation`` set on the instance (the decorator's
    defaults where a flag is absent) — what transformers' own implementations read."""
    return FusedLayout(gated=getattr(experts, "has_gate", True), transposed=getattr(experts, "is_transposed", False),
                       concatenated=getattr(experts, "is_concatenated", True),
                       biased=getattr(experts, "has_bias", False),
                       post_norm=getattr(experts, "has_post_expert_norm", False))


def dims(weight: torch.Tensor, transposed: bool) -> tuple[int, int, int]:
    """``(experts, in, out)`` of a fused ``[E, out, in]`` (or transposed ``[E, in, out]``) tensor."""
    num, first, second = shape_of(weight)
    return (num, first, second) if transposed else (num, second, first)


class FusedExperts(ExpertStorage):
    """transformers 5 fused experts; projections ``gate_proj`` / ``up_proj`` (the halves of ``gate_up_proj``) and
    ``down_proj``, or ``up_proj`` and ``down_proj`` for gate-less experts."""

    kind: ClassVar[str] = "fused"

    aliases: ClassVar[dict[str, tuple[str, ...]]] = {"gate_proj": ("gate_proj", "w1", "gate_up_proj"),
                                                      "up_proj": ("up_proj", "w3", "gate_up_proj"),
                                                      "down_proj": ("down_proj", "w2")}

    def layout(self, experts: nn.Module) -> FusedLayout:
        """The layout of ``experts`` (:func:`flagged_layout` for classes decorated with
        ``use_experts_implementation``)."""
        return flagged_layout(experts)

    def widths(self, experts: nn.Module) -> dict[str, tuple[tuple[int, ...], tuple[int, ...]]] | None:
        layout = self.layout(experts)
        weight, down = getattr(experts, layout.input_name, None), getattr(experts, "down_proj", None)
        if not (_is_fused_tensor(weight) and _is_fused_tensor(down)):
            return None
        num, fan_in, width = dims(weight, layout.transposed)
        _, _, fan_out = dims(down, layout.transposed)
        inner = width // 2 if layout.gated else width
        projections = {"gate_proj": ((fan_in,) * num, (inner,) * num)} if layout.gated else {}
        return {**projections, "up_proj": ((fan_in,) * num, (inner,) * num),
                "down_proj": ((inner,) * num, (fan_out,) * num)}

    def projection_aliases(self, experts: nn.Module, projection: str) -> tuple[str, ...]:
        if projection == "up_proj" and not self.layout(experts).gated:
            return ("up_proj",)  # gate-less: its own tensor, no gate_up_proj to name it by
        return self.aliases[projection]

    def problem(self, projection: RoutedProjection) -> str | None:
        experts = projection.module
        name = type(experts).__name__
        layout = self.layout(experts)
        needed = [layout.input_name, "down_proj", "num_experts", "_apply_gate" if layout.gated else "act_fn"]
        needed += [f"{layout.input_name}_bias", "down_proj_bias"] if layout.biased else []
        needed += ["post_expert_norm"] if layout.post_norm else []
        for attribute in needed:
            if not hasattr(experts, attribute):
                return f"{name} has no {attribute}"
        if not dispatches(experts):
            return (f"{name}: its forward does not go through transformers' experts interface "
                    "(use_experts_implementation), where moepatch runs the deltas")
        if getattr(experts, "_is_expert_parallel", False):
            if self.held_experts(experts) is None:
                return (f"{name}: split by expert parallelism, but which experts this process holds cannot be read "
                        "(its down_proj is no DTensor sharding the experts over an 'ep' mesh dimension)")
            if wraps_dispatch(experts):
                return (f"{name}: under expert parallelism its own forward, which repeats each token once per route "
                        "around the experts dispatch, runs on rows received from other processes: the routed "
                        "deltas cannot tell those rows' tokens apart (not supported)")
        problem = self.shape_problem(experts, layout)
        if problem is not None:
            return problem
        config = experts.__dict__.get(BASE_CONFIG, getattr(experts, "config", None))  # adapted already: its base
        implementation = getattr(config, "_experts_implementation", None)
        if implementation not in BASE_IMPLEMENTATIONS:
            return (f"experts implementation {implementation!r}: deltas on routed experts run with 'grouped_mm' "
                    "or 'eager' (set config._experts_implementation)")
        return None

    def held_experts(self, experts: nn.Module) -> range | None:
        """Under transformers' expert parallelism (``MoEParamShard`` set ``_is_expert_parallel`` and made
        ``num_experts`` the per-process count): the contiguous range of global ids of this process's experts — its
        coordinate on the ``ep`` mesh dimension of the sharded weights times that count, the ids
        ``EPImplementation`` sends it (``expert_id // num_local_experts``)."""
        if not getattr(experts, "_is_expert_parallel", False):
            return None
        down = getattr(experts, "down_proj", None)
        rank, mesh = _expert_parallel_rank(down), _device_mesh(down)
        local = getattr(experts, "num_experts", None)
        if rank is None or mesh is None or not isinstance(local, int):  # a rank comes with a mesh
            return None
        names = mesh.mesh_dim_names
        size = mesh.size(names.index("ep")) if names is not None and "ep" in names else mesh.size()
        if shape_of(cast(_FusedExperts, experts).down_proj)[0] != local * size:
            return None
        return range(rank * local, (rank + 1) * local)

    @staticmethod
    def shape_problem(experts: nn.Module, layout: FusedLayout) -> str | None:
        """Why the tensors of ``experts`` do not fit ``layout`` (input, down projection and biases), or ``None``."""
        name = type(experts).__name__
        weight, down = getattr(experts, layout.input_name), cast(_FusedExperts, experts).down_proj
        num, _, width = dims(weight, layout.transposed)
        inner = width // 2 if layout.gated else width
        if (layout.gated and width % 2) or dims(down, layout.transposed)[:2] != (num, inner):
            axes = "[E, in, out]" if layout.transposed else "[E, out, in]"
            return (f"{name}: down_proj {shape_of(down)} does not fit {layout.input_name} {shape_of(weight)} "
                    f"(both {axes}: expected {num} experts whose down_proj takes the {inner} intermediate features)")
        if layout.biased:
            fan_out = dims(down, layout.transposed)[2]
            biases = {f"{layout.input_name}_bias": (num, width), "down_proj_bias": (num, fan_out)}
            for bias, shape in biases.items():
                if shape_of(getattr(experts, bias)) != shape:
                    return f"{name}: {bias} {shape_of(getattr(experts, bias))} is not [E, out] = {shape}"
        return None

    def attach(self, module: nn.Module, deltas: Mapping[str, RoutedDeltas], projections: list[RoutedProjection],
               log: ChangeLog) -> None:
        self._store(module, deltas, log)
        original = module.config
        routed = copy.copy(original)  # shallow: the same values, its own experts implementation
        routed.__dict__["_experts_implementation_internal"] = IMPLEMENTATION
        log.set_attribute(module, BASE_CONFIG, original)
        log.set_attribute(module, "config", routed)
        if wraps_dispatch(module):
            log.set_attribute(module, CALL_ROWS, None)
            log.add_hook(module.register_forward_pre_hook(_record_call_rows, with_kwargs=True))

    def expert_weight(self, module: nn.Module, projection: str, expert: int) -> torch.Tensor:
        layout = self.layout(module)
        name = "down_proj" if projection == "down_proj" else layout.input_name
        weight = getattr(module, name)[expert]
        if layout.transposed:
            weight = weight.T  # [out, in], as in the other layout
        if name != "gate_up_proj":
            return weight
        gate = projection == "gate_proj"
        if not layout.concatenated:
            return weight[0::2] if gate else weight[1::2]  # gate at even, up at odd output rows
        half = weight.shape[0] // 2
        return weight[:half] if gate else weight[half:]

    def peft_parameter(self, module: nn.Module, projection: str) -> tuple[str, int, int] | None:
        layout = self.layout(module)
        if not layout.concatenated:
            return None  # peft's LoRA B covers a contiguous range of the out axis; interleaved gate / up are not
        out_axis = 2 if layout.transposed else 1  # peft reads the module's is_transposed as this class does
        if projection == "down_proj":
            return "down_proj", 0, shape_of(cast(_FusedExperts, module).down_proj)[out_axis]
        total = shape_of(getattr(module, layout.input_name))[out_axis]
        if not layout.gated:
            return "up_proj", 0, total
        return "gate_up_proj", (0 if projection == "gate_proj" else total // 2), total


def _is_fused_tensor(value: object) -> TypeGuard[torch.Tensor]:
    """A tensor of 3 dimensions: ``[E, out, in]`` or ``[E, in, out]`` (the full shape under ZeRO-3)."""
    return isinstance(value, torch.Tensor) and len(shape_of(value)) == 3


class _DeviceMesh(Protocol):
    """What moepatch reads from the device mesh of a ``DTensor`` (``torch.distributed.DeviceMesh``)."""

    ndim: int
    mesh_dim_names: tuple[str, ...] | None

    def size(self, mesh_dim: int | None = None) -> int: ...

    def get_local_rank(self, mesh_dim: int | str | None = None) -> int: ...


def _device_mesh(weight: object) -> _DeviceMesh | None:
    """The device mesh of ``weight`` when it is a ``DTensor`` (read by name, as any sharded tensor may carry one)."""
    return getattr(weight, "device_mesh", None)


def _expert_parallel_rank(weight: object) -> int | None:
    """This process's coordinate on the expert-parallel dimension of ``weight``'s device mesh (``"ep"``, or the only
    dimension of a one-dimensional mesh), ``None`` for a tensor that is no DTensor."""
    mesh = _device_mesh(weight)
    if mesh is None:
        return None
    names = mesh.mesh_dim_names or ()
    if "ep" in names:
        return mesh.get_local_rank("ep")
    return mesh.get_local_rank() if mesh.ndim == 1 else None


def _dispatching_forward_code() -> object:
    """The code of the ``forward`` ``use_experts_implementation`` installs (the same for every decorated class)."""

    class Probe(nn.Module):
        def __init__(self, config: object) -> None:
            super().__init__()

        def forward(self, *args: object) -> None:
            return None

    return use_experts_implementation(Probe).forward.__code__


_DISPATCH_CODE = _dispatching_forward_code()


def wraps_dispatch(module: nn.Module) -> bool:
    """Whether the class's ``forward`` is its own code around the decorator's dispatch (a subclass overriding it:
    Ergo's experts), so the rows the implementation receives need not be the tokens of the module's call."""
    forward = getattr(type(module), "forward", None)
    return getattr(forward, "__code__", None) is not _DISPATCH_CODE


def dispatches(module: nn.Module) -> bool:
    """Whether calling ``module`` reaches the decorator's dispatch (its class or a base class is decorated)."""
    return any(getattr(klass.__dict__.get("forward"), "__code__", None) is _DISPATCH_CODE
               for klass in type(module).__mro__)


def _record_call_rows(module: nn.Module, args: tuple, kwargs: dict) -> None:
    hidden = args[0] if args else kwargs.get("hidden_states")
    if isinstance(hidden, torch.Tensor):
        module.__dict__[CALL_ROWS] = hidden.reshape(-1, hidden.shape[-1]).shape[0]


def _tokens(module: nn.Module, tokens: torch.Tensor, rows: int) -> torch.Tensor:
    """Each row's token: ``tokens`` (the row indices of the implementation's input) unless the class's own forward
    repeated every token once per route (``rows`` = routes × the call's tokens, ``repeat_interleave`` as Ergo's)."""
    call_rows = module.__dict__.get(CALL_ROWS)
    if call_rows and rows != call_rows and rows % call_rows == 0:
        return tokens // (rows // call_rows)
    return tokens


def routed_deltas_experts_forward(self: nn.Module, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                                  top_k_weights: torch.Tensor) -> torch.Tensor:
    """The experts implementation named :data:`IMPLEMENTATION`: the base implementation plus the deltas."""
    base = getattr(self.__dict__.get(BASE_CONFIG), "_experts_implementation", None)
    if base == "eager":
        return _eager(self, hidden_states, top_k_index, top_k_weights)
    if base in ("grouped_mm", None):
        return _grouped(self, hidden_states, top_k_index, top_k_weights)
    raise ValueError(f"{type(self).__name__}: experts implementation {base!r} was set after moepatch attached "
                     "routed deltas; they run with 'grouped_mm' or 'eager'")


ExpertsInterface.register(IMPLEMENTATION, routed_deltas_experts_forward)


def input_delta(deltas: Mapping[str, RoutedDeltas], rows: torch.Tensor, groups: RowGroups,
                layout: FusedLayout, width: int) -> torch.Tensor | None:
    """The deltas of the input projection's ``width`` output columns: gate and up halves (zeros for a half without
    deltas), concatenated or interleaved as the layout stores them, or the gate-less ``up_proj``'s; ``groups``: the
    rows' grouping, as :meth:`RoutedDeltas.grouped` takes it."""
    if not layout.gated:
        return deltas["up_proj"].grouped(rows, **groups).to(rows.dtype) if "up_proj" in deltas else None
    gate = deltas["gate_proj"].grouped(rows, **groups) if "gate_proj" in deltas else None
    up = deltas["up_proj"].grouped(rows, **groups) if "up_proj" in deltas else None
    if gate is None and up is None:
        return None
    zeros = rows.new_zeros(rows.shape[0], width // 2)
    halves = [zeros if gate is None else gate.to(rows.dtype), zeros if up is None else up.to(rows.dtype)]
    both = torch.cat(halves, dim=-1)
    if layout.concatenated:
        return both
    # gate at even, up at odd columns: a gather, whose backward hands each half a unit-stride gradient (a strided
    # view's would reach torch's grouped GEMM backward with a column stride it refuses)
    order = torch.arange(width, device=rows.device).view(2, width // 2).T.reshape(-1)
    return both.index_select(-1, order)


def _activate(self: nn.Module, layout: FusedLayout, projected: torch.Tensor) -> torch.Tensor:
    """The experts' own gating (``_apply_gate``: act(gate) · up unless the class says else) or activation."""
    experts = cast(_FusedExperts, self)
    return experts._apply_gate(projected) if layout.gated else experts.act_fn(projected)


def _grouped(self: nn.Module, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
             top_k_weights: torch.Tensor) -> torch.Tensor:
    """transformers' ``grouped_mm`` experts computation with the deltas in between."""
    deltas = deltas_of(self)
    experts = cast(_FusedExperts, self)
    layout = flagged_layout(self)
    device = hidden_states.device
    num_top_k, num_tokens, hidden_dim = top_k_index.size(-1), hidden_states.size(0), hidden_states.size(-1)
    sample_weights = top_k_weights.reshape(-1)
    expert_ids = top_k_index.reshape(-1)
    expert_ids_g, perm = torch.sort(expert_ids)
    rows = hidden_states[perm // num_top_k]
    tokens = _tokens(self, perm // num_top_k, num_tokens)
    sample_weights_g = sample_weights[perm]
    histc_input = expert_ids_g.float() if device.type in ("cpu", "mps") else expert_ids_g.int()
    tokens_per_expert = torch.histc(histc_input, bins=experts.num_experts, min=0, max=experts.num_experts - 1)
    offsets = torch.cumsum(tokens_per_expert, dim=0, dtype=torch.int32)
    sentinel = None
    if getattr(self, "_is_expert_parallel", False):
        # as transformers' grouped_mm under EP: routes to other processes' experts carry the id num_experts (and
        # weight 0); sorted last and left out of the counts, they are rows no grouped product writes, so they are
        # zeroed going in (their gradient too) and coming out of each stage, and clamped to index the deltas' stacks
        sentinel = (expert_ids_g >= experts.num_experts).unsqueeze(-1)
        expert_ids_g = expert_ids_g.clamp(max=experts.num_experts - 1)
        rows = rows.masked_fill(sentinel, 0.0)
    groups: RowGroups = {"expert_ids": expert_ids_g, "ends": offsets, "tokens": tokens}  # tensors only: no host sync

    weight = getattr(self, layout.input_name)
    bias = getattr(self, f"{layout.input_name}_bias")[expert_ids_g] if layout.biased else None
    projected = _grouped_linear(rows, weight, offsets, bias=bias, is_transposed=layout.transposed)
    delta = input_delta(deltas, rows, groups, layout, projected.shape[-1])
    if delta is not None:
        projected = projected + delta.to(projected.dtype)
    if sentinel is not None:
        projected = projected.masked_fill(sentinel, 0.0)
    projected = _activate(self, layout, projected)
    if "down_proj" in deltas and deltas["down_proj"].placement == "input":
        projected = deltas["down_proj"].grouped(projected, **groups)
        if sentinel is not None:
            projected = projected.masked_fill(sentinel, 0.0)
    bias = experts.down_proj_bias[expert_ids_g] if layout.biased else None
    out = _grouped_linear(projected, experts.down_proj, offsets, bias=bias, is_transposed=layout.transposed)
    if "down_proj" in deltas and deltas["down_proj"].placement == "output":
        out = out + deltas["down_proj"].grouped(projected, **groups).to(out.dtype)
    if sentinel is not None:
        out = out.masked_fill(sentinel, 0.0)
    if layout.post_norm:
        out = experts.post_expert_norm(out)
    weighted = out * sample_weights_g.unsqueeze(-1)
    inverse = torch.empty_like(perm)
    inverse[perm] = torch.arange(perm.size(0), device=device)
    weighted = weighted[inverse]
    return weighted.view(num_tokens, num_top_k, hidden_dim).sum(dim=1).to(hidden_states.dtype)


def _linear(rows: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, transposed: bool) -> torch.Tensor:
    """One expert's product as the classes' eager loops write it: ``x @ W_e`` for ``[in, out]`` tensors,
    ``F.linear(x, W_e)`` for ``[out, in]``, the bias added after the product."""
    out = rows @ weight if transposed else nn.functional.linear(rows, weight)
    return out if bias is None else out + bias


def _eager(self: nn.Module, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
           top_k_weights: torch.Tensor) -> torch.Tensor:
    """The classes' ``eager`` experts loop with the deltas in between."""
    deltas = deltas_of(self)
    experts = cast(_FusedExperts, self)
    layout = flagged_layout(self)
    weight = getattr(self, layout.input_name)
    final = torch.zeros_like(hidden_states)
    with torch.no_grad():
        expert_mask = torch.nn.functional.one_hot(top_k_index, num_classes=experts.num_experts + 1).permute(2, 1, 0)
        expert_hit = torch.greater(expert_mask.sum(dim=(-1, -2)), 0).nonzero()
    for hit in expert_hit:
        expert = int(hit[0])
        if expert == experts.num_experts:
            continue
        top_k_pos, token_idx = torch.where(expert_mask[expert])
        rows = hidden_states[token_idx]
        groups: RowGroups = {"tokens": _tokens(self, token_idx, hidden_states.shape[0]), "only": expert}
        bias = getattr(self, f"{layout.input_name}_bias")[expert] if layout.biased else None
        projected = _linear(rows, weight[expert], bias, layout.transposed)
        delta = input_delta(deltas, rows, groups, layout, projected.shape[-1])
        if delta is not None:
            projected = projected + delta.to(projected.dtype)
        current = _activate(self, layout, projected)
        if "down_proj" in deltas and deltas["down_proj"].placement == "input":
            current = deltas["down_proj"].grouped(current, **groups)
        bias = experts.down_proj_bias[expert] if layout.biased else None
        out = _linear(current, experts.down_proj[expert], bias, layout.transposed)
        if "down_proj" in deltas and deltas["down_proj"].placement == "output":
            out = out + deltas["down_proj"].grouped(current, **groups).to(out.dtype)
        if layout.post_norm:
            out = experts.post_expert_norm(out)
        out = out * top_k_weights[token_idx, top_k_pos, None]
        final.index_add_(0, token_idx, out.to(final.dtype))
    return final
