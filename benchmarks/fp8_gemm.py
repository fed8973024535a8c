"""FP8 block-scaled GEMM, quantization and FP8Linear throughput against bf16, in one run.

    python benchmarks/fp8_gemm.py            # a GPU with FP8 tensor cores (sm_89+), e.g. an H100
    python benchmarks/fp8_gemm.py --quick    # CPU smoke run of the PyTorch path at small shapes

GEMM rows (TFLOP/s from the median time: triton.testing.do_bench on a GPU):
- bf16: torch.matmul of bf16 operands (the baseline);
- scaled_mm_rowwise: torch's F.scaled_mm with one scale per row of A and of B (RowWise);
- cublas_block, cublas_block+quant, cublas_dgrad, cublas_wgrad: torch's block-scaled F.scaled_mm
  (cuBLAS, sm_90) on the same operands, as FP8Linear's "cublas" backend calls it;
- fp8_block: effllm's block-scaled GEMM on pre-quantized operands;
- fp8_block+quant: the same plus quantizing the activation (1x128) inside the timed region;
- fp8_dgrad: the input-gradient layout as FP8Linear runs it (Wᵀ K-major, written by the weight
  quantization, `quant_blocks_t`); fp8_dgrad_strided reads the transposed view of W instead;
  fp8_wgrad: both operands tiled along the tokens (K = M there). Each is checked against fp8_gemm_ref on a slice of rows.
Shapes: 4096³, 8192³ and DeepSeek-V3's M=4096 with (N, K) = (7168, 16384), (4096, 7168) and
(2112, 7168). The quantization kernels report GB/s as bytes read plus bytes written. FP8Linear
forward+backward is compared with a bf16 nn.Linear at hidden 4096 and 8192 (M=8192 tokens): the
auto backend, then each of triton, cublas and the rowwise and tensorwise recipes, and the peer torchao's
Float8BlockwiseLinear where torchao imports (else the reason is recorded).
Results: benchmarks/results/fp8_gemm/<device>-<size>.json and report.md.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
from common import base_parser, environment, finish, parse_args, time_fn, write_markdown

from effllm.fp8 import FP8Linear
from effllm.kernels.backends import fp8_backend
from effllm.kernels.fp8_gemm import fp8_gemm, fp8_gemm_ref, tuned_configs
from effllm.kernels.fp8_quant import (
    quant_blocks,
    quant_blocks_ref,
    quant_blocks_t,
    quant_rows,
    quant_rows_and_cols,
    quant_rows_ref,
)
from effllm.kernels.scaled_mm import blockwise_mm, quant_rowwise, rowwise_mm

RESULTS = Path(__file__).resolve().parent / "results" / "fp8_gemm"
SHAPES = {"gpu": [(4096, 4096, 4096), (8192, 8192, 8192), (4096, 7168, 16384), (4096, 4096, 7168), (4096, 2112, 7168)],
          "quick": [(256, 256, 256), (128, 384, 512)]}
HIDDEN = {"gpu": [(8192, 4096), (8192, 8192)], "quick": [(256, 256)]}


def median_s(fn, device: torch.device) -> float:
    if device.type == "cuda":
        import triton.testing

        return triton.testing.do_bench(fn, warmup=25, rep=200, return_mode="median") / 1e3
    return time_fn(fn, device, warmup=2, repeats=5)["median_s"]


def gemm_rows(m: int, n: int, k: int, device: torch.device, gpu: bool) -> dict:
    a = torch.randn(m, k, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, k, device=device, dtype=torch.bfloat16)
    flops = 2 * m * n * k
    checks = {}
    rows = {"bf16": median_s(lambda: a @ b.t(), device)}
    qa, sa = quant_rows(a) if gpu else quant_rows_ref(a)
    qb, sb = quant_blocks(b) if gpu else quant_blocks_ref(b)
    gemm = fp8_gemm if gpu else fp8_gemm_ref
    rows["fp8_block"] = median_s(lambda: gemm(qa, sa, qb, sb), device)
    quant = quant_rows if gpu else quant_rows_ref
    rows["fp8_block+quant"] = median_s(lambda: gemm(*quant(a), qb, sb), device)
    # The backward layouts of a linear y (m, n) = x (m, k) · Wᵀ, same FLOPs: dgrad reduces over n
    # (block scales need n % 128 == 0), wgrad sums over the m tokens with both operands tiled along them.
    dy = torch.randn(m, n, device=device, dtype=torch.bfloat16)
    qt_dy, st_dy = quant(dy.t().contiguous())
    qt_a, st_a = quant(a.t().contiguous())
    rows["fp8_wgrad"] = median_s(lambda: gemm(qt_dy, st_dy, qt_a, st_a, torch.float32, b_row_scales=True), device)
    dgrad = n % 128 == 0
    if dgrad:
        qdy, sdy = quant(dy)
        qbt = quant_blocks_t(b)[2] if gpu else qb.t().contiguous()  # K-major Wᵀ
        rows["fp8_dgrad"] = median_s(lambda: gemm(qdy, sdy, qbt, sb.t(), torch.bfloat16), device)
        rows["fp8_dgrad_strided"] = median_s(lambda: gemm(qdy, sdy, qb.t(), sb.t(), torch.bfloat16), device)
    else:
        rows["fp8_dgrad"] = f"n/a: dgrad reduces over n={n}, not a multiple of 128"
    if gpu:
        (fa, ra), (fb, rb) = quant_rowwise(a), quant_rowwise(b)
        cublas = {  # torch's F.scaled_mm: row-wise, and block-scaled (cuBLAS, sm_90) for the three products
            "scaled_mm_rowwise": lambda: rowwise_mm(fa, ra, fb, rb),
            "cublas_block": lambda: blockwise_mm(qa, sa, qb, sb),
            "cublas_block+quant": lambda: blockwise_mm(*quant(a), qb, sb),
            "cublas_wgrad": lambda: blockwise_mm(qt_dy, st_dy, qt_a, st_a, torch.float32, b_row_scales=True),
        }
        if dgrad:
            cublas["cublas_dgrad"] = lambda: blockwise_mm(qdy, sdy, qbt, sb.t())
        for name, fn in cublas.items():
            try:
                rows[name] = median_s(fn, device)
            except (RuntimeError, AttributeError, TypeError, ValueError) as e:
                rows[name] = f"unavailable: {type(e).__name__}: {str(e).splitlines()[0][:120]}"
    if gpu:  # the kernel must compute its reference's function at this shape (a slice of rows)
        rel = lambda x, y: ((x.float() - y.float()).norm() / y.float().norm()).item()  # noqa: E731
        same = lambda *args, **kw: rel(fp8_gemm(*args, **kw), fp8_gemm_ref(*args, **kw))  # noqa: E731
        checks["fwd"] = same(qa[:256], sa[:256], qb, sb)
        if isinstance(rows.get("cublas_block"), float):  # torch's cuBLAS path against the same reference
            checks["cublas_fwd"] = rel(blockwise_mm(qa[:256], sa[:256], qb, sb), fp8_gemm_ref(qa[:256], sa[:256], qb, sb))
            checks["cublas_wgrad"] = rel(blockwise_mm(qt_dy[:256], st_dy[:256], qt_a, st_a, torch.float32, True),
                                         fp8_gemm_ref(qt_dy[:256], st_dy[:256], qt_a, st_a, torch.float32, True))
            if dgrad:
                checks["cublas_dgrad"] = rel(blockwise_mm(qdy[:256], sdy[:256], qbt, sb.t()),
                                             fp8_gemm_ref(qdy[:256], sdy[:256], qbt, sb.t()))
        checks["wgrad"] = same(qt_dy[:256], st_dy[:256], qt_a, st_a, torch.float32, b_row_scales=True)
        if dgrad:
            checks["dgrad"] = same(qdy[:256], sdy[:256], qbt, sb.t())
            checks["dgrad_strided"] = same(qdy[:256], sdy[:256], qb.t(), sb.t())
    out = {name: ({"median_s": t, "tflops": flops / t / 1e12} if isinstance(t, float) else t) for name, t in rows.items()}
    if checks:
        out["rel_err_vs_ref"] = checks
        if max(checks.values()) > 1e-3:
            raise SystemExit(f"fp8_gemm disagrees with its reference at {m}x{n}x{k}: {checks}")
    return out


def quant_rows_gbps(m: int, k: int, device: torch.device) -> dict:
    x = torch.randn(m, k, device=device, dtype=torch.bfloat16)
    out = {}
    t = median_s(lambda: quant_rows(x), device)
    out["quant_rows"] = {"median_s": t, "gb_per_s": (2 * m * k + m * k + 4 * m * k // 128) / t / 1e9}
    t = median_s(lambda: quant_rows_and_cols(x), device)
    out["quant_rows_and_cols"] = {"median_s": t, "gb_per_s": (2 * m * k + 2 * (m * k + 4 * m * k // 128)) / t / 1e9}
    t = median_s(lambda: quant_blocks_t(x), device)  # a weight: 128x128 blocks, q and its K-major transpose
    out["quant_blocks_t"] = {"median_s": t, "gb_per_s": (2 * m * k + 2 * m * k + 4 * m * k // 128**2) / t / 1e9}
    return out


def linear_rows(m: int, h: int, device: torch.device) -> dict:
    x = torch.randn(m, h, device=device, dtype=torch.bfloat16, requires_grad=True)
    dy = torch.randn(m, h, device=device, dtype=torch.bfloat16)
    dense = torch.nn.Linear(h, h, bias=False, device=device, dtype=torch.bfloat16)
    fp8 = FP8Linear.from_linear(dense)

    def step(layer):
        def run():
            x.grad = None
            layer.weight.grad = None
            layer(x).backward(dy)
        return run

    t_bf16, t_fp8 = median_s(step(dense), device), median_s(step(fp8), device)
    out = {"bf16_linear_s": t_bf16, "fp8_linear_s": t_fp8, "fp8_speedup": t_bf16 / t_fp8,
           "fp8_backend": fp8_backend(device)}
    if device.type != "cuda":
        return out
    variants = {"triton": lambda: FP8Linear.from_linear(dense, backend="triton"),
                "cublas": lambda: FP8Linear.from_linear(dense, backend="cublas"),
                "rowwise": lambda: FP8Linear.from_linear(dense, recipe="rowwise"),
                "tensorwise": lambda: FP8Linear.from_linear(dense, recipe="tensorwise"),
                "torchao_blockwise": lambda: torchao_blockwise(dense)}  # the peer a user would otherwise pick
    for name, make in variants.items():
        try:
            t = median_s(step(make()), device)
            out[f"{name}_s"], out[f"{name}_speedup"] = t, t_bf16 / t
        except Exception as e:  # a peer that does not import or run here is recorded, not fatal
            out[f"{name}_speedup"] = f"unavailable: {type(e).__name__}: {str(e).splitlines()[0][:120]}"
    return out


def torchao_blockwise(dense: torch.nn.Linear) -> torch.nn.Module:
    """torchao's block-scaled FP8 training linear (torchao.prototype.blockwise_fp8_training) holding
    `dense`'s weight; raises where torchao is not installed or lacks it."""
    from torchao.prototype.blockwise_fp8_training.linear import Float8BlockwiseLinear

    if hasattr(Float8BlockwiseLinear, "from_linear"):
        return Float8BlockwiseLinear.from_linear(dense)
    layer = Float8BlockwiseLinear(dense.in_features, dense.out_features, bias=False)  # its dtype= is a check only
    layer = layer.to(device=dense.weight.device, dtype=dense.weight.dtype)
    with torch.no_grad():
        layer.weight.copy_(dense.weight)
    return layer


