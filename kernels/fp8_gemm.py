"""Block-scaled FP8 GEMM, C = A · Bᵀ, with DeepSeek-V3's fine-grained scales (report §3.3.2).

Shape letters: M rows of A (tokens, masked: any M), N rows of B, K the reduced dim.

    A (M, K) e4m3 with a_s (M, ceil(K/128)): one scale per 1x128 tile of a row
    B (N, K) e4m3 with either
        b_s (ceil(N/128), ceil(K/128)): one scale per 128x128 block ("block": forward and dgrad), or
        b_s (N, ceil(K/128)): one scale per 1x128 tile ("row": wgrad, both operands tiled along
        the token dimension, which is K there)

Each program accumulates one 128-wide K block with the tensor cores in fp32, then multiplies it
by that block's scales and adds it to an fp32 accumulator (the scales applied per K block, the
"promotion" DeepSeek-V3 describes). C is written in bf16 or fp32. Operands may be strided views
(a strided B works, but FP8 tensor-core MMA reads K-major operands, so the dgrad caller passes a
K-major copy of Wᵀ: on an H100 the strided view ran at 266 TFLOP/s at 8192³, a K-major B at
728); N may be any size
(masked, partial last weight block), K a multiple of 128 except in "row" mode, where K (the token
count) may be ragged.

Each K block's product starts from zero, so the tensor cores' limited-precision FP8 accumulation
spans only 128 products before the fp32 promotion. Tiles are numbered in groups of GROUP_M rows
for L2 reuse. On a GPU the tile shape and pipeline depth are autotuned (15 configurations, per
shape bucket, once per process; EFFLLM_FP8_AUTOTUNE=0 runs one fixed configuration). Measured on an
H100: benchmarks/results/fp8_gemm/ (QGMMA in every layout; 1.06x bf16 at 8192³).

`fp8_gemm_ref` computes the same per-block sums with PyTorch ops; it is the CPU path and the
reference the tests hold the kernel to.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from effllm.kernels.fp8_quant import TILE, dequant_rows
from effllm.kernels.launch import bucket, launch


@triton.jit
def _fp8_gemm_kernel(
    # pointers
    a_ptr, b_ptr, c_ptr, as_ptr, bs_ptr,
    # sizes
    M, N, K,
    # strides
    stride_am, stride_ak, stride_bn, stride_bk, stride_cm, stride_cn,
    stride_asm, stride_ask, stride_bsn, stride_bsk,
    # meta-parameters
    M_BUCKET, K_BUCKET, B_K_CONTIGUOUS,  # autotuning keys only: M and K rounded up to a power of
    # two, and whether B is K-major (the forward and wgrad) or read transposed (dgrad)
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    B_ROW_SCALES: tl.constexpr,
):
    # One program per output tile, numbered so that GROUP_M row-tiles sweep the same columns of B
    # together: B's tiles are read from L2 instead of HBM by the neighbours of the first reader.
    pid = tl.program_id(0)
    grid_m, grid_n = tl.cdiv(M, BLOCK_M), tl.cdiv(N, BLOCK_N)
    per_group = GROUP_M * grid_n
    first_m = (pid // per_group) * GROUP_M
    group_size = tl.minimum(grid_m - first_m, GROUP_M)
    pid_m = first_m + (pid % per_group) % group_size
    pid_n = (pid % per_group) // group_size
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    m_ok, n_ok = rm < M, rn < N
    rm64, rn64 = rm.to(tl.int64), rn.to(tl.int64)
    a_ptrs = a_ptr + rm64[:, None] * stride_am + rk[None, :] * stride_ak
    b_ptrs = b_ptr + rn64[None, :] * stride_bn + rk[:, None] * stride_bk  # (BLOCK_K, BLOCK_N) view of Bᵀ
    as_ptrs = as_ptr + rm64 * stride_asm
    if B_ROW_SCALES:
        bs_ptrs = bs_ptr + rn64 * stride_bsn
    else:  # one block scale for the whole tile: BLOCK_N divides 128
        bs_ptrs = bs_ptr + (pid_n * BLOCK_N // 128) * stride_bsn
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for kb in range(0, tl.cdiv(K, BLOCK_K)):
        k_ok = kb * BLOCK_K + rk < K
        a = tl.load(a_ptrs, mask=m_ok[:, None] & k_ok[None, :], other=0.0)
        b = tl.load(b_ptrs, mask=k_ok[:, None] & n_ok[None, :], other=0.0)
        a_s = tl.load(as_ptrs + kb * stride_ask, mask=m_ok, other=0.0)  # (BLOCK_M,)
        if B_ROW_SCALES:
            b_s = tl.load(bs_ptrs + kb * stride_bsk, mask=n_ok, other=0.0)  # (BLOCK_N,)
            acc += tl.dot(a, b) * a_s[:, None] * b_s[None, :]
        else:  # one multiply-add per element: the row scale times the block scale first
            b_s = tl.load(bs_ptrs + kb * stride_bsk)
            acc += tl.dot(a, b) * (a_s * b_s)[:, None]
        a_ptrs += BLOCK_K * stride_ak
        b_ptrs += BLOCK_K * stride_bk
    c_ptrs = c_ptr + rm64[:, None] * stride_cm + rn64[None, :] * stride_cn
    tl.store(c_ptrs, acc.to(c_ptr.dtype.element_ty), mask=m_ok[:, None] & n_ok[None, :])


def hopper_configs() -> list:
    """The search space of the autotuner on a GPU. BLOCK_K is fixed at the 128-wide scale tile, and
    BLOCK_N divides 128 so that one weight block scale covers a whole tile. The stages trade shared
    memory (32 KiB per stage at 128x128x128 FP8) for latency hiding; H100 has 228 KiB per SM.
    128x128 tiles take 8 warps: with 4, the fp32 accumulator and the block's partial product need
    256 registers a thread, and every FP8 GEMM here spilled 120-410 instructions' worth to local
    memory (`python benchmarks/hopper_compile.py --tuner`, triton 3.6); the tuner never chose it on an H100."""
    configs = []
    for bm, bn, warps in ((128, 128, 8), (64, 128, 4), (128, 64, 4), (64, 64, 4)):
        for stages in (3, 4, 5):
            configs.append(triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "GROUP_M": 8}, num_warps=warps,
                                         num_stages=stages))
    return configs


# Tuned per (M, K) bucket, N and scale layout: a training run sees a handful of shapes, each tuned
# once on first use. `_fp8_gemm_tuned.best_config` tells which configuration won.
_fp8_gemm_tuned = triton.autotune(configs=hopper_configs(), key=["M_BUCKET", "N", "K_BUCKET", "B_K_CONTIGUOUS",
                                                                 "B_ROW_SCALES"])(
    _fp8_gemm_kernel)


def tuned_configs() -> dict[str, str]:
    """The configuration the autotuner chose for each shape key so far (for benchmark reports)."""
    return {str(key): str(config) for key, config in _fp8_gemm_tuned.cache.items()}


def _check(a, a_s, b, b_s, b_row_scales: bool) -> None:
    if a.dtype != torch.float8_e4m3fn or b.dtype != torch.float8_e4m3fn:
        raise ValueError(f"fp8_gemm takes e4m3 operands, got {a.dtype} and {b.dtype}")
    if a_s.dtype != torch.float32 or b_s.dtype != torch.float32:
        raise ValueError(f"fp8_gemm takes fp32 scales, got {a_s.dtype} and {b_s.dtype}")
    if a.dim() != 2 or b.dim() != 2 or a.shape[1] != b.shape[1]:
        raise ValueError(f"fp8_gemm computes A·Bᵀ with A (M, K) and B (N, K); got {tuple(a.shape)} and {tuple(b.shape)}")
    M, K = a.shape
    N = b.shape[0]
    if not b_row_scales and K % TILE:
        raise ValueError(f"fp8_gemm needs K to be a multiple of {TILE} for block-scaled weights (got K={K}): "
                         "keep layers of other sizes in higher precision")
    kb = triton.cdiv(K, TILE)
    if a_s.shape != (M, kb):
        raise ValueError(f"a_s must be (M, ceil(K/128)) = {(M, kb)}, got {tuple(a_s.shape)}")
    want = (N, kb) if b_row_scales else (triton.cdiv(N, TILE), kb)
    if b_s.shape != want:
        raise ValueError(f"b_s must be {want} for {'row' if b_row_scales else 'block'} scales, got {tuple(b_s.shape)}")


def fp8_gemm(a: torch.Tensor, a_s: torch.Tensor, b: torch.Tensor, b_s: torch.Tensor,
             out_dtype: torch.dtype = torch.bfloat16, b_row_scales: bool = False) -> torch.Tensor:
    """C (M, N) = A · Bᵀ from block-scaled E4M3 operands, fp32 accumulation, in `out_dtype`."""
    _check(a, a_s, b, b_s, b_row_scales)
    if out_dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise ValueError(f"fp8_gemm writes fp32, bf16 or fp16 (its sums are fp32), got out_dtype={out_dtype}")
    M, K = a.shape
    N = b.shape[0]
    c = torch.empty((M, N), dtype=out_dtype, device=a.device)
    if M == 0:
        return c
    args = (a, b, c, a_s, b_s, M, N, K,
            a.stride(0), a.stride(1), b.stride(0), b.stride(1), c.stride(0), c.stride(1),
            a_s.stride(0), a_s.stride(1), b_s.stride(0), b_s.stride(1), bucket(M), bucket(K), int(b.stride(1) == 1))
    launch(_fp8_gemm_kernel, _fp8_gemm_tuned, lambda meta: (triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(N, meta["BLOCK_N"]),),
           args, fixed=dict(BLOCK_M=128, BLOCK_N=128, GROUP_M=8, num_warps=8, num_stages=3),
           interpreted=dict(BLOCK_M=64, BLOCK_N=64, GROUP_M=2, num_warps=1, num_stages=1),
           BLOCK_K=TILE, B_ROW_SCALES=b_row_scales)
    return c


def fp8_gemm_ref(a: torch.Tensor, a_s: torch.Tensor, b: torch.Tensor, b_s: torch.Tensor,
                 out_dtype: torch.dtype = torch.bfloat16, b_row_scales: bool = False) -> torch.Tensor:
    """The same product with PyTorch ops in fp32: the CPU path and the kernel's reference. Each
    operand is dequantized (its E4M3 values times their tile's scale) and one fp32 matmul sums over
    all of K. In exact arithmetic that is the kernel's sum of per-128-block partial products, each
    scaled by its two scales; in fp32 the two differ only in rounding order (< 1e-6 relative). One
    matmul instead of a (K/128, M, N) tensor of partial products made the CPU path's FP8 training
    step about twice as fast."""
    _check(a, a_s, b, b_s, b_row_scales)
    N = b.shape[0]
    bscale = b_s.float() if b_row_scales else b_s.float().repeat_interleave(TILE, dim=0)[:N]  # (N, K/128)
    return (dequant_rows(a, a_s.float()) @ dequant_rows(b, bscale).t()).to(out_dtype)
