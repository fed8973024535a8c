"""Grouped GEMM over rows sorted by group: the expert matmuls of a dropless MoE layer.

Shape letters: M rows (token-expert pairs, sorted by expert), G groups (experts), K input
features, N output features. `offsets` (G,) int32 holds the cumulative end row of each group, so
group g owns rows offsets[g-1] .. offsets[g]-1; groups may be empty.

    y[rows of g]  = x[rows of g] @ w[g].T       forward        x (M, K), w (G, N, K) -> (M, N)
    dx[rows of g] = dy[rows of g] @ w[g]        input grad     dy (M, N)             -> (M, K)
    dw[g]         = dy[rows of g].T @ x[rows]   weight grad                          -> (G, N, K)

Three implementations of the same three products, chosen by `backend`:
- "torch":  `torch._grouped_mm` (CUDA bf16 on Hopper and newer; CPU in recent PyTorch);
- "triton": the kernels below: one launch for all groups, fp32 accumulation, no host sync (the
            tile schedule is computed on the device);
- "loop":   one matmul per group; the reference the tests hold the others to.
`grouped_mm(x, w, offsets, backend)` is differentiable through all three.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch.utils.flop_counter import register_flop_formula

from effllm.kernels.launch import interpreting

BACKENDS = ("torch", "triton", "loop")
# What the Triton kernels and torch._grouped_mm take: both accumulate in fp32, so fp64 (and any other
# dtype) runs on "loop". The Triton kernels given fp64 used to return wrong values, unchecked.
KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


# ---------------------------------------------------------------------------------------------
# Kernels


@triton.jit
def _grouped_mm_kernel(
    # pointers
    a_ptr, b_ptr, c_ptr, tile_group_ptr, tile_row_ptr, group_end_ptr,
    # sizes
    N, K,
    # strides: a (M, K), b (G, K, N) as a view, c (M, N)
    stride_am, stride_ak, stride_bg, stride_bk, stride_bn, stride_cm, stride_cn,
    # meta-parameters
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, IEEE: tl.constexpr,
):
    """c[rows] = a[rows] @ b[g] for one BLOCK_M x BLOCK_N tile of one group's rows."""
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    g = tl.load(tile_group_ptr + pid_m)
    valid = g >= 0
    g = tl.maximum(g, 0)
    row0 = tl.load(tile_row_ptr + pid_m)
    row_end = tl.where(valid, tl.load(group_end_ptr + g), row0)  # spare tiles mask everything

    rm = row0 + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    m_mask = rm < row_end
    n_mask = rn < N
    a_ptrs = a_ptr + rm[:, None].to(tl.int64) * stride_am + rk[None, :] * stride_ak
    b_ptrs = b_ptr + g.to(tl.int64) * stride_bg + rk[:, None] * stride_bk + rn[None, :] * stride_bn
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k_mask = (k0 + rk) < K
        a = tl.load(a_ptrs, mask=m_mask[:, None] & k_mask[None, :], other=0.0)
        b = tl.load(b_ptrs, mask=k_mask[:, None] & n_mask[None, :], other=0.0)
        if IEEE:
            acc = tl.dot(a, b, acc, input_precision="ieee")
        else:
            acc = tl.dot(a, b, acc)
        a_ptrs += BLOCK_K * stride_ak
        b_ptrs += BLOCK_K * stride_bk
    c_ptrs = c_ptr + rm[:, None].to(tl.int64) * stride_cm + rn[None, :] * stride_cn
    tl.store(c_ptrs, acc.to(c_ptr.dtype.element_ty), mask=m_mask[:, None] & n_mask[None, :])


