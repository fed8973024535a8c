"""Expert parallelism on two gloo ranks (CPU): the sharded MoE layer computes what one process
computes with all the experts, forward and every gradient."""

from __future__ import annotations

import copy
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from effllm import ConfigError
from effllm.moe import MoE, MoEConfig
from effllm.parallelize import exit_rank, shard_experts


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


TOKENS = (7, 12)  # uneven token counts per rank


def _ep_rank(rank: int, port: int, results) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        torch.manual_seed(0)  # the same layer and data on both ranks
        cfg = MoEConfig(n_routed_experts=8, top_k=3, n_shared_experts=1, expert_dim=24, n_group=2, topk_group=1,
                        grouped_gemm="loop")
        full = MoE(32, cfg).train()
        with torch.no_grad():
            full.router.expert_bias.copy_(torch.randn(8) * 0.05)
        x = torch.randn(sum(TOKENS), 32)
        dy = torch.randn(sum(TOKENS), 32)
        layer = copy.deepcopy(full)  # before any forward: load counters start at zero
        # reference: one process, all tokens, all experts
        ref_x = x.clone().requires_grad_()
        ref = full(ref_x)
        ref.backward(dy)
        # expert parallel: this rank's tokens, half the experts
        assert shard_experts(layer) == [""]
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
            errors[name] = (g - dict(full.named_parameters())[name].grad).abs().max().item()
        load = layer.update_bias()  # global load, as on one process
        errors["load"] = (load - full.step_load).abs().max().item()
        results[rank] = errors
    finally:
        dist.destroy_process_group()
    exit_rank(0)  # done and reported: no interpreter finalization, in which gloo's threads can abort


def test_expert_parallel_moe_equals_the_single_process_layer():
    results = mp.Manager().dict()
    mp.start_processes(_ep_rank, args=(_free_port(), results), nprocs=2, start_method="spawn")
    for rank in (0, 1):
        errors = results[rank]
        assert {"out", "dx", "experts.w1", "router.weight", "shared.w2.weight", "load"} <= set(errors)
        assert max(errors.values()) < 1e-5, (rank, sorted(errors.items(), key=lambda kv: -kv[1])[:3])


def test_sharding_needs_torch_distributed():
    with pytest.raises(ConfigError, match="torchrun"):
        shard_experts(MoE(16, MoEConfig(n_routed_experts=4, top_k=1, expert_dim=8)))
