"""FP8 linears with DeepSeek-V3's fine-grained scaling (technical report §3.3).

`FP8Linear` keeps a high-precision master weight. Each forward quantizes the input per 1x128
tile and the weight per 128x128 block to E4M3 and runs the block-scaled FP8 GEMM. The backward
pass quantizes the output gradient both ways in one pass (1x128 along features for dgrad,
along tokens for wgrad) and runs both gradient GEMMs in FP8 too. Accumulation is fp32 with the
scales applied per 128-wide K block.

Paths (kernels/backends.py): on sm_90 GPUs whose torch runs it, torch's block-scaled F.scaled_mm
(cuBLAS) for the GEMMs with the Triton quantization kernels (kernels/scaled_mm.py); the Triton
kernels (kernels/fp8_quant.py, kernels/fp8_gemm.py) on other CUDA GPUs with FP8 tensor cores
(compute capability 8.9+); elsewhere the same quantize / dequantize / blockwise matmul written in
PyTorch, so FP8 numerics train and test on a CPU. The "rowwise" and "tensorwise" recipes
(`FP8ScaledLinearFunction`) run torch's F.scaled_mm on every device.

The MoE experts' grouped GEMMs run the same way (effllm/fp8_experts.py). `convert_to_fp8(model)`
swaps a model's linears for FP8Linear and its routed experts for FP8RoutedExperts. It keeps in higher precision the parts
DeepSeek-V3 keeps there: the embedding, the output head, routers (and so the gate) and norms. It
leaves alone any linear or expert whose dims are not multiples of 128. It returns what it
converted and why it skipped the rest.
"""

from __future__ import annotations

import functools

import torch
from torch import nn

from effllm.errors import ConfigError
from effllm.fp8_experts import FP8RoutedExperts, check_fp8_backend
from effllm.kernels.backends import fp8_backend
from effllm.kernels.fp8_gemm import fp8_gemm, fp8_gemm_ref
from effllm.kernels.fp8_quant import (
    TILE,
    quant_blocks,
    quant_blocks_ref,
    quant_blocks_t,
    quant_blocks_t_ref,
    quant_rows_and_cols,
    quant_rows_and_cols_ref,
)
from effllm.kernels.scaled_mm import blockwise_mm, quant_rowwise, quant_tensorwise, rowwise_mm, tensorwise_mm
from effllm.moe import RoutedExperts

_OPS = {
    # backend: (rows-and-cols quantization, 128x128 block quantization, the same plus a K-major qᵀ,
    # block-scaled GEMM)
    "triton": (quant_rows_and_cols, quant_blocks, quant_blocks_t, fp8_gemm),
    "torch": (quant_rows_and_cols_ref, quant_blocks_ref, quant_blocks_t_ref, fp8_gemm_ref),
    # torch's block-scaled F.scaled_mm (cuBLAS, sm_90) for the GEMMs, the Triton quantization kernels
    # (its activation scales written outer-dim-major by the kernel, the layout cuBLAS reads)
    "cublas": (functools.partial(quant_rows_and_cols, outer_scales=True), quant_blocks, quant_blocks_t, blockwise_mm),
}


