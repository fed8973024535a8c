"""DeepSeekMoE: fine-grained routed experts plus always-on shared experts, dropless dispatch.

Shape legend: T tokens (batch x sequence, flattened), D model dim, E routed experts, K experts per
token, F hidden dim of one expert, G expert groups, M = T*K token-expert pairs.

Routing follows DeepSeek-V3 (technical report §2.1.2) and, case by case, the `Gate` of DeepSeek's
official inference code (DeepSeek-V3 `inference/model.py`): sigmoid (or V2's softmax) affinities;
the top-K experts are chosen on affinity + a per-expert bias, optionally within each token's best
`topk_group` of `n_group` expert groups; the gate weights are the *unbiased* affinities of the
chosen experts, scaled by `route_scale`. As in that Gate, sigmoid gates are renormalised to sum to
1 and softmax gates are not (`norm_topk_prob` overrides), and a group scores by the sum of its top-2
biased affinities when the router uses a bias, by its best affinity when it does not. The bias is a
buffer that the optimizer never sees: after each optimizer step it moves by `bias_update_rate`
towards balance (auxiliary-loss-free load balancing). An optional sequence-wise balance loss
(eq. 17-20) comes back from `MoE.forward(x, return_aux=True)` for the trainer to add.

Dispatch is dropless: the M (token, expert) pairs are sorted by expert and every expert runs as
one group of a grouped GEMM (kernels/grouped_gemm.py); each token then sums its K weighted
outputs in fp32 (kernels/moe_combine.py: a Triton kernel on CUDA, PyTorch ops elsewhere).

The layer knows nothing of FP8 or of process groups: `effllm.fp8.convert_to_fp8` swaps
`RoutedExperts` for its FP8 subclass, and `effllm.parallelize.shard_experts` installs expert
parallelism around the experts (both keep the experts' forward signature and parameter names).
"""

from __future__ import annotations

import contextlib
import warnings
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from effllm.docfields import documented
from effllm.errors import ConfigError
from effllm.kernels.backends import combine_backend, grouped_gemm_backend
from effllm.kernels.fp8_grouped import sum_by_source
from effllm.kernels.grouped_gemm import grouped_mm
from effllm.kernels.moe_combine import combine
from effllm.layers import SwiGLU