def write_report(folder: Path) -> Path:
    lines = ["# FP8 block-scaled GEMM", "", "Written by `benchmarks/fp8_gemm.py` from the JSON files beside it.", ""]
    for path in sorted(folder.glob("*.json")):
        r = json.loads(path.read_text())
        lines += [f"## {r['device']}, {r['size']} ({r['date']})", "", f"torch {r['torch']}, triton {r['triton']}, "
                  f"commit `{r['commit']}`.", "",
                  "| M x N x K | bf16 | scaled_mm rowwise | fp8 block | fp8 block + quant | fp8 dgrad "
                  "| fp8 dgrad, strided Wᵀ | fp8 wgrad |",
                  "|---|---|---|---|---|---|---|---|"]
        for shape, row in r["gemm"].items():
            cell = lambda v: f"{v['tflops']:.1f}" if isinstance(v, dict) else "n/a"  # noqa: E731
            lines.append(f"| {shape} | {cell(row['bf16'])} | {cell(row.get('scaled_mm_rowwise'))} | "
                         f"{cell(row['fp8_block'])} | {cell(row['fp8_block+quant'])} | {cell(row.get('fp8_dgrad'))} | "
                         f"{cell(row.get('fp8_dgrad_strided'))} | {cell(row.get('fp8_wgrad'))} |")
        lines += ["", "TFLOP/s from median times. Ratios: " + ", ".join(f"{k} = {v:.2f}" for k, v in r["ratios"].items()), ""]
        if r.get("quant"):
            lines += ["Quantization: " + ", ".join(f"{k} {v['gb_per_s']:.0f} GB/s" for k, v in r["quant"].items()), ""]
        lines += ["FP8Linear fwd+bwd vs bf16 nn.Linear: " + ", ".join(
            f"{k}: {v['fp8_speedup']:.2f}x" for k, v in r["linear"].items()), ""]
    return write_markdown(folder, lines)


