"""The efficiency report: tokens and loss per device-hour of DeepSeek-style models against dense.

    python benchmarks/tokens_per_gpu_hour.py --quick               # CPU: the tiny recipes, throughput
    python benchmarks/tokens_per_gpu_hour.py --quick --quality     # + equal-time training runs (~15 min)
    python benchmarks/tokens_per_gpu_hour.py --quality             # one GPU: the 600m recipes

The models, side by side in one invocation (recipes/):
- dense, equal active: dense_tiny (quick) or dense_120m (GPU): the baseline of every ratio;
- dense, equal total: dense_tiny_wide or dense_600m;
- DeepSeek-style (MLA + MoE + MTP): deepseek_tiny or deepseek_600m;
- the same in FP8: deepseek_tiny_fp8 or deepseek_600m with fp8=True, only on GPUs with FP8
  tensor cores (sm_89+). Elsewhere FP8 runs as the PyTorch reference path, whose speed says
  nothing about FP8 hardware, so the row is recorded as skipped with the reason. On the GPU its
  bf16 twin (deepseek_600m) is in the same run; the quick FP8 recipe is wider than deepseek_tiny.

Throughput: the trainer's own run (effllm.run.build_run) and step (step_losses + optimizer_update:
every micro-batch, the MoE balance and MTP losses, clipping, AdamW, the bias update) on the prepared
data, timed step by step after warm-up; the median gives tokens/s and tokens per device-hour.
Also: peak memory (GPU), model FLOPs per token (effllm.flops: attention and active experts,
MTP included, x3 for training) and MFU against the device's dense bf16 peak (GPU, not for FP8).

--quality trains each model for the same wall-clock budget with the trainer (each recipe's
schedule compressed into the number of steps its measured throughput allows in the budget), on
the same data, and records validation loss against device-hours (training time without the
evaluations). The compute multiplier of a model is the baseline's training time divided by the
time that model needed to reach the baseline's final validation loss (interpolated between
evaluations).

Output: benchmarks/results/<name>/results.json and report.md, throughput.png and val_loss.png
(`python benchmarks/report.py <folder>` rebuilds the report and plots from the JSON). The unit
reads "GPU-hour" on a GPU and "CPU-hour" on a CPU.
"""

from __future__ import annotations

import gc
import json
import math
import re
import shutil
import sys
from dataclasses import asdict, replace
from pathlib import Path

import torch
from common import base_parser, environment, parse_args, time_fn
from report import write_report

from effllm.cli import load_recipe
from effllm.data import TokenDataset
from effllm.flops import device_name, mfu, peak_bf16_flops, tokens_per_device_hour, train_flops_per_token
from effllm.parallelize import DistEnv
from effllm.run import build_run, optimizer_update, step_losses
from effllm.train import train

RESULTS = Path(__file__).resolve().parent / "results"

# (label, role, recipe, overrides). The first row is the baseline of every ratio.
MODELS = {
    "quick": [("dense, equal active", "dense_active", "dense_tiny", {}),
              ("dense, equal total", "dense_total", "dense_tiny_wide", {}),
              ("DeepSeek-style", "deepseek", "deepseek_tiny", {}),
              ("DeepSeek-style FP8", "deepseek_fp8", "deepseek_tiny_fp8", {})],
    "gpu": [("dense, equal active", "dense_active", "dense_120m", {}),
            ("dense, equal total", "dense_total", "dense_600m", {}),
            ("DeepSeek-style", "deepseek", "deepseek_600m", {}),
            ("DeepSeek-style FP8", "deepseek_fp8", "deepseek_600m", {"fp8": True})],
}


def fp8_supported(device: torch.device) -> tuple[bool, str]:
    if device.type != "cuda":
        return False, "no FP8 tensor cores on a CPU: the reference path's speed says nothing about FP8 hardware"
    if torch.cuda.get_device_capability(device) < (8, 9):
        return False, f"{device_name(device)} has no FP8 tensor cores (needs compute capability 8.9+)"
    return True, ""


