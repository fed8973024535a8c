"""KV-cache bytes per token and decode speed: MHA vs GQA vs MLA (naive and absorbed), one run.

    python benchmarks/mla_decode.py --quick    # CPU-sized, a minute
    python benchmarks/mla_decode.py            # GPU-sized, bf16

All models share width, depth, heads and vocabulary. MHA caches 2·H·hs numbers per token and layer,
and GQA caches 2·G·hs with G = H/4 key/value heads. MLA uses DeepSeek-V2-Lite's attention shape
(kv_lora_rank 512, rope 64, nope 128, v 128) and caches 512 + 64. For each context length the
cache is filled by one prefill of random tokens; then single-token decode steps are timed alone
(device synchronised). The report gives the median step and tokens/s = batch / step time. Each
layer's SDPA backend is probed too: which of flash / efficient / math accept the MLA shapes.
Results: benchmarks/results/mla_decode/<device>-<size>.json and report.md.
"""

from __future__ import annotations

import json
from dataclasses import asdict, replace
from pathlib import Path

import torch
import torch.nn.functional as F
from common import base_parser, environment, finish, parse_args, size_and_device, time_fn, write_markdown

from effllm.mla import MLAConfig
from effllm.model import ModelConfig, Transformer

RESULTS = Path(__file__).resolve().parent / "results" / "mla_decode"

SIZES = {
    "quick": dict(dim=256, n_heads=8, n_layers=2, batch=4, contexts=(128, 512, 1024), steps=8, dtype=torch.float32,
                  mla=MLAConfig(n_heads=8, kv_lora_rank=64, qk_rope_head_dim=16, qk_nope_head_dim=32, v_head_dim=32)),
    "gpu": dict(dim=2048, n_heads=16, n_layers=4, batch=16, contexts=(512, 2048, 8192), steps=30, dtype=torch.bfloat16,
                mla=MLAConfig(n_heads=16, kv_lora_rank=512, qk_rope_head_dim=64, qk_nope_head_dim=128, v_head_dim=128)),
}


