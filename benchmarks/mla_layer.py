"""Multi-head latent attention, forward + backward, against the implementation a user would otherwise pick.

    python benchmarks/mla_layer.py --quick     # CPU: deepseek_tiny's attention, fp32, seconds
    python benchmarks/mla_layer.py             # GPU: deepseek_600m's attention, bf16

The peer is transformers' DeepseekV3Attention, with its "sdpa" and "eager" attention
implementations, holding effllm's weights through the export's own mapping (effllm.hf, via
peer_step.peer_of) and checked before timing: its output and input gradient must match effllm's.
Cases, in one run, on the same input and output gradient:
- effllm: `MLA`'s training path (keys and values up-projected from the latent, SDPA's causal
  kernel, the values padded to the query width where that kernel needs it);
- peer[sdpa], peer[eager]: DeepseekV3Attention with transformers' rotary tables for the same
  positions; "sdpa" is causal through SDPA's `is_causal`, "eager" gets the causal mask that
  transformers' model would build for it;
- mha (for scale, not a peer): the dense baseline's attention at the same width (dense_tiny's or
  dense_120m's), what MLA replaces.
Each case: forward, then backward from the same output gradient into the input and every weight.
Warmed up alone, then timed interleaved (alternating order), each call timed alone; medians and
10th/90th percentiles. Results: benchmarks/results/mla_layer/<device>-<size>.json and report.md.
"""

from __future__ import annotations

import json
from dataclasses import asdict, replace
from pathlib import Path

import torch
from common import (
    base_parser,
    environment,
    finish,
    parse_args,
    size_and_device,
    time_interleaved,
    timing_table,
    write_markdown,
)
from peer_step import peer_of

from effllm.model import ModelConfig, Transformer
from effllm.recipes import deepseek_600m, deepseek_tiny, dense_120m, dense_tiny

RESULTS = Path(__file__).resolve().parent / "results" / "mla_layer"
ATTENTIONS = ("sdpa", "eager")

# (MLA model, dense model of the same width, batch, tokens per sequence)
SIZES = {"quick": (deepseek_tiny.config().model, dense_tiny.config().model, 16, 256),
         "gpu": (deepseek_600m.config().model, dense_120m.config().model, 8, 1024)}


def one_layer(cfg: ModelConfig) -> ModelConfig:
    """`cfg` cut to one block with a dense feed-forward (the attention is what is timed)."""
    return replace(cfg, n_layers=1, first_k_dense=1, mtp_depth=0)


def cases_for(mla_model: ModelConfig, dense_model: ModelConfig, batch: int, seq: int, device, dtype,
              attentions=ATTENTIONS) -> tuple[dict, dict]:
    """({name: step}, {peer name: (output rel err, input-grad rel err)}): each step runs one forward
    and backward; the peers are checked against effllm before being returned."""
    torch.manual_seed(0)
    model = Transformer(one_layer(mla_model)).to(device)
    layer = model.blocks[0].attn.to(dtype)
    x = torch.randn(batch, seq, mla_model.dim, device=device, dtype=dtype)
    dy = torch.randn_like(x)
    cos, sin = (t.to(device) for t in model.rope(0, seq))

    def forward_backward(module, run):
        def step():
            for p in module.parameters():
                p.grad = None
            xi = x.detach().requires_grad_()
            out = run(xi)
            out.backward(dy)
            return out.detach(), xi.grad
        return step

    cases = {"effllm": forward_backward(layer, lambda xi: layer(xi, (cos, sin)))}
    reference = cases["effllm"]()
    errors = {}
    positions = torch.arange(seq, device=device)[None].expand(batch, seq)
    causal = torch.full((seq, seq), float("-inf"), device=device, dtype=dtype).triu(1)[None, None]
    for attention in attentions:
        name = f"peer[{attention}]"
        peer = peer_of(model, "eager", attention)
        attn = peer.model.layers[0].self_attn.to(dtype)
        embeddings = tuple(t.to(dtype) for t in peer.model.rotary_emb(x, positions))
        mask = causal.expand(batch, 1, seq, seq) if attention == "eager" else None
        step = forward_backward(attn, lambda xi, attn=attn, embeddings=embeddings, mask=mask:
                                attn(xi, position_embeddings=embeddings, attention_mask=mask)[0])
        out, grad = step()
        errors[name] = (((out - reference[0]).norm() / reference[0].norm()).item(),
                        ((grad - reference[1]).norm() / reference[1].norm()).item())
        tol = 1e-4 if dtype == torch.float32 else 3e-2
        if max(errors[name]) > tol:
            raise RuntimeError(f"{name} does not compute effllm's MLA (output, input gradient rel err {errors[name]}, "
                               f"tolerance {tol}): the comparison would time different functions")
        cases[name] = step
    dense = Transformer(one_layer(dense_model)).to(device)
    mha = dense.blocks[0].attn.to(dtype)
    rope = tuple(t.to(device) for t in dense.rope(0, seq))
    cases["mha"] = forward_backward(mha, lambda xi: mha(xi, rope))
    return cases, errors


