"""MoE experts in FP8: grouped GEMMs over expert-sorted rows with DeepSeek-V3's fine-grained scaling.

`fp8_grouped_mm` runs grouped GEMMs the way `effllm.fp8.FP8Linear` runs one: activations and
output gradients 1x128 along the features, weights per 128x128 block, both wgrad operands along
each expert's own tokens. `fp8_swiglu_experts` runs whole SwiGLU experts, gate and up stacked into
one GEMM, with the SwiGLU and its gradients computed inside the quantizations. `FP8RoutedExperts`
is the MoE layer's `RoutedExperts` running `fp8_swiglu_experts`: `effllm.fp8.convert_to_fp8`
swaps it in, keeping the master weights (the same Parameters) and the forward signature.

The operations come from kernels/fp8_grouped_gemm.py's `GroupedOps`: its Triton kernels on CUDA
GPUs with FP8 tensor cores, elsewhere their PyTorch reference, so FP8 experts train on a CPU.
"""

from __future__ import annotations

import torch
from torch import nn

from effllm.errors import ConfigError
from effllm.kernels.backends import FP8_BACKENDS, fp8_backend
from effllm.kernels.fp8_grouped_gemm import GroupedOps
from effllm.kernels.fp8_quant import TILE
from effllm.moe import RoutedExperts


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
        ops = GroupedOps(backend, offsets, M, pow2)
        qws, qwts = zip(*(ops.weights((w,)) for w in ws))
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
        ops = GroupedOps(backend, offsets, M, pow2)
        q13, t13 = ops.weights((w1, w3))
        q2, t2 = ops.weights((w2,))
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
        resolved = fp8_backend(x.device, backend, grouped=True)  # "cublas" runs the experts on the Triton kernels
        ys = FP8GroupedMMFunction.apply(x, src, offsets, out_dtype, resolved, pow2, *ws)
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
        return FP8SwiGLUExpertsFunction.apply(x, src, offsets, out_dtype, fp8_backend(x.device, backend, grouped=True),
                                              pow2,
                                              w1, w3, w2)


def check_fp8_backend(backend: str) -> None:
    """Refuse an FP8 backend name that kernels.backends.fp8_backend would not take, when a layer
    is built rather than at its first forward."""
    if backend not in ("auto", *FP8_BACKENDS):
        raise ConfigError(f"unknown FP8 backend {backend!r}; choose auto, cublas, triton or torch")


class FP8RoutedExperts(RoutedExperts):
    """Routed experts whose three grouped GEMMs run in FP8, forward and backward (`fp8_swiglu_experts`).

    The weights stay the high-precision master weights that optimizers and checkpoints see;
    `backend` ("auto", "triton" or "torch") and `pow2_scales` choose the FP8 path. The dispatch
    gather (`src`) is fused into the input's quantization on the Triton path."""

    def __init__(self, dim: int, hidden: int, n: int, backend: str = "auto", pow2_scales: bool = False,
                 weights: tuple[nn.Parameter, nn.Parameter, nn.Parameter] | None = None):
        if hidden % TILE or dim % TILE:
            raise ConfigError(f"FP8 experts need widths that are multiples of {TILE}, got {dim} -> {hidden}: keep "
                              "these experts in higher precision")
        check_fp8_backend(backend)
        super().__init__(dim, hidden, n, weights=weights)
        self.backend, self.pow2_scales = backend, pow2_scales

    @classmethod
    def from_experts(cls, experts: RoutedExperts, backend: str = "auto", pow2_scales: bool = False) -> "FP8RoutedExperts":
        """FP8 experts sharing `experts`' weight Parameters (optimizer state stays valid)."""
        n, hidden, dim = experts.w1.shape
        return cls(dim, hidden, n, backend, pow2_scales, weights=(experts.w1, experts.w3, experts.w2))

    def forward(self, x: torch.Tensor, offsets: torch.Tensor, src: torch.Tensor | None = None) -> torch.Tensor:
        return fp8_swiglu_experts(x, self.w1, self.w3, self.w2, offsets, self.backend, self.pow2_scales, src=src)

    def extra_repr(self) -> str:
        return f"experts={self.w1.shape[0]}, dim={self.w1.shape[2]}, hidden={self.w1.shape[1]}, backend={self.backend}"
