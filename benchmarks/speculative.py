"""Self-speculative decoding with the MTP module vs plain greedy decoding, on a trained checkpoint.

    python benchmarks/speculative.py --checkpoint runs/deepseek_tiny-<time> [--data-dir data/stdlib]

Prompts are windows of the validation split. Both decoders are greedy and use the KV caches, and
the script checks that their outputs are identical. It reports the draft acceptance rate and each
decoder's median tokens/s over the prompts, in the same run. Results:
benchmarks/results/speculative/<device>-<run name>.json and report.md.
"""

from __future__ import annotations

import json
import statistics
import time
from pathlib import Path

import torch
from common import base_parser, environment, finish, parse_args, sync, write_markdown

from effllm import checkpoint as ckpt_io
from effllm.data import TokenDataset
from effllm.mtp import speculative_generate

RESULTS = Path(__file__).resolve().parent / "results" / "speculative"


def write_report(folder: Path) -> Path:
    lines = ["# Self-speculative decoding (MTP drafts) vs greedy", "",
             "Written by `benchmarks/speculative.py` from the JSON files beside it.", "",
             "| run | device | date | acceptance | greedy tokens/s | speculative tokens/s | speed-up |",
             "|---|---|---|---|---|---|---|"]
    for path in sorted(folder.glob("*.json")):
        r = json.loads(path.read_text())
        lines.append(f"| {r['run']} | {r['device']} | {r['date']} | {r['acceptance']:.2f} | "
                     f"{r['greedy_tokens_per_s']:.0f} | {r['speculative_tokens_per_s']:.0f} | "
                     f"{r['ratios']['speculative / greedy tokens/s']:.2f}x |")
    return write_markdown(folder, lines + [""])


def main() -> None:
    parser = base_parser(__doc__, RESULTS, "unused: the checkpoint sets the size")
    parser.add_argument("--checkpoint", required=True, help="a run directory or a step_* folder")
    parser.add_argument("--data-dir", default="data/stdlib", help="prepared data whose val split gives the prompts")
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--prompt-len", type=int, default=64)
    parser.add_argument("--new-tokens", type=int, default=128)
    args = parse_args(parser)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model, state, _ = ckpt_io.load_model(args.checkpoint, device)
    val = TokenDataset(args.data_dir).splits["val"]
    stride = (len(val) - args.prompt_len) // args.prompts
    greedy_s, spec_s, drafted, accepted = [], [], 0, 0
    for i in range(args.prompts):
        prompt = torch.from_numpy(val[i * stride : i * stride + args.prompt_len].astype("int64"))[None].to(device)
        sync(device)
        t = time.perf_counter()
        greedy = model.generate(prompt, args.new_tokens, temperature=0.0)
        sync(device)
        greedy_s.append(time.perf_counter() - t)
        t = time.perf_counter()
        spec, stats = speculative_generate(model, prompt, args.new_tokens)
        sync(device)
        spec_s.append(time.perf_counter() - t)
        if not torch.equal(spec, greedy):
            raise SystemExit(f"prompt {i}: speculative output differs from greedy decoding")
        drafted, accepted = drafted + stats["drafted"], accepted + stats["accepted"]
    g, s = args.new_tokens / statistics.median(greedy_s), args.new_tokens / statistics.median(spec_s)
    result = {"bench": "speculative", "run": Path(args.checkpoint).name, **environment(device, args.commit),
              "checkpoint_step": state["step"], "prompts": args.prompts, "prompt_len": args.prompt_len,
              "new_tokens": args.new_tokens, "acceptance": accepted / drafted, "greedy_tokens_per_s": g,
              "speculative_tokens_per_s": s, "outputs_identical": True,
              "ratios": {"speculative / greedy tokens/s": s / g}}
    print(f"acceptance {accepted / drafted:.3f}; greedy {g:.0f} tokens/s, speculative {s:.0f} tokens/s")
    finish(args.out, result, Path(args.checkpoint).name, write_report)


if __name__ == "__main__":
    main()
