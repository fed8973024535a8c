"""The grouped GEMM: every backend equals the per-group reference, forward and both gradients.

Without a GPU the Triton kernels run on the CPU under TRITON_INTERPRET=1 (set by conftest.py).
The interpreter cannot run a bfloat16 tl.dot (it multiplies the raw bit patterns; Triton issue
#11584, "not supported yet"), so bf16 is checked only where a GPU runs these tests.
"""

from __future__ import annotations

import os

import pytest
import torch
from helpers import REL_TOL, rel

from effllm.kernels.backends import grouped_gemm_backend
from effllm.kernels.grouped_gemm import (
    grouped_mm,
    grouped_mm_reference,
    tile_schedule,
    torch_fits,
    triton_grouped_mm,
    triton_grouped_wgrad,
)

# Relative error bounds by dtype (||out - ref|| / ||ref||, ref in fp64): fp32 accumulates in fp32
# (IEEE dots), fp16/bf16 round the inputs and the output.

# (group sizes, K, N): ragged, empty groups first / middle / last, odd feature sizes, all empty.
SHAPES = [
    ([3, 0, 17, 1, 9], 40, 24),
    ([0, 0, 5], 33, 17),
    ([16, 16], 16, 16),
    ([7, 20, 0], 70, 45),
    ([0, 0, 0, 0], 24, 8),
    ([1], 5, 3),
]


def device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"




def make(sizes, k, n, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    m = sum(sizes)
    offsets = torch.tensor(sizes).cumsum(0).to(torch.int32)
    x = torch.randn(m, k, generator=g).to(dtype)
    w = (torch.randn(len(sizes), n, k, generator=g) / k**0.5).to(dtype)
    dy = torch.randn(m, n, generator=g).to(dtype)
    return [t.to(device()) for t in (x, w, dy, offsets)]


def test_tile_schedule_covers_every_row_once():
    offsets = torch.tensor([3, 3, 20, 21, 30], dtype=torch.int32)
    group, row = tile_schedule(offsets, 30, 8)
    covered = []
    for g, r in zip(group.tolist(), row.tolist()):
        if g >= 0:
            end = offsets[g].item()
            assert (offsets[g - 1].item() if g else 0) <= r < end
            covered += list(range(r, min(r + 8, end)))
    assert sorted(covered) == list(range(30))
    assert group.numel() == 30 // 8 + 1 + 5  # the launch's upper bound: cdiv(M, BLOCK_M) + G


DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if torch.cuda.is_available() else [])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("sizes,k,n", SHAPES)
def test_triton_kernels_equal_reference(sizes, k, n, dtype):
    x, w, dy, offsets = make(sizes, k, n, dtype, seed=sum(sizes) + k)
    ref = grouped_mm_reference(x.double(), w.double(), offsets)
    y = triton_grouped_mm(x, w, offsets)
    assert y.shape == (sum(sizes), n) and y.dtype == dtype
    if sum(sizes):
        assert rel(y, ref) < REL_TOL[dtype]
        dx = triton_grouped_mm(dy, w, offsets, trans_w=False)
        assert rel(dx, grouped_mm_reference(dy.double(), w.double().transpose(1, 2), offsets)) < REL_TOL[dtype]
    dw = triton_grouped_wgrad(dy, x, offsets)
    bounds = [0] + offsets.tolist()
    for g in range(len(sizes)):
        rows = slice(bounds[g], bounds[g + 1])
        if sizes[g] == 0:
            assert torch.equal(dw[g], torch.zeros_like(dw[g]))  # empty experts get exact zeros
        else:
            assert rel(dw[g], dy[rows].double().T @ x[rows].double()) < REL_TOL[dtype]


AUTOGRAD_CASES = [("triton", torch.float32), ("torch", torch.float32), ("loop", torch.float32)]
if torch.cuda.is_available():  # torch._grouped_mm on CUDA is bf16-only; Triton runs bf16 on a GPU
    AUTOGRAD_CASES = [("triton", torch.float32), ("loop", torch.float32), ("triton", torch.bfloat16),
                      ("torch", torch.bfloat16)]


