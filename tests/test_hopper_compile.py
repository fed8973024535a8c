"""Every Triton kernel compiles for Hopper (sm_90) with the compiler Triton ships, without a GPU,
and compiles to the structure the H100 needs (benchmarks/hopper_compile.py does the compiling, in a
subprocess: the rest of the suite runs under TRITON_INTERPRET=1, whose kernels do not compile).

What the interpreter cannot show:
- a kernel the compiler rejects, or one that compiles for the CPU interpreter only;
- FP8 GEMMs that miss the FP8 tensor cores (QGMMA);
- the weight quantization storing one e4m3 tile twice, directly and transposed. On an H100 that
  wrote foreign bytes into the transposed copy (the GPU tests at a7b19c8): the ptxas 12.9 bug of
  triton-lang/triton#11111, same bytes (0x60, 0xFC). The kernel converts each copy on its own.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import built_once

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "hopper_compile.py"


def _nvidia_toolchain() -> str | None:
    """Why the sm_90 compile cannot run here, or None."""
    try:
        import triton
        from triton.backends.nvidia import compiler  # noqa: F401
    except ImportError as e:
        return f"Triton's NVIDIA backend is not installed ({e})"
    bin_dir = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"
    missing = [tool for tool in ("ptxas", "cuobjdump") if not (bin_dir / tool).exists()]
    return f"Triton's bundled {', '.join(missing)} missing" if missing else None


def compile_report(*args: str) -> dict:
    why = _nvidia_toolchain()
    if why:
        pytest.skip(why)
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    run = subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, env=env, timeout=600)
    if run.returncode == 3:  # a Triton without the internals hopper_compile.py uses
        pytest.skip(run.stderr.strip().splitlines()[-1])
    assert run.returncode == 0, run.stderr[-4000:]
    return json.loads(run.stdout)["kernels"]


@pytest.fixture(scope="module")
def report(tmp_path_factory) -> dict:
    return built_once(tmp_path_factory, "hopper_compile", lambda _: compile_report())  # every kernel: ~15 s


def test_one_fp8_kernel_compiles_to_the_fp8_tensor_cores():
    """The fast tier's check of the compile path: one FP8 GEMM, compiled for sm_90, runs on QGMMA."""
    fp8 = compile_report("--only", "fp8_gemm")
    assert fp8 and all(k["qgmma"] > 0 and k["hgmma"] == 0 for k in fp8.values())


@pytest.mark.slow
def test_every_kernel_compiles_for_hopper(report):
    families = {name.split("/")[0] for name in report}
    assert families == {"quant_blocks", "quant_blocks_t", "quant_rows", "quant_rows_and_cols", "fp8_gemm", "quant_grouped",
                        "grouped_fp8_gemm", "grouped_fp8_wgrad", "sum_by_source", "grouped_mm", "grouped_wgrad",
                        "combine"}


@pytest.mark.slow
def test_fp8_gemms_run_on_the_fp8_tensor_cores(report):
    fp8 = {n: k for n, k in report.items() if n.split("/")[0] in ("fp8_gemm", "grouped_fp8_gemm", "grouped_fp8_wgrad")}
    assert len(fp8) == 7
    for name, k in fp8.items():
        assert k["qgmma"] > 0 and k["hgmma"] == 0, name
    for name in ("grouped_mm/bf16", "grouped_wgrad/bf16"):
        assert report[name]["hgmma"] > 0, name


@pytest.mark.slow
def test_weight_quantization_converts_each_copy_on_its_own(report):
    """Each thread converts its values of q and of qᵀ separately (two e4m3 values per cvt), and no
    e4m3 tile is transposed in registers: the two stores never share e4m3 registers."""
    weights = {n: k for n, k in report.items() if n.startswith("quant_blocks_t/")}
    assert len(weights) == 5  # fp32 and bf16 masters, N a multiple of 16 and not; experts side by side
    for name, k in weights.items():
        per_thread = 128 * 128 // (32 * k["num_warps"])  # values of one 128x128 copy held by a thread
        assert k["fp8_trans"] == 0, name
        assert k["e4m3_casts"] == 2 * per_thread // 2, name  # two copies, two values per cvt