class FP8LinearFunction(torch.autograd.Function):
    """y = x · Wᵀ with x, W and the output gradient quantized to E4M3 with fine-grained scales."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, out_dtype: torch.dtype, backend: str, pow2: bool,
                weight_fp8: tuple | None = None):
        quant_both, quant_w, quant_w_t, gemm = _OPS[backend]
        q_x, s_x, qt_x, st_x = quant_both(x, pow2)  # tiles along features (forward) and tokens (wgrad)
        if weight_fp8 is not None:  # quantized already this optimizer step (FP8Linear.cache_weight)
            q_w, s_w, qt_w = weight_fp8
        elif ctx.needs_input_grad[0]:  # dgrad reads Wᵀ: quantized K-major by the same launch as W
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
        return dx, dw, None, None, None, None


_COARSE = {"rowwise": (quant_rowwise, rowwise_mm), "tensorwise": (quant_tensorwise, tensorwise_mm)}


class FP8ScaledLinearFunction(torch.autograd.Function):
    """y = x · Wᵀ in FP8 with coarse scales, torch's F.scaled_mm running the three GEMMs (cuBLAS on
    CUDA, torch's own kernel on a CPU): "rowwise" (torchtitan's and torchao's recipe) one scale per
    row over the whole K, each GEMM quantizing its two operands per row of its contraction (x and W
    along features for the forward, dy along features and Wᵀ along outputs for dgrad, dyᵀ and xᵀ
    along tokens for wgrad); "tensorwise" one scale per operand. Coarser than the block scaling
    (one outlier sets a whole row's, or tensor's, scale), and what cuBLAS runs fastest."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, out_dtype: torch.dtype, recipe: str):
        quant, mm = _COARSE[recipe]
        q_x, s_x = quant(x)
        q_w, s_w = quant(weight)
        qt_x, st_x = quant(x.t())  # along the tokens, for wgrad: the input is kept in FP8 only
        ctx.save_for_backward(qt_x, st_x, weight)
        ctx.meta = (x.dtype, weight.dtype, recipe)
        return mm(q_x, s_x, q_w, s_w, out_dtype)

    @staticmethod
    def backward(ctx, dy: torch.Tensor):
        qt_x, st_x, weight = ctx.saved_tensors
        x_dtype, w_dtype, recipe = ctx.meta
        quant, mm = _COARSE[recipe]
        dx = dw = None
        if ctx.needs_input_grad[0]:  # dX = dY · W: dY per token over N, Wᵀ per input feature over N
            q_dy, s_dy = quant(dy)
            q_wt, s_wt = quant(weight.t())
            dx = mm(q_dy, s_dy, q_wt, s_wt, x_dtype)
        if ctx.needs_input_grad[1]:  # dW = dYᵀ · X: both per row over the tokens
            q_dyt, s_dyt = quant(dy.t())
            dw = mm(q_dyt, s_dyt, qt_x, st_x, w_dtype)
        return dx, dw, None, None


RECIPES = ("blockwise", "rowwise", "tensorwise")


class FP8Linear(nn.Module):
    """A linear whose three GEMMs run in FP8 (E4M3): with `recipe` "blockwise" (DeepSeek-V3's, the
    default) 1x128 / 128x128 scales, with "rowwise" one scale per row over the whole K.

    The weight (and the bias, if any) are ordinary fp32 (or bf16) Parameters, so optimizers and
    checkpoints see what an nn.Linear would have. The bias is added to the GEMM's output in that
    output's precision, as DeepSeek-V3 keeps everything outside the GEMMs. Under autocast the
    output takes the autocast dtype; otherwise x's.
    """

    def __init__(self, in_features: int, out_features: int, backend: str = "auto", pow2_scales: bool = False,
                 weight: nn.Parameter | None = None, bias: bool | nn.Parameter = False, recipe: str = "blockwise",
                 cache_weight: bool = False):
        super().__init__()
        if in_features % TILE or out_features % TILE:
            raise ConfigError(f"FP8Linear needs in and out features that are multiples of {TILE}, got "
                              f"{in_features} -> {out_features}: keep this layer an nn.Linear")
        check_fp8_backend(backend)
        check_recipe(recipe)
        self.in_features, self.out_features = in_features, out_features
        self.backend, self.pow2_scales, self.recipe = backend, pow2_scales, recipe
        # Gradient accumulation: quantize the weight once per optimizer step, not per micro-batch. The
        # FP8 copy (q, its scales, the K-major qᵀ) is kept with the key it was made for (the weight's
        # storage and version counter, which every in-place update such as optimizer.step() bumps)
        # and remade when the key changes. Only for weights that persist between forwards: FSDP2
        # rewrites its unsharded parameters in place each forward, so the trainer leaves it off there.
        self.cache_weight = cache_weight
        self._weight_fp8: tuple | None = None  # (key, q, s, qt)
        self.weight = weight if weight is not None else nn.Parameter(torch.empty(out_features, in_features))
        if weight is None:
            nn.init.normal_(self.weight, std=0.02)
        if isinstance(bias, nn.Parameter):
            self.bias = bias
        elif bias:
            self.bias = nn.Parameter(torch.zeros(out_features))
        else:
            self.register_parameter("bias", None)

    @classmethod
    def from_linear(cls, linear: nn.Linear, backend: str = "auto", pow2_scales: bool = False,
                    recipe: str = "blockwise") -> "FP8Linear":
        """An FP8Linear sharing `linear`'s weight and bias Parameters (optimizer state stays valid)."""
        return cls(linear.in_features, linear.out_features, backend, pow2_scales, weight=linear.weight,
                   bias=linear.bias if linear.bias is not None else False, recipe=recipe)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        device = x.device.type
        out_dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else x.dtype
        with torch.autocast(device, enabled=False):
            if self.recipe != "blockwise":  # torch's F.scaled_mm on every device
                y = FP8ScaledLinearFunction.apply(x.reshape(-1, self.in_features), self.weight, out_dtype, self.recipe)
            else:
                backend = fp8_backend(x.device, self.backend)
                y = FP8LinearFunction.apply(x.reshape(-1, self.in_features), self.weight, out_dtype, backend,
                                            self.pow2_scales, self._cached_weight(backend))
            if self.bias is not None:
                y = y + self.bias.to(out_dtype)
        return y.view(*x.shape[:-1], self.out_features)

    def _cached_weight(self, backend: str) -> tuple | None:
        """The weight's FP8 copy for this optimizer step, made on its first use (None: not cached)."""
        if not (self.cache_weight and torch.is_grad_enabled()) or torch.compiler.is_compiling():
            return None
        w = self.weight
        key = (w.data_ptr(), w._version, w.device, backend, self.pow2_scales)
        if self._weight_fp8 is None or self._weight_fp8[0] != key:
            with torch.no_grad():
                self._weight_fp8 = (key, *_OPS[backend][2](w, self.pow2_scales))
        return self._weight_fp8[1:]

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"backend={self.backend}, recipe={self.recipe}")


