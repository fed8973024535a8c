"""TrainConfig and the training loop: the one place that knows about steps.

One optimizer step = `grad_accum` micro-batches of `batch_size` sequences of `seq_len` tokens.
Batches come from `TokenDataset.train_batch(seed, step, rank, micro)`, so the data a step sees
depends on nothing but its number: with the model, optimizer and RNG states restored from a
checkpoint, a resumed run repeats the uninterrupted run's losses exactly (on CPU, bit for bit).
"""

from __future__ import annotations

import functools
import json
import math
import resource
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Literal

import torch

from effllm import checkpoint as ckpt_io
from effllm.card import MANIFEST_COPY, card_text
from effllm.data import TokenDataset
from effllm.errors import CheckpointError, ConfigError, OutputError, TrainingDiverged, TrainingInterrupted
from effllm.flops import device_name, mfu, peak_bf16_flops, train_flops_per_token
from effllm.fp8 import convert_to_fp8
from effllm.fsutil import resolved
from effllm.goldfish import apply_goldfish
from effllm.model import ModelConfig, Transformer
from effllm.moe import load_stats
from effllm.parallelize import (
    build_mesh,
    clip_grad_norm_sharded,
    dist_env,
    gather_full_state,
    init_distributed,
    load_full_optimizer_state,
    shard_experts,
    wrap_data_parallel,
)


@dataclass
class OptimConfig:
    """AdamW and its learning-rate schedule."""

    lr: float = 3e-3  # peak learning rate
    min_lr_ratio: float = 0.1  # the schedule ends at lr * min_lr_ratio
    schedule: Literal["cosine", "wsd"] = "cosine"  # warmup+cosine, or warmup-stable-decay
    warmup_steps: int = 100  # linear warmup from 0 to lr
    schedule_steps: int | None = None  # steps the schedule spans (warmup, then decay); None = max_steps; past it the lr stays at its final value
    decay_fraction: float = 0.2  # wsd only: share of max_steps spent in the final linear decay
    weight_decay: float = 0.1  # decoupled weight decay on matrices and embeddings (not norms)
    beta1: float = 0.9  # AdamW first-moment decay
    beta2: float = 0.95  # AdamW second-moment decay
    eps: float = 1e-8  # AdamW epsilon
    grad_clip: float = 1.0  # clip the global grad norm to this; 0 = no clipping


@dataclass
class TrainConfig:
    """Everything one training run needs; recipes are instances of it."""

    model: ModelConfig = field(default_factory=ModelConfig)  # the model to train
    optim: OptimConfig = field(default_factory=OptimConfig)  # optimizer and schedule
    data_dir: str = "data/stdlib"  # a directory written by `effllm prepare`
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
    dist_timeout_s: float = 300.0  # under torchrun: a collective waiting this long (a rank died) fails the job
    expert_parallel: int = 1  # under torchrun: ranks that split each MoE layer's routed experts (1 = off)
    fp8: bool = False  # run attention / FFN linears in FP8 with block scaling (effllm.fp8.convert_to_fp8)
    seed: int = 1337  # seeds the init and the data order
    log_interval: int = 10  # steps between metrics lines
    eval_interval: int = 200  # steps between validation losses (and at the end)
    eval_tokens: int = 65536  # validation tokens per evaluation (the same windows every time)
    ckpt_interval: int = 500  # steps between checkpoints (and at the end); 0 = only at the end
    keep_checkpoints: int = 2  # newest checkpoints kept on disk
    resume: bool = False  # continue from the latest checkpoint in out_dir
    progress: bool = True  # show a progress bar

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
        if self.optim.warmup_steps < 0:
            raise ConfigError(f"optim.warmup_steps must be >= 0, got {self.optim.warmup_steps}")
        if not 0 < self.optim.decay_fraction <= 1:
            raise ConfigError(f"optim.decay_fraction must lie in (0, 1], got {self.optim.decay_fraction}")
        if self.optim.schedule_steps is not None and self.optim.schedule_steps <= 0:
            raise ConfigError(f"optim.schedule_steps must be positive (or None = max_steps), got {self.optim.schedule_steps}")

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


