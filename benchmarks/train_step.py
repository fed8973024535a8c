"""Training-step throughput of the dense baseline: eager vs torch.compile, in one run.

    python benchmarks/train_step.py --quick          # CPU-sized (dense_tiny's model), minutes
    python benchmarks/train_step.py                  # GPU-sized (a 12-layer, 768-wide model)

One step = forward + backward + AdamW update of the trainer's own run (effllm.run.build_run and
its step functions), on random tokens (throughput does not depend on the text). Each case is warmed up (compilation included),
then every step is timed alone, the device synchronised around it; the report gives the median
and the 10th/90th percentiles. Tokens per device-hour and MFU (against the device's dense bf16
peak, GPUs only) come from effllm.flops. Results: benchmarks/results/train_step/<device>.json and
report.md, rebuilt from every JSON file there.
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import torch
from common import base_parser, environment, parse_args, size_and_device, time_fn, write_markdown, write_result

from effllm.config import TrainConfig
from effllm.flops import (
    device_name,
    mfu,
    peak_bf16_flops,
    tokens_per_device_hour,
    train_flops_per_token,
)
from effllm.model import ModelConfig
from effllm.parallelize import DistEnv
from effllm.run import build_run, forward_backward, optimizer_update

RESULTS = Path(__file__).resolve().parent / "results" / "train_step"

SIZES = {
    # dense_tiny's model and batch: the CPU default
    "quick": dict(model=ModelConfig(vocab_size=256, dim=192, n_layers=4, n_heads=6, max_seq_len=256),
                  batch_size=16, seq_len=256),
    # GPT-2-small-like width and depth with byte tokens: enough work per step to fill an H100
    "gpu": dict(model=ModelConfig(vocab_size=256, dim=768, n_layers=12, n_heads=12, max_seq_len=1024),
                batch_size=32, seq_len=1024),
}


def time_case(model_cfg: ModelConfig, batch_size: int, seq_len: int, compile: bool, device: torch.device,
              warmup: int, repeats: int) -> dict:
    cfg = TrainConfig(model=model_cfg, batch_size=batch_size, seq_len=seq_len, compile=compile, seed=0)
    run = build_run(cfg, DistEnv(), device)  # the trainer's own model, optimizer and compile
    amp, model = run.amp, run.model
    # Several batches in rotation, made before timing starts.
    batches = [torch.randint(0, model_cfg.vocab_size, (batch_size, seq_len + 1), device=device) for _ in range(4)]

    def step(i: int) -> None:
        b = batches[i % len(batches)]
        forward_backward(run.step_fn, lambda micro: (b[:, :-1], b[:, 1:]), 1, model_cfg.mtp_lambda, device, amp)
        optimizer_update(model, run.optimizer, cfg.optim.grad_clip, {})

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    counter = iter(range(10**9))
    timing = time_fn(lambda: step(next(counter)), device, warmup, repeats)
    tokens = batch_size * seq_len
    median = timing["median_s"]
    flops = train_flops_per_token(model_cfg, seq_len)
    tok_s = tokens / median
    peak = peak_bf16_flops(device_name(device)) if amp is torch.bfloat16 else None
    return {
        "case": "compile" if compile else "eager",
        "precision": str(amp or torch.float32),
        "step_s_median": median, "step_s_p10": timing["p10_s"], "step_s_p90": timing["p90_s"], "repeats": repeats,
        "warmup_steps": warmup,
        "tokens_per_s": tok_s, "tokens_per_device_hour": tokens_per_device_hour(tok_s),
        "train_flops_per_token": flops, "mfu": mfu(tok_s, flops, peak),
        "peak_mem_bytes": torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None,
        "params": model.param_counts(),
    }


def write_report(folder: Path = RESULTS) -> Path:
    """report.md from every JSON result in `folder`."""
    lines = ["# Training-step throughput (dense baseline)", "",
             "Written by `benchmarks/train_step.py` from the JSON files beside it. One step = forward, "
             "backward and AdamW update on random tokens; median over timed steps after warm-up.", ""]
    for path in sorted(folder.glob("*.json")):
        r = json.loads(path.read_text())
        unit = "GPU-hour" if r["device_type"] == "cuda" else "CPU-hour"
        cfg = r["config"]
        m = cfg["model"]
        lines += [f"## {r['device']} ({r['date']})", "",
                  f"torch {r['torch']}, triton {r['triton']}, commit `{r['commit']}`; model dim {m['dim']}, "
                  f"{m['n_layers']} layers, {m['n_heads']} heads, vocab {m['vocab_size']}; batch {cfg['batch_size']} x "
                  f"seq {cfg['seq_len']}; {r['rows'][0]['params']['total'] / 1e6:.1f}M parameters.", "",
                  f"| case | precision | step median (ms) | p10-p90 (ms) | tokens/s | tokens per {unit} | MFU | peak mem (GiB) |",
                  "|---|---|---|---|---|---|---|---|"]
        for row in r["rows"]:
            mem = "-" if row["peak_mem_bytes"] is None else f"{row['peak_mem_bytes'] / 2**30:.2f}"
            util = "-" if row["mfu"] is None else f"{100 * row['mfu']:.1f}%"
            lines.append(f"| {row['case']} | {row['precision']} | {1e3 * row['step_s_median']:.1f} | "
                         f"{1e3 * row['step_s_p10']:.1f}-{1e3 * row['step_s_p90']:.1f} | {row['tokens_per_s']:,.0f} | "
                         f"{row['tokens_per_device_hour']:.3g} | {util} | {mem} |")
        lines += ["", "Ratios (same run): " + ", ".join(f"{k} = {v:.2f}x" for k, v in r["ratios"].items()), ""]
    return write_markdown(folder, lines)


def main() -> None:
    parser = base_parser(__doc__, RESULTS, "CPU-sized case (dense_tiny's model and batch)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed steps per case (default 5 quick, 10 gpu)")
    parser.add_argument("--repeats", type=int, default=None, help="timed steps per case (default 10 quick, 50 gpu)")
    parser.add_argument("--no-compile", action="store_true", help="time eager mode only")
    args = parse_args(parser)

    size, device = size_and_device(args.quick)
    spec = SIZES[size]
    warmup = args.warmup or (5 if args.quick else 10)
    repeats = args.repeats or (10 if args.quick else 50)
    rows = []
    for compile in ([False] if args.no_compile else [False, True]):
        row = time_case(spec["model"], spec["batch_size"], spec["seq_len"], compile, device, warmup, repeats)
        rows.append(row)
        print(f"{row['case']:8s} {1e3 * row['step_s_median']:9.1f} ms/step  {row['tokens_per_s']:12,.0f} tokens/s"
              + (f"  MFU {100 * row['mfu']:.1f}%" if row["mfu"] is not None else ""), flush=True)
    ratios = {}
    if len(rows) == 2:
        ratios["compile / eager tokens/s"] = rows[1]["tokens_per_s"] / rows[0]["tokens_per_s"]
    result = {
        "bench": "train_step", "size": size, **environment(device, args.commit),
        "config": {"model": asdict(spec["model"]), "batch_size": spec["batch_size"], "seq_len": spec["seq_len"],
                   "tokens": "random ids, 4 batches in rotation"},
        "rows": rows, "ratios": ratios,
    }
    path = write_result(args.out, result, size)
    print(f"wrote {path} and {write_report(args.out)}")


if __name__ == "__main__":
    main()