@triton.jit
def _grouped_wgrad_kernel(
    # pointers
    dy_ptr, x_ptr, dw_ptr, group_end_ptr,
    # sizes
    N, K,
    # strides: dy (M, N), x (M, K), dw (G, N, K)
    stride_dym, stride_dyn, stride_xm, stride_xk, stride_dwg, stride_dwn, stride_dwk,
    # meta-parameters
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, IEEE: tl.constexpr,
):
    """dw[g] tile = dy[rows of g].T @ x[rows of g], summed over the group's rows in BLOCK_M steps."""
    g = tl.program_id(0)
    pid = tl.program_id(1)
    pid_n = pid // tl.cdiv(K, BLOCK_K)
    pid_k = pid % tl.cdiv(K, BLOCK_K)
    start = tl.where(g > 0, tl.load(group_end_ptr + g - 1, mask=g > 0, other=0), 0)
    end = tl.load(group_end_ptr + g)

    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    n_mask = rn < N
    k_mask = rk < K
    acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
    for m0 in range(start, end, BLOCK_M):
        rm = m0 + tl.arange(0, BLOCK_M)
        m_mask = rm < end
        dy = tl.load(dy_ptr + rm[None, :].to(tl.int64) * stride_dym + rn[:, None] * stride_dyn,
                     mask=n_mask[:, None] & m_mask[None, :], other=0.0)  # (BLOCK_N, BLOCK_M)
        x = tl.load(x_ptr + rm[:, None].to(tl.int64) * stride_xm + rk[None, :] * stride_xk,
                    mask=m_mask[:, None] & k_mask[None, :], other=0.0)  # (BLOCK_M, BLOCK_K)
        if IEEE:
            acc = tl.dot(dy, x, acc, input_precision="ieee")
        else:
            acc = tl.dot(dy, x, acc)
    dw_ptrs = dw_ptr + g.to(tl.int64) * stride_dwg + rn[:, None] * stride_dwn + rk[None, :] * stride_dwk
    tl.store(dw_ptrs, acc.to(dw_ptr.dtype.element_ty), mask=n_mask[:, None] & k_mask[None, :])


# ---------------------------------------------------------------------------------------------
# Launchers


def _blocks(dtype: torch.dtype) -> tuple[int, int, int, int, int]:
    """(BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages). Small tiles under the interpreter keep CPU
    tests fast. On an H100 (triton 3.6, M=98304 K=2048 N=1408, 64 equal groups) 64x256x64 tiles,
    8 warps, 3 stages measured best of six configurations: 314 TFLOP/s forward, 201 wgrad (128x128x64:
    310 / 165; 128x256x64 does not fit shared memory). torch._grouped_mm ran 603 / 588 there."""
    if interpreting():
        return 16, 16, 16, 1, 1
    if dtype == torch.float32:
        return 64, 64, 32, 4, 3
    return 64, 256, 64, 8, 3


def _check(x: torch.Tensor, w: torch.Tensor, offsets: torch.Tensor, k_dim: int) -> None:
    if x.dim() != 2 or w.dim() != 3:
        raise ValueError(f"grouped_mm takes x (M, K) and w (G, N, K); got x {tuple(x.shape)}, w {tuple(w.shape)}")
    if offsets.dtype != torch.int32 or offsets.shape != (w.shape[0],):
        raise ValueError(f"offsets must be int32 of shape ({w.shape[0]},), got {offsets.dtype} {tuple(offsets.shape)}")
    if x.shape[1] != w.shape[k_dim]:
        raise ValueError(f"inner sizes differ: x has {x.shape[1]} features, w expects {w.shape[k_dim]}")
    if x.dtype != w.dtype:
        raise ValueError(f"x is {x.dtype} but w is {w.dtype}: cast one")


def check_kernel_dtype(dtype: torch.dtype, backend: str) -> None:
    if dtype not in KERNEL_DTYPES:
        raise ValueError(f"the {backend!r} grouped GEMM takes fp32, bf16 or fp16 (it accumulates in fp32), got {dtype}: "
                         "use backend 'loop' (or 'auto', which picks it) for other dtypes")


def group_tiles(offsets: torch.Tensor, m: int, block_m: int):
    """Row tiles of BLOCK_M that never straddle two groups, for an upper bound of cdiv(M, BLOCK_M) + G
    tiles: each tile's group (-1 = spare) and first row, and each group's tile count and first tile.
    Computed with device ops from `offsets`, so launching needs no host synchronisation."""
    ends = offsets.long()
    counts = torch.diff(ends, prepend=ends.new_zeros(1))
    tiles = (counts + block_m - 1) // block_m  # (G,)
    tile_end = torch.cumsum(tiles, 0)
    n_tiles = triton.cdiv(m, block_m) + offsets.numel()
    t = torch.arange(n_tiles, device=offsets.device)
    g = torch.searchsorted(tile_end, t, right=True)  # (n_tiles,); G past the last real tile
    valid = g < offsets.numel()
    gc = g.clamp(max=offsets.numel() - 1)
    row = (ends[gc] - counts[gc]) + (t - (tile_end[gc] - tiles[gc])) * block_m
    return (torch.where(valid, gc, -1).to(torch.int32), row.to(torch.int32), tiles.to(torch.int32),
            (tile_end - tiles).to(torch.int32))


