"""Shared pieces of the benchmark scripts: timing, environment record, result files."""

from __future__ import annotations

import argparse
import datetime
import json
import re
import statistics
import subprocess
import time
from pathlib import Path

import torch

from effllm.flops import device_name


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_fn(fn, device: torch.device, warmup: int, repeats: int) -> dict:
    """Run `fn` `warmup` times untimed, then time each of `repeats` calls alone, the device
    synchronised around it. Returns median and 10th/90th percentiles in seconds."""
    for _ in range(warmup):
        fn()
    sync(device)
    times = []
    for _ in range(repeats):
        sync(device)
        t = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t)
    q = statistics.quantiles(times, n=10) if len(times) > 1 else [times[0]] * 9
    return {"median_s": statistics.median(times), "p10_s": q[0], "p90_s": q[-1], "repeats": repeats,
            "warmup": warmup}


def time_interleaved(cases: dict, device, warmup: int, repeats: int, tokens: int) -> dict:
    """Warm each case up alone (its peak memory is read there), then time `repeats` steps of every
    case interleaved, in alternating order, so that drift of the machine hits every case alike."""
    rows, times = {}, {name: [] for name in cases}
    for name, step in cases.items():
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        for _ in range(warmup):
            step()
        sync(device)
        rows[name] = {"peak_mem_bytes": torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None}
    for r in range(repeats):
        for name, step in (list(cases.items()) if r % 2 == 0 else list(cases.items())[::-1]):
            sync(device)
            t = time.perf_counter()
            step()
            sync(device)
            times[name].append(time.perf_counter() - t)
    for name, ts in times.items():
        q = statistics.quantiles(ts, n=10)
        rows[name].update(median_s=statistics.median(ts), p10_s=q[0], p90_s=q[-1], repeats=repeats, warmup=warmup,
                          tokens_per_s=tokens / statistics.median(ts))
    return rows


def timing_table(rows: dict, label: str = "median", digits: int = 1) -> list[str]:
    """Markdown lines of a `time_interleaved` result: median, p10-p90 (ms), tokens/s, peak memory."""
    lines = [f"| case | {label} (ms) | p10-p90 (ms) | tokens/s | peak mem (GiB) |", "|---|---|---|---|---|"]
    for name, row in rows.items():
        mem = "-" if row["peak_mem_bytes"] is None else f"{row['peak_mem_bytes'] / 2**30:.2f}"
        lines.append(f"| {name} | {1e3 * row['median_s']:.{digits}f} | {1e3 * row['p10_s']:.{digits}f}-"
                     f"{1e3 * row['p90_s']:.{digits}f} | {row['tokens_per_s']:,.0f} | {mem} |")
    return lines


def gemm_case(device: torch.device, m: int, k: int, n: int, dtype: torch.dtype, warmup: int, repeats: int) -> dict:
    """A plain GEMM x (m, k) · Wᵀ (k, n), forward and backward (dgrad and wgrad), timed as `time_fn`:
    the rate this device reaches on matrix products in this run, `flops_per_s` in the row."""
    x = torch.randn(m, k, device=device, dtype=dtype, requires_grad=True)
    w = torch.randn(n, k, device=device, dtype=dtype, requires_grad=True)
    dy = torch.randn(m, n, device=device, dtype=dtype)

    def step():
        x.grad = w.grad = None
        torch.nn.functional.linear(x, w).backward(dy)

    row = time_fn(step, device, warmup, repeats)
    row["flops_per_s"] = 3 * 2 * m * k * n / row["median_s"]
    return row


def git_commit() -> str:
    here = Path(__file__).parent
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=here)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True,
                               text=True, cwd=here).stdout.strip()
    except OSError:
        return "unknown"
    return out.stdout.strip() + ("-dirty" if dirty else "") if out.returncode == 0 else "unknown"


def environment(device: torch.device, commit: str | None) -> dict:
    """Device, versions, commit and date: the header of every result file."""
    import triton

    return {"device": device_name(device), "device_type": device.type, "torch": torch.__version__,
            "triton": triton.__version__, "commit": commit or git_commit(),
            "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")}


