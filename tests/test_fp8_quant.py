"""FP8 quantization kernels against their PyTorch references, bit for bit, and the E4M3 error bound.

Without a GPU the kernels run under TRITON_INTERPRET=1 (conftest.py), FP8 included.
"""

from __future__ import annotations

import pytest
import torch
from helpers import same_bits

from effllm.kernels.fp8_quant import (
    FP8,
    FP8_MAX,
    dequant_blocks,
    dequant_rows,
    quant_blocks,
    quant_blocks_ref,
    quant_blocks_t,
    quant_cols_ref,
    quant_rows,
    quant_rows_and_cols,
    quant_rows_ref,
)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def sample(shape, seed, dtype=torch.float32):
    """Random values over many magnitudes: tiles with small, large and mixed ranges."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g) * torch.exp(torch.randn(shape, generator=g) * 2)
    x[: shape[0] // 3] *= 1e-4
    return x.to(dtype).to(DEVICE)




def test_rounding_matches_torch_on_every_e4m3_midpoint():
    """Ties, values just off them, subnormals and the carry case that Triton's own cast gets wrong."""
    grid = torch.arange(256, dtype=torch.uint8).view(FP8).float()
    grid = torch.unique(grid[torch.isfinite(grid)])  # sorted finite E4M3 values
    mids = (grid[1:] + grid[:-1]) / 2
    values = torch.cat([grid, mids, torch.nextafter(mids, grid[1:]), torch.nextafter(mids, grid[:-1]),
                        torch.tensor([126.8, -125.5, 31.6051, 1.97])])
    values = values[values.abs() <= FP8_MAX]
    n = (-values.numel()) % 128
    x = torch.cat([values, torch.zeros(n)]).view(-1, 128)
    x[:, 0] = FP8_MAX  # fixes every row's scale at exactly 1, so q is the rounding of x itself
    q, s = quant_rows(x.to(DEVICE))
    assert torch.all(s == 1.0)
    assert same_bits(q.cpu(), x.to(FP8))  # torch's cast: round to nearest, ties to even


@pytest.mark.parametrize("pow2", [False, True])
@pytest.mark.parametrize("m,k", [(1, 128), (37, 256), (130, 384), (0, 128)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_row_and_column_kernels_equal_references(m, k, pow2, dtype):
    x = sample((m, k), seed=m * 7 + k, dtype=dtype)
    q, s = quant_rows(x, pow2)
    qr, sr = quant_rows_ref(x, pow2)
    assert same_bits(q, qr) and torch.equal(s, sr)
    q2, s2, qt, st = quant_rows_and_cols(x, pow2)
    assert same_bits(q2, qr) and torch.equal(s2, sr)
    qtr, str_ = quant_cols_ref(x, pow2)
    assert qt.shape == (k, m) and same_bits(qt, qtr) and torch.equal(st, str_)
    if pow2 and m:
        assert torch.all(torch.frexp(s)[0] == 0.5)  # every scale a power of two


@pytest.mark.parametrize("pow2", [False, True])
@pytest.mark.parametrize("n,k", [(128, 128), (256, 384), (200, 128)])
def test_block_kernel_equals_reference(n, k, pow2):
    w = sample((n, k), seed=n + k)
    q, s = quant_blocks(w, pow2)
    qr, sr = quant_blocks_ref(w, pow2)
    assert s.shape == (-(-n // 128), k // 128) and same_bits(q, qr) and torch.equal(s, sr)
    if n % 128 and not pow2:  # a partial last block is scaled by the rows it has
        last = w[n // 128 * 128 :].float().abs().view(n % 128, k // 128, 128).amax(dim=(0, 2))
        assert torch.equal(s[-1], last / 448)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("pow2", [False, True])
@pytest.mark.parametrize("n,k", [(128, 256), (200, 384)])
def test_block_kernel_with_transposed_copy_equals_reference(n, k, pow2, dtype):
    """quant_blocks_t: the same q and s, plus qᵀ stored K-major (what the dgrad GEMM reads); fp32
    master weights and bf16 ones (on an H100 a transposed e4m3 tile once came out wrong for fp32 only)."""
    w = sample((n, k), seed=n * 3 + k, dtype=dtype)
    qr, sr = quant_blocks_ref(w, pow2)
    q, s, qt = quant_blocks_t(w, pow2)
    assert same_bits(q, qr) and torch.equal(s, sr)
    assert qt.shape == (k, n) and qt.stride() == (n, 1) and same_bits(qt, qr.t().contiguous())
    q2, s2, qt2 = quant_blocks_t(w, pow2, rows=False)
    assert q2 is None and torch.equal(s2, sr) and same_bits(qt2, qt)


def test_dequantization_error_within_the_e4m3_bound():
    x = sample((64, 512), seed=3)
    q, s = quant_rows(x)
    err = (dequant_rows(q, s) - x).abs()
    scale = s.repeat_interleave(128, dim=1)
    # round to nearest: half a step, 2^-4 relative for normals, 2^-10 absolute (in q units) for subnormals
    bound = scale * torch.maximum((x / scale).abs() * 2**-4, torch.full_like(x, 2**-10))
    assert torch.all(err <= bound * (1 + 1e-6))
    w = sample((256, 256), seed=4)
    qw, sw = quant_blocks(w)
    errw = (dequant_blocks(qw, sw) - w).abs()
    scalew = sw.repeat_interleave(128, 0).repeat_interleave(128, 1)
    assert torch.all(errw <= scalew * torch.maximum((w / scalew).abs() * 2**-4, torch.full_like(w, 2**-10)) * (1 + 1e-6))


def test_zero_tiles_give_zeros_and_huge_values_do_not_overflow():
    x = torch.zeros(4, 256, device=DEVICE)
    x[1, 128:] = torch.tensor([3e38, -1e38] * 64)
    x[2, :128] = 1e-30
    q, s, qt, st = quant_rows_and_cols(x)
    for t in (q, qt):
        assert torch.isfinite(t.float()).all()
    assert torch.isfinite(s).all() and torch.isfinite(st).all() and (s > 0).all()
    back = dequant_rows(q, s)
    assert torch.equal(back[0], torch.zeros(256, device=DEVICE)) and torch.equal(back[3], torch.zeros(256, device=DEVICE))
    # .item(): pytest.approx converts a tensor through numpy, which a CUDA tensor refuses
    assert back[1, 128].item() == pytest.approx(3e38, rel=2**-4)
    assert back[1, 129].item() == pytest.approx(-1e38, rel=2**-4)
    assert back[2, 0].item() == pytest.approx(1e-30, rel=2**-4)


def test_bad_shapes_are_refused():
    with pytest.raises(ValueError, match="not a multiple of 128"):
        quant_rows(torch.zeros(4, 100, device=DEVICE))
    with pytest.raises(ValueError, match="not a multiple of 128"):
        quant_blocks(torch.zeros(128, 100, device=DEVICE))