RUN_FILES = ("config.json", "metrics.jsonl", "summary.json", "MODEL_CARD.md", MANIFEST_COPY, "checkpoints")


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


def build_optimizer(model: torch.nn.Module, cfg: OptimConfig) -> torch.optim.AdamW:
    """AdamW with weight decay on tensors of 2+ dims (matrices, embeddings) only."""
    decay = [p for p in model.parameters() if p.requires_grad and p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.dim() < 2]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device={name!r} asked for but no CUDA GPU is visible: pass --device cpu")
    return device


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype, or None for plain fp32."""
    if precision == "bf16" or (precision == "auto" and device.type == "cuda"):
        return torch.bfloat16
    return None


def peak_memory_bytes(device: torch.device) -> int:
    """Peak CUDA memory allocated by tensors on a GPU; peak resident memory of the process on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


@torch.no_grad()
def evaluate(model, data: TokenDataset, cfg: TrainConfig, device, amp: torch.dtype | None) -> float:
    """Mean cross-entropy over the fixed validation windows."""
    model.eval()
    total, count = 0.0, 0
    for x, y in data.val_batches(cfg.batch_size, cfg.seq_len, cfg.eval_tokens):
        with torch.autocast(device.type, dtype=amp, enabled=amp is not None):
            _, loss = model(x.to(device), y.to(device))
        total += loss.item() * y.numel()
        count += y.numel()
    model.train()
    return total / count


def forward_backward(model: Transformer, step_fn, batch, grad_accum: int, mtp_lambda: float, device: torch.device,
                     amp: torch.dtype | None) -> dict[str, torch.Tensor]:
    """Forward and backward over `grad_accum` micro-batches (`batch(micro)` -> (x, y)); gradients
    accumulate in the parameters. The objective is cross-entropy + the MoE balance losses + mtp_lambda
    x the mean MTP loss. Returns the summed pure cross-entropy, balance and MTP losses as device
    tensors (no host sync)."""
    sums = {name: torch.zeros((), device=device) for name in ("loss", "aux", "mtp")}
    for micro in range(grad_accum):
        x, y = batch(micro)
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        with torch.autocast(device.type, dtype=amp, enabled=amp is not None):
            _, loss = step_fn(x, y)
        aux = model.moe_aux_loss()  # MoE balance losses; the logged loss stays pure cross-entropy
        mtp = model.mtp_loss()  # mean over MTP depths
        total = loss if aux is None else loss + aux
        if mtp is not None:
            total = total + mtp_lambda * mtp
            sums["mtp"] += mtp.detach()
        (total / grad_accum).backward()
        sums["loss"] += loss.detach()
        if aux is not None:
            sums["aux"] += aux.detach()
    return sums


def optimizer_update(model: Transformer, optimizer: torch.optim.Optimizer, grad_clip: float,
                     moe_layers: dict) -> tuple[torch.Tensor | None, dict]:
    """Clip, step, zero the gradients, then move each MoE layer's balancing bias (after the step, as
    in DeepSeek-V3). Returns the pre-clip grad norm (None without clipping) and each layer's load."""
    grad_norm = None
    if grad_clip > 0 and any(hasattr(p, "to_local") for p in model.parameters()):  # FSDP2: sharded grads
        grad_norm = clip_grad_norm_sharded(list(model.parameters()), grad_clip)
    elif grad_clip > 0:
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return grad_norm, {name: layer.update_bias() for name, layer in moe_layers.items()}


def check_parallel(cfg: TrainConfig, world_size: int) -> None:
    """Fail, before anything is allocated, on a parallel layout that cannot work."""
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


def rank_batch(data: TokenDataset, cfg: TrainConfig, step: int, rank: int, micro: int):
    """Micro-batch `micro` of `rank` at `step`: global micro-batch rank * grad_accum + micro. One
    process with grad_accum = W·A sees exactly the batches of W ranks with grad_accum = A. With
    Goldfish loss on, the dropped targets are set to -1 (ignored by the loss)."""
    x, y = data.train_batch(cfg.batch_size, cfg.seq_len, cfg.seed, step, 0, rank * cfg.grad_accum + micro)
    if cfg.goldfish_k:
        y = apply_goldfish(x, y, cfg.goldfish_k, cfg.goldfish_h)
    return x, y


