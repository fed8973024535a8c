"""How much memory a training run needs, estimated before anything is allocated, and whether it fits.

`estimate(cfg, world_size)` adds up, per rank:
- weights, gradients and AdamW's two moments: 16 bytes per parameter in fp32 (the MTP modules
  included), divided over the ranks under FSDP (ZeRO-3; expert parallelism splits the experts
  instead, to the same share);
- activations: the tensors autograd keeps for the backward pass, per token of one micro-batch,
  counted layer by layer from the shapes (`activation_elements`), at the autocast dtype's size
  (norms, routers and logits in fp32). With activation checkpointing only each block's input is
  kept, plus one block's activations while it is recomputed.
tests/test_memory.py holds the activation count to within 25% of the bytes autograd actually saves
for dense, MoE and MLA models. `check_fits` refuses a run whose estimate exceeds what the device
has free, naming the remedies; `--no-memory-check` skips it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from effllm.devices import autocast_dtype, resolve_device
from effllm.errors import ConfigError
from effllm.model import ModelConfig, Transformer

ADAMW_BYTES_PER_PARAM = 16  # fp32 weight, gradient, exp_avg and exp_avg_sq


@dataclass
class MemoryEstimate:
    states: float  # weights, gradients and optimizer state, bytes per rank
    activations: float  # saved for backward, bytes per rank at one micro-batch
    per_token: float  # activation bytes per token of the micro-batch

    @property
    def total(self) -> float:
        return self.states + self.activations

    def describe(self) -> str:
        gib = 2**30
        return (f"~{self.total / gib:.2f} GiB ({self.states / gib:.2f} weights, gradients and AdamW state, "
                f"{self.activations / gib:.2f} activations)")


def _attention(cfg: ModelConfig) -> float:
    """Elements saved per token by one attention sub-block (its norm included)."""
    D = cfg.dim
    if cfg.attention == "mla":
        m = cfg.mla_layer
        H, N, R, V, C, Q = m.n_heads, m.qk_nope_head_dim, m.qk_rope_head_dim, m.v_head_dim, m.kv_lora_rank, m.q_lora_rank
        q_path = (Q + Q + Q) if Q else 0  # the query latent, its norm's in and out
        q = H * (N + R)
        kv = (C + R) + 2 * C + H * (N + V)  # the down-projection, its norm's in and out, the up-projection
        sdpa = 3 * H * (N + R) + H * (N + R)  # q, k, v (padded to the query width) and the output
        rope = H * R + R  # the rotated copies
        return 2 * D + q_path + q + kv + sdpa + rope + H * V
    H, G, hs = cfg.n_heads, cfg.kv_heads, cfg.head_dim
    return 2 * D + (H + 2 * G) * hs + H * hs + (H + G) * hs  # norm, q/k/v, the output, the rotated copies


def _ffn(cfg: ModelConfig, moe: bool) -> float:
    """Elements saved per token by one feed-forward sub-block (its norm included)."""
    D = cfg.dim
    if not moe:
        return 2 * D + 4 * cfg.hidden_dim  # SwiGLU: w1 and w3 outputs, silu's output, w2's input
    e = cfg.moe
    shared = 4 * e.n_shared_experts * e.expert_dim
    routed = e.top_k * (D + 4 * e.expert_dim + 2 * D)  # gathered rows, the SwiGLU, outputs and their unsorted copy
    return 2 * D + 2 * e.n_routed_experts + shared + routed  # + the router's logits and scores (fp32)


def activation_elements(cfg: ModelConfig) -> tuple[float, float, float]:
    """(per-token elements saved by every block together, by the largest single block, by the head
    and loss): what autograd keeps for the backward pass, counted from the shapes."""
    blocks = [_attention(cfg) + _ffn(cfg, cfg.is_moe_layer(i)) for i in range(cfg.n_layers)]
    mtp = [cfg.dim * 4 + _attention(cfg) + _ffn(cfg, cfg.is_moe_layer(cfg.n_layers - 1)) for _ in range(cfg.mtp_depth)]
    head = 2 * cfg.dim + 2 * cfg.vocab_size  # the final norm, the logits and their softmax (fp32)
    return sum(blocks) + sum(mtp), max(blocks + mtp), head * (1 + cfg.mtp_depth)


def estimate(cfg, device: torch.device | None = None, world_size: int = 1, counts: dict | None = None) -> MemoryEstimate:
    """The memory one rank of a run of TrainConfig `cfg` on `device` (default: cfg.device's) needs
    (see the module docstring); `counts` are the model's param_counts() (computed on the meta device
    when not given)."""
    device = resolve_device(cfg.device) if device is None else device
    if counts is None:
        with torch.device("meta"):  # shapes only: nothing is allocated
            counts = Transformer(cfg.model).param_counts()
    params = counts["total"] + counts["mtp"]
    states = params * ADAMW_BYTES_PER_PARAM / (world_size if world_size > 1 and cfg.data_parallel == "fsdp" else 1)
    elem = 4 if autocast_dtype(cfg.precision, device) is None else 2  # bf16 autocast
    every, largest, head = activation_elements(cfg.model)
    kept = (cfg.model.n_layers + cfg.model.mtp_depth) * cfg.model.dim + largest if cfg.activation_checkpointing \
        else every
    per_token = kept * elem + head * 4
    return MemoryEstimate(states, per_token * cfg.batch_size * cfg.seq_len, per_token)


def available_bytes(device: torch.device) -> int | None:
    """Memory free for this process on `device`: the GPU's free memory, or the CPU's available RAM
    (MemAvailable); None where it cannot be read."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError):
        return None


def check_fits(cfg, est: MemoryEstimate, device: torch.device, available: int | None = None,
               ranks_sharing: int = 1) -> None:
    """Refuse, before allocation, a run whose estimate exceeds what `device` has free, for
    `ranks_sharing` ranks on that memory (torchrun's processes on one CPU)."""
    available = available_bytes(device) if available is None else available
    if available is None or est.total * ranks_sharing <= available:
        return
    gib = 2**30
    fixes = []
    if cfg.batch_size > 1:
        fixes.append(f"a smaller --batch-size with --grad-accum to keep the tokens per step (activations: "
                     f"{est.per_token * cfg.seq_len / gib:.2f} GiB per sequence)")
    if not cfg.activation_checkpointing:
        fixes.append("--activation-checkpointing")
    fixes += ["more devices under torchrun (FSDP shards the weights and optimizer)", "--no-memory-check to try anyway"]
    raise ConfigError(f"this run needs {est.describe()}" + (f" on each of {ranks_sharing} ranks" if ranks_sharing > 1
                                                            else "")
                      + f" and {device.type} has {available / gib:.2f} GiB free — "
                      + "; ".join(fixes))
