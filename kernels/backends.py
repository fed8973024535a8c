"""Which implementation runs each kernel family, in one place.

Every family has a Triton kernel and a PyTorch implementation of the same function (its reference,
beside it in the kernel's file); the grouped GEMM also has torch._grouped_mm and a loop. The layers
ask here, at each forward, with the tensors' device and dtype:

- `fp8_backend(device, requested)`: the FP8 quantizations and block-scaled GEMMs (fp8_quant,
  fp8_gemm or torch's F.scaled_mm through scaled_mm, fp8_grouped);
- `grouped_gemm_backend(device, dtype, requested, features)`: the MoE experts' grouped GEMM
  (grouped_gemm);
- `combine_backend(device)`: the MoE combine (moe_combine).

"auto" is what the measurements in each kernel file support; any other name is checked and taken.
Under TRITON_INTERPRET=1 (the CPU tests) a Triton kernel may be asked for on the CPU.
"""

from __future__ import annotations

import functools

import torch

from effllm.errors import ConfigError
from effllm.kernels.fp8_gemm import fp8_gemm_ref
from effllm.kernels.fp8_quant import quant_blocks_ref, quant_rows_ref
from effllm.kernels.grouped_gemm import BACKENDS, KERNEL_DTYPES, check_kernel_dtype, torch_fits
from effllm.kernels.launch import interpreting
from effllm.kernels.scaled_mm import blockwise_mm

FP8_BACKENDS = ("cublas", "triton", "torch")


@functools.cache
def cublas_blockwise_works(device_index: int) -> bool:
    """Whether torch's block-scaled `F.scaled_mm` (cuBLAS 12.9+, sm_90) runs on this GPU: one tiny
    call, once per device and process (a capability, cached as such), its answer checked against
    the fp32 reference. False where torch lacks the API, the build or the GPU refuses it."""
    if not hasattr(torch.nn.functional, "scaled_mm"):
        return False
    try:
        gen = torch.Generator(device="cpu").manual_seed(0)
        x, w = torch.randn(128, 640, generator=gen), torch.randn(256, 640, generator=gen)  # K/128 = 5: padded scales
        (qx, sx), (qw, sw) = quant_rows_ref(x), quant_blocks_ref(w)
        want = fp8_gemm_ref(qx, sx, qw, sw, torch.float32)
        dev = torch.device("cuda", device_index)
        got = blockwise_mm(qx.to(dev), sx.to(dev), qw.to(dev), sw.to(dev), torch.float32).cpu()
        return bool(((got - want).norm() / want.norm()) < 1e-3)
    except (RuntimeError, ValueError, TypeError):  # unsupported builds raise RuntimeError subclasses
        return False


def fp8_backend(device: torch.device, requested: str = "auto", grouped: bool = False) -> str:
    """The FP8 backend of a tensor on `device`: "cublas" (torch's block-scaled F.scaled_mm for the
    GEMMs, the Triton quantization kernels) on sm_90 GPUs where that call works; "triton" on other
    CUDA GPUs with FP8 tensor cores (sm_89+); else "torch"; or what was asked for. `grouped`: for
    the MoE experts' grouped GEMMs, which have no block-scaled grouped GEMM in torch (its
    _scaled_grouped_mm is row-wise only): "cublas" runs them on the Triton kernels."""
    resolved = _fp8_backend(device, requested)
    return "triton" if grouped and resolved == "cublas" else resolved


def _fp8_backend(device: torch.device, requested: str) -> str:
    if requested == "cublas" and device.type != "cuda":
        raise ConfigError(f"FP8 backend 'cublas' runs torch's F.scaled_mm on a CUDA GPU, and this tensor is on "
                          f"{device.type}: use 'auto' or 'torch'")
    if requested == "triton" and device.type != "cuda" and not interpreting():
        raise ConfigError(f"FP8 backend 'triton' runs Triton GPU kernels, and this tensor is on {device.type}: use "
                          "backend='torch' (the PyTorch reference) or 'auto' off a CUDA GPU (TRITON_INTERPRET=1 runs "
                          "the kernels on a CPU, for tests)")
    if requested in FP8_BACKENDS:
        return requested
    if requested != "auto":
        raise ConfigError(f"unknown FP8 backend {requested!r}; choose auto, cublas, triton or torch")
    if device.type == "cuda":
        capability = torch.cuda.get_device_capability(device)
        if capability == (9, 0) and cublas_blockwise_works(device.index if device.index is not None else
                                                           torch.cuda.current_device()):
            return "cublas"
        if capability >= (8, 9):
            return "triton"
    return "torch"


def grouped_gemm_backend(device: torch.device, dtype: torch.dtype, requested: str = "auto",
                         features: tuple[int, ...] = ()) -> str:
    """The grouped GEMM backend for tensors of `dtype` on `device` whose GEMMs have these feature sizes.

    auto: the loop for dtypes the kernels do not take (fp64); on CUDA, torch._grouped_mm for bf16 on
    compute capability 9.0+ (its supported case), else the Triton kernels; on CPU, torch._grouped_mm
    where this PyTorch has it, else the loop. Feature sizes that torch._grouped_mm cannot stride
    (rows not a multiple of 16 bytes) rule it out. torch.compile sees every backend as one custom
    operator (kernels/grouped_gemm.py), so tracing asks nothing of torch._grouped_mm's meta function.
    """
    if requested != "auto":
        if requested not in BACKENDS:
            raise ValueError(f"unknown grouped GEMM backend {requested!r}; choose auto or one of {', '.join(BACKENDS)}")
        if requested != "loop":
            check_kernel_dtype(dtype, requested)
        if requested == "torch" and not hasattr(torch, "_grouped_mm"):
            raise ValueError(f"torch {torch.__version__} has no torch._grouped_mm: choose 'triton' or 'loop'")
        if requested == "triton" and device.type != "cuda" and not interpreting():
            raise ConfigError(f"the Triton grouped GEMM needs a CUDA GPU, and this tensor is on {device.type}: use "
                              "'auto', 'torch' or 'loop' (TRITON_INTERPRET=1 runs the kernels on a CPU, for tests)")
        return requested
    if dtype not in KERNEL_DTYPES:
        return "loop"
    has_torch = hasattr(torch, "_grouped_mm") and torch_fits(dtype, *features)
    if device.type == "cuda":
        if has_torch and dtype == torch.bfloat16 and torch.cuda.get_device_capability(device) >= (9, 0):
            return "torch"
        return "triton"
    return "torch" if has_torch else "loop"


def combine_backend(device: torch.device) -> bool:
    """Whether the MoE combine runs its Triton kernel: on CUDA; elsewhere PyTorch ops in the same
    fixed order (the interpreter would only make the CPU path slower)."""
    return device.type == "cuda"
