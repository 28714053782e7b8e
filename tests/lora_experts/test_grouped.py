"""Rows after the last group: torch's grouped GEMM writes neither their output nor their gradient, and under expert
parallelism other processes' experts' rows sit there — both products must give them exact zeros either way."""

from __future__ import annotations

import pytest
import torch

from moepatch.lora_experts import grouped


class _UndefinedOutsideGroups(torch.autograd.Function):
    """A grouped GEMM as its contract allows it: every row outside the groups NaN, in the output and in the rows'
    gradient (what uninitialised memory can hold)."""

    @staticmethod
    def forward(ctx, rows: torch.Tensor, weight: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(rows, weight, offs)
        out = torch.full((rows.shape[0], weight.shape[2]), float("nan"), dtype=rows.dtype)
        start = 0
        for group, end in enumerate(offs.tolist()):
            out[start:end] = rows[start:end] @ weight[group]
            start = end
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, None]:
        rows, weight, offs = ctx.saved_tensors
        grad_rows, grad_weight = torch.full_like(rows, float("nan")), torch.zeros_like(weight)
        start = 0
        for group, end in enumerate(offs.tolist()):
            grad_rows[start:end] = grad[start:end] @ weight[group].T
            grad_weight[group] = rows[start:end].T @ grad[start:end]
            start = end
        return grad_rows, grad_weight, None


def _undefined_outside(rows: torch.Tensor, weight: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    return _UndefinedOutsideGroups.apply(rows, weight, offs)


@pytest.mark.parametrize("kernel", ["torch", "undefined outside the groups"])
@pytest.mark.parametrize("product", ["grouped_matmul", "exact_grouped_matmul"])
def test_rows_after_the_last_group_are_zero_going_out_and_coming_back(kernel: str, product: str,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    if kernel != "torch":
        monkeypatch.setattr(grouped, "_KERNEL", _undefined_outside)
    elif grouped._KERNEL is None:
        pytest.skip("this torch has no grouped GEMM")
    torch.manual_seed(0)
    groups = torch.tensor([0, 0, 2, 2, 2, 3])  # 6 rows in groups, then 4 of other processes' experts
    ends = torch.tensor([2, 2, 5, 6], dtype=torch.int32)
    rows = torch.randn(10, 8, requires_grad=True)
    weight = torch.randn(4, 8, 4, requires_grad=True)
    assert grouped.kernel_runs(rows, weight)
    if product == "grouped_matmul":
        out = grouped.grouped_matmul(rows, weight, ends, torch.cat([groups, torch.full((4,), 3)]))
    else:
        out = grouped.exact_grouped_matmul(rows, weight, ends)
    expected = torch.stack([rows[i].double() @ weight[groups[i]].double() for i in range(6)])
    torch.testing.assert_close(out[:6].double(), expected, atol=1e-5, rtol=1e-5)
    assert torch.equal(out[6:], torch.zeros(4, 4))
    # a softmax mixes each row's values; its backward is where a NaN in a masked-out row used to spread
    out.softmax(-1).mul(torch.arange(4.0)).sum().backward()
    assert rows.grad is not None and weight.grad is not None
    assert torch.equal(rows.grad[6:], torch.zeros(4, 8)) and torch.isfinite(rows.grad).all()
    assert torch.isfinite(weight.grad).all()
