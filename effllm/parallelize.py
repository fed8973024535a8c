"""Parallelism on torch.distributed: expert parallelism for DeepSeekMoE layers.

Expert parallelism (EP) splits each MoE layer's routed experts across the ranks of a process group:
rank r of an EP group of size P holds experts [r·E/P, (r+1)·E/P). The router and the shared
experts stay replicated. A forward pass on each rank:

1. routes its own tokens and sorts the (token, expert) pairs by expert, as on one device; the rows
   bound for one rank are then contiguous, because experts are assigned to ranks in order;
2. exchanges the per-expert counts (`all_to_all_single` of E numbers), so that every rank knows
   how many rows it will receive from each rank for each of its experts;
3. sends the rows (`all_to_all_single` with those split sizes), regroups what it received by
   local expert, runs its experts as one grouped GEMM, and sends the results back the same way;
4. combines each token's K outputs as on one device.

Both exchanges are differentiable (functional collectives' `all_to_all_single_autograd`), so the
backward pass sends gradients along the reverse routes, and each rank's expert gradients sum the
contributions of every rank's tokens.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from effllm.errors import ConfigError


def shard_experts(model: nn.Module, group: dist.ProcessGroup | None = None) -> list[str]:
    """Keep on this rank only its slice of every MoE layer's routed experts, in place.

    `group` is the expert-parallel process group (default: the whole world). Must run before the
    optimizer is built (the expert Parameters are replaced). Returns the names of the layers sharded.
    """
    from effllm.moe import MoE

    if not dist.is_initialized():
        raise ConfigError("expert parallelism needs torch.distributed: launch with torchrun")
    size, rank = dist.get_world_size(group), dist.get_rank(group)
    done = []
    for name, layer in model.named_modules():
        if not isinstance(layer, MoE):
            continue
        E = layer.cfg.n_routed_experts
        if E % size:
            raise ConfigError(f"{name} has {E} routed experts, which {size} expert-parallel ranks cannot split "
                              "evenly: pick an expert-parallel size that divides the number of experts")
        local = E // size
        experts = layer.experts
        for pname in ("w1", "w3", "w2"):
            full = getattr(experts, pname)
            part = full.detach()[rank * local:(rank + 1) * local].clone()
            setattr(experts, pname, nn.Parameter(part, requires_grad=full.requires_grad))
        experts.first_expert, experts.n_experts_total = rank * local, E
        layer.ep_group = group if group is not None else dist.group.WORLD
        done.append(name)
    return done


def expert_parallel_forward(experts: nn.Module, rows: torch.Tensor, counts: torch.Tensor, backend: str,
                            group) -> torch.Tensor:
    """rows (M, D) sorted by global expert with counts (E,) -> the experts' outputs (M, D), same order.

    `experts` holds this rank's E/P experts. The two all-to-alls carry the rows out and back; the
    split sizes need the counts on the host (one sync per layer, as in any all-to-all dispatch).
    """
    from torch.distributed._functional_collectives import all_to_all_single_autograd, wait_tensor

    P = dist.get_world_size(group)
    E = counts.numel()
    local = E // P
    counts = counts.to(torch.int64)
    # 1. counts: recv[s, e] = rows rank s sends to my local expert e
    recv_counts = torch.empty_like(counts)
    dist.all_to_all_single(recv_counts, counts, group=group)
    send_splits = counts.view(P, local).sum(1).tolist()
    recv = recv_counts.view(P, local)
    recv_splits = recv.sum(1).tolist()
    # 2. rows out: received in (source rank, local expert) order
    received = wait_tensor(all_to_all_single_autograd(rows.contiguous(), recv_splits, send_splits, group))
    # 3. regroup by local expert (stable: within an expert, rows keep their source order)
    expert_of_row = torch.arange(local, device=rows.device).repeat(P).repeat_interleave(recv.flatten())
    order = expert_of_row.argsort(stable=True)
    offsets = torch.cumsum(recv.sum(0), 0).to(torch.int32)
    out_local = experts(received[order], offsets, backend)
    back = torch.empty_like(order)
    back[order] = torch.arange(order.numel(), device=order.device)
    out_received = out_local[back]  # (source rank, local expert) order again
    # 4. results back to where the rows came from
    return wait_tensor(all_to_all_single_autograd(out_received.contiguous(), send_splits, recv_splits, group))
