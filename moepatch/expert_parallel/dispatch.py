"""A deduplicating expert-parallel dispatch for transformers' EP (``ep_implementation="moepatch_dedup"``).

transformers' :class:`~transformers.distributed.expert_parallel.AllToAllEP` sends one row per (token, chosen expert)
pair: ``k`` rows per token whatever the placement, so neither C2R nor an expert placement can lower its traffic.
:class:`DedupAllToAllEP` sends each token **once to each rank that holds any of its experts** — the way DeepEP and
MegaBlocks-style dispatchers count traffic — with, per row, the token's local expert ids on that rank and its routing
weights (the other slots carry the sentinel id ``num_local_experts`` and weight 0, as ``AllReduceEP`` masks them, which
the experts forward skips once transformers marks the module ``_is_expert_parallel``). The receiver runs its experts
once on those rows, combining the token's local experts with the routing weights there, and one row per (token, rank)
comes back to be summed on the sender. Bytes on the wire are ``Σ_tokens (distinct ranks of its experts) × hidden ×
element size`` plus the small id / weight metadata; a token whose experts all sit on its own rank moves nothing.

Every call counts its own traffic into :attr:`DedupAllToAllEP.traffic` (a :class:`DispatchTraffic`), exact figures
read from the split sizes the dispatch exchanges anyway (no extra host synchronisation); :func:`dedup_dispatches`
finds a model's implementations and :func:`model_traffic` sums them.

Example (under ``torchrun --nproc_per_node 2``):
    ```python
    import moepatch  # registers "moepatch_dedup"
    from transformers import AutoModelForCausalLM, DistributedConfig
    from moepatch.expert_parallel import model_traffic

    config = DistributedConfig(tp_size=2, ep_size=2, tp_plan={}, ep_implementation="moepatch_dedup")
    model = AutoModelForCausalLM.from_pretrained(path, distributed_config=config)
    model(**batch)
    print(model_traffic(model).to_dict())
    ```
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from typing import TYPE_CHECKING
from typing import cast

import torch
import torch.distributed as dist
from torch import nn
from transformers.distributed.expert_parallel import EPImplementation

if TYPE_CHECKING:
    from torch.distributed.device_mesh import DeviceMesh

if dist.is_available():
    from torch.distributed._functional_collectives import all_to_all_single_autograd
    from torch.distributed.tensor import DTensor
    from torch.distributed.tensor import Replicate
    from torch.distributed.tensor import Shard
    from transformers.distributed.parallel_utils import _WaitTensor

EXPERTS_ATTRIBUTE = "moepatch_ep_dispatch"
"""Attribute of an experts module holding the :class:`DedupAllToAllEP` built for it (how :func:`dedup_dispatches`
finds them: transformers keeps the implementation only inside the module's replaced ``forward`` closure)."""


@dataclasses.dataclass
class DispatchTraffic:
    """What one rank's dispatch moved, summed over calls (forward direction; backward mirrors it row for row).

    "remote" is sent to another rank of the EP group, "local" to this rank itself (a copy that never leaves the
    device). Hidden bytes are rows × hidden × element size; the metadata that rides along (each row's ``k`` local
    expert ids and ``k`` routing weights) is counted apart, so the row figures compare directly with the per-pair
    dispatch, which sends no per-row metadata (it exchanges per-expert counts instead).
    """

    calls: int = 0
    """Dispatch calls (one per MoE layer per forward; a forward re-run by activation checkpointing re-sends)."""
    tokens: int = 0
    """Tokens this rank dispatched (its slice of the batch when TP ranks share one)."""
    pairs_remote: int = 0
    """(token, chosen expert) pairs whose expert sits on another rank: the rows ``AllToAllEP`` would send there."""
    pairs_local: int = 0
    """(token, chosen expert) pairs whose expert sits on this rank."""
    rows_remote: int = 0
    """(token, rank) rows sent to other ranks: one per token and distinct remote rank of its experts."""
    rows_local: int = 0
    """(token, rank) rows kept on this rank (tokens with at least one local expert)."""
    hidden_bytes_remote: int = 0
    """``rows_remote × hidden × element size``: the token rows on the wire."""
    hidden_bytes_local: int = 0
    """``rows_local × hidden × element size``."""
    metadata_bytes_remote: int = 0
    """Local expert ids and routing weights of the remote rows (``k`` of each per row)."""
    metadata_bytes_local: int = 0
    """Local expert ids and routing weights of the local rows."""
    returned_rows_remote: int = 0
    """Combined rows this rank's experts sent back to other ranks (the rows it received from them)."""
    returned_rows_local: int = 0
    """Combined rows this rank's experts returned to itself."""
    returned_bytes_remote: int = 0
    """``returned_rows_remote × hidden × element size``."""
    returned_bytes_local: int = 0
    """``returned_rows_local × hidden × element size``."""

    def reset(self) -> None:
        """Zero every figure (e.g. before the forward a benchmark measures)."""
        for field in dataclasses.fields(self):
            setattr(self, field.name, 0)

    def __iadd__(self, other: DispatchTraffic) -> DispatchTraffic:
        for field in dataclasses.fields(self):
            setattr(self, field.name, getattr(self, field.name) + getattr(other, field.name))
        return self

    def __add__(self, other: DispatchTraffic) -> DispatchTraffic:
        total = dataclasses.replace(self)
        total += other
        return total

    def to_dict(self) -> dict[str, int]:
        """The figures as plain ints (JSON-ready)."""
        return dataclasses.asdict(self)

    def all_reduce(self, group: dist.ProcessGroup | None = None) -> DispatchTraffic:
        """A new :class:`DispatchTraffic` summed over the ranks of ``group`` (all ranks if None): the whole EP group's
        traffic, since each rank only counts what it sends. A collective: every rank of the group must call it."""
        values = torch.tensor([getattr(self, f.name) for f in dataclasses.fields(self)], dtype=torch.int64)
        if dist.get_backend(group) == dist.Backend.NCCL:
            values = values.cuda()
        dist.all_reduce(values, group=group)
        return DispatchTraffic(*values.tolist())


class DedupAllToAllEP(EPImplementation):
    """Each token goes once to each rank holding any of its experts; one combined row per (token, rank) comes back.

    Same contract and group handling as ``AllToAllEP``: the ranks of a TP group (which share one batch) each dispatch
    a disjoint slice of it (``Replicate → Shard(0)``, a local chunk whose backward all-gathers the row gradients) and
    the outputs are all-gathered back, so no token is computed twice. Token rows, routing weights and returned rows go
    through ``all_to_all_single_autograd``, so gradients reach the hidden states and the routing weights on the sending
    rank; the local expert ids travel with a plain all-to-all. The split sizes (and the traffic figures) are read back
    to the host every layer, as in ``AllToAllEP``, so it does not capture in a CUDA graph.

    Example: 4 experts on 2 ranks, top-2. Token t on rank 0 picks E2 (weight w2) and E3 (weight w3), both on rank 1.

    GPU                       0                            1
    experts                E0  E1                       E2  E3
    AllToAllEP sends        t, t  (2 rows) ──────────▶  E2(t), E3(t) ──▶ 2 rows back, w2·E2(t) + w3·E3(t) on rank 0
    DedupAllToAllEP sends   t, ids [0, 1], [w2, w3] ─▶  w2·E2(t) + w3·E3(t) ──▶ 1 row back
    """

    def __init__(self, experts: nn.Module, ep_mesh: DeviceMesh, tp_mesh: DeviceMesh) -> None:
        super().__init__(experts, ep_mesh, tp_mesh)
        self.traffic = DispatchTraffic()
        """What this rank's dispatch of this layer moved, summed over calls (see :class:`DispatchTraffic`)."""
        setattr(experts, EXPERTS_ATTRIBUTE, self)

    def __call__(
        self, hidden_states: torch.Tensor, expert_ids: torch.Tensor, routing_weights: torch.Tensor
    ) -> torch.Tensor:
        """The weighted expert output ``[T, hidden]`` of this rank's batch. transformers' EP forward passes,
        positionally, the hidden states ``[T, hidden]``, the chosen experts' global ids ``[T, k]`` and their routing
        weights ``[T, k]``."""
        num_tokens = hidden_states.size(0)
        if self.tp_mesh.size() > 1:
            # Replicate -> Shard(0) is a local chunk (no communication); its backward all-gathers the row gradients.
            hidden_states, expert_ids, routing_weights = (
                DTensor.from_local(t, self.tp_mesh, [Replicate()], run_check=False)
                .redistribute(self.tp_mesh, [Shard(0)])
                .to_local()
                for t in (hidden_states, expert_ids, routing_weights)
            )
        output = self._exchange(hidden_states, expert_ids, routing_weights)
        if self.tp_mesh.size() == 1:
            return output
        # Shard(0) -> Replicate is one all-gather of the row slices, uneven or empty ones too.
        hidden_dim = output.size(-1)
        output = DTensor.from_local(
            output.contiguous(), self.tp_mesh, [Shard(0)], shape=torch.Size((num_tokens, hidden_dim)),
            stride=(hidden_dim, 1)
        )
        return output.full_tensor()

    def _exchange(
        self, hidden_states: torch.Tensor, expert_ids: torch.Tensor, routing_weights: torch.Tensor
    ) -> torch.Tensor:
        """Dispatch this rank's tokens (one row per destination rank), run the local experts on what arrives, bring
        the combined rows back and sum them per token."""
        ep_group, ep_size, ep_rank = self.ep_mesh.get_group(), self.ep_mesh.size(), self.ep_mesh.get_local_rank()
        num_local = cast(int, self.num_local_experts)  # transformers' experts.num_experts (via Module.__getattr__)
        device = hidden_states.device
        num_tokens, hidden_dim = hidden_states.shape
        num_top_k = expert_ids.size(-1)

        # on_rank[t, r, j]: slot j of token t is an expert of rank r (ranks own contiguous expert ranges)
        owner = torch.div(expert_ids, num_local, rounding_mode="floor")
        on_rank = owner.unsqueeze(1) == torch.arange(ep_size, device=device).view(1, ep_size, 1)
        present = on_rank.any(dim=-1)  # [T, ep]: one row per (token, rank holding any of its experts)
        send_counts = present.sum(dim=0)
        pair_counts = on_rank.sum(dim=(0, 2))
        recv_counts = torch.empty_like(send_counts)
        dist.all_to_all_single(recv_counts, send_counts, group=ep_group)
        # the host reads the split sizes back (and the exact traffic figures with them); the nonzero below, which
        # follows it, waits on nothing but the few small kernels in between
        send_sizes, recv_sizes, pair_sizes = torch.stack([send_counts, recv_counts, pair_counts]).tolist()

        # rows sorted by destination rank, then token: the contiguous send splits all_to_all_single wants
        destination, token = present.t().nonzero(as_tuple=True)
        slot_here = on_rank[token, destination]  # [S, k]: which of the row's slots the destination runs
        send_ids = torch.where(slot_here, expert_ids[token] % num_local, num_local).to(torch.int32)
        send_weights = routing_weights[token].masked_fill(~slot_here, 0.0)
        send_rows = hidden_states[token]

        recv_rows = _WaitTensor.apply(all_to_all_single_autograd(send_rows, recv_sizes, send_sizes, ep_group))
        recv_weights = _WaitTensor.apply(
            all_to_all_single_autograd(send_weights.contiguous(), recv_sizes, send_sizes, ep_group)
        )
        recv_ids = send_ids.new_empty((sum(recv_sizes), num_top_k))
        dist.all_to_all_single(recv_ids, send_ids, recv_sizes, send_sizes, group=ep_group)
        recv_ids = recv_ids.long()

        if recv_rows.shape[0] == 0:
            # Keep the empty rows (and weights) connected to backward, so this rank joins the reverse exchanges.
            expert_output = self.experts_forward(
                recv_rows.sum(dim=0, keepdim=True),
                recv_ids.new_zeros((1, 1)),
                recv_weights.sum(dim=0, keepdim=True)[:, :1],
            )[:0]
        else:
            expert_output = self.experts_forward(recv_rows, recv_ids, recv_weights)

        returned = _WaitTensor.apply(all_to_all_single_autograd(expert_output, send_sizes, recv_sizes, ep_group))
        output = hidden_states.new_zeros((num_tokens, hidden_dim))
        output = output.index_add(0, token, returned.to(output.dtype))

        self._count(
            num_tokens, send_sizes, recv_sizes, pair_sizes, ep_rank,
            row_bytes=hidden_dim * hidden_states.element_size(),
            metadata_bytes=num_top_k * (send_ids.element_size() + send_weights.element_size()),
        )
        return output

    def _count(
        self, num_tokens: int, send_sizes: list[int], recv_sizes: list[int], pair_sizes: list[int], ep_rank: int,
        *, row_bytes: int, metadata_bytes: int,
    ) -> None:
        """Add one call's figures to :attr:`traffic` (host ints already read back with the split sizes)."""
        traffic = self.traffic
        rows_local, returned_local = send_sizes[ep_rank], recv_sizes[ep_rank]
        rows_remote, returned_remote = sum(send_sizes) - rows_local, sum(recv_sizes) - returned_local
        traffic.calls += 1
        traffic.tokens += num_tokens
        traffic.pairs_local += pair_sizes[ep_rank]
        traffic.pairs_remote += sum(pair_sizes) - pair_sizes[ep_rank]
        traffic.rows_remote += rows_remote
        traffic.rows_local += rows_local
        traffic.hidden_bytes_remote += rows_remote * row_bytes
        traffic.hidden_bytes_local += rows_local * row_bytes
        traffic.metadata_bytes_remote += rows_remote * metadata_bytes
        traffic.metadata_bytes_local += rows_local * metadata_bytes
        traffic.returned_rows_remote += returned_remote
        traffic.returned_rows_local += returned_local
        traffic.returned_bytes_remote += returned_remote * row_bytes
        traffic.returned_bytes_local += returned_local * row_bytes


def dedup_dispatches(model: nn.Module) -> Iterator[tuple[str, DedupAllToAllEP]]:
    """``(experts module name, its DedupAllToAllEP)`` for every experts module of ``model`` that dispatches with it,
    in module order (empty when the model was not loaded with ``ep_implementation="moepatch_dedup"``)."""
    for name, module in model.named_modules():
        implementation = module.__dict__.get(EXPERTS_ATTRIBUTE)
        if isinstance(implementation, DedupAllToAllEP):
            yield name, implementation


def model_traffic(model: nn.Module) -> DispatchTraffic:
    """This rank's traffic summed over every dedup-dispatched layer of ``model`` (``.all_reduce()`` it for the EP
    group's total)."""
    total = DispatchTraffic()
    for _, implementation in dedup_dispatches(model):
        total += implementation.traffic
    return total


def reset_traffic(model: nn.Module) -> None:
    """Zero the traffic figures of every dedup-dispatched layer of ``model``."""
    for _, implementation in dedup_dispatches(model):
        implementation.traffic.reset()