def check_run_dir(out: Path) -> None:
    """Refuse a run directory that is a file, or that holds files a training run does not write:
    a run writes its config, metrics, summary, card, manifest copy and checkpoints there, and must
    never overwrite anything else."""
    if out.exists() and not out.is_dir():
        raise OutputError(f"--out-dir {out} is a file: choose a folder for the run")
    foreign = sorted(p.name for p in out.iterdir() if p.name not in RUN_FILES) if out.is_dir() else []
    if foreign:
        raise OutputError(f"--out-dir {out} holds files that effllm train does not write ({', '.join(foreign[:5])}"
                          + (" ..." if len(foreign) > 5 else "") + "): choose a new folder for the run")


def truncate_metrics(path: Path, last_step: int) -> None:
    """Drop metrics lines past `last_step` (written by a run that died after its last checkpoint)."""
    if not path.exists():
        return
    kept = [line for line in path.read_text().splitlines() if line and json.loads(line)["step"] <= last_step]
    path.write_text("".join(line + "\n" for line in kept))


def train(cfg: TrainConfig, model_hook: Callable[[Transformer], None] | None = None) -> dict:
    """Train `cfg.model` on `cfg.data_dir`; writes metrics, checkpoints and a summary into
    `cfg.out_dir` and returns the summary.

    `model_hook(model)`, if given, runs once the model is built (its weights loaded when resuming,
    converted to FP8 with cfg.fp8) and before any parallel wrapping or the optimizer: research
    code swaps or wraps modules there (a variant of a layer, gradient hooks) and trains the result
    with this trainer. It must keep the parameter names, so that checkpoints load."""
    # Every check that can fail runs before the model is allocated.
    data = TokenDataset(cfg.data_dir)
    if cfg.model.vocab_size < data.vocab_size:
        raise ConfigError(f"model.vocab_size={cfg.model.vocab_size} is smaller than the tokenizer's vocabulary "
                          f"({data.vocab_size}) of {cfg.data_dir}: pass --model.vocab-size {data.vocab_size}")
    data.check_seq_len(cfg.seq_len)
    env = dist_env()  # rank 0 of 1 unless launched by torchrun
    check_parallel(cfg, env.world_size)
    owns_group = env.enabled and not torch.distributed.is_initialized()
    device = init_distributed(env, cfg.device, cfg.dist_timeout_s)
    try:
        return _train(cfg, data, env, device, model_hook)
    finally:
        # A process group this call opened is closed here. gloo's worker threads can outlive this
        # (the groups are also held on the C++ side), and one that releases a finished work item
        # while the interpreter finalizes aborts the rank after a finished run: the `effllm`
        # command therefore ends torchrun ranks without finalization (parallelize.exit_rank).
        if owns_group and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


