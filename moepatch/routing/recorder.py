"""Routing statistics: per MoE layer and expert, hard top-k counts and sums of router probabilities.

The recorder reads each selected layer's routing through :func:`moepatch.routing.tap.tap_routing`, i.e. the experts
the model actually routes to (after any routing override of :mod:`moepatch.routing.seam`), and the attention mask of
the same model call (a pre-hook on the decoder captures it, so the user never passes it twice). Padding tokens are
excluded.

Cost and memory: a router hook only keeps references to the (detached) router logits and chosen experts of the
current model call; when the call returns, one batched pass over all recorded layers (one softmax, one scatter-add
of the choices, one mask-weighted matmul giving counts and probability sums together) updates one small float64
accumulator on the model's device and every reference is dropped. No host synchronisation, no tensor of the step
(activations, graph, mask) survives the model call. Forwards re-run by activation checkpointing inside backward are
not counted twice.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from model_patches.structure import MoEModel
from model_patches.structure import describe
from model_patches.structure import device_of
from model_patches.structure import resolve_layer_indices
from moepatch._version import __version__
from moepatch.compat import current_backward_task_id
from moepatch.compat import distributed_ready
from moepatch.errors import MoePatchWarning
from moepatch.routing.attention_mask import AttentionMaskReader
from moepatch.routing.tap import tap_routing

_FLUSH_ELEMENTS = 1 << 24
"""Largest ``layers × tokens × experts`` block processed at once (128 MiB of float64)."""


def _accumulator_dtype(device: torch.device) -> torch.dtype:
    return torch.float32 if device.type == "mps" else torch.float64


def collective_device(group: Any = None) -> torch.device:
    """Where tensors for a ``torch.distributed`` collective must live: the current GPU under NCCL, else the CPU."""

    if dist.get_backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


class RoutingRecorder:
    """Accumulate routing statistics of a model while active.

    Args:
        model (`nn.Module`): a supported MoE model (patched or not; PEFT wrappers are fine).
        layers (`Sequence[int]`, *optional*): decoder-layer indices to record (negative counts from the last
            layer); default every MoE layer.  A dense or missing layer raises ``ValueError``.
        coactivation (`bool`, *optional*, defaults to `False`): also accumulate the ``[E, E]`` co-activation matrix
            per layer (C2R profiling): entry ``[i, j]`` counts the non-padding tokens whose chosen experts include
            both ``i`` and ``j``; the diagonal counts the tokens that chose ``i``.
        keep_choices (`bool`, *optional*, defaults to `False`): also keep every non-padding token's chosen experts
            (on the CPU, ``N × k`` integers per layer: opt-in, for placement studies that need exact k-sets).
        structure (`MoEModel`, *optional*): the model's structure when the caller resolved it already (``apply``
            passes the one it planned with, so the recorder sees exactly the layers the patch was checked against).
        training_only (`bool`, *optional*, defaults to `False`): count only the forwards whose router is in training
            mode (the aux-loss-free bias update: evaluation and probe rounds between optimizer steps are no part of a
            training step).

    Example:
        ```python
        with moepatch.RoutingRecorder(model, layers=[-1]) as recorder:
            model(**batch)  # attention_mask is picked up from this call
        recorder.counts  # int64 [len(recorder.layers), E]
        ```
    """

    def __init__(
        self, model: nn.Module, layers: Sequence[int] | None = None, *, coactivation: bool = False,
        keep_choices: bool = False, structure: MoEModel | None = None, training_only: bool = False,
    ) -> None:
        self.model: MoEModel = structure if structure is not None else describe(model)
        self.training_only = training_only
        self.layers: list[int] = resolve_layer_indices(
            self.model, None if layers is None else list(layers), "layers"
        )
        self.num_experts = self.model.num_experts
        self.top_k = self.model.top_k
        device = device_of(self.model.layer(self.layers[0]).router)
        # One accumulator per recorded layer: columns [0, E] are hard counts (column E catches the "no expert"
        # sentinel index E that transformers' eager experts accept), columns E+1.. are probability sums.  float64
        # counts are exact up to 2**53; tokens are derived (every kept token fills exactly k slots).
        self._acc = torch.zeros(len(self.layers), 2 * self.num_experts + 1, dtype=_accumulator_dtype(device),
                                device=device)
        self._all_slots = list(range(len(self.layers)))
        width = self.num_experts + 1
        self._co = (
            torch.zeros(len(self.layers), width, width, dtype=self._acc.dtype, device=device) if coactivation else None
        )
        self._choices: list[list[torch.Tensor]] | None = [[] for _ in self.layers] if keep_choices else None
        self._handles: list[torch.utils.hooks.RemovableHandle] = []
        self._in_call = False
        self._mask: torch.Tensor | None = None
        self._pending: list[tuple[int, torch.Tensor, torch.Tensor]] = []
        self._warned: set[str] = set()
        self._read_mask = AttentionMaskReader(self.model.decoder.forward)
        self._scores_are = self.model.family.router_output.scores_are

    # ------------------------------------------------------------------ activation
    @property
    def active(self) -> bool:
        return bool(self._handles)

    def start(self) -> RoutingRecorder:
        """Install the hooks (idempotent)."""
        if self.active:
            return self
        device = device_of(self.model.layer(self.layers[0]).router)  # follow a model moved since __init__
        self._acc = self._acc.to(device)
        self._co = None if self._co is None else self._co.to(device)
        decoder = self.model.decoder
        self._handles.append(decoder.register_forward_pre_hook(self._begin_call, with_kwargs=True))
        self._handles.append(decoder.register_forward_hook(self._end_call, always_call=True))
        for slot, index in enumerate(self.layers):
            self._handles.extend(tap_routing(self.model, self.model.layer(index), self._make_reader(slot)))
        return self

    def stop(self) -> None:
        """Remove the hooks; the statistics stay readable."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self._end_call()

    def __enter__(self) -> RoutingRecorder:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    # ------------------------------------------------------------------ hooks
    def _begin_call(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        self._mask = self._read_mask(args, kwargs)
        self._pending.clear()
        self._in_call = True

    def _end_call(self, *unused: object) -> None:
        """Account every router output of the model call in one batched pass, then drop all references."""
        try:
            if self._pending:
                self._flush()
        finally:
            self._pending.clear()
            self._mask = None
            self._in_call = False

    def _make_reader(self, slot: int):
        router = self.model.layer(self.layers[slot]).router

        def read(scores: torch.Tensor, indices: torch.Tensor) -> None:
            if self.training_only and not router.training:
                return  # an evaluation forward between training steps
            if not torch.compiler.is_compiling() and current_backward_task_id() != -1:
                return  # activation checkpointing re-running the forward in backward (compiled code re-runs no hook)
            logits, indices = scores.detach(), indices.detach()
            self._pending.append((slot, logits.reshape(-1, logits.shape[-1]), indices.reshape(indices.shape[0], -1)))
            if not self._in_call:  # router called outside a model call: no mask, account right away
                self._end_call()

        return read

    def _warn_once(self, key: str, message: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            warnings.warn(message, MoePatchWarning, stacklevel=4)

    def _keep_mask(self, tokens: int) -> torch.Tensor | None:
        """``[tokens]`` 0/1 mask of non-padding tokens for this call's router outputs, or ``None`` (keep all)."""
        mask = self._mask
        if mask is None:
            return None
        if mask.dim() != 2:
            self._warn_once(
                "mask-dim",
                f"RoutingRecorder: attention_mask of shape {tuple(mask.shape)} is not [batch, seq]; "
                "padding cannot be excluded, every token is counted",
            )
            return None
        if tokens % mask.shape[0] or mask.shape[1] < tokens // mask.shape[0]:
            self._warn_once(
                "mask-shape",
                f"RoutingRecorder: {tokens} routed tokens do not align with attention_mask {tuple(mask.shape)}; "
                "every token is counted",
            )
            return None
        seq = tokens // mask.shape[0]
        # During cached generation the mask covers past + current tokens: the current ones are the last.
        return (mask[:, mask.shape[1] - seq :] != 0).reshape(-1)

    def _flush(self) -> None:
        groups: dict[tuple[int, torch.device], list[tuple[int, torch.Tensor, torch.Tensor]]] = {}
        for record in self._pending:  # normally one group; several with device_map or odd routers
            groups.setdefault((record[2].shape[0], record[2].device), []).append(record)
        for records in groups.values():
            budget = max(1, _FLUSH_ELEMENTS // max(1, records[0][1].numel()))  # bound the transient memory
            for start in range(0, len(records), budget):
                self._flush_group(records[start : start + budget])

    def _flush_group(self, records: list[tuple[int, torch.Tensor, torch.Tensor]]) -> None:
        """Add the statistics of router outputs that routed the same ``N`` tokens on the same device."""
        acc = self._acc
        device, dtype = records[0][2].device, acc.dtype
        with torch.no_grad():
            logits = torch.stack([r[1] for r in records])  # [P, N, E]
            indices = torch.stack([r[2] for r in records])  # [P, N, k]
            if self._scores_are == "logits":
                probs = torch.softmax(logits, dim=-1, dtype=dtype)  # [P, N, E]
            elif self._scores_are == "sigmoid_logits":
                probs = torch.sigmoid(logits.to(dtype))  # [P, N, E] each expert's own score
            elif self._scores_are == "topk_probabilities":  # [P, N, k] probabilities of the chosen experts only
                probs = torch.zeros(*indices.shape[:2], self.num_experts, dtype=dtype, device=device)
                probs.scatter_(2, indices, logits.to(dtype))  # [P, N, E], 0 for experts not chosen
            else:
                probs = logits.to(dtype)  # [P, N, E] already probabilities
            hard = torch.zeros(*indices.shape[:2], self.num_experts + 1, dtype=dtype, device=device)
            hard.scatter_add_(2, indices, torch.ones((), dtype=dtype, device=device).expand(indices.shape))
            features = torch.cat([hard, probs], dim=2)  # [P, N, 2E+1]
            keep = self._keep_mask(indices.shape[1])
            if keep is not None:
                keep = keep.to(device=device, dtype=dtype)
            if keep is None:
                sums = features.sum(dim=1)  # [P, 2E+1]
            else:
                sums = torch.matmul(keep, features)  # [P, 2E+1]
            slots = [r[0] for r in records]
            self._add(acc, slots, sums)
            if self._co is not None:
                kept_hard = hard if keep is None else hard * keep.view(1, -1, 1)
                self._add(self._co, slots, torch.bmm(hard.transpose(1, 2), kept_hard))  # [P, E+1, E+1]
            if self._choices is not None:
                kept = indices if keep is None else indices[:, keep.bool()]
                for slot, chosen in zip(slots, kept.cpu(), strict=True):
                    self._choices[slot].append(chosen)

    def _add(self, accumulator: torch.Tensor, slots: list[int], values: torch.Tensor) -> None:
        values = values.to(accumulator.device)
        if slots == self._all_slots:
            accumulator += values
        else:
            accumulator.index_add_(0, torch.tensor(slots, device=accumulator.device), values)

    # ------------------------------------------------------------------ results
    @property
    def counts(self) -> torch.Tensor:
        """int64 ``[len(layers), E]``: how often each expert was chosen (top-k slots) over non-padding tokens."""
        return self._acc[:, : self.num_experts].cpu().round().to(torch.int64)

    @property
    def prob_sums(self) -> torch.Tensor:
        """float ``[len(layers), E]``: sum over non-padding tokens of each expert's router probability."""
        return self._acc[:, self.num_experts + 1 :].cpu()

    @property
    def tokens(self) -> torch.Tensor:
        """int64 ``[len(layers)]``: non-padding tokens seen per layer."""
        slots = self._acc[:, : self.num_experts + 1].cpu().sum(dim=1).round().to(torch.int64)
        return slots // self.top_k

    @property
    def coactivation(self) -> torch.Tensor:
        """int64 ``[len(layers), E, E]`` co-activation counts (needs ``coactivation=True``)."""
        if self._co is None:
            raise ValueError("RoutingRecorder(coactivation=True) is needed for co-activation matrices")
        return self._co[:, : self.num_experts, : self.num_experts].cpu().round().to(torch.int64)

    @property
    def choices(self) -> dict[int, torch.Tensor]:
        """Absolute layer → int64 ``[N, k]`` chosen experts of every non-padding token (needs ``keep_choices``)."""
        if self._choices is None:
            raise ValueError("RoutingRecorder(keep_choices=True) is needed to keep the chosen experts")
        return {
            layer: torch.cat(kept) if kept else torch.zeros(0, self.top_k, dtype=torch.int64)
            for layer, kept in zip(self.layers, self._choices, strict=True)
        }

    def reset(self) -> None:
        """Zero every accumulator (hooks stay as they are)."""
        self._acc.zero_()
        if self._co is not None:
            self._co.zero_()
        if self._choices is not None:
            for kept in self._choices:
                kept.clear()

    def all_reduce(self, group: Any = None) -> RoutingRecorder:
        """Sum the statistics over the ranks of ``group`` when ``torch.distributed`` is initialised.

        Every rank must call it (it is a collective).  Without an initialised process group it does nothing.

        Under expert parallelism (``from_pretrained(distributed_config=DistributedConfig(..., ep_size=N))``) each
        rank's recorder counts the tokens its router saw, exactly as one process would count them.  With
        ``tp_size=1`` (each rank its own batch) the default group gives the global totals; with ``tp_size > 1`` the
        ranks of a tensor-parallel group route the same batch, so the default group counts it ``tp_size`` times:
        pass a group holding one rank per batch for token totals.
        """

        if not distributed_ready():
            return self
        device = collective_device(group)
        for accumulator in (self._acc, self._co):
            if accumulator is not None:
                reduced = accumulator.to(device=device, dtype=torch.float64)
                dist.all_reduce(reduced, group=group)
                accumulator.copy_(reduced)
        return self

    def to_dict(self) -> dict[str, Any]:
        """Plain, JSON-serialisable statistics."""

        data = {
            "moepatch_version": __version__,
            "family": self.model.family.name,
            "layers": list(self.layers),
            "num_experts": self.num_experts,
            "top_k": self.top_k,
            "tokens": self.tokens.tolist(),
            "counts": self.counts.tolist(),
            "prob_sums": self.prob_sums.tolist(),
        }
        if self._co is not None:
            data["coactivation"] = self.coactivation.tolist()
        return data

    def to_json(self, **kwargs: Any) -> str:
        """``json.dumps(self.to_dict())``."""
        return json.dumps(self.to_dict(), **kwargs)
