"""The training loop: `train(cfg)`, the one place that knows about steps.

One optimizer step = `grad_accum` micro-batches of `batch_size` sequences of `seq_len` tokens.
Batches come from `TokenDataset.train_batch(seed, step, rank, micro)`, so the data a step sees
depends on nothing but its number: with the model, optimizer and RNG states restored from a
checkpoint, a resumed run repeats the uninterrupted run's losses exactly (on CPU, bit for bit).

The stages: the checks (`train`), the resume state (`_resumed`), the run (effllm.run.build_run),
the run directory (`_open_run_dir`) with its metrics log (effllm/metrics.py), the loop (`_loop`)
with its checkpoints (`_save`), and the summary and model card (the end of `_run`). The
configuration lives in effllm/config.py.
"""

from __future__ import annotations

import json
import math
import shutil
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, replace
from pathlib import Path
from typing import NamedTuple

import torch
from tqdm import tqdm

from effllm import checkpoint as ckpt_io
from effllm.card import MANIFEST_COPY, card_text
from effllm.config import (
    OptimConfig,
    TrainConfig,
    check_parallel,
    lr_at,
    resumed_config,
    saved_config,
    schedule_steps,
)
from effllm.data import TokenDataset, mixture_rows
from effllm.devices import peak_memory_bytes
from effllm.errors import CheckpointError, ConfigError, OutputError, TrainingDiverged, TrainingInterrupted
from effllm.eu_summary import SUMMARY_JSON, SUMMARY_MD, write_summary
from effllm.flops import device_name, mfu, peak_bf16_flops, train_flops_per_token
from effllm.fsutil import resolved
from effllm.memory import MemoryEstimate, check_fits
from effllm.memory import estimate as estimate_memory
from effllm.metrics import TENSORBOARD_DIR, MetricsLog, check_tensorboard
from effllm.model import Transformer, describe_params
from effllm.moe import load_stats
from effllm.parallelize import DistEnv, dist_env, gather_full_state, init_distributed
from effllm.run import Run, build_run, evaluate, optimizer_update, step_losses
from effllm.tokenizer import same_tokenizer

__all__ = ["OptimConfig", "TrainConfig", "saved_config", "train"]  # the configs are effllm.config's

RUN_FILES = ("config.json", "metrics.jsonl", "summary.json", "MODEL_CARD.md", MANIFEST_COPY, "checkpoints",
             TENSORBOARD_DIR, SUMMARY_MD, SUMMARY_JSON)


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


def train(cfg: TrainConfig, model_hook: Callable[[Transformer], None] | None = None) -> dict:
    """Train `cfg.model` on `cfg.data_dir`; writes metrics, checkpoints and a summary into
    `cfg.out_dir` and returns the summary.

    `model_hook(model)`, if given, runs once the model is built (its weights loaded when resuming,
    converted to FP8 with cfg.fp8) and before any parallel wrapping or the optimizer: research
    code swaps or wraps modules there (a variant of a layer, gradient hooks) and trains the result
    with this trainer. It must keep the parameter names, so that checkpoints load."""
    # Every check that can fail runs before the model is allocated.
    data = TokenDataset(cfg.data_dir, cfg.data_mix, cfg.data_mix_per)
    if cfg.model.vocab_size < data.vocab_size:
        raise ConfigError(f"model.vocab_size={cfg.model.vocab_size} is smaller than the tokenizer's vocabulary "
                          f"({data.vocab_size}) of {cfg.data_dir}: pass --model.vocab-size {data.vocab_size}")
    data.check_seq_len(cfg.seq_len)
    init_from = check_init_from(cfg, data) if cfg.init_from and not cfg.resume else None
    if cfg.tensorboard:
        check_tensorboard()
    env = dist_env()  # rank 0 of 1 unless launched by torchrun
    check_parallel(cfg, env.world_size)
    owns_group = env.enabled and not torch.distributed.is_initialized()
    device = init_distributed(env, cfg.device, cfg.dist_timeout_s)
    try:
        memory = estimate_memory(cfg, device, env.world_size)
        if cfg.memory_check:  # ranks on one CPU share its memory
            check_fits(cfg, memory, device, ranks_sharing=env.local_world_size if device.type == "cpu" else 1)
        return _train(cfg, data, env, device, model_hook, memory, init_from)
    finally:
        # A process group this call opened is closed here. gloo's worker threads can outlive this
        # (the groups are also held on the C++ side), and one that releases a finished work item
        # while the interpreter finalizes aborts the rank after a finished run: the `effllm`
        # command therefore ends torchrun ranks without finalization (parallelize.exit_rank).
        if owns_group and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


