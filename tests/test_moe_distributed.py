"""Aux-loss-free balancing counts the load of the global batch: two gloo ranks on the CPU."""

from __future__ import annotations

import os

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from helpers import free_port

from effllm.moe import MoE, MoEConfig, load_stats
from effllm.parallelize import exit_rank


def _rank(rank: int, port: int, results) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        torch.manual_seed(0)  # the same layer on both ranks
        layer = MoE(16, MoEConfig(n_routed_experts=4, top_k=1, n_shared_experts=0, expert_dim=8,
                                  bias_update_rate=0.1)).train()
        with torch.no_grad():
            layer.router.weight.zero_()
            layer.router.weight[rank, 0] = 5.0  # rank 0's tokens all go to expert 0, rank 1's to expert 1
            x = torch.zeros(6, 16)
            x[:, 0] = 1.0
            layer(x)
        stats = load_stats(layer.update_bias())
        results[rank] = (layer.router.expert_bias.tolist(), stats["max_over_mean"])
    finally:
        dist.destroy_process_group()
    exit_rank(0)  # done and reported: no interpreter finalization, in which gloo's threads can abort


def test_bias_update_uses_the_load_summed_over_ranks():
    results = mp.Manager().dict()
    mp.start_processes(_rank, args=(free_port(), results), nprocs=2, start_method="spawn")
    # Global load: expert 0 and 1 got 6 tokens each, experts 2 and 3 none; mean 3.
    # A rank-local update would have lowered only its own busy expert and raised the other one.
    expected = [-0.1, -0.1, 0.1, 0.1]
    for rank in (0, 1):
        bias, max_over_mean = results[rank]
        assert bias == [torch.tensor(v).item() for v in expected], (rank, bias)
        assert max_over_mean == 2.0