@documented
@dataclass
class MoEConfig:
    """Shape and routing of a `MoE` layer. Checked on construction."""

    n_routed_experts: int = 8  # E fine-grained routed experts
    n_shared_experts: int = 1  # always-on experts (run as one SwiGLU of n_shared·expert_dim)
    top_k: int = 2  # K routed experts per token
    expert_dim: int = 256  # hidden width F of each expert
    score_func: Literal["sigmoid", "softmax"] = "sigmoid"  # affinities: sigmoid (V3) or softmax (V2)
    route_scale: float = 1.0  # gate weights are multiplied by this (V3's routed_scaling_factor)
    norm_topk_prob: bool | None = None  # renormalise the chosen gates to sum to 1; None = DeepSeek's: sigmoid yes, softmax no
    n_group: int = 1  # expert groups for group-limited routing (1 = off)
    topk_group: int = 1  # groups each token may route into
    bias_update_rate: float = 1e-3  # aux-loss-free balancing step u (V3: 1e-3); 0 = bias frozen
    seq_aux_loss_weight: float = 0.0  # sequence-wise balance loss weight alpha (V3: 1e-4); 0 = off
    grouped_gemm: Literal["auto", "torch", "triton", "loop"] = "auto"  # expert GEMM backend

    def __post_init__(self) -> None:
        for name in ("n_routed_experts", "top_k", "expert_dim", "n_group", "topk_group"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"moe.{name} must be positive, got {getattr(self, name)}")
        if self.n_shared_experts < 0 or self.bias_update_rate < 0 or self.seq_aux_loss_weight < 0:
            raise ConfigError("moe.n_shared_experts, moe.bias_update_rate and moe.seq_aux_loss_weight must be >= 0")
        E, G = self.n_routed_experts, self.n_group
        if self.top_k > E:
            raise ConfigError(f"moe.top_k={self.top_k} exceeds moe.n_routed_experts={E}: "
                              "a token cannot pick more experts than exist")
        if E % G:
            raise ConfigError(f"moe.n_routed_experts={E} is not divisible by moe.n_group={G}: "
                              "groups must hold equal numbers of experts")
        if self.topk_group > G:
            raise ConfigError(f"moe.topk_group={self.topk_group} exceeds moe.n_group={G}: "
                              "a token cannot keep more groups than exist")
        if self.top_k > self.topk_group * (E // G):
            raise ConfigError(f"moe.top_k={self.top_k} exceeds the {self.topk_group * (E // G)} experts in the "
                              f"moe.topk_group={self.topk_group} groups a token keeps: raise topk_group")
        if G > 1 and self.bias_update_rate > 0 and E // G < 2:
            raise ConfigError("with a balancing bias a group's score is the sum of its top-2 experts (DeepSeek-V3's "
                              "Gate): each group needs at least 2 experts (lower moe.n_group, or set "
                              "moe.bias_update_rate=0 to score groups by their best expert)")

    @property
    def renormalize(self) -> bool:
        """Whether the chosen gates are renormalised: `norm_topk_prob`, or DeepSeek's Gate by default."""
        return self.score_func == "sigmoid" if self.norm_topk_prob is None else self.norm_topk_prob


class Router(nn.Module):
    """The gate: affinities, biased group-limited top-k selection, unbiased gate weights; fp32.

    Every combination of score function, bias and groups routes as DeepSeek's official `Gate`
    does. The router uses a bias when it can be nonzero: `bias_update_rate > 0`, or a bias that
    was trained before (a nonzero `expert_bias`, e.g. loaded from a checkpoint); that check runs
    on the device, so no forward waits for the GPU.
    """

    def __init__(self, dim: int, cfg: MoEConfig):
        super().__init__()
        self.cfg = cfg
        self.weight = nn.Parameter(torch.empty(cfg.n_routed_experts, dim))  # (E, D)
        # Balancing bias: a buffer, so checkpoints hold it and the optimizer never touches it.
        self.register_buffer("expert_bias", torch.zeros(cfg.n_routed_experts))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x (T, D) -> gate weights (T, K) fp32, expert ids (T, K), affinities (T, E) fp32."""
        cfg = self.cfg
        with torch.autocast(x.device.type, enabled=False):
            logits = F.linear(x.float(), self.weight.float())  # (T, E)
        scores = logits.sigmoid() if cfg.score_func == "sigmoid" else logits.softmax(dim=-1)
        choice = scores.detach() + self.expert_bias  # selection only: no gradient through top-k
        if cfg.n_group > 1:
            T, E, G = choice.shape[0], cfg.n_routed_experts, cfg.n_group
            grouped = choice.view(T, G, E // G)
            top2 = grouped.topk(min(2, E // G), dim=-1).values.sum(dim=-1)  # (T, G), when a bias is used
            if cfg.bias_update_rate > 0:
                group_scores = top2
            else:  # no bias (DeepSeek-V2's gate): the best affinity, unless a trained bias was loaded
                group_scores = torch.where(self.expert_bias.any(), top2, grouped.amax(dim=-1))
            kept = group_scores.topk(cfg.topk_group, dim=-1).indices
            dropped = torch.ones_like(group_scores, dtype=torch.bool).scatter_(1, kept, False)
            choice = choice.masked_fill(dropped.repeat_interleave(E // G, dim=1), float("-inf"))
        indices = choice.topk(cfg.top_k, dim=-1).indices  # (T, K)
        weights = scores.gather(1, indices)  # unbiased affinities of the chosen experts
        if cfg.renormalize:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        return weights * cfg.route_scale, indices, scores


class GatherRows(torch.autograd.Function):
    """x[index] (the dispatch gather), whose gradient sums each source row's copies in a fixed order,
    so that training repeats bit for bit: on a CPU an fp32 index_add (serial over the index),
    on CUDA a gather-sum per source row without atomics (kernels.fp8_grouped.sum_by_source).
    Autograd's own gradient of x[index], an accumulating index_put, summed in a different order on
    every run at 2 CPU threads (and took 4.6x the index_add's time: 27 against 5.9 ms for 12,288
    rows of 192 on 2 cores of an AMD EPYC)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(index)
        ctx.rows = x.shape[0]
        return x.index_select(0, index)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (index,) = ctx.saved_tensors
        grad = grad.contiguous()
        if grad.is_cuda:
            return sum_by_source(grad, index, ctx.rows, grad.dtype), None
        out = torch.zeros((ctx.rows, grad.shape[1]), dtype=torch.float32, device=grad.device)
        return out.index_add_(0, index, grad.float()).to(grad.dtype), None


def gather_rows(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """x[index] for a 2-D x, with a deterministic gradient (GatherRows)."""
    return GatherRows.apply(x, index)


class RoutedExperts(nn.Module):
    """E SwiGLU experts stored as stacked weights, run as grouped GEMMs over expert-sorted rows.

    `grouped_gemm` names the GEMM backend (kernels.backends.grouped_gemm_backend; "auto" picks per
    device and dtype at each forward). `weights` (w1, w3, w2) shares existing Parameters instead of
    allocating new ones (as the FP8 subclass does when it replaces these experts)."""

    def __init__(self, dim: int, hidden: int, n: int, grouped_gemm: str = "auto",
                 weights: tuple[nn.Parameter, nn.Parameter, nn.Parameter] | None = None):
        super().__init__()
        if weights is None:
            weights = (nn.Parameter(torch.empty(n, hidden, dim)), nn.Parameter(torch.empty(n, hidden, dim)),
                       nn.Parameter(torch.empty(n, dim, hidden)))
        # gate (E, F, D), up (E, F, D), down (E, D, F): the last is the residual projection
        self.w1, self.w3, self.w2 = weights
        self.grouped_gemm = grouped_gemm

    def keep_experts(self, first: int, count: int) -> None:
        """Keep only experts first .. first + count - 1, as new Parameters (expert parallelism's
        slice: run it before the optimizer is built)."""
        for name in ("w1", "w3", "w2"):
            full = getattr(self, name)
            setattr(self, name, nn.Parameter(full.detach()[first:first + count].clone(), requires_grad=full.requires_grad))

    def forward(self, x: torch.Tensor, offsets: torch.Tensor, src: torch.Tensor | None = None) -> torch.Tensor:
        """x (M, D) sorted by expert, offsets (E,) int32 cumulative ends -> (M, D). With `src` (M,),
        x is (R, D) in any order and sorted row i is x[src[i]]: the dispatch gather (which the FP8
        subclass fuses into its quantization)."""
        dtype = torch.get_autocast_dtype(x.device.type) if torch.is_autocast_enabled(x.device.type) else x.dtype
        backend = grouped_gemm_backend(x.device, dtype, self.grouped_gemm, tuple(self.w1.shape[1:]))
        x = (gather_rows(x, src) if src is not None else x).to(dtype)
        w1, w3, w2 = (w.to(dtype) for w in (self.w1, self.w3, self.w2))  # autocast's cast, by hand
        h = F.silu(grouped_mm(x, w1, offsets, backend)) * grouped_mm(x, w3, offsets, backend)  # (M, F)
        return grouped_mm(h, w2, offsets, backend)


class MoE(nn.Module):
    """A DeepSeekMoE feed-forward: shared experts + top-k of E fine-grained routed experts.

    `MoE(dim, MoEConfig(...))` maps (..., D) to (..., D) and drops in where a dense MLP was;
    `layer(x, return_aux=True)` also returns the sequence-wise balance loss (None when off or in
    eval): add it to the loss. After each forward, `last_load` holds tokens per expert.

    Balancing needs `update_bias()` after each optimizer step: `attach_balancing(model, optimizer)`
    does it for every MoE layer of a model, once; `load_stats` of the load it returns gives max/mean
    load and the coefficient of variation. A layer whose bias can move warns (once) when it has run
    `UNBALANCED_FORWARDS` training forwards with no update: its load then only grows, and nothing
    balances it. The count is kept in eager mode; inside torch.compile'd code it is not (a Python
    counter there would be a guard that recompiles at every step).
    """

    UNBALANCED_FORWARDS = 1000  # training forwards without update_bias() before the warning

    def __init__(self, dim: int, cfg: MoEConfig | None = None, init_std: float = 0.02):
        super().__init__()
        self.cfg = cfg = cfg or MoEConfig()
        self.dim = dim
        self.router = Router(dim, cfg)
        self.experts = RoutedExperts(dim, cfg.expert_dim, cfg.n_routed_experts, cfg.grouped_gemm)
        self.shared = SwiGLU(dim, cfg.n_shared_experts * cfg.expert_dim) if cfg.n_shared_experts else None
        self.register_buffer("last_load", torch.zeros(cfg.n_routed_experts), persistent=False)
        # Load summed over the forwards since the last update_bias(): the whole (accumulated) batch.
        self.register_buffer("step_load", torch.zeros(cfg.n_routed_experts), persistent=False)
        self._replaying = False  # inside replaying(): activation checkpointing recomputes this forward
        self._forwards_since_update = 0  # training forwards since the last update_bias() (eager mode only)
        with torch.no_grad():
            for p in self.parameters():
                nn.init.normal_(p, std=init_std)

    def residual_projections(self) -> list[torch.Tensor]:
        """The weights that write into the residual stream (their init is scaled by depth)."""
        return [self.experts.w2] + (self.shared.residual_projections() if self.shared else [])

    def inactive_param_count(self) -> int:
        """Parameters of the E-K routed experts a token does not use."""
        per_expert = 3 * self.dim * self.cfg.expert_dim
        return (self.cfg.n_routed_experts - self.cfg.top_k) * per_expert

    @contextlib.contextmanager
    def replaying(self):
        """The context of a recomputation of this layer's forward (activation checkpointing): the
        expert load is counted by the original forward only."""
        self._replaying = True
        try:
            yield
        finally:
            self._replaying = False

    def forward(self, x: torch.Tensor, return_aux: bool = False):
        """x (..., D) -> (..., D); with `return_aux`, (output, sequence-wise balance loss or None)."""
        shape, E, K = x.shape, self.cfg.n_routed_experts, self.cfg.top_k
        tokens = x.reshape(-1, self.dim)  # (T, D)
        weights, indices, scores = self.router(tokens)  # (T, K), (T, K), (T, E)

        flat = indices.flatten()  # (M,) expert of each pair, pairs in token-major order
        order = flat.argsort(stable=True)  # pairs sorted by expert
        # Each expert's end row among the sorted pairs, and its token count: shapes fixed by E (bincount's
        # depends on the largest id, which torch.compile cannot trace), exact, without atomics.
        ends = torch.searchsorted(flat[order], torch.arange(E, device=x.device), right=True)  # (E,)
        counts = torch.diff(ends, prepend=ends.new_zeros(1))  # (E,) tokens per expert
        offsets = ends.to(torch.int32)
        token_of = order // K  # (M,) source token of each sorted pair
        y = self.experts(tokens, offsets, src=token_of)  # (M, D), rows sorted by expert
        pos = torch.empty_like(order)
        pos[order] = torch.arange(order.numel(), device=x.device)  # sorted row of each (token, k) pair
        # Weighted sum of each token's K outputs in fp32, gathered in a fixed order (deterministic).
        out = combine(y, weights, pos.view(-1, K), x.dtype, use_triton=combine_backend(x.device))
        if self.shared is not None:
            out = out + self.shared(tokens)
        out = out.view(shape)

        if not self._replaying:  # activation checkpointing replays this forward: count everything once
            with torch.no_grad():
                self.last_load.copy_(counts)
                if self.training:
                    self.step_load += counts
            if self.training and self.cfg.bias_update_rate > 0 and not torch.compiler.is_compiling():
                self._count_unbalanced_forward()
        if not return_aux:
            return out
        aux = None
        if self.training and self.cfg.seq_aux_loss_weight > 0:
            seqs = shape[0] if x.dim() == 3 else 1
            aux = self.sequence_balance_loss(scores.view(seqs, -1, E), indices.view(seqs, -1, K))
        return out, aux

    def _count_unbalanced_forward(self) -> None:
        self._forwards_since_update += 1
        if self._forwards_since_update == self.UNBALANCED_FORWARDS:
            warnings.warn(
                f"MoE layer: {self.UNBALANCED_FORWARDS} training forwards without update_bias(), so its expert bias "
                "never moves and nothing balances the load (aux-loss-free balancing is off): call "
                "effllm.moe.attach_balancing(model, optimizer) once, or layer.update_bias() after each optimizer "
                "step; set bias_update_rate=0 if the bias is meant to stay frozen", RuntimeWarning, stacklevel=3)

    def sequence_balance_loss(self, scores: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
        """DeepSeek-V3 eq. 17-20 per sequence, averaged: alpha * sum_i f_i * P_i, with f_i the
        expert's share of the sequence's selections (x E/K) and P_i its mean normalised affinity."""
        B, S, E = scores.shape
        K = indices.shape[-1]
        chosen = torch.zeros(B, E, device=scores.device).scatter_add_(
            1, indices.reshape(B, -1), torch.ones(B, S * K, device=scores.device))
        f = chosen * E / (K * S)  # (B, E), no gradient
        p = (scores / scores.sum(dim=-1, keepdim=True)).mean(dim=1)  # (B, E)
        return self.cfg.seq_aux_loss_weight * (f * p).sum(dim=-1).mean()

    @torch.no_grad()
    def update_bias(self) -> torch.Tensor:
        """Aux-loss-free balancing after an optimizer step: b_i += u * sign(mean load - load_i), with
        the load summed over the step's forwards (and over ranks when distributed). Returns that
        load (E,) on the layer's device, for `load_stats`, and resets the count. Nothing here waits
        for the GPU: statistics are for the steps that are logged."""
        load = self.step_load.clone()
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.all_reduce(load)
        if self.cfg.bias_update_rate > 0:  # a step without tokens has sign(0 - 0) = 0: no change
            self.router.expert_bias += self.cfg.bias_update_rate * torch.sign(load.mean() - load)
        self.step_load.zero_()
        self._forwards_since_update = 0
        return load


class Balancing:
    """The balancing attached to an optimizer by `attach_balancing`: after each `optimizer.step()`
    every MoE layer's bias moves (`MoE.update_bias`). `loads` holds each layer's load of the last
    step, by module name (for `load_stats`); `remove()` detaches it."""

    def __init__(self, layers: dict[str, MoE], optimizer: torch.optim.Optimizer):
        self.layers = layers
        self.loads: dict[str, torch.Tensor] = {}
        self._handle = optimizer.register_step_post_hook(self._after_step)

    def _after_step(self, optimizer, args, kwargs) -> None:
        self.loads = {name: layer.update_bias() for name, layer in self.layers.items()}

    def remove(self) -> None:
        self._handle.remove()


def attach_balancing(module: nn.Module, optimizer: torch.optim.Optimizer) -> Balancing:
    """Aux-loss-free balancing in one call: after each `optimizer.step()`, every `MoE` layer in
    `module` (itself included) updates its bias from the load of the forwards since the last step,
    as DeepSeek-V3 does. For research code with its own loop; effllm's trainer calls
    `update_bias()` itself. Attach once per optimizer: a second attachment would move each bias
    twice a step."""
    layers = {name: m for name, m in module.named_modules() if isinstance(m, MoE)}
    if not layers:
        raise ValueError(f"attach_balancing: {type(module).__name__} holds no MoE layer, so there is nothing to "
                         "balance: pass the model (or layer) that contains the MoE layers")
    return Balancing(layers, optimizer)


def load_stats(load: torch.Tensor) -> dict[str, float]:
    """max/mean and coefficient of variation (std/mean) of per-expert token counts."""
    load = load.double()
    mean = load.mean()
    if mean == 0:
        return {"max_over_mean": 0.0, "cv": 0.0}
    return {"max_over_mean": (load.max() / mean).item(), "cv": (load.std(unbiased=False) / mean).item()}
