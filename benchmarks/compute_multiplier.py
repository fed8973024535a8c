"""The compute multiplier: how many times fewer training FLOPs the DeepSeek-style model needs to
reach the dense model's loss, from a sweep over model sizes.

    python benchmarks/compute_multiplier.py --quick      # CPU: widths 128, 192, 256 (a few minutes per model)
    python benchmarks/compute_multiplier.py              # one GPU: widths 512, 768, 1024 (not yet run on one)

At each width the dense model is dense_tiny's shape at that width, and the DeepSeek-style model is
deepseek_tiny's (MLA, 16 routed experts + 1 shared, top-3, one MTP module) scaled to the same
width and the same active feed-forward width (4 experts' worth = the dense SwiGLU), so both have
about the same active parameters and forward FLOPs per token. Every model trains for the same
number of steps and tokens (the trainer, each in a process of its own) on the same data, with
the learning rate each model chose from the recipe's times each of --lr-sweep over a quarter of
the steps, by progressive validation on the train split (the ladder's rule: benchmarks/ladder.py).

For each architecture, the final val losses against training FLOPs (effllm.flops: 3 x the forward,
MTP included) are fitted with a power law L = a * C^(-b) (least squares in log-log). The multiplier
at the dense model's loss L_d of the largest width is C_dense / C_deepseek(L_d), where C_deepseek(L)
inverts the DeepSeek-style fit; DeepSeekMoE and OLMoE report about 2-3x at their scales. The fit
needs at least three sizes; a multiplier outside the measured FLOPs range is marked extrapolated.

Results: benchmarks/results/compute_multiplier/<device>-<size>.json and report.md.
"""

from __future__ import annotations

import json
import math
import sys
from dataclasses import asdict, replace
from pathlib import Path

import torch
from common import RUNS_ROOT, base_parser, environment, parse_args, size_and_device, write_markdown, write_result
from ladder import progressive_loss, run_child

from effllm.flops import train_flops_per_token
from effllm.model import ModelConfig, Transformer
from effllm.recipes import deepseek_tiny, dense_tiny

RESULTS = Path(__file__).resolve().parent / "results" / "compute_multiplier"
DATA = Path(__file__).resolve().parent.parent / "data" / "stdlib"
WIDTHS = {"quick": (128, 192, 256), "gpu": (512, 768, 1024)}
HEAD = 32  # per-head width of the dense models (dense_tiny: 192 / 6)


