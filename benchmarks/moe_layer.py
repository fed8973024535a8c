"""MoE layer forward+backward against a per-expert loop and a dense MLP of equal active FLOPs.

    python benchmarks/moe_layer.py --quick     # CPU-sized, a minute
    python benchmarks/moe_layer.py             # GPU-sized: dim 2048, 64 experts of 1408, top-6,
                                               # 2 shared, 16k tokens, bf16 (DeepSeek-V2-Lite's shape)

Cases, all in one run on the same inputs:
- moe[<backend>]: the MoE layer with each grouped GEMM backend this device has;
- loop: the same layer with one matmul per expert (the reference path);
- moe[fp8]: on GPUs with FP8 tensor cores, the fastest bf16 layer with its experts' grouped GEMMs
  (kernels/fp8_grouped.py: one launch each, the dispatch gather and the SwiGLU fused into the
  quantizations) and
  the shared expert in FP8, DeepSeek-V3 block scaling; its output is first compared with the bf16
  layer's on the same weights (relative error recorded);
- dense: a SwiGLU whose hidden width is (top_k + n_shared) x expert_dim, so its FLOPs per token
  equal the MoE's active expert FLOPs (the router's 2·D·E FLOPs per token, 0.5% here, are not matched);
- peer[<implementation>]: what a user would otherwise pick, transformers' DeepseekV3MoE with the
  same shape, routing and weights (its output is first compared with effllm's layer, relative error
  recorded), its experts run by each of transformers' implementations ("grouped_mm", "batched_mm",
  "eager": a loop over the experts that receive tokens; "batched_mm" gathers every token's expert
  weights, so it is left out where those copies would pass 4 GiB, as at the GPU size);
- matmul: one dense GEMM of the layer's active expert FLOPs, forward and backward: the rate this
  device reaches on plain matmuls in this run, the ceiling of the "share of matmul rate" column.
Every case times forward + backward of the layer on random inputs (a fresh random router, so the
load is near uniform, as aux-loss-free balancing keeps it), median over repeats after warm-up.
Results: benchmarks/results/moe_layer/<device>-<size>.json, and report.md rebuilt from them.
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import torch
from common import base_parser, environment, finish, gemm_case, parse_args, size_and_device, time_fn, write_markdown

from effllm.fp8 import convert_to_fp8
from effllm.kernels import fp8_grouped_gemm
from effllm.kernels.backends import fp8_backend, grouped_gemm_backend
from effllm.kernels.grouped_gemm import BACKENDS, torch_fits
from effllm.layers import SwiGLU
from effllm.moe import MoE, MoEConfig

RESULTS = Path(__file__).resolve().parent / "results" / "moe_layer"

SIZES = {
    "quick": dict(dim=256, tokens=2048, dtype=torch.float32,
                  moe=MoEConfig(n_routed_experts=16, n_shared_experts=1, top_k=4, expert_dim=128)),
    "gpu": dict(dim=2048, tokens=16384, dtype=torch.bfloat16,
                moe=MoEConfig(n_routed_experts=64, n_shared_experts=2, top_k=6, expert_dim=1408)),
}


def available_backends(device: torch.device, dtype: torch.dtype, features: tuple[int, ...]) -> list[str]:
    out = []
    for b in BACKENDS:
        if b == "loop":
            continue
        if b == "torch" and not (hasattr(torch, "_grouped_mm") and torch_fits(dtype, *features)):
            continue
        if b == "torch" and device.type == "cuda" and grouped_gemm_backend(device, dtype, "auto", features) != "torch":
            continue  # torch._grouped_mm on CUDA is bf16 on Hopper+ only
        if b == "triton" and device.type != "cuda":
            continue
        out.append(b)
    return out


PEER_IMPLEMENTATIONS = ("grouped_mm", "batched_mm", "eager")


def transformers_peer(layer: MoE, implementation: str) -> torch.nn.Module | None:
    """transformers' DeepseekV3MoE with `layer`'s shape, routing and weights, its experts run by
    `implementation`; None where transformers (a dev dependency) is not installed."""
    try:
        from transformers import DeepseekV3Config
        from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3MoE
    except ImportError:
        return None
    c = layer.cfg
    hf = DeepseekV3Config(hidden_size=layer.dim, moe_intermediate_size=c.expert_dim, n_routed_experts=c.n_routed_experts,
                          num_experts_per_tok=c.top_k, n_shared_experts=c.n_shared_experts, n_group=c.n_group,
                          topk_group=c.topk_group, norm_topk_prob=c.renormalize, routed_scaling_factor=c.route_scale,
                          hidden_act="silu", experts_implementation=implementation)
    peer = DeepseekV3MoE(hf).to(layer.router.weight.device, layer.experts.w1.dtype)
    with torch.no_grad():
        peer.gate.weight.copy_(layer.router.weight)
        peer.gate.e_score_correction_bias.copy_(layer.router.expert_bias)
        peer.experts.gate_up_proj.copy_(torch.cat([layer.experts.w1, layer.experts.w3], dim=1))
        peer.experts.down_proj.copy_(layer.experts.w2)
        for mine, theirs in (("w1", "gate_proj"), ("w3", "up_proj"), ("w2", "down_proj")):
            getattr(peer.shared_experts, theirs).weight.copy_(getattr(layer.shared, mine).weight)
    return peer


def layer_flops(tokens: int, dim: int, cfg: MoEConfig) -> float:
    """Forward + backward matmul FLOPs of the layer: 3 GEMMs of D x F per active expert (routed and
    shared), the router's D x E, times 3 for the backward (dgrad and wgrad)."""
    active = (cfg.top_k + cfg.n_shared_experts) * 3 * dim * cfg.expert_dim + dim * cfg.n_routed_experts
    return 3 * 2 * tokens * active


