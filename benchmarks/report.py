"""Rebuild an efficiency report (report.md, throughput.png, val_loss.png) from its results.json.

    python benchmarks/report.py benchmarks/results/efficiency-cpu-quick
    python benchmarks/report.py                      # every benchmarks/results/efficiency-*/ folder

The plots need matplotlib (`pip install matplotlib`, in effllm's dev extra); without it the
markdown is still written and the plots are skipped with a message.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"

# The goals of the efficiency issue: (ratio key, comparison, threshold, what it means).
GOALS = [
    ("deepseek / dense equal-active, tokens per device-hour", ">=", 0.6,
     "DeepSeek-style throughput at least 0.6x the dense model of equal active parameters"),
    ("deepseek: compute multiplier (baseline time / time to reach its final loss)", ">=", 1.5,
     "DeepSeek-style reaches the dense baseline's final loss in at most 1/1.5 of its time"),
    ("deepseek / dense equal-total, tokens per device-hour", ">=", 2.0,
     "DeepSeek-style throughput at least 2x the dense model of equal total parameters"),
    ("deepseek FP8 / bf16, tokens/s", ">=", 1.2, "FP8 at least 1.2x the tokens/s of the same model in bf16"),
    ("deepseek FP8 vs bf16, final val loss relative difference", "<=", 0.0025,
     "FP8's final loss within 0.25% of bf16's"),
]


def _fmt_bytes(b) -> str:
    return "-" if b is None else f"{b / 2**30:.1f}"


def goal_lines(r: dict) -> list[str]:
    lines = ["| goal | measured | met? |", "|---|---|---|"]
    deepseek = next((row for row in r["rows"] if row["role"] == "deepseek"), {})
    for key, op, threshold, text in GOALS:
        value = r["ratios"].get(key)
        q = deepseek.get("quality")
        if value is None and key.startswith("deepseek: compute multiplier") and q:
            # measured, and the DeepSeek-style model never got down to the baseline's final loss
            lines.append(f"| {text} | never reached it within the budget (final loss {q['final_val_loss']:.4f}) "
                         "| **no** |")
            continue
        if value is None:
            lines.append(f"| {text} | not measured in this run | - |")
            continue
        met = value >= threshold if op == ">=" else value <= threshold
        shown = f"{100 * value:.2f}%" if "relative" in key else f"{value:.2f}x"
        lines.append(f"| {text} | {shown} | {'yes' if met else '**no**'} |")
    return lines


def markdown(r: dict) -> str:
    unit = r["unit"]
    lines = [f"# Efficiency report: tokens and loss per {unit}", "",
             f"{r['device']}, {r['date']}; torch {r['torch']}, triton {r['triton']}, commit `{r['commit']}`; "
             f"data `{r['data_dir']}`. Written by `benchmarks/tokens_per_gpu_hour.py` "
             f"({'--quick' if r['size'] == 'quick' else 'GPU size'}{', --quality' if r.get('quality_budget_s') else ''}); "
             "rebuild with `python benchmarks/report.py <this folder>`.", "",
             "## Throughput", "",
             "The trainer's own step on the prepared data, median of timed steps after warm-up.", "",
             f"| model | recipe | params total / active | precision | step (ms) | tokens/s | tokens per {unit} | "
             "train GFLOPs/token | MFU | peak mem (GiB) |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for row in r["rows"]:
        tp = row.get("throughput")
        if tp is None:
            lines.append(f"| {row['label']} | {row['recipe']} | | | skipped: {row.get('skipped', '')} | | | | | |")
            continue
        p = tp["params"]
        total = p["total"] - p["mtp"]
        mtp = f" (+{p['mtp'] / 1e6:.2f}M MTP)" if p["mtp"] else ""
        util = "-" if tp["mfu"] is None else f"{100 * tp['mfu']:.1f}%"
        lines.append(f"| {row['label']} | {row['recipe']} | {total / 1e6:.2f}M{mtp} / {p['active'] / 1e6:.2f}M | "
                     f"{tp['precision']} | {tp['step_s_median'] * 1e3:.1f} | {tp['tokens_per_s']:,.0f} | "
                     f"{tp['tokens_per_device_hour']:.3g} | {tp['train_flops_per_token'] / 1e9:.4f} | {util} | "
                     f"{_fmt_bytes(tp['peak_mem_bytes'])} |")
    lines += ["", "MFU is against the device's dense bf16 peak; it is not given for FP8 runs (where it misleads) "
              "or on a CPU (no peak to compare with). FLOPs count attention and the active experts, MTP included.", ""]
    if r.get("quality_budget_s"):
        lines += ["## Quality at equal training time", "",
                  f"Each model trained for about {r['quality_budget_s']:.0f} s (its recipe's schedule compressed "
                  "into the steps its throughput allows), on the same data; training time excludes evaluation.", "",
                  "| model | steps | tokens | training time (s) | final val loss | time to reach the baseline's "
                  "final loss (s) |", "|---|---|---|---|---|---|"]
        for row in r["rows"]:
            q = row.get("quality")
            if not q:
                continue
            reach = q.get("time_to_baseline_loss_s")
            reach_s = ("(baseline)" if row["role"] == "dense_active" else
                       "not reached" if reach is None else f"{reach:.0f}")
            lines.append(f"| {row['label']} | {q['steps']} | {q['tokens_seen']:,} | {q['train_s']:.0f} | "
                         f"{q['final_val_loss']:.4f} | {reach_s} |")
        lines.append("")
    lines += ["## Ratios and goals", "", "Every ratio is between models measured in this one run.", ""]
    lines += [f"- {k}: {v:.3g}" for k, v in r["ratios"].items()] + [""]
    lines += goal_lines(r) + [""]
    plots = [name for name in ("throughput.png", "val_loss.png") if name in r.get("_plots", [])]
    lines += [f"![{name[:-4]}]({name})" for name in plots]
    return "\n".join(lines) + "\n"


def plots(r: dict, folder: Path) -> list[str]:
    """throughput.png (bars) and, with quality runs, val_loss.png; [] without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: plots skipped (pip install matplotlib, then rerun report.py)")
        return []
    made = []
    rows = [row for row in r["rows"] if row.get("throughput")]
    fig, ax = plt.subplots(figsize=(7, 3.5))
    ax.barh([row["label"] for row in rows], [row["throughput"]["tokens_per_device_hour"] for row in rows])
    ax.invert_yaxis()
    ax.set_xlabel(f"tokens per {r['unit']}")
    ax.set_title(f"Training throughput, {r['device']}")
    fig.tight_layout()
    fig.savefig(folder / "throughput.png", dpi=120)
    plt.close(fig)
    made.append("throughput.png")
    curves = [row for row in rows if row.get("quality")]
    if curves:
        fig, ax = plt.subplots(figsize=(7, 4))
        for row in curves:
            c = row["quality"]["curve"]
            ax.plot([p["device_hours"] for p in c], [p["val_loss"] for p in c], marker="o", ms=3, label=row["label"])
        base = next((row for row in curves if row["role"] == "dense_active"), None)
        if base:
            ax.axhline(base["quality"]["final_val_loss"], color="grey", ls=":", lw=1, label="baseline's final loss")
        ax.set_xlabel(f"training {r['unit'].replace('-hour', '-hours')}")
        ax.set_ylabel("validation loss (nats/token)")
        ax.set_title(f"Validation loss at equal training time, {r['device']}")
        ax.legend()
        fig.tight_layout()
        fig.savefig(folder / "val_loss.png", dpi=120)
        plt.close(fig)
        made.append("val_loss.png")
    return made


def write_report(folder: Path) -> list[Path]:
    """report.md (and the plots) in `folder` from its results.json; returns the files written."""
    folder = Path(folder)
    r = json.loads((folder / "results.json").read_text())
    r["_plots"] = plots(r, folder)
    (folder / "report.md").write_text(markdown(r))
    return [folder / "report.md", *(folder / name for name in r["_plots"])]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("folders", nargs="*", type=Path,
                        help=f"results folders (default: every efficiency-*/ folder under {RESULTS})")
    folders = parser.parse_args(argv).folders or sorted(p.parent for p in RESULTS.glob("efficiency-*/results.json"))
    if not folders:
        sys.exit(f"no efficiency results under {RESULTS}: run benchmarks/tokens_per_gpu_hour.py first")
    for folder in folders:
        if not (folder / "results.json").is_file():
            sys.exit(f"{folder} has no results.json")
        print("wrote " + ", ".join(str(p) for p in write_report(folder)))


if __name__ == "__main__":
    main()
