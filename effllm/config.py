"""The configuration of a training run: TrainConfig, OptimConfig and the learning-rate schedule.

Recipes are TrainConfig instances; the CLI builds one from a recipe and the command line. Every
check here runs before anything is allocated. A resumed run takes its own configuration from its
latest checkpoint (`saved_config`), and `resumed_config` says what a resume may change.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Literal

from effllm import checkpoint as ckpt_io
from effllm.docfields import documented
from effllm.errors import CheckpointError, ConfigError
from effllm.model import ModelConfig


@documented
@dataclass
class OptimConfig:
    """AdamW and its learning-rate schedule."""

    lr: float = 3e-3  # peak learning rate
    min_lr_ratio: float = 0.1  # the schedule ends at lr * min_lr_ratio
    schedule: Literal["cosine", "wsd"] = "cosine"  # warmup+cosine, or warmup-stable-decay
    warmup_steps: int = 100  # linear warmup from 0 to lr
    schedule_steps: int | None = None  # steps the schedule spans (None = max_steps); past it the lr stays at its final value
    decay_fraction: float = 0.2  # wsd only: share of max_steps spent in the final linear decay
    weight_decay: float = 0.1  # decoupled weight decay on matrices and embeddings (not norms)
    beta1: float = 0.9  # AdamW first-moment decay
    beta2: float = 0.95  # AdamW second-moment decay
    eps: float = 1e-8  # AdamW epsilon
    grad_clip: float = 1.0  # clip the global grad norm to this; 0 = no clipping

    def __post_init__(self) -> None:
        checks = [  # (holds, what, how to fix)
            (math.isfinite(self.lr) and self.lr > 0, f"optim.lr={self.lr}", "a positive learning rate, e.g. 3e-4"),
            (0 <= self.min_lr_ratio <= 1, f"optim.min_lr_ratio={self.min_lr_ratio}",
             "a share of the peak lr in [0, 1] (0.1 ends at lr/10)"),
            (0 <= self.beta1 < 1, f"optim.beta1={self.beta1}", "a decay in [0, 1), e.g. 0.9"),
            (0 <= self.beta2 < 1, f"optim.beta2={self.beta2}", "a decay in [0, 1), e.g. 0.95"),
            (self.eps > 0, f"optim.eps={self.eps}", "a small positive epsilon, e.g. 1e-8"),
            (self.weight_decay >= 0, f"optim.weight_decay={self.weight_decay}", "0 (off) or a positive decay, e.g. 0.1"),
            (self.grad_clip >= 0, f"optim.grad_clip={self.grad_clip}", "0 (no clipping) or a positive norm, e.g. 1.0"),
            (self.warmup_steps >= 0, f"optim.warmup_steps={self.warmup_steps}", "0 or more steps"),
            (0 < self.decay_fraction <= 1, f"optim.decay_fraction={self.decay_fraction}", "a share in (0, 1]"),
            (self.schedule_steps is None or self.schedule_steps > 0, f"optim.schedule_steps={self.schedule_steps}",
             "a positive number of steps, or None for max_steps"),
        ]
        for holds, what, fix in checks:
            if not holds:
                raise ConfigError(f"{what} cannot work — use {fix}")


@documented
@dataclass
class TrainConfig:
    """Everything one training run needs; recipes are instances of it."""

    model: ModelConfig = field(default_factory=ModelConfig)  # the model to train
    optim: OptimConfig = field(default_factory=OptimConfig)  # optimizer and schedule
    data_dir: str = "data/stdlib"  # a directory written by `effllm prepare`
    data_mix: tuple[float, ...] = ()  # per-source sampling weights (the manifest's source order); () = the data's own
    data_mix_per: Literal["tokens", "documents"] = "tokens"  # data_mix weights are shares of tokens, or of documents
    out_dir: str = "runs/default"  # metrics.jsonl, summary.json and checkpoints/ go here
    batch_size: int = 16  # sequences per micro-batch
    seq_len: int = 256  # tokens per sequence (at most model.max_seq_len)
    grad_accum: int = 1  # micro-batches per optimizer step
    max_steps: int = 1000  # optimizer steps of the whole run
    precision: Literal["auto", "fp32", "bf16"] = "auto"  # auto = bf16 autocast on CUDA, fp32 on CPU
    device: str = "auto"  # auto = cuda if available, else cpu
    compile: bool = False  # wrap the model in torch.compile (under torchrun: each block, before FSDP/DDP)
    goldfish_k: int = 0  # Goldfish loss: drop 1/k of target positions (chosen by a hash of context) from the loss; 0 = off
    goldfish_h: int = 13  # Goldfish loss: tokens of context the hash reads (Hans et al. 2024 use 13)
    activation_checkpointing: bool = False  # recompute each block in the backward pass: less memory, ~1/3 more compute
    data_parallel: Literal["fsdp", "ddp"] = "fsdp"  # under torchrun: FSDP2 (sharded) or DDP (replicated)
    checkpoint_format: Literal["auto", "full", "sharded"] = "auto"  # full (rank 0 gathers) or sharded (FSDP2 ranks); auto: 1B+
    dist_timeout_s: float = 300.0  # under torchrun: a collective waiting this long (a rank died) fails the job
    expert_parallel: int = 1  # under torchrun: ranks that split each MoE layer's routed experts (1 = off)
    fp8: bool = False  # run attention / FFN linears in FP8 with block scaling (effllm.fp8.convert_to_fp8)
    fp8_recipe: Literal["blockwise", "rowwise", "tensorwise"] = "blockwise"  # --fp8 scaling: DeepSeek-V3 blocks, rows, tensors
    seed: int = 1337  # seeds the init and the data order
    log_interval: int = 10  # steps between metrics lines
    eval_interval: int = 200  # steps between validation losses (and at the end)
    eval_tokens: int = 65536  # validation tokens per evaluation (the same windows every time)
    ckpt_interval: int = 500  # steps between checkpoints (and at the end); 0 = only at the end
    keep_checkpoints: int = 2  # newest checkpoints kept on disk
    resume: bool = False  # continue from the latest checkpoint in out_dir
    init_from: str | None = None  # a new run starts from this checkpoint's weights (e.g. `effllm import-hf`'s), fresh optimizer
    progress: bool = True  # show a progress bar
    tensorboard: bool = False  # also write the metrics as TensorBoard events in out_dir/tensorboard (effllm[tensorboard])
    memory_check: bool = True  # refuse, before allocating, a run whose memory estimate exceeds the device's free memory

    def __post_init__(self) -> None:
        for name in ("batch_size", "seq_len", "grad_accum", "max_steps", "log_interval", "eval_interval",
                     "eval_tokens", "keep_checkpoints"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"{name} must be positive, got {getattr(self, name)}")
        if self.seq_len > self.model.max_seq_len:
            raise ConfigError(f"seq_len={self.seq_len} exceeds model.max_seq_len={self.model.max_seq_len}: "
                              "lower --seq-len or raise --model.max-seq-len")
        if self.goldfish_k < 0 or self.goldfish_k == 1 or self.goldfish_h < 1:
            raise ConfigError(f"goldfish_k must be 0 (off) or >= 2 and goldfish_h >= 1, got {self.goldfish_k}, "
                              f"{self.goldfish_h}: goldfish_k=1 would drop every token")
        if self.ckpt_interval < 0:
            raise ConfigError(f"ckpt_interval={self.ckpt_interval} cannot work — use a positive number of steps, or 0 "
                              "for a checkpoint at the end only")
        if not self.dist_timeout_s > 0:
            raise ConfigError(f"dist_timeout_s={self.dist_timeout_s} cannot work — use a positive number of seconds")

    def warnings(self) -> list[str]:
        """Settings that work but are likely mistakes: the trainer prints each before it starts."""
        out = []
        horizon = schedule_steps(self)
        if self.optim.warmup_steps >= horizon:
            out.append(f"optim.warmup_steps={self.optim.warmup_steps} spans the whole {horizon}-step schedule: the run "
                       f"never leaves warmup and never reaches its peak lr {self.optim.lr:g} — lower "
                       "--optim.warmup-steps (e.g. to a tenth of --max-steps)")
        return out

    @classmethod
    def from_dict(cls, d: dict) -> "TrainConfig":
        """Inverse of asdict (config.json, and the config every checkpoint stores). A config written
        before `optim.schedule_steps` existed had a schedule spanning its max_steps."""
        d = dict(d)
        optim = dict(d.pop("optim", {}))
        optim.setdefault("schedule_steps", d.get("max_steps"))
        known = {f.name for f in fields(OptimConfig)}
        top = {f.name for f in fields(cls)} - {"model", "optim"}
        return cls(model=ModelConfig.from_dict(d.pop("model")), optim=OptimConfig(**{k: v for k, v in optim.items()
                                                                                     if k in known}),
                   **{k: v for k, v in d.items() if k in top})

    @property
    def tokens_per_step(self) -> int:
        return self.batch_size * self.seq_len * self.grad_accum


def schedule_steps(cfg: TrainConfig) -> int:
    """The number of steps the lr schedule spans: optim.schedule_steps, or max_steps."""
    return cfg.optim.schedule_steps or cfg.max_steps


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Learning rate of optimizer step `step` (0-based): linear warmup, then cosine or
    warmup-stable-decay (Hu et al., MiniCPM 2024) down to lr * min_lr_ratio at the last step of the
    schedule (`schedule_steps`); steps past it keep that final lr."""
    o = cfg.optim
    peak, floor, horizon = o.lr, o.lr * o.min_lr_ratio, schedule_steps(cfg)
    step = min(step, horizon - 1)  # past the schedule: the lr of its last step
    if step < o.warmup_steps:
        return peak * (step + 1) / o.warmup_steps
    if o.schedule == "cosine":
        span = max(1, horizon - 1 - o.warmup_steps)  # the last step lands on the floor
        progress = min(1.0, (step - o.warmup_steps) / span)
        return floor + (peak - floor) * 0.5 * (1 + math.cos(math.pi * progress))
    decay_start = horizon - max(1, round(o.decay_fraction * horizon))
    if step < decay_start:
        return peak
    progress = min(1.0, (step - decay_start) / max(1, horizon - 1 - decay_start))
    return peak + (floor - peak) * progress


