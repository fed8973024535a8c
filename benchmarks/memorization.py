"""Verbatim memorisation with and without Goldfish loss, in one run.

    python benchmarks/memorization.py --quick      # CPU: a tiny model, ~40 epochs over ~40 small files

A tiny dense model is trained for many epochs on a small set of documents (the standard library's
`json`, `email.mime` and `importlib.metadata` packages, PSF-2.0), once with the plain loss and once with Goldfish loss
(k=4, h=13), with the same data, steps and seed. Then, for each training document long enough,
the model greedily continues a 32-token prefix taken from the document, and a continuation counts
as recalled when its next 32 tokens equal the document's exactly. The report gives the recall
rate of both models and their validation loss on held-out documents of the same set.

Goal: Goldfish loss at least halves verbatim recall, at a small validation-loss cost.
Results: benchmarks/results/memorization/<device>-<size>.json and report.md.
"""

from __future__ import annotations

import json
import sysconfig
import tempfile
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from common import base_parser, environment, parse_args, write_markdown, write_result

from effllm import checkpoint as ckpt_io
from effllm.data import TokenDataset
from effllm.model import ModelConfig, Transformer
from effllm.prepare import PrepareConfig, prepare
from effllm.train import OptimConfig, TrainConfig, train

RESULTS = Path(__file__).resolve().parent / "results" / "memorization"
PREFIX = SUFFIX = 32


def small_corpus(work: Path) -> Path:
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    packages = ("json", "email/mime", "importlib/metadata")  # ~100 KB in 21 files
    cfg = PrepareConfig(sources=tuple(f"{stdlib / p}=PSF-2.0" for p in packages), out=str(work / "data"),
                        extensions=(".py",), val_fraction=0.15)
    return prepare(cfg, progress=False)


def training_documents(data: TokenDataset) -> list[np.ndarray]:
    ids = np.asarray(data.splits["train"], dtype=np.int64)
    ends = np.flatnonzero(ids == data.tokenizer.eot_id)
    docs, start = [], 0
    for end in ends:
        docs.append(ids[start:end])
        start = end + 1
    return docs


@torch.no_grad()
def recall(model: Transformer, docs: list[np.ndarray], samples_per_doc: int) -> dict:
    """Share of (document, offset) samples whose greedy 32-token continuation is verbatim; the
    offsets are spread evenly over each document."""
    model.eval()
    device = next(model.parameters()).device
    hits = total = 0
    for doc in docs:
        if len(doc) < PREFIX + SUFFIX:
            continue
        for offset in np.linspace(0, len(doc) - PREFIX - SUFFIX, samples_per_doc).astype(int):
            prompt = torch.from_numpy(doc[offset:offset + PREFIX])[None].to(device)
            out = model.generate(prompt, SUFFIX, temperature=0.0)[0, PREFIX:].cpu()
            hits += int(torch.equal(out, torch.from_numpy(doc[offset + PREFIX:offset + PREFIX + SUFFIX])))
            total += 1
    return {"recalled": hits, "samples": total, "rate": hits / max(1, total)}


def write_report(folder: Path) -> Path:
    lines = ["# Verbatim memorisation with and without Goldfish loss", "",
             "Written by `benchmarks/memorization.py` from the JSON files beside it.", ""]
    for path in sorted(folder.glob("*.json")):
        r = json.loads(path.read_text())
        lines += [f"## {r['device']}, {r['size']} ({r['date']})", "", f"torch {r['torch']}, commit `{r['commit']}`; "
                  f"{r['setup']}", "", "| loss | verbatim recall (32 of 32 tokens) | val loss | train loss |",
                  "|---|---|---|---|"]
        for name, row in r["runs"].items():
            rc = row["recall"]
            lines.append(f"| {name} | {100 * rc['rate']:.1f}% ({rc['recalled']}/{rc['samples']}) | "
                         f"{row['final_val_loss']:.4f} | {row['final_train_loss']:.4f} |")
        lines += ["", "Ratios: " + ", ".join(f"{k} = {v:.3g}" for k, v in r["ratios"].items()), ""]
        lines += [f"Goal (recall at least halved): {'met' if r['ratios']['recall goldfish / plain'] <= 0.5 else 'not met'}."
                  if r["runs"]["plain"]["recall"]["rate"] > 0 else "The plain model recalled nothing: no goal to test.",
                  ""]
    return write_markdown(folder, lines)


def main() -> None:
    parser = base_parser(__doc__, RESULTS, "CPU-sized (the only size so far)")
    parser.add_argument("--steps", type=int, default=1500, help="optimizer steps per run")
    parser.add_argument("--samples-per-doc", type=int, default=8, help="prefix offsets tested per document")
    args = parse_args(parser)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    size = "quick" if args.quick else "full"
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        data_dir = small_corpus(work)
        data = TokenDataset(data_dir)
        docs = training_documents(data)
        model = ModelConfig(vocab_size=256, dim=128, n_layers=4, n_heads=4, max_seq_len=256)
        base = TrainConfig(model=model, optim=OptimConfig(lr=2e-3, warmup_steps=50), data_dir=str(data_dir),
                           batch_size=16, seq_len=256, max_steps=args.steps, log_interval=50,
                           eval_interval=args.steps, eval_tokens=32768, ckpt_interval=0, progress=False,
                           device=str(device))
        runs = {}
        for name, k in (("plain", 0), ("goldfish k=4, h=13", 4)):
            out = work / name.split()[0]
            summary = train(replace(base, out_dir=str(out), goldfish_k=k))
            trained, _, _ = ckpt_io.load_model(out, device)
            runs[name] = {"final_val_loss": summary["final_val_loss"], "final_train_loss": summary["final_train_loss"],
                          "tokens_seen": summary["tokens_seen"],
                          "recall": recall(trained, docs, args.samples_per_doc)}
            print(f"{name}: recall {100 * runs[name]['recall']['rate']:.1f}%, val loss {summary['final_val_loss']:.4f}",
                  flush=True)
        train_tokens = data.manifest["totals"]["train_tokens"]
    plain, gold = runs["plain"], runs["goldfish k=4, h=13"]
    ratios = {"recall goldfish / plain": gold["recall"]["rate"] / plain["recall"]["rate"]
              if plain["recall"]["rate"] else float("nan"),
              "val loss goldfish / plain": gold["final_val_loss"] / plain["final_val_loss"]}
    setup = (f"dense dim 128 x 4 layers; {args.steps} steps of {base.tokens_per_step} tokens = "
             f"{args.steps * base.tokens_per_step / train_tokens:.0f} epochs over {train_tokens:,} training tokens "
             f"({len(docs)} training documents); recall tested at {args.samples_per_doc} offsets spread over each "
             "document.")
    result = {"bench": "memorization", "size": size, **environment(device, args.commit), "setup": setup,
              "runs": runs, "ratios": ratios}
    path = write_result(args.out, result, size)
    for k, v in ratios.items():
        print(f"{k}: {v:.3g}")
    print(f"wrote {path} and {write_report(args.out)}")


if __name__ == "__main__":
    main()
