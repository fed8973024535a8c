"""Grouped block-scaled FP8 GEMMs for MoE experts: one launch for all experts, no host sync.

Shape letters: M rows (token-expert pairs, sorted by expert), G groups (experts), K input
features, N output features; `offsets` (G,) int32 holds each group's cumulative end row (as in
kernels/grouped_gemm.py), groups may be empty or ragged.

The rows are cut into 128-row tiles that never straddle two groups (`schedule`, computed on the
device). That one schedule serves these kernels:
- `quant_grouped(x, sched, src)`: each tile read once, quantized two ways: 1x128 along K (the
  forward and dgrad operand) and 128x1 along the tile's rows, stored transposed (the wgrad
  operand, tiled along each group's own tokens). With `src`, row i reads x[src[i]]: the MoE
  dispatch gather fused into the quantization, so the sorted high-precision copy is never written.
  `quant_swiglu(gate, up, sched)` quantizes h = silu(gate)·up the same way, computed in fp32 in
  the same pass; given dh, it quantizes h's gradients along gate and along up, side by side. The
  SwiGLU and its gradients are then never stored in high precision.
- `quant_expert_weights(ws)`: expert weights per 128x128 block, stacked side by side along N
  (gate and up: one GEMM each way instead of two), with each expert's Wᵀ K-major for the dgrad.
- `grouped_gemm(a, a_s, b, b_s, sched)`: c[rows of g] = a[rows of g] · b[g]ᵀ with b[g] scaled per
  128x128 block (forward; dgrad with a K-major copy of each Wᵀ). BLOCK_M divides 128, so the
  autotuner may pick 64- or 128-row tiles on the same schedule.
- `grouped_wgrad(at, at_s, bt, bt_s, sched)`: dw[g] = Σ over g's tiles of at[:, tile] · bt[:, tile]ᵀ,
  both scaled per 1x128 tile along the tokens; an empty group gets exact zeros. The transposed
  operands give each tile its own 128 columns, zero-padded past its group's end, so the wgrad's
  loads along the tokens start 128-aligned (DeepGEMM aligns its groups the same way). Read from
  each group's first row instead, they were unaligned, and the wgrad ran at ~40 TFLOP/s on an H100.
- `sum_by_source(dx, src, rows)`: the fused gather's gradient, each source row the fp32 sum of its
  sorted rows, gathered in a fixed order (no atomics, so the same on every run).
fp32 accumulation with the scales applied per 128-wide K block (DeepSeek-V3 §3.3.2), as in
kernels/fp8_gemm.py. The per-group loop over fp8_gemm_ref in effllm/fp8.py is their reference.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl
from effllm.kernels.fp8_gemm import _bucket, _fixed_config, _hopper_configs, _interpreting
from effllm.kernels.fp8_quant import (
    FP8,
    TILE,
    _hw_cast,
    _quant,
    _scale_of,
    check_float,
    quant_blocks_into,
    quant_blocks_ref,
)
from effllm.kernels.grouped_gemm import group_tiles


class Schedule(NamedTuple):
    """128-row tiles of expert-sorted rows: tile t covers rows row[t] .. min(row[t]+128, end of
    group[t]) - 1 of group group[t] (-1 for the spare tiles at the end); group g's tiles are
    first[g] .. first[g] + count[g] - 1."""

    group: torch.Tensor  # (T,) int32
    row: torch.Tensor  # (T,) int32
    first: torch.Tensor  # (G,) int32
    count: torch.Tensor  # (G,) int32
    ends: torch.Tensor  # (G,) int32, the offsets
    m: int


def schedule(offsets: torch.Tensor, m: int) -> Schedule:
    """The tile schedule of `m` rows split by `offsets`, from device ops only. T = cdiv(m, 128) + G
    bounds the tile count whatever the split, so launch grids never wait for the device."""
    if offsets.dtype != torch.int32 or offsets.dim() != 1:
        raise ValueError(f"offsets must be a 1-D int32 tensor, got {offsets.dtype} {tuple(offsets.shape)}")
    group, row, count, first = group_tiles(offsets, m, TILE)
    return Schedule(group, row, first, count, offsets, m)


# ---------------------------------------------------------------------------------------------
# Kernels


# What the grouped quantization quantizes: x itself, or a SwiGLU term computed from x = gate, u = up
# and d = the gradient of the product, in fp32 (the bf16 product and its gradients are never stored):
# the product, or its gradients along gate and along up side by side
ACT_NONE, ACT_SWIGLU, ACT_SWIGLU_GRAD = 0, 1, 2


@triton.jit
def _quant_grouped_kernel(
    # pointers
    x_ptr, u_ptr, d_ptr, src_ptr, q_ptr, s_ptr, qt_ptr, st_ptr, tile_group_ptr, tile_row_ptr, ends_ptr,
    # sizes: K the output's width; the input's is IN_TILES 128-wide tiles (K, or K / 2 for ACT 2)
    K, IN_TILES,
    # strides (u shares x's)
    stride_xm, stride_dm, stride_qm, stride_sm, stride_qtk, stride_stk,
    # meta-parameters
    GATHER: tl.constexpr, ACT: tl.constexpr, TILE_M: tl.constexpr, TILE_K: tl.constexpr, POW2: tl.constexpr,
    HW_CAST: tl.constexpr,
):
    """One 128-row tile of one group x one 128-wide K tile: row scales (1x128 along K) and column
    scales (over the tile's rows), the column-quantized tile stored transposed. ACT picks the value:
    x; silu(x)·u; or, with the output twice the input's width, d·u·silu'(x) (the product's gradient
    along the gate) in the first half and d·silu(x) (along up) in the second."""
    t, pid_k = tl.program_id(0), tl.program_id(1)
    g = tl.load(tile_group_ptr + t)
    row0 = tl.load(tile_row_ptr + t)
    end = tl.where(g >= 0, tl.load(ends_ptr + tl.maximum(g, 0)), row0)  # a spare tile has no rows
    rows = row0 + tl.arange(0, TILE_M)
    cols = pid_k * TILE_K + tl.arange(0, TILE_K)  # of the output
    row_ok = rows < end
    rows64, cols64 = rows.to(tl.int64), cols.to(tl.int64)
    if GATHER:  # the dispatch permutation: sorted row i reads x[src[i]]
        src = tl.load(src_ptr + rows64, mask=row_ok, other=0).to(tl.int64)
    else:
        src = rows64
    in_cols = ((pid_k % IN_TILES) * TILE_K + tl.arange(0, TILE_K)).to(tl.int64)
    offs = src[:, None] * stride_xm + in_cols[None, :]
    x = tl.load(x_ptr + offs, mask=row_ok[:, None], other=0.0).to(tl.float32)
    if ACT != 0:
        sig = tl.sigmoid(x)
        if ACT == 1:  # h = silu(gate) * up
            x = x * sig * tl.load(u_ptr + offs, mask=row_ok[:, None], other=0.0).to(tl.float32)
        else:
            d = tl.load(d_ptr + src[:, None] * stride_dm + in_cols[None, :], mask=row_ok[:, None], other=0.0)
            d = d.to(tl.float32)
            if pid_k < IN_TILES:  # dh * up * silu'(gate), silu'(g) = sig(g) (1 + g (1 - sig(g)))
                u = tl.load(u_ptr + offs, mask=row_ok[:, None], other=0.0).to(tl.float32)
                x = d * u * sig * (1.0 + x * (1.0 - sig))
            else:  # dh * silu(gate)
                x = d * (x * sig)
    ax = tl.abs(x)
    s_row = _scale_of(tl.max(ax, axis=1), POW2)  # (TILE_M,)
    s_col = _scale_of(tl.max(ax, axis=0), POW2)  # (TILE_K,)
    q = _quant(x, s_row[:, None], HW_CAST)
    qt = _quant(x, s_col[None, :], HW_CAST)
    tl.store(q_ptr + rows64[:, None] * stride_qm + cols64[None, :], q.to(q_ptr.dtype.element_ty), mask=row_ok[:, None])
    tl.store(s_ptr + rows64 * stride_sm + pid_k, s_row, mask=row_ok)
    # tile t owns columns 128t .. 128t+127 of qt, rows past the group's end written as zeros: the
    # wgrad reads whole aligned tiles (vector loads, no masks). A register transpose first, so the
    # store is coalesced along qt's rows.
    tcols = t.to(tl.int64) * TILE_M + tl.arange(0, TILE_M)
    tl.store(qt_ptr + cols64[:, None] * stride_qtk + tcols[None, :], tl.trans(qt).to(qt_ptr.dtype.element_ty))
    tl.store(st_ptr + cols64 * stride_stk + t, s_col, mask=(cols < K) & (g + tl.zeros_like(cols) >= 0))


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


@triton.jit
def _sum_by_source_kernel(
    # pointers
    dx_ptr, order_ptr, bounds_ptr, out_ptr,
    # sizes
    D,
    # strides
    stride_dx, stride_out,
    # meta-parameters
    BLOCK_D: tl.constexpr,
):
    """One source row r x BLOCK_D columns: the fp32 sum of dx's rows order[bounds[r]] ..
    order[bounds[r+1] - 1] (the sorted rows gathered from r), in that fixed order."""
    r, pid_d = tl.program_id(0), tl.program_id(1)
    cols = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    mask = cols < D
    lo = tl.load(bounds_ptr + r)
    hi = tl.load(bounds_ptr + r + 1)
    acc = tl.zeros((BLOCK_D,), dtype=tl.float32)
    for j in range(lo, hi):
        row = tl.load(order_ptr + j).to(tl.int64)
        acc += tl.load(dx_ptr + row * stride_dx + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + r.to(tl.int64) * stride_out + cols, acc.to(out_ptr.dtype.element_ty), mask=mask)


# restore_value: timing a configuration runs the kernel, which with ACCUMULATE adds into c
_grouped_gemm_tuned = triton.autotune(configs=_hopper_configs(), key=["M_BUCKET", "N", "K", "B_K_CONTIGUOUS"],
                                      restore_value=["c_ptr"])(_grouped_gemm_kernel)


def _wgrad_configs() -> list:
    """The grouped wgrad's tuning space; no 128x128 tiles with 4 warps (see fp8_gemm._hopper_configs)."""
    return [triton.Config({"BLOCK_N": bn, "BLOCK_K": bk}, num_warps=w, num_stages=s)
            for bn, bk, w in ((128, 128, 8), (64, 128, 4), (128, 64, 4)) for s in (3, 4)]


_grouped_wgrad_tuned = triton.autotune(configs=_wgrad_configs(), key=["M_BUCKET", "N", "K"])(_grouped_wgrad_kernel)


def tuned_configs() -> dict[str, str]:
    """The configurations the autotuner chose so far (for benchmark reports)."""
    return {f"{name} {key}": str(config) for name, tuned in (("gemm", _grouped_gemm_tuned),
                                                               ("wgrad", _grouped_wgrad_tuned))
            for key, config in tuned.cache.items()}


# ---------------------------------------------------------------------------------------------
# Launchers


def quant_grouped(x: torch.Tensor, sched: Schedule, src: torch.Tensor | None = None, pow2: bool = False):
    """x (R, K) high precision, K % 128 == 0; rows x[src[i]] (or x[i]) in group order ->
    q (M, K) e4m3, s (M, K/128) tiled along K, and qt (K, 128 T), st (K, T) tiled along each
    group's 128-token tiles: tile t of the schedule owns columns 128t .. 128t+127 of qt (zeros past
    its group's end) and column t of st."""
    check_float(x, "x")
    if x.dim() != 2 or x.shape[1] % TILE:
        raise ValueError(f"x must be (rows, K) with K a multiple of {TILE}, got {tuple(x.shape)}")
    if x.stride(1) != 1:
        raise ValueError("x must be contiguous along its last dim")
    if src is not None and (src.dim() != 1 or src.numel() != sched.m):
        raise ValueError(f"src must hold one source row per sorted row ({sched.m}), got {tuple(src.shape)}")
    if src is None and x.shape[0] != sched.m:
        raise ValueError(f"x has {x.shape[0]} rows but the schedule covers {sched.m}")
    return _quant_grouped(x, None, None, src, sched, ACT_NONE, pow2)


def quant_swiglu(gate: torch.Tensor, up: torch.Tensor, sched: Schedule, pow2: bool = False,
                 dh: torch.Tensor | None = None):
    """`quant_grouped` of a SwiGLU term computed in fp32 in the same pass, so it is never stored in
    high precision. gate, up (M, F) in group order (views of one (M, 2F) tensor will do). Without
    dh: h = silu(gate)·up (M, F), the input of the down projection. With dh, h's gradients side by
    side (M, 2F): along the gate, dh·up·silu'(gate), then along up, dh·silu(gate); the operand of
    one dgrad GEMM against the stacked gate and up weights. `swiglu_ref` is the reference."""
    parts = [gate, up] + ([dh] if dh is not None else [])
    for name, part in zip(("gate", "up", "dh"), parts):
        check_float(part, name)
    if any(p.shape != gate.shape for p in parts) or gate.dim() != 2 or up.stride() != gate.stride():
        raise ValueError(f"gate, up and dh must be (M, F), gate and up of one layout (views of one (M, 2F) "
                         f"tensor will do); got {[(tuple(p.shape), p.stride()) for p in parts]}")
    if dh is not None and dh.stride(1) != 1:
        raise ValueError("dh must be contiguous along its last dim")
    if gate.shape[1] % TILE or gate.stride(1) != 1 or gate.shape[0] != sched.m:
        raise ValueError(f"gate must be ({sched.m}, F) with F a multiple of {TILE}, contiguous along F; "
                         f"got {tuple(gate.shape)}")
    return _quant_grouped(gate, up, dh, None, sched, ACT_SWIGLU if dh is None else ACT_SWIGLU_GRAD, pow2)


def swiglu_ref(gate: torch.Tensor, up: torch.Tensor, dh: torch.Tensor | None = None) -> torch.Tensor:
    """quant_swiglu's value in fp32 PyTorch ops: silu(gate)·up, or [its gradient along gate | along up]."""
    g = gate.float()
    sig = torch.sigmoid(g)
    if dh is None:
        return g * sig * up.float()
    return torch.cat([dh.float() * up.float() * sig * (1.0 + g * (1.0 - sig)), dh.float() * (g * sig)], dim=1)


def _quant_grouped(x, u, d, src, sched: Schedule, act: int, pow2: bool):
    M, K = sched.m, x.shape[1] * (2 if act == ACT_SWIGLU_GRAD else 1)
    T = sched.group.numel()
    q = torch.empty((M, K), dtype=FP8, device=x.device)
    s = torch.empty((M, K // TILE), dtype=torch.float32, device=x.device)
    qt = torch.empty((K, T * TILE), dtype=FP8, device=x.device)  # every column written
    st = torch.zeros((K, T), dtype=torch.float32, device=x.device)  # spare tiles' columns stay 0, never read
    if M:
        _quant_grouped_kernel[(T, K // TILE)](
            x, u if u is not None else x, d if d is not None else x, src if src is not None else x, q, s, qt, st,
            sched.group, sched.row, sched.ends, K, x.shape[1] // TILE,
            x.stride(0), d.stride(0) if d is not None else 0, q.stride(0), s.stride(0), qt.stride(0), st.stride(0),
            GATHER=src is not None, ACT=act, TILE_M=TILE, TILE_K=TILE, POW2=pow2, HW_CAST=_hw_cast(x.device),
            num_warps=1 if _interpreting() else 8)
    return q, s, qt, st


def quant_expert_weights(ws, pow2: bool = False):
    """Expert weights (G, N_i, K) stacked side by side along N, each per 128x128 block (N_i and K
    multiples of 128, so no block straddles two weights or experts): q (G, ΣN, K), s (G, ΣN/128,
    K/128), and the dgrad operand qt (G, K, ΣN), each expert's stacked Wᵀ K-major, written by the
    launch that quantizes each weight (one launch per weight, none copied). Stacked gate and up projections
    make one forward GEMM and one dgrad GEMM of twice the width, instead of two each and a sum."""
    for w in ws:
        check_float(w, "expert weight")
    G, K = ws[0].shape[0], ws[0].shape[2]
    if any(w.dim() != 3 or w.shape[0] != G or w.shape[2] != K or w.shape[1] % TILE for w in ws) or K % TILE:
        raise ValueError(f"expert weights must be (G, N, K) of one G and K, N and K multiples of {TILE}; got "
                         f"{[tuple(w.shape) for w in ws]}")
    N = sum(w.shape[1] for w in ws)
    q = torch.empty((G, N, K), dtype=FP8, device=ws[0].device)
    s = torch.empty((G, N // TILE, K // TILE), dtype=torch.float32, device=ws[0].device)
    qt = torch.empty((G, K, N), dtype=FP8, device=ws[0].device)
    lo = 0
    for w in ws:
        hi = lo + w.shape[1]
        quant_blocks_into(w, q[:, lo:hi], s[:, lo // TILE:hi // TILE], qt[:, :, lo:hi], pow2)
        lo = hi
    return q, s, qt


def quant_expert_weights_ref(ws, pow2: bool = False):
    """quant_expert_weights in PyTorch ops (quant_blocks_ref per weight)."""
    parts = [quant_blocks_ref(w.reshape(-1, w.shape[2]), pow2) for w in ws]
    G, K = ws[0].shape[0], ws[0].shape[2]
    q = torch.cat([p[0].view(G, -1, K) for p in parts], dim=1)
    s = torch.cat([p[1].view(G, -1, K // TILE) for p in parts], dim=1)
    return q, s, q.transpose(1, 2).contiguous()


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
            a_s.stride(0), a_s.stride(1), b_s.stride(0), b_s.stride(1), b_s.stride(2), _bucket(M), int(b.stride(2) == 1))
    if _fixed_config():  # the GPU tests
        grid = (T * triton.cdiv(N, 128),)
        _grouped_gemm_kernel[grid](*args, BLOCK_M=128, BLOCK_N=128, BLOCK_K=TILE, GROUP_M=8, TILE_M=TILE,
                                   ACCUMULATE=accumulate is not None, num_warps=8, num_stages=3)
    elif _interpreting():  # the CPU tests: fewer, larger programs (the interpreter's cost is per program and op)
        grid = (T * (TILE // 64) * triton.cdiv(N, 64),)  # 64-row sub-tiles of each 128-row tile, two per 128 columns
        _grouped_gemm_kernel[grid](*args, BLOCK_M=64, BLOCK_N=64, BLOCK_K=TILE, GROUP_M=2, TILE_M=TILE,
                                   ACCUMULATE=accumulate is not None, num_warps=1, num_stages=1)
    else:
        grid = lambda meta: (T * (TILE // meta["BLOCK_M"]) * triton.cdiv(N, meta["BLOCK_N"]),)  # noqa: E731
        _grouped_gemm_tuned[grid](*args, BLOCK_K=TILE, TILE_M=TILE, ACCUMULATE=accumulate is not None)
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
            c.stride(0), c.stride(1), c.stride(2), at_s.stride(0), bt_s.stride(0), _bucket(sched.m))
    if _fixed_config():  # the GPU tests
        _grouped_wgrad_kernel[(G, triton.cdiv(N, 128) * triton.cdiv(K, 128))](*args, BLOCK_N=128, BLOCK_K=128,
                                                                              TILE_M=TILE, num_warps=8, num_stages=3)
    elif _interpreting():
        _grouped_wgrad_kernel[(G, triton.cdiv(N, 64) * triton.cdiv(K, 64))](*args, BLOCK_N=64, BLOCK_K=64, TILE_M=TILE,
                                                                            num_warps=1, num_stages=1)
    else:
        grid = lambda meta: (G, triton.cdiv(N, meta["BLOCK_N"]) * triton.cdiv(K, meta["BLOCK_K"]))  # noqa: E731
        _grouped_wgrad_tuned[grid](*args, TILE_M=TILE)
    return c


def sum_by_source(dx: torch.Tensor, src: torch.Tensor, rows: int, out_dtype: torch.dtype) -> torch.Tensor:
    """The fused dispatch gather's gradient: out (rows, D) in `out_dtype`, out[r] the fp32 sum of the
    rows dx[i] with src[i] == r (zeros where none), taken in increasing i. Each source row gathers
    its own sorted rows, so there are no atomics: the result is the same on every run, unlike an
    index_add on a GPU, and the fp32 (rows, D) buffer and its cast are never written. The grouping
    is a stable sort of src and a binary search: no host sync."""
    if dx.dim() != 2 or src.dim() != 1 or src.numel() != dx.shape[0]:
        raise ValueError(f"sum_by_source takes dx (M, D) and src (M,), got {tuple(dx.shape)} and {tuple(src.shape)}")
    if not dx.is_floating_point() or dx.element_size() == 1 or not (out_dtype.is_floating_point and out_dtype.itemsize > 1):
        raise ValueError(f"sum_by_source sums floating-point rows into a floating-point output, got {dx.dtype} -> "
                         f"{out_dtype}")
    if dx.stride(1) != 1:
        raise ValueError("dx must be contiguous along its last dim")
    D = dx.shape[1]
    out = torch.empty((rows, D), dtype=out_dtype, device=dx.device)
    if rows == 0 or D == 0:
        return out
    sorted_src, order = torch.sort(src, stable=True)
    bounds = torch.searchsorted(sorted_src, torch.arange(rows + 1, device=src.device, dtype=sorted_src.dtype))
    block_d = min(1024, triton.next_power_of_2(D))
    _sum_by_source_kernel[(rows, triton.cdiv(D, block_d))](dx, order, bounds, out, D, dx.stride(0), out.stride(0),
                                                           BLOCK_D=block_d, num_warps=1 if _interpreting() else 4)
    return out