def saved_config(out_dir: str | Path) -> TrainConfig:
    """The configuration of the run in `out_dir`, as its latest checkpoint recorded it: what `--resume`
    continues (the command line changes only what it names). Library users resume with
    `train(replace(saved_config(d), max_steps=..., resume=True))`."""
    latest = ckpt_io.latest_checkpoint(Path(out_dir) / "checkpoints")
    if latest is None:
        raise CheckpointError(f"--resume given but {Path(out_dir) / 'checkpoints'} holds no checkpoint: drop --resume "
                              "to start afresh")
    return TrainConfig.from_dict(ckpt_io.read_state(latest)["config"])


def config_changes(before: dict, after: dict, prefix: str = "") -> dict[str, tuple]:
    """{dotted field: (before, after)} for every field that differs between two config dicts."""
    out = {}
    for key in sorted(before.keys() | after.keys()):
        a, b = before.get(key), after.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            out.update(config_changes(a, b, f"{prefix}{key}."))
        elif a != b:
            out[f"{prefix}{key}"] = (a, b)
    return out


def resumed_config(cfg: TrainConfig, saved: TrainConfig, step: int) -> tuple[TrainConfig, dict[str, tuple]]:
    """The configuration a resume at `step` runs with, and what it changes against the run's own.

    The model must compute the same function with the same weights (`ModelConfig.resume_changes`
    names the fields that may differ; checked by the caller). The lr schedule keeps its span: with
    `optim.schedule_steps` None the run's own, so a larger max_steps runs the steps past the span at
    the schedule's final lr. A new span is taken only when asked for (`optim.schedule_steps`) and
    only when every step before `step` keeps its learning rate, as in warmup-stable-decay's stable
    phase; a cosine schedule cannot be stretched once it has started to decay."""
    saved_horizon = schedule_steps(saved)
    horizon = cfg.optim.schedule_steps or saved_horizon
    new = replace(cfg, optim=replace(cfg.optim, schedule_steps=horizon))
    stretched = replace(saved, optim=replace(saved.optim, schedule_steps=horizon))  # the run's schedule, new span
    moved = [s for s in range(step) if lr_at(s, stretched) != lr_at(s, saved)] if horizon != saved_horizon else []
    if moved:
        s = moved[0]
        raise ConfigError(
            f"optim.schedule_steps={horizon} would change the learning rate of steps this run already took (step "
            f"{s + 1}: {lr_at(s, saved):.3g} -> {lr_at(s, stretched):.3g}): the run's {saved.optim.schedule} schedule of "
            f"{saved_horizon} steps cannot be stretched at step {step}. Leave --optim.schedule-steps out (steps past "
            f"{saved_horizon} then run at the final lr), or start a new run from these weights")
    changes = config_changes(asdict(saved), asdict(new))
    changes.pop("resume", None)
    return new, changes


