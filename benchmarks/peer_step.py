"""A DeepSeek-style training step against the implementation a user would otherwise pick.

    python benchmarks/peer_step.py --quick     # CPU: deepseek_tiny's model, minutes
    python benchmarks/peer_step.py             # GPU: deepseek_600m's model, bf16

The peer is transformers' DeepseekV3ForCausalLM. Both models are the same: deepseek_tiny's (or
deepseek_600m's) architecture, MLA + DeepSeekMoE, without its MTP module and sequence-wise balance
loss (transformers has neither),
with effllm's weights copied into the peer through the export's own mapping (effllm.hf), checked
before timing: the peer's logits must match effllm's. Cases, in one run, on the same random tokens:
- effllm: the trainer's own run and step (effllm.run.build_run, forward_backward, optimizer_update);
- peer[<implementation>]: the peer's forward (its own attention: SDPA), the same cross-entropy,
  backward, gradient clipping and AdamW, its experts run by transformers' "grouped_mm" and "eager"
  implementations ("batched_mm" gathers a copy of the experts' weights per token: left out).
Each case is warmed up alone, then the timed steps of all cases run interleaved (alternating order),
each step timed alone; medians and 10th/90th percentiles.
Results: benchmarks/results/peer_step/<device>-<size>.json, and report.md rebuilt from them.
"""

from __future__ import annotations

import json
from dataclasses import asdict, replace
from pathlib import Path

import torch
import torch.nn.functional as F
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

from effllm.config import TrainConfig
from effllm.hf import hf_config, hf_state_dict
from effllm.parallelize import DistEnv
from effllm.recipes import deepseek_600m, deepseek_tiny
from effllm.run import build_optimizer, build_run, forward_backward, optimizer_update

RESULTS = Path(__file__).resolve().parent / "results" / "peer_step"
IMPLEMENTATIONS = ("grouped_mm", "eager")

SIZES = {"quick": deepseek_tiny.config(), "gpu": deepseek_600m.config()}


def peer_of(model, implementation: str, attention: str = "sdpa"):
    """transformers' DeepseekV3ForCausalLM holding `model`'s weights (effllm.hf's export mapping), its
    experts run by `implementation` and its attention by `attention`."""
    from transformers import DeepseekV3Config, DeepseekV3ForCausalLM

    fields = {k: v for k, v in hf_config(model.cfg, mtp=False).items() if k not in ("architectures", "model_type", "dtype",
                                                                          "torch_dtype")}
    conf = DeepseekV3Config(**fields, experts_implementation=implementation, attn_implementation=attention)
    peer = DeepseekV3ForCausalLM(conf).to(next(model.parameters()).device)
    # transformers runs no MTP; experts come one tensor each (the checkpoint layout): fused as the model holds them
    state = hf_state_dict(model, mtp=False)
    for key in [k for k in state if k.endswith(".mlp.experts.0.gate_proj.weight")]:
        prefix = key.removesuffix("0.gate_proj.weight")
        n = sum(1 for k in state if k.startswith(prefix) and k.endswith(".gate_proj.weight"))
        part = {proj: [state.pop(f"{prefix}{e}.{proj}.weight") for e in range(n)]
                for proj in ("gate_proj", "up_proj", "down_proj")}
        state[f"{prefix}gate_up_proj"] = torch.stack([torch.cat(gu) for gu in zip(part["gate_proj"], part["up_proj"])])
        state[f"{prefix}down_proj"] = torch.stack(part["down_proj"])
    missing, unexpected = peer.load_state_dict(state, strict=False)
    if unexpected or [k for k in missing if not k.endswith("rotary_emb.inv_freq")]:
        raise RuntimeError(f"the peer's weights do not match the export: missing {missing}, unexpected {unexpected}")
    return peer  # fp32 master weights, as effllm's; both run under the same autocast


def write_report(folder: Path) -> Path:
    lines = ["# A DeepSeek-style training step: effllm against transformers' DeepseekV3ForCausalLM", "",
             "Written by `benchmarks/peer_step.py` from the JSON files beside it. The same model and weights (no "
             "MTP module), the same tokens; forward, backward, clipping and AdamW; median over timed steps.", ""]
    for path in sorted(folder.glob("*.json")):
        r = json.loads(path.read_text())
        c = r["config"]
        lines += [f"## {r['device']}, {r['size']} ({r['date']})", "",
                  f"torch {r['torch']}, triton {r['triton']}, transformers {r['transformers']}, commit "
                  f"`{r['commit']}`; {c['recipe']}'s model without MTP, {c['params'] / 1e6:.2f}M parameters; batch "
                  f"{c['batch_size']} x seq {c['seq_len']}, {c['precision']}.", "",
                  *timing_table(r["rows"], "step median")]
        lines += ["", "Same function: the peer's logits against effllm's, relative error "
                  + ", ".join(f"{k} {v:.1e}" for k, v in r["logits_rel_err"].items()) + ".", "",
                  "Ratios (same run): " + ", ".join(f"{k} = {v:.2f}x" for k, v in r["ratios"].items()), ""]
    return write_markdown(folder, lines)


