"""Routing statistics: per MoE layer and expert, hard top-k counts and sums of router probabilities.

The recorder hooks the *output* of each selected router, i.e. the experts the model actually routes to (after any
routing override of :mod:`moepatch.routing`), and the attention mask of the same model call (a pre-hook on the
decoder captures it, so the user never passes it twice).  Padding tokens are excluded.

Cost and memory: per router call, one float32 softmax ``[N, E]`` and two scatter/sum reductions into small
accumulators that live on the router's device; no host synchronisation, no tensor of the step (activations, graph,
mask) is kept after the model call returns.  Forwards re-run by activation checkpointing inside backward are not
counted twice.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Sequence
from typing import Any

import inspect

import torch
from torch import nn

from moepatch.adapter import MoEModel
from moepatch.adapter import describe
from moepatch.adapter import resolve_layer_indices
from moepatch.compat import current_backward_task_id
from moepatch.errors import MoePatchWarning


def _accumulator_dtype(device: torch.device) -> torch.dtype:
    return torch.float32 if device.type == "mps" else torch.float64


class _LayerStats:
    """Accumulators of one MoE layer, on the device of the router outputs."""

    def __init__(self, num_experts: int, device: torch.device) -> None:
        # One extra column catches the "no expert" sentinel index E that transformers' eager experts accept.
        self.counts = torch.zeros(num_experts + 1, dtype=torch.int64, device=device)
        self.prob_sums = torch.zeros(num_experts, dtype=_accumulator_dtype(device), device=device)
        self.tokens = torch.zeros((), dtype=torch.int64, device=device)

    def to(self, device: torch.device) -> None:
        self.counts = self.counts.to(device)
        self.prob_sums = self.prob_sums.to(device=device, dtype=_accumulator_dtype(device))
        self.tokens = self.tokens.to(device)

    def zero_(self) -> None:
        self.counts.zero_()
        self.prob_sums.zero_()
        self.tokens.zero_()


class RoutingRecorder:
    """Accumulate routing statistics of a model while active.

    Args:
        model (`nn.Module`): a supported MoE model (patched or not; PEFT wrappers are fine).
        layers (`Sequence[int]`, *optional*): decoder-layer indices to record (negative counts from the last
            layer); default every MoE layer.  A dense or missing layer raises ``ValueError``.

    Example:
        ```python
        with moepatch.RoutingRecorder(model, layers=[-1]) as recorder:
            model(**batch)  # attention_mask is picked up from this call
        recorder.counts  # int64 [len(recorder.layers), E]
        ```
    """

    def __init__(self, model: nn.Module, layers: Sequence[int] | None = None) -> None:
        self.model: MoEModel = describe(model)
        self.layers: list[int] = resolve_layer_indices(
            self.model, None if layers is None else list(layers), "layers"
        )
        self.num_experts = self.model.num_experts
        self.top_k = self.model.top_k
        self._stats = [
            _LayerStats(self.num_experts, _device_of(self.model.layer(i).router)) for i in self.layers
        ]
        self._handles: list[torch.utils.hooks.RemovableHandle] = []
        self._mask: torch.Tensor | None = None
        self._keep_cache: dict[tuple[int, torch.device], torch.Tensor | None] = {}
        self._warned: set[str] = set()
        mask_position = _argument_position(self.model.decoder.forward, "attention_mask")
        self._mask_position = mask_position

    # ------------------------------------------------------------------ activation
    @property
    def active(self) -> bool:
        return bool(self._handles)

    def start(self) -> RoutingRecorder:
        """Install the hooks (idempotent)."""
        if self.active:
            return self
        decoder = self.model.decoder
        self._handles.append(decoder.register_forward_pre_hook(self._capture_mask, with_kwargs=True))
        self._handles.append(decoder.register_forward_hook(self._release_mask, always_call=True))
        for slot, index in enumerate(self.layers):
            router = self.model.layer(index).router
            self._handles.append(router.register_forward_hook(self._make_router_hook(slot)))
        return self

    def stop(self) -> None:
        """Remove the hooks; the statistics stay readable."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self._release_mask()

    def __enter__(self) -> RoutingRecorder:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    # ------------------------------------------------------------------ hooks
    def _capture_mask(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        mask = kwargs.get("attention_mask")
        if mask is None and self._mask_position is not None and len(args) > self._mask_position:
            mask = args[self._mask_position]
        self._mask = mask if isinstance(mask, torch.Tensor) else None
        self._keep_cache.clear()

    def _release_mask(self, *unused: object) -> None:
        self._mask = None
        self._keep_cache.clear()

    def _warn_once(self, key: str, message: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            warnings.warn(message, MoePatchWarning, stacklevel=3)

    def _keep_mask(self, tokens: int, device: torch.device) -> torch.Tensor | None:
        """``[tokens]`` int64 0/1 mask of non-padding tokens for a router call, or ``None`` (keep all)."""
        key = (tokens, device)
        if key in self._keep_cache:
            return self._keep_cache[key]
        mask, keep = self._mask, None
        if mask is not None:
            if mask.dim() != 2:
                self._warn_once(
                    "mask-dim",
                    f"RoutingRecorder: attention_mask of shape {tuple(mask.shape)} is not [batch, seq]; "
                    "padding cannot be excluded, every token is counted",
                )
            elif tokens % mask.shape[0] or mask.shape[1] < tokens // mask.shape[0]:
                self._warn_once(
                    "mask-shape",
                    f"RoutingRecorder: {tokens} routed tokens do not align with attention_mask "
                    f"{tuple(mask.shape)}; every token is counted",
                )
            else:
                seq = tokens // mask.shape[0]
                # During cached generation the mask covers past + current tokens: the current ones are the last.
                keep = (mask[:, mask.shape[1] - seq :] != 0).reshape(-1).to(device=device, dtype=torch.int64)
        self._keep_cache[key] = keep
        return keep

    def _make_router_hook(self, slot: int):
        layout = self.model.family.router_output

        def hook(module: nn.Module, args: tuple, output: Any) -> None:
            if current_backward_task_id() != -1:
                return  # activation checkpointing re-running the forward inside backward
            with torch.no_grad():
                logits = output[layout.logits].detach()
                indices = output[layout.indices].detach()
                self._accumulate(slot, logits.reshape(-1, logits.shape[-1]), indices.reshape(indices.shape[0], -1))

        return hook

    def _accumulate(self, slot: int, logits: torch.Tensor, indices: torch.Tensor) -> None:
        stats = self._stats[slot]
        device = indices.device
        if stats.counts.device != device:
            stats.to(device)
        tokens = indices.shape[0]
        keep = self._keep_mask(tokens, device)
        probs = torch.softmax(logits, dim=-1, dtype=torch.float32)  # [N, E]
        if keep is None:
            stats.counts.scatter_add_(0, indices.reshape(-1), torch.ones_like(indices).reshape(-1))
            stats.prob_sums += probs.sum(dim=0, dtype=stats.prob_sums.dtype)
            stats.tokens += tokens
        else:
            per_slot = keep.unsqueeze(1).expand_as(indices)  # [N, k]
            stats.counts.scatter_add_(0, indices.reshape(-1), per_slot.reshape(-1))
            stats.prob_sums += (probs * keep.unsqueeze(1)).sum(dim=0, dtype=stats.prob_sums.dtype)
            stats.tokens += keep.sum()

    # ------------------------------------------------------------------ results
    @property
    def counts(self) -> torch.Tensor:
        """int64 ``[len(layers), E]``: how often each expert was chosen (top-k slots) over non-padding tokens."""
        return torch.stack([s.counts[: self.num_experts].cpu() for s in self._stats])

    @property
    def prob_sums(self) -> torch.Tensor:
        """float ``[len(layers), E]``: sum over non-padding tokens of each expert's router probability."""
        return torch.stack([s.prob_sums.cpu() for s in self._stats])

    @property
    def tokens(self) -> torch.Tensor:
        """int64 ``[len(layers)]``: non-padding tokens seen per layer."""
        return torch.stack([s.tokens.cpu() for s in self._stats])

    def reset(self) -> None:
        """Zero every accumulator (hooks stay as they are)."""
        for stats in self._stats:
            stats.zero_()

    def all_reduce(self, group: Any = None) -> RoutingRecorder:
        """Sum the statistics over the ranks of ``group`` when ``torch.distributed`` is initialised.

        Every rank must call it (it is a collective).  Without an initialised process group it does nothing.
        """
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()):
            return self
        device = torch.device("cpu")
        if dist.get_backend(group) == "nccl":
            device = torch.device("cuda", torch.cuda.current_device())
        counts = torch.stack([torch.cat([s.counts.to(device), s.tokens.to(device).reshape(1)]) for s in self._stats])
        sums = torch.stack([s.prob_sums.to(device=device, dtype=torch.float64) for s in self._stats])
        dist.all_reduce(counts, group=group)
        dist.all_reduce(sums, group=group)
        for slot, stats in enumerate(self._stats):
            target = stats.counts.device
            stats.counts.copy_(counts[slot, :-1].to(target))
            stats.tokens.copy_(counts[slot, -1].to(target))
            stats.prob_sums.copy_(sums[slot].to(target))
        return self

    def to_dict(self) -> dict[str, Any]:
        """Plain, JSON-serialisable statistics."""
        from moepatch import __version__

        return {
            "moepatch_version": __version__,
            "family": self.model.family.name,
            "layers": list(self.layers),
            "num_experts": self.num_experts,
            "top_k": self.top_k,
            "tokens": self.tokens.tolist(),
            "counts": self.counts.tolist(),
            "prob_sums": self.prob_sums.tolist(),
        }

    def to_json(self, **kwargs: Any) -> str:
        """``json.dumps(self.to_dict())``."""
        return json.dumps(self.to_dict(), **kwargs)


def _device_of(module: nn.Module) -> torch.device:
    for parameter in module.parameters():
        if parameter.device.type != "meta":
            return parameter.device
    return torch.device("cpu")


def _argument_position(function: Any, name: str) -> int | None:
    """Positional index of argument ``name`` of a bound ``forward``, or ``None``."""
    try:
        parameters = list(inspect.signature(function).parameters.values())
    except (TypeError, ValueError):
        return None
    for position, parameter in enumerate(parameters):
        if parameter.name == name and parameter.kind in (parameter.POSITIONAL_ONLY, parameter.POSITIONAL_OR_KEYWORD):
            return position
    return None
