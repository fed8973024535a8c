"""Small building blocks shared by every layer family: RMSNorm and the SwiGLU feed-forward.

Shape letters: B batch, T sequence, D model dim, F hidden dim of the feed-forward.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class RMSNorm(nn.Module):
    """Root-mean-square layer norm (Zhang & Sennrich, 2019), computed in fp32 whatever the input.

    DeepSeek-V3 keeps norms in high precision (technical report §3.3.1); the cast back to the
    input dtype happens after the learned scale.
    """

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return (x32 * self.weight.float()).to(x.dtype)


class SwiGLU(nn.Module):
    """The gated feed-forward w2(silu(w1 x) * w3 x) of Shazeer (2020), used by Llama and DeepSeek.

    `w2` is the residual output projection: `Transformer` scales its init by depth.
    """

    def __init__(self, dim: int, hidden_dim: int):
        super().__init__()
        self.w1 = nn.Linear(dim, hidden_dim, bias=False)  # gate
        self.w3 = nn.Linear(dim, hidden_dim, bias=False)  # up
        self.w2 = nn.Linear(hidden_dim, dim, bias=False)  # down (residual projection)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, T, D) -> (B, T, D)
        return self.w2(F.silu(self.w1(x)) * self.w3(x))

    def residual_projections(self) -> list[torch.Tensor]:
        """The weights that write into the residual stream (their init is scaled by depth)."""
        return [self.w2.weight]
