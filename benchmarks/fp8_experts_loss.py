"""What FP8 experts cost in validation loss, measured so that the answer is not seed noise.

    python benchmarks/fp8_experts_loss.py --quick      # 3 paired seeds, the ablation and the control, 100 steps
    python benchmarks/fp8_experts_loss.py --seeds 1,2,3,4,5 --steps 200 --no-ablate --no-control

The model is the one of tests/test_fp8_experts.py: width 128, 2 layers, layer 1 a DeepSeekMoE
layer of 4 routed experts of 128 (top-2) and one shared expert, trained on the Python standard
library's `email` package (2,048 tokens per step, lr 1e-3, cosine). Three measurements, each run
on the trainer itself (effllm.train.train):

1. paired: an fp32 run and an FP8 run (`fp8=True`) from each seed; each pair's relative val-loss
   difference, and their mean and spread. The spread says how far one pair can be from the mean.
2. ablation: from the first seed, the FP8 run with exactly one of the routed experts' twelve GEMM
   operands quantized (the other eleven in fp32; the rest of the model in FP8 as usual), for each
   operand in turn: which quantization costs what. The experts here run as quantize-dequantize
   emulations of DeepSeek-V3's scaling (1x128 activation and gradient tiles, 128x128 weight
   blocks, 128-token tiles along each expert's tokens for the weight gradients); with all twelve
   quantized they land where the real FP8 experts land.
3. control: fp32 runs with 1% Gaussian noise on the dense weights' gradients (no FP8 anywhere):
   how far a run moves when its gradients are perturbed about as much as FP8 perturbs them.

The operands, as <projection>_<GEMM>_<operand>: up (gate and up, one GEMM) and down; fwd (the
forward: input x, weight w), dgrad (the input gradient: output gradient dy, weight w), wgrad (the
weight gradient: dy and x, both tiled along the expert's tokens). Results:
runs/bench/fp8_experts_loss-<time>/ (JSON and report.md), or with
--update-record benchmarks/results/fp8_experts_loss/ (the training runs then go to
runs/bench/fp8_experts_loss-scratch/, never into the record).
"""

from __future__ import annotations

import json
import statistics
import sys
import sysconfig
import time
from dataclasses import replace
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RUNS_ROOT, base_parser, environment, parse_args, write_markdown  # noqa: E402

from effllm.kernels.fp8_quant import TILE, dequant_blocks, dequant_rows, quant_blocks_ref, quant_rows_ref  # noqa: E402
from effllm.model import ModelConfig  # noqa: E402
from effllm.moe import MoEConfig, RoutedExperts, gather_rows  # noqa: E402
from effllm.prepare import PrepareConfig, is_prepared, prepare  # noqa: E402
from effllm.train import OptimConfig, TrainConfig, train  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results" / "fp8_experts_loss"
# Each GEMM's two operands, in AblatedGroupedMM's flag order: the forward reads the input x and the
# weight w, the input gradient the output gradient dy and w, the weight gradient dy and x.
GEMM_OPERANDS = (("fwd", "x"), ("fwd", "w"), ("dgrad", "dy"), ("dgrad", "w"), ("wgrad", "dy"), ("wgrad", "x"))
OPERANDS = tuple(f"{proj}_{gemm}_{op}" for proj in ("up", "down") for gemm, op in GEMM_OPERANDS)
MODEL = ModelConfig(vocab_size=256, dim=128, n_layers=2, n_heads=4, max_seq_len=64, ffn="moe", first_k_dense=1,
                    moe=MoEConfig(n_routed_experts=4, top_k=2, expert_dim=128, n_shared_experts=1))


def fake_rows(x: torch.Tensor) -> torch.Tensor:
    """x rounded as an E4M3 operand with 1x128 tiles along its rows (fp32 values)."""
    return dequant_rows(*quant_rows_ref(x))


def fake_cols(x: torch.Tensor) -> torch.Tensor:
    """x rounded with 128-row tiles along its first dim (the weight gradient's token tiles, zero-padded)."""
    M = x.shape[0]
    return fake_rows(F.pad(x.t(), (0, (-M) % TILE)).contiguous())[:, :M].t()


def fake_blocks(w: torch.Tensor) -> torch.Tensor:
    """Each expert's weight rounded per 128x128 block."""
    return torch.stack([dequant_blocks(*quant_blocks_ref(wg)) for wg in w])