def run_case(module: torch.nn.Module, x: torch.Tensor, device, warmup: int, repeats: int) -> dict:
    dy = torch.randn_like(x)

    def step():
        module.zero_grad(set_to_none=True)
        x.grad = None
        module(x).backward(dy)

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    row = time_fn(step, device, warmup, repeats)
    row["peak_mem_bytes"] = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
    row["tokens_per_s"] = x.shape[0] / row["median_s"]
    return row


def write_report(folder: Path) -> Path:
    lines = ["# MoE layer: forward + backward", "",
             "Written by `benchmarks/moe_layer.py` from the JSON files beside it. Median over repeats after warm-up;"
             " `dense` is a SwiGLU with the MoE's active expert FLOPs per token.", ""]
    for path in sorted(folder.glob("*.json")):
        r = json.loads(path.read_text())
        c = r["config"]
        m = c["moe"]
        lines += [f"## {r['device']}, {r['size']} ({r['date']})", "",
                  f"torch {r['torch']}, triton {r['triton']}, commit `{r['commit']}`; dim {c['dim']}, {c['tokens']} tokens, "
                  f"{c['dtype']}; {m['n_routed_experts']} experts of {m['expert_dim']}, top-{m['top_k']}, "
                  f"{m['n_shared_experts']} shared; dense hidden {c['dense_hidden']}.", "",
                  "| case | median (ms) | p10-p90 (ms) | tokens/s | share of matmul rate | peak mem (GiB) |",
                  "|---|---|---|---|---|---|"]
        for name, row in r["rows"].items():
            mem = "-" if row["peak_mem_bytes"] is None else f"{row['peak_mem_bytes'] / 2**30:.2f}"
            share = f"{100 * row['matmul_share']:.0f}%" if row.get("matmul_share") is not None else "-"
            lines.append(f"| {name} | {1e3 * row['median_s']:.2f} | {1e3 * row['p10_s']:.2f}-{1e3 * row['p90_s']:.2f} "
                         f"| {row['tokens_per_s']:,.0f} | {share} | {mem} |")
        if r.get("peer_rel_err"):
            lines += ["", "The peer computes the same function on the same weights: relative error of its output "
                      "against effllm's layer " + ", ".join(f"{k} {v:.1e}" for k, v in r["peer_rel_err"].items()) + "."]
        for name, why in (r.get("peer_skipped") or {}).items():
            lines += [f"{name} not run: {why}."]
        lines += ["", "Ratios (same run): " + ", ".join(f"{k} = {v:.2f}" for k, v in r["ratios"].items()), ""]
    return write_markdown(folder, lines)