SHARDED_FROM_PARAMS = 1_000_000_000  # checkpoint_format "auto": FSDP2 runs this large save sharded checkpoints


def checkpoint_format(cfg: TrainConfig, world_size: int, params: int) -> str:
    """"full" or "sharded": what the run's checkpoints are written as. Full checkpoints (the whole
    state gathered on rank 0, model.safetensors + optimizer.pt) serve one process and small runs: one
    plain file set any tool reads. Sharded ones (torch.distributed.checkpoint) serve large FSDP2 runs,
    where gathering the full state on one rank costs its memory and time; "auto" takes them from
    SHARDED_FROM_PARAMS parameters on under FSDP2."""
    if cfg.checkpoint_format != "auto":
        return cfg.checkpoint_format
    sharded = world_size > 1 and cfg.data_parallel == "fsdp" and cfg.expert_parallel == 1
    return "sharded" if sharded and params >= SHARDED_FROM_PARAMS else "full"


def check_parallel(cfg: TrainConfig, world_size: int) -> None:
    """Fail, before anything is allocated, on a parallel layout that cannot work."""
    if cfg.checkpoint_format == "sharded" and (world_size == 1 or cfg.data_parallel != "fsdp"):
        raise ConfigError("checkpoint_format=sharded writes FSDP2's shards, one file set per rank: it needs torchrun "
                          "with --data-parallel fsdp; on one process (or DDP) use --checkpoint-format full (or auto)")
    if cfg.checkpoint_format == "sharded" and cfg.expert_parallel > 1:
        raise ConfigError("checkpoint_format=sharded with expert_parallel > 1: expert-parallel slices are not DTensors "
                          "that torch.distributed.checkpoint can reshard; use --checkpoint-format full (or auto)")
    ep = cfg.expert_parallel
    if ep < 1:
        raise ConfigError(f"expert_parallel must be >= 1, got {ep}")
    if ep == 1:
        return
    if world_size == 1:
        raise ConfigError(f"expert_parallel={ep} needs {ep} or more ranks: launch with "
                          f"torchrun --nproc_per_node={ep} -m effllm train ...")
    if world_size % ep:
        raise ConfigError(f"expert_parallel={ep} does not divide the {world_size} ranks: pick a divisor of the world size")
    if cfg.model.ffn != "moe" or cfg.model.first_k_dense >= cfg.model.n_layers:
        raise ConfigError("expert_parallel > 1 needs MoE layers (model.ffn=moe): this model has none to split")
    if cfg.model.moe.n_routed_experts % ep:
        raise ConfigError(f"{cfg.model.moe.n_routed_experts} routed experts cannot be split evenly over "
                          f"expert_parallel={ep} ranks: pick a divisor of the expert count")
    if cfg.data_parallel != "fsdp":
        raise ConfigError("expert parallelism runs with data_parallel=fsdp: pass --data-parallel fsdp")
