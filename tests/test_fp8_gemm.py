"""The block-scaled FP8 GEMM against its PyTorch reference and a float64 matmul of the dequantized
operands, in the three layouts the FP8 linear uses: forward, dgrad (transposed weight) and wgrad."""

from __future__ import annotations

import pytest
import torch
from effllm.kernels.fp8_gemm import fp8_gemm, fp8_gemm_ref
from effllm.kernels.fp8_quant import (
    dequant_blocks,
    dequant_rows,
    quant_blocks,
    quant_rows,
    quant_rows_and_cols,
)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def rel(a, b):
    b = b.double()
    return ((a.double() - b).norm() / b.norm()).item()


def randn(*shape, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g).to(DEVICE)


@pytest.mark.parametrize("out_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("m,n,k", [(37, 128, 256), (1, 256, 128), (130, 256, 384)])
def test_forward_layout(m, n, k, out_dtype):
    qa, sa = quant_rows(randn(m, k, seed=m + k))
    qb, sb = quant_blocks(randn(n, k, seed=n))
    c = fp8_gemm(qa, sa, qb, sb, out_dtype)
    ref = fp8_gemm_ref(qa, sa, qb, sb, torch.float32)
    exact = dequant_rows(qa, sa).double() @ dequant_blocks(qb, sb).double().t()
    tol = 1e-6 if out_dtype == torch.float32 else 4e-3  # fp32 accumulation; bf16 rounds the output
    assert c.dtype == out_dtype and rel(c, ref) < tol and rel(c, exact) < tol


def test_dgrad_layout_reads_the_transposed_weight_without_a_copy():
    m, n_out, k_in = 45, 256, 384
    qdy, sdy = quant_rows(randn(m, n_out, seed=1))
    qw, sw = quant_blocks(randn(n_out, k_in, seed=2))  # W (out, in)
    dx = fp8_gemm(qdy, sdy, qw.t(), sw.t(), torch.float32)  # dY · W = dY · (Wᵀ)ᵀ
    exact = dequant_rows(qdy, sdy).double() @ dequant_blocks(qw, sw).double()
    assert dx.shape == (m, k_in) and rel(dx, exact) < 1e-6
    assert rel(dx, fp8_gemm_ref(qdy, sdy, qw.t(), sw.t(), torch.float32)) < 1e-6


@pytest.mark.parametrize("m", [128, 77, 300])
def test_wgrad_layout_sums_over_ragged_tokens(m):
    n_out, k_in = 128, 256
    dy, x = randn(m, n_out, seed=m), randn(m, k_in, seed=m + 1)
    _, _, qdy_t, sdy_t = quant_rows_and_cols(dy)  # (out, M), scales per 128 tokens
    _, _, qx_t, sx_t = quant_rows_and_cols(x)  # (in, M)
    dw = fp8_gemm(qdy_t, sdy_t, qx_t, sx_t, torch.float32, b_row_scales=True)
    deq = lambda q, s: (q.float() * s.repeat_interleave(128, dim=1)[:, : q.shape[1]]).double()  # noqa: E731
    exact = deq(qdy_t, sdy_t) @ deq(qx_t, sx_t).t()
    assert dw.shape == (n_out, k_in) and rel(dw, exact) < 1e-6
    assert rel(dw, fp8_gemm_ref(qdy_t, sdy_t, qx_t, sx_t, torch.float32, b_row_scales=True)) < 1e-6
    # and against the unquantized product: FP8's error, of order 1e-2
    assert rel(dw, dy.double().t() @ x.double()) < 5e-2


def test_bad_shapes_are_refused():
    qa, sa = quant_rows(randn(4, 128, seed=0))
    qb, sb = quant_blocks(randn(128, 128, seed=1))
    with pytest.raises(ValueError, match="e4m3"):
        fp8_gemm(qa.float(), sa, qb, sb)
    with pytest.raises(ValueError, match="b_s must be"):
        fp8_gemm(qa, sa, qb, sb[:, :0])
    with pytest.raises(ValueError, match="multiples of 128"):
        fp8_gemm(qa, sa, qb[:100], sb)
