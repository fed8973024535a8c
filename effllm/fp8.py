"""FP8 linears with DeepSeek-V3's fine-grained scaling (technical report §3.3).

`FP8Linear` keeps a high-precision master weight. Each forward quantizes the input per 1x128
tile and the weight per 128x128 block to E4M3 and runs the block-scaled FP8 GEMM. The backward
pass quantizes the output gradient both ways in one pass (1x128 along features for dgrad,
along tokens for wgrad) and runs both gradient GEMMs in FP8 too. Accumulation is fp32 with the
scales applied per 128-wide K block.

Paths: the Triton kernels (kernels/fp8_quant.py, kernels/fp8_gemm.py) on CUDA GPUs with FP8
tensor cores (compute capability 8.9+); elsewhere the same quantize / dequantize / blockwise
matmul written in PyTorch, so FP8 numerics train and test on a CPU.

`convert_to_fp8(model)` swaps a model's linears for FP8Linear and switches routed experts to
`fp8_grouped_mm`. It keeps in higher precision the parts DeepSeek-V3 keeps there: the embedding,
the output head, routers (and so the gate) and norms. It leaves alone any linear or expert whose
dims are not multiples of 128. It returns what it converted and why it skipped the rest.
"""

from __future__ import annotations

import torch
from torch import nn

from effllm.errors import ConfigError
from effllm.kernels import fp8_grouped
from effllm.kernels.fp8_gemm import fp8_gemm, fp8_gemm_ref
from effllm.kernels.fp8_quant import (
    TILE,
    quant_blocks,
    quant_blocks_ref,
    quant_blocks_t,
    quant_cols_ref,
    quant_rows_and_cols,
    quant_rows_ref,
)


def _quant_both_ref(x: torch.Tensor, pow2: bool):
    q, s = quant_rows_ref(x, pow2)
    qt, st = quant_cols_ref(x, pow2)
    return q, s, qt, st


def _quant_blocks_t_ref(w: torch.Tensor, pow2: bool):
    q, s = quant_blocks_ref(w, pow2)
    return q, s, q.t().contiguous()


_OPS = {
    # backend: (rows-and-cols quantization, 128x128 block quantization, the same plus a K-major qᵀ,
    # block-scaled GEMM)
    "triton": (quant_rows_and_cols, quant_blocks, quant_blocks_t, fp8_gemm),
    "torch": (_quant_both_ref, quant_blocks_ref, _quant_blocks_t_ref, fp8_gemm_ref),
}


def fp8_backend(device: torch.device, requested: str = "auto") -> str:
    """"triton" on CUDA GPUs with FP8 tensor cores (sm_89+), else "torch"; or what was asked for."""
    if requested in _OPS:
        return requested
    if requested != "auto":
        raise ConfigError(f"unknown FP8 backend {requested!r}; choose auto, triton or torch")
    if device.type == "cuda" and torch.cuda.get_device_capability(device) >= (8, 9):
        return "triton"
    return "torch"


