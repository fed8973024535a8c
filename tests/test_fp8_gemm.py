"""The block-scaled FP8 GEMM against its PyTorch reference and a float64 matmul of the dequantized
operands, in the three layouts the FP8 linear uses: forward, dgrad (transposed weight) and wgrad."""

from __future__ import annotations

import functools

import helpers
import pytest
import torch
from helpers import REL_TOL, rel

from effllm.kernels.fp8_gemm import fp8_gemm, fp8_gemm_ref
from effllm.kernels.fp8_quant import (
    dequant_blocks,
    dequant_rows,
    quant_blocks,
    quant_rows,
    quant_rows_and_cols,
)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"




randn = functools.partial(helpers.randn, device=DEVICE)


@pytest.mark.parametrize("out_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("m,n,k", [(37, 128, 256), (1, 256, 128), (130, 256, 384), (50, 200, 256)])
def test_forward_layout(m, n, k, out_dtype):
    qa, sa = quant_rows(randn(m, k, seed=m + k))
    qb, sb = quant_blocks(randn(n, k, seed=n))
    c = fp8_gemm(qa, sa, qb, sb, out_dtype)
    ref = fp8_gemm_ref(qa, sa, qb, sb, torch.float32)
    exact = dequant_rows(qa, sa).double() @ dequant_blocks(qb, sb).double().t()
    tol = REL_TOL["fp8_sum"] if out_dtype == torch.float32 else REL_TOL["bf16_output"]  # fp32 sums; bf16 rounds them
    assert c.dtype == out_dtype and rel(c, ref) < tol and rel(c, exact) < tol


@pytest.mark.parametrize("k_major", [False, True])
def test_dgrad_layout_reads_the_transposed_weight_as_a_view_or_a_copy(k_major):
    m, n_out, k_in = 45, 256, 384
    qdy, sdy = quant_rows(randn(m, n_out, seed=1))
    qw, sw = quant_blocks(randn(n_out, k_in, seed=2))  # W (out, in)
    wt = qw.t().contiguous() if k_major else qw.t()  # FP8Linear passes the K-major copy
    dx = fp8_gemm(qdy, sdy, wt, sw.t(), torch.float32)  # dY · W = dY · (Wᵀ)ᵀ
    exact = dequant_rows(qdy, sdy).double() @ dequant_blocks(qw, sw).double()
    assert dx.shape == (m, k_in) and rel(dx, exact) < REL_TOL["fp8_sum"]
    assert rel(dx, fp8_gemm_ref(qdy, sdy, qw.t(), sw.t(), torch.float32)) < REL_TOL["fp8_sum"]


@pytest.mark.parametrize("m", [128, 77, 300])
def test_wgrad_layout_sums_over_ragged_tokens(m):
    n_out, k_in = 128, 256
    dy, x = randn(m, n_out, seed=m), randn(m, k_in, seed=m + 1)
    _, _, qdy_t, sdy_t = quant_rows_and_cols(dy)  # (out, M), scales per 128 tokens
    _, _, qx_t, sx_t = quant_rows_and_cols(x)  # (in, M)
    dw = fp8_gemm(qdy_t, sdy_t, qx_t, sx_t, torch.float32, b_row_scales=True)
    deq = lambda q, s: (q.float() * s.repeat_interleave(128, dim=1)[:, : q.shape[1]]).double()  # noqa: E731
    exact = deq(qdy_t, sdy_t) @ deq(qx_t, sx_t).t()
    assert dw.shape == (n_out, k_in) and rel(dw, exact) < REL_TOL["fp8_sum"]
    assert rel(dw, fp8_gemm_ref(qdy_t, sdy_t, qx_t, sx_t, torch.float32, b_row_scales=True)) < REL_TOL["fp8_sum"]
    # and against the unquantized product: FP8's error, of order 1e-2
    assert rel(dw, dy.double().t() @ x.double()) < 5e-2


def test_bad_shapes_are_refused():
    qa, sa = quant_rows(randn(4, 128, seed=0))
    qb, sb = quant_blocks(randn(128, 128, seed=1))
    with pytest.raises(ValueError, match="e4m3"):
        fp8_gemm(qa.float(), sa, qb, sb)
    with pytest.raises(ValueError, match="b_s must be"):
        fp8_gemm(qa, sa, qb, sb[:, :0])
    with pytest.raises(ValueError, match="multiple of 128"):
        fp8_gemm(qa[:, :100], sa, qb[:, :100], sb)  # block-scaled weights need whole K blocks


@pytest.mark.gpu
def test_per_block_promotion_keeps_long_sums_as_accurate_as_short_ones():
    """On tensor cores each 128-wide K block is summed in the MMA's ~14-bit accumulator and then
    promoted to fp32. Promoted per block, the relative error stays that of one block however long
    K is; summed in the MMA accumulator throughout, it would grow with K (DeepSeek-V3 §3.3.2)."""
    errors = {}
    for k in (128, 8192):
        qa, sa = quant_rows(randn(256, k, seed=k))
        qb, sb = quant_blocks(randn(256, k, seed=k + 1))
        exact = dequant_rows(qa, sa).double() @ dequant_blocks(qb, sb).double().t()
        errors[k] = rel(fp8_gemm(qa, sa, qb, sb, torch.float32), exact)
    assert errors[8192] < 1.5 * errors[128] and errors[8192] < REL_TOL["fp8_sum"], errors
