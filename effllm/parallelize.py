"""Parallelism on torch.distributed, under torchrun: no launcher or communication layer of our own.

- `dist_env` / `init_distributed`: rank, world size and device from torchrun's environment; NCCL on
  GPUs, gloo on CPUs; a timeout on every collective.
- `build_mesh`, `shard_experts`, `wrap_data_parallel`: a ("dp", "ep") device mesh, expert
  parallelism, then activation checkpointing, torch.compile per block and FSDP2 (or DDP), in
  that order.
- `gather_full_state` / `load_full_optimizer_state`: checkpoints in the single-device layout, so any
  world size resumes any other.
- `clip_grad_norm_sharded`: gradient clipping across the meshes of FSDP2 and expert parallelism.

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

import datetime
import logging
import os
import sys
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed._functional_collectives import all_to_all_single_autograd, wait_tensor

from effllm.devices import resolve_device
from effllm.errors import ConfigError
from effllm.moe import MoE, gather_rows


class ExpertParallel:
    """Expert parallelism around one MoE layer's routed experts, installed by `shard_experts` as a
    forward pre-hook and a forward hook on the experts module (torchtitan's ExpertParallel style
    works the same way): the experts keep their class (RoutedExperts, or its FP8 subclass), their
    forward signature `(x, offsets, src)` and their parameter names, and hold experts
    [first_expert, first_expert + E/P) only.

    `dispatch` (before the experts' forward) gathers the sorted rows, sends each to its expert's
    rank and hands the experts what they received, regrouped by local expert; `combine` (after it)
    sends the outputs back, in the order the layer sorted them. The split sizes need the counts on
    the host: one sync per layer, as in any all-to-all dispatch.
    """

    def __init__(self, experts: nn.Module, group, first_expert: int):
        self.experts, self.group = experts, group
        self.first_expert = first_expert
        self._route: tuple | None = None  # the way back of the forward in flight (dispatch -> combine)
        self._hooks = (experts.register_forward_pre_hook(self.dispatch, with_kwargs=True),
                       experts.register_forward_hook(self.combine, with_kwargs=True))

    def dispatch(self, module: nn.Module, args: tuple, kwargs: dict):
        """rows (M, D) sorted by global expert -> (this rank's received rows, their local offsets, the
        regrouping order as `src`)."""
        x, offsets, *rest = args
        src = kwargs.get("src", rest[0] if rest else None)
        dtype = torch.get_autocast_dtype(x.device.type) if torch.is_autocast_enabled(x.device.type) else x.dtype
        rows = (gather_rows(x, src) if src is not None else x).to(dtype)  # (M, D) sorted by expert
        P = dist.get_world_size(self.group)
        E = offsets.numel()
        local = E // P
        counts = torch.diff(offsets.to(torch.int64), prepend=offsets.new_zeros(1, dtype=torch.int64))  # (E,)
        # 1. counts: recv[s, e] = rows rank s sends to my local expert e
        recv_counts = torch.empty_like(counts)
        dist.all_to_all_single(recv_counts, counts, group=self.group)
        send_splits = counts.view(P, local).sum(1).tolist()
        recv = recv_counts.view(P, local)
        recv_splits = recv.sum(1).tolist()
        # 2. rows out: received in (source rank, local expert) order
        received = wait_tensor(all_to_all_single_autograd(rows.contiguous(), recv_splits, send_splits, self.group))
        # 3. regroup by local expert (stable: within an expert, rows keep their source order); the
        #    experts run the regrouping gather themselves (`src`)
        expert_of_row = torch.arange(local, device=rows.device).repeat(P).repeat_interleave(recv.flatten())
        order = expert_of_row.argsort(stable=True)
        local_offsets = torch.cumsum(recv.sum(0), 0).to(torch.int32)
        back = torch.empty_like(order)
        back[order] = torch.arange(order.numel(), device=order.device)
        self._route = (back, send_splits, recv_splits)
        return (received, local_offsets), {"src": order}

    def combine(self, module: nn.Module, args: tuple, kwargs: dict, out: torch.Tensor) -> torch.Tensor:
        """The experts' outputs -> back to the ranks their rows came from, in the layer's order."""
        back, send_splits, recv_splits = self._route
        self._route = None
        out_received = out[back]  # (source rank, local expert) order again
        # 4. results back to where the rows came from
        return wait_tensor(all_to_all_single_autograd(out_received.contiguous(), send_splits, recv_splits, self.group))


def shard_experts(model: nn.Module, group: dist.ProcessGroup | None = None) -> dict[str, ExpertParallel]:
    """Keep on this rank only its slice of every MoE layer's routed experts, in place, and install
    expert parallelism around them (`ExpertParallel`).

    `group` is the expert-parallel process group (default: the whole world). Must run before the
    optimizer is built (the expert Parameters are replaced). Returns {MoE layer name: its
    ExpertParallel}, which data parallelism and checkpoints need (`wrap_data_parallel`,
    `gather_full_state`, `load_full_optimizer_state`).
    """
    if not dist.is_initialized():
        raise ConfigError("expert parallelism needs torch.distributed: launch with torchrun")
    group = group if group is not None else dist.group.WORLD
    size, rank = dist.get_world_size(group), dist.get_rank(group)
    done = {}
    for name, layer in model.named_modules():
        if not isinstance(layer, MoE):
            continue
        E = layer.cfg.n_routed_experts
        if E % size:
            raise ConfigError(f"{name} has {E} routed experts, which {size} expert-parallel ranks cannot split "
                              "evenly: pick an expert-parallel size that divides the number of experts")
        local = E // size
        layer.experts.keep_experts(rank * local, local)
        done[name] = ExpertParallel(layer.experts, group, rank * local)
    return done


# ---------------------------------------------------------------------------------------------
# Data parallelism and the torchrun environment


@dataclass(frozen=True)
class DistEnv:
    """This process's place in a torchrun job (rank 0 of 1 when not launched by torchrun)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int = 1  # ranks on this machine

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def dist_env() -> DistEnv:
    """Read RANK, WORLD_SIZE, LOCAL_RANK and LOCAL_WORLD_SIZE as torchrun sets them."""
    try:
        return DistEnv(int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)),
                       int(os.environ.get("LOCAL_RANK", 0)), int(os.environ.get("LOCAL_WORLD_SIZE", 1)))
    except ValueError as e:
        raise ConfigError(f"malformed torchrun environment (RANK / WORLD_SIZE / LOCAL_RANK): {e}") from None