def measure_throughput(cfg, device: torch.device, warmup: int, repeats: int) -> dict:
    """Median training-step time of `cfg` (a TrainConfig) on its own data, and what follows from it."""
    data = TokenDataset(cfg.data_dir)
    run = build_run(cfg, DistEnv(), device)  # the trainer's own setup, one process
    amp, fp8_report, env = run.amp, run.fp8_report, DistEnv()
    moe_layers = run.model.moe_layers()
    steps = iter(range(10**9))

    def step() -> None:
        i = next(steps)
        sums = step_losses(run, cfg, data, env, device, i)
        if not math.isfinite(sums["loss"].item()):  # the trainer's own check (and host sync)
            raise RuntimeError(f"loss is not finite at benchmark step {i}")
        optimizer_update(run.model, run.optimizer, cfg.optim.grad_clip, moe_layers)

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    timing = time_fn(step, device, warmup, repeats)
    tok_s = cfg.tokens_per_step / timing["median_s"]
    flops = train_flops_per_token(cfg.model, cfg.seq_len)
    peak = peak_bf16_flops(device_name(device)) if amp is torch.bfloat16 and not cfg.fp8 else None
    out = {"step_s_median": timing["median_s"], "step_s_p10": timing["p10_s"], "step_s_p90": timing["p90_s"],
           "warmup_steps": warmup, "timed_steps": repeats, "tokens_per_step": cfg.tokens_per_step,
           "tokens_per_s": tok_s, "tokens_per_device_hour": tokens_per_device_hour(tok_s),
           "train_flops_per_token": flops, "mfu": mfu(tok_s, flops, peak),
           "peak_mem_bytes": torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None,
           "params": run.param_counts, "precision": "fp8" if cfg.fp8 else str(amp or torch.float32),
           "fp8_converted": len(fp8_report["converted"]) if fp8_report else None}
    return out


def release_memory(device: torch.device) -> None:
    """Free the previous model's memory before the next one is measured."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def equal_time_run(cfg, budget_s: float, tokens_per_s: float, run_dir: Path, evals: int) -> dict:
    """Train `cfg` for about `budget_s` seconds: its schedule squeezed into the steps its measured
    throughput allows. Returns the validation curve (train_s, device-hours, val loss) and the summary."""
    steps = max(20, round(budget_s * tokens_per_s / cfg.tokens_per_step))
    warmup = min(cfg.optim.warmup_steps, max(1, steps // 10))
    run_cfg = replace(cfg, max_steps=steps, optim=replace(cfg.optim, warmup_steps=warmup),
                      eval_interval=max(1, steps // evals), log_interval=max(1, steps // evals), ckpt_interval=0,
                      out_dir=str(run_dir), resume=False, progress=False)
    shutil.rmtree(run_dir, ignore_errors=True)
    summary = train(run_cfg)
    curve = [{"step": r["step"], "train_s": r["train_s"], "device_hours": r["train_s"] / 3600, "val_loss": r["val_loss"]}
             for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines()) if "val_loss" in r]
    return {"steps": steps, "warmup_steps": warmup, "budget_s": budget_s, "curve": curve,
            "final_val_loss": summary["final_val_loss"], "train_s": summary["train_s"],
            "tokens_seen": summary["tokens_seen"]}


def time_to_reach(curve: list[dict], target: float) -> float | None:
    """Training seconds at which the validation curve first reaches `target`, interpolated linearly
    between evaluations (from step 0, where nothing is reached); None if it never does."""
    prev_t, prev_v = 0.0, math.inf
    for point in curve:
        t, v = point["train_s"], point["val_loss"]
        if v <= target:
            if math.isinf(prev_v):
                return t
            return prev_t + (t - prev_t) * (prev_v - target) / (prev_v - v)
        prev_t, prev_v = t, v
    return None


def ratios(rows: list[dict]) -> dict:
    """The issue's ratios, each against the first (dense, equal active) row of the same run."""
    by_role = {r["role"]: r for r in rows if r.get("throughput")}
    base = by_role.get("dense_active")
    out = {}
    if base is None:
        return out
    t = lambda role: by_role[role]["throughput"]["tokens_per_s"]  # noqa: E731
    if "deepseek" in by_role:
        out["deepseek / dense equal-active, tokens per device-hour"] = t("deepseek") / t("dense_active")
    if "deepseek" in by_role and "dense_total" in by_role:
        out["deepseek / dense equal-total, tokens per device-hour"] = t("deepseek") / t("dense_total")
    if "deepseek_fp8" in by_role and "deepseek" in by_role:
        out["deepseek FP8 / bf16, tokens/s"] = t("deepseek_fp8") / t("deepseek")
    if base.get("quality"):
        target = base["quality"]["final_val_loss"]
        for role, row in by_role.items():
            q = row.get("quality")
            if role == "dense_active" or not q:
                continue
            reached = time_to_reach(q["curve"], target)
            row["quality"]["time_to_baseline_loss_s"] = reached
            if reached is not None:
                out[f"{role}: compute multiplier (baseline time / time to reach its final loss)"] = (
                    base["quality"]["train_s"] / reached)
        fp8, bf16 = by_role.get("deepseek_fp8"), by_role.get("deepseek")
        if fp8 and bf16 and fp8.get("quality") and bf16.get("quality") and fp8["recipe"] == bf16["recipe"]:
            out["deepseek FP8 vs bf16, final val loss relative difference"] = (
                abs(fp8["quality"]["final_val_loss"] - bf16["quality"]["final_val_loss"]) / bf16["quality"]["final_val_loss"])
    return out