@pytest.mark.parametrize("backend,dtype", AUTOGRAD_CASES)
@pytest.mark.parametrize("sizes,k,n", SHAPES[:4])
def test_autograd_function_matches_reference_gradients(backend, dtype, sizes, k, n):
    if backend == "torch" and not hasattr(torch, "_grouped_mm"):
        pytest.skip("this PyTorch has no torch._grouped_mm")
    x, w, dy, offsets = make(sizes, k, n, dtype, seed=7)
    if backend == "torch" and not torch_fits(dtype, k, n):
        with pytest.raises(ValueError, match="multiples of 16 bytes"):
            grouped_mm(x, w, offsets, backend)
        return
    xr, wr = x.double().requires_grad_(), w.double().requires_grad_()
    grouped_mm_reference(xr, wr, offsets).backward(dy.double())
    xt, wt = x.clone().requires_grad_(), w.clone().requires_grad_()
    y = grouped_mm(xt, wt, offsets, backend)
    y.backward(dy)
    tol = REL_TOL[dtype]
    assert rel(y, grouped_mm_reference(x.double(), w.double(), offsets)) < tol
    assert rel(xt.grad, xr.grad) < tol
    assert rel(wt.grad, wr.grad) < tol


@pytest.mark.parametrize("backend", ["loop", "triton", "torch"])
def test_flop_counter_counts_the_three_products_of_every_backend(backend):
    """torch.utils.flop_counter sees the custom operators, not the products inside them: their
    registered formula gives 2·M·K·N for the forward and for each gradient, whichever backend."""
    from torch.utils.flop_counter import FlopCounterMode

    if backend == "torch" and not hasattr(torch, "_grouped_mm"):
        pytest.skip("this PyTorch has no torch._grouped_mm")
    sizes, k, n = [5, 0, 11], 32, 16
    x, w, dy, offsets = make(sizes, k, n, torch.float32, seed=2)
    x.requires_grad_()
    w.requires_grad_()
    with FlopCounterMode(display=False) as counter:
        grouped_mm(x, w, offsets, backend).backward(dy)
    assert counter.get_total_flops() == 3 * 2 * sum(sizes) * k * n


def test_bad_input_is_refused():
    x, w, _, offsets = make([2, 3], 8, 4, torch.float32, seed=0)
    with pytest.raises(ValueError, match="int32"):
        grouped_mm(x, w, offsets.long())
    with pytest.raises(ValueError, match="inner sizes differ"):
        grouped_mm(x[:, :5], w, offsets)
    with pytest.raises(ValueError, match="unknown grouped GEMM backend"):
        grouped_mm(x, w, offsets, "cutlass")
    with pytest.raises(ValueError, match="unknown grouped GEMM backend"):
        grouped_gemm_backend(torch.device("cpu"), torch.float32, "fast")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU choice")
def test_auto_backend_on_cpu():
    expected = "torch" if hasattr(torch, "_grouped_mm") else "loop"
    assert grouped_gemm_backend(torch.device("cpu"), torch.float32, features=(64, 128)) == expected
    assert grouped_gemm_backend(torch.device("cpu"), torch.float32, features=(64, 33)) == "loop"
    assert os.environ["TRITON_INTERPRET"] == "1"  # and under the interpreter, Triton runs on the CPU
    assert grouped_gemm_backend(torch.device("cpu"), torch.float32, "triton") == "triton"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("t,k,d", [(7, 3, 40), (1, 1, 5), (16, 6, 130), (0, 2, 8)])
