"""Multi-head latent attention (DeepSeek-V2 §2.1): low-rank KV, decoupled RoPE, a latent cache.

Shape legend: B batch, T new tokens, S cached positions, D model dim, H heads, C kv_lora_rank,
R qk_rope_head_dim, N qk_nope_head_dim, V v_head_dim, Q q_lora_rank.

Training path: queries from the input, or through a low-rank latent with RMSNorm (Q > 0); one
compressed kv latent c = RMSNorm(W_DKV x) of width C, up-projected by W_UKV into per-head keys
(N) and values (V); a RoPE key of width R computed from the input and shared by all heads. Scores
use the concatenated [nope | rope] parts, scaled by 1/sqrt(N+R) times YaRN's mscale².

Decoding caches only (c, k_rope) per token: C + R numbers instead of 2·H·hs for MHA. Two decode
paths compute the same function:
- naive: up-project the whole cache into keys and values every step;
- absorbed: fold W_UK into the query (q_nope @ W_UK gives a C-wide query per head) and W_UV into
  the output, and attend over the latents directly: attention with one shared key/value head of
  width C+R (keys) and C (values), which SDPA runs as multi-query attention.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from effllm.attention import (
    RotaryEmbedding,
    apply_rotary,
    causal_sdpa,
    yarn_inv_freq,
    yarn_mscale,
)
from effllm.docfields import documented
from effllm.errors import ConfigError
from effllm.layers import RMSNorm


@documented
@dataclass
class MLAConfig:
    """Shape, RoPE / YaRN and decode path of an `MLA` layer. Checked on construction."""

    n_heads: int | None = None  # H attention heads; None = the model's n_heads (a standalone MLA needs it set)
    q_lora_rank: int = 0  # Q: width of the query latent; 0 = queries straight from the input
    kv_lora_rank: int = 64  # C: width of the compressed kv latent (what the cache stores)
    qk_nope_head_dim: int = 32  # N: per-head query/key width without position
    qk_rope_head_dim: int = 16  # R: per-head query width and shared key width carrying RoPE (even)
    v_head_dim: int = 32  # V: per-head value width
    rope_theta: float = 10000.0  # RoPE base frequency
    rope_factor: float = 1.0  # YaRN context extension factor; 1 = plain RoPE
    original_max_position: int = 4096  # YaRN: the context length the model was trained at
    beta_fast: float = 32.0  # YaRN: dimensions rotating faster than this keep their frequency
    beta_slow: float = 1.0  # YaRN: dimensions rotating slower than this are fully interpolated
    mscale: float = 1.0  # YaRN: attention temperature coefficient (softmax scale x mscale²)
    norm_eps: float = 1e-6  # epsilon of the latent RMSNorms
    decode: Literal["absorbed", "naive"] = "absorbed"  # decode path when a cache is given

    def __post_init__(self) -> None:
        if self.n_heads is not None and self.n_heads <= 0:
            raise ConfigError(f"mla.n_heads must be positive (or None for the model's), got {self.n_heads}")
        for name in ("kv_lora_rank", "qk_rope_head_dim", "v_head_dim", "original_max_position"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"mla.{name} must be positive, got {getattr(self, name)}")
        if self.q_lora_rank < 0 or self.qk_nope_head_dim < 0:
            raise ConfigError("mla.q_lora_rank and mla.qk_nope_head_dim must be >= 0")
        if self.qk_rope_head_dim % 2:
            raise ConfigError(f"mla.qk_rope_head_dim={self.qk_rope_head_dim} is odd: RoPE rotates pairs, "
                              "pick an even width")
        if self.rope_factor < 1:
            raise ConfigError(f"mla.rope_factor={self.rope_factor} < 1: YaRN extends context, use 1 for plain RoPE")

    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    @property
    def softmax_scale(self) -> float:
        return self.qk_head_dim**-0.5 * yarn_mscale(self.rope_factor, self.mscale) ** 2

    def rotary(self, max_seq_len: int) -> RotaryEmbedding:
        """The RoPE (with YaRN when rope_factor > 1) tables for the R rotary dimensions."""
        inv_freq = yarn_inv_freq(self.qk_rope_head_dim, self.rope_theta, self.rope_factor,
                                 self.original_max_position, self.beta_fast, self.beta_slow)
        return RotaryEmbedding(self.qk_rope_head_dim, max_seq_len, self.rope_theta, inv_freq)


# Decode chunks up to this many tokens take the absorbed path (single tokens, speculative
# verification); longer ones (prefills) up-project the latents and use SDPA's fused kernels.
ABSORBED_MAX_TOKENS = 16


class LatentCache:
    """Per layer and token: the normalised kv latent (C) and the rotated shared key (R), nothing else.

    Both live in one (B, S_max, C+R) tensor, so the absorbed path reads its keys as a view of the
    cache instead of concatenating latent and rope key for every decoded token.
    """

    def __init__(self, batch: int, max_len: int):
        self.batch, self.max_len = batch, max_len
        self.kv: torch.Tensor | None = None  # (B, S_max, C+R): [latent | rope key]
        self.latent_dim = 0

    def update(self, latent: torch.Tensor, k_rope: torch.Tensor, pos: int) -> torch.Tensor:
        """Store positions pos..pos+T-1; return the (B, pos+T, C+R) view of everything cached."""
        B, T, C = latent.shape
        if pos + T > self.max_len:
            raise ValueError(f"latent cache holds {self.max_len} positions but position {pos + T - 1} was asked for: "
                             "create the cache with a larger max_len (at most the model's max_seq_len)")
        if self.kv is None:
            self.kv = latent.new_empty((self.batch, self.max_len, C + k_rope.shape[-1]))
            self.latent_dim = C
        self.kv[:B, pos : pos + T, :C] = latent
        self.kv[:B, pos : pos + T, C:] = k_rope
        return self.kv[:B, : pos + T]

    @property
    def latent(self) -> torch.Tensor | None:
        return None if self.kv is None else self.kv[..., : self.latent_dim]

    def bytes_per_token(self) -> int:
        """Cache bytes per token of this layer: (C + R) x element size."""
        return 0 if self.kv is None else self.kv.shape[-1] * self.kv.element_size()


class MLA(nn.Module):
    """Multi-head latent attention: `MLA(dim, MLAConfig(n_heads=...), max_seq_len)`, causal,
    (B, T, D) -> (B, T, D): `mla(x)` runs it at positions 0..T-1.

    The layer owns its RoPE tables (`self.rotary`, built once for `max_seq_len` positions, default
    the config's original_max_position, and sliced per call). `forward(x, rope, cache, pos)` also
    takes the (cos, sin) tables for positions pos..pos+T-1 from a caller that shares one set among
    its layers (the Transformer). With a `LatentCache` it decodes chunks of up to
    ABSORBED_MAX_TOKENS tokens by `cfg.decode` (absorbed or naive) and prefills longer chunks
    through the expanded path.
    """

    def __init__(self, dim: int, cfg: MLAConfig | None = None, max_seq_len: int | None = None):
        super().__init__()
        self.cfg = cfg = cfg or MLAConfig()
        if cfg.n_heads is None:
            raise ConfigError("an MLA layer on its own needs its heads: MLAConfig(n_heads=...) (inside a model, "
                              "ModelConfig.n_heads sets them)")
        self.rotary = cfg.rotary(max_seq_len or cfg.original_max_position)
        H = cfg.n_heads
        if cfg.q_lora_rank:
            self.wq_a = nn.Linear(dim, cfg.q_lora_rank, bias=False)
            self.q_norm = RMSNorm(cfg.q_lora_rank, cfg.norm_eps)
            self.wq_b = nn.Linear(cfg.q_lora_rank, H * cfg.qk_head_dim, bias=False)
        else:
            self.wq = nn.Linear(dim, H * cfg.qk_head_dim, bias=False)
        self.wkv_a = nn.Linear(dim, cfg.kv_lora_rank + cfg.qk_rope_head_dim, bias=False)  # W_DKV and W_KR
        self.kv_norm = RMSNorm(cfg.kv_lora_rank, cfg.norm_eps)
        self.wkv_b = nn.Linear(cfg.kv_lora_rank, H * (cfg.qk_nope_head_dim + cfg.v_head_dim), bias=False)  # W_UK, W_UV
        self.wo = nn.Linear(H * cfg.v_head_dim, dim, bias=False)

    def residual_projections(self) -> list[torch.Tensor]:
        """The weights that write into the residual stream (their init is scaled by depth)."""
        return [self.wo.weight]

    def new_cache(self, batch: int, max_len: int) -> LatentCache:
        return LatentCache(batch, max_len)

    def forward(self, x: torch.Tensor, rope=None, cache: LatentCache | None = None, pos: int = 0) -> torch.Tensor:
        cfg = self.cfg
        B, T, _ = x.shape
        if rope is None:
            if pos + T > self.rotary.cos.shape[0]:
                raise ValueError(f"positions up to {pos + T - 1} asked of an MLA built for {self.rotary.cos.shape[0]}: "
                                 "build it with a larger max_seq_len")
            rope = self.rotary(pos, T)
        H, N, R, V = cfg.n_heads, cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim
        q = self.wq_b(self.q_norm(self.wq_a(x))) if cfg.q_lora_rank else self.wq(x)
        q = q.view(B, T, H, N + R).transpose(1, 2)  # (B, H, T, N+R)
        q_nope, q_rope = q.split([N, R], dim=-1)
        q_rope = apply_rotary(q_rope, *rope)
        latent, k_rope = self.wkv_a(x).split([cfg.kv_lora_rank, R], dim=-1)
        latent = self.kv_norm(latent)  # (B, T, C)
        k_rope = apply_rotary(k_rope.unsqueeze(1), *rope).squeeze(1)  # (B, T, R), one key for all heads
        C = cfg.kv_lora_rank
        if cache is not None:
            kv = cache.update(latent, k_rope, pos)  # (B, S, C+R)
            latent, k_rope = kv[..., :C], kv[..., C:]
        if cache is not None and cfg.decode == "absorbed" and T <= ABSORBED_MAX_TOKENS:
            # Decoding a token or a few (speculative verification). A prefill takes the expanded
            # path: its T x S scores with a 576-wide absorbed head fit no fused SDPA kernel (the
            # math fallback asked an H100 for 64 GiB at 8k).
            y = self._absorbed(q_nope, q_rope, kv, pos)
        else:
            y = self._expanded(q_nope, q_rope, latent, k_rope, pos)
        return self.wo(y.transpose(1, 2).reshape(B, T, H * V))

    def _expanded(self, q_nope, q_rope, latent, k_rope, pos: int) -> torch.Tensor:
        """Training and naive decoding: per-head keys and values up-projected from the latents."""
        cfg = self.cfg
        B, S, _ = latent.shape
        H, N, R, V = cfg.n_heads, cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim
        kv = self.wkv_b(latent).view(B, S, H, N + V).transpose(1, 2)  # (B, H, S, N+V)
        k_nope, v = kv.split([N, V], dim=-1)
        k = torch.cat((k_nope, k_rope.unsqueeze(1).expand(B, H, S, R)), dim=-1)  # (B, H, S, N+R)
        q = torch.cat((q_nope, q_rope), dim=-1)  # (B, H, T, N+R)
        return causal_sdpa(q, k, v, pos, scale=cfg.softmax_scale)  # (B, H, T, V)

    def _absorbed(self, q_nope, q_rope, kv, pos: int) -> torch.Tensor:
        """T new tokens (at positions pos..) over the cached latents kv (B, S, C+R): W_UK folded into
        the query, W_UV applied after attention. All heads share the one latent key/value, so scores
        and outputs are two batched matmuls that each read the cache once. (SDPA has no fused kernel
        for a 576-wide head: its math fallback copied the latents for every head, and ran 4x slower
        than the naive path at 8k context on an H100.)"""
        cfg = self.cfg
        H, N, V, C = cfg.n_heads, cfg.qk_nope_head_dim, cfg.v_head_dim, cfg.kv_lora_rank
        T, S = q_nope.shape[2], kv.shape[1]
        w = self.wkv_b.weight.view(H, N + V, C)
        w_uk, w_uv = w[:, :N], w[:, N:]  # (H, N, C), (H, V, C)
        q_latent = torch.einsum("bhtn,hnc->bhtc", q_nope, w_uk.to(q_nope.dtype))  # (B, H, T, C)
        q = torch.cat((q_latent, q_rope), dim=-1).flatten(1, 2)  # (B, H*T, C+R)
        kv = kv.to(q.dtype)
        scores = torch.matmul(q, kv.transpose(1, 2)).view(-1, H, T, S) * cfg.softmax_scale  # (B, H, T, S)
        if T > 1:  # token t (at pos + t) sees keys up to pos + t
            future = torch.arange(S, device=kv.device)[None, :] > (pos + torch.arange(T, device=kv.device))[:, None]
            scores = scores.masked_fill(future, float("-inf"))
        probs = torch.softmax(scores.float(), dim=-1).to(q.dtype).flatten(1, 2)  # (B, H*T, S)
        o_latent = torch.matmul(probs, kv[..., :C]).view(-1, H, T, C)  # (B, H, T, C)
        return torch.einsum("bhtc,hvc->bhtv", o_latent, w_uv.to(o_latent.dtype))  # (B, H, T, V)