def main() -> None:
    parser = base_parser(__doc__, RESULTS, "CPU-sized tiny recipes")
    parser.add_argument("--name", default=None, help="results folder name under --out (default efficiency-<device>-<size>)")
    parser.add_argument("--data-dir", default=str(RESULTS.parent.parent / "data" / "stdlib"),
                        help="prepared data (effllm prepare; default: the repository's data/stdlib, as make prepares it)")
    parser.add_argument("--quality", action="store_true", help="also train each model for the same wall-clock budget")
    parser.add_argument("--budget-s", type=float, default=None, help="training seconds per model (default 150 quick, 1200 gpu)")
    parser.add_argument("--evals", type=int, default=10, help="validation points per quality run")
    parser.add_argument("--warmup", type=int, default=None, help="untimed steps per model (default 3 quick, 10 gpu)")
    parser.add_argument("--repeats", type=int, default=None, help="timed steps per model (default 8 quick, 30 gpu)")
    parser.add_argument("--compile", action="store_true", help="torch.compile every model")
    parser.add_argument("--only", default=None, help="comma-separated roles to run (dense_active is always kept)")
    args = parse_args(parser)

    size = "quick" if args.quick else "gpu"
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if size == "gpu" and device.type != "cuda":
        sys.exit("the GPU-sized models need a CUDA GPU; run with --quick on a CPU")
    if not (Path(args.data_dir) / "manifest.json").is_file():
        sys.exit(f"no prepared data at {args.data_dir}: run `effllm prepare --out {args.data_dir}` (or `make prepare`)")
    warmup = args.warmup or (3 if args.quick else 10)
    repeats = args.repeats or (8 if args.quick else 30)
    budget = args.budget_s or (150.0 if args.quick else 1200.0)
    slug = re.sub(r"[^A-Za-z0-9]+", "-", device_name(device)).strip("-").lower()
    folder = args.out / (args.name or f"efficiency-{slug}-{size}")
    fp8_ok, fp8_why = fp8_supported(device)
    roles = set(args.only.split(",")) | {"dense_active"} if args.only else None

    rows = []
    for label, role, recipe, overrides in MODELS[size]:
        if roles is not None and role not in roles:
            continue
        cfg = replace(load_recipe(recipe), data_dir=args.data_dir, device=str(device), compile=args.compile,
                      **overrides)
        row = {"label": label, "role": role, "recipe": recipe, "overrides": overrides, "config": asdict(cfg)}
        rows.append(row)
        if cfg.fp8 and not fp8_ok:
            row["skipped"] = fp8_why
            print(f"{label}: skipped ({fp8_why})", flush=True)
            continue
        row["throughput"] = measure_throughput(cfg, device, warmup, repeats)
        release_memory(device)
        tp = row["throughput"]
        print(f"{label} ({recipe}): {tp['tokens_per_s']:,.0f} tokens/s, {tp['step_s_median'] * 1e3:.1f} ms/step"
              + (f", MFU {100 * tp['mfu']:.1f}%" if tp["mfu"] is not None else ""), flush=True)
    if args.quality:
        run_root = folder / "runs"
        for row in rows:
            if "throughput" not in row:
                continue
            cfg = replace(load_recipe(row["recipe"]), data_dir=args.data_dir, device=str(device),
                          compile=args.compile, **row["overrides"])
            row["quality"] = equal_time_run(cfg, budget, row["throughput"]["tokens_per_s"], run_root / row["role"],
                                            args.evals)
            release_memory(device)
            q = row["quality"]
            print(f"{row['label']}: {q['steps']} steps in {q['train_s']:.0f} s, final val loss {q['final_val_loss']:.4f}",
                  flush=True)
        shutil.rmtree(run_root, ignore_errors=True)  # checkpoints of benchmark runs are not kept
    result = {"bench": "tokens_per_gpu_hour", "size": size, **environment(device, args.commit),
              "unit": "GPU-hour" if device.type == "cuda" else "CPU-hour", "data_dir": args.data_dir,
              "quality_budget_s": budget if args.quality else None, "rows": rows}
    result["ratios"] = ratios(rows)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "results.json").write_text(json.dumps(result, indent=1) + "\n")
    for k, v in result["ratios"].items():
        print(f"{k}: {v:.3g}")
    written = write_report(folder)
    print("wrote " + ", ".join(str(p) for p in [folder / "results.json", *written]))


if __name__ == "__main__":
    main()
