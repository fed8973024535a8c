"""Multi-token prediction (DeepSeek-V3 §2.2): D sequential modules predicting tokens t+2 .. t+D+1.

Module k (1-based) takes, at position i, the hidden state h_{k-1}[i] of the previous depth (the
main model's last hidden state for k = 1) and the embedding of token i+k, normalises both with
RMSNorm, projects their concatenation back to the model width, runs one transformer block of the
model's own attention / feed-forward kinds, and predicts token i+k+1 through the model's shared
output head (after a norm of its own). The embedding and head are the main model's, so MTP adds
only the projections, blocks and norms. Causality holds per depth: each sequence is k tokens
shorter, and position i sees tokens up to i+k only.

MTP modules are used for training (and self-speculative drafting); plain inference ignores them.
"""

from __future__ import annotations

import torch
from torch import nn

from effllm.layers import RMSNorm


class MTPModule(nn.Module):
    """One depth of multi-token prediction around `block` (a Block of the host model)."""

    def __init__(self, dim: int, block: nn.Module, norm_eps: float = 1e-6):
        super().__init__()
        self.hidden_norm = RMSNorm(dim, norm_eps)
        self.embed_norm = RMSNorm(dim, norm_eps)
        self.proj = nn.Linear(2 * dim, dim, bias=False)  # M_k in the report
        self.block = block
        self.out_norm = RMSNorm(dim, norm_eps)  # before the shared output head

    def forward(self, hidden: torch.Tensor, next_embed: torch.Tensor, rope) -> torch.Tensor:
        """hidden (B, T, D) from the previous depth, next_embed (B, T, D) of tokens k ahead -> (B, T, D)."""
        x = self.proj(torch.cat((self.hidden_norm(hidden), self.embed_norm(next_embed)), dim=-1))
        return self.block(x, rope)
