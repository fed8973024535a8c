"""Grouped FP8 quantization for MoE experts: one launch for all experts, no host sync.

Shape letters: M rows (token-expert pairs, sorted by expert), G groups (experts), K input
features, N output features; `offsets` (G,) int32 holds each group's cumulative end row (as in
kernels/grouped_gemm.py), groups may be empty or ragged.

The rows are cut into 128-row tiles that never straddle two groups (`schedule`, computed on the
device). That one schedule serves these kernels and the grouped GEMMs of kernels/fp8_grouped_gemm.py:
- `quant_grouped(x, sched, src)`: each tile read once, quantized two ways: 1x128 along K (the
  forward and dgrad operand) and 128x1 along the tile's rows, stored transposed (the wgrad
  operand, tiled along each group's own tokens). With `src`, row i reads x[src[i]]: the MoE
  dispatch gather fused into the quantization, so the sorted high-precision copy is never written.
  `quant_swiglu(gate, up, sched)` quantizes h = silu(gate)·up the same way, computed in fp32 in
  the same pass; given dh, it quantizes h's gradients along gate and along up, side by side. The
  SwiGLU and its gradients are then never stored in high precision.
- `quant_expert_weights(ws)`: expert weights per 128x128 block, stacked side by side along N
  (gate and up: one GEMM each way instead of two), with each expert's Wᵀ K-major for the dgrad.
- `sum_by_source(dx, src, rows)`: the fused gather's gradient, each source row the fp32 sum of its
  sorted rows, gathered in a fixed order (no atomics, so the same on every run).
Their reference is the per-expert loop over kernels/fp8_quant.py's references in
`fp8_grouped_gemm.GroupedOps`, and `quant_expert_weights_ref` and `swiglu_ref` here.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl

from effllm.kernels.fp8_quant import (
    FP8,
    TILE,
    check_float,
    hw_cast,
    quant_blocks_into,
    quant_blocks_ref,
    quant_tile,
    scale_of,
)
from effllm.kernels.grouped_gemm import group_tiles
from effllm.kernels.launch import interpreting


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
    s_row = scale_of(tl.max(ax, axis=1), POW2)  # (TILE_M,)
    s_col = scale_of(tl.max(ax, axis=0), POW2)  # (TILE_K,)
    q = quant_tile(x, s_row[:, None], HW_CAST)
    qt = quant_tile(x, s_col[None, :], HW_CAST)
    tl.store(q_ptr + rows64[:, None] * stride_qm + cols64[None, :], q.to(q_ptr.dtype.element_ty), mask=row_ok[:, None])
    tl.store(s_ptr + rows64 * stride_sm + pid_k, s_row, mask=row_ok)
    # tile t owns columns 128t .. 128t+127 of qt, rows past the group's end written as zeros: the
    # wgrad reads whole aligned tiles (vector loads, no masks). A register transpose first, so the
    # store is coalesced along qt's rows.
    tcols = t.to(tl.int64) * TILE_M + tl.arange(0, TILE_M)
    tl.store(qt_ptr + cols64[:, None] * stride_qtk + tcols[None, :], tl.trans(qt).to(qt_ptr.dtype.element_ty))
    tl.store(st_ptr + cols64 * stride_stk + t, s_col, mask=(cols < K) & (g + tl.zeros_like(cols) >= 0))


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
            GATHER=src is not None, ACT=act, TILE_M=TILE, TILE_K=TILE, POW2=pow2, HW_CAST=hw_cast(x.device),
            num_warps=1 if interpreting() else 8)
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
                                                           BLOCK_D=block_d, num_warps=1 if interpreting() else 4)
    return out