def models(spec: dict, max_len: int) -> dict[str, ModelConfig]:
    base = ModelConfig(vocab_size=256, dim=spec["dim"], n_layers=spec["n_layers"], n_heads=spec["n_heads"],
                       max_seq_len=max_len)
    return {
        "mha": base,
        "gqa": replace(base, n_kv_heads=spec["n_heads"] // 4),
        "mla-naive": replace(base, attention="mla", mla=replace(spec["mla"], decode="naive")),
        "mla-absorbed": replace(base, attention="mla", mla=replace(spec["mla"], decode="absorbed")),
    }


def cache_bytes_per_token(model: Transformer, caches: list) -> int:
    total = 0
    for c in caches:
        if hasattr(c, "bytes_per_token"):
            total += c.bytes_per_token()
        else:  # KVCache: keys and values
            total += 2 * c.k.shape[1] * c.k.shape[3] * c.k.element_size()
    return total


def sdpa_backends(device: torch.device, dtype: torch.dtype, spec: dict) -> dict:
    """Which SDPA backends accept MLA's training shapes (qk N+R, v V) and absorbed shapes (C+R, C)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    m = spec["mla"]
    B, H, T = 2, m.n_heads, 256
    shapes = {"training (qk {}, v {})".format(m.qk_head_dim, m.v_head_dim): (m.qk_head_dim, m.v_head_dim, H, True),
              "absorbed decode (qk {}, v {})".format(m.kv_lora_rank + m.qk_rope_head_dim, m.kv_lora_rank):
                  (m.kv_lora_rank + m.qk_rope_head_dim, m.kv_lora_rank, 1, False)}
    out = {}
    for name, (dqk, dv, kv_heads, causal) in shapes.items():
        q = torch.randn(B, H, 1 if not causal else T, dqk, device=device, dtype=dtype)
        k = torch.randn(B, kv_heads, T, dqk, device=device, dtype=dtype)
        v = torch.randn(B, kv_heads, T, dv, device=device, dtype=dtype)
        out[name] = {}
        for backend in (SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH):
            try:
                with sdpa_kernel([backend]):
                    F.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=kv_heads != H)
                out[name][backend.name] = "ok"
            except RuntimeError as e:
                out[name][backend.name] = "refused: " + str(e).splitlines()[0][:120]
    return out


@torch.no_grad()
def time_decode(model: Transformer, batch: int, ctx: int, steps: int, device: torch.device) -> tuple[dict, list]:
    """Prefill `ctx` random tokens, then time single-token decode steps; returns (timing, caches)."""
    caches = model.new_caches(batch, ctx + steps + 2)
    model(torch.randint(0, 256, (batch, ctx), device=device), caches=caches)
    token = torch.randint(0, 256, (batch, 1), device=device)
    pos = iter(range(ctx, ctx + steps + 2))
    return time_fn(lambda: model(token, caches=caches, pos=next(pos)), device, warmup=2, repeats=steps), caches


def write_report(folder: Path) -> Path:
    lines = ["# Decode: MHA vs GQA vs MLA", "",
             "Written by `benchmarks/mla_decode.py` from the JSON files beside it. Median single-token decode step "
             "after a prefill of the given context; tokens/s = batch / step time.", ""]
    for path in sorted(folder.glob("*.json")):
        r = json.loads(path.read_text())
        c = r["config"]
        lines += [f"## {r['device']}, {r['size']} ({r['date']})", "",
                  f"torch {r['torch']}, triton {r['triton']}, commit `{r['commit']}`; dim {c['dim']}, {c['n_layers']} layers, "
                  f"{c['n_heads']} heads, batch {c['batch']}, {c['dtype']}.", "",
                  "| model | cache bytes/token (all layers) | " + " | ".join(f"ctx {n} tokens/s" for n in c["contexts"]) + " |",
                  "|---|---|" + "---|" * len(c["contexts"])]
        for name, row in r["rows"].items():
            lines.append(f"| {name} | {row['cache_bytes_per_token']:,} | "
                         + " | ".join(f"{row['contexts'][str(n)]['tokens_per_s']:,.0f}" for n in c["contexts"]) + " |")
        lines += ["", "Ratios (same run): " + ", ".join(f"{k} = {v:.3g}" for k, v in r["ratios"].items()), ""]
        if r.get("sdpa_backends"):
            lines += ["SDPA backends for MLA's shapes:", ""]
            for shape, backends in r["sdpa_backends"].items():
                lines.append(f"- {shape}: " + "; ".join(f"{b} {s}" for b, s in backends.items()))
            lines.append("")
    return write_markdown(folder, lines)


def main() -> None:
    parser = base_parser(__doc__, RESULTS, "CPU-sized case")
    args = parse_args(parser)
    size, device = size_and_device(args.quick)
    spec = SIZES[size]
    dtype, B = spec["dtype"], spec["batch"]
    max_len = max(spec["contexts"]) + spec["steps"] + 8
    rows = {}
    for name, cfg in models(spec, max_len).items():
        torch.manual_seed(0)
        model = Transformer(cfg).to(device, dtype).eval()
        row = {"params": model.param_counts(), "contexts": {}}
        for ctx in spec["contexts"]:
            t, caches = time_decode(model, B, ctx, spec["steps"], device)
            row["cache_bytes_per_token"] = cache_bytes_per_token(model, caches)
            row["contexts"][str(ctx)] = {**t, "tokens_per_s": B / t["median_s"]}
            print(f"{name:13s} ctx {ctx:5d}: {1e3 * t['median_s']:8.3f} ms/step  {B / t['median_s']:10,.0f} tokens/s",
                  flush=True)
        rows[name] = row
        del model, caches
        if device.type == "cuda":
            torch.cuda.empty_cache()
    longest = str(max(spec["contexts"]))
    ratios = {
        "mla / gqa cache bytes": rows["mla-absorbed"]["cache_bytes_per_token"] / rows["gqa"]["cache_bytes_per_token"],
        "mla / mha cache bytes": rows["mla-absorbed"]["cache_bytes_per_token"] / rows["mha"]["cache_bytes_per_token"],
        f"absorbed / naive tokens/s at ctx {longest}":
            rows["mla-absorbed"]["contexts"][longest]["tokens_per_s"] / rows["mla-naive"]["contexts"][longest]["tokens_per_s"],
        f"absorbed / gqa tokens/s at ctx {longest}":
            rows["mla-absorbed"]["contexts"][longest]["tokens_per_s"] / rows["gqa"]["contexts"][longest]["tokens_per_s"],
    }
    result = {"bench": "mla_decode", "size": size, **environment(device, args.commit),
              "config": {"dim": spec["dim"], "n_layers": spec["n_layers"], "n_heads": spec["n_heads"], "batch": B,
                         "contexts": list(spec["contexts"]), "decode_steps_timed": spec["steps"], "dtype": str(dtype),
                         "gqa_kv_heads": spec["n_heads"] // 4, "mla": asdict(spec["mla"]),
                         "tokens": "random ids; prefill fills the cache"},
              "rows": rows, "ratios": ratios,
              "sdpa_backends": sdpa_backends(device, dtype, spec) if device.type == "cuda" else None}
    finish(args.out, result, size, write_report)


if __name__ == "__main__":
    main()