def check_init_from(cfg: TrainConfig, data: TokenDataset) -> Path:
    """The verified checkpoint whose weights start the run (cfg.init_from), before anything is
    allocated: its model must be cfg.model (the fields that set shapes and the function), and the
    data must be tokenized with its tokenizer."""
    ckpt = ckpt_io.resolve_checkpoint(cfg.init_from)
    state = ckpt_io.read_state(ckpt)
    saved = TrainConfig.from_dict(state["config"]).model
    diff = saved.resume_changes(cfg.model)
    if diff:
        listing = ", ".join(f"{k}: checkpoint {a!r} vs now {b!r}" for k, (a, b) in diff.items())
        raise ConfigError(f"--init-from {ckpt} holds a different model ({listing}): start from it with its own model "
                          f"config (`effllm train --from {ckpt.parent.parent}` takes it), changing only what a resume "
                          "may change")
    spec = state.get("tokenizer")
    if spec is not None and not same_tokenizer(spec, data.manifest["tokenizer"]):
        hint = (f"prepare the data with `effllm prepare --tokenizer {ckpt / spec['file']}`" if spec.get("file")
                else f"prepare the data with `effllm prepare --tokenizer {spec['kind']}`")
        raise ConfigError(f"{cfg.data_dir} is tokenized with {data.manifest['tokenizer']['kind']} "
                          f"(sha256 {data.manifest['tokenizer'].get('sha256', '-')[:12]}), the weights of {ckpt} with "
                          f"{spec['kind']} (sha256 {spec.get('sha256', '-')[:12]}): {hint}")
    return ckpt


def _resumed(cfg: TrainConfig, data: TokenDataset, ckpt_root: Path) -> tuple[TrainConfig, Path | None, dict | None, dict]:
    """The configuration to train with, the checkpoint to resume from and its state (None, None for
    a new run), and what the resume changes against the run's own configuration."""
    out = ckpt_root.parent
    resume_from = ckpt_io.latest_checkpoint(ckpt_root)
    if cfg.resume and resume_from is None:
        raise CheckpointError(f"--resume given but {ckpt_root} holds no checkpoint: drop --resume to start afresh")
    if not cfg.resume and resume_from is not None:
        raise CheckpointError(f"{out} already holds checkpoints: pass --resume to continue that run, "
                              "or choose another --out-dir")
    check_run_dir(out)
    if not cfg.resume:  # the schedule's span is recorded, so that a resume with a larger max_steps keeps it
        return replace(cfg, optim=replace(cfg.optim, schedule_steps=schedule_steps(cfg))), None, None, {}
    state = ckpt_io.read_state(resume_from)
    if ckpt_io.is_sharded(resume_from) and cfg.expert_parallel > 1:
        raise CheckpointError(f"{resume_from} is a sharded checkpoint, and expert_parallel={cfg.expert_parallel} slices "
                              "the experts outside what torch.distributed.checkpoint reshards: resume it with "
                              "--expert-parallel 1")
    if state.get("weights_only"):
        raise CheckpointError(f"{resume_from} holds weights only (no optimizer state), so it cannot be resumed: start a "
                              f"new run from it with --init-from {resume_from.parent.parent} and another --out-dir")
    saved = TrainConfig.from_dict(state["config"])
    ckpt_io.check_model_config(resume_from, saved.model, cfg.model)
    if state["data_manifest_sha256"] != data.manifest_sha256:
        raise CheckpointError(f"{cfg.data_dir} is not the data {resume_from} was trained on (manifest sha256 "
                              "differs): resume with the same data_dir, or start a new run")
    if state["step"] >= cfg.max_steps:
        raise ConfigError(f"checkpoint {resume_from} is at step {state['step']} already, max_steps={cfg.max_steps}: "
                          "raise --max-steps to train further")
    cfg, changes = resumed_config(cfg, saved, state["step"])
    return cfg, resume_from, state, changes