class AblatedGroupedMM(torch.autograd.Function):
    """y[rows of g] = x[rows of g] · w[g]ᵀ with each of its six operands rounded to E4M3 or not
    (flags: fwd x, fwd w, dgrad dy, dgrad w, wgrad dy, wgrad x)."""

    @staticmethod
    def forward(ctx, x, w, bounds, flags):
        ctx.save_for_backward(x, w)
        ctx.bounds, ctx.flags = bounds, flags
        xa, wa = fake_rows(x) if flags[0] else x, fake_blocks(w) if flags[1] else w
        return torch.cat([xa[lo:hi] @ wa[g].t() for g, (lo, hi) in enumerate(zip(bounds, bounds[1:]))])

    @staticmethod
    def backward(ctx, dy):
        x, w = ctx.saved_tensors
        b, f = ctx.bounds, ctx.flags
        dya, wa = fake_rows(dy) if f[2] else dy, fake_blocks(w) if f[3] else w
        dx = torch.cat([dya[lo:hi] @ wa[g] for g, (lo, hi) in enumerate(zip(b, b[1:]))])
        dw = torch.zeros_like(w)
        for g, (lo, hi) in enumerate(zip(b, b[1:])):
            if hi > lo:
                gy = fake_cols(dy[lo:hi]) if f[4] else dy[lo:hi]
                gx = fake_cols(x[lo:hi]) if f[5] else x[lo:hi]
                dw[g] = gy.t() @ gx
        return dx, dw, None, None


class AblatedExperts(RoutedExperts):
    """RoutedExperts (the same Parameters) whose GEMM operands are rounded to E4M3 as `quantized` says."""

    def __init__(self, experts: RoutedExperts, quantized: set[str]):
        n, hidden, dim = experts.w1.shape
        super().__init__(dim, hidden, n, weights=(experts.w1, experts.w3, experts.w2))
        self.quantized = quantized

    def flags(self, proj: str) -> tuple[bool, ...]:
        return tuple(f"{proj}_{gemm}_{op}" in self.quantized for gemm, op in GEMM_OPERANDS)

    def forward(self, x, offsets, src=None):
        rows = gather_rows(x, src) if src is not None else x
        bounds = [0] + offsets.tolist()
        gate_up = AblatedGroupedMM.apply(rows, torch.cat([self.w1, self.w3], 1), bounds, self.flags("up"))
        hidden = self.w1.shape[1]
        h = F.silu(gate_up[:, :hidden]) * gate_up[:, hidden:]
        return AblatedGroupedMM.apply(h, self.w2, bounds, self.flags("down"))


def ablate(quantized: set[str]):
    """A model hook: every MoE layer's routed experts become AblatedExperts."""
    def hook(model):
        for layer in model.moe_layers().values():
            layer.experts = AblatedExperts(layer.experts, quantized)
    return hook


def gradient_noise(rel: float, seed: int):
    """A model hook: Gaussian noise of `rel` times each gradient element on the dense weights."""
    def hook(model):
        g = torch.Generator().manual_seed(seed)
        for name, p in model.named_parameters():
            if p.dim() == 2 and "experts" not in name and "router" not in name:
                p.register_hook(lambda grad: grad * (1 + rel * torch.randn(grad.shape, generator=g)))
    return hook


def run(cfg: TrainConfig, hook=None) -> float:
    return train(cfg, model_hook=hook)["final_val_loss"]


def write_report(folder: Path, r: dict) -> Path:
    c = r["config"]
    lines = ["# What FP8 experts cost in validation loss", "",
             f"Written by `benchmarks/fp8_experts_loss.py` on {r['device']} (torch {r['torch']}, commit {r['commit']}, "
             f"{r['date']}). Model of tests/test_fp8_experts.py, {c['steps']} steps of {c['tokens_per_step']} tokens.",
             "", "## Paired seeds: FP8 against fp32", "", "| seed | fp32 val | FP8 val | FP8 - fp32 |", "|---|---|---|---|"]
    for p in r["paired"]:
        lines.append(f"| {p['seed']} | {p['fp32']:.4f} | {p['fp8']:.4f} | {100 * p['gap']:+.2f}% |")
    s = r["paired_summary"]
    lines += ["", f"Mean {100 * s['mean']:+.2f}%, standard deviation of one pair {100 * s['std']:.2f}%, standard "
              f"error of the mean {100 * s['stderr']:.2f}% ({s['n']} pairs).", ""]
    if r.get("ablation"):
        base = r["ablation"]["fp32"]
        lines += [f"## One operand quantized at a time (seed {r['ablation']['seed']})", "",
                  f"fp32: {base:.4f}. Every other GEMM of the model in FP8; of the experts' operands only the one named.",
                  "", "| experts' operands in FP8 | val | vs fp32 |", "|---|---|---|"]
        for name, val in r["ablation"]["rows"].items():
            lines.append(f"| {name} | {val:.4f} | {100 * (val - base) / base:+.2f}% |")
        lines.append("")
    if r.get("control"):
        base = r["control"]["fp32"]
        lines += [f"## Control: 1% noise on the dense weights' gradients, no FP8 (seed {r['control']['seed']})", "",
                  "| noise seed | val | vs fp32 |", "|---|---|---|"]
        for k, val in enumerate(r["control"]["rows"]):
            lines.append(f"| {k} | {val:.4f} | {100 * (val - base) / base:+.2f}% |")
        lines.append("")
    return write_markdown(folder, lines)