def main() -> None:
    parser = base_parser(__doc__, RESULTS, "CPU-sized case (deepseek_tiny's model and batch)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed steps per case (default 3 quick, 10 gpu)")
    parser.add_argument("--repeats", type=int, default=None, help="timed steps per case (default 12 quick, 30 gpu)")
    args = parse_args(parser)
    import transformers

    size, device = size_and_device(args.quick)
    recipe: TrainConfig = SIZES[size]
    # The same objective for both: next-token cross-entropy, no MTP (transformers trains none) and no
    # sequence-wise balance loss (transformers has none); effllm still moves its balancing bias.
    model_cfg = replace(recipe.model, mtp_depth=0, moe=replace(recipe.model.moe, seq_aux_loss_weight=0.0))
    cfg = replace(recipe, model=model_cfg, grad_accum=1, seed=0, device=str(device))
    warmup, repeats = args.warmup or (3 if args.quick else 10), args.repeats or (12 if args.quick else 30)
    run = build_run(cfg, DistEnv(), device)
    amp = run.amp
    batches = [torch.randint(0, cfg.model.vocab_size, (cfg.batch_size, cfg.seq_len + 1), device=device)
               for _ in range(4)]
    tokens = cfg.batch_size * cfg.seq_len
    counter = iter(range(10**9))
    moe_layers = run.model.moe_layers()

    def effllm_step() -> None:
        b = batches[next(counter) % len(batches)]
        forward_backward(run.step_fn, lambda micro: (b[:, :-1], b[:, 1:]), 1, cfg.model.mtp_lambda, device, amp)
        optimizer_update(run.model, run.optimizer, cfg.optim.grad_clip, moe_layers)

    probe = batches[0][:2, :-1]
    with torch.no_grad(), torch.autocast(device.type, dtype=amp, enabled=amp is not None):
        run.model.eval()
        reference = run.model(probe)[0].float()
        run.model.train()
    cases, rel_err = {"effllm": effllm_step}, {}
    for implementation in IMPLEMENTATIONS:  # copies of the untrained weights, before any step moves them
        name = f"peer[{implementation}]"
        peer = peer_of(run.model, implementation).eval()
        with torch.no_grad(), torch.autocast(device.type, dtype=amp, enabled=amp is not None):
            got = peer(probe).logits.float()
        rel_err[name] = ((got - reference).norm() / reference.norm()).item()
        print(f"{name:20s} logits vs effllm: {rel_err[name]:.1e}", flush=True)
        optimizer = build_optimizer(peer.train(), cfg.optim)

        def peer_step(peer=peer, optimizer=optimizer) -> None:
            b = batches[next(counter) % len(batches)]
            with torch.autocast(device.type, dtype=amp, enabled=amp is not None):
                logits = peer(b[:, :-1]).logits
            F.cross_entropy(logits.float().flatten(0, 1), b[:, 1:].flatten()).backward()
            torch.nn.utils.clip_grad_norm_(peer.parameters(), cfg.optim.grad_clip)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

        cases[name] = peer_step
    rows = time_interleaved(cases, device, warmup, repeats, tokens)
    for name, row in rows.items():
        print(f"{name:20s} {1e3 * row['median_s']:9.1f} ms/step", flush=True)
    fastest = min((r["median_s"], n) for n, r in rows.items() if n.startswith("peer["))
    ratios = {f"effllm speed-up over the fastest peer, {fastest[1]}": fastest[0] / rows["effllm"]["median_s"]}
    for name, row in rows.items():
        if name.startswith("peer[") and name != fastest[1]:
            ratios[f"effllm speed-up over {name}"] = row["median_s"] / rows["effllm"]["median_s"]
    result = {"bench": "peer_step", "size": size, **environment(device, args.commit),
              "transformers": transformers.__version__,
              "config": {"recipe": "deepseek_tiny" if args.quick else "deepseek_600m", "model": asdict(cfg.model),
                         "batch_size": cfg.batch_size, "seq_len": cfg.seq_len,
                         "precision": str(amp or torch.float32), "params": run.param_counts["total"],
                         "tokens": "random ids, 4 batches in rotation"},
              "rows": rows, "logits_rel_err": rel_err, "ratios": ratios}
    finish(args.out, result, size, write_report)


if __name__ == "__main__":
    main()
