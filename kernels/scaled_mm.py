"""torch's FP8 GEMMs, `torch.nn.functional.scaled_mm` (cuBLAS on Hopper), for FP8Linear's products,
the scale layouts they read, and an emulator that reads those layouts as cuBLAS does.

Block-scaled (DeepSeek-V3's recipe; cuBLAS 12.9+ on sm_90, no fast accumulation). `blockwise_mm`
takes effllm's operands and scales as `fp8_gemm` does (A (M, K) with 1x128 tiles' scales (M, K/128);
B (N, K) with 128x128 blocks' scales (N/128, K/128), or 1x128 tiles' (N, K/128)), and hands cuBLAS
its layouts:
- 1x128 scales (rows, K/128) stored outer-dim-major, strides (1, rows) (`outer_major`);
- 128x128 scales as (round_up(K/128, 4), N/128) with strides (1, L4), the padding 1.0 (`blocks_l4`).
The legacy `torch._scaled_mm` takes the unpadded 128x128 scales and gives wrong answers when K/128
is not a multiple of 4 (pytorch#166752); F.scaled_mm's padded layout is the one that holds.
The three products: forward x·Wᵀ and dgrad dy·W are 1x128 x 128x128; wgrad dyᵀ·x is 1x128 x 1x128
with the tokens as K, padded with zeros to a multiple of 128 (zeros add nothing).

Row-wise (torchtitan's and torchao's recipe): one scale per row of each operand over the whole K,
`F.scaled_mm(..., RowWise, ..., RowWise)`; torch runs it on the CPU too, so this recipe's numerics
are tested for real there (`rowwise_mm`, `quant_rowwise`). Tensor-wise, one scale per operand
(`tensorwise_mm`, `quant_tensorwise`), likewise.

The re-layout of the scales is an extra pass over them (1/128 of an operand's elements), not over
the operands. torch's meta kernels apply the CUDA layout checks, so the tests call the exact
invocations on meta tensors; `emulate_scaled_mm` dequantizes by the same layouts and multiplies in
fp32, so a transposed or mis-padded scale fails on a CPU as well.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from effllm.kernels.fp8_quant import AMAX_FLOOR, FP8, FP8_MAX, TILE


def _round4(n: int) -> int:
    return (n + 3) // 4 * 4


def outer_major(s: torch.Tensor) -> torch.Tensor:
    """1x128 scales (rows, K/128), the same values stored with strides (1, rows)."""
    return s.t().contiguous().t()


def blocks_l4(s: torch.Tensor) -> torch.Tensor:
    """128x128 scales (R/128, K/128) as cuBLAS reads them: (L4, R/128), L4 = round_up(K/128, 4),
    strides (1, L4), the K blocks past K/128 padded with 1.0."""
    rb, kb = s.shape
    out = s.new_ones(rb, _round4(kb))
    out[:, :kb] = s
    return out.t()


def _pad_k(q: torch.Tensor, s: torch.Tensor, multiple: int) -> tuple[torch.Tensor, torch.Tensor]:
    """q (R, K) and its 1x128 scales (R, ceil(K/128)) with K padded to `multiple` (zeros in q, ones in
    the scales of added tiles): the padded products are exact zeros."""
    pad = (-q.shape[1]) % multiple
    if not pad:
        return q, s
    q = F.pad(q.view(torch.uint8), (0, pad)).view(FP8)  # e4m3 0x00 is +0.0
    tiles = -(-q.shape[1] // TILE)
    if s.shape[1] < tiles:
        s = F.pad(s, (0, tiles - s.shape[1]), value=1.0)
    return q, s


def blockwise_args(a: torch.Tensor, a_s: torch.Tensor, b: torch.Tensor, b_s: torch.Tensor,
                   b_row_scales: bool = False) -> tuple:
    """The arguments of `F.scaled_mm` for A·Bᵀ from effllm's operands and scales (see `fp8_gemm`):
    (mat_a, mat_b, scale_a, recipe_a, scale_b, recipe_b). K not a multiple of 128 (wgrad's tokens)
    is padded with zeros."""
    ST = F.ScalingType
    if a.shape[1] % TILE:  # only with 1x128 scales on both sides: K is the tokens of wgrad
        a, a_s = _pad_k(a, a_s, TILE)
        b, b_s = _pad_k(b, b_s, TILE)
    if b_row_scales:
        return a, b.t(), outer_major(a_s), ST.BlockWise1x128, outer_major(b_s), ST.BlockWise1x128
    return a, b.t(), outer_major(a_s), ST.BlockWise1x128, blocks_l4(b_s), ST.BlockWise128x128


def blockwise_mm(a: torch.Tensor, a_s: torch.Tensor, b: torch.Tensor, b_s: torch.Tensor,
                 out_dtype: torch.dtype = torch.bfloat16, b_row_scales: bool = False) -> torch.Tensor:
    """C (M, N) = A · Bᵀ from block-scaled E4M3 operands through torch's `F.scaled_mm` (cuBLAS on
    sm_90): `fp8_gemm`'s contract, cuBLAS's arithmetic (fp32 accumulation, no fast accumulation)."""
    if a.shape[0] == 0:
        return torch.empty((0, b.shape[0]), dtype=out_dtype, device=a.device)
    return F.scaled_mm(*blockwise_args(a, a_s, b, b_s, b_row_scales), output_dtype=out_dtype)


def _pad_k16(q: torch.Tensor) -> torch.Tensor:
    """q (R, K) e4m3 with K padded with zeros to a multiple of 16, which cuBLAS needs (wgrad's K is
    the tokens); the padded products are exact zeros."""
    pad = (-q.shape[1]) % 16
    return F.pad(q.view(torch.uint8), (0, pad)).view(FP8) if pad else q


def quant_rowwise(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x (R, K) -> q (R, K) e4m3 and one scale per row over the whole K, (R, 1) fp32 (amax / 448)."""
    xf = x.float().contiguous()  # F.scaled_mm reads its first operand row-major
    s = xf.abs().amax(dim=1, keepdim=True).clamp(min=AMAX_FLOOR) / FP8_MAX
    return (xf / s).clamp(-FP8_MAX, FP8_MAX).to(FP8), s