def init_distributed(env: DistEnv, device: str, timeout_s: float) -> torch.device:
    """This rank's device, with the process group initialised when the job has several ranks:
    NCCL on CUDA (one GPU per local rank), gloo on CPU. A collective that waits longer than
    `timeout_s` (a rank died) fails instead of hanging."""
    if not env.enabled:
        return resolve_device(device)
    use_cuda = device.startswith("cuda") or (device == "auto" and torch.cuda.is_available())
    if use_cuda:
        if env.local_rank >= torch.cuda.device_count():
            raise ConfigError(f"local rank {env.local_rank} has no GPU ({torch.cuda.device_count()} visible): "
                              "launch at most one process per GPU")
        dev = torch.device("cuda", env.local_rank)
        torch.cuda.set_device(dev)
    else:
        dev = torch.device("cpu")
    if not dist.is_initialized():
        dist.init_process_group("nccl" if use_cuda else "gloo", timeout=datetime.timedelta(seconds=timeout_s),
                                device_id=dev if use_cuda else None)
    return dev


def exit_rank(code: int = 0) -> None:
    """End this rank's process with `code` once its output is flushed, without the interpreter's
    finalization. Call it when a rank's work is done and saved.

    The reason is gloo. Its worker threads outlive destroy_process_group: the groups are still
    held on the C++ side. A worker that releases a finished work item (the last barrier, with the
    tensors of the gathers before it) must take the GIL to drop those tensors' Python objects. If
    that happens while the interpreter is finalizing, the thread is unwound through a C++
    destructor, and the rank aborts ("terminate called without an active exception") after a run
    that has finished. A core dump of such a rank showed exactly this; under CPU contention it
    happened in about 1 of 25 two-rank runs."""
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def build_mesh(env: DistEnv, device: torch.device, expert_parallel: int):
    """A ("dp", "ep") device mesh: ranks r*ep .. r*ep+ep-1 form one expert-parallel group, and the
    ranks holding the same expert slice form the "dp" groups. None without expert parallelism."""
    if expert_parallel <= 1:
        return None
    from torch.distributed.device_mesh import init_device_mesh  # here, as the FSDP/DDP/DCP imports below: they
    # are the heavy part of torch.distributed (1.0-1.3 s after torch, 2 cores) and only torchrun runs use them

    return init_device_mesh(device.type, (env.world_size // expert_parallel, expert_parallel),
                            mesh_dim_names=("dp", "ep"))


def wrap_data_parallel(model: nn.Module, kind: str, device: torch.device, compile: bool, mesh=None,
                       expert_shards: dict[str, ExpertParallel] | None = None) -> nn.Module:
    """The module the training step calls, in this order (torchtitan's): expert sharding (done
    before, by `shard_experts` over mesh["ep"], which returned `expert_shards`), torch.compile per
    block, then FSDP2 (`fully_shard` per block, then the root) or DDP around the whole model.

    FSDP2 shards parameters, gradients and optimizer state across ranks and returns the model
    itself (its parameters become DTensors); DDP keeps full replicas and all-reduces gradients.
    With expert parallelism (FSDP2 only), each MoE layer's expert slice is sharded over the
    "dp" ranks that hold the same slice. Its gradient already sums the tokens of the whole EP group
    (the all-to-all backward), so the reduction divides by the world size, not by the dp size:
    every parameter then gets the gradient of the mean loss over the global batch.
    """
    if compile:  # in place (Module.compile), so parameter names and checkpoints stay the same
        for block in model.all_blocks():
            block.compile()
    if kind == "fsdp":
        from torch.distributed.fsdp import fully_shard

        if mesh is not None:
            for shard in (expert_shards or {}).values():
                fully_shard(shard.experts, mesh=mesh["dp"])
                shard.experts.set_gradient_divide_factor(float(dist.get_world_size()))
        for block in model.all_blocks():
            fully_shard(block)
        fully_shard(model)
        return model
    if kind == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        if mesh is not None:
            raise ConfigError("expert parallelism runs with data_parallel=fsdp: pass --data-parallel fsdp")
        # broadcast_buffers=False: DDP would otherwise copy rank 0's buffers over the others' before
        # every forward, and with gradient accumulation that overwrote each MoE layer's per-rank load
        # counter (step_load) with rank 0's partial count, so the bias update balanced on the wrong
        # load. No buffer needs it: RoPE tables are constants and the balancing bias moves by the
        # all-reduced load, so it is the same on every rank by construction.
        return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None,
                                       broadcast_buffers=False)
    raise ConfigError(f"unknown data_parallel {kind!r}: choose fsdp or ddp")