def main() -> None:
    parser = base_parser(__doc__, RESULTS, "CPU-sized case")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=None, help="timed runs per case (default 10 quick, 30 gpu)")
    parser.add_argument("--profile", action="store_true", help="print the FP8 case's top kernels (torch.profiler)")
    parser.add_argument("--loop-repeats", type=int, default=None, help="timed runs of the slow loop case")
    args = parse_args(parser)

    size, device = size_and_device(args.quick)
    spec = SIZES[size]
    repeats = args.repeats or (10 if args.quick else 30)
    loop_repeats = args.loop_repeats or (5 if args.quick else 10)
    dim, dtype, cfg = spec["dim"], spec["dtype"], spec["moe"]
    dense_hidden = (cfg.top_k + cfg.n_shared_experts) * cfg.expert_dim
    torch.manual_seed(0)
    x = torch.randn(spec["tokens"], dim, device=device, dtype=dtype, requires_grad=True)

    rows, load = {}, None
    for backend in available_backends(device, dtype, (dim, cfg.expert_dim)) + ["loop"]:
        torch.manual_seed(0)
        layer = MoE(dim, MoEConfig(**{**asdict(cfg), "grouped_gemm": backend})).to(device, dtype)
        name = "loop" if backend == "loop" else f"moe[{backend}]"
        rows[name] = run_case(layer, x, device, args.warmup, loop_repeats if backend == "loop" else repeats)
        load = layer.last_load.tolist()
        print(f"{name:14s} {1e3 * rows[name]['median_s']:9.2f} ms", flush=True)
    fp8_note = None
    if fp8_backend(device) == "triton":  # FP8 tensor cores: the same layer with experts (and shared) in FP8
        best_bf16 = min((r["median_s"], n) for n, r in rows.items() if n.startswith("moe["))[1]
        torch.manual_seed(0)
        layer = MoE(dim, MoEConfig(**{**asdict(cfg), "grouped_gemm": best_bf16[4:-1]})).to(device, dtype)
        with torch.no_grad():  # same weights as the bf16 layer: its output is the reference
            reference = MoE(dim, MoEConfig(**{**asdict(cfg), "grouped_gemm": best_bf16[4:-1]})).to(device, dtype)
            reference.load_state_dict(layer.state_dict())
            ref_out = reference(x).float()
        convert_to_fp8(layer)
        with torch.no_grad():
            fp8_rel_err = ((layer(x).float() - ref_out).norm() / ref_out.norm()).item()
        print(f"moe[fp8] output vs the bf16 layer: relative error {fp8_rel_err:.4f}", flush=True)
        rows["moe[fp8]"] = run_case(layer, x, device, args.warmup, repeats)
        rows["moe[fp8]"]["rel_err_vs_bf16_layer"] = fp8_rel_err
        if args.profile:  # where the FP8 step's device time goes, kernel by kernel
            dy = torch.randn_like(x)
            with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
                for _ in range(3):
                    layer(x).backward(dy)
                torch.cuda.synchronize()
            print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=14, max_name_column_width=60))
        print(f"{'moe[fp8]':14s} {1e3 * rows['moe[fp8]']['median_s']:9.2f} ms", flush=True)
    else:
        fp8_note = "no FP8 case: this device has no FP8 tensor cores (the CPU reference path's speed means nothing)"
    torch.manual_seed(0)
    dense = SwiGLU(dim, dense_hidden).to(device, dtype)
    rows["dense"] = run_case(dense, x, device, args.warmup, repeats)
    print(f"{'dense':14s} {1e3 * rows['dense']['median_s']:9.2f} ms", flush=True)

    peer_rel_err = {}
    torch.manual_seed(0)
    mine = MoE(dim, cfg).to(device, dtype).train()
    with torch.no_grad():
        mine.router.expert_bias.copy_(torch.randn(cfg.n_routed_experts) * 0.01)  # a trained-looking bias: both use it
        ref_out = mine(x).float()
    peer_skipped = {}
    for implementation in PEER_IMPLEMENTATIONS:
        name = f"peer[{implementation}]"
        copies = spec["tokens"] * cfg.top_k * 3 * cfg.expert_dim * dim * x.element_size()
        if implementation == "batched_mm" and copies > 4 * 2**30:
            peer_skipped[name] = f"would copy {copies / 2**30:.0f} GiB of expert weights (one set per token)"
            continue
        peer = transformers_peer(mine, implementation)
        if peer is None:
            peer_skipped[name] = "transformers is not installed"
            continue
        with torch.no_grad():
            peer_rel_err[name] = ((peer(x).float() - ref_out).norm() / ref_out.norm()).item()
        rows[name] = run_case(peer.train(), x, device, args.warmup,
                              loop_repeats if implementation == "eager" else repeats)
        print(f"{name:20s} {1e3 * rows[name]['median_s']:9.2f} ms (output vs effllm: {peer_rel_err[name]:.1e})",
              flush=True)
    rows["matmul"] = gemm_case(device, spec["tokens"], dim, 3 * dense_hidden, dtype, args.warmup, repeats)
    rows["matmul"].update(peak_mem_bytes=None, tokens_per_s=spec["tokens"] / rows["matmul"]["median_s"])
    flops = layer_flops(spec["tokens"], dim, cfg)
    rate = flops / rows["matmul"]["median_s"]  # the plain GEMM does the same FLOPs as the layer's experts
    for name, row in rows.items():
        row["matmul_share"] = flops / row["median_s"] / rate
    print(f"{'matmul':14s} {1e3 * rows['matmul']['median_s']:9.2f} ms ({rate / 1e9:.1f} GFLOP/s)", flush=True)

    best = min((r["median_s"], n) for n, r in rows.items() if n.startswith("moe[") and n != "moe[fp8]")
    ratios = {f"{best[1]} / dense time": best[0] / rows["dense"]["median_s"],
              f"loop / {best[1]} time": rows["loop"]["median_s"] / best[0]}
    for n, r in rows.items():
        if n.startswith("moe[") and n not in (best[1], "moe[fp8]"):
            ratios[f"{n} / {best[1]} time"] = r["median_s"] / best[0]
    if "moe[fp8]" in rows:
        ratios[f"FP8 speed-up over {best[1]}"] = best[0] / rows["moe[fp8]"]["median_s"]
    peers = [(r["median_s"], n) for n, r in rows.items() if n.startswith("peer[")]
    if peers:
        fastest = min(peers)
        ratios[f"speed-up of {best[1]} over the fastest peer, {fastest[1]}"] = fastest[0] / best[0]
    result = {"bench": "moe_layer", "size": size, **environment(device, args.commit),
              "config": {"dim": dim, "tokens": spec["tokens"], "dtype": str(dtype), "dense_hidden": dense_hidden,
                         "moe": asdict(cfg), "inputs": "randn tokens, fresh random router and experts",
                         "last_load": load},
              "rows": rows, "ratios": ratios, "fp8_note": fp8_note, "peer_rel_err": peer_rel_err, "peer_skipped": peer_skipped,
              "matmul_gflops": rate / 1e9, "layer_flops": flops,
              "fp8_tuned_configs": fp8_grouped_gemm.tuned_configs() if "moe[fp8]" in rows else None}
    finish(args.out, result, size, write_report)


if __name__ == "__main__":
    main()