def rowwise_mm(a: torch.Tensor, a_s: torch.Tensor, b: torch.Tensor, b_s: torch.Tensor,
               out_dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """C (M, N) = A · Bᵀ with per-row scales of A (M, 1) and of B (N, 1), through `F.scaled_mm`
    RowWise x RowWise (cuBLAS on CUDA, torch's own kernel on a CPU). K is padded with zeros to a
    multiple of 16, which cuBLAS needs (wgrad's K is the tokens)."""
    a, b = _pad_k16(a), _pad_k16(b)
    ST = F.ScalingType
    return F.scaled_mm(a, b.t(), a_s, ST.RowWise, b_s.t(), ST.RowWise, output_dtype=out_dtype)


def quant_tensorwise(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x (R, K) -> q (R, K) e4m3 and one scale for the whole tensor, a 0-dim fp32 (amax / 448)."""
    xf = x.float().contiguous()
    s = xf.abs().amax().clamp(min=AMAX_FLOOR) / FP8_MAX
    return (xf / s).clamp(-FP8_MAX, FP8_MAX).to(FP8), s


def tensorwise_mm(a: torch.Tensor, a_s: torch.Tensor, b: torch.Tensor, b_s: torch.Tensor,
                  out_dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """C (M, N) = A · Bᵀ with one scale per operand, through `F.scaled_mm` TensorWise x TensorWise;
    K padded with zeros to a multiple of 16, as in `rowwise_mm`."""
    a, b = _pad_k16(a), _pad_k16(b)
    ST = F.ScalingType
    return F.scaled_mm(a, b.t(), a_s, ST.TensorWise, b_s, ST.TensorWise, output_dtype=out_dtype)


def emulate_scaled_mm(mat_a: torch.Tensor, mat_b: torch.Tensor, scale_a: torch.Tensor, recipe_a, scale_b: torch.Tensor,
                      recipe_b, output_dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """What `F.scaled_mm(mat_a, mat_b, scale_a, recipe_a, scale_b, recipe_b)` computes, in fp32 on any
    device: each operand dequantized by its scales indexed as cuBLAS indexes them, then one matmul.
    mat_a (M, K); mat_b (K, N); BlockWise1x128: scale[row, k // 128]; BlockWise128x128 (given as
    (L4, R/128)): scale[k // 128, row // 128]; RowWise: scale_a (M, 1), scale_b (1, N)."""
    ST = F.ScalingType

    def dequant(q: torch.Tensor, s: torch.Tensor, recipe) -> torch.Tensor:  # q (rows, K)
        rows, k = q.shape
        ri, ki = torch.arange(rows, device=q.device)[:, None], torch.arange(k, device=q.device)[None, :]
        if recipe == ST.BlockWise1x128:
            scale = s[ri, ki // TILE]
        elif recipe == ST.BlockWise128x128:
            scale = s[ki // TILE, ri // TILE]
        elif recipe == ST.RowWise:
            scale = s.reshape(-1)[ri]
        else:
            raise ValueError(f"the emulator reads BlockWise1x128, BlockWise128x128 and RowWise scales, not {recipe}")
        return q.float() * scale.float()

    a = dequant(mat_a, scale_a, recipe_a)  # (M, K)
    b = dequant(mat_b.t(), scale_b.t() if recipe_b == ST.RowWise else scale_b, recipe_b)  # (N, K)
    return (a @ b.t()).to(output_dtype)
