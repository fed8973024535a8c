"""`effllm prepare` throughput at 1 and N tokenizing processes, byte-level and BPE, in one run.

    python benchmarks/prepare_speed.py --quick      # 2 copies of the stdlib corpus (~26 MB), 3 repeats
    python benchmarks/prepare_speed.py              # 6 copies (~80 MB)

The corpus is the embedded one (the standard library's .py files, PSF-2.0) copied k times, each
copy's files headed by a line naming the copy so that no document is an exact duplicate of another.
Each configuration prepares the whole corpus (read pass, tokenization, manifest) into a new folder;
the workers alternate within each repeat, so drift in the machine's speed hits both alike. The BPE
case tokenizes with a BPE trained once beforehand on the first copy (`--tokenizer FILE`), so its
figures are tokenization, not training. Reported: medians of MB/s (input bytes / wall time), the
speed-up of N workers over 1 against the goal of 0.8 x N, that every worker count wrote the same
bytes (sha256 of train.bin, val.bin, manifest.json), and the largest resident memory of a
tokenizing process and of the main process.

Results: benchmarks/results/prepare_speed/<device>-<size>.json and report.md.
"""

from __future__ import annotations

import hashlib
import os
import resource
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import torch
from common import base_parser, environment, parse_args, write_markdown, write_result

from effllm.prepare import PrepareConfig, prepare
from effllm.sources import stdlib_source

RESULTS = Path(__file__).resolve().parent / "results" / "prepare_speed"


def corpus(root: Path, copies: int) -> tuple[Path, int]:
    """`copies` copies of the stdlib corpus under root/copy_k, each file headed by its copy's number."""
    src = stdlib_source()
    total = 0
    for k in range(copies):
        for f in src.files:
            out = root / f"copy_{k}" / f.rel
            out.parent.mkdir(parents=True, exist_ok=True)
            data = f"# copy {k}\n".encode() + f.path.read_bytes()
            out.write_bytes(data)
            total += len(data)
    return root, total


def digest(out: Path) -> str:
    h = hashlib.sha256()
    for name in ("train.bin", "val.bin", "manifest.json"):
        h.update((out / name).read_bytes())
    return h.hexdigest()


def main() -> None:
    parser = base_parser(__doc__, RESULTS, "2 copies of the corpus, 3 repeats")
    parser.add_argument("--copies", type=int, default=None, help="copies of the stdlib corpus (default 2 quick, 6)")
    parser.add_argument("--repeats", type=int, default=3)
    args = parse_args(parser)
    size = "quick" if args.quick else "full"
    copies = args.copies or (2 if args.quick else 6)
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    work = Path(tempfile.mkdtemp(prefix="effllm-prepare-speed-"))
    try:
        root, n_bytes = corpus(work / "corpus", copies)
        sources = tuple(f"{p}=PSF-2.0" for p in sorted(root.iterdir()))
        base = PrepareConfig(sources=sources, extensions=(".py",))
        bpe = prepare(PrepareConfig(sources=sources[:1], extensions=(".py",), tokenizer="bpe", vocab_size=4096,
                                    out=str(work / "bpe")), progress=False) / "tokenizer.json"
        cases = {"byte": base, "bpe": PrepareConfig(**{**base.__dict__, "tokenizer": str(bpe)})}
        rows = {}
        for name, cfg in cases.items():
            times = {1: [], cores: []}
            digests = set()
            main_rss = {}
            for r in range(args.repeats):
                for w in ((1, cores) if r % 2 == 0 else (cores, 1)):
                    out = work / f"out-{name}-{w}-{r}"
                    t0 = time.perf_counter()
                    prepare(PrepareConfig(**{**cfg.__dict__, "out": str(out), "workers": w}), progress=False)
                    times[w].append(time.perf_counter() - t0)
                    digests.add(digest(out))
                    main_rss[w] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
                    shutil.rmtree(out)
            med = {w: statistics.median(t) for w, t in times.items()}
            rows[name] = {"seconds": times, "median_s": med, "mb_per_s": {w: n_bytes / 1e6 / t for w, t in med.items()},
                          "speedup": med[1] / med[cores], "goal": 0.8 * cores,
                          "identical_output": len(digests) == 1}
        children_rss = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
        result = {"bench": "prepare_speed", "size": size, **environment(torch.device("cpu"), args.commit),
                  "setup": {"copies": copies, "corpus_bytes": n_bytes, "cores": cores, "repeats": args.repeats,
                            "bpe": "vocab 4096, trained on the first copy beforehand (excluded from the timings)"},
                  "cases": rows, "max_rss_kib": {"tokenizing_process": children_rss, "main_process": max(main_rss.values())}}
        path = write_result(args.out, result, size)
        lines = [f"# effllm prepare throughput, {result['device']}, {cores} cores", "",
                 f"Commit {result['commit']}, torch {result['torch']}, {result['date']}. Corpus: {copies} copies of the "
                 f"stdlib corpus, {n_bytes / 1e6:.1f} MB; medians of {args.repeats}.", "",
                 f"| tokenizer | 1 worker MB/s | {cores} workers MB/s | speed-up | goal | same output |",
                 "|---|---|---|---|---|---|"]
        for name, r in rows.items():
            lines.append(f"| {name} | {r['mb_per_s'][1]:.2f} | {r['mb_per_s'][cores]:.2f} | {r['speedup']:.2f}x | "
                         f">= {r['goal']:.1f}x | {'yes' if r['identical_output'] else 'NO'} |")
        lines += ["", f"Largest resident memory: a tokenizing process {children_rss / 1024:.0f} MiB, the main process "
                  f"{result['max_rss_kib']['main_process'] / 1024:.0f} MiB.", ""]
        write_markdown(args.out, lines)
        print("\n".join(lines))
        print(f"wrote {path}")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