def models_at(width: int) -> dict[str, ModelConfig]:
    """The dense and DeepSeek-style models at `width`: dense_tiny's and deepseek_tiny's shapes."""
    dense = replace(dense_tiny.config().model, dim=width, n_heads=width // HEAD, n_kv_heads=None)
    ds = deepseek_tiny.config().model
    scale = width / ds.dim
    mla = replace(ds.mla, kv_lora_rank=max(16, round(64 * scale / 16) * 16))
    moe = replace(ds.moe, expert_dim=dense.hidden_dim // 4)
    return {"dense": dense, "deepseek": replace(ds, dim=width, n_heads=width // HEAD, mla=mla, moe=moe)}


def fit_power_law(flops: list[float], losses: list[float]) -> tuple[float, float]:
    """(a, b) of L = a * C^(-b), least squares on log L = log a - b log C."""
    if len(flops) < 2:
        raise ValueError("a power law needs at least two points")
    xs, ys = [math.log(c) for c in flops], [math.log(v) for v in losses]
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    sxx = sum((x - mx) ** 2 for x in xs)
    slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sxx
    return math.exp(my - slope * mx), -slope


def flops_for(loss: float, a: float, b: float) -> float:
    """The C at which L = a * C^(-b) reaches `loss`."""
    return (a / loss) ** (1 / b)


def multiplier(points: dict[str, list[dict]]) -> dict:
    """The fits of both architectures and the compute multiplier at the largest dense model's loss.
    No multiplier is given where a fit's loss does not fall with compute (exponent b <= 0): a sweep
    whose larger models trained worse says nothing about compute efficiency; `why` says so."""
    fits = {arch: fit_power_law([p["flops"] for p in pts], [p["val_loss"] for p in pts]) for arch, pts in points.items()}
    out = {"fits": {arch: {"a": a, "b": b} for arch, (a, b) in fits.items()}}
    falling = [arch for arch, (_, b) in fits.items() if b <= 0]
    if falling:
        return out | {"multiplier": None, "why": f"the {' and '.join(falling)} losses do not fall with compute "
                      f"(b = {', '.join(f'{fits[a][1]:.4f}' for a in falling)}): no power law to compare"}
    top = max(points["dense"], key=lambda p: p["flops"])
    needed = flops_for(top["val_loss"], *fits["deepseek"])
    measured = [p["flops"] for p in points["deepseek"]]
    return out | {"dense_loss": top["val_loss"], "dense_flops": top["flops"], "deepseek_flops_needed": needed,
                  "multiplier": top["flops"] / needed, "extrapolated": not min(measured) <= needed <= max(measured)}


def write_report(folder: Path) -> Path:
    lines = ["# Compute multiplier: DeepSeek-style against dense", "",
             "Written by `benchmarks/compute_multiplier.py` from the JSON files beside it.", ""]
    for path in sorted(folder.glob("*.json")):
        r = json.loads(path.read_text())
        m = r["result"]
        lines += [f"## {r['device']}, {r['size']} ({r['date']})", "",
                  f"torch {r['torch']}, commit `{r['commit']}`; {r['steps']} steps of {r['tokens_per_step']:,} tokens "
                  f"per model, seed {r['seed']}" + (f"; each model's lr from the recipe's x {r['lr_sweep']}"
                                                    if r.get("lr_sweep") else "; the recipe's lr") + ".", "",
                  "| width | model | active params | lr | training FLOPs | final val loss |", "|---|---|---|---|---|---|"]
        for arch, pts in r["points"].items():
            for p in pts:
                lines.append(f"| {p['width']} | {arch} | {p['active']:,} | {p.get('lr', 3e-3):.2g} | {p['flops']:.3g} | "
                             f"{p['val_loss']:.4f} |")
        fits = m["fits"]
        lines += ["", "Fits L = a C^-b: " + ", ".join(f"{arch} a = {f['a']:.3g}, b = {f['b']:.4f}" for arch, f in fits.items())
                  + ".", ""]
        if r.get("note"):
            lines += [f"Note: {r['note']}", ""]
        if m["multiplier"] is None:
            lines += [f"**No compute multiplier:** {m['why']}.", ""]
            continue
        lines += [f"**Compute multiplier at the largest dense model's loss ({m['dense_loss']:.4f}): "
                  f"{m['multiplier']:.2f}x** (DeepSeek-style needs {m['deepseek_flops_needed']:.3g} training FLOPs "
                  f"where dense used {m['dense_flops']:.3g})"
                  + ("; extrapolated beyond the measured range." if m["extrapolated"] else "."), ""]
    return write_markdown(folder, lines)


def main() -> None:
    parser = base_parser(__doc__, RESULTS, "CPU-sized widths (128, 192, 256)")
    parser.add_argument("--data-dir", default=str(DATA), help="prepared data (default: data/stdlib)")
    parser.add_argument("--steps", type=int, default=None, help="steps per model (default 200 quick, 1000 gpu)")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--eval-tokens", type=int, default=32768, help="validation tokens of the final evaluation")
    parser.add_argument("--widths", default=None, help="comma-separated widths (default: the size's three)")
    parser.add_argument("--lr-sweep", default="0.5,1,2", help="multipliers of the recipe's lr to try (default 0.5,1,2)")
    args = parse_args(parser)
    size, device = size_and_device(args.quick)
    if not (Path(args.data_dir) / "manifest.json").is_file():
        sys.exit(f"no prepared data at {args.data_dir}: run `make prepare`")
    widths = [int(w) for w in args.widths.split(",")] if args.widths else WIDTHS[size]
    if len(widths) < 3:
        sys.exit(f"the power-law fit needs at least three widths, got {widths}")
    steps = args.steps or (200 if args.quick else 1000)
    base = dense_tiny.config()
    work = RUNS_ROOT / "compute_multiplier-scratch" if args.update_record else args.out / "runs"
    points = {"dense": [], "deepseek": []}
    for width in widths:
        for arch, model in models_at(width).items():
            cfg = replace(base, model=model, data_dir=args.data_dir, device=str(device), max_steps=steps,
                          seed=args.seed, eval_interval=steps, log_interval=max(1, steps // 20), ckpt_interval=0,
                          eval_tokens=args.eval_tokens, progress=False, resume=False,
                          optim=replace(base.optim, warmup_steps=min(base.optim.warmup_steps, max(1, steps // 10))),
                          out_dir=str(work / f"{arch}-{width}"))
            if device.type == "cuda":
                cfg = replace(cfg, batch_size=16, seq_len=1024, model=replace(model, max_seq_len=1024))
            sweep_steps, sweep = max(20, steps // 4), {}
            for m in (float(v) for v in args.lr_sweep.split(",")):
                trial = replace(cfg, max_steps=sweep_steps, eval_interval=sweep_steps, log_interval=1,
                                optim=replace(cfg.optim, lr=cfg.optim.lr * m, schedule_steps=sweep_steps,
                                              warmup_steps=max(1, sweep_steps // 10)),
                                out_dir=str(work / f"{arch}-{width}-sweep-{m}"))
                sweep[m] = progressive_loss(run_child(trial, Path(trial.out_dir))["train_losses"])
            lr = cfg.optim.lr * min(sweep, key=sweep.get)
            cfg = replace(cfg, optim=replace(cfg.optim, lr=lr))
            res = run_child(cfg, Path(cfg.out_dir))
            with torch.device("meta"):
                counts = Transformer(model).param_counts()
            tokens = res["summary"]["tokens_seen"]
            point = {"width": width, "active": counts["active"], "total": counts["total"],
                     "flops": tokens * train_flops_per_token(model, cfg.seq_len), "tokens": tokens,
                     "val_loss": res["summary"]["final_val_loss"], "train_s": res["summary"]["train_s"],
                     "lr": lr, "lr_sweep": sweep,
                     "config": asdict(model)}
            points[arch].append(point)
            print(f"{arch} width {width}: {counts['active'] / 1e6:.2f}M active, {point['flops']:.3g} FLOPs, "
                  f"val {point['val_loss']:.4f}", flush=True)
    result = {"bench": "compute_multiplier", "size": size, **environment(device, args.commit), "steps": steps,
              "tokens_per_step": cfg.tokens_per_step, "seed": args.seed, "points": points,
              "lr_sweep": [float(v) for v in args.lr_sweep.split(",")],
              "result": multiplier(points)}
    path = write_result(args.out, result, size)
    m = result["result"]["multiplier"]
    print((f"compute multiplier {m:.2f}x" if m is not None else f"no compute multiplier: {result['result']['why']}")
          + f"; wrote {path} and {write_report(args.out)}")


if __name__ == "__main__":
    main()