def main() -> None:
    parser = base_parser(__doc__, RESULTS, "100 steps, seeds 1,2,3 (the default)")
    parser.add_argument("--seeds", default="1,2,3", help="comma-separated seeds of the paired runs")
    parser.add_argument("--steps", type=int, default=100, help="optimizer steps per run")
    parser.add_argument("--no-ablate", dest="ablate", action="store_false", help="skip the per-operand ablation")
    parser.add_argument("--no-control", dest="control", action="store_false", help="skip the gradient-noise control")
    parser.add_argument("--data-dir", default=None, help="prepared data (default: the stdlib's email package, "
                                                         "prepared into the results folder's data/)")
    args = parse_args(parser)
    torch.set_num_threads(1)  # the runs compare floats: one thread, the test suite's setting
    # The training runs and the prepared data are scratch, never part of the record: beside the
    # results for a run of one's own, under runs/bench/ (git-ignored) for --update-record.
    scratch = RUNS_ROOT / "fp8_experts_loss-scratch" if args.update_record else args.out
    data = Path(args.data_dir) if args.data_dir else scratch / "data"
    if not is_prepared(data):
        email = Path(sysconfig.get_paths()["stdlib"]) / "email"
        prepare(PrepareConfig(sources=(str(email),), license="PSF-2.0", extensions=(".py",), val_fraction=0.15,
                              out=str(data)), progress=False)
    base = TrainConfig(model=MODEL, optim=OptimConfig(lr=1e-3, warmup_steps=20), data_dir=str(data), batch_size=32,
                       seq_len=64, max_steps=args.steps, log_interval=10, eval_interval=args.steps, eval_tokens=16384,
                       ckpt_interval=0, progress=False, device="cpu")
    runs = scratch / f"runs-{time.strftime('%Y%m%d-%H%M%S')}"  # the training runs, new for every invocation
    start = time.perf_counter()

    def cfg(name: str, seed: int, **kw) -> TrainConfig:
        return replace(base, out_dir=str(runs / name), seed=seed, **kw)

    seeds = [int(s) for s in args.seeds.split(",")]
    paired = []
    for seed in seeds:
        full, fp8 = run(cfg(f"fp32-{seed}", seed)), run(cfg(f"fp8-{seed}", seed, fp8=True))
        paired.append({"seed": seed, "fp32": full, "fp8": fp8, "gap": (fp8 - full) / full})
        print(f"seed {seed}: fp32 {full:.4f}, FP8 {fp8:.4f} ({100 * paired[-1]['gap']:+.2f}%)", flush=True)
    gaps = [p["gap"] for p in paired]
    std = statistics.stdev(gaps) if len(gaps) > 1 else 0.0
    result = {"bench": "fp8_experts_loss", **environment(torch.device("cpu"), args.commit),
              "config": {"model": "tests/test_fp8_experts.py FP8_MOE_MODEL", "steps": args.steps,
                         "tokens_per_step": base.tokens_per_step, "lr": base.optim.lr, "data": str(data)},
              "paired": paired, "paired_summary": {"n": len(gaps), "mean": statistics.mean(gaps), "std": std,
                                                   "stderr": std / len(gaps) ** 0.5}}
    seed, full = seeds[0], paired[0]["fp32"]
    if args.ablate:
        rows = {"none (experts in fp32)": run(cfg("none", seed, fp8=True), ablate(set())),
                "all twelve": run(cfg("all", seed, fp8=True), ablate(set(OPERANDS)))}
        for name in OPERANDS:
            rows[name] = run(cfg(name, seed, fp8=True), ablate({name}))
            print(f"only {name}: {rows[name]:.4f} ({100 * (rows[name] - full) / full:+.2f}%)", flush=True)
        result["ablation"] = {"seed": seed, "fp32": full, "rows": rows}
    if args.control:
        rows = [run(cfg(f"noise-{k}", seed), gradient_noise(0.01, 1000 + k)) for k in range(3)]
        result["control"] = {"seed": seed, "fp32": full, "relative_noise": 0.01, "rows": rows}
    result["elapsed_s"] = time.perf_counter() - start
    (args.out / "cpu.json").write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {args.out / 'cpu.json'} and {write_report(args.out, result)}")


if __name__ == "__main__":
    main()