class FP8LinearFunction(torch.autograd.Function):
    """y = x · Wᵀ with x, W and the output gradient quantized to E4M3 with fine-grained scales."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, out_dtype: torch.dtype, backend: str, pow2: bool):
        quant_both, quant_w, quant_w_t, gemm = _OPS[backend]
        q_x, s_x, qt_x, st_x = quant_both(x, pow2)  # tiles along features (forward) and tokens (wgrad)
        if ctx.needs_input_grad[0]:  # dgrad reads Wᵀ: quantized K-major from the same read of W
            q_w, s_w, qt_w = quant_w_t(weight, pow2)
        else:
            (q_w, s_w), qt_w = quant_w(weight, pow2), None
        ctx.save_for_backward(qt_x, st_x, qt_w, s_w)  # the input is kept in FP8 only
        ctx.meta = (backend, pow2, x.dtype, weight.dtype)
        return gemm(q_x, s_x, q_w, s_w, out_dtype)

    @staticmethod
    def backward(ctx, dy: torch.Tensor):
        qt_x, st_x, qt_w, s_w = ctx.saved_tensors
        backend, pow2, x_dtype, w_dtype = ctx.meta
        quant_both, _, _, gemm = _OPS[backend]
        q_dy, s_dy, qt_dy, st_dy = quant_both(dy.contiguous(), pow2)
        dx = dw = None
        if ctx.needs_input_grad[0]:  # dX = dY · W, with the K-major Wᵀ (FP8 MMA reads K-major operands)
            dx = gemm(q_dy, s_dy, qt_w, s_w.t(), x_dtype)
        if ctx.needs_input_grad[1]:  # dW = dYᵀ · X, both tiled along the tokens (fp32 sums, rounded once)
            dw = gemm(qt_dy, st_dy, qt_x, st_x, w_dtype, b_row_scales=True)
        return dx, dw, None, None, None


class FP8GroupedMMFunction(torch.autograd.Function):
    """ys[i][rows of g] = x[rows of g] · ws[i][g]ᵀ for expert-sorted rows, all GEMMs in FP8.

    The same scaling as FP8Linear, per expert: activations and output gradients 1x128 along the
    features, each expert's weight per 128x128 block, and for each expert's weight gradient both
    operands tiled along that expert's own tokens (a 128-token tile never straddles two experts).
    Several weights may share the input (the SwiGLU's gate and up projections): it is quantized
    once. With `src`, sorted row i is x[src[i]] (the MoE dispatch gather), and each source row's
    gradient is the sum of its sorted rows' (on the Triton path a gather in a fixed order, no atomics).

    Paths: "triton" runs kernels/fp8_grouped.py, one launch per quantization or GEMM whatever the
    number of experts, with the tile schedule computed on the device (no host sync); "torch" loops
    over the experts with the PyTorch reference ops (the CPU path, and the kernels' reference).
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, src: torch.Tensor | None, offsets: torch.Tensor, out_dtype: torch.dtype,
                backend: str, pow2: bool, *ws: torch.Tensor):
        quant_both, _, quant_w_t, gemm = _OPS[backend]
        E, _, K = ws[0].shape
        M = src.numel() if src is not None else x.shape[0]
        qws, qwts = [], []
        for w in ws:  # 128x128 blocks never straddle experts: N % 128 == 0
            N = w.shape[1]
            q_w, s_w, qt_w = quant_w_t(w.reshape(-1, K), pow2)  # qt_w (K, E N): each expert's Wᵀ, K-major
            s_w = s_w.view(E, N // TILE, K // TILE)
            qws.append((q_w.view(E, N, K), s_w))
            qwts.append((qt_w.view(K, E, N).permute(1, 0, 2), s_w.transpose(1, 2)))
        if backend == "triton":
            sched = fp8_grouped.schedule(offsets, M)
            q_x, s_x, qt_x, st_x = fp8_grouped.quant_grouped(x, sched, src, pow2)
            ys = [fp8_grouped.grouped_gemm(q_x, s_x, q_w, s_w, sched, out_dtype) for q_w, s_w in qws]
            ctx.state = (sched, qt_x, st_x)  # the input is kept in FP8 only, tiled for wgrad
        else:
            bounds = [0] + offsets.tolist()
            rows = x[src] if src is not None else x
            ys = [x.new_empty((M, w.shape[1]), dtype=out_dtype) for w in ws]
            saved = []  # per group: its rows tiled along its tokens (for wgrad), in FP8
            for g in range(E):
                lo, hi = bounds[g], bounds[g + 1]
                if hi == lo:
                    saved.append(None)
                    continue
                q_x, s_x, qt_x, st_x = quant_both(rows[lo:hi].contiguous(), pow2)
                for y, (q_w, s_w) in zip(ys, qws):
                    y[lo:hi] = gemm(q_x, s_x, q_w[g], s_w[g], out_dtype)
                saved.append((qt_x, st_x))
            ctx.state = (bounds, saved)
        ctx.qwts, ctx.src = qwts, src  # dgrad reads only the transposed weights
        ctx.meta = (backend, pow2, x.dtype, x.shape, [w.dtype for w in ws])
        return tuple(ys)

    @staticmethod
    def backward(ctx, *dys: torch.Tensor):
        backend, pow2, x_dtype, x_shape, w_dtypes = ctx.meta
        quant_both, _, _, gemm = _OPS[backend]
        qwts, src = ctx.qwts, ctx.src
        need_dx = ctx.needs_input_grad[0]
        dx, dws = None, []
        part_dtype = x_dtype if len(qwts) == 1 and src is None else torch.float32  # sums of parts in fp32
        if backend == "triton":
            sched, qt_x, st_x = ctx.state
            for i, (dy, (qt_w, st_w)) in enumerate(zip(dys, qwts)):
                if dy is None:
                    dws.append(None)
                    continue
                q_dy, s_dy, qt_dy, st_dy = fp8_grouped.quant_grouped(dy.contiguous(), sched, None, pow2)
                if need_dx:  # dX = dY · W[g], with each Wᵀ K-major (FP8 MMA reads K-major operands); a
                    # second weight's part is added in the GEMM's epilogue
                    dx = fp8_grouped.grouped_gemm(q_dy, s_dy, qt_w, st_w, sched, part_dtype, accumulate=dx)
                dws.append(fp8_grouped.grouped_wgrad(qt_dy, st_dy, qt_x, st_x, sched, w_dtypes[i])
                           if ctx.needs_input_grad[6 + i] else None)  # fp32 sums, cast once on the store
        else:
            bounds, saved = ctx.state
            E, M = len(bounds) - 1, bounds[-1]
            if need_dx:
                dx = torch.zeros((M, x_shape[1]), dtype=part_dtype, device=qwts[0][0].device)
            for i, (dy, (qt_w, st_w)) in enumerate(zip(dys, qwts)):
                need_dw = ctx.needs_input_grad[6 + i] and dy is not None
                E, K, N = qt_w.shape
                dw = torch.zeros((E, N, K), dtype=w_dtypes[i], device=qt_w.device) if need_dw else None
                for g in range(E):
                    lo, hi = bounds[g], bounds[g + 1]
                    if hi == lo or dy is None:
                        continue
                    q_dy, s_dy, qt_dy, st_dy = quant_both(dy[lo:hi].contiguous(), pow2)
                    if need_dx:  # dX = dY · W[g]
                        dx[lo:hi] += gemm(q_dy, s_dy, qt_w[g], st_w[g], part_dtype)
                    if need_dw:  # dW[g] = dYᵀ · X over this expert's tokens
                        qt_x, st_x = saved[g]
                        dw[g] = gemm(qt_dy, st_dy, qt_x, st_x, torch.float32, b_row_scales=True).to(w_dtypes[i])
                dws.append(dw)
        if dx is not None and src is not None:  # the gather's gradient: each source row sums its pairs
            if backend == "triton":  # gathered per source row in a fixed order: no atomics, deterministic
                dx = fp8_grouped.sum_by_source(dx, src, x_shape[0], x_dtype)
            else:
                dx = torch.zeros(x_shape, dtype=torch.float32, device=dx.device).index_add_(0, src, dx.float())
        if dx is not None:
            dx = dx.to(x_dtype)
        ctx.state = ctx.qwts = ctx.src = None
        return (dx, None, None, None, None, None, *dws)


def fp8_grouped_mm(x: torch.Tensor, w: torch.Tensor | tuple[torch.Tensor, ...], offsets: torch.Tensor,
                   backend: str = "auto", pow2: bool = False, src: torch.Tensor | None = None):
    """The FP8 twin of kernels.grouped_gemm.grouped_mm: x (M, K) rows sorted by group, w (G, N, K)
    with N and K multiples of 128, offsets (G,) cumulative ends -> (M, N).

    `w` may be a tuple of weights that share the input (a tuple of outputs comes back; the input is
    quantized once). With `src` (M,) int64, x is (R, K) in any order and sorted row i is x[src[i]]:
    the dispatch gather, fused into the quantization on the Triton path. The output takes the
    autocast dtype under autocast, else x's; the master weights keep their own dtype."""
    ws = w if isinstance(w, tuple) else (w,)
    for wi in ws:
        if wi.dim() != 3 or wi.shape[1] % TILE or wi.shape[2] % TILE or wi.shape[::2] != ws[0].shape[::2]:
            raise ConfigError(f"FP8 experts need (G, N, K) weights with N and K multiples of {TILE} (and the same G "
                              f"and K), got {[tuple(v.shape) for v in ws]}: keep these experts in higher precision")
    device = x.device.type
    out_dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else x.dtype
    with torch.autocast(device, enabled=False):
        ys = FP8GroupedMMFunction.apply(x, src, offsets, out_dtype, fp8_backend(x.device, backend), pow2, *ws)
    return ys if isinstance(w, tuple) else ys[0]


class FP8Linear(nn.Module):
    """A bias-free linear whose three GEMMs run in FP8 (E4M3, 1x128 / 128x128 scales).

    The weight is an ordinary fp32 (or bf16) Parameter, so optimizers and checkpoints see what an
    nn.Linear would have. Under autocast the output takes the autocast dtype; otherwise x's.
    """

    def __init__(self, in_features: int, out_features: int, backend: str = "auto", pow2_scales: bool = False,
                 weight: nn.Parameter | None = None):
        super().__init__()
        if in_features % TILE or out_features % TILE:
            raise ConfigError(f"FP8Linear needs in and out features that are multiples of {TILE}, got "
                              f"{in_features} -> {out_features}: keep this layer an nn.Linear")
        self.in_features, self.out_features = in_features, out_features
        self.backend, self.pow2_scales = backend, pow2_scales
        self.weight = weight if weight is not None else nn.Parameter(torch.empty(out_features, in_features))
        if weight is None:
            nn.init.normal_(self.weight, std=0.02)

    @classmethod
    def from_linear(cls, linear: nn.Linear, backend: str = "auto", pow2_scales: bool = False) -> "FP8Linear":
        """An FP8Linear sharing `linear`'s weight Parameter (optimizer state stays valid)."""
        if linear.bias is not None:
            raise ConfigError("FP8Linear has no bias: keep linears with a bias as nn.Linear")
        return cls(linear.in_features, linear.out_features, backend, pow2_scales, weight=linear.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        device = x.device.type
        out_dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else x.dtype
        backend = fp8_backend(x.device, self.backend)
        with torch.autocast(device, enabled=False):
            y = FP8LinearFunction.apply(x.reshape(-1, self.in_features), self.weight, out_dtype, backend,
                                        self.pow2_scales)
        return y.view(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, backend={self.backend}"


def convert_to_fp8(model: nn.Module, backend: str = "auto", pow2_scales: bool = False,
                   keep: tuple[str, ...] = ("head", "lm_head", "output")) -> dict:
    """Swap the nn.Linear layers of `model` for FP8Linear, in place.

    Routed experts whose widths are multiples of 128 run their grouped GEMMs in FP8 (forward and
    backward). Kept in higher precision: linears named in `keep` (the output head), linears with a
    bias or with dims that are not multiples of 128. Embeddings, norms and routers are not
    nn.Linear, so they are never converted. Returns {"converted": [names], "skipped": {name: why}}.
    """
    from effllm.moe import RoutedExperts

    converted, skipped = [], {}
    for parent_name, parent in list(model.named_modules()):
        for child_name, child in list(parent.named_children()):
            name = f"{parent_name}.{child_name}" if parent_name else child_name
            if isinstance(child, RoutedExperts):
                hidden, D = child.w1.shape[1], child.w1.shape[2]
                if hidden % TILE or D % TILE:
                    skipped[name] = f"experts of {D} -> {hidden} are not multiples of {TILE}"
                else:
                    child.fp8 = (backend, pow2_scales)  # RoutedExperts.forward runs fp8_grouped_mm
                    converted.append(name)
                continue
            if not isinstance(child, nn.Linear):
                continue
            if child_name in keep:
                skipped[name] = "output head: kept in higher precision (DeepSeek-V3 §3.3)"
            elif child.bias is not None:
                skipped[name] = "has a bias"
            elif child.in_features % TILE or child.out_features % TILE:
                skipped[name] = f"{child.in_features} -> {child.out_features} is not a multiple of {TILE}"
            else:
                setattr(parent, child_name, FP8Linear.from_linear(child, backend, pow2_scales))
                converted.append(name)
    return {"converted": converted, "skipped": skipped}
