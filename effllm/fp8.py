"""FP8 linears with DeepSeek-V3's fine-grained scaling (technical report §3.3).

`FP8Linear` keeps a high-precision master weight. Each forward quantizes the input per 1x128
tile and the weight per 128x128 block to E4M3 and runs the block-scaled FP8 GEMM. The backward
pass quantizes the output gradient both ways in one pass (1x128 along features for dgrad,
along tokens for wgrad) and runs both gradient GEMMs in FP8 too. Accumulation is fp32 with the
scales applied per 128-wide K block.

Paths: the Triton kernels (kernels/fp8_quant.py, kernels/fp8_gemm.py) on CUDA GPUs with FP8
tensor cores (compute capability 8.9+); elsewhere the same quantize / dequantize / blockwise
matmul written in PyTorch, so FP8 numerics train and test on a CPU.

`fp8_grouped_mm` runs grouped GEMMs over expert-sorted rows the same way. `fp8_swiglu_experts`
runs whole SwiGLU experts, gate and up stacked into one GEMM, with the SwiGLU and its gradients
computed inside the quantizations. `convert_to_fp8(model)` swaps a model's linears for FP8Linear
and switches routed experts to `fp8_swiglu_experts`. It keeps in higher precision the parts
DeepSeek-V3 keeps there: the embedding, the output head, routers (and so the gate) and norms. It
leaves alone any linear or expert whose dims are not multiples of 128. It returns what it
converted and why it skipped the rest.
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
        if ctx.needs_input_grad[0]:  # dgrad reads Wᵀ: quantized K-major by the same launch as W
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


class _Grouped:
    """The grouped FP8 operations of one step over expert-sorted rows, on one backend: "triton" runs
    kernels/fp8_grouped.py (one launch per quantization or GEMM whatever the number of experts,
    the tile schedule computed on the device, no host sync); "torch" loops over the experts with
    the PyTorch reference ops (the CPU path, and the kernels' reference).

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
        quant_both = _OPS["torch"][0]
        return [quant_both(rows[lo:hi].contiguous(), self.pow2) if hi > lo else None
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
            return fp8_grouped.grouped_gemm(a[0], a[1], q_w, s_w, self.sched, out_dtype, accumulate=accumulate)
        gemm = _OPS["torch"][3]
        c = accumulate if accumulate is not None else torch.zeros((self.m, q_w.shape[1]), dtype=out_dtype,
                                                                  device=self.device)
        for g, (p, lo, hi) in enumerate(zip(a, self.bounds, self.bounds[1:])):
            if p is None:
                continue
            part = gemm(p[0], p[1], q_w[g], s_w[g], torch.float32)
            c[lo:hi] = (part + c[lo:hi].float() if accumulate is not None else part).to(c.dtype)
        return c

    def wgrad(self, at, bt, shape: tuple[int, int, int], out_dtype: torch.dtype) -> torch.Tensor:
        """dw (G, N, K) = per expert, at[rows of g]ᵀ · bt[rows of g] over its tokens (exact zeros for
        an expert without tokens), accumulated in fp32 and stored in `out_dtype`."""
        if self.backend == "triton":
            return fp8_grouped.grouped_wgrad(at[2], at[3], bt[2], bt[3], self.sched, out_dtype)
        gemm = _OPS["torch"][3]
        dw = torch.zeros(shape, dtype=out_dtype, device=self.device)
        for g, (a, b) in enumerate(zip(at, bt)):
            if a is not None:
                dw[g] = gemm(a[2], a[3], b[2], b[3], out_dtype, b_row_scales=True)
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


def _quant_expert_weights(ws, backend: str, pow2: bool):
    """(G, N_i, K) expert weights stacked side by side along N, per 128x128 block -> (q (G, ΣN, K),
    s) for the forward and (qᵀ (G, K, ΣN), sᵀ) for the dgrad, each expert's Wᵀ K-major (FP8 MMA
    reads K-major operands), written by the same launch that quantizes W."""
    quant = fp8_grouped.quant_expert_weights if backend == "triton" else fp8_grouped.quant_expert_weights_ref
    q, s, qt = quant(ws, pow2)
    return (q, s), (qt, s.transpose(1, 2))


class FP8GroupedMMFunction(torch.autograd.Function):
    """ys[i][rows of g] = x[rows of g] · ws[i][g]ᵀ for expert-sorted rows, all GEMMs in FP8.

    The same scaling as FP8Linear, per expert: activations and output gradients 1x128 along the
    features, each expert's weight per 128x128 block, and for each expert's weight gradient both
    operands tiled along that expert's own tokens. Several weights may share the input (the
    SwiGLU's gate and up projections): it is quantized once. With `src`, sorted row i is x[src[i]]
    (the MoE dispatch gather), and each source row's gradient is the sum of its sorted rows'.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, src: torch.Tensor | None, offsets: torch.Tensor, out_dtype: torch.dtype,
                backend: str, pow2: bool, *ws: torch.Tensor):
        M = src.numel() if src is not None else x.shape[0]
        qws, qwts = zip(*(_quant_expert_weights((w,), backend, pow2) for w in ws))
        ops = _Grouped(backend, offsets, M, pow2)
        q_x = ops.quant(x, src)
        ys = tuple(ops.gemm(q_x, q_w, out_dtype) for q_w in qws)
        ctx.ops, ctx.q_x, ctx.qwts, ctx.src = ops, ops.for_wgrad(q_x), qwts, src  # the input is kept in FP8 only
        ctx.meta = (x.dtype, x.shape[0], [w.shape for w in ws], [w.dtype for w in ws])
        return ys

    @staticmethod
    def backward(ctx, *dys: torch.Tensor):
        x_dtype, x_rows, w_shapes, w_dtypes = ctx.meta
        ops, q_x, src = ctx.ops, ctx.q_x, ctx.src
        dx, dws = None, []
        part_dtype = x_dtype if len(dys) == 1 and src is None else torch.float32  # sums of parts in fp32
        for i, (dy, qwt) in enumerate(zip(dys, ctx.qwts)):
            if dy is None:
                dws.append(None)
                continue
            q_dy = ops.quant(dy.contiguous())
            if ctx.needs_input_grad[0]:  # dX = dY · W[g]; a second weight's part is added in the epilogue
                dx = ops.gemm(q_dy, qwt, part_dtype, accumulate=dx)
            dws.append(ops.wgrad(q_dy, q_x, w_shapes[i], w_dtypes[i]) if ctx.needs_input_grad[6 + i] else None)
        if dx is not None:
            dx = ops.input_grad(dx, src, x_rows, x_dtype)
        ctx.ops = ctx.q_x = ctx.qwts = ctx.src = None
        return (dx, None, None, None, None, None, *dws)


class FP8SwiGLUExpertsFunction(torch.autograd.Function):
    """y[rows of g] = (silu(x · w1[g]ᵀ) ⊙ (x · w3[g]ᵀ)) · w2[g]ᵀ for expert-sorted rows: the routed
    experts, their GEMMs in FP8, scaled as in FP8GroupedMMFunction.

    One function for the whole expert:
    - The gate and up weights are quantized side by side into one (G, 2F, D) operand, so gate and
      up come from one GEMM, and the input's gradient from one GEMM with K = 2F, written in x's
      dtype: no second GEMM, no fp32 partial sum.
    - The SwiGLU's high-precision terms are computed in fp32 inside the quantizations and never
      stored: the forward quantizes h = silu(gate)·up straight from gate and up, the backward both
      of h's gradients (along gate and along up) straight from dh, gate and up, in one pass.
    Kept for the backward: gate|up (out_dtype), and the input and h in FP8.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, src: torch.Tensor | None, offsets: torch.Tensor, out_dtype: torch.dtype,
                backend: str, pow2: bool, w1: torch.Tensor, w3: torch.Tensor, w2: torch.Tensor):
        M, F = (src.numel() if src is not None else x.shape[0]), w1.shape[1]
        q13, t13 = _quant_expert_weights((w1, w3), backend, pow2)
        q2, t2 = _quant_expert_weights((w2,), backend, pow2)
        ops = _Grouped(backend, offsets, M, pow2)
        q_x = ops.quant(x, src)
        gate_up = ops.gemm(q_x, q13, out_dtype)  # (M, 2F): gate, then up
        q_h = ops.quant_swiglu(gate_up[:, :F], gate_up[:, F:])
        y = ops.gemm(q_h, q2, out_dtype)
        ctx.ops, ctx.qwts, ctx.src = ops, (t13, t2), src
        ctx.kept = (ops.for_wgrad(q_x), gate_up, ops.for_wgrad(q_h))
        ctx.meta = (x.dtype, x.shape[0], [w.shape for w in (w1, w3, w2)], [w.dtype for w in (w1, w3, w2)])
        return y

    @staticmethod
    def backward(ctx, dy: torch.Tensor):
        x_dtype, x_rows, w_shapes, w_dtypes = ctx.meta
        ops, src, (t13, t2) = ctx.ops, ctx.src, ctx.qwts
        q_x, gate_up, q_h = ctx.kept
        F = w_shapes[0][1]
        need = ctx.needs_input_grad
        q_dy = ops.quant(dy.contiguous())
        dw2 = ops.wgrad(q_dy, q_h, w_shapes[2], w_dtypes[2]) if need[8] else None
        dh = ops.gemm(q_dy, t2, gate_up.dtype)  # dH = dY · W2[g]
        q_dgu = ops.quant_swiglu(gate_up[:, :F], gate_up[:, F:], dh)  # (M, 2F): along gate, then along up
        dx = None
        if need[0]:  # dX = [dGate | dUp] · [W1[g]; W3[g]]: one GEMM, K = 2F, rows in x's dtype
            dx = ops.input_grad(ops.gemm(q_dgu, t13, x_dtype), src, x_rows, x_dtype)
        dw1 = ops.wgrad(ops.for_wgrad(q_dgu, 0, F), q_x, w_shapes[0], w_dtypes[0]) if need[6] else None
        dw3 = ops.wgrad(ops.for_wgrad(q_dgu, F), q_x, w_shapes[1], w_dtypes[1]) if need[7] else None
        ctx.ops = ctx.qwts = ctx.src = ctx.kept = None
        return dx, None, None, None, None, None, dw1, dw3, dw2


def _check_expert_weights(ws) -> None:
    for wi in ws:
        if wi.dim() != 3 or wi.shape[1] % TILE or wi.shape[2] % TILE or wi.shape[::2] != ws[0].shape[::2]:
            raise ConfigError(f"FP8 experts need (G, N, K) weights with N and K multiples of {TILE} (and the same G "
                              f"and K), got {[tuple(v.shape) for v in ws]}: keep these experts in higher precision")


def fp8_grouped_mm(x: torch.Tensor, w: torch.Tensor | tuple[torch.Tensor, ...], offsets: torch.Tensor,
                   backend: str = "auto", pow2: bool = False, src: torch.Tensor | None = None):
    """The FP8 twin of kernels.grouped_gemm.grouped_mm: x (M, K) rows sorted by group, w (G, N, K)
    with N and K multiples of 128, offsets (G,) cumulative ends -> (M, N).

    `w` may be a tuple of weights that share the input (a tuple of outputs comes back; the input is
    quantized once). With `src` (M,) int64, x is (R, K) in any order and sorted row i is x[src[i]]:
    the dispatch gather, fused into the quantization on the Triton path. The output takes the
    autocast dtype under autocast, else x's; the master weights keep their own dtype."""
    ws = w if isinstance(w, tuple) else (w,)
    _check_expert_weights(ws)
    device = x.device.type
    out_dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else x.dtype
    with torch.autocast(device, enabled=False):
        ys = FP8GroupedMMFunction.apply(x, src, offsets, out_dtype, fp8_backend(x.device, backend), pow2, *ws)
    return ys if isinstance(w, tuple) else ys[0]


def fp8_swiglu_experts(x: torch.Tensor, w1: torch.Tensor, w3: torch.Tensor, w2: torch.Tensor,
                       offsets: torch.Tensor, backend: str = "auto", pow2: bool = False,
                       src: torch.Tensor | None = None) -> torch.Tensor:
    """SwiGLU experts in FP8: (silu(x · w1[g]ᵀ) ⊙ (x · w3[g]ᵀ)) · w2[g]ᵀ for the rows of group g.

    x (M, D) rows sorted by group (or, with `src`, (R, D) in any order, sorted row i being x[src[i]]);
    w1, w3 (G, F, D) gate and up, w2 (G, D, F) down, D and F multiples of 128; offsets (G,) int32
    cumulative ends -> (M, D). What `fp8_grouped_mm` and a SwiGLU between two of them compute, but
    gate and up come from one GEMM against both weights stacked, and the SwiGLU runs in fp32 inside
    the quantizations (FP8SwiGLUExpertsFunction), so neither it nor its gradients are stored in high
    precision. The input's gradient comes from one GEMM over both, in x's dtype per sorted row (then
    summed in fp32 over each token's rows with `src`). The output takes the autocast dtype under
    autocast, else x's."""
    _check_expert_weights((w1, w3))
    if w2.dim() != 3 or w2.shape != (w1.shape[0], w1.shape[2], w1.shape[1]):
        raise ConfigError(f"the down projection must be (G, D, F) = {(w1.shape[0], w1.shape[2], w1.shape[1])} "
                          f"for gate and up of {tuple(w1.shape)}, got {tuple(w2.shape)}")
    device = x.device.type
    out_dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else x.dtype
    with torch.autocast(device, enabled=False):
        return FP8SwiGLUExpertsFunction.apply(x, src, offsets, out_dtype, fp8_backend(x.device, backend), pow2,
                                              w1, w3, w2)


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
