"""Model FLOPs per token, model FLOPs utilisation and tokens per device-hour.

Conventions (stated once, used by the trainer and every benchmark):
- a multiply-add is 2 FLOPs; only matrix products are counted (norms, activations, softmax and
  RoPE are a few percent at these sizes and are left out, as in Kaplan et al. 2020 and PaLM);
- attention scores and the weighted sum are counted with the causal mask: a token at position t
  attends t+1 keys, so a sequence of T averages (T+1)/2 keys per token;
- a training step costs 3x the forward pass (backward = 2x forward); activation recomputation is
  not counted, since MFU measures useful work.
The input embedding is a lookup and costs nothing; the output head is a full matrix product.
"""

from __future__ import annotations

import torch

from effllm.model import ModelConfig


def attention_flops(cfg: ModelConfig, seq_len: int) -> float:
    """Forward FLOPs per token of one attention layer at training length `seq_len`."""
    if cfg.attention == "mha":
        hs, H, G = cfg.head_dim, cfg.n_heads, cfg.kv_heads
        projections = 2 * cfg.dim * (H * hs + 2 * G * hs) + 2 * H * hs * cfg.dim  # q, k, v, o
        mixing = 2 * 2 * H * hs * (seq_len + 1) / 2  # q·k and p·v over the causal context
        return projections + mixing
    if cfg.attention == "mla":
        m, D = cfg.mla_layer, cfg.dim
        H, N, R, V, C, Q = m.n_heads, m.qk_nope_head_dim, m.qk_rope_head_dim, m.v_head_dim, m.kv_lora_rank, m.q_lora_rank
        q = 2 * D * Q + 2 * Q * H * (N + R) if Q else 2 * D * H * (N + R)
        kv = 2 * D * (C + R) + 2 * C * H * (N + V)  # down-projection (+ rope key), then up-projection
        out = 2 * H * V * D
        mixing = 2 * H * ((N + R) + V) * (seq_len + 1) / 2  # training path: per-head keys and values
        return q + kv + out + mixing
    raise ValueError(f"no FLOPs formula for attention kind {cfg.attention!r}")


def ffn_flops(cfg: ModelConfig, layer: int) -> float:
    """Forward FLOPs per token of the feed-forward of block `layer` (active parameters only)."""
    if cfg.is_moe_layer(layer):
        m = cfg.moe
        experts = 2 * 3 * cfg.dim * m.expert_dim * (m.top_k + m.n_shared_experts)  # chosen + shared
        return experts + 2 * cfg.dim * m.n_routed_experts  # + the router
    if cfg.ffn in ("dense", "moe"):
        return 2 * 3 * cfg.dim * cfg.hidden_dim
    raise ValueError(f"no FLOPs formula for ffn kind {cfg.ffn!r}")


def forward_flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
    """Forward FLOPs per token of the whole model, output head included."""
    blocks = sum(attention_flops(cfg, seq_len) + ffn_flops(cfg, i) for i in range(cfg.n_layers))
    return blocks + 2 * cfg.dim * cfg.vocab_size


def mtp_flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
    """Forward FLOPs of the MTP modules (training only) per token of the sequence. Depth k runs on
    the seq_len - k positions that have a token k ahead: the 2D -> D projection, one block (layer
    index n_layers + k - 1, attending over seq_len - k positions) and the shared output head."""
    total = 0.0
    for k in range(1, cfg.mtp_depth + 1):
        n = seq_len - k
        if n <= 0:
            break
        per = 2 * 2 * cfg.dim * cfg.dim + attention_flops(cfg, n) + ffn_flops(cfg, cfg.n_layers + k - 1) \
            + 2 * cfg.dim * cfg.vocab_size
        total += per * n / seq_len
    return total


def train_flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
    """Training FLOPs per token: forward + backward = 3x forward, MTP modules included."""
    return 3 * (forward_flops_per_token(cfg, seq_len) + mtp_flops_per_token(cfg, seq_len))


# Dense bf16 tensor-core peaks (no sparsity) from the vendors' datasheets, in FLOP/s. Matched
# against torch.cuda.get_device_name(); a device not listed gets no MFU rather than a guess.
BF16_PEAK_FLOPS = {
    "H200": 989e12,
    "H100 SXM": 989e12,
    "H100 80GB HBM3": 989e12,
    "H100 PCIe": 756e12,
    "H100 NVL": 835e12,
    "A100": 312e12,
    "L40S": 362e12,
    "RTX 4090": 165e12,
}


def device_name(device) -> str:
    """A human name of the device: the GPU's marketing name, or "CPU"."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return device.type.upper()


def peak_bf16_flops(name: str) -> float | None:
    """The dense bf16 peak of a device named `name`, or None when unknown (CPUs included)."""
    for key, peak in BF16_PEAK_FLOPS.items():
        if key in name:
            return peak
    return None


def mfu(tokens_per_second: float, flops_per_token: float, peak_flops: float | None) -> float | None:
    """Model FLOPs utilisation: achieved model FLOP/s over the device's peak (None if unknown)."""
    if not peak_flops:
        return None
    return tokens_per_second * flops_per_token / peak_flops


def tokens_per_device_hour(tokens_per_second: float) -> float:
    """Throughput per device-hour (per GPU-hour on a GPU, per CPU-hour on a CPU)."""
    return tokens_per_second * 3600.0
