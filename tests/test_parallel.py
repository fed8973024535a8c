"""Expert parallelism on two gloo ranks (CPU): the sharded MoE layer computes what one process
computes with all the experts, forward and every gradient, with FP8 experts too."""

from __future__ import annotations

import copy
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from helpers import free_port

from effllm import ConfigError, convert_to_fp8
from effllm.moe import MoE, MoEConfig
from effllm.parallelize import exit_rank, shard_experts

TOKENS = (7, 12)  # uneven token counts per rank


def _ep_rank(rank: int, port: int, results, fp8: bool) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        torch.manual_seed(0)  # the same layer and data on both ranks
        dim, hidden = (128, 128) if fp8 else (32, 24)  # FP8 block scaling needs multiples of 128
        cfg = MoEConfig(n_routed_experts=8, top_k=3, n_shared_experts=1, expert_dim=hidden, n_group=2, topk_group=1,
                        grouped_gemm="loop")
        full = MoE(dim, cfg).train()
        if fp8:
            assert sorted(convert_to_fp8(full)["converted"]) == ["experts", "shared.w1", "shared.w2", "shared.w3"]
        with torch.no_grad():
            full.router.expert_bias.copy_(torch.randn(8) * 0.05)
        x = torch.randn(sum(TOKENS), dim)
        dy = torch.randn(sum(TOKENS), dim)
        layer = copy.deepcopy(full)  # before any forward: load counters start at zero
        # reference: one process, all tokens, all experts
        ref_x = x.clone().requires_grad_()
        ref = full(ref_x)
        ref.backward(dy)
        # expert parallel: this rank's tokens, half the experts
        assert list(shard_experts(layer)) == [""]
        lo = sum(TOKENS[:rank])
        mine = slice(lo, lo + TOKENS[rank])
        xi = x[mine].clone().requires_grad_()
        out = layer(xi)
        out.backward(dy[mine])
        local = 4
        experts = slice(rank * local, (rank + 1) * local)
        errors = {
            "out": (out - ref[mine]).abs().max().item(),
            "dx": (xi.grad - ref_x.grad[mine]).abs().max().item(),
        }
        for name in ("w1", "w3", "w2"):
            got, want = getattr(layer.experts, name).grad, getattr(full.experts, name).grad[experts]
            errors[f"experts.{name}"] = (got - want).abs().max().item()
        for name, p in layer.named_parameters():  # replicated: each rank holds its tokens' share
            if name.startswith("experts."):
                continue
            g = p.grad.clone()
            dist.all_reduce(g)
            want = dict(full.named_parameters())[name].grad
            if fp8 and name.startswith("shared."):
                # FP8 wgrad tiles span 128 tokens: each rank quantizes its own tokens' tiles, so its
                # share differs from the single process's by the E4M3 rounding (measured 0.025-0.027)
                errors[f"{name} (relative)"] = ((g - want).norm() / want.norm()).item()
            else:
                errors[name] = (g - want).abs().max().item()
        load = layer.update_bias()  # global load, as on one process
        errors["load"] = (load - full.step_load).abs().max().item()
        results[rank] = errors
    finally:
        dist.destroy_process_group()
    exit_rank(0)  # done and reported: no interpreter finalization, in which gloo's threads can abort


@pytest.mark.parametrize("fp8", [False, True])
@pytest.mark.slow
def test_expert_parallel_moe_equals_the_single_process_layer(fp8):
    """With FP8 experts too (the PyTorch reference path): each expert gets the same rows in the same
    order as on one process, so its 128-token wgrad tiles, and everything but the replicated shared
    expert's weight gradients, come out the same."""
    results = mp.Manager().dict()
    mp.start_processes(_ep_rank, args=(free_port(), results, fp8), nprocs=2, start_method="spawn")
    for rank in (0, 1):
        errors = results[rank]
        relative = {k: v for k, v in errors.items() if k.endswith("(relative)")}
        exact = {k: v for k, v in errors.items() if k not in relative}
        assert {"out", "dx", "experts.w1", "router.weight", "load"} <= set(exact)
        assert max(exact.values()) < 1e-5, (rank, sorted(exact.items(), key=lambda kv: -kv[1])[:3])
        assert len(relative) == (3 if fp8 else 0) and max(relative.values(), default=0) < 5e-2, (rank, relative)
        if not fp8:
            assert "shared.w2.weight" in exact


def test_sharding_needs_torch_distributed():
    with pytest.raises(ConfigError, match="torchrun"):
        shard_experts(MoE(16, MoEConfig(n_routed_experts=4, top_k=1, expert_dim=8)))
