"""The ablation ladder: what each DeepSeek technique buys, one rung at a time, on the same data.

    python benchmarks/ladder.py --quick                  # CPU: the tiny recipes (about 40 min at --steps 300)
    python benchmarks/ladder.py                          # one GPU: the 600m recipes

The rungs, each the one before plus one technique, every one at the baseline's active parameters
and forward FLOPs per token (tests/test_recipes.py holds the recipes to that), and beside them the
dense model of equal total parameters:

    dense -> +DeepSeekMoE -> +MLA -> +MTP -> +FP8 (only where the device has FP8 tensor cores)

quick: dense_tiny, moe_tiny, deepseek_tiny without MTP, deepseek_tiny, (deepseek_tiny in FP8 is
wider and is not a rung: FP8 is a GPU rung only), dense_tiny_wide. GPU: dense_120m, deepseek_600m
with MHA and without MTP, then with MLA, then with MTP, then in FP8, and dense_600m.

Every rung gets the same tuning budget: the recipe's learning rate times each of --lr-sweep
(default 0.5, 1, 2), each trained for --sweep-steps, and the one with the lowest progressive
validation loss kept: the mean training loss of the sweep run's last tenth of steps, each batch
measured before the model trained on it (new windows of the train split); the val split, whose
losses are reported, never chooses. Then each rung trains with its chosen rate for --steps from
each of --seeds. Every run is the trainer's own (effllm.train.train) in a process of its own, so
that peak memory is the run's.

Reported per rung: validation loss at equal tokens (every rung sees the same tokens per step), at
equal training FLOPs (effllm.flops, device-independent) and at equal device time (training time
without evaluations, this device), each interpolated on the rung's curve at the baseline's last
point; tokens per device-hour; the share of this device's plain-GEMM rate, measured in the same
run, that the rung's model FLOPs reach; peak memory; and against the rung below, the ratio of
final val losses and of tokens/s per seed, with their spread over seeds.

Results: benchmarks/results/ladder/<device>-<size>.json and report.md, and ladder-<size>.png (loss
curves against tokens, FLOPs and device time).
"""

from __future__ import annotations

import json
import math
import shutil
import statistics
import subprocess
import sys
from dataclasses import asdict, replace
from pathlib import Path

import torch
from common import (
    RUNS_ROOT,
    base_parser,
    environment,
    gemm_case,
    parse_args,
    size_and_device,
    write_markdown,
    write_result,
)

from effllm.config import TrainConfig
from effllm.flops import train_flops_per_token
from effllm.kernels.backends import fp8_backend
from effllm.recipes import (
    deepseek_600m,
    deepseek_tiny,
    dense_120m,
    dense_600m,
    dense_tiny,
    dense_tiny_wide,
    moe_tiny,
)

RESULTS = Path(__file__).resolve().parent / "results" / "ladder"
DATA = Path(__file__).resolve().parent.parent / "data" / "stdlib"


def rungs(size: str, why: bool = False) -> list[tuple[str, TrainConfig, str]]:
    """(name, config, the rung it is compared with): the ladder, then the dense model of equal total,
    then (`why`) the diagnostic rungs."""
    if size == "quick":
        ds = deepseek_tiny.config()
        ladder = [("dense", dense_tiny.config()), ("+moe", moe_tiny.config()),
                  ("+mla", replace(ds, model=replace(ds.model, mtp_depth=0))), ("+mtp", ds)]
        wide = dense_tiny_wide.config()
    else:
        ds = deepseek_600m.config()
        ladder = [("dense", dense_120m.config()),
                  ("+moe", replace(ds, model=replace(ds.model, attention="mha", n_kv_heads=None, mtp_depth=0))),
                  ("+mla", replace(ds, model=replace(ds.model, mtp_depth=0))), ("+mtp", ds),
                  ("+fp8", replace(ds, fp8=True))]
        wide = dense_600m.config()
    out = [(name, cfg, ladder[i - 1][0] if i else "") for i, (name, cfg) in enumerate(ladder)]
    out.append(("dense, equal total", wide, "dense"))
    if why:
        out += diagnostics(dict(ladder))
    return out


def diagnostics(ladder: dict[str, TrainConfig]) -> list[tuple[str, TrainConfig, str]]:
    """The rungs that ask why +MLA and +MTP cost loss, each one setting changed on a ladder rung:
    - "+mla/latent-4x": the kv latent at 4x the no-RoPE key head width, DeepSeek-V2/V3's ratio
      (512 for 128-wide heads; deepseek_600m's 256 for 64), against the rung below +MLA;
    - "+mtp/weight-0.1": the MTP loss weight DeepSeek-V3 uses for its last 4.8T tokens (0.3 before),
      against +MLA."""
    mla_cfg, mtp_cfg = ladder["+mla"], ladder["+mtp"]
    mla = mla_cfg.model.mla
    wide = replace(mla_cfg, model=replace(mla_cfg.model, mla=replace(mla, kv_lora_rank=4 * mla.qk_nope_head_dim)))
    light = replace(mtp_cfg, model=replace(mtp_cfg.model, mtp_lambda=0.1))
    return [("+mla/latent-4x", wide, "+moe"), ("+mtp/weight-0.1", light, "+mla")]


