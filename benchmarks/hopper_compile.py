"""Compile every Triton kernel of effllm for Hopper (sm_90) on a machine without a GPU, and say what
each compiled to. tests/test_hopper_compile.py runs it in a subprocess; by hand:

    python benchmarks/hopper_compile.py [--dump DIR] [--tuner]

The interpreter runs the kernels' numerics on a CPU, but never the compiler. Here the whole NVIDIA
pipeline runs (TTGIR, LLVM, PTX, then ptxas to a cubin, all bundled with Triton) for an explicit
sm_90 target. Each kernel is specialized the way a launch with these arguments would be (pointer
alignment, integers divisible by 16, integers equal to 1), with the configuration a GPU uses:
EFFLLM_FP8_AUTOTUNE=0's fixed tiles, and the hardware e4m3 cast of sm_90.

Prints one JSON object: for each kernel variant, counts from its TTGIR, PTX and SASS (cuobjdump):
- qgmma / hgmma: Hopper warpgroup MMA instructions (FP8 / 16-bit); spills: LDL and STL;
- e4m3_casts: fp32 -> e4m3 conversions (PTX cvt, two values each) per thread;
- fp8_trans: tt.trans of an e4m3 tensor in the TTGIR.
Must run without TRITON_INTERPRET=1: under it triton.jit gives interpreter functions, which do not
compile.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
import triton

try:  # Triton's own launch-time specialization (internal, present in 3.6 through 3.9)
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from triton.compiler.compiler import make_backend
    from triton.runtime.jit import create_function_from_signature
except ImportError as e:  # another Triton: say so (exit code 3) instead of failing
    print(f"this Triton ({triton.__version__}) lacks what the sm_90 compile uses: {e}", file=sys.stderr)
    raise SystemExit(3) from e

TARGET = GPUTarget("cuda", 90, 32)
FP8 = torch.float8_e4m3fn


def compile_for_hopper(fn, args: tuple, kwargs: dict):
    """triton.compile of `fn` as `fn[grid](*args, **kwargs)` would specialize it, for sm_90."""
    backend = make_backend(TARGET)
    binder = create_function_from_signature(fn.signature, fn.params, backend)
    bound, specialization, options = binder(*args, **kwargs)
    options, signature, constexprs, attrs = fn._pack_args(backend, kwargs, bound, specialization, options)
    return triton.compile(ASTSource(fn, signature, constexprs, attrs), target=TARGET, options=options.__dict__)


def sass_of(cubin: bytes) -> str:
    tool = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "k.cubin"
        path.write_bytes(cubin)
        return subprocess.run([str(tool), "--dump-sass", str(path)], capture_output=True, text=True,
                              check=True).stdout


def summary(kernel) -> dict:
    ttgir, ptx, sass = kernel.asm["ttgir"], kernel.asm["ptx"], sass_of(kernel.asm["cubin"])
    return {
        "qgmma": len(re.findall(r"\bQGMMA\b", sass)),
        "hgmma": len(re.findall(r"\bHGMMA\b", sass)),
        "spills": len(re.findall(r"\b(?:LDL|STL)\b", sass)),
        "e4m3_casts": len(re.findall(r"cvt\.rn\.satfinite\.e4m3x2", ptx)),
        "fp8_trans": len(re.findall(r"tt\.trans .*: tensor<[^>]*xf8E4M3FN", ttgir)),
        "num_warps": kernel.metadata.num_warps,
    }


def variants(tuner: bool = False):
    """(name, kernel, args, kwargs) for each kernel of effllm, in the configurations a GPU runs: the
    autotuned GEMMs in the GPU tests' fixed tiles and the tuner's usual winner, or with `tuner` in
    every configuration of the tuner's search space."""
    from effllm.kernels import fp8_gemm as fg
    from effllm.kernels import fp8_grouped as fgr
    from effllm.kernels import fp8_grouped_gemm as fgg
    from effllm.kernels import fp8_quant as fq
    from effllm.kernels import grouped_gemm as gg
    from effllm.kernels import moe_combine as mc
    from effllm.kernels.launch import bucket

    def space(configs, fixed, keys=("BLOCK_M", "BLOCK_N")):
        """(tile rows, tile columns, warps, stages) to compile."""
        if not tuner:
            return fixed
        return [(c.kwargs[keys[0]], c.kwargs[keys[1]], c.num_warps, c.num_stages) for c in configs]

    out = []
    # the weight quantization with its transposed copy, fp32 and bf16 masters, N a multiple of 16 or not
    for dtype in (torch.float32, torch.bfloat16):
        for n, k in ((256, 384), (200, 384)):
            w = torch.randn(n, k).to(dtype)
            q, qt = torch.empty(n, k, dtype=FP8), torch.empty(k, n, dtype=FP8)
            s = torch.empty(triton.cdiv(n, 128), k // 128)
            args = (w, q, s, qt, n, k, 0, w.stride(0), 0, q.stride(0), 0, s.stride(0), 0, qt.stride(0))
            out.append((f"quant_blocks_t/{str(dtype)[6:]}/{n}x{k}", fq._quant_blocks_kernel, args,
                        dict(TILE=128, POW2=False, HW_CAST=True, ROWS=True, TRANSPOSED=True, num_warps=8)))
    # the weight quantization without the transposed copy (no input gradient needed)
    w = torch.randn(256, 384)
    q, s = torch.empty(256, 384, dtype=FP8), torch.empty(2, 3)
    out.append(("quant_blocks/float32", fq._quant_blocks_kernel,
                (w, q, s, q, 256, 384, 0, w.stride(0), 0, q.stride(0), 0, s.stride(0), 0, q.stride(0)),
                dict(TILE=128, POW2=False, HW_CAST=True, ROWS=True, TRANSPOSED=False, num_warps=4)))
    # the experts' gate and up weights, quantized side by side into views of one stacked operand
    G, F, D = 3, 256, 384
    w3 = torch.randn(G, F, D)
    q, qt = torch.empty(G, 2 * F, D, dtype=FP8), torch.empty(G, D, 2 * F, dtype=FP8)
    s = torch.empty(G, 2 * F // 128, D // 128)
    qv, sv, qtv = q[:, F:], s[:, F // 128:], qt[:, :, F:]
    args = (w3, qv, sv, qtv, F, D, w3.stride(0), w3.stride(1), qv.stride(0), qv.stride(1), sv.stride(0), sv.stride(1),
            qtv.stride(0), qtv.stride(1))
    out.append(("quant_blocks_t/float32/experts", fq._quant_blocks_kernel, args,
                dict(TILE=128, POW2=False, HW_CAST=True, ROWS=True, TRANSPOSED=True, num_warps=8)))
    # the activation quantizations
    for dtype in (torch.float32, torch.bfloat16):
        m, k = 256, 384
        x = torch.randn(m, k).to(dtype)
        q, s = torch.empty(m, k, dtype=FP8), torch.empty(m, k // 128)
        qt, st = torch.empty(k, m, dtype=FP8), torch.empty(k, triton.cdiv(m, 128))
        out.append((f"quant_rows/{str(dtype)[6:]}", fq._quant_rows_kernel,
                    (x, q, s, m, k, x.stride(0), q.stride(0), s.stride(0), s.stride(1)),
                    dict(BLOCK_M=16, TILE_K=128, POW2=False, HW_CAST=True)))
        out.append((f"quant_rows_and_cols/{str(dtype)[6:]}", fq._quant_rows_and_cols_kernel,
                    (x, q, s, qt, st, m, k, x.stride(0), q.stride(0), s.stride(0), s.stride(1), qt.stride(0),
                     st.stride(0), st.stride(1)),
                    dict(TILE_M=128, TILE_K=128, POW2=False, HW_CAST=True, num_warps=8)))
    # the dense block-scaled GEMM: forward and dgrad (B K-major, block scales), wgrad (row scales)
    m, n, k = 256, 384, 512
    a, b = torch.randn(m, k).to(FP8), torch.randn(n, k).to(FP8)
    for name, row_scales, out_dtype in (("fp8_gemm/block", False, torch.bfloat16),
                                        ("fp8_gemm/rows", True, torch.float32)):
        a_s = torch.rand(m, k // 128)
        b_s = torch.rand(n, k // 128) if row_scales else torch.rand(n // 128, k // 128)
        c = torch.empty(m, n, dtype=out_dtype)
        args = (a, b, c, a_s, b_s, m, n, k, a.stride(0), a.stride(1), b.stride(0), b.stride(1), c.stride(0),
                c.stride(1), a_s.stride(0), a_s.stride(1), b_s.stride(0), b_s.stride(1), bucket(m),
                bucket(k), 1)
        # the GPU tests' tiles; the tuned winner
        for bm, bn, warps, stages in space(fg.hopper_configs(), [(128, 128, 8, 3), (64, 128, 4, 4)]):
            out.append((f"{name}/{bm}x{bn}" + (f"/w{warps}s{stages}" if tuner else ""), fg._fp8_gemm_kernel, args,
                        dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=128, GROUP_M=8, B_ROW_SCALES=row_scales,
                             num_warps=warps, num_stages=stages)))
    # the grouped FP8 kernels of the MoE experts
    sizes, K, N = [300, 0, 129, 83], 256, 384
    M, G = sum(sizes), len(sizes)
    offsets = torch.tensor(sizes).cumsum(0).to(torch.int32)
    sched = fgr.schedule(offsets, M)
    T = sched.group.numel()
    x, src = torch.randn(M, 2 * K).bfloat16(), torch.randperm(M)
    for act, gather, k_in in ((0, False, K), (0, True, K), (1, False, K), (2, False, K)):
        k_out = 2 * k_in if act == 2 else k_in
        q, s = torch.empty(M, k_out, dtype=FP8), torch.empty(M, k_out // 128)
        qt, st = torch.empty(k_out, T * 128, dtype=FP8), torch.zeros(k_out, T)
        gate, up = x[:, :k_in], x[:, k_in:]
        dh = torch.randn(M, k_in).bfloat16()
        args = (gate, up, dh, src, q, s, qt, st, sched.group, sched.row, sched.ends, k_out, k_in // 128,
                gate.stride(0), dh.stride(0), q.stride(0), s.stride(0), qt.stride(0), st.stride(0))
        out.append((f"quant_grouped/act{act}{'/gather' if gather else ''}", fgr._quant_grouped_kernel, args,
                    dict(GATHER=gather, ACT=act, TILE_M=128, TILE_K=128, POW2=False, HW_CAST=True, num_warps=8)))
    a, a_s = torch.randn(M, K).to(FP8), torch.rand(M, K // 128)
    bw, bw_s = torch.randn(G, N, K).to(FP8), torch.rand(G, N // 128, K // 128)
    for accumulate in (False, True):
        c = torch.empty(M, N, dtype=torch.float32 if accumulate else torch.bfloat16)
        args = (a, bw, c, a_s, bw_s, sched.group, sched.row, sched.ends, N, K, T, a.stride(0), a.stride(1),
                bw.stride(0), bw.stride(1), bw.stride(2), c.stride(0), c.stride(1), a_s.stride(0), a_s.stride(1),
                bw_s.stride(0), bw_s.stride(1), bw_s.stride(2), bucket(M), 1)
        for bm, bn, warps, stages in space(fg.hopper_configs(), [(128, 128, 8, 3)]):
            out.append((f"grouped_fp8_gemm{'/accumulate' if accumulate else ''}"
                        + (f"/{bm}x{bn}/w{warps}s{stages}" if tuner else ""), fgg._grouped_gemm_kernel, args,
                        dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=128, GROUP_M=8, TILE_M=128, ACCUMULATE=accumulate,
                             num_warps=warps, num_stages=stages)))
    at, at_s = torch.randn(N, T * 128).to(FP8), torch.rand(N, T)
    bt, bt_s = torch.randn(K, T * 128).to(FP8), torch.rand(K, T)
    dw = torch.empty(G, N, K, dtype=torch.bfloat16)
    for bn, bk, warps, stages in space(fgg._wgrad_configs(), [(128, 128, 8, 3)], ("BLOCK_N", "BLOCK_K")):
        out.append(("grouped_fp8_wgrad" + (f"/{bn}x{bk}/w{warps}s{stages}" if tuner else ""),
                    fgg._grouped_wgrad_kernel,
                    (at, bt, dw, at_s, bt_s, sched.first, sched.count, N, K, at.stride(0), bt.stride(0), dw.stride(0),
                     dw.stride(1), dw.stride(2), at_s.stride(0), bt_s.stride(0), bucket(M)),
                    dict(BLOCK_N=bn, BLOCK_K=bk, TILE_M=128, num_warps=warps, num_stages=stages)))
    dx, out_rows = torch.randn(M, K).bfloat16(), torch.empty(M, K).bfloat16()
    order, bounds = torch.argsort(src), torch.arange(M + 1)
    out.append(("sum_by_source", fgr._sum_by_source_kernel, (dx, order, bounds, out_rows, K, dx.stride(0),
                                                             out_rows.stride(0)), dict(BLOCK_D=256, num_warps=4)))
    # the bf16 grouped GEMM (the MoE path without FP8) and the combine kernel
    xb, wb = torch.randn(M, K).bfloat16(), torch.randn(G, N, K).bfloat16()
    bm, bn, bk, warps, stages = 64, 256, 64, 8, 3  # grouped_gemm._blocks(bf16) on a GPU
    tile_group, tile_row = gg.tile_schedule(offsets, M, bm)
    yb = torch.empty(M, N).bfloat16()
    out.append(("grouped_mm/bf16", gg._grouped_mm_kernel,
                (xb, wb, yb, tile_group, tile_row, offsets, N, K, xb.stride(0), xb.stride(1), wb.stride(0),
                 wb.stride(2), wb.stride(1), yb.stride(0), yb.stride(1)),
                dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, IEEE=False, num_warps=warps, num_stages=stages)))
    dwb = torch.empty(G, N, K).bfloat16()
    out.append(("grouped_wgrad/bf16", gg._grouped_wgrad_kernel,
                (yb, xb, dwb, offsets, N, K, yb.stride(0), yb.stride(1), xb.stride(0), xb.stride(1), dwb.stride(0),
                 dwb.stride(1), dwb.stride(2)),
                dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, IEEE=False, num_warps=warps, num_stages=stages)))
    tokens, topk = 64, 6
    y, wts = torch.randn(tokens * topk, K).bfloat16(), torch.rand(tokens, topk)
    pos, comb = torch.randperm(tokens * topk).view(tokens, topk), torch.empty(tokens, K).bfloat16()
    out.append(("combine/fwd", mc._combine_fwd_kernel, (y, wts, pos, comb, K, topk, y.stride(0), comb.stride(0)),
                dict(BLOCK_D=256)))
    dy, dwk = torch.empty_like(y), torch.empty(tokens, topk)
    out.append(("combine/bwd", mc._combine_bwd_kernel,
                (comb, y, wts, pos, dy, dwk, K, topk, comb.stride(0), y.stride(0), dy.stride(0)),
                dict(BLOCK_D=256, BLOCK_K=8)))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dump", type=Path, default=None, help="folder for each variant's TTGIR, PTX and SASS")
    parser.add_argument("--tuner", action="store_true",
                        help="compile the autotuned GEMMs in every configuration of the tuner's search space")
    parser.add_argument("--only", default=None, help="comma-separated kernel families to compile (default: all)")
    args = parser.parse_args()
    only = set(args.only.split(",")) if args.only else None
    if os.environ.get("TRITON_INTERPRET") == "1":
        raise SystemExit("run without TRITON_INTERPRET=1: the interpreter's kernels do not compile")
    report = {"triton": triton.__version__, "target": "sm_90", "kernels": {}}
    for name, fn, kargs, kwargs in variants(args.tuner):
        if only is not None and name.split("/")[0] not in only:
            continue
        kernel = compile_for_hopper(fn, kargs, kwargs)
        report["kernels"][name] = summary(kernel)
        if args.dump:
            stem = args.dump / name.replace("/", "-")
            stem.parent.mkdir(parents=True, exist_ok=True)
            for ext in ("ttgir", "ptx"):
                stem.with_suffix(f".{ext}").write_text(kernel.asm[ext])
            stem.with_suffix(".sass").write_text(sass_of(kernel.asm["cubin"]))
    json.dump(report, sys.stdout, indent=1)
    print()


if __name__ == "__main__":
    main()