def _train(cfg: TrainConfig, data: TokenDataset, env, device: torch.device, model_hook=None) -> dict:
    amp = autocast_dtype(cfg.precision, device)
    out = Path(cfg.out_dir)
    ckpt_root = out / "checkpoints"
    resume_from = ckpt_io.latest_checkpoint(ckpt_root)
    if cfg.resume and resume_from is None:
        raise CheckpointError(f"--resume given but {ckpt_root} holds no checkpoint: drop --resume to start afresh")
    if not cfg.resume and resume_from is not None:
        raise CheckpointError(f"{out} already holds checkpoints: pass --resume to continue that run, "
                              "or choose another --out-dir")
    check_run_dir(out)
    state, changes = None, {}
    if cfg.resume:
        state = ckpt_io.read_state(resume_from)
        saved = TrainConfig.from_dict(state["config"])
        ckpt_io.check_model_config(resume_from, saved.model, cfg.model)
        if state["data_manifest_sha256"] != data.manifest_sha256:
            raise CheckpointError(f"{cfg.data_dir} is not the data {resume_from} was trained on (manifest sha256 "
                                  "differs): resume with the same data_dir, or start a new run")
        if state["step"] >= cfg.max_steps:
            raise ConfigError(f"checkpoint {resume_from} is at step {state['step']} already, max_steps={cfg.max_steps}: "
                              "raise --max-steps to train further")
        cfg, changes = resumed_config(cfg, saved, state["step"])
    else:  # the schedule's span is recorded, so that a resume with a larger max_steps keeps it
        cfg = replace(cfg, optim=replace(cfg.optim, schedule_steps=schedule_steps(cfg)))

    torch.manual_seed(cfg.seed)  # the same initial model on every rank
    model = Transformer(cfg.model).to(device)
    fp8_report = convert_to_fp8(model) if cfg.fp8 else None  # before the optimizer: same Parameters either way
    if fp8_report is not None and not fp8_report["converted"]:
        raise ConfigError(f"fp8=True but no linear of this model can run in FP8: block scaling needs in and out "
                          f"features that are multiples of 128 (model.dim={cfg.model.dim}). Widen the model "
                          "(e.g. the deepseek_tiny_fp8 recipe) or drop --fp8")
    start_step, elapsed_before, tokens_before = 0, 0.0, 0
    if state is not None:  # full weights, before any sharding: a checkpoint from any world size loads
        ckpt_io.load_weights(resume_from, model)
        start_step, elapsed_before, tokens_before = state["step"], state["elapsed_s"], state["tokens_seen"]
    if model_hook is not None:
        model_hook(model)
    counts = model.param_counts()  # of the whole model, before experts are split over ranks
    for block in [*model.blocks, *(m.block for m in model.mtp)]:  # first of the wrappers: AC, compile, FSDP
        block.activation_checkpointing = cfg.activation_checkpointing
    if env.enabled:
        mesh = build_mesh(env, device, cfg.expert_parallel)
        if mesh is not None:
            shard_experts(model, mesh["ep"].get_group())
        step_fn = wrap_data_parallel(model, cfg.data_parallel, device, cfg.compile, mesh)
    else:
        step_fn = torch.compile(model) if cfg.compile else model
    optimizer = build_optimizer(model, cfg.optim)  # after FSDP: over the sharded parameters
    sharded = env.enabled and cfg.data_parallel == "fsdp"
    if state is not None:
        ckpt_io.load_training_state(resume_from, optimizer, (lambda sd: load_full_optimizer_state(
            model, optimizer, sd)) if sharded else None)

    if env.is_main:
        out.mkdir(parents=True, exist_ok=True)
    metrics_path = out / "metrics.jsonl"
    if env.is_main and cfg.resume:
        truncate_metrics(metrics_path, start_step)
    elif env.is_main:
        metrics_path.write_text("")
    if env.is_main:
        (out / "config.json").write_text(json.dumps(asdict(cfg), indent=1) + "\n")
        # The data's provenance stays with the run: a byte-for-byte copy of the manifest (its sha256 is
        # in every checkpoint), in the run directory and in each checkpoint.
        shutil.copyfile(data.dir / "manifest.json", out / MANIFEST_COPY)
    tokens_per_step = cfg.tokens_per_step * env.world_size  # the global batch
    extra_files = {MANIFEST_COPY: out / MANIFEST_COPY}
    if data.tokenizer.kind == "bpe":
        extra_files["tokenizer.json"] = data.dir / "tokenizer.json"

    flops_per_token = train_flops_per_token(cfg.model, cfg.seq_len)
    dev_name = device_name(device)
    # MFU against the bf16 peak misleads for FP8 runs, so none is reported for them.
    peak = peak_bf16_flops(dev_name) if amp is torch.bfloat16 and not cfg.fp8 else None
    unigram = data.manifest["totals"]["unigram_val_loss"]
    moe_layers = model.moe_layers()

    def save(step: int, tokens_seen: int, elapsed: float, eval_s: float, val_loss: float | None) -> Path | None:
        model_state = optimizer_state = None
        if env.enabled:  # every rank takes part in gathering; rank 0 writes the single-device layout
            model_state, optimizer_state = gather_full_state(model, optimizer, cfg.model.tie_embeddings)
            if not env.is_main:
                torch.distributed.barrier()
                return None
        path = ckpt_io.save_checkpoint(
            ckpt_root, step, model, optimizer, keep=cfg.keep_checkpoints, extra_files=extra_files,
            model_state=model_state, optimizer_state=optimizer_state,
            state={"tokens_seen": tokens_seen, "elapsed_s": elapsed, "eval_s": eval_s, "val_loss": val_loss,
                   "config": asdict(cfg),
                   # Where the data stream stands: batches are a pure function of these numbers.
                   "data": {"next_step": step, "seed": cfg.seed, "micro_steps": cfg.grad_accum * env.world_size,
                            "world_size": env.world_size,
                            "rule": "TokenDataset.train_batch(batch_size, seq_len, seed, step, 0, rank * grad_accum "
                                    "+ micro): the global batch does not depend on how it is split over ranks"},
                   "data_manifest_sha256": data.manifest_sha256, "data_dir_resolved": str(resolved(data.dir)),
                   "tokenizer": data.manifest["tokenizer"]},
        )
        if env.enabled:
            torch.distributed.barrier()
        return path

    from tqdm import tqdm

    show = cfg.progress and env.is_main
    bar = tqdm(total=cfg.max_steps, initial=start_step, desc="train", unit="step", disable=not show or None,
               dynamic_ncols=True)
    say = (bar.write if show else print) if env.is_main else (lambda *a, **k: None)  # only rank 0 prints
    say(f"effllm: {counts['total'] / 1e6:.2f}M parameters ({counts['active'] / 1e6:.2f}M active), "
        f"{flops_per_token / 1e6:.1f} MFLOPs/token, {dev_name}, {amp or torch.float32}, "
        f"{tokens_per_step} tokens/step" + (f" over {env.world_size} ranks ({cfg.data_parallel})" if env.enabled else "")
        + f", unigram val loss {unigram:.3f}"
        + (f", resuming at step {start_step}" if start_step else ""))
    if changes:
        say("resume: changed from the run's own configuration: "
            + ", ".join(f"{k} {a!r} -> {b!r}" for k, (a, b) in changes.items()))
    if cfg.max_steps > schedule_steps(cfg):
        say(f"lr schedule: it spans {schedule_steps(cfg)} steps; steps {schedule_steps(cfg) + 1}-{cfg.max_steps} run at "
            f"its final lr {lr_at(schedule_steps(cfg) - 1, cfg):.3g} (a new span: --optim.schedule-steps, where allowed)")
    if fp8_report is not None:
        say(f"fp8: {len(fp8_report['converted'])} linears and expert groups converted; kept in higher precision: "
            + "; ".join(f"{k} ({v})" for k, v in fp8_report["skipped"].items()))

    tokens_seen, val_loss, last_loss = tokens_before, state.get("val_loss") if state else None, float("nan")
    eval_s = state.get("eval_s", 0.0) if state else 0.0  # seconds spent evaluating, resumed runs included
    run_start = time.perf_counter()
    window_start, window_tokens = run_start, 0
    model.train()
    step = start_step
    try:
        for step in range(start_step, cfg.max_steps):
            lr = lr_at(step, cfg)
            for group in optimizer.param_groups:
                group["lr"] = lr
            # (micro) -> x, y: rank r takes micro-batches r*A .. r*A+A-1 of the step's global batch
            batch = functools.partial(rank_batch, data, cfg, step, env.rank)
            sums = forward_backward(model, step_fn, batch, cfg.grad_accum, cfg.model.mtp_lambda, device, amp)
            if env.enabled:  # the global batch's means, the same on every rank (so is the NaN check)
                packed = torch.stack(list(sums.values()))
                torch.distributed.all_reduce(packed)
                sums = dict(zip(sums, packed / env.world_size, strict=True))
            last_loss = sums["loss"].item() / cfg.grad_accum
            if not math.isfinite(last_loss):
                bar.close()
                kept = ckpt_io.latest_checkpoint(ckpt_root)
                raise TrainingDiverged(
                    f"loss is {last_loss} at step {step + 1}; training stopped before the optimizer step. "
                    + (f"The last good checkpoint {kept} is kept: " if kept else "No checkpoint was written yet: ")
                    + "lower --optim.lr, raise --optim.warmup-steps or check the data, then "
                    + ("--resume." if kept else "start again.")
                )
            grad_norm, step_loads = optimizer_update(model, optimizer, cfg.optim.grad_clip, moe_layers)
            done = step + 1
            tokens_seen += tokens_per_step
            window_tokens += tokens_per_step
            elapsed = elapsed_before + time.perf_counter() - run_start

            if done % cfg.eval_interval == 0 or done == cfg.max_steps:
                eval_start = time.perf_counter()
                val_loss = evaluate(step_fn, data, cfg, device, amp)
                eval_s += time.perf_counter() - eval_start
                say(f"step {done}: val loss {val_loss:.4f} (train {last_loss:.4f}, unigram {unigram:.3f})")
            if done % cfg.log_interval == 0 or done == cfg.max_steps:
                now = time.perf_counter()
                tok_s = window_tokens / (now - window_start)
                record = {"step": done, "loss": last_loss, "lr": lr,
                          "grad_norm": None if grad_norm is None else grad_norm.item(),
                          "tokens_per_s": tok_s, "tokens_seen": tokens_seen, "elapsed_s": elapsed,
                          "train_s": elapsed - eval_s,  # wall-clock minus evaluation: the cost of training alone
                          "peak_mem_bytes": peak_memory_bytes(device)}
                if cfg.model.mtp_depth:
                    record["mtp_loss"] = sums["mtp"].item() / cfg.grad_accum
                if step_loads:
                    record["moe_aux_loss"] = sums["aux"].item() / cfg.grad_accum
                    # per layer: max/mean tokens per expert and the coefficient of variation
                    record["moe_load"] = {name: load_stats(load) for name, load in step_loads.items()}
                if done % cfg.eval_interval == 0 or done == cfg.max_steps:
                    record["val_loss"] = val_loss
                if env.is_main:
                    with open(metrics_path, "a") as fh:
                        fh.write(json.dumps(record) + "\n")
                bar.set_postfix(loss=f"{last_loss:.3f}", tok_s=f"{tok_s:,.0f}", refresh=False)
                window_start, window_tokens = now, 0
            if (cfg.ckpt_interval and done % cfg.ckpt_interval == 0) or done == cfg.max_steps:
                save(done, tokens_seen, elapsed, eval_s, val_loss)
            bar.update(1)
    except KeyboardInterrupt:
        bar.close()
        kept = ckpt_io.latest_checkpoint(ckpt_root)
        raise TrainingInterrupted(
            f"interrupted during step {step + 1}; "
            + (f"the last checkpoint, {kept} (step {int(kept.name.removeprefix('step_'))}), is complete: continue "
               "with --resume" if kept else "no checkpoint was written yet, so there is nothing to resume: start "
               "again")) from None
    bar.close()

    elapsed = elapsed_before + time.perf_counter() - run_start
    tok_s = (tokens_seen - tokens_before) / max(1e-9, time.perf_counter() - run_start)
    summary = {
        "steps": cfg.max_steps, "tokens_seen": tokens_seen, "final_train_loss": last_loss, "final_val_loss": val_loss,
        "unigram_val_loss": unigram, "elapsed_s": elapsed, "train_s": elapsed - eval_s, "tokens_per_s": tok_s, "params": counts,
        "train_flops_per_token": flops_per_token, "mfu": mfu(tok_s / env.world_size, flops_per_token, peak), "device": dev_name, "world_size": env.world_size,
        "precision": str(amp or torch.float32), "peak_mem_bytes": peak_memory_bytes(device),
    }
    if env.is_main:
        (out / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
        final = ckpt_io.latest_checkpoint(ckpt_root)
        (out / "MODEL_CARD.md").write_text(card_text(ckpt_io.read_state(final), counts, data.manifest))
    say(f"done: val loss {val_loss:.4f} vs unigram {unigram:.3f}, {tokens_seen:,} tokens in {elapsed:.0f}s "
        f"({tok_s:,.0f} tokens/s); checkpoint in {ckpt_root}")
    return summary