def write_result(folder: Path, result: dict, size: str) -> Path:
    """`folder/<device>-<size>.json`; returns its path."""
    folder.mkdir(parents=True, exist_ok=True)
    slug = re.sub(r"[^A-Za-z0-9]+", "-", result["device"]).strip("-").lower() + f"-{size}"
    path = folder / f"{slug}.json"
    path.write_text(json.dumps(result, indent=1) + "\n")
    return path


RESULTS_ROOT = Path(__file__).resolve().parent / "results"  # the committed record
RUNS_ROOT = Path(__file__).resolve().parent.parent / "runs" / "bench"  # where runs go by default (git-ignored)
MARKER = ".effllm-bench"  # names the benchmark that owns a results folder outside the record


def base_parser(doc: str, results: Path, quick_help: str) -> argparse.ArgumentParser:
    """The options every benchmark has: --quick, --out, --update-record and --commit. Parse with
    `parse_args`, which resolves where the run writes."""
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help=quick_help)
    parser.add_argument("--out", type=Path, default=None,
                        help="results folder: new, empty, or one this benchmark wrote before (default: a new "
                             f"{RUNS_ROOT.relative_to(RUNS_ROOT.parent.parent)}/{results.name}-<time>/)")
    parser.add_argument("--update-record", action="store_true",
                        help=f"write into the committed record, {results.relative_to(RESULTS_ROOT.parent.parent)}/ "
                             "(the checkout must be clean, so the result names the commit it measured)")
    parser.add_argument("--commit", default=None, help="git commit to record (default: ask git; for copies without .git)")
    parser.set_defaults(record=results)
    return parser


def parse_args(parser: argparse.ArgumentParser, argv: list[str] | None = None) -> argparse.Namespace:
    """Parse, then set `args.out` to the folder this run writes: the committed record only with
    --update-record (and a clean checkout, or an explicit --commit), else --out or a new folder
    under runs/bench/. A folder that holds other files than an earlier run of this benchmark is
    refused, so a run never replaces a committed result or anything else by surprise."""
    args = parser.parse_args(argv)
    record: Path = args.record
    if args.update_record:
        if args.out is not None:
            parser.error("--update-record writes the committed record; drop --out")
        commit = args.commit or git_commit()
        if commit == "unknown" or commit.endswith("-dirty"):
            parser.error(f"--update-record needs a clean checkout (git says {commit!r}): commit first, or name the "
                         "measured commit with --commit in a copy without .git")
        record.mkdir(parents=True, exist_ok=True)  # a benchmark's first record
        args.out = record
        return args
    if args.out is None:
        stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
        args.out = RUNS_ROOT / f"{record.name}-{stamp}"
    out = args.out.resolve()
    if out == RESULTS_ROOT or out.is_relative_to(RESULTS_ROOT):
        parser.error(f"{args.out} is the committed record: pass --update-record to write there")
    if out.exists() and not out.is_dir():
        parser.error(f"--out {args.out} is a file: choose a folder")
    names = sorted(p.name for p in out.iterdir()) if out.is_dir() else []
    owner = (out / MARKER).read_text().strip() if (out / MARKER).is_file() else None
    if names and owner != record.name:
        parser.error(f"--out {args.out} holds other files ({', '.join(names[:5])}): choose a new or empty folder")
    out.mkdir(parents=True, exist_ok=True)
    (out / MARKER).write_text(record.name + "\n")
    args.out = out
    return args


def write_markdown(folder: Path, lines: list[str]) -> Path:
    """folder/report.md from `lines`; returns its path."""
    report = folder / "report.md"
    report.write_text("\n".join(lines))
    return report


def size_and_device(quick: bool) -> tuple[str, torch.device]:
    """("quick" or "gpu", the device); the GPU-sized case refuses to run without CUDA."""
    size = "quick" if quick else "gpu"
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if size == "gpu" and device.type != "cuda":
        raise SystemExit("the GPU-sized case needs a CUDA GPU; run with --quick on a CPU")
    return size, device


def finish(out: Path, result: dict, size: str, write_report) -> None:
    """Write the result JSON, rebuild report.md, and print the ratios."""
    path = write_result(out, result, size)
    for k, v in result["ratios"].items():
        print(f"{k}: {v:.3g}")
    print(f"wrote {path} and {write_report(out)}")