def _open_run_dir(cfg: TrainConfig, data: TokenDataset, env: DistEnv, start_step: int) -> MetricsLog:
    """Rank 0 writes the run's config and a byte-for-byte copy of the data's manifest (its sha256 is
    in every checkpoint: the data's provenance stays with the run), and opens the metrics log,
    truncated to `start_step` on a resume."""
    out = Path(cfg.out_dir)
    if env.is_main:
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.json").write_text(json.dumps(asdict(cfg), indent=1) + "\n")
        shutil.copyfile(data.dir / "manifest.json", out / MANIFEST_COPY)
    return MetricsLog(out, start_step if cfg.resume else 0, env.is_main, cfg.tensorboard)


def _save(run: Run, cfg: TrainConfig, data: TokenDataset, env: DistEnv, step: int, tokens_seen: int, elapsed: float,
          eval_s: float, ckpt_s: float, val_loss: float | None, device_name: str) -> Path | None:
    """A checkpoint at `step`, with the manifest copy and the tokenizer file beside the weights: in
    the single-device layout (every rank takes part in gathering the state, rank 0 writes it), or
    sharded (every rank writes its shards), as `run.checkpoint_format` says."""
    out = Path(cfg.out_dir)
    extra_files = {MANIFEST_COPY: out / MANIFEST_COPY}
    if data.tokenizer.kind in ("bpe", "file"):
        extra_files["tokenizer.json"] = data.dir / "tokenizer.json"
    state = {"tokens_seen": tokens_seen, "elapsed_s": elapsed, "eval_s": eval_s, "ckpt_s": ckpt_s,
             "train_s": elapsed - eval_s - ckpt_s, "val_loss": val_loss, "config": asdict(cfg),
             "device_name": device_name, "world_size": env.world_size,
             # Where the data stream stands: batches are a pure function of these numbers.
             "data": {"next_step": step, "seed": cfg.seed, "micro_steps": cfg.grad_accum * env.world_size,
                      "world_size": env.world_size,
                      "rule": "TokenDataset.train_batch(batch_size, seq_len, seed, step, 0, rank * grad_accum "
                              "+ micro): the global batch does not depend on how it is split over ranks"},
             "data_manifest_sha256": data.manifest_sha256, "data_dir_resolved": str(resolved(data.dir)),
             "tokenizer": data.manifest["tokenizer"]}
    if run.checkpoint_format == "sharded":  # every rank writes its own shards; rank 0 finishes
        path = ckpt_io.save_sharded_checkpoint(out / "checkpoints", step, run.model, run.optimizer, state,
                                               extra_files, keep=cfg.keep_checkpoints)
        return path if env.is_main else None
    model_state = optimizer_state = None
    if env.enabled:
        model_state, optimizer_state = gather_full_state(run.model, run.optimizer, cfg.model.tie_embeddings,
                                                         run.expert_shards)
        if not env.is_main:
            torch.distributed.barrier()
            return None
    path = ckpt_io.save_checkpoint(
        out / "checkpoints", step, run.model, run.optimizer, keep=cfg.keep_checkpoints, extra_files=extra_files,
        model_state=model_state, optimizer_state=optimizer_state, state=state)
    if env.enabled:
        torch.distributed.barrier()
    return path


def _train(cfg: TrainConfig, data: TokenDataset, env: DistEnv, device: torch.device, model_hook=None,
           memory: MemoryEstimate | None = None, init_from: Path | None = None) -> dict:
    ckpt_root = Path(cfg.out_dir) / "checkpoints"
    cfg, resume_from, state, changes = _resumed(cfg, data, ckpt_root)
    run = build_run(cfg, env, device, resume_from, model_hook, init_from=None if resume_from else init_from)
    start = {"step": 0, "elapsed_s": 0.0, "tokens_seen": 0, "eval_s": 0.0, "ckpt_s": 0.0, "val_loss": None} | (state or {})
    log = _open_run_dir(cfg, data, env, start["step"])
    try:
        return _run(cfg, data, env, device, run, start, log, memory, changes)
    finally:
        log.close()


