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

    def forward(self, hidden: torch.Tensor, next_embed: torch.Tensor, rope, cache=None,
                pos: int = 0) -> tuple[torch.Tensor, torch.Tensor | None]:
        """hidden (B, T, D) from the previous depth, next_embed (B, T, D) of tokens k ahead -> (B, T, D),
        and the block's balance loss (as Block returns them); with a cache (drafting), positions pos..
        attend to the cached ones before them."""
        x = self.proj(torch.cat((self.hidden_norm(hidden), self.embed_norm(next_embed)), dim=-1))
        return self.block(x, rope, cache, pos)


@torch.no_grad()
def speculative_generate(model, prompt: torch.Tensor, max_new_tokens: int) -> tuple[torch.Tensor, dict]:
    """Greedy decoding of `model` (a Transformer with mtp_depth >= 1), self-speculative: the first
    MTP module drafts the token after the next one, and one pass of the model over [next, draft]
    both verifies the draft and yields the token after it. The output equals greedy decoding.

    Module 1 at position i reads the model's hidden state at i and the embedding of token i+1; its
    cache must hold exactly the positions whose inputs are settled, so the pairs (hidden, token) of
    each verified position are queued and fed to it, in order, at the next draft.
    Batch size 1. Returns (tokens (1, T0 + max_new_tokens), {"drafted", "accepted", "acceptance"}).
    """
    if not len(model.mtp):
        raise ValueError("speculative decoding needs MTP modules: build the model with mtp_depth >= 1")
    if prompt.shape[0] != 1:
        raise ValueError(f"speculative decoding runs one sequence at a time, got a batch of {prompt.shape[0]}")
    total = prompt.shape[1] + max_new_tokens
    if total + 1 > model.cfg.max_seq_len:
        raise ValueError(f"prompt + max_new_tokens + 1 draft = {total + 1} exceeds model.max_seq_len="
                         f"{model.cfg.max_seq_len}: shorten the prompt or ask for fewer tokens")
    module = model.mtp[0]
    caches = model.new_caches(1, total + 1)
    draft_cache = module.block.attn.new_cache(1, total + 1)

    hidden, _ = model.hidden(prompt, caches, 0)  # (1, P, D)
    nxt = model.head(model.norm(hidden[:, -1:])).argmax(-1)  # (1, 1): greedy token at position P
    out = [prompt, nxt]
    # module 1 inputs not yet in its cache: hidden at positions filled.., tokens one further
    queue_h, queue_tok = [hidden], [torch.cat((prompt[:, 1:], nxt), dim=1)]
    filled, pos = 0, prompt.shape[1]  # pos: position of `nxt`, the newest settled token
    drafted = accepted = 0
    while 1 + drafted + accepted < max_new_tokens:  # tokens so far: nxt, then 1 per draft + 1 per accepted
        h_in, tok_in = torch.cat(queue_h, dim=1), torch.cat(queue_tok, dim=1)
        z, _ = module(h_in, model.tok_emb(tok_in), model.rope(filled, h_in.shape[1]), draft_cache, filled)
        draft = model.head(module.out_norm(z[:, -1:])).argmax(-1)  # (1, 1): guess for position pos + 1
        filled += h_in.shape[1]
        drafted += 1
        hidden, _ = model.hidden(torch.cat((nxt, draft), dim=1), caches, pos)  # positions pos, pos + 1
        predicted = model.head(model.norm(hidden)).argmax(-1)  # (1, 2): the model's tokens for pos+1, pos+2
        if torch.equal(predicted[:, :1], draft):
            accepted += 1
            out += [draft, predicted[:, 1:]]
            queue_h, queue_tok = [hidden], [torch.cat((draft, predicted[:, 1:]), dim=1)]
            nxt, pos = predicted[:, 1:], pos + 2
        else:  # the cache entry at pos + 1 holds the rejected draft; the next pass overwrites it
            out.append(predicted[:, :1])
            queue_h, queue_tok = [hidden[:, :1]], [predicted[:, :1]]
            nxt, pos = predicted[:, :1], pos + 1
    tokens = torch.cat(out, dim=1)[:, :total]
    return tokens, {"drafted": drafted, "accepted": accepted, "acceptance": accepted / max(1, drafted)}
