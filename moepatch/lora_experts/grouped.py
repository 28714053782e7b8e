"""Grouped matrix products: ``rows[i] @ weight[group of row i]`` over rows sorted by group.

Both the top-k LoRA experts (each (token, choice) row on its chosen expert's A and B) and the routed experts' sets
(each row on its routed expert's set) are grouped products.  Two ways to run one, by what the caller needs:

* :func:`grouped_matmul`: never synchronises with the host (torch's grouped GEMM where it runs, else a blockwise
  product that costs ``G`` times the FLOPs of the narrow LoRA side) — for the routed experts' sets, which sit inside
  the experts' computation and must not stall it.
* :func:`exact_grouped_matmul`: exactly each group's FLOPs (torch's grouped GEMM, else transformers' fallback
  operator: one host read of the group sizes, opaque to ``torch.compile`` so it is no graph break) — for the top-k
  LoRA experts, whose point is computing only k of N.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import transformers.integrations.moe  # noqa: F401  (registers torch.ops.transformers.grouped_mm_fallback)

_KERNEL = getattr(F, "grouped_mm", None) or getattr(torch, "_grouped_mm", None)
"""torch's grouped GEMM (``None`` on a torch without it)."""
_KERNEL_DTYPES = {"cpu": (torch.float32, torch.bfloat16), "cuda": (torch.float32, torch.bfloat16, torch.float16)}


def kernel_runs(rows: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether torch's grouped GEMM takes these operands: a kernel for the device and dtype, 16-byte aligned
    pointers, strides and widths (the backward's operands too: the output's gradient has the output's width); under
    ``torch.compile`` only bfloat16 on CUDA (its meta function refuses the rest)."""
    if _KERNEL is None or rows.dtype != weight.dtype or rows.dtype not in _KERNEL_DTYPES.get(rows.device.type, ()):
        return False
    if torch.compiler.is_compiling():
        return rows.device.type == "cuda" and rows.dtype == torch.bfloat16
    if rows.device.type == "cuda" and torch.cuda.get_device_capability(rows.device) < (8, 0):
        return False
    size = rows.element_size()
    strides = [stride for stride in (*rows.stride(), *weight.stride()) if stride != 1]
    pointers = (rows.data_ptr(), weight.data_ptr())
    return all(n * size % 16 == 0 for n in (*strides, *weight.shape[1:])) and all(p % 16 == 0 for p in pointers)


def _blockwise(rows: torch.Tensor, weight: torch.Tensor, groups: torch.Tensor) -> torch.Tensor:
    """:func:`grouped_matmul` without the kernel and without a host sync: every row against all ``G`` weights at
    once, keeping its own group's block — ``G`` times the FLOPs, ``[S, G, min(in, out)]`` of memory (the LoRA side
    of each product is the narrow one: a rank or a router width)."""
    count, (num, fan_in, fan_out) = rows.shape[0], weight.shape
    if fan_out <= fan_in:  # [S, G·out], then each row's block
        every = rows @ weight.permute(1, 0, 2).reshape(fan_in, num * fan_out)
        return every.view(count, num, fan_out).gather(1, groups.view(-1, 1, 1).expand(count, 1, fan_out)).squeeze(1)
    spread = rows.new_zeros(count, num, fan_in).scatter(1, groups.view(-1, 1, 1).expand(count, 1, fan_in),
                                                        rows.unsqueeze(1))  # each row in its group's block, else 0
    return spread.view(count, num * fan_in) @ weight.reshape(num * fan_in, fan_out)


def grouped_matmul(rows: torch.Tensor, weight: torch.Tensor, ends: torch.Tensor, groups: torch.Tensor
                   ) -> torch.Tensor:
    """``rows[i] @ weight[groups[i]]`` for every row.

    Args:
        rows (`torch.Tensor` of shape `[S, in]`): sorted by group.
        weight (`torch.Tensor` of shape `[G, in, out]`): one matrix per group.
        ends (`torch.Tensor` of shape `[G]`, int32): cumulative row count per group (torch's grouped GEMM reads it).
        groups (`torch.Tensor` of shape `[S]`, int64): each row's group (the kernel-free path reads it).

    Returns:
        `torch.Tensor` of shape `[S, out]`: torch's grouped GEMM where it runs (:func:`kernel_runs`), else
        :func:`_blockwise`; neither synchronises with the host.
    """
    if _KERNEL is not None and kernel_runs(rows, weight):  # kernel_runs is False without it: narrows for mypy
        return _kernel_outside_groups_zeroed(rows, weight, ends)
    return _blockwise(rows, weight, groups)


def _kernel_outside_groups_zeroed(rows: torch.Tensor, weight: torch.Tensor, ends: torch.Tensor) -> torch.Tensor:
    """torch's grouped GEMM with the rows after the last group set to 0, going out and in the gradient coming back.

    The kernel writes neither those rows of its output nor, in its backward, of the rows' gradient; under expert
    parallelism other processes' experts' rows sit there, and uninitialised memory can hold NaN or inf, which reaches
    every gradient through any later op that mixes rows (a softmax's backward, a sum) even where the forward masks
    the rows out.  Masking the input makes autograd zero its gradient there (``masked_fill``'s backward replaces the
    values, where a product with 0 would keep a NaN).
    """
    if _KERNEL is None or ends.numel() == 0:  # callers check kernel_runs first; this narrows for mypy
        return rows.new_zeros(rows.shape[0], weight.shape[-1])
    outside = (torch.arange(rows.shape[0], device=rows.device) >= ends[-1]).unsqueeze(-1)
    return _KERNEL(rows.masked_fill(outside, 0.0), weight, offs=ends).masked_fill(outside, 0.0)


def exact_grouped_matmul(rows: torch.Tensor, weight: torch.Tensor, ends: torch.Tensor) -> torch.Tensor:
    """``rows [S, in]`` sorted by group, ``weight [G, in, out]``, ``ends [G]`` (int32 cumulative row counts):
    each group's rows on its own matrix, with exactly those FLOPs — torch's grouped GEMM where it runs
    (:func:`kernel_runs`), else transformers' ``grouped_mm_fallback`` operator (a loop over the groups after one host
    read of ``ends``; a custom operator, so ``torch.compile`` keeps it in the graph)."""
    if _KERNEL is not None and kernel_runs(rows, weight):
        return _kernel_outside_groups_zeroed(rows, weight, ends)
    return torch.ops.transformers.grouped_mm_fallback(rows, weight.to(rows.dtype), offs=ends)