def main() -> None:
    parser = base_parser(__doc__, RESULTS, "CPU smoke run of the PyTorch path")
    args = parse_args(parser)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    gpu = not args.quick
    if gpu and (device.type != "cuda" or torch.cuda.get_device_capability() < (8, 9)):
        sys.exit("the FP8 kernels need a GPU with FP8 tensor cores (sm_89+); use --quick for a CPU smoke run")
    size = "quick" if args.quick else "gpu"
    gemm = {}
    for m, n, k in SHAPES[size]:
        gemm[f"{m}x{n}x{k}"] = gemm_rows(m, n, k, device, gpu)
        print(f"{m}x{n}x{k}: " + ", ".join(f"{name} {v['tflops']:.1f}" for name, v in gemm[f"{m}x{n}x{k}"].items()
                                            if isinstance(v, dict) and "tflops" in v) + " TFLOP/s", flush=True)
    linear = {f"hidden {h}, {m} tokens": linear_rows(m, h, device) for m, h in HIDDEN[size]}
    quant = quant_rows_gbps(8192, 8192, device) if gpu else None
    ratios = {}
    big = "8192x8192x8192" if gpu else next(iter(gemm))
    ratios[f"fp8_block / bf16 at {big}"] = gemm[big]["fp8_block"]["tflops"] / gemm[big]["bf16"]["tflops"]
    for shape, row in gemm.items():
        for name in ("cublas_block", "scaled_mm_rowwise"):
            if isinstance(row.get(name), dict):
                ratios[f"{name} / bf16 at {shape}"] = row[name]["tflops"] / row["bf16"]["tflops"]
    for name, row in linear.items():
        ratios[f"FP8Linear / bf16 speed-up, {name}"] = row["fp8_speedup"]
        for variant in ("triton", "cublas", "rowwise", "tensorwise", "torchao_blockwise"):
            if isinstance(row.get(f"{variant}_speedup"), float):
                ratios[f"FP8Linear {variant} / bf16, {name}"] = row[f"{variant}_speedup"]
    result = {"bench": "fp8_gemm", "size": size, **environment(device, args.commit),
              "path": "triton kernels" if gpu else "PyTorch reference path (timings are not FP8 hardware figures)",
              "gemm": gemm, "quant": quant, "linear": linear, "ratios": ratios,
              "autotuned_configs": tuned_configs() if gpu else None}
    finish(args.out, result, size, write_report)


if __name__ == "__main__":
    main()