# ---------------------------------------------------------------------------------------------
# Checkpoints: gathered to the single-device format, so any world size can resume any other


def gather_full_state(model: nn.Module, optimizer: torch.optim.Optimizer, tied: bool,
                      expert_shards: dict[str, ExpertParallel] | None = None) -> tuple[dict | None, dict | None]:
    """Collective: every rank calls it. Rank 0 gets the full model state dict (what a single process
    would save: with tied embeddings only `head.weight`, as safetensors' save_model keeps it) and the
    optimizer state keyed by position, exactly as `optimizer.state_dict()` on one device; other
    ranks get (None, None)."""
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_model_state_dict,
        get_optimizer_state_dict,
    )

    opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
    experts = _gather_expert_states(optimizer, expert_shards or {})  # before the others: every rank takes part
    model_sd = get_model_state_dict(model, options=opts)
    optim_sd = get_optimizer_state_dict(model, optimizer, options=opts)
    if dist.get_rank() != 0:
        return None, None
    for name, (weight, moments) in experts.items():  # expert slices -> all E experts
        model_sd[name] = weight
        optim_sd["state"][name].update(moments)
    if tied:
        model_sd.pop("tok_emb.weight", None)
    names = [name for group in optim_sd["param_groups"] for name in group["params"]]
    index = {name: i for i, name in enumerate(names)}
    groups, first = [], 0
    for group in optim_sd["param_groups"]:
        groups.append({**group, "params": list(range(first, first + len(group["params"])))})
        first += len(group["params"])
    return model_sd, {"state": {index[name]: s for name, s in optim_sd["state"].items()}, "param_groups": groups}


