"""The grouped block-scaled FP8 GEMMs of MoE experts: one launch for all experts, no host sync.

Shape letters and the 128-row tile schedule are those of kernels/fp8_grouped.py, whose
`quant_grouped` and `quant_expert_weights` write these kernels' operands:
- `grouped_gemm(a, a_s, b, b_s, sched)`: c[rows of g] = a[rows of g] · b[g]ᵀ with b[g] scaled per
  128x128 block (forward; dgrad with a K-major copy of each Wᵀ). BLOCK_M divides 128, so the
  autotuner may pick 64- or 128-row tiles on the same schedule.
- `grouped_wgrad(at, at_s, bt, bt_s, sched)`: dw[g] = Σ over g's tiles of at[:, tile] · bt[:, tile]ᵀ,
  both scaled per 1x128 tile along the tokens; an empty group gets exact zeros. The transposed
  operands give each tile its own 128 columns, zero-padded past its group's end, so the wgrad's
  loads along the tokens start 128-aligned (DeepGEMM aligns its groups the same way). Read from
  each group's first row instead, they were unaligned, and the wgrad ran at ~40 TFLOP/s on an H100.
fp32 accumulation with the scales applied per 128-wide K block (DeepSeek-V3 §3.3.2), as in
kernels/fp8_gemm.py.

`GroupedOps` runs one step's grouped operations on either backend: these kernels, or their
reference, a loop over the experts of kernels/fp8_quant.py's and kernels/fp8_gemm.py's PyTorch
references (the CPU path).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from effllm.kernels import fp8_grouped
from effllm.kernels.fp8_gemm import fp8_gemm_ref, hopper_configs
from effllm.kernels.fp8_grouped import Schedule
from effllm.kernels.fp8_quant import FP8, TILE, quant_rows_and_cols_ref
from effllm.kernels.launch import bucket, launch


@triton.jit
def _grouped_gemm_kernel(
    # pointers
    a_ptr, b_ptr, c_ptr, as_ptr, bs_ptr, tile_group_ptr, tile_row_ptr, ends_ptr,
    # sizes
    N, K, N_TILES,
    # strides: a (M, K), b (G, N, K), c (M, N), a_s (M, K/128), b_s (G, ceil(N/128), K/128)
    stride_am, stride_ak, stride_bg, stride_bn, stride_bk, stride_cm, stride_cn,
    stride_asm, stride_ask, stride_bsg, stride_bsn, stride_bsk,
    # meta-parameters
    M_BUCKET, B_K_CONTIGUOUS,  # autotuning keys only
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    TILE_M: tl.constexpr, ACCUMULATE: tl.constexpr,
):
    """One BLOCK_M x BLOCK_N output tile of one group's rows; BLOCK_M divides the 128-row tile.
    With ACCUMULATE the tile is added to what c holds (in fp32, then rounded once)."""
    SUB: tl.constexpr = TILE_M // BLOCK_M
    pid = tl.program_id(0)
    grid_m, grid_n = N_TILES * SUB, tl.cdiv(N, BLOCK_N)
    per_group = GROUP_M * grid_n  # L2 swizzle, as in fp8_gemm: neighbouring row tiles share b's tiles
    first_m = (pid // per_group) * GROUP_M
    group_size = tl.minimum(grid_m - first_m, GROUP_M)
    pid_m = first_m + (pid % per_group) % group_size
    pid_n = (pid % per_group) // group_size
    t = pid_m // SUB
    g = tl.load(tile_group_ptr + t)
    valid = g >= 0
    g = tl.maximum(g, 0)
    row0 = tl.load(tile_row_ptr + t) + (pid_m % SUB) * BLOCK_M
    end = tl.where(valid, tl.load(ends_ptr + g), row0)
    k_blocks = tl.where(row0 < end, tl.cdiv(K, BLOCK_K), 0)  # spare and empty sub-tiles skip the loop
    rm = row0 + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    m_ok, n_ok = rm < end, rn < N
    rm64, rn64, g64 = rm.to(tl.int64), rn.to(tl.int64), g.to(tl.int64)
    a_ptrs = a_ptr + rm64[:, None] * stride_am + rk[None, :] * stride_ak
    b_ptrs = b_ptr + g64 * stride_bg + rn64[None, :] * stride_bn + rk[:, None] * stride_bk  # (BLOCK_K, BLOCK_N)
    bs_ptr += g64 * stride_bsg + (pid_n * BLOCK_N // 128) * stride_bsn  # BLOCK_N divides 128: one block scale
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for kb in range(0, k_blocks):
        a = tl.load(a_ptrs, mask=m_ok[:, None], other=0.0)
        b = tl.load(b_ptrs, mask=n_ok[None, :], other=0.0)
        a_s = tl.load(as_ptr + rm64 * stride_asm + kb * stride_ask, mask=m_ok, other=0.0)
        b_s = tl.load(bs_ptr + kb * stride_bsk)
        acc += tl.dot(a, b) * (a_s[:, None] * b_s)
        a_ptrs += BLOCK_K * stride_ak
        b_ptrs += BLOCK_K * stride_bk
    c_ptrs = c_ptr + rm64[:, None] * stride_cm + rn64[None, :] * stride_cn
    if ACCUMULATE:
        acc += tl.load(c_ptrs, mask=m_ok[:, None] & n_ok[None, :], other=0.0).to(tl.float32)
    tl.store(c_ptrs, acc.to(c_ptr.dtype.element_ty), mask=m_ok[:, None] & n_ok[None, :])


@triton.jit
def _grouped_wgrad_kernel(
    # pointers
    at_ptr, bt_ptr, c_ptr, ats_ptr, bts_ptr, first_ptr, count_ptr,
    # sizes
    N, K,
    # strides: at (N, 128 T), bt (K, 128 T), c (G, N, K), at_s (N, T), bt_s (K, T)
    stride_atn, stride_btk, stride_cg, stride_cn, stride_ck, stride_atsn, stride_btsk,
    # meta-parameters
    M_BUCKET,  # autotuning key only
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, TILE_M: tl.constexpr,
):
    """dw[g] tile (BLOCK_N, BLOCK_K) = Σ over g's 128-token tiles t of at[:, tile t] · bt[:, tile t]ᵀ,
    tile t being columns 128t .. 128t+127 (zero-padded past the group's end by quant_grouped)."""
    g = tl.program_id(0)
    pid = tl.program_id(1)
    pid_n = pid // tl.cdiv(K, BLOCK_K)
    pid_k = pid % tl.cdiv(K, BLOCK_K)
    first = tl.load(first_ptr + g)
    count = tl.load(count_ptr + g)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    n_ok, k_ok = rn < N, rk < K
    rn64, rk64 = rn.to(tl.int64), rk.to(tl.int64)
    rm = first.to(tl.int64) * TILE_M + tl.arange(0, TILE_M)  # 128-aligned: wide loads
    a_ptrs = at_ptr + rn64[:, None] * stride_atn + rm[None, :]
    b_ptrs = bt_ptr + rk64[None, :] * stride_btk + rm[:, None]
    as_ptrs = ats_ptr + rn64 * stride_atsn + first
    bs_ptrs = bts_ptr + rk64 * stride_btsk + first
    acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
    for _ in range(0, count):
        a = tl.load(a_ptrs, mask=n_ok[:, None], other=0.0)
        b = tl.load(b_ptrs, mask=k_ok[None, :], other=0.0)
        a_s = tl.load(as_ptrs, mask=n_ok, other=0.0)
        b_s = tl.load(bs_ptrs, mask=k_ok, other=0.0)
        acc += tl.dot(a, b) * a_s[:, None] * b_s[None, :]
        a_ptrs += TILE_M
        b_ptrs += TILE_M
        as_ptrs += 1
        bs_ptrs += 1
    c_ptrs = c_ptr + g.to(tl.int64) * stride_cg + rn64[:, None] * stride_cn + rk64[None, :] * stride_ck
    tl.store(c_ptrs, acc.to(c_ptr.dtype.element_ty), mask=n_ok[:, None] & k_ok[None, :])


# restore_value: timing a configuration runs the kernel, which with ACCUMULATE adds into c
_grouped_gemm_tuned = triton.autotune(configs=hopper_configs(), key=["M_BUCKET", "N", "K", "B_K_CONTIGUOUS"],
                                      restore_value=["c_ptr"])(_grouped_gemm_kernel)


def _wgrad_configs() -> list:
    """The grouped wgrad's tuning space; no 128x128 tiles with 4 warps (see fp8_gemm.hopper_configs)."""
    return [triton.Config({"BLOCK_N": bn, "BLOCK_K": bk}, num_warps=w, num_stages=s)
            for bn, bk, w in ((128, 128, 8), (64, 128, 4), (128, 64, 4)) for s in (3, 4)]


_grouped_wgrad_tuned = triton.autotune(configs=_wgrad_configs(), key=["M_BUCKET", "N", "K"])(_grouped_wgrad_kernel)


def tuned_configs() -> dict[str, str]:
    """The configurations the autotuner chose so far (for benchmark reports)."""
    return {f"{name} {key}": str(config) for name, tuned in (("gemm", _grouped_gemm_tuned),
                                                               ("wgrad", _grouped_wgrad_tuned))
            for key, config in tuned.cache.items()}


def grouped_gemm(a: torch.Tensor, a_s: torch.Tensor, b: torch.Tensor, b_s: torch.Tensor, sched: Schedule,
                 out_dtype: torch.dtype = torch.bfloat16, accumulate: torch.Tensor | None = None) -> torch.Tensor:
    """c (M, N): c[rows of g] = a[rows of g] · b[g]ᵀ; a (M, K) e4m3 with a_s (M, K/128), b (G, N, K)
    e4m3 with b_s (G, ceil(N/128), K/128). b may be any strided view; K-major runs fastest. With
    `accumulate` (M, N), the product is added into it in place, in its dtype (out_dtype is unused),
    and it is returned: one pass instead of a second output and an add (the dgrad of weights that
    share an input)."""
    M, K = a.shape
    G, N = b.shape[0], b.shape[1]
    if a.dtype != FP8 or b.dtype != FP8:
        raise ValueError(f"grouped_gemm takes e4m3 operands, got {a.dtype} and {b.dtype}")
    if b.dim() != 3 or b.shape[2] != K or K % TILE or M != sched.m or sched.ends.numel() != G:
        raise ValueError(f"grouped_gemm needs a (M, K), b (G, N, K) with K % {TILE} == 0 and a schedule of M rows "
                         f"in G groups; got a {tuple(a.shape)}, b {tuple(b.shape)}, {sched.ends.numel()} groups")
    want_bs = (G, triton.cdiv(N, TILE), K // TILE)
    if a_s.shape != (M, K // TILE) or b_s.shape != want_bs:
        raise ValueError(f"scales must be a_s {(M, K // TILE)} and b_s {want_bs}, got {tuple(a_s.shape)} and "
                         f"{tuple(b_s.shape)}")
    if accumulate is not None and (accumulate.shape != (M, N) or accumulate.stride(1) != 1):
        raise ValueError(f"accumulate must be ({M}, {N}) and contiguous along N, got {tuple(accumulate.shape)}")
    c = accumulate if accumulate is not None else torch.empty((M, N), dtype=out_dtype, device=a.device)
    if M == 0:
        return c
    T = sched.group.numel()
    args = (a, b, c, a_s, b_s, sched.group, sched.row, sched.ends, N, K, T,
            a.stride(0), a.stride(1), b.stride(0), b.stride(1), b.stride(2), c.stride(0), c.stride(1),
            a_s.stride(0), a_s.stride(1), b_s.stride(0), b_s.stride(1), b_s.stride(2), bucket(M), int(b.stride(2) == 1))
    launch(_grouped_gemm_kernel, _grouped_gemm_tuned,
           lambda meta: (T * (TILE // meta["BLOCK_M"]) * triton.cdiv(N, meta["BLOCK_N"]),),  # BLOCK_M-row parts of tiles
           args, fixed=dict(BLOCK_M=128, BLOCK_N=128, GROUP_M=8, num_warps=8, num_stages=3),
           interpreted=dict(BLOCK_M=64, BLOCK_N=64, GROUP_M=2, num_warps=1, num_stages=1),
           BLOCK_K=TILE, TILE_M=TILE, ACCUMULATE=accumulate is not None)
    return c


def grouped_wgrad(at: torch.Tensor, at_s: torch.Tensor, bt: torch.Tensor, bt_s: torch.Tensor, sched: Schedule,
                  out_dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """dw (G, N, K): dw[g] = at[:, rows of g] · bt[:, rows of g]ᵀ, accumulated in fp32 and written in
    `out_dtype`; at (N, 128 T) and bt (K, 128 T) e4m3 in `quant_grouped`'s per-tile layout (tiled
    along each group's tokens), at_s (N, T), bt_s (K, T)."""
    N, K = at.shape[0], bt.shape[0]
    G, T = sched.ends.numel(), sched.group.numel()
    if at.dtype != FP8 or bt.dtype != FP8 or at.dim() != 2 or at.shape[1] != T * TILE or bt.shape[1] != T * TILE:
        raise ValueError(f"grouped_wgrad takes e4m3 at (N, {T * TILE}) and bt (K, {T * TILE}) in quant_grouped's "
                         f"layout of the schedule's {T} tiles; got {at.dtype} {tuple(at.shape)} and {bt.dtype} "
                         f"{tuple(bt.shape)}")
    if at_s.shape != (N, T) or bt_s.shape != (K, T):
        raise ValueError(f"scales must be at_s {(N, T)} and bt_s {(K, T)}, got {tuple(at_s.shape)} and {tuple(bt_s.shape)}")
    if at.stride(1) != 1 or bt.stride(1) != 1:
        raise ValueError("at and bt must be contiguous along the tokens")
    c = torch.empty((G, N, K), dtype=out_dtype, device=at.device)
    args = (at, bt, c, at_s, bt_s, sched.first, sched.count, N, K, at.stride(0), bt.stride(0),
            c.stride(0), c.stride(1), c.stride(2), at_s.stride(0), bt_s.stride(0), bucket(sched.m))
    launch(_grouped_wgrad_kernel, _grouped_wgrad_tuned,
           lambda meta: (G, triton.cdiv(N, meta["BLOCK_N"]) * triton.cdiv(K, meta["BLOCK_K"])),
           args, fixed=dict(BLOCK_N=128, BLOCK_K=128, num_warps=8, num_stages=3),
           interpreted=dict(BLOCK_N=64, BLOCK_K=64, num_warps=1, num_stages=1), TILE_M=TILE)
    return c


class GroupedOps:
    """The grouped FP8 operations of one step over expert-sorted rows, on one backend: "triton" runs
    the kernels of fp8_grouped.py and this file (one launch per quantization or GEMM whatever the
    number of experts, the tile schedule computed on the device, no host sync); "torch" loops over
    the experts with the PyTorch reference ops (the CPU path, and the kernels' reference).

    A quantized operand is what `quant` returns: on "triton" (q, s, qt, st) for all rows, in
    quant_grouped's layout; on "torch" one (q, s, qt, st) per expert (None for an empty one).
    Both are tiled 1x128 along the features (q, s: forward and dgrad) and along each expert's own
    tokens (qt, st: wgrad; a 128-token tile never straddles two experts)."""

    def __init__(self, backend: str, offsets: torch.Tensor, m: int, pow2: bool):
        self.backend, self.m, self.pow2, self.device = backend, m, pow2, offsets.device
        if backend == "triton":
            self.sched = fp8_grouped.schedule(offsets, m)
        else:
            self.bounds = [0] + offsets.tolist()

    def _per_expert(self, rows: torch.Tensor) -> list:
        return [quant_rows_and_cols_ref(rows[lo:hi].contiguous(), self.pow2) if hi > lo else None
                for lo, hi in zip(self.bounds, self.bounds[1:])]

    def quant(self, x: torch.Tensor, src: torch.Tensor | None = None):
        """Rows x[src[i]] (or x[i]), quantized both ways; the gather is fused on "triton"."""
        if self.backend == "triton":
            return fp8_grouped.quant_grouped(x, self.sched, src, self.pow2)
        return self._per_expert(x[src] if src is not None else x)

    def quant_swiglu(self, gate, up, dh=None):
        """silu(gate)·up, or with dh its gradients [along gate | along up], computed in fp32 and
        quantized both ways."""
        if self.backend == "triton":
            return fp8_grouped.quant_swiglu(gate, up, self.sched, self.pow2, dh)
        return self._per_expert(fp8_grouped.swiglu_ref(gate, up, dh))

    @staticmethod
    def for_wgrad(a, lo: int | None = None, hi: int | None = None):
        """The part of a quantized operand that the wgrad reads (the rest need not be kept), of its
        features lo .. hi - 1 (all by default)."""
        if isinstance(a, tuple):
            return (None, None, a[2][lo:hi], a[3][lo:hi])
        return [None if p is None else (None, None, p[2][lo:hi], p[3][lo:hi]) for p in a]

    def gemm(self, a, w, out_dtype: torch.dtype | None, accumulate: torch.Tensor | None = None) -> torch.Tensor:
        """c[rows of g] = a[rows of g] · w[g]ᵀ, w = (q (G, N, K), s (G, N/128, K/128)); with
        `accumulate`, added into it in fp32 and stored in its dtype."""
        q_w, s_w = w
        if self.backend == "triton":
            return grouped_gemm(a[0], a[1], q_w, s_w, self.sched, out_dtype, accumulate=accumulate)
        c = accumulate if accumulate is not None else torch.zeros((self.m, q_w.shape[1]), dtype=out_dtype,
                                                                  device=self.device)
        for g, (p, lo, hi) in enumerate(zip(a, self.bounds, self.bounds[1:])):
            if p is None:
                continue
            part = fp8_gemm_ref(p[0], p[1], q_w[g], s_w[g], torch.float32)
            c[lo:hi] = (part + c[lo:hi].float() if accumulate is not None else part).to(c.dtype)
        return c

    def wgrad(self, at, bt, shape: tuple[int, int, int], out_dtype: torch.dtype) -> torch.Tensor:
        """dw (G, N, K) = per expert, at[rows of g]ᵀ · bt[rows of g] over its tokens (exact zeros for
        an expert without tokens), accumulated in fp32 and stored in `out_dtype`."""
        if self.backend == "triton":
            return grouped_wgrad(at[2], at[3], bt[2], bt[3], self.sched, out_dtype)
        dw = torch.zeros(shape, dtype=out_dtype, device=self.device)
        for g, (a, b) in enumerate(zip(at, bt)):
            if a is not None:
                dw[g] = fp8_gemm_ref(a[2], a[3], b[2], b[3], out_dtype, b_row_scales=True)
        return dw

    def input_grad(self, dx: torch.Tensor, src: torch.Tensor | None, rows: int, out_dtype: torch.dtype):
        """The input's gradient from the sorted rows' (fp32 or out_dtype): with `src`, each source
        row sums its sorted rows (the gather's gradient); on "triton" a gather in a fixed order,
        no atomics, so the same on every run."""
        if src is None:
            return dx.to(out_dtype)
        if self.backend == "triton":
            return fp8_grouped.sum_by_source(dx, src, rows, out_dtype)
        out = torch.zeros((rows, dx.shape[1]), dtype=torch.float32, device=dx.device)
        return out.index_add_(0, src, dx.float()).to(out_dtype)

    def weights(self, ws) -> tuple[tuple, tuple]:
        """(G, N_i, K) expert weights stacked side by side along N, per 128x128 block -> (q (G, ΣN, K),
        s) for the forward and (qᵀ (G, K, ΣN), sᵀ) for the dgrad, each expert's Wᵀ K-major (FP8 MMA
        reads K-major operands), written by the same launch that quantizes W."""
        quant = fp8_grouped.quant_expert_weights if self.backend == "triton" else fp8_grouped.quant_expert_weights_ref
        q, s, qt = quant(ws, self.pow2)
        return (q, s), (qt, s.transpose(1, 2))
