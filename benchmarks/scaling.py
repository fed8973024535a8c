"""Data-parallel scaling: training tokens/s at 1 and 2 processes, and the communication share.

    python benchmarks/scaling.py --quick     # CPU: 1 and 2 gloo processes (torchrun), dense_tiny and moe_tiny
    python benchmarks/scaling.py             # GPUs: 1 and all visible GPUs (NCCL)

Each case builds the trainer's own run from the recipe (effllm.run.build_run: its FP8, activation
checkpointing and data-parallel settings) and times the trainer's own step (effllm.run.step_losses,
the losses all-reduced as in training, then optimizer_update) under torchrun: FSDP2 over all ranks,
and for moe_tiny also expert parallelism over 2 ranks. Every rank keeps the recipe's per-rank batch (weak scaling), so the
global batch grows with the ranks; tokens/s counts the global batch. The median of timed steps
after warm-up gives the step time. The communication share is the time the main thread spends
in collectives (profiler events of c10d / gloo / nccl operations, waits included) over the step
time, from a profiled window of steps after the timed ones.

On a 2-core CPU the two processes share the cores the single process had, so the figures show
the overhead of the distributed step, not a speed-up. Results: benchmarks/results/scaling/.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile
from dataclasses import replace
from pathlib import Path

import torch
from common import base_parser, environment, parse_args, time_fn, write_result
from torch.profiler import ProfilerActivity, profile

from effllm.cli import load_recipe
from effllm.config import check_parallel
from effllm.data import TokenDataset
from effllm.parallelize import dist_env, init_distributed
from effllm.run import build_run, optimizer_update, step_losses

RESULTS = Path(__file__).resolve().parent / "results" / "scaling"
COMM = re.compile(r"c10d|gloo|nccl|all_reduce|allreduce|all_gather|allgather|reduce_scatter|all_to_all|alltoall|"
                  r"broadcast|barrier", re.IGNORECASE)


def worker(args) -> None:
    """One rank of a case (under torchrun): time the training step, profile the communication."""
    env = dist_env()
    cfg = replace(load_recipe(args.recipe), data_dir=args.data_dir, expert_parallel=args.ep)
    check_parallel(cfg, env.world_size)
    device = init_distributed(env, cfg.device, cfg.dist_timeout_s)
    data = TokenDataset(cfg.data_dir)
    run = build_run(cfg, env, device)  # the trainer's own setup: FP8, activation checkpointing, EP, FSDP/DDP
    moe_layers = run.model.moe_layers()
    counter = iter(range(10**9))

    def step() -> None:  # the trainer's step, its loss check's host sync included
        sums = step_losses(run, cfg, data, env, device, next(counter))
        sums["loss"].item()
        optimizer_update(run.model, run.optimizer, cfg.optim.grad_clip, moe_layers)

    timing = time_fn(step, device, args.warmup, args.repeats)

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        for _ in range(args.profiled):
            step()
        if device.type == "cuda":
            torch.cuda.synchronize()
    main_tid = None
    total_us, comm_us = 0.0, 0.0
    events = [e for e in prof.events() if e.device_type.name == "CPU"]
    top = [e for e in events if e.cpu_parent is None]
    if top:
        main_tid = max({e.thread for e in top}, key=lambda t: sum(e.cpu_time_total for e in top if e.thread == t))
    for e in top:
        if e.thread != main_tid:
            continue
        total_us += e.cpu_time_total
    # collectives anywhere under the main thread's top-level ops, counted at their outermost event
    def walk(e, inside=False):
        nonlocal comm_us
        hit = bool(COMM.search(e.name))
        if hit and not inside:
            comm_us += e.cpu_time_total
        for child in e.cpu_children:
            walk(child, inside or hit)
    for e in top:
        if e.thread == main_tid:
            walk(e)
    step_s = timing["median_s"]
    profiled_s = args.profiled * step_s
    result = {"recipe": args.recipe, "ranks": env.world_size, "expert_parallel": args.ep,
              "step_s_median": step_s, "step_s_p10": timing["p10_s"], "step_s_p90": timing["p90_s"],
              "tokens_per_step": cfg.tokens_per_step * env.world_size,
              "tokens_per_s": cfg.tokens_per_step * env.world_size / step_s,
              "comm_share": min(1.0, comm_us / 1e6 / profiled_s) if profiled_s > 0 else None,
              "profiled_steps": args.profiled, "traced_main_thread_s": total_us / 1e6}
    if env.is_main:
        Path(args.worker_out).write_text(json.dumps(result))
    if env.enabled:
        torch.distributed.destroy_process_group()


def run_case(recipe: str, ranks: int, ep: int, args) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "result.json"
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={ranks}", __file__,
               "--worker", "--worker-out", str(out), "--recipe", recipe, "--ep", str(ep), "--data-dir", args.data_dir,
               "--warmup", str(args.warmup), "--repeats", str(args.repeats), "--profiled", str(args.profiled)]
        env = {**os.environ}
        if not torch.cuda.is_available():  # share the cores: one thread per process when there are several
            env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // ranks))
        r = subprocess.run(cmd, capture_output=True, text=True, env=env)
        if r.returncode != 0:
            raise SystemExit(f"{recipe} on {ranks} ranks failed:\n{r.stderr[-4000:]}")
        return json.loads(out.read_text())


def write_report(folder: Path) -> Path:
    lines = ["# Data-parallel scaling", "", "Written by `benchmarks/scaling.py` from the JSON files beside it. Weak "
             "scaling: each rank keeps the recipe's batch. Communication share = time in collectives (waits "
             "included) over step time, from the profiler.", ""]
    for path in sorted(folder.glob("*.json")):
        r = json.loads(path.read_text())
        lines += [f"## {r['device']} ({r['date']})", "", f"torch {r['torch']}, triton {r['triton']}, commit "
                  f"`{r['commit']}`.", "", "| recipe | ranks | expert parallel | step (ms) | tokens/s | vs 1 rank | "
                  "communication share |", "|---|---|---|---|---|---|---|"]
        for row in r["rows"]:
            lines.append(f"| {row['recipe']} | {row['ranks']} | {row['expert_parallel']} | "
                         f"{row['step_s_median'] * 1e3:.0f} | {row['tokens_per_s']:,.0f} | {row['vs_1_rank']:.2f}x | "
                         + (f"{100 * row['comm_share']:.0f}% |" if row["comm_share"] is not None else "- |"))
        lines.append("")
        if r.get("note"):
            lines += [r["note"], ""]
    path = folder / "report.md"
    path.write_text("\n".join(lines))
    return path


def main() -> None:

    parser = base_parser(__doc__, RESULTS, "CPU: 1 and 2 gloo processes")
    parser.add_argument("--data-dir", default=str(RESULTS.parent.parent.parent / "data" / "stdlib"))
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--profiled", type=int, default=3)
    parser.add_argument("--worker", action="store_true", help=argparse_hidden())
    parser.add_argument("--worker-out", default=None, help=argparse_hidden())
    parser.add_argument("--recipe", default="dense_tiny", help=argparse_hidden())
    parser.add_argument("--ep", type=int, default=1, help=argparse_hidden())
    args = parser.parse_args() if "--worker" in sys.argv else parse_args(parser)  # workers write where told
    if args.worker:
        from effllm.parallelize import exit_rank

        worker(args)
        exit_rank(0)  # without interpreter finalization, in which gloo's threads can abort a finished rank
    gpus = torch.cuda.device_count()
    if not args.quick and gpus < 2:
        sys.exit("the GPU case needs 2 or more GPUs; use --quick for the CPU case")
    many = 2 if args.quick else gpus
    cases = [("dense_tiny", 1, 1), ("dense_tiny", many, 1), ("moe_tiny", 1, 1), ("moe_tiny", many, 1),
             ("moe_tiny", many, 2)]
    rows, base = [], {}
    for recipe, ranks, ep in cases:
        row = run_case(recipe, ranks, ep, args)
        base.setdefault(recipe, row["tokens_per_s"])
        row["vs_1_rank"] = row["tokens_per_s"] / base[recipe]
        rows.append(row)
        print(f"{recipe} x{ranks} (ep {ep}): {row['tokens_per_s']:,.0f} tokens/s, {row['vs_1_rank']:.2f}x, "
              f"communication {100 * (row['comm_share'] or 0):.0f}%", flush=True)
    device = torch.device("cuda" if gpus else "cpu")
    size = "quick" if args.quick else "gpu"
    result = {"bench": "scaling", "size": size, **environment(device, args.commit), "rows": rows, "ratios": {},
              "note": ("2 processes on the 2 cores one process had: the figures show the distributed step's overhead, "
                       "not a speed-up.") if args.quick and (os.cpu_count() or 1) <= 2 else None}
    path = write_result(args.out, result, size)
    print(f"wrote {path} and {write_report(args.out)}")


def argparse_hidden() -> str:
    import argparse

    return argparse.SUPPRESS


if __name__ == "__main__":
    main()
