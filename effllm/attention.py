"""The dense baseline attention: multi-head / grouped-query attention with rotary positions.

Shape letters: B batch, T new tokens, S cached positions, D model dim, H query heads,
G key/value heads (H % G == 0), hs head size.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

# Backends for one-token decode steps on CUDA. cuDNN attention is left out: it builds a plan for
# every new key length, and decoding changes the length at every step. (Measured on an H100,
# torch 2.11: MHA decode at batch 16 cost ~39 ms per step at any context before this choice.)
DECODE_BACKENDS = (SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH)


def yarn_inv_freq(head_dim: int, theta: float, factor: float, original_max_position: int,
                  beta_fast: float, beta_slow: float) -> torch.Tensor:
    """RoPE inverse frequencies with YaRN scaling (Peng et al., 2023, as DeepSeek-V2/V3 use it),
    in fp64. Dimensions that rotate more than beta_fast times over the original context keep their
    frequency; those rotating fewer than beta_slow times are divided by `factor`; a linear ramp
    blends the ones between. factor = 1 gives plain RoPE exactly."""
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
    if factor == 1.0:
        return inv_freq

    def correction_dim(rotations: float) -> float:
        return head_dim * math.log(original_max_position / (rotations * 2 * math.pi)) / (2 * math.log(theta))

    low = max(math.floor(correction_dim(beta_fast)), 0)
    high = min(math.ceil(correction_dim(beta_slow)), head_dim - 1)
    if low == high:
        high += 0.001
    ramp = ((torch.arange(head_dim // 2, dtype=torch.float64) - low) / (high - low)).clamp(0, 1)
    keep = 1 - ramp  # 1 for fast-rotating (high-frequency) dimensions
    return inv_freq / factor * (1 - keep) + inv_freq * keep


def yarn_mscale(factor: float, mscale: float = 1.0) -> float:
    """YaRN's attention temperature correction; 1 when factor = 1."""
    return 1.0 if factor <= 1.0 else 0.1 * mscale * math.log(factor) + 1.0


class RotaryEmbedding(nn.Module):
    """cos/sin tables of rotary position embedding (Su et al., RoFormer, 2021), in fp32.

    Uses the "rotate half" layout (Llama / Hugging Face convention): the first and second halves of
    each head are the two coordinates of each rotated pair. The tables are non-persistent buffers,
    rebuilt at construction, so they never enter a checkpoint. `inv_freq` replaces the plain RoPE
    frequencies (YaRN: `yarn_inv_freq`).
    """

    def __init__(self, head_dim: int, max_seq_len: int, theta: float = 10000.0, inv_freq: torch.Tensor | None = None):
        super().__init__()
        if head_dim % 2:
            raise ValueError(f"rotary head dim must be even, got {head_dim}: pick an even head size")
        if inv_freq is None:
            inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
        angles = torch.outer(torch.arange(max_seq_len, dtype=torch.float64), inv_freq.double())  # (T, hs/2)
        self.register_buffer("cos", angles.cos().float(), persistent=False)
        self.register_buffer("sin", angles.sin().float(), persistent=False)

    def forward(self, start: int, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(cos, sin) for positions start .. start+length-1, each (length, hs/2)."""
        return self.cos[start : start + length], self.sin[start : start + length]


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate (B, heads, T, hs) by the angles of (T, hs/2) tables; computed in fp32."""
    x1, x2 = x.float().chunk(2, dim=-1)
    out = torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)
    return out.to(x.dtype)