def write_report(folder: Path) -> Path:
    lines = ["# MLA forward + backward: effllm against transformers' DeepseekV3Attention", "",
             "Written by `benchmarks/mla_layer.py` from the JSON files beside it. The same weights, input and output "
             "gradient; forward, then backward into the input and every weight; median over timed calls. `mha` is the "
             "dense baseline's attention at the same width, for scale (not a peer).", ""]
    for path in sorted(folder.glob("*.json")):
        r = json.loads(path.read_text())
        c = r["config"]
        lines += [f"## {r['device']}, {r['size']} ({r['date']})", "",
                  f"torch {r['torch']}, triton {r['triton']}, transformers {r['transformers']}, commit "
                  f"`{r['commit']}`; {c['recipe']}'s MLA (dim {c['dim']}, {c['mla']['n_heads']} heads, latent "
                  f"{c['mla']['kv_lora_rank']}, nope/rope/v {c['mla']['qk_nope_head_dim']}/"
                  f"{c['mla']['qk_rope_head_dim']}/{c['mla']['v_head_dim']}); batch {c['batch']} x seq {c['seq']}, "
                  f"{c['dtype']}.", "", *timing_table(r["rows"], digits=2)]
        lines += ["", "Same function: each peer's output and input gradient against effllm's, relative error "
                  + ", ".join(f"{k} {a:.1e} / {b:.1e}" for k, (a, b) in r["rel_err"].items()) + ".", "",
                  "Ratios (same run): " + ", ".join(f"{k} = {v:.2f}x" for k, v in r["ratios"].items()), ""]
    return write_markdown(folder, lines)


def main() -> None:
    parser = base_parser(__doc__, RESULTS, "CPU-sized case (deepseek_tiny's attention, fp32)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed calls per case (default 3 quick, 10 gpu)")
    parser.add_argument("--repeats", type=int, default=None, help="timed calls per case (default 20 quick, 50 gpu)")
    args = parse_args(parser)
    import transformers

    size, device = size_and_device(args.quick)
    mla_model, dense_model, batch, seq = SIZES[size]
    dtype = torch.float32 if args.quick else torch.bfloat16
    warmup, repeats = args.warmup or (3 if args.quick else 10), args.repeats or (20 if args.quick else 50)
    cases, errors = cases_for(mla_model, dense_model, batch, seq, device, dtype)
    for name, err in errors.items():
        print(f"{name:14s} vs effllm: output {err[0]:.1e}, input gradient {err[1]:.1e}", flush=True)
    rows = time_interleaved(cases, device, warmup, repeats, batch * seq)
    for name, row in rows.items():
        print(f"{name:14s} {1e3 * row['median_s']:9.2f} ms", flush=True)
    peers = {n: r["median_s"] for n, r in rows.items() if n.startswith("peer[")}
    fastest = min(peers, key=peers.get)
    ratios = {f"effllm speed-up over the fastest peer, {fastest}": peers[fastest] / rows["effllm"]["median_s"]}
    ratios.update({f"effllm speed-up over {n}": t / rows["effllm"]["median_s"] for n, t in peers.items() if n != fastest})
    ratios["effllm MLA time against the dense baseline's MHA"] = rows["effllm"]["median_s"] / rows["mha"]["median_s"]
    result = {"bench": "mla_layer", "size": size, **environment(device, args.commit),
              "transformers": transformers.__version__,
              "config": {"recipe": "deepseek_tiny" if args.quick else "deepseek_600m", "dim": mla_model.dim,
                         "mla": asdict(mla_model.mla_layer), "mha_n_heads": dense_model.n_heads, "batch": batch, "seq": seq,
                         "dtype": str(dtype)},
              "rows": rows, "rel_err": errors, "ratios": ratios}
    finish(args.out, result, size, write_report)


if __name__ == "__main__":
    main()