def tile_schedule(offsets: torch.Tensor, m: int, block_m: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Each row tile's group (-1 = spare) and first row (`group_tiles`' first two)."""
    return group_tiles(offsets, m, block_m)[:2]


def triton_grouped_mm(x: torch.Tensor, w: torch.Tensor, offsets: torch.Tensor, trans_w: bool = True) -> torch.Tensor:
    """x (M, K) times w[g].T (trans_w, w (G, N, K)) or w[g] (not trans_w, w (G, K, N)), per group."""
    _check(x, w, offsets, 2 if trans_w else 1)
    check_kernel_dtype(x.dtype, "triton")
    m, k = x.shape
    n = w.shape[1] if trans_w else w.shape[2]
    out = torch.empty((m, n), dtype=x.dtype, device=x.device)
    if m == 0 or n == 0:
        return out
    # b[g] as a (K, N) view of w[g]
    stride_bk, stride_bn = (w.stride(2), w.stride(1)) if trans_w else (w.stride(1), w.stride(2))
    bm, bn, bk, warps, stages = _blocks(x.dtype)
    tile_group, tile_row = tile_schedule(offsets, m, bm)
    grid = (tile_group.numel(), triton.cdiv(n, bn))
    _grouped_mm_kernel[grid](
        x, w, out, tile_group, tile_row, offsets,
        n, k,
        x.stride(0), x.stride(1), w.stride(0), stride_bk, stride_bn, out.stride(0), out.stride(1),
        BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, IEEE=x.dtype == torch.float32, num_warps=warps, num_stages=stages,
    )
    return out


def triton_grouped_wgrad(dy: torch.Tensor, x: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """dw (G, N, K) with dw[g] = dy[rows of g].T @ x[rows of g]; empty groups give zeros."""
    if dy.dim() != 2 or x.dim() != 2 or dy.shape[0] != x.shape[0]:
        raise ValueError(f"wgrad takes dy (M, N) and x (M, K); got {tuple(dy.shape)} and {tuple(x.shape)}")
    if dy.dtype != x.dtype:
        raise ValueError(f"dy is {dy.dtype} but x is {x.dtype}: cast one")
    check_kernel_dtype(x.dtype, "triton")
    (n, k), g = (dy.shape[1], x.shape[1]), offsets.numel()
    dw = torch.empty((g, n, k), dtype=x.dtype, device=x.device)
    bm, bn, bk, warps, stages = _blocks(x.dtype)
    grid = (g, triton.cdiv(n, bn) * triton.cdiv(k, bk))
    _grouped_wgrad_kernel[grid](
        dy, x, dw, offsets,
        n, k,
        dy.stride(0), dy.stride(1), x.stride(0), x.stride(1), dw.stride(0), dw.stride(1), dw.stride(2),
        BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, IEEE=x.dtype == torch.float32, num_warps=warps, num_stages=stages,
    )
    return dw


# ---------------------------------------------------------------------------------------------
# The other two backends, and the reference


def _bounds(offsets: torch.Tensor) -> list[int]:
    return [0] + offsets.tolist()


def loop_grouped_mm(x: torch.Tensor, w: torch.Tensor, offsets: torch.Tensor, trans_w: bool = True) -> torch.Tensor:
    """One matmul per group (the reference; syncs with the host to read `offsets`)."""
    b = _bounds(offsets)
    n = w.shape[1] if trans_w else w.shape[2]
    out = x.new_empty((x.shape[0], n))
    for g in range(w.shape[0]):
        wg = w[g].t() if trans_w else w[g]
        out[b[g] : b[g + 1]] = x[b[g] : b[g + 1]] @ wg
    return out


def loop_grouped_wgrad(dy: torch.Tensor, x: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    b = _bounds(offsets)
    return torch.stack([dy[b[g] : b[g + 1]].t() @ x[b[g] : b[g + 1]] for g in range(offsets.numel())])


def torch_fits(dtype: torch.dtype, *features: int) -> bool:
    """torch._grouped_mm needs every row stride to be a multiple of 16 bytes."""
    size = torch.empty((), dtype=dtype).element_size()
    return all(f * size % 16 == 0 for f in features)


def torch_grouped_mm(x: torch.Tensor, w: torch.Tensor, offsets: torch.Tensor, trans_w: bool = True) -> torch.Tensor:
    return torch._grouped_mm(x, w.transpose(-2, -1) if trans_w else w, offs=offsets)


def torch_grouped_wgrad(dy: torch.Tensor, x: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    return torch._grouped_mm(dy.t(), x, offs=offsets)


_IMPLS = {
    "torch": (torch_grouped_mm, torch_grouped_wgrad),
    "triton": (triton_grouped_mm, triton_grouped_wgrad),
    "loop": (loop_grouped_mm, loop_grouped_wgrad),
}


# The three products as custom operators (torch.library): torch.compile, fullgraph included, sees
# each as one opaque call of known output shape, so the loop's host read of the offsets and the
# Triton launches stay out of the traced graph, and one compiled graph serves any routing. The ops
# live in the "effllm" namespace; defining them changes nothing of torch's own.


@torch.library.custom_op("effllm::grouped_mm", mutates_args=())
def _grouped_mm_op(x: torch.Tensor, w: torch.Tensor, offsets: torch.Tensor, backend: str,
                   trans_w: bool) -> torch.Tensor:
    return _IMPLS[backend][0](x, w, offsets, trans_w)


@_grouped_mm_op.register_fake
def _(x, w, offsets, backend, trans_w):
    return x.new_empty((x.shape[0], w.shape[1] if trans_w else w.shape[2]))


@torch.library.custom_op("effllm::grouped_wgrad", mutates_args=())
def _grouped_wgrad_op(dy: torch.Tensor, x: torch.Tensor, offsets: torch.Tensor, backend: str) -> torch.Tensor:
    return _IMPLS[backend][1](dy, x, offsets)


@_grouped_wgrad_op.register_fake
def _(dy, x, offsets, backend):
    return dy.new_empty((offsets.shape[0], dy.shape[1], x.shape[1]))


def _setup_context(ctx, inputs, output) -> None:
    x, w, offsets, backend, _ = inputs
    ctx.save_for_backward(x, w, offsets)
    ctx.backend = backend


def _backward(ctx, dy: torch.Tensor):
    """y = x @ w[g].T per group: the input and weight gradients from the same backend."""
    x, w, offsets = ctx.saved_tensors
    dy = dy.contiguous()
    dx = _grouped_mm_op(dy, w, offsets, ctx.backend, False) if ctx.needs_input_grad[0] else None
    dw = _grouped_wgrad_op(dy, x, offsets, ctx.backend) if ctx.needs_input_grad[1] else None
    return dx, dw, None, None, None


_grouped_mm_op.register_autograd(_backward, setup_context=_setup_context)


# Their FLOPs, for torch.utils.flop_counter (which counts nothing inside a custom operator): every
# row meets every feature of its own group's matrix, whichever backend runs it.
@register_flop_formula(torch.ops.effllm.grouped_mm)
def _grouped_mm_flops(x_shape, w_shape, offsets_shape, backend, trans_w, *, out_shape, **kwargs) -> int:
    return 2 * x_shape[0] * x_shape[1] * out_shape[1]


@register_flop_formula(torch.ops.effllm.grouped_wgrad)
def _grouped_wgrad_flops(dy_shape, x_shape, offsets_shape, backend, *, out_shape, **kwargs) -> int:
    return 2 * dy_shape[0] * dy_shape[1] * x_shape[1]


def grouped_mm(x: torch.Tensor, w: torch.Tensor, offsets: torch.Tensor, backend: str = "loop") -> torch.Tensor:
    """x (M, K) rows sorted by group, w (G, N, K), offsets (G,) int32 cumulative ends -> (M, N)."""
    if backend not in _IMPLS:
        raise ValueError(f"unknown grouped GEMM backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    _check(x, w, offsets, 2)
    if backend in ("torch", "triton"):
        check_kernel_dtype(x.dtype, backend)
    if backend == "torch" and not torch_fits(x.dtype, *w.shape[1:]):
        raise ValueError(f"torch._grouped_mm needs feature sizes whose rows are multiples of 16 bytes; got "
                         f"{tuple(w.shape[1:])} in {x.dtype}: use backend 'triton' or 'loop', or pad the sizes")
    return _grouped_mm_op(x, w, offsets, backend, True)


def grouped_mm_reference(x: torch.Tensor, w: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """Plain PyTorch, differentiable by autograd itself: what every backend must equal."""
    b = _bounds(offsets)
    return torch.cat([x[b[g] : b[g + 1]] @ w[g].t() for g in range(w.shape[0])], dim=0)
