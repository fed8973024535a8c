"""How the kernels launch: the interpreter switch and the one launch rule of the GEMM kernels.

A GEMM kernel launches one of three ways (`launch`):
- with EFFLLM_FP8_AUTOTUNE=0 on a GPU (the GPU tests): one fixed configuration, so a test's
  numbers do not depend on what the autotuner picked;
- under TRITON_INTERPRET=1 (the CPU tests): a configuration of few, large programs, since the
  interpreter's cost is per program and per op;
- otherwise the autotuned kernel, tuned once per shape key on first use.
"""

from __future__ import annotations

import os
from collections.abc import Callable


def interpreting() -> bool:
    """Whether Triton kernels run in its interpreter (TRITON_INTERPRET=1: the CPU tests)."""
    return os.environ.get("TRITON_INTERPRET") == "1"


def fixed_config() -> bool:
    """EFFLLM_FP8_AUTOTUNE=0 on a GPU: one fixed configuration instead of autotuning."""
    return os.environ.get("EFFLLM_FP8_AUTOTUNE") == "0" and not interpreting()


def bucket(x: int) -> int:
    """The power of two at or above x: autotuning keys on it, so nearby sizes share a tuning."""
    return 1 << max(x - 1, 0).bit_length()


def launch(kernel, tuned, grid: Callable[[dict], tuple], args: tuple, *, fixed: dict, interpreted: dict,
           **constants) -> None:
    """Launch `kernel` on `args` (see the module docstring): with the `fixed` or `interpreted`
    configuration (block sizes, num_warps, num_stages), or as `tuned` (its triton.autotune), on
    grid(config). `constants` are the launch's other compile-time arguments."""
    if fixed_config():
        kernel[grid(fixed)](*args, **fixed, **constants)
    elif interpreting():
        kernel[grid(interpreted)](*args, **interpreted, **constants)
    else:
        tuned[grid](*args, **constants)