def test_combine_kernel_equals_reference_forward_and_backward(t, k, d, dtype):
    """No tl.dot in the combine kernels, so bf16 runs under the interpreter too."""
    from effllm.kernels.moe_combine import combine, combine_reference

    g = torch.Generator().manual_seed(t * 100 + d)
    y = torch.randn(t * k, d, generator=g).to(dtype).to(device())
    w = torch.rand(t, k, generator=g).to(device())
    pos = torch.randperm(t * k, generator=g).view(t, k).to(device())
    dout = torch.randn(t, d, generator=g).to(device())
    yr, wr = y.double().requires_grad_(), w.double().requires_grad_()
    ref = (yr[pos.flatten()].view(t, k, d) * wr.unsqueeze(-1)).sum(1)  # the formula, in fp64
    ref.backward(dout.double())
    yt, wt = y.clone().requires_grad_(), w.clone().requires_grad_()
    out = combine(yt, wt, pos, torch.float32, use_triton=True)
    out.backward(dout)
    assert out.dtype == torch.float32 and yt.grad.dtype == dtype and wt.grad.dtype == torch.float32
    if t:
        assert rel(out, ref) < 1e-6  # fp32 accumulation of the exact inputs
        assert rel(wt.grad, wr.grad) < 1e-6
        assert rel(yt.grad, yr.grad) < REL_TOL[dtype]  # w * dout rounded to y's dtype
        torch.testing.assert_close(combine_reference(y, w, pos, torch.float32), out, rtol=1e-6, atol=1e-6)


def test_dtypes_the_kernels_do_not_take_are_refused_or_run_on_the_loop():
    """The kernels accumulate in fp32: given fp64 the Triton grouped GEMM used to return wrong values
    (off by ~15 here) and torch._grouped_mm raised its own error through `auto`. Now both refuse
    fp64 by name, and `auto` runs it on the loop, exactly."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(10, 16, generator=g, dtype=torch.float64)
    w = torch.randn(2, 16, 16, generator=g, dtype=torch.float64)
    offsets = torch.tensor([4, 10], dtype=torch.int32)
    for backend in ("triton", "torch"):
        with pytest.raises(ValueError, match="takes fp32, bf16 or fp16.*got torch.float64"):
            grouped_mm(x, w, offsets, backend)
        with pytest.raises(ValueError, match="use backend 'loop'"):
            grouped_gemm_backend(torch.device("cpu"), torch.float64, backend)
    with pytest.raises(ValueError, match="got torch.float64"):
        triton_grouped_mm(x, w, offsets)
    assert grouped_gemm_backend(torch.device("cpu"), torch.float64) == "loop"
    xr, wr = x.clone().requires_grad_(), w.clone().requires_grad_()
    y = grouped_mm(xr, wr, offsets, grouped_gemm_backend(x.device, x.dtype))
    assert torch.equal(y, grouped_mm_reference(x, w, offsets))


def test_the_fp8_kernels_refuse_what_they_cannot_quantize_or_multiply():
    from effllm.kernels.fp8_gemm import fp8_gemm
    from effllm.kernels.fp8_quant import quant_blocks, quant_rows, quant_rows_and_cols
    from effllm.kernels.moe_combine import combine

    ints = torch.ones(4, 128, dtype=torch.int32)
    for fn in (quant_rows, quant_rows_and_cols, quant_blocks):
        with pytest.raises(ValueError, match="floating-point tensor to quantize"):
            fn(ints)
    q, s = quant_rows(torch.randn(4, 128))
    with pytest.raises(ValueError, match="floating-point tensor to quantize"):
        quant_rows(q)  # already FP8
    with pytest.raises(ValueError, match="fp32 scales"):
        fp8_gemm(q, s.bfloat16(), q, s)
    with pytest.raises(ValueError, match="writes fp32, bf16 or fp16"):
        fp8_gemm(q, s, q, s, torch.float64, b_row_scales=True)
    with pytest.raises(ValueError, match="floating-point expert outputs"):
        combine(torch.ones(6, 8, dtype=torch.int64), torch.rand(3, 2), torch.randperm(6).view(3, 2), torch.float32,
                use_triton=True)