class KVCache:
    """Keys and values of past positions for one attention layer, allocated on first write.

    Holds (B, G, max_len, hs) tensors in the dtype of the first keys written (bf16 under
    autocast), so one cache serves fp32 and mixed-precision decoding alike.
    """

    def __init__(self, batch: int, max_len: int):
        self.batch, self.max_len = batch, max_len
        self.k: torch.Tensor | None = None
        self.v: torch.Tensor | None = None

    def update(self, k: torch.Tensor, v: torch.Tensor, pos: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Store k, v (B, G, T, hs) at positions pos..pos+T-1; return all keys/values up to there."""
        B, G, T, hs = k.shape
        if pos + T > self.max_len:
            raise ValueError(
                f"KV cache holds {self.max_len} positions but position {pos + T - 1} was asked for: "
                "create the cache with a larger max_len (at most the model's max_seq_len)"
            )
        if self.k is None:
            shape = (self.batch, G, self.max_len, hs)
            self.k = torch.empty(shape, dtype=k.dtype, device=k.device)
            self.v = torch.empty(shape, dtype=v.dtype, device=v.device)
        self.k[:B, :, pos : pos + T] = k
        self.v[:B, :, pos : pos + T] = v
        return self.k[:B, :, : pos + T], self.v[:B, :, : pos + T]


class Attention(nn.Module):
    """Causal self-attention with RoPE; G < H key/value heads gives grouped-query attention.

    The attention itself runs through `F.scaled_dot_product_attention`, which picks the flash or
    memory-efficient kernel on CUDA and a fused C++ kernel on the CPU.
    """

    def __init__(self, dim: int, n_heads: int, n_kv_heads: int, head_dim: int):
        super().__init__()
        if n_heads % n_kv_heads:
            raise ValueError(
                f"n_heads={n_heads} is not a multiple of n_kv_heads={n_kv_heads}: "
                "each key/value head must serve a whole group of query heads"
            )
        self.n_heads, self.n_kv_heads, self.head_dim = n_heads, n_kv_heads, head_dim
        self.wq = nn.Linear(dim, n_heads * head_dim, bias=False)
        self.wk = nn.Linear(dim, n_kv_heads * head_dim, bias=False)
        self.wv = nn.Linear(dim, n_kv_heads * head_dim, bias=False)
        self.wo = nn.Linear(n_heads * head_dim, dim, bias=False)

    def residual_projections(self) -> list[torch.Tensor]:
        """The weights that write into the residual stream (their init is scaled by depth)."""
        return [self.wo.weight]

    def new_cache(self, batch: int, max_len: int) -> KVCache:
        """An empty cache for decoding up to `max_len` positions."""
        return KVCache(batch, max_len)

    def forward(
        self,
        x: torch.Tensor,  # (B, T, D)
        rope: tuple[torch.Tensor, torch.Tensor],  # cos, sin for positions pos..pos+T-1
        cache: KVCache | None = None,
        pos: int = 0,
    ) -> torch.Tensor:
        B, T, _ = x.shape
        q = self.wq(x).view(B, T, self.n_heads, self.head_dim).transpose(1, 2)  # (B, H, T, hs)
        k = self.wk(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)  # (B, G, T, hs)
        v = self.wv(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)  # (B, G, T, hs)
        q, k = apply_rotary(q, *rope), apply_rotary(k, *rope)
        if cache is not None:
            k, v = cache.update(k, v, pos)  # (B, G, pos+T, hs)
        y = causal_sdpa(q, k, v, pos, enable_gqa=self.n_kv_heads != self.n_heads)
        return self.wo(y.transpose(1, 2).reshape(B, T, self.n_heads * self.head_dim))


def causal_sdpa(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pos: int, enable_gqa: bool = False, scale: float | None = None
) -> torch.Tensor:
    """Causal attention of T queries at positions pos.. over the pos+T keys before and at them.

    One new token (decoding) attends to every cached key, so it needs no mask; a block of new
    tokens from position 0 uses the kernels' built-in causal mask; a block after a cached prefix
    needs an explicit mask, because SDPA's `is_causal` aligns the mask to the top-left corner.

    Values narrower than the queries (MLA: v_head_dim < qk head dim) are zero-padded to the query's
    width for the causal block and the padding sliced off the output, as transformers does for
    FlashAttention 2: the fused (flash) kernels take one head size for q, k and v, and without the
    padding SDPA falls back to its math kernel, which writes the T x T probabilities (so where the
    flash kernel is switched off, as under `sdpa_kernel(SDPBackend.MATH)`, nothing is padded). At
    deepseek_tiny's shape (16 x 6 heads x 256 tokens, qk 48, v 32) forward + backward took 29 ms
    instead of 41 on 2 CPU cores (median of 10); outputs and gradients agree to 5e-7 relative.
    """
    T, S = q.shape[-2], k.shape[-2]
    kwargs = {"enable_gqa": True} if enable_gqa else {}
    if T == 1:
        if q.device.type != "cuda":
            return F.scaled_dot_product_attention(q, k, v, scale=scale, **kwargs)
        with sdpa_kernel(list(DECODE_BACKENDS)):
            return F.scaled_dot_product_attention(q, k, v, scale=scale, **kwargs)
    if pos == 0 and S == T:
        width = v.shape[-1]
        # (the flag covers the CPU kernel too; torch.compile cannot read it, and its graphs pad: the flash
        # kernel is what they lower to, and the padding changes no value)
        if width < q.shape[-1] and (torch.compiler.is_compiling() or torch.backends.cuda.flash_sdp_enabled()):
            v = F.pad(v, (0, q.shape[-1] - width))
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale, **kwargs)[..., :width]
    mask = torch.ones(T, S, dtype=torch.bool, device=q.device).tril(diagonal=S - T)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, **kwargs)