def cache_fp8_weights(model: nn.Module, enabled: bool = True) -> int:
    """Turn FP8Linear's once-per-optimizer-step weight quantization on (or off) in `model`; returns
    how many layers it set. For gradient accumulation with weights that persist between forwards
    (one process, DDP), not FSDP2 (see FP8Linear)."""
    layers = [m for m in model.modules() if isinstance(m, FP8Linear)]
    for m in layers:
        m.cache_weight, m._weight_fp8 = enabled, None
    return len(layers)


def check_recipe(recipe: str) -> None:
    if recipe not in RECIPES:
        raise ConfigError(f"unknown FP8 recipe {recipe!r}; choose blockwise (DeepSeek-V3's 1x128 / 128x128 scales), "
                          "rowwise (one scale per row, torchtitan's) or tensorwise (one per tensor)")


def convert_to_fp8(model: nn.Module, backend: str = "auto", pow2_scales: bool = False,
                   keep: tuple[str, ...] = ("head", "lm_head", "output"), recipe: str = "blockwise") -> dict:
    """Swap the nn.Linear layers of `model` for FP8Linear, in place.

    Routed experts whose widths are multiples of 128 become FP8RoutedExperts (the same Parameters),
    whose grouped GEMMs run in FP8 forward and backward. Kept in higher precision: linears named in
    `keep` (the output head) and linears with dims that are not multiples of 128. Biases are kept
    as they are and added in the output's precision.
    Embeddings, norms and routers are not nn.Linear, so they are never converted. `recipe` sets the
    linears' scaling ("blockwise" or "rowwise"); the experts stay block-scaled under either, since
    torch has no row-wise grouped GEMM that takes DeepSeek's unpadded expert groups (its
    _scaled_grouped_mm wants group sizes in multiples of 16) and the block-scaled grouped kernels
    run them now. Returns {"converted": [names], "skipped": {name: why}, "recipe": {"linears": ...,
    "experts": "blockwise"}}.
    """
    check_fp8_backend(backend)
    check_recipe(recipe)
    converted, skipped = [], {}
    for parent_name, parent in list(model.named_modules()):
        for child_name, child in list(parent.named_children()):
            name = f"{parent_name}.{child_name}" if parent_name else child_name
            if isinstance(child, FP8RoutedExperts):
                continue  # converted already
            if isinstance(child, RoutedExperts):
                hidden, D = child.w1.shape[1], child.w1.shape[2]
                if hidden % TILE or D % TILE:
                    skipped[name] = f"experts of {D} -> {hidden} are not multiples of {TILE}"
                else:
                    setattr(parent, child_name, FP8RoutedExperts.from_experts(child, backend, pow2_scales))
                    converted.append(name)
                continue
            if not isinstance(child, nn.Linear):
                continue
            if child_name in keep:
                skipped[name] = "output head: kept in higher precision (DeepSeek-V3 §3.3)"
            elif child.in_features % TILE or child.out_features % TILE:
                skipped[name] = f"{child.in_features} -> {child.out_features} is not a multiple of {TILE}"
            else:
                setattr(parent, child_name, FP8Linear.from_linear(child, backend, pow2_scales, recipe))
                converted.append(name)
    return {"converted": converted, "skipped": skipped, "recipe": {"linears": recipe, "experts": "blockwise"}}