def load_full_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer, state: dict,
                              expert_shards: dict[str, ExpertParallel] | None = None) -> None:
    """Load a position-keyed full optimizer state (as one device saves it) into a sharded optimizer."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    name_of = {id(p): name for name, p in model.named_parameters()}
    names = [name_of[id(p)] for group in optimizer.param_groups for p in group["params"]]
    for name, rows in _expert_slices(expert_shards or {}).items():  # this rank's experts of the saved moments
        moments = state["state"][names.index(name)]
        for key, value in moments.items():
            if torch.is_tensor(value) and value.dim() == 3:
                moments[key] = value[rows]
    groups, first = [], 0
    for saved, group in zip(state["param_groups"], optimizer.param_groups, strict=True):
        n = len(group["params"])
        groups.append({**saved, "params": names[first:first + n]})
        first += n
    fqn_state = {"state": {names[i]: s for i, s in state["state"].items()}, "param_groups": groups}
    set_optimizer_state_dict(model, optimizer, fqn_state, options=StateDictOptions(full_state_dict=True))


def _expert_params(expert_shards: dict[str, ExpertParallel]):
    """(name, parameter, shard) of every expert-parallel expert weight."""
    for lname, shard in expert_shards.items():
        for pname in ("w1", "w3", "w2"):
            yield ".".join(filter(None, (lname, "experts", pname))), getattr(shard.experts, pname), shard


def _expert_slices(expert_shards: dict[str, ExpertParallel]) -> dict[str, slice]:
    """name -> rows of the full (E, ...) expert tensor that this rank holds."""
    return {name: slice(shard.first_expert, shard.first_expert + param.shape[0])
            for name, param, shard in _expert_params(expert_shards)}


def _gather_expert_states(optimizer: torch.optim.Optimizer, expert_shards: dict[str, ExpertParallel]) -> dict:
    """Collective over each EP group: name -> (all E experts' weight, their AdamW moments), on CPU."""

    def full(t: torch.Tensor, group) -> torch.Tensor:
        local = (t.full_tensor() if hasattr(t, "full_tensor") else t).detach().contiguous()
        parts = [torch.empty_like(local) for _ in range(dist.get_world_size(group))]
        dist.all_gather(parts, local, group=group)
        return torch.cat(parts).cpu()

    out = {}
    for name, param, shard in _expert_params(expert_shards):
        state = optimizer.state.get(param, {})
        moments = {k: full(v, shard.group) for k, v in sorted(state.items()) if torch.is_tensor(v) and v.dim() == 3}
        out[name] = (full(param, shard.group), moments)
    return out


def clip_grad_norm_sharded(parameters, max_norm: float) -> torch.Tensor:
    """clip_grad_norm_ for gradients sharded as DTensors over different meshes (FSDP2 parameters
    over all ranks, expert slices over their "dp" ranks), where torch's version cannot combine the
    meshes. Every gradient element lives on exactly one rank, so the global squared norm is the sum
    over ranks of the local shards' squared norms. Returns the norm before clipping."""
    grads = [p.grad for p in parameters if p.grad is not None]
    local = [g.to_local() if hasattr(g, "to_local") else g for g in grads]
    total_sq = torch.stack([g.detach().float().pow(2).sum() for g in local]).sum()
    dist.all_reduce(total_sq)
    total = total_sq.sqrt()
    scale = torch.clamp(max_norm / (total + 1e-6), max=1.0)
    for g in local:
        g.mul_(scale.to(g.dtype))
    return total
