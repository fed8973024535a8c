"""The Transformer: token embedding, blocks of (attention, feed-forward), final norm, output head.

The model only assembles layers chosen by `ModelConfig`; the layers live in their own files.
Shape letters: B batch, T sequence, D model dim, V vocabulary.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import asdict, dataclass, field, replace
from typing import Literal, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from effllm.attention import Attention, RotaryEmbedding
from effllm.docfields import documented
from effllm.errors import ConfigError
from effllm.layers import RMSNorm, SwiGLU
from effllm.mla import MLA, MLAConfig
from effllm.moe import MoE, MoEConfig
from effllm.mtp import MTPModule, speculative_generate


@documented
@dataclass
class ModelConfig:
    """Shape and layer choice of a `Transformer`. Checked on construction."""

    vocab_size: int = 256  # token ids lie in [0, vocab_size); at least the tokenizer's vocabulary
    dim: int = 256  # width D of the residual stream
    n_layers: int = 4  # number of transformer blocks
    n_heads: int = 4  # query heads; dim must be a multiple of n_heads
    n_kv_heads: int | None = None  # key/value heads; None = n_heads (MHA), fewer = GQA
    ffn_hidden_dim: int | None = None  # SwiGLU hidden width; None = 8/3·dim rounded up to ffn_multiple_of
    ffn_multiple_of: int = 64  # rounding of the default SwiGLU width (keeps GEMMs aligned)
    max_seq_len: int = 512  # longest sequence: RoPE tables and generation caches are this long
    rope_theta: float = 10000.0  # RoPE base frequency
    norm_eps: float = 1e-6  # RMSNorm epsilon
    tie_embeddings: bool = True  # share the token embedding with the output head
    attention: Literal["mha", "mla"] = "mha"  # attention kind: "mha" (MHA/GQA with RoPE) or "mla" (latent)
    mla: MLAConfig = field(default_factory=MLAConfig)  # the MLA layers' shape (attention="mla")
    ffn: Literal["dense", "moe"] = "dense"  # feed-forward kind: "dense" (SwiGLU) or "moe" (DeepSeekMoE)
    moe: MoEConfig = field(default_factory=MoEConfig)  # the MoE layers' shape and routing (ffn="moe")
    first_k_dense: int = 0  # with ffn="moe": the first k blocks keep a dense SwiGLU (DeepSeek: 1-3)
    init_std: float = 0.02  # std of the normal init; residual projections get init_std/sqrt(2·n_layers)
    mtp_depth: int = 0  # multi-token prediction modules D (DeepSeek-V3: 1); 0 = off
    mtp_lambda: float = 0.3  # weight of the mean MTP loss (V3: 0.3, later 0.1)

    def __post_init__(self) -> None:
        if self.mtp_depth < 0 or self.mtp_lambda < 0:
            raise ConfigError(f"model.mtp_depth and model.mtp_lambda must be >= 0, got {self.mtp_depth}, {self.mtp_lambda}")
        for name in ("vocab_size", "dim", "n_layers", "n_heads", "max_seq_len", "ffn_multiple_of"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"model.{name} must be positive, got {getattr(self, name)}")
        if not 0 <= self.first_k_dense <= self.n_layers:
            raise ConfigError(f"model.first_k_dense={self.first_k_dense} must lie in [0, n_layers={self.n_layers}]")
        if self.attention == "mla":
            # One setting: MLA's heads are the model's. An mla.n_heads given as well must agree, and
            # is then dropped, so a config says it once (older configs stored both).
            if self.mla.n_heads not in (None, self.n_heads):
                raise ConfigError(f"model.n_heads={self.n_heads} but model.mla.n_heads={self.mla.n_heads}: MLA takes "
                                  "the model's heads — leave mla.n_heads out (None)")
            if self.mla.n_heads is not None:
                self.mla = replace(self.mla, n_heads=None)
            return  # MLA's head sizes are its own (mla.*_head_dim); dim need not divide by heads
        if self.dim % self.n_heads:
            raise ConfigError(
                f"model.dim={self.dim} is not divisible by model.n_heads={self.n_heads}: "
                "pick n_heads that divides dim (head size = dim / n_heads)"
            )
        if self.head_dim % 2:
            raise ConfigError(f"head size dim/n_heads = {self.head_dim} is odd; RoPE needs an even head size")
        kv = self.kv_heads
        if kv <= 0 or self.n_heads % kv:
            raise ConfigError(
                f"model.n_heads={self.n_heads} is not a multiple of model.n_kv_heads={kv}: "
                "pick n_kv_heads that divides n_heads (n_kv_heads = n_heads is plain MHA)"
            )

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    @property
    def kv_heads(self) -> int:
        return self.n_heads if self.n_kv_heads is None else self.n_kv_heads

    @property
    def hidden_dim(self) -> int:
        if self.ffn_hidden_dim is not None:
            return self.ffn_hidden_dim
        m = self.ffn_multiple_of
        return m * math.ceil(8 * self.dim / 3 / m)

    def to_dict(self) -> dict:
        return asdict(self)

    # Fields that may change when a run resumes: they change neither a weight's shape nor the function
    # the weights compute (kernel backends, the decode path, loss weights, the balancing rate, how
    # far the RoPE tables reach).
    RESUME_MAY_CHANGE = ("max_seq_len", "mtp_lambda", "moe.grouped_gemm", "moe.bias_update_rate",
                         "moe.seq_aux_loss_weight", "mla.decode")

    def resume_changes(self, other: "ModelConfig") -> dict[str, tuple]:
        """{field: (self's value, other's)} for what a checkpoint of this config cannot resume with:
        every difference but RESUME_MAY_CHANGE, the MoE and MLA fields counted only where the model
        uses them, and norm_topk_prob by what it does (None and the score function's default agree)."""
        def flat(cfg: ModelConfig) -> dict:
            d = {k: v for k, v in asdict(cfg).items() if k not in ("moe", "mla")}
            if cfg.ffn == "moe":
                d |= {f"moe.{k}": v for k, v in asdict(cfg.moe).items()}
                d["moe.norm_topk_prob"] = cfg.moe.renormalize
            if cfg.attention == "mla":
                d |= {f"mla.{k}": v for k, v in asdict(cfg.mla).items()}
            return d

        a, b = flat(self), flat(other)
        return {k: (a.get(k), b.get(k)) for k in sorted(a.keys() | b.keys())
                if a.get(k) != b.get(k) and k not in self.RESUME_MAY_CHANGE}

    @classmethod
    def from_dict(cls, d: dict) -> "ModelConfig":
        """Inverse of to_dict (checkpoints store the config as JSON)."""
        return cls(**{**d, "moe": MoEConfig(**d.get("moe", {})), "mla": MLAConfig(**d.get("mla", {}))})

    def rotary(self) -> RotaryEmbedding:
        """The RoPE tables the attention kind needs (MLA: its rotary dims, with YaRN)."""
        if self.attention == "mla":
            return self.mla.rotary(self.max_seq_len)
        return RotaryEmbedding(self.head_dim, self.max_seq_len, self.rope_theta)

    @property
    def mla_layer(self) -> MLAConfig:
        """The MLAConfig each MLA layer is built with: `mla` with the model's heads."""
        return replace(self.mla, n_heads=self.n_heads)

    def is_moe_layer(self, layer: int) -> bool:
        return self.ffn == "moe" and layer >= self.first_k_dense


def build_attention(cfg: ModelConfig, layer: int) -> nn.Module:
    """The attention module of block `layer`, of the kind `cfg.attention` names."""
    if cfg.attention == "mha":
        return Attention(cfg.dim, cfg.n_heads, cfg.kv_heads, cfg.head_dim)
    if cfg.attention == "mla":
        return MLA(cfg.dim, cfg.mla_layer, cfg.max_seq_len)
    raise ConfigError(f"unknown attention kind {cfg.attention!r}; choose one of: 'mha', 'mla'")


def build_ffn(cfg: ModelConfig, layer: int) -> nn.Module:
    """The feed-forward module of block `layer`, of the kind `cfg.ffn` names."""
    if cfg.is_moe_layer(layer):
        return MoE(cfg.dim, cfg.moe, cfg.init_std)
    if cfg.ffn in ("dense", "moe"):
        return SwiGLU(cfg.dim, cfg.hidden_dim)
    raise ConfigError(f"unknown ffn kind {cfg.ffn!r}; choose one of: 'dense', 'moe'")


class Block(nn.Module):
    """Pre-norm residual block: x + attn(norm(x)), then x + ffn(norm(x)).

    `forward` returns the block's output and its feed-forward's balance loss (None unless an MoE
    layer computes one). With activation checkpointing on (`set_activation_checkpointing`),
    training forwards keep only the block's input and recompute the rest during the backward pass
    (torch.utils.checkpoint, non-reentrant); an MoE feed-forward recomputes inside its `replaying()`
    context, so it counts its expert load once.
    """

    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        self.attn_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.attn = build_attention(cfg, layer)
        self.ffn_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.ffn = build_ffn(cfg, layer)
        self.activation_checkpointing = False

    def set_activation_checkpointing(self, on: bool) -> None:
        """Recompute this block in the backward pass (less memory, about a third more compute)."""
        self.activation_checkpointing = on

    def forward(self, x: torch.Tensor, rope, cache=None, pos: int = 0) -> tuple[torch.Tensor, torch.Tensor | None]:
        if self.activation_checkpointing and cache is None and self.training and torch.is_grad_enabled():
            if torch.compiler.is_compiling():  # the compiled backward recomputes tensors only, no Python
                return checkpoint(self._forward, x, rope, use_reentrant=False)
            replaying = self.ffn.replaying if isinstance(self.ffn, MoE) else contextlib.nullcontext
            return checkpoint(self._forward, x, rope, use_reentrant=False,
                              context_fn=lambda: (contextlib.nullcontext(), replaying()))
        return self._forward(x, rope, cache, pos)

    def _forward(self, x: torch.Tensor, rope, cache=None, pos: int = 0) -> tuple[torch.Tensor, torch.Tensor | None]:
        x = x + self.attn(self.attn_norm(x), rope, cache, pos)
        if isinstance(self.ffn, MoE):
            y, aux = self.ffn(self.ffn_norm(x), return_aux=True)
            return x + y, aux
        return x + self.ffn(self.ffn_norm(x)), None


class ModelOutput(NamedTuple):
    """What `Transformer.forward(..., return_aux=True)` returns: the logits, the mean cross-entropy
    (None without targets), and the losses the trainer adds to it, from this forward alone."""

    logits: torch.Tensor  # (B, T, V)
    loss: torch.Tensor | None
    mtp_losses: tuple[torch.Tensor, ...] = ()  # cross-entropy of each MTP depth (training forwards with targets)
    moe_aux_loss: torch.Tensor | None = None  # sum of the MoE layers' sequence-wise balance losses, when on

    @property
    def mtp_loss(self) -> torch.Tensor | None:
        """Mean of the MTP depths' losses (None without MTP, or outside training)."""
        return sum(self.mtp_losses) / len(self.mtp_losses) if self.mtp_losses else None


class Transformer(nn.Module):
    """A decoder-only language model assembled from `ModelConfig`."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.rope = cfg.rotary()
        self.blocks = nn.ModuleList(Block(cfg, i) for i in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.head = nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        # MTP depth k uses the block of layer index n_layers + k - 1 (an MoE block when ffn="moe").
        self.mtp = nn.ModuleList(MTPModule(cfg.dim, Block(cfg, cfg.n_layers + k), cfg.norm_eps)
                                 for k in range(cfg.mtp_depth))
        if cfg.tie_embeddings:
            self.head.weight = self.tok_emb.weight
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Normal(0, init_std) for every matrix (linears, embeddings, routers, expert stacks), ones for
        norms; residual projections get std/sqrt(2·n_layers) so the residual stream's variance does
        not grow with depth (GPT-2)."""
        std = self.cfg.init_std
        for p in self.parameters():
            if p.dim() >= 2:
                nn.init.normal_(p, mean=0.0, std=std)
        for module in self.modules():
            if isinstance(module, RMSNorm):
                nn.init.ones_(module.weight)
        for module in self.modules():
            for weight in getattr(module, "residual_projections", list)():
                nn.init.normal_(weight, mean=0.0, std=std / math.sqrt(2 * self.cfg.n_layers))

    def forward(
        self,
        tokens: torch.Tensor,  # (B, T) int64
        targets: torch.Tensor | None = None,  # (B, T) int64; -1 = ignore
        caches: list | None = None,  # one per block, from new_caches()
        pos: int = 0,  # position of tokens[:, 0] (decoding with caches)
        return_aux: bool = False,  # return a ModelOutput, with the MTP and MoE balance losses
    ) -> tuple[torch.Tensor, torch.Tensor | None] | ModelOutput:
        """Logits (B, T, V) and, when targets are given, their mean cross-entropy; with `return_aux`,
        a ModelOutput that also holds the MTP losses (training forwards with targets) and the MoE
        balance loss, which the cross-entropy does not include."""
        x, embed, aux = self._trunk(tokens, caches, pos)
        logits = self.head(self.norm(x))  # (B, T, V)
        loss, mtp_losses = None, ()
        if targets is not None:
            loss = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), ignore_index=-1)
            if return_aux and caches is None and self.training:
                mtp_losses, mtp_aux = self._mtp_losses(x, embed, targets)
                aux += mtp_aux
        if not return_aux:
            return logits, loss
        return ModelOutput(logits, loss, mtp_losses, sum(aux) if aux else None)

    def hidden(self, tokens: torch.Tensor, caches: list | None = None, pos: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        """The last block's output (B, T, D), before the final norm, and the token embeddings."""
        x, embed, _ = self._trunk(tokens, caches, pos)
        return x, embed

    def _trunk(self, tokens: torch.Tensor, caches: list | None, pos: int):
        """hidden(), and the blocks' balance losses (a list of tensors, empty when none)."""
        T = tokens.shape[1]
        if pos + T > self.cfg.max_seq_len:
            raise ValueError(
                f"sequence reaches position {pos + T - 1} but model.max_seq_len={self.cfg.max_seq_len}: "
                "shorten the input or build the model with a larger max_seq_len"
            )
        rope = self.rope(pos, T)
        embed = self.tok_emb(tokens)  # (B, T, D)
        x, aux = embed, []
        for i, block in enumerate(self.blocks):
            x, a = block(x, rope, None if caches is None else caches[i], pos)
            if a is not None:
                aux.append(a)
        return x, embed, aux

    def _mtp_losses(self, hidden: torch.Tensor, embed: torch.Tensor, targets: torch.Tensor):
        """Cross-entropy of each MTP depth k (position i predicts targets[i+k], token i+k+1), and the
        balance losses of the MTP blocks."""
        losses, aux = [], []
        for k, module in enumerate(self.mtp, start=1):
            length = hidden.shape[1] - 1  # depth k sees one position fewer than depth k-1
            if length <= 0:
                break
            hidden, a = module(hidden[:, :length], embed[:, k:], self.rope(0, length))  # (B, T-k, D)
            if a is not None:
                aux.append(a)
            logits = self.head(module.out_norm(hidden))
            losses.append(F.cross_entropy(logits.float().flatten(0, 1), targets[:, k:].flatten(), ignore_index=-1))
        return tuple(losses), aux

    def moe_layers(self) -> dict[str, MoE]:
        """The MoE layers by module name (e.g. "blocks.1.ffn")."""
        return {name: m for name, m in self.named_modules() if isinstance(m, MoE)}

    def all_blocks(self) -> list[Block]:
        """Every transformer block: the main stack's, then each MTP module's."""
        return [*self.blocks, *(m.block for m in self.mtp)]

    def new_caches(self, batch: int, max_len: int | None = None) -> list:
        """One empty decoding cache per block, each as its attention kind defines it."""
        max_len = self.cfg.max_seq_len if max_len is None else max_len
        return [block.attn.new_cache(batch, max_len) for block in self.blocks]

    @torch.no_grad()
    def generate(
        self,
        tokens: torch.Tensor,  # (B, T0) prompt
        max_new_tokens: int,
        temperature: float = 1.0,  # 0 = greedy
        top_k: int | None = None,  # sample from the k most likely tokens only
        use_cache: bool = True,  # False recomputes the whole sequence each step (the reference)
        generator: torch.Generator | None = None,
        speculative: bool = False,  # greedy only: draft with the first MTP module, verify with the model
    ) -> torch.Tensor:
        """Extend `tokens` by `max_new_tokens` sampled tokens; returns (B, T0 + max_new_tokens).

        `speculative=True` gives exactly the greedy output, faster when drafts are accepted; see
        effllm.mtp.speculative_generate for the acceptance statistics."""
        if speculative:
            if temperature != 0:
                raise ValueError("speculative decoding reproduces greedy decoding: pass temperature=0")
            return speculative_generate(self, tokens, max_new_tokens)[0]
        total = tokens.shape[1] + max_new_tokens
        if total > self.cfg.max_seq_len:
            raise ValueError(
                f"prompt ({tokens.shape[1]} tokens) + max_new_tokens ({max_new_tokens}) = {total} exceeds "
                f"model.max_seq_len={self.cfg.max_seq_len}: shorten the prompt or ask for fewer tokens"
            )
        caches = self.new_caches(tokens.shape[0], total) if use_cache else None
        out, pos, step_in = tokens, 0, tokens
        for _ in range(max_new_tokens):
            logits, _ = self(step_in, caches=caches, pos=pos)
            nxt = sample_next(logits[:, -1, :].float(), temperature, top_k, generator)  # (B, 1)
            out = torch.cat((out, nxt), dim=1)
            if use_cache:
                pos, step_in = pos + step_in.shape[1], nxt
            else:
                step_in = out
        return out

    def param_counts(self) -> dict[str, int]:
        """Parameters, counted one way everywhere (the banner, summary.json, the card, the README):

        - total: the model that plain inference runs and the export holds, MTP modules left out;
        - active: what one token touches in it (total minus the unchosen experts, which layers
          report through `inactive_param_count()`);
        - mtp: the multi-token-prediction modules, trained alongside (and used for drafting);
        - embedding: the token embedding (shared with the head when tied).
        Shared tensors are counted once. All that trains: total + mtp.
        """
        every = sum(p.numel() for p in self.parameters())
        mtp = sum(p.numel() for p in self.mtp.parameters())
        inactive = sum(m.inactive_param_count() for m in self.modules() if hasattr(m, "inactive_param_count"))
        mtp_inactive = sum(m.inactive_param_count() for m in self.mtp.modules() if hasattr(m, "inactive_param_count"))
        total = every - mtp
        return {"total": total, "active": total - (inactive - mtp_inactive), "embedding": self.tok_emb.weight.numel(),
                "mtp": mtp}


def describe_params(counts: dict[str, int]) -> str:
    """`param_counts()` in words: "4.64M total, 1.77M active (+1.46M MTP, trained alongside)"."""
    return (f"{counts['total'] / 1e6:.2f}M total, {counts['active'] / 1e6:.2f}M active"
            + (f" (+{counts['mtp'] / 1e6:.2f}M MTP, trained alongside)" if counts.get("mtp") else ""))


def sample_next(
    logits: torch.Tensor, temperature: float, top_k: int | None, generator: torch.Generator | None
) -> torch.Tensor:
    """Next token (B, 1) from last-position logits (B, V): argmax at temperature 0, else sampled."""
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    if temperature == 0:
        return logits.argmax(dim=-1, keepdim=True)
    logits = logits / temperature
    if top_k is not None:
        kth = torch.topk(logits, min(top_k, logits.shape[-1])).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    return torch.multinomial(torch.softmax(logits, dim=-1), 1, generator=generator)