def _run(cfg: TrainConfig, data: TokenDataset, env: DistEnv, device: torch.device, run: Run, start: dict,
         log: MetricsLog, memory: MemoryEstimate | None, changes: dict) -> dict:
    ckpt_root = Path(cfg.out_dir) / "checkpoints"
    flops_per_token = train_flops_per_token(cfg.model, cfg.seq_len)
    dev_name = device_name(device)
    # MFU against the bf16 peak misleads for FP8 runs, so none is reported for them.
    peak = peak_bf16_flops(dev_name) if run.amp is torch.bfloat16 and not cfg.fp8 else None
    unigram = data.manifest["totals"]["unigram_val_loss"]
    counts = run.param_counts

    show = cfg.progress and env.is_main
    bar = tqdm(total=cfg.max_steps, initial=start["step"], desc="train", unit="step", disable=not show or None,
               dynamic_ncols=True)
    say = (bar.write if show else print) if env.is_main else (lambda *a, **k: None)  # only rank 0 prints
    banner = (f"{describe_params(counts)} parameters, "
              f"{flops_per_token / 1e6:.1f} MFLOPs/token, {dev_name}, {run.amp or torch.float32}, "
              f"{cfg.tokens_per_step * env.world_size} tokens/step"
              + (f" over {env.world_size} ranks ({cfg.data_parallel})" if env.enabled else "")
              + f", unigram val loss {unigram:.3f}")
    say(f"effllm: {banner}" + (f", resuming at step {start['step']}" if start["step"] else ""))
    log.text("run", banner, start["step"])
    if changes:
        say("resume: changed from the run's own configuration: "
            + ", ".join(f"{k} {a!r} -> {b!r}" for k, (a, b) in changes.items()))
    if cfg.max_steps > schedule_steps(cfg):
        say(f"lr schedule: it spans {schedule_steps(cfg)} steps; steps {schedule_steps(cfg) + 1}-{cfg.max_steps} run at "
            f"its final lr {lr_at(schedule_steps(cfg) - 1, cfg):.3g} (a new span: --optim.schedule-steps, where allowed)")
    if memory is not None:
        say(f"memory: {memory.describe()} per rank, estimated at batch {cfg.batch_size} x {cfg.seq_len}"
            + (" with activation checkpointing" if cfg.activation_checkpointing else ""))
    for warning in cfg.warnings():
        say(f"effllm: warning: {warning}")
    if run.fp8_report is not None:
        fp8_text = (f"backend {run.fp8_report['backend']}; {len(run.fp8_report['converted'])} linears and expert groups "
                    "converted; kept in higher precision: "
                    + "; ".join(f"{k} ({v})" for k, v in run.fp8_report["skipped"].items()))
        say(f"fp8: {fp8_text}")
        log.text("fp8", fp8_text, start["step"])

    run_start = time.perf_counter()
    # Without a terminal (make, nohup, CI, SLURM) tqdm draws nothing: rank 0 prints a plain line per log interval.
    lines = env.is_main and bool(bar.disable)
    end = _loop(run, cfg, data, env, device, start, run_start, log, bar, say, unigram, lines, dev_name)
    bar.close()

    elapsed = start["elapsed_s"] + time.perf_counter() - run_start
    train_s = elapsed - end.eval_s - end.ckpt_s
    # This session's training alone: evaluations and checkpoints are not training time.
    tok_s = (end.tokens_seen - start["tokens_seen"]) / max(1e-9, train_s - (start["elapsed_s"] - start["eval_s"]
                                                                            - start["ckpt_s"]))
    summary = {
        "steps": cfg.max_steps, "tokens_seen": end.tokens_seen, "final_train_loss": end.last_loss,
        "final_val_loss": end.val_loss, "unigram_val_loss": unigram, "elapsed_s": elapsed,
        "train_s": train_s, "eval_s": end.eval_s, "ckpt_s": end.ckpt_s, "tokens_per_s": tok_s, "params": counts,
        "train_flops_per_token": flops_per_token, "mfu": mfu(tok_s / env.world_size, flops_per_token, peak),
        "device": dev_name, "world_size": env.world_size, "precision": str(run.amp or torch.float32),
        "fp8_backend": None if run.fp8_report is None else run.fp8_report["backend"],
        "checkpoint_format": run.checkpoint_format,
        "fp8_recipe": None if run.fp8_report is None else run.fp8_report["recipe"],
        "peak_mem_bytes": peak_memory_bytes(device),
        "memory_estimate_bytes": None if memory is None else memory.total,
        "data_mix": mixture_rows(data.manifest, cfg.data_mix, end.tokens_seen, cfg.data_mix_per),  # None: by size
    }
    if env.is_main:
        out = Path(cfg.out_dir)
        (out / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
        final_state = ckpt_io.read_state(ckpt_io.latest_checkpoint(ckpt_root))
        (out / "MODEL_CARD.md").write_text(card_text(final_state, counts, data.manifest))
        write_summary(out, final_state, data.manifest)  # the provider's fields blank: `effllm card --eu-summary`
    say(f"done: val loss {end.val_loss:.4f} vs unigram {unigram:.3f}, {end.tokens_seen:,} tokens in {elapsed:.0f}s "
        f"({tok_s:,.0f} tokens/s); checkpoint in {ckpt_root}")
    return summary


class StopRequest:
    """SIGTERM (a cluster's preemption, `kill`) and a first Ctrl-C ask the loop to stop after the
    step in progress, with a checkpoint; a second Ctrl-C stops at once (KeyboardInterrupt). The
    handlers are installed for the loop only, in the main thread only, and the previous ones put
    back. Under torchrun every rank stops at the same step: the request is all-reduced each step."""

    def __init__(self, say):
        self.signal: int | None = None
        self.say, self._previous = say, {}

    def _handle(self, signum, frame) -> None:
        if signum == signal.SIGINT and self.signal is not None:
            raise KeyboardInterrupt
        self.signal = signum
        self.say(f"effllm: {signal.Signals(signum).name} received: stopping after this step with a checkpoint"
                 + (" (Ctrl-C again to stop at once, without one)" if signum == signal.SIGINT else ""))

    def __enter__(self) -> "StopRequest":
        if threading.current_thread() is threading.main_thread():
            for signum in (signal.SIGTERM, signal.SIGINT):
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)

    def requested(self, env: DistEnv, device: torch.device) -> int | None:
        """The signal that asked to stop, on any rank (None: go on)."""
        if not env.enabled:
            return self.signal
        flag = torch.tensor([self.signal or 0], device=device)
        torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
        return int(flag.item()) or None