def run_child(cfg: TrainConfig, out: Path) -> dict:
    """Train `cfg` in a fresh process (its own peak memory) in `out`, a scratch folder of this
    benchmark's (emptied first: an earlier run's checkpoints would otherwise be refused); returns
    the summary and the curve."""
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True, exist_ok=True)
    (out.parent / f"{out.name}.json").write_text(json.dumps(asdict(cfg)))
    child = subprocess.run([sys.executable, __file__, "--child", str(out.parent / f"{out.name}.json")],
                           capture_output=True, text=True)
    if child.returncode:
        raise RuntimeError(f"training {out.name} failed:\n{child.stderr[-3000:]}")
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    summary = json.loads((out / "summary.json").read_text())
    flops = train_flops_per_token(cfg.model, cfg.seq_len)
    curve = [{"step": r["step"], "tokens": r["tokens_seen"], "flops": r["tokens_seen"] * flops,
              "train_s": r["train_s"], "val_loss": r["val_loss"]} for r in metrics if "val_loss" in r]
    return {"summary": summary, "curve": curve, "train_losses": [r["loss"] for r in metrics]}


def progressive_loss(train_losses: list[float]) -> float:
    """Mean training loss over the last tenth of the logged steps: each batch was new to the model
    when its loss was measured (before that step's update), so this estimates held-out loss on the
    train split."""
    tail = train_losses[-max(1, len(train_losses) // 10):]
    return sum(tail) / len(tail)


def at(curve: list[dict], key: str, x: float) -> float | None:
    """Val loss interpolated at `key` = x on a curve (linear between evaluations); None outside it."""
    for a, b in zip(curve, curve[1:]):
        if a[key] <= x <= b[key]:
            t = (x - a[key]) / (b[key] - a[key]) if b[key] > a[key] else 0.0
            return a["val_loss"] + t * (b["val_loss"] - a["val_loss"])
    return curve[-1]["val_loss"] if curve and math.isclose(curve[-1][key], x, rel_tol=1e-9) else None


def spread(values: list[float]) -> dict:
    return {"mean": statistics.mean(values), "min": min(values), "max": max(values),
            "std": statistics.stdev(values) if len(values) > 1 else 0.0, "n": len(values)}


def summarize(rows: list[dict], rate: float) -> None:
    """Per rung: losses at equal tokens, FLOPs and time against the baseline, throughput, share of
    the matmul rate; per rung against the one below: ratios over seeds. In place."""
    base = rows[0]
    by_name = {r["name"]: r for r in rows}
    for row in rows:
        if row.get("skipped"):
            continue
        seeds = row["seeds"]
        for key, label in (("tokens", "equal_tokens"), ("flops", "equal_flops"), ("train_s", "equal_time")):
            vals = []
            for mine, theirs in zip(seeds, base["seeds"]):
                x = theirs["curve"][-1][key]
                vals.append(at(mine["curve"], key, x))
            row[f"val_loss_{label}"] = spread([v for v in vals if v is not None]) if any(
                v is not None for v in vals) else None
        tok_s = [s["summary"]["tokens_seen"] / s["summary"]["train_s"] for s in seeds]
        row["tokens_per_s"] = spread(tok_s)
        row["tokens_per_device_hour"] = statistics.mean(tok_s) * 3600
        flops = train_flops_per_token(TrainConfig.from_dict(row["config"]).model, row["config"]["seq_len"])
        row["matmul_share"] = statistics.mean(tok_s) * flops / rate
        row["peak_mem_bytes"] = max(s["summary"]["peak_mem_bytes"] for s in seeds)
        below = by_name.get(row["compared_with"])
        if below and not below.get("skipped"):
            row["vs_below"] = {
                "final_val_loss_ratio": spread([a["summary"]["final_val_loss"] / b["summary"]["final_val_loss"]
                                                for a, b in zip(seeds, below["seeds"])]),
                "tokens_per_s_ratio": spread([(a["summary"]["tokens_seen"] / a["summary"]["train_s"])
                                              / (b["summary"]["tokens_seen"] / b["summary"]["train_s"])
                                              for a, b in zip(seeds, below["seeds"])])}


def plot(result: dict, folder: Path, size: str) -> str | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    for row in result["rows"]:
        if row.get("skipped"):
            continue
        curve = row["seeds"][0]["curve"]
        for ax, key, scale in zip(axes, ("tokens", "flops", "train_s"), (1e6, 1e12, 1.0)):
            ax.plot([p[key] / scale for p in curve], [p["val_loss"] for p in curve], marker=".", label=row["name"])
    for ax, label in zip(axes, ("training tokens (M)", "training FLOPs (T)", "device time (s, training only)")):
        ax.set_xlabel(label)
        ax.set_ylabel("val loss")
        ax.grid(alpha=0.3)
    axes[0].legend()
    fig.suptitle(f"ablation ladder, {result['device']}, seed {result['seeds'][0]}")
    fig.tight_layout()
    name = f"ladder-{size}.png"
    fig.savefig(folder / name, dpi=110)
    plt.close(fig)
    return name


def fmt(s: dict | None, digits: int = 4) -> str:
    if s is None:
        return "-"
    return f"{s['mean']:.{digits}f}" + (f" ({s['min']:.{digits}f}-{s['max']:.{digits}f})" if s["n"] > 1 else "")


def write_report(folder: Path) -> Path:
    lines = ["# The ablation ladder", "", "Written by `benchmarks/ladder.py` from the JSON files beside it: each rung "
             "adds one technique to the one before, at the baseline's active parameters and forward FLOPs per token. "
             "Val losses are means over seeds (min-max in brackets), interpolated at the baseline's last point "
             "(\"-\": the rung's run ends before that point).", ""]
    for path in sorted(folder.glob("*.json")):
        r = json.loads(path.read_text())
        unit = "GPU-hour" if r["device_type"] == "cuda" else "CPU-hour"
        lines += [f"## {r['device']}, {r['size']} ({r['date']})", "",
                  f"torch {r['torch']}, triton {r['triton']}, commit `{r['commit']}`; {r['steps']} steps of "
                  f"{r['tokens_per_step']:,} tokens per rung and seed, seeds {r['seeds']}; learning rates chosen "
                  f"per rung from the recipe's x {r['lr_sweep']} over {r['sweep_steps']} steps (progressive "
                  f"validation on the train split); this device's plain-GEMM rate {r['matmul_gflops']:.0f} GFLOP/s.",
                  *(["", f"Note: {r['commit_note']}"] if r.get("commit_note") else []),
                  "", f"| rung | lr | val, equal tokens | val, equal FLOPs | val, equal time | tokens per {unit} | "
                  "share of GEMM rate | peak mem (GiB) | val vs rung below | tokens/s vs rung below |",
                  "|---|---|---|---|---|---|---|---|---|---|"]
        for row in r["rows"]:
            if row.get("skipped"):
                lines.append(f"| {row['name']} | skipped: {row['skipped']} |||||||||")
                continue
            vs = row.get("vs_below")
            mem = row["peak_mem_bytes"] / 2**30
            lines.append(f"| {row['name']} | {row['lr']:.2g} | {fmt(row['val_loss_equal_tokens'])} | "
                         f"{fmt(row['val_loss_equal_flops'])} | {fmt(row['val_loss_equal_time'])} | "
                         f"{row['tokens_per_device_hour']:.3g} | {100 * row['matmul_share']:.0f}% | {mem:.2f} | "
                         + (f"{fmt(vs['final_val_loss_ratio'], 3)} | {fmt(vs['tokens_per_s_ratio'], 2)} |" if vs
                            else "- | - |"))
        lines += ["", "Learning-rate sweep (progressive validation loss per multiplier): "
                  + "; ".join(f"{row['name']}: " + ", ".join(f"x{m} {v:.4f}" for m, v in row["sweep"].items())
                              for row in r["rows"] if row.get("sweep")), ""]
        if r.get("plot"):
            lines += [f"![loss curves]({r['plot']})", ""]
    return write_markdown(folder, lines)


def main() -> None:
    if len(sys.argv) == 3 and sys.argv[1] == "--child":  # one training run, in its own process
        from effllm.train import train

        train(TrainConfig.from_dict(json.loads(Path(sys.argv[2]).read_text())))
        return
    parser = base_parser(__doc__, RESULTS, "CPU-sized tiny recipes")
    parser.add_argument("--data-dir", default=str(DATA), help="prepared data (default: data/stdlib, as make prepares it)")
    parser.add_argument("--steps", type=int, default=None, help="steps per run (default: the recipes' own)")
    parser.add_argument("--seeds", default="1,2", help="comma-separated seeds of the final runs (default 1,2)")
    parser.add_argument("--lr-sweep", default="0.5,1,2", help="multipliers of the recipe's lr to try (default 0.5,1,2)")
    parser.add_argument("--sweep-steps", type=int, default=None, help="steps per sweep run (default steps / 4)")
    parser.add_argument("--evals", type=int, default=10, help="validation points per run (default 10)")
    parser.add_argument("--eval-tokens", type=int, default=32768, help="validation tokens per evaluation")
    parser.add_argument("--only", default=None, help="comma-separated rung names (the baseline is always kept; a "
                        "diagnostic rung needs the rung it is compared with)")
    parser.add_argument("--why", action="store_true",
                        help="add the diagnostic rungs +mla/latent-4x and +mtp/weight-0.1 (see diagnostics()); the "
                             "record is <device>-<size>-why.json")
    args = parse_args(parser)
    size, device = size_and_device(args.quick)
    if not (Path(args.data_dir) / "manifest.json").is_file():
        sys.exit(f"no prepared data at {args.data_dir}: run `make prepare` (or effllm prepare --out {args.data_dir})")
    seeds = [int(s) for s in args.seeds.split(",")]
    sweep = [float(m) for m in args.lr_sweep.split(",")]
    fp8_ok = device.type == "cuda" and fp8_backend(device) == "triton"
    # Training runs are scratch: beside the results of a run, and never inside the committed record.
    work = RUNS_ROOT / "ladder-scratch" if args.update_record else args.out / "runs"
    rows = []
    chosen = rungs(size, args.why)
    if args.only:
        unknown = set(args.only.split(",")) - {name for name, _, _ in chosen}
        if unknown:
            parser.error(f"--only names no rung {sorted(unknown)}: the rungs are {[n for n, _, _ in chosen]}"
                         + ("" if args.why else " (diagnostic rungs need --why)"))
        keep = {"dense", *args.only.split(",")}
        missing = {below for name, _, below in chosen if name in keep and below} - keep
        if missing:
            parser.error(f"--only leaves out {sorted(missing)}, which the rungs it keeps are compared with: add it")
        chosen = [r for r in chosen if r[0] in keep]
    for name, cfg, below in chosen:
        steps = args.steps or cfg.max_steps
        sweep_steps = args.sweep_steps or max(20, steps // 4)
        cfg = replace(cfg, data_dir=args.data_dir, device=str(device), max_steps=steps, ckpt_interval=0,
                      eval_interval=max(1, steps // args.evals), log_interval=1, eval_tokens=args.eval_tokens,
                      progress=False, resume=False,
                      optim=replace(cfg.optim, warmup_steps=min(cfg.optim.warmup_steps, max(1, steps // 10))))
        row = {"name": name, "compared_with": below, "config": asdict(cfg)}
        rows.append(row)
        if cfg.fp8 and not fp8_ok:
            row["skipped"] = "no FP8 tensor cores on this device"
            continue
        row["sweep"] = {}
        for m in sweep:
            trial = replace(cfg, max_steps=sweep_steps, seed=seeds[0], eval_interval=sweep_steps,
                            optim=replace(cfg.optim, lr=cfg.optim.lr * m, schedule_steps=sweep_steps,
                                          warmup_steps=min(cfg.optim.warmup_steps, max(1, sweep_steps // 10))),
                            out_dir=str(work / f"{name}-sweep-{m}"))
            row["sweep"][m] = progressive_loss(run_child(trial, Path(trial.out_dir))["train_losses"])
            print(f"{name}: lr x{m} -> progressive val {row['sweep'][m]:.4f}", flush=True)
        best = min(row["sweep"], key=row["sweep"].get)
        row["lr"] = cfg.optim.lr * best
        row["seeds"] = []
        for seed in seeds:
            run = replace(cfg, seed=seed, optim=replace(cfg.optim, lr=row["lr"]), out_dir=str(work / f"{name}-{seed}"))
            res = run_child(run, Path(run.out_dir))
            row["seeds"].append({"seed": seed, "summary": res["summary"], "curve": res["curve"]})
            print(f"{name} seed {seed}: val {res['summary']['final_val_loss']:.4f}, "
                  f"{res['summary']['tokens_seen'] / res['summary']['train_s']:,.0f} tokens/s", flush=True)
    base = TrainConfig.from_dict(rows[0]["config"])
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    rate = gemm_case(device, base.batch_size * base.seq_len, base.model.dim, base.model.hidden_dim, dtype, 3,
                     10)["flops_per_s"]  # the plain-GEMM rate of this device, at the baseline's sizes
    summarize(rows, rate)
    result = {"bench": "ladder", "size": size, **environment(device, args.commit), "steps": rows[0]["config"]["max_steps"],
              "tokens_per_step": base.tokens_per_step, "seeds": seeds, "lr_sweep": sweep,
              "sweep_steps": args.sweep_steps or max(20, rows[0]["config"]["max_steps"] // 4),
              "matmul_gflops": rate / 1e9, "data_dir": args.data_dir, "rows": rows}
    name = f"{size}-why" if args.why else size
    result["plot"] = plot(result, args.out, name)
    path = write_result(args.out, result, name)
    print(f"wrote {path} and {write_report(args.out)}")


if __name__ == "__main__":
    main()
