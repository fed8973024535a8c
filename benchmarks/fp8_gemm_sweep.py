"""Kernel variants of the block-scaled FP8 GEMM at one shape, side by side, on an FP8 GPU.

    python benchmarks/fp8_gemm_sweep.py [--shape 8192 8192 8192] [--commit HASH]

The autotuner picks among tile shapes and pipeline depths; this script also tries what it does
not search, to find what the kernel's structure is worth before changing it:
- `maxnreg`: a register cap, so that two 256-thread programs fit on one SM and one program's
  promotion FFMAs can run while the other's MMAs do (ping-pong by occupancy);
- `PIPE`: K block kb's MMA issued before block kb-1 is promoted (a third register tile);
- `WS`: Triton's warp specialization of the K loop (`tl.range(..., warp_specialize=True)`),
  where this Triton version supports it on this GPU.
Each variant is launched on its own, checked against `fp8_gemm_ref` on a slice of rows, and timed
with `triton.testing.do_bench` (median), in the forward layout (128x128 weight blocks) and the wgrad
layout (both operands tiled 1x128). bf16 torch.matmul at the same shape is measured in the same
run. A variant that fails to compile or disagrees with the reference is reported, not timed.
Results: benchmarks/results/fp8_gemm/sweep-<device>.json and a markdown table, sweep-<device>.md.
"""

from __future__ import annotations

import argparse
import functools
import json
import re
from pathlib import Path

import torch
import triton
import triton.testing
from common import environment
from effllm.kernels import fp8_gemm as g
from effllm.kernels.fp8_quant import quant_blocks, quant_rows

RESULTS = Path(__file__).resolve().parent / "results" / "fp8_gemm"

# (BLOCK_M, BLOCK_N, num_warps, num_stages, options)
VARIANTS = [
    (128, 128, 8, 3, {}), (128, 128, 8, 4, {}), (64, 128, 4, 4, {}), (128, 64, 4, 4, {}), (64, 128, 4, 3, {}),
    (128, 128, 8, 3, {"maxnreg": 128}), (128, 128, 8, 2, {"maxnreg": 128}), (64, 128, 4, 3, {"maxnreg": 128}),
    (128, 128, 8, 3, {"PIPE": True}), (128, 128, 8, 4, {"PIPE": True}), (64, 128, 4, 4, {"PIPE": True}),
    (128, 64, 4, 4, {"PIPE": True}),
    (128, 128, 8, 3, {"WS": True}), (128, 128, 8, 4, {"WS": True}), (64, 128, 4, 4, {"WS": True}),
    (256, 128, 8, 3, {}),
]


def layouts(m: int, n: int, k: int) -> dict:
    x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16)
    dy = torch.randn(m, n, device="cuda", dtype=torch.bfloat16)
    qx, sx = quant_rows(x)
    qw, sw = quant_blocks(w)
    qt_dy, st_dy = quant_rows(dy.t().contiguous())
    qt_x, st_x = quant_rows(x.t().contiguous())
    return {"fwd": (qx, sx, qw, sw, torch.bfloat16, False), "wgrad": (qt_dy, st_dy, qt_x, st_x, torch.float32, True)}


def launch(a, a_s, b, b_s, out_dtype, row_scales, bm, bn, warps, stages, opts):
    M, K = a.shape
    N = b.shape[0]
    c = torch.empty((M, N), dtype=out_dtype, device=a.device)
    meta = {key: v for key, v in opts.items() if key in ("PIPE", "WS")}
    extra = {key: v for key, v in opts.items() if key == "maxnreg"}
    grid = (triton.cdiv(M, bm) * triton.cdiv(N, bn),)
    kernel = g._fp8_gemm_kernel[grid](
        a, b, c, a_s, b_s, M, N, K, a.stride(0), a.stride(1), b.stride(0), b.stride(1), c.stride(0), c.stride(1),
        a_s.stride(0), a_s.stride(1), b_s.stride(0), b_s.stride(1), g._bucket(M), g._bucket(K), int(b.stride(1) == 1),
        BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=g.TILE, GROUP_M=8, B_ROW_SCALES=row_scales, num_warps=warps,
        num_stages=stages, **meta, **extra)
    return c, kernel


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", type=int, nargs=3, default=(8192, 8192, 8192), metavar=("M", "N", "K"))
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--commit", default=None)
    args = parser.parse_args()
    if not torch.cuda.is_available() or torch.cuda.get_device_capability() < (9, 0):
        raise SystemExit("the sweep needs a Hopper-class GPU (sm_90+): it compares FP8 MMA kernel structures")
    m, n, k = args.shape
    flops = 2 * m * n * k
    a = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(n, k, device="cuda", dtype=torch.bfloat16)
    bf16 = triton.testing.do_bench(lambda: a @ b.t(), warmup=25, rep=200, return_mode="median") / 1e3
    print(f"bf16 matmul {flops / bf16 / 1e12:.1f} TFLOP/s", flush=True)
    rows = []
    for layout, ops in layouts(m, n, k).items():
        ref = g.fp8_gemm_ref(ops[0][:256], ops[1][:256], *ops[2:])
        for bm, bn, warps, stages, opts in VARIANTS:
            if opts.get("WS") and layout == "wgrad":
                continue
            name = f"{bm}x{bn} w{warps} s{stages}" + "".join(f" {key}={v}" for key, v in opts.items())
            row = {"layout": layout, "variant": name}
            try:
                c, kernel = launch(*ops, bm, bn, warps, stages, opts)
                err = ((c[:256].float() - ref.float()).norm() / ref.float().norm()).item()
                row.update(n_regs=kernel.n_regs, n_spills=kernel.n_spills, rel_err=err)
                if err > 1e-2:
                    row["error"] = f"disagrees with fp8_gemm_ref (rel err {err:.2e})"
                else:
                    run = functools.partial(launch, *ops, bm, bn, warps, stages, opts)
                    t = triton.testing.do_bench(run, warmup=25, rep=200, return_mode="median") / 1e3
                    row.update(median_s=t, tflops=flops / t / 1e12, vs_bf16=bf16 / t)
            except Exception as e:  # noqa: BLE001 - a variant this Triton cannot build is a result too
                row["error"] = f"{type(e).__name__}: {str(e).strip().splitlines()[0][:160] if str(e).strip() else ''}"
            print(row, flush=True)
            rows.append(row)
    result = {"bench": "fp8_gemm_sweep", **environment(torch.device("cuda"), args.commit), "shape": [m, n, k],
              "bf16": {"median_s": bf16, "tflops": flops / bf16 / 1e12}, "variants": rows}
    args.out.mkdir(parents=True, exist_ok=True)
    slug = re.sub(r"[^A-Za-z0-9]+", "-", result["device"]).strip("-").lower()
    (args.out / f"sweep-{slug}.json").write_text(json.dumps(result, indent=1) + "\n")
    lines = [f"# FP8 GEMM kernel variants at {m}x{n}x{k}", "",
             f"{result['device']}, torch {result['torch']}, triton {result['triton']}, commit `{result['commit']}`, "
             f"{result['date']}. bf16 matmul: {flops / bf16 / 1e12:.1f} TFLOP/s.", "",
             "| layout | variant | TFLOP/s | vs bf16 | regs | spills | note |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['layout']} | {r['variant']} | {r.get('tflops', 0):.1f} | {r.get('vs_bf16', 0):.2f} | "
                     f"{r.get('n_regs', '')} | {r.get('n_spills', '')} | {r.get('error', '')} |")
    (args.out / f"sweep-{slug}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
