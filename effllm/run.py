"""One training run's pieces: `build_run` (model, FP8, parallelism, optimizer, in their order) and
the step (`step_losses` = `forward_backward` over `rank_batch`es, then `optimizer_update`), and
`evaluate`.

The trainer (effllm/train.py) and the benchmarks that time training steps build their runs here,
so they train the same thing the same way.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from effllm import checkpoint as ckpt_io
from effllm.config import OptimConfig, TrainConfig, checkpoint_format, lr_at
from effllm.data import TokenDataset
from effllm.devices import autocast_dtype, resolve_device
from effllm.errors import ConfigError, DataError
from effllm.fp8 import cache_fp8_weights, convert_to_fp8
from effllm.goldfish import apply_goldfish
from effllm.kernels.backends import fp8_backend
from effllm.kernels.fp8_quant import TILE
from effllm.model import Transformer
from effllm.parallelize import (
    DistEnv,
    ExpertParallel,
    build_mesh,
    clip_grad_norm_sharded,
    load_full_optimizer_state,
    shard_experts,
    wrap_data_parallel,
)
from effllm.tokenizer import same_tokenizer


@dataclass
class Run:
    """A model ready to train, as `build_run` returns it."""

    model: Transformer  # the model itself, parameter names as in checkpoints (FSDP2 shards it in place)
    step_fn: nn.Module  # what a training step calls: the model, compiled, or wrapped in DDP
    optimizer: torch.optim.AdamW
    amp: torch.dtype | None  # the autocast dtype, None for fp32
    param_counts: dict  # of the whole model, before experts are split over ranks
    fp8_report: dict | None = None  # what convert_to_fp8 converted and skipped, and the backend that runs it (cfg.fp8)
    expert_shards: dict[str, ExpertParallel] = field(default_factory=dict)  # expert parallelism's layers
    sharded: bool = False  # FSDP2: parameters and optimizer state are sharded over the ranks
    checkpoint_format: str = "full"  # what its checkpoints are written as (effllm.config.checkpoint_format)


NO_FP8 = ("fp8=True but no linear of this model can run in FP8: block scaling needs in and out features that are "
          "multiples of {tile} (model.dim={dim}). Widen the model (e.g. the deepseek_tiny_fp8 recipe) or drop --fp8")


def build_run(cfg: TrainConfig, env: DistEnv, device: torch.device, resume_from: Path | None = None,
              model_hook: Callable[[Transformer], None] | None = None, init_from: Path | None = None) -> Run:
    """The run of `cfg` on this rank, built in the order that works:

    1. the model, seeded by cfg.seed (the same initial model on every rank), on `device`;
    2. FP8 (cfg.fp8): linears and experts swapped, the same Parameters, before the optimizer;
    3. with `resume_from` (or `init_from`, a new run's starting weights), the checkpoint's full
       weights, before any sharding (any world size loads any other's checkpoint);
    4. `model_hook(model)` (see `effllm.train.train`);
    5. activation checkpointing, expert parallelism, then torch.compile and FSDP2 or DDP
       (`wrap_data_parallel`), or torch.compile alone on one process;
    6. the optimizer, over the sharded parameters, and with `resume_from` its state.
    """
    if cfg.fp8 and cfg.model.dim % TILE:  # before anything is allocated
        raise ConfigError(NO_FP8.format(tile=TILE, dim=cfg.model.dim))
    torch.manual_seed(cfg.seed)
    model = Transformer(cfg.model).to(device)
    fp8_report = convert_to_fp8(model, recipe=cfg.fp8_recipe) if cfg.fp8 else None
    if fp8_report is not None and not fp8_report["converted"]:
        raise ConfigError(NO_FP8.format(tile=TILE, dim=cfg.model.dim))
    if fp8_report is not None and cfg.grad_accum > 1 and not (env.enabled and cfg.data_parallel == "fsdp"):
        cache_fp8_weights(model)  # each weight quantized once per optimizer step, not per micro-batch
    if fp8_report is not None:  # what the converted layers' "auto" runs on this device
        fp8_report["backend"] = (f"torch.scaled_mm {cfg.fp8_recipe}" if cfg.fp8_recipe != "blockwise"
                                 else fp8_backend(device))
        fp8_report["experts_backend"] = fp8_backend(device, grouped=True)
    if resume_from is not None or init_from is not None:
        ckpt_io.load_weights(resume_from or init_from, model)
    if model_hook is not None:
        model_hook(model)
    counts = model.param_counts()
    for block in model.all_blocks():  # the first of the wrappers: AC, compile, FSDP
        block.set_activation_checkpointing(cfg.activation_checkpointing)
    shards = {}
    if env.enabled:
        mesh = build_mesh(env, device, cfg.expert_parallel)
        if mesh is not None:
            shards = shard_experts(model, mesh["ep"].get_group())
        step_fn = wrap_data_parallel(model, cfg.data_parallel, device, cfg.compile, mesh, shards)
    else:
        step_fn = torch.compile(model) if cfg.compile else model
    optimizer = build_optimizer(model, cfg.optim)  # after FSDP: over the sharded parameters
    sharded = env.enabled and cfg.data_parallel == "fsdp"
    if resume_from is not None:
        ckpt_io.load_training_state(resume_from, optimizer, (lambda sd: load_full_optimizer_state(
            model, optimizer, sd, shards)) if sharded else None, model=model)
    fmt = checkpoint_format(cfg, env.world_size, counts["total"] + counts["mtp"])
    return Run(model, step_fn, optimizer, autocast_dtype(cfg.precision, device), counts, fp8_report, shards, sharded,
               fmt)


def build_optimizer(model: torch.nn.Module, cfg: OptimConfig) -> torch.optim.AdamW:
    """AdamW with weight decay on tensors of 2+ dims (matrices, embeddings) only."""
    decay = [p for p in model.parameters() if p.requires_grad and p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.dim() < 2]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps)


@torch.no_grad()
def evaluate(model, data: TokenDataset, cfg: TrainConfig, device, amp: torch.dtype | None) -> float:
    """Mean cross-entropy over the fixed validation windows."""
    model.eval()
    total, count = 0.0, 0
    for x, y in data.val_batches(cfg.batch_size, cfg.seq_len, cfg.eval_tokens):
        with torch.autocast(device.type, dtype=amp, enabled=amp is not None):
            _, loss = model(x.to(device), y.to(device))
        total += loss.item() * y.numel()
        count += y.numel()
    model.train()
    return total / count


def evaluate_checkpoint(path: str | Path, data_dir: str | Path | None = None, max_tokens: int | None = None,
                        batch_size: int = 8, device: str = "auto", precision: str = "auto") -> dict:
    """The checkpoint at `path` on the val split of `data_dir` (default: the data it trained on):
    {"loss" (nats/token), "perplexity", "bits_per_byte", "tokens", "bytes", ...}, over consecutive
    windows of the run's seq_len from the split's start, `max_tokens` of them (None: all). The
    model runs in `precision` (FP8-trained weights included: they are ordinary weights)."""
    device = resolve_device(device)
    model, state, ckpt = ckpt_io.load_model(path, device)
    run_cfg = state["config"]
    data_dir = Path(data_dir or state.get("data_dir_resolved") or run_cfg["data_dir"])
    data = TokenDataset(data_dir)
    if not same_tokenizer(data.manifest["tokenizer"], state["tokenizer"]):
        raise DataError(f"{data_dir} is tokenized with {data.manifest['tokenizer']}, the model with "
                        f"{state['tokenizer']} — prepare that data with the model's tokenizer, or evaluate on data "
                        "that has it")
    seq_len = min(run_cfg["seq_len"], model.cfg.max_seq_len)
    available = len(data.splits["val"]) - 1
    if available < seq_len:
        raise DataError(f"the val split of {data_dir} holds {available + 1} tokens, fewer than one window of "
                        f"{seq_len} — prepare more data, or a larger --val-fraction")
    amp = autocast_dtype(precision, device)
    lengths = torch.from_numpy(data.tokenizer.token_bytes())
    nats, tokens, text_bytes = 0.0, 0, 0
    with torch.no_grad():
        for x, y in data.val_batches(batch_size, seq_len, max_tokens or available):
            with torch.autocast(device.type, dtype=amp, enabled=amp is not None):
                _, loss = model(x.to(device), y.to(device))  # the mean cross-entropy, as `evaluate` takes it
            nats += loss.item() * y.numel()
            tokens += y.numel()
            text_bytes += int(lengths[y].sum())
    loss = nats / tokens
    return {"checkpoint": str(ckpt), "step": state["step"], "data_dir": str(data_dir), "seq_len": seq_len,
            "tokens": tokens, "bytes": text_bytes, "loss": loss, "perplexity": math.exp(loss),
            "bits_per_byte": nats / math.log(2) / max(1, text_bytes), "precision": str(amp or torch.float32)}


def forward_backward(step_fn, batch, grad_accum: int, mtp_lambda: float, device: torch.device,
                     amp: torch.dtype | None) -> dict[str, torch.Tensor]:
    """Forward and backward of `step_fn` (a Transformer, or what wraps one) over `grad_accum`
    micro-batches (`batch(micro)` -> (x, y)); gradients
    accumulate in the parameters. The objective is cross-entropy + the MoE balance losses + mtp_lambda
    x the mean MTP loss. Returns the summed pure cross-entropy, balance and MTP losses as device
    tensors (no host sync)."""
    sums = {name: torch.zeros((), device=device) for name in ("loss", "aux", "mtp")}
    for micro in range(grad_accum):
        x, y = batch(micro)
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        with torch.autocast(device.type, dtype=amp, enabled=amp is not None):
            out = step_fn(x, y, return_aux=True)
        loss = out.loss
        aux = out.moe_aux_loss  # MoE balance losses; the logged loss stays pure cross-entropy
        mtp = out.mtp_loss  # mean over MTP depths
        total = loss if aux is None else loss + aux
        if mtp is not None:
            total = total + mtp_lambda * mtp
            sums["mtp"] += mtp.detach()
        (total / grad_accum).backward()
        sums["loss"] += loss.detach()
        if aux is not None:
            sums["aux"] += aux.detach()
    return sums


def step_losses(run: Run, cfg: TrainConfig, data: TokenDataset, env: DistEnv, device: torch.device,
                step: int) -> dict[str, torch.Tensor]:
    """The first half of optimizer step `step` (0-based): its learning rate set, then forward and
    backward over this rank's micro-batches of the step's global batch (rank r takes micro-batches
    r*A .. r*A+A-1). Returns the global batch's summed losses per micro-batch ("loss", "aux",
    "mtp"; divide by grad_accum for the means), all-reduced over the ranks under torchrun, as device
    tensors. Then the caller checks them and calls `optimizer_update`."""
    lr = lr_at(step, cfg)
    for group in run.optimizer.param_groups:
        group["lr"] = lr
    sums = forward_backward(run.step_fn, functools.partial(rank_batch, data, cfg, step, env.rank), cfg.grad_accum,
                            cfg.model.mtp_lambda, device, run.amp)
    if env.enabled:  # the global batch's means, the same on every rank (so is any check of them)
        packed = torch.stack(list(sums.values()))
        torch.distributed.all_reduce(packed)
        sums = dict(zip(sums, packed / env.world_size, strict=True))
    return sums


def optimizer_update(model: Transformer, optimizer: torch.optim.Optimizer, grad_clip: float,
                     moe_layers: dict) -> tuple[torch.Tensor | None, dict]:
    """Clip, step, zero the gradients, then move each MoE layer's balancing bias (after the step, as
    in DeepSeek-V3). Returns the pre-clip grad norm (None without clipping) and each layer's load."""
    grad_norm = None
    if grad_clip > 0 and any(hasattr(p, "to_local") for p in model.parameters()):  # FSDP2: sharded grads
        grad_norm = clip_grad_norm_sharded(list(model.parameters()), grad_clip)
    elif grad_clip > 0:
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return grad_norm, {name: layer.update_bias() for name, layer in moe_layers.items()}


def rank_batch(data: TokenDataset, cfg: TrainConfig, step: int, rank: int, micro: int):
    """Micro-batch `micro` of `rank` at `step`: global micro-batch rank * grad_accum + micro. One
    process with grad_accum = W·A sees exactly the batches of W ranks with grad_accum = A. With
    Goldfish loss on, the dropped targets are set to -1 (ignored by the loss)."""
    x, y = data.train_batch(cfg.batch_size, cfg.seq_len, cfg.seed, step, 0, rank * cfg.grad_accum + micro)
    if cfg.goldfish_k:
        y = apply_goldfish(x, y, cfg.goldfish_k, cfg.goldfish_h)
    return x, y
