"""What the FP8 GEMM compiles to on this GPU: matrix instructions, registers, spills, shared memory.

    python benchmarks/fp8_sass.py [--shape 8192 8192 8192] [--dump DIR]

For each layout the training step uses (forward, dgrad with the weight read transposed, wgrad with
both operands tiled along the tokens) it lets the autotuner pick a configuration at the shape,
compiles that configuration, and counts in the SASS (cuobjdump) the instruction classes that say
which path the tensor cores take: QGMMA (Hopper FP8 warpgroup MMA), HGMMA (16-bit warpgroup MMA),
HMMA (the older per-warp MMA), and LDL/STL (local-memory spills). A Hopper FP8 GEMM that shows no
QGMMA is on a slow path. Prints one line per layout; --dump writes the SASS and TTGIR files.
Needs a CUDA GPU with FP8 tensor cores and cuobjdump on the PATH.
"""

from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

import torch
import triton

from effllm.kernels import fp8_gemm as g
from effllm.kernels.fp8_quant import quant_blocks, quant_rows
from effllm.kernels.launch import bucket

CLASSES = ("QGMMA", "HGMMA", "HMMA", "IMMA", "LDL", "STL", "FFMA")


def layouts(m: int, n: int, k: int) -> dict:
    """The three GEMM layouts of y (m, n) = x (m, k) · Wᵀ on random operands."""
    x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16)
    dy = torch.randn(m, n, device="cuda", dtype=torch.bfloat16)
    qx, sx = quant_rows(x)
    qw, sw = quant_blocks(w)
    qdy, sdy = quant_rows(dy)
    qt_dy, st_dy = quant_rows(dy.t().contiguous())
    qt_x, st_x = quant_rows(x.t().contiguous())
    return {"fwd": (qx, sx, qw, sw, torch.bfloat16, False),
            "dgrad": (qdy, sdy, qw.t(), sw.t(), torch.bfloat16, False),
            "wgrad": (qt_dy, st_dy, qt_x, st_x, torch.float32, True)}


def compiled_for(a, a_s, b, b_s, out_dtype, row_scales):
    """Tune at this shape, then launch the winning configuration on its own: returns (config, kernel)."""
    g.fp8_gemm(a, a_s, b, b_s, out_dtype, row_scales)  # tunes (once per key)
    M, K = a.shape
    N = b.shape[0]
    key = (bucket(M), N, bucket(K), int(b.stride(1) == 1), row_scales)
    config = next(c for kk, c in g._fp8_gemm_tuned.cache.items() if tuple(kk[:5]) == key)
    c = torch.empty((M, N), dtype=out_dtype, device=a.device)
    meta = config.kwargs
    grid = (triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(N, meta["BLOCK_N"]),)
    kernel = g._fp8_gemm_kernel[grid](
        a, b, c, a_s, b_s, M, N, K, a.stride(0), a.stride(1), b.stride(0), b.stride(1), c.stride(0), c.stride(1),
        a_s.stride(0), a_s.stride(1), b_s.stride(0), b_s.stride(1), bucket(M), bucket(K),
        int(b.stride(1) == 1), BLOCK_K=g.TILE, B_ROW_SCALES=row_scales, num_warps=config.num_warps,
        num_stages=config.num_stages, **meta)
    return config, kernel


def sass_of(cubin: bytes) -> str:
    tool = shutil.which("cuobjdump")
    if tool is None:
        raise SystemExit("cuobjdump is not on the PATH")
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "k.cubin"
        path.write_bytes(cubin)
        return subprocess.run([tool, "--dump-sass", str(path)], capture_output=True, text=True, check=True).stdout


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", type=int, nargs=3, default=(8192, 8192, 8192), metavar=("M", "N", "K"))
    parser.add_argument("--dump", type=Path, default=None, help="folder for the SASS and TTGIR files")
    args = parser.parse_args()
    if not torch.cuda.is_available() or torch.cuda.get_device_capability() < (8, 9):
        raise SystemExit("needs a CUDA GPU with FP8 tensor cores (sm_89+)")
    for name, operands in layouts(*args.shape).items():
        config, kernel = compiled_for(*operands)
        sass = sass_of(kernel.asm["cubin"])
        counts = {c: len(re.findall(rf"\b{c}\b", sass)) for c in CLASSES}
        ttgir = kernel.asm.get("ttgir", "")
        wgmma = ttgir.count("warp_group_dot")
        print(f"{name:6s} {config}: regs {kernel.n_regs}, spills {kernel.n_spills}, shared "
              f"{kernel.metadata.shared} B, ttgir warp_group_dot {wgmma}, sass " +
              " ".join(f"{c} {n}" for c, n in counts.items()), flush=True)
        if args.dump:
            args.dump.mkdir(parents=True, exist_ok=True)
            (args.dump / f"{name}.sass").write_text(sass)
            (args.dump / f"{name}.ttgir").write_text(ttgir)


if __name__ == "__main__":
    main()