class _LoopEnd(NamedTuple):
    tokens_seen: int
    val_loss: float | None
    last_loss: float
    eval_s: float  # seconds spent evaluating, resumed runs included
    ckpt_s: float  # seconds spent writing checkpoints, resumed runs included


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    h, rest = divmod(seconds, 3600)
    return f"{h}h{rest // 60:02d}m" if h else f"{rest // 60}m{rest % 60:02d}s"


def _loop(run: Run, cfg: TrainConfig, data: TokenDataset, env: DistEnv, device: torch.device, start: dict,
          run_start: float, log: MetricsLog, bar, say, unigram: float, lines: bool, dev_name: str) -> _LoopEnd:
    """Steps start["step"] .. max_steps - 1: the step, the NaN check, evaluation, metrics lines (and,
    with `lines`, a plain progress line each) and checkpoints. Timings: `elapsed_s` is wall-clock,
    `train_s` leaves out evaluations and checkpoints, and tokens/s is over training time only."""
    ckpt_root = Path(cfg.out_dir) / "checkpoints"
    tokens_per_step = cfg.tokens_per_step * env.world_size  # the global batch
    moe_layers = run.model.moe_layers()
    tokens_seen, val_loss, last_loss, eval_s = start["tokens_seen"], start["val_loss"], float("nan"), start["eval_s"]
    ckpt_s = start["ckpt_s"]
    window_start, window_tokens, window_steps, window_pause = run_start, 0, 0, 0.0  # pause: eval and ckpt time
    run.model.train()
    step = start["step"]
    stop = StopRequest(say)
    try:
        with stop:
            for step in range(start["step"], cfg.max_steps):
                lr = lr_at(step, cfg)
                sums = step_losses(run, cfg, data, env, device, step)
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
                grad_norm, step_loads = optimizer_update(run.model, run.optimizer, cfg.optim.grad_clip, moe_layers)
                done = step + 1
                tokens_seen += tokens_per_step
                window_tokens += tokens_per_step
                window_steps += 1
                evaluated = done % cfg.eval_interval == 0 or done == cfg.max_steps

                if evaluated:
                    eval_start = time.perf_counter()
                    val_loss = evaluate(run.step_fn, data, cfg, device, run.amp)
                    spent = time.perf_counter() - eval_start
                    eval_s += spent
                    window_pause += spent
                    say(f"step {done}: val loss {val_loss:.4f} (train {last_loss:.4f}, unigram {unigram:.3f})")
                elapsed = start["elapsed_s"] + time.perf_counter() - run_start
                if done % cfg.log_interval == 0 or done == cfg.max_steps:
                    now = time.perf_counter()
                    window_train = max(1e-9, now - window_start - window_pause)
                    tok_s = window_tokens / window_train
                    record = {"step": done, "loss": last_loss, "lr": lr,
                              "grad_norm": None if grad_norm is None else grad_norm.item(),
                              "tokens_per_s": tok_s, "tokens_seen": tokens_seen, "elapsed_s": elapsed,
                              "train_s": elapsed - eval_s - ckpt_s,  # wall-clock minus evaluations and checkpoints
                              "peak_mem_bytes": peak_memory_bytes(device)}
                    if cfg.model.mtp_depth:
                        record["mtp_loss"] = sums["mtp"].item() / cfg.grad_accum
                    if step_loads:
                        record["moe_aux_loss"] = sums["aux"].item() / cfg.grad_accum
                        # per layer: max/mean tokens per expert and the coefficient of variation
                        record["moe_load"] = {name: load_stats(load) for name, load in step_loads.items()}
                    if evaluated:
                        record["val_loss"] = val_loss
                    log.write(record)  # metrics.jsonl, and TensorBoard's scalars (rank 0 only)
                    bar.set_postfix(loss=f"{last_loss:.3f}", tok_s=f"{tok_s:,.0f}", refresh=False)
                    if lines:
                        eta = (cfg.max_steps - done) * window_train / window_steps
                        say(f"step {done}/{cfg.max_steps} | loss {last_loss:.4f} | lr {lr:.3g} | {tok_s:,.0f} tokens/s | "
                            f"ETA {_duration(eta)}")
                    window_start, window_tokens, window_steps, window_pause = now, 0, 0, 0.0
                signum = stop.requested(env, device)  # a stop writes this step's checkpoint, then ends the run
                if (cfg.ckpt_interval and done % cfg.ckpt_interval == 0) or done == cfg.max_steps or signum:
                    ckpt_start = time.perf_counter()
                    _save(run, cfg, data, env, done, tokens_seen, elapsed, eval_s, ckpt_s, val_loss, dev_name)
                    spent = time.perf_counter() - ckpt_start
                    ckpt_s += spent
                    window_pause += spent
                bar.update(1)
                if signum and done < cfg.max_steps:
                    bar.close()
                    raise TrainingInterrupted(
                        f"stopped by {signal.Signals(signum).name} after step {done}; the checkpoint "
                        f"{ckpt_root / ckpt_io.step_dir_name(done)} is complete: continue with --resume",
                        exit_code=128 + signum)
    except KeyboardInterrupt:
        bar.close()
        kept = ckpt_io.latest_checkpoint(ckpt_root)
        raise TrainingInterrupted(
            f"interrupted during step {step + 1}; "
            + (f"the last checkpoint, {kept} (step {int(kept.name.removeprefix('step_'))}), is complete: continue "
               "with --resume" if kept else "no checkpoint was written yet, so there is nothing to resume: start "
               "again")) from None
    return _LoopEnd(tokens_seen, val_loss, last_loss, eval_s, ckpt_s)
