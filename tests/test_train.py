"""The trainer: learning, exact resume, atomic checkpoints, divergence, bad configs and checkpoints."""

from __future__ import annotations

import json
import math
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from helpers import tiny_train_config

import effllm.run
from effllm import checkpoint as ckpt_io
from effllm.cli import GenerateConfig, generate_text
from effllm.config import OptimConfig, TrainConfig, lr_at
from effllm.errors import CheckpointError, ConfigError, DataError, OutputError, TrainingDiverged, TrainingInterrupted
from effllm.model import ModelConfig, Transformer
from effllm.moe import MoEConfig
from effllm.train import train

# `effllm.train` the attribute is the train() function re-exported by the package; the module:
train_mod = sys.modules["effllm.train"]


def losses(run: Path) -> list[tuple[int, float]]:
    return [(r["step"], r["loss"]) for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())]


def test_loss_decreases_well_below_unigram(byte_data, tmp_path):
    cfg = tiny_train_config(byte_data, tmp_path / "run", max_steps=150, eval_interval=150, eval_tokens=4096,
                            ckpt_interval=0, batch_size=8, seq_len=64, optim=OptimConfig(lr=3e-3, warmup_steps=10),
                            model=ModelConfig(vocab_size=256, dim=96, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=64))
    summary = train(cfg)
    curve = [loss for _, loss in losses(tmp_path / "run")]
    assert len(curve) == 150 and curve[0] > 5.0  # starts near ln(256) = 5.55
    assert sum(curve[-10:]) / 10 < sum(curve[:10]) / 10 - 1.5  # seen: 4.58 -> 2.62
    # Seen on 2 CPU cores: val 2.76 against the unigram 3.06 after 77k tokens.
    assert summary["final_val_loss"] < summary["unigram_val_loss"] - 0.2
    record = json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[-1])
    assert set(record) >= {"step", "loss", "lr", "grad_norm", "tokens_per_s", "tokens_seen", "elapsed_s",
                           "peak_mem_bytes", "val_loss"}
    assert record["tokens_seen"] == 150 * 8 * 64
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["final_val_loss"] == summary["final_val_loss"]


class Killed(BaseException):
    """Stands in for the process being killed (not an Exception, so nothing catches it)."""


def test_resume_repeats_the_uninterrupted_loss_curve_exactly(byte_data, tmp_path, monkeypatch):
    cfg = tiny_train_config(byte_data, tmp_path / "full", max_steps=10, ckpt_interval=4, grad_accum=2)
    train(cfg)
    reference = losses(tmp_path / "full")

    interrupted = replace(cfg, out_dir=str(tmp_path / "cut"))
    real_batch = train_mod.TokenDataset.train_batch

    def dies_at_step_7(self, *args, **kwargs):
        if args[3] == 6:  # 0-based step 6 = the 7th step, after the checkpoint at step 4
            raise Killed
        return real_batch(self, *args, **kwargs)

    monkeypatch.setattr(train_mod.TokenDataset, "train_batch", dies_at_step_7)
    with pytest.raises(Killed):
        train(interrupted)
    monkeypatch.undo()
    assert [s for s, _ in losses(tmp_path / "cut")] == [1, 2, 3, 4, 5, 6]
    assert ckpt_io.latest_checkpoint(tmp_path / "cut" / "checkpoints").name == "step_00000004"

    train(replace(interrupted, resume=True))
    assert losses(tmp_path / "cut") == reference  # the same floats, step by step
    a = Transformer(cfg.model)
    b = Transformer(cfg.model)
    ckpt_io.load_weights(ckpt_io.latest_checkpoint(tmp_path / "full" / "checkpoints"), a)
    ckpt_io.load_weights(ckpt_io.latest_checkpoint(tmp_path / "cut" / "checkpoints"), b)
    assert all(torch.equal(p, q) for p, q in zip(a.state_dict().values(), b.state_dict().values()))


def test_a_crash_mid_save_keeps_the_previous_checkpoint(byte_data, tmp_path, monkeypatch):
    cfg = tiny_train_config(byte_data, tmp_path / "run", max_steps=4, ckpt_interval=2)
    train(cfg)
    root = tmp_path / "run" / "checkpoints"
    assert ckpt_io.latest_checkpoint(root).name == "step_00000004"
    model = Transformer(cfg.model)
    optimizer = effllm.run.build_optimizer(model, cfg.optim)
    real_save = torch.save

    def torn_write(obj, f, *args, **kwargs):  # writes half a file, then the process "dies"
        real_save(obj, f, *args, **kwargs)
        with open(f, "r+b") as fh:
            fh.truncate(fh.seek(0, 2) // 2)
        raise Killed

    monkeypatch.setattr(torch, "save", torn_write)
    with pytest.raises(Killed):
        ckpt_io.save_checkpoint(root, 6, model, optimizer, state={"config": {}})
    monkeypatch.undo()
    assert (root / ".tmp-step_00000006").exists()  # the torn write stayed in its temporary directory
    latest = ckpt_io.latest_checkpoint(root)
    assert latest.name == "step_00000004"
    ckpt_io.read_state(latest)  # every sha256 still matches
    train(replace(cfg, max_steps=6, resume=True))  # and the run goes on from it
    assert ckpt_io.latest_checkpoint(root).name == "step_00000006"
    assert not (root / ".tmp-step_00000006").exists()
    assert sorted(p.name for p in root.glob("step_*")) == ["step_00000004", "step_00000006"]  # keep=2


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(byte_data, tmp_path, monkeypatch):
    calls = {"n": 0}

    class BlowsUp(Transformer):
        def forward(self, tokens, targets=None, **kwargs):
            out = super().forward(tokens, targets, **kwargs)  # a ModelOutput: the trainer asks for return_aux
            if targets is not None and self.training:
                calls["n"] += 1
                if calls["n"] == 7:  # the 7th training forward = step 7
                    out = out._replace(loss=out.loss * float("nan"))
            return out

    monkeypatch.setattr(effllm.run, "Transformer", BlowsUp)  # the model build_run builds
    cfg = tiny_train_config(byte_data, tmp_path / "run", max_steps=10, ckpt_interval=4)
    with pytest.raises(TrainingDiverged, match=r"loss is nan at step 7.*step_00000004 is kept"):
        train(cfg)
    root = tmp_path / "run" / "checkpoints"
    assert ckpt_io.latest_checkpoint(root).name == "step_00000004"
    state = ckpt_io.read_state(ckpt_io.latest_checkpoint(root))
    model = Transformer(cfg.model)
    ckpt_io.load_weights(ckpt_io.latest_checkpoint(root), model)
    assert state["step"] == 4 and all(torch.isfinite(p).all() for p in model.parameters())
    assert state["data"]["next_step"] == 4 and state["data"]["seed"] == cfg.seed
    assert set(state["files"]) == {"model.safetensors", "optimizer.pt", "rng.pt", "data_manifest.json"}


def test_resume_with_another_model_config_names_the_difference(byte_data, tmp_path):
    cfg = tiny_train_config(byte_data, tmp_path / "run", max_steps=2)
    train(cfg)
    other = replace(cfg, max_steps=4, resume=True, model=replace(cfg.model, dim=96, n_heads=4))
    with pytest.raises(CheckpointError, match=r"different model config \(dim: checkpoint 64 vs now 96\)"):
        train(other)


@pytest.mark.parametrize("victim", ["model.safetensors", "optimizer.pt", "state.json"])
def test_corrupt_or_truncated_checkpoint_is_reported(byte_data, tmp_path, victim):
    cfg = tiny_train_config(byte_data, tmp_path / "run", max_steps=2)
    train(cfg)
    path = ckpt_io.latest_checkpoint(tmp_path / "run" / "checkpoints") / victim
    with open(path, "r+b") as fh:
        fh.truncate(path.stat().st_size // 2)
    with pytest.raises(CheckpointError, match="truncated or corrupt|unreadable or corrupt"):
        train(replace(cfg, max_steps=4, resume=True))


def test_bad_configs_fail_before_any_work(byte_data, tmp_path):
    with pytest.raises(ConfigError, match="smaller than the tokenizer's vocabulary.*--model.vocab-size 256"):
        train(tiny_train_config(byte_data, tmp_path / "a", model=ModelConfig(vocab_size=200, dim=64, n_heads=4)))
    with pytest.raises(DataError, match="effllm prepare"):
        train(tiny_train_config(tmp_path / "no-data", tmp_path / "b"))
    with pytest.raises(ConfigError, match="exceeds model.max_seq_len"):
        tiny_train_config(byte_data, tmp_path / "c", seq_len=128)
    with pytest.raises(CheckpointError, match="drop --resume"):
        train(tiny_train_config(byte_data, tmp_path / "d", resume=True))
    for out in ("a", "b", "d"):
        assert not (tmp_path / out).exists()  # nothing was written


def test_a_finished_run_is_never_overwritten(byte_data, tmp_path):
    cfg = tiny_train_config(byte_data, tmp_path / "run", max_steps=2)
    train(cfg)
    with pytest.raises(CheckpointError, match="pass --resume"):
        train(cfg)
    with pytest.raises(ConfigError, match="raise --max-steps"):
        train(replace(cfg, resume=True))


@pytest.mark.parametrize("schedule", ["cosine", "wsd"])
def test_lr_schedules(schedule):
    cfg = TrainConfig(max_steps=100, optim=OptimConfig(lr=1.0, min_lr_ratio=0.1, warmup_steps=10,
                                                        schedule=schedule, decay_fraction=0.2))
    lrs = [lr_at(s, cfg) for s in range(100)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)
    assert all(a <= b for a, b in zip(lrs[:10], lrs[1:10]))
    assert lrs[-1] == pytest.approx(0.1, abs=0.02) and min(lrs) >= 0.1 - 1e-9
    assert all(a >= b - 1e-12 for a, b in zip(lrs[10:], lrs[11:]))  # never rises after warmup
    if schedule == "wsd":
        assert lrs[10:80] == [1.0] * 70 and lrs[85] < 1.0
    # past the schedule's span the lr stays at its last step's, even where warmup outlasts the span
    assert lr_at(150, cfg) == lrs[-1]
    short = replace(cfg, max_steps=5)
    assert lr_at(9, short) == lr_at(4, short) == pytest.approx(0.5)


def test_generate_from_a_checkpoint(byte_data, tmp_path):
    train(tiny_train_config(byte_data, tmp_path / "run", max_steps=2))
    text = generate_text(GenerateConfig(checkpoint=str(tmp_path / "run"), prompt="import os\n", max_new_tokens=20))
    assert text.startswith("import os\n") and len(text.encode()) > len("import os\n")
    greedy = [generate_text(GenerateConfig(checkpoint=str(tmp_path / "run"), prompt="def ", max_new_tokens=10,
                                           temperature=0.0)) for _ in range(2)]
    assert greedy[0] == greedy[1]


def test_bpe_data_trains_and_generates_from_the_checkpoint_alone(tmp_path, small_prepare_config, byte_data):
    small_byte = byte_data
    from effllm.prepare import prepare

    data = prepare(replace(small_prepare_config, out=str(tmp_path / "bpe"), tokenizer="bpe", vocab_size=600),
                   progress=False)
    with pytest.raises(ConfigError, match="--model.vocab-size 600"):
        train(tiny_train_config(data, tmp_path / "run"))
    cfg = tiny_train_config(data, tmp_path / "run", max_steps=2,
                            model=ModelConfig(vocab_size=600, dim=64, n_layers=2, n_heads=4, max_seq_len=64))
    train(cfg)
    ckpt = ckpt_io.latest_checkpoint(tmp_path / "run" / "checkpoints")
    assert (ckpt / "tokenizer.json").read_bytes() == (data / "tokenizer.json").read_bytes()
    # effllm eval on BPE data: bits per byte over the bytes the scored tokens spell
    from effllm.data import TokenDataset
    from effllm.run import evaluate_checkpoint

    r = evaluate_checkpoint(ckpt, max_tokens=320)
    val = TokenDataset(data)
    scored = [int(t) for t in val.splits["val"][1:r["tokens"] + 1]]
    spelled = len(val.tokenizer.decode(scored).encode("utf-8"))
    assert abs(r["bytes"] - spelled) <= 6 and r["bytes"] > 1.5 * r["tokens"]  # ends may cut a character
    assert r["bits_per_byte"] == pytest.approx(r["loss"] * r["tokens"] / r["bytes"] / math.log(2))
    with pytest.raises(DataError, match="tokenized with"):
        evaluate_checkpoint(ckpt, data_dir=small_byte)
    import shutil

    shutil.rmtree(data)  # the checkpoint carries its tokenizer
    text = generate_text(GenerateConfig(checkpoint=str(ckpt), prompt="from email import ", max_new_tokens=8))
    assert text.startswith("from email import ")


def test_activation_checkpointing_changes_memory_not_results(byte_data, tmp_path):
    """Recomputed blocks give the same losses and the same MoE load (counted once, not twice)."""
    model = ModelConfig(vocab_size=256, dim=64, n_layers=2, n_heads=4, max_seq_len=64, ffn="moe", first_k_dense=1,
                        mtp_depth=1, moe=MoEConfig(n_routed_experts=4, top_k=2, expert_dim=32, seq_aux_loss_weight=1e-2))
    runs = {}
    for ac in (False, True):
        train(tiny_train_config(byte_data, tmp_path / str(ac), model=model, max_steps=4, activation_checkpointing=ac))
        runs[ac] = [json.loads(line) for line in (tmp_path / str(ac) / "metrics.jsonl").read_text().splitlines()]
    for plain, recomputed in zip(runs[False], runs[True], strict=True):
        assert recomputed["loss"] == pytest.approx(plain["loss"], abs=1e-6)
        assert recomputed["mtp_loss"] == pytest.approx(plain["mtp_loss"])


@pytest.mark.parametrize("compiled", [False, pytest.param(True, marks=pytest.mark.slow)])
def test_recomputed_moe_blocks_count_their_load_once(compiled):
    """The load statistics are ratios (and the bias moves by a sign), so a doubled count would not
    show in them: count the routed pairs directly, eager and under torch.compile (MTP block included)."""
    cfg = ModelConfig(vocab_size=96, dim=64, n_layers=2, n_heads=4, max_seq_len=64, ffn="moe", first_k_dense=1,
                      mtp_depth=1, moe=MoEConfig(n_routed_experts=4, top_k=2, expert_dim=32))
    torch.manual_seed(0)
    model = Transformer(cfg).train()
    blocks = [*model.blocks, model.mtp[0].block]
    for block in blocks:
        block.set_activation_checkpointing(True)
        if compiled:
            block.compile()
    x = torch.randint(0, 96, (2, 16))
    out = model(x, x, return_aux=True)
    (out.loss + out.mtp_loss).backward()
    assert model.blocks[1].ffn.step_load.sum().item() == 2 * 16 * 2  # tokens x top_k, once
    assert model.mtp[0].block.ffn.step_load.sum().item() == 2 * 15 * 2  # the MTP depth sees T-1 positions
    assert all(p.grad is not None for p in model.blocks[1].ffn.experts.parameters())


def lrs(run: Path) -> dict[int, float]:
    return {r["step"]: r["lr"] for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())}


def test_extending_a_cosine_run_keeps_its_schedule(byte_data, tmp_path, capsys):
    """A larger max_steps on resume keeps the schedule the run took: its cosine ends where it ended and
    the steps past it run at the final lr (it used to restart the cosine from a high lr). A new
    span that would change the lr of steps already taken is refused."""
    cfg = tiny_train_config(byte_data, tmp_path / "run", max_steps=8, ckpt_interval=4, eval_interval=8)
    train(cfg)
    first = lrs(tmp_path / "run")
    floor = cfg.optim.lr * cfg.optim.min_lr_ratio
    assert first[8] == pytest.approx(floor)
    train(replace(cfg, max_steps=12, resume=True))
    resumed = lrs(tmp_path / "run")
    assert [resumed[s] for s in range(1, 9)] == [first[s] for s in range(1, 9)]
    assert [resumed[s] for s in range(9, 13)] == [pytest.approx(floor)] * 4
    out = capsys.readouterr().out
    assert "max_steps 8 -> 12" in out and "steps 9-12 run at its final lr" in out
    with pytest.raises(ConfigError, match="cannot be stretched at step 12"):
        train(replace(cfg, max_steps=16, resume=True, optim=replace(cfg.optim, schedule_steps=16)))


def test_a_wsd_run_resumed_in_its_stable_phase_may_move_its_decay(byte_data, tmp_path):
    """Warmup-stable-decay has one lr until its decay starts, so a run resumed in that stable phase can
    take a longer span (the decay moves to the new end) without changing any step it took; once
    its decay has begun that is refused."""
    optim = OptimConfig(lr=3e-3, warmup_steps=2, schedule="wsd", decay_fraction=0.5)
    cfg = tiny_train_config(byte_data, tmp_path / "run", max_steps=8, ckpt_interval=2, eval_interval=8, optim=optim,
                            keep_checkpoints=4)
    train(cfg)
    longer = replace(cfg, max_steps=12, resume=True, optim=replace(optim, schedule_steps=12))
    with pytest.raises(ConfigError, match="cannot be stretched at step 8"):  # the decay ran over steps 5-8
        train(longer)
    root = tmp_path / "run" / "checkpoints"
    for late in ("step_00000008", "step_00000006"):  # back to step 4, where the decay had not begun
        import shutil

        shutil.rmtree(root / late)
    (root / "latest").write_text("step_00000004\n")
    train(longer)
    got = lrs(tmp_path / "run")
    assert [got[s] for s in range(3, 7)] == [3e-3] * 4  # the stable phase now lasts to step 6
    assert got[7] == 3e-3 and got[8] < 3e-3 and got[12] == pytest.approx(3e-4, rel=1e-6)


def test_resume_takes_the_runs_config_and_may_change_what_does_not_touch_the_weights(byte_data, tmp_path, capsys):
    cfg = tiny_train_config(byte_data, tmp_path / "run", max_steps=4, ckpt_interval=2,
                            model=ModelConfig(vocab_size=256, dim=64, n_layers=2, n_heads=4, n_kv_heads=2,
                                              max_seq_len=64, ffn="moe", first_k_dense=1, mtp_depth=1,
                                              moe=MoEConfig(n_routed_experts=4, top_k=2, expert_dim=32)))
    train(cfg)
    capsys.readouterr()
    # loss weights, kernel backends and the balancing rate may change; each change is printed
    model = replace(cfg.model, mtp_lambda=0.1, moe=replace(cfg.model.moe, grouped_gemm="loop", bias_update_rate=0.0,
                                                           norm_topk_prob=True))
    train(replace(cfg, max_steps=6, resume=True, model=model))
    out = capsys.readouterr().out
    assert "model.mtp_lambda 0.3 -> 0.1" in out and "model.moe.grouped_gemm 'auto' -> 'loop'" in out
    with pytest.raises(CheckpointError, match=r"n_kv_heads: checkpoint 2 vs now 4"):
        train(replace(cfg, max_steps=8, resume=True, model=replace(model, n_kv_heads=4)))


def test_cli_resume_continues_the_run_it_was_given(byte_data, tmp_path, capsys):
    """The README's resume line: a run started with its own lr and kv heads resumes with them, though
    the resuming command names neither; only --max-steps changes, and the change is printed."""
    from effllm.cli import main

    base = ["train", "dense_tiny", "--data-dir", str(byte_data), "--out-dir", str(tmp_path / "gqa"),
            "--model.dim", "64", "--model.n-layers", "1", "--model.n-heads", "4", "--model.max-seq-len", "32",
            "--seq-len", "32", "--batch-size", "2", "--eval-tokens", "64", "--log-interval", "1", "--no-progress"]
    assert main([*base[:5], *base[5:], "--optim.lr", "1e-3", "--model.n-kv-heads", "2", "--max-steps", "3",
                 "--optim.warmup-steps", "1"]) == 0
    capsys.readouterr()
    assert main(["train", "dense_tiny", "--out-dir", str(tmp_path / "gqa"), "--max-steps", "5", "--resume",
                 "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "resuming at step 3" in out and "max_steps 3 -> 5" in out and "optim.lr" not in out
    config = json.loads((tmp_path / "gqa" / "config.json").read_text())
    assert config["optim"]["lr"] == 1e-3 and config["model"]["n_kv_heads"] == 2 and config["max_steps"] == 5
    assert lrs(tmp_path / "gqa")[5] == pytest.approx(1e-4)  # the 3-step schedule's final lr, not a fresh 3e-3


def test_ctrl_c_says_which_checkpoint_a_resume_continues_from(byte_data, tmp_path, monkeypatch, capsys):
    from effllm.cli import main

    real_batch = train_mod.TokenDataset.train_batch
    stop_at = {"step": 1}

    def interrupted(self, *args, **kwargs):
        if args[3] == stop_at["step"]:
            raise KeyboardInterrupt
        return real_batch(self, *args, **kwargs)

    monkeypatch.setattr(train_mod.TokenDataset, "train_batch", interrupted)
    with pytest.raises(TrainingInterrupted, match="during step 2; no checkpoint was written yet"):
        train(tiny_train_config(byte_data, tmp_path / "a", max_steps=8, ckpt_interval=4))
    stop_at["step"] = 5
    args = ["train", "dense_tiny", "--data-dir", str(byte_data), "--out-dir", str(tmp_path / "b"), "--model.dim", "64",
            "--model.n-layers", "1", "--model.n-heads", "4", "--model.max-seq-len", "32", "--seq-len", "32",
            "--batch-size", "2", "--eval-tokens", "64", "--ckpt-interval", "4", "--max-steps", "8", "--no-progress"]
    assert main(args) == 130
    assert "step_00000004 (step 4), is complete: continue with --resume" in capsys.readouterr().err


def test_a_run_directory_with_other_files_is_refused_before_any_work(byte_data, tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "thesis.tex").write_text("mine")
    with pytest.raises(OutputError, match=r"does not write \(thesis.tex\)"):
        train(tiny_train_config(byte_data, run, max_steps=2))
    assert sorted(p.name for p in run.iterdir()) == ["thesis.tex"]
    with pytest.raises(OutputError, match="is a file"):
        train(tiny_train_config(byte_data, run / "thesis.tex", max_steps=2))


@pytest.mark.parametrize("recipe", ["moe_tiny", "deepseek_tiny"])
@pytest.mark.slow
def test_moe_and_mla_recipes_repeat_and_resume_bit_for_bit_at_two_threads(recipe, byte_data, tmp_path, monkeypatch):
    """The same run twice gives the same losses float for float with 2 CPU threads, and so does a
    run killed after its checkpoint and resumed. The dispatch gather's gradient used to be autograd's
    accumulating index_put, whose sums came out in a different order on every run at 2 threads
    (moe_tiny differed from step 2, deepseek_tiny from step 6); it is now summed in a fixed order."""
    from effllm.cli import load_recipe

    torch.set_num_threads(2)
    cfg = replace(tiny_train_config(byte_data, tmp_path / "a", max_steps=6, ckpt_interval=3, eval_interval=6,
                                    batch_size=8, seq_len=64), model=load_recipe(recipe).model)
    train(cfg)
    train(replace(cfg, out_dir=str(tmp_path / "b")))
    assert losses(tmp_path / "a") == losses(tmp_path / "b")

    real_batch = train_mod.TokenDataset.train_batch

    def dies_at_step_5(self, *args, **kwargs):
        if args[3] == 4:
            raise Killed
        return real_batch(self, *args, **kwargs)

    monkeypatch.setattr(train_mod.TokenDataset, "train_batch", dies_at_step_5)
    with pytest.raises(Killed):
        train(replace(cfg, out_dir=str(tmp_path / "c")))
    monkeypatch.undo()
    train(replace(cfg, out_dir=str(tmp_path / "c"), resume=True))
    assert losses(tmp_path / "c") == losses(tmp_path / "a")


def test_timings_leave_out_evaluations_and_checkpoints(byte_data, tmp_path, monkeypatch, capsys):
    """train_s and tokens/s count training steps only: each evaluation and checkpoint is made 0.3 s
    slower, and neither the metrics' train_s at the evaluation steps nor any window's tokens/s nor
    the summary's pays for it. Without a terminal, each log interval prints a plain line."""
    import time

    pause = 0.3
    real_evaluate, real_save = train_mod.evaluate, train_mod._save

    def slow(fn):
        def wrapped(*args, **kwargs):
            time.sleep(pause)
            return fn(*args, **kwargs)
        return wrapped

    monkeypatch.setattr(train_mod, "evaluate", slow(real_evaluate))
    monkeypatch.setattr(train_mod, "_save", slow(real_save))
    cfg = tiny_train_config(byte_data, tmp_path / "run", max_steps=8, eval_interval=2, ckpt_interval=2, log_interval=2)
    summary = train(cfg)
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert summary["eval_s"] >= 4 * pause and summary["ckpt_s"] >= 4 * pause
    assert summary["train_s"] == pytest.approx(summary["elapsed_s"] - summary["eval_s"] - summary["ckpt_s"])
    assert summary["tokens_per_s"] == pytest.approx(summary["tokens_seen"] / summary["train_s"], rel=1e-6)
    steps_s = [b["train_s"] - a["train_s"] for a, b in zip(records, records[1:])]
    assert max(steps_s) < pause, steps_s  # two tiny steps, no evaluation or checkpoint in them
    assert min(r["tokens_per_s"] for r in records) > 2 * cfg.tokens_per_step / pause
    state = ckpt_io.read_state(ckpt_io.latest_checkpoint(tmp_path / "run" / "checkpoints"))
    assert state["device_name"] == summary["device"] and state["train_s"] < state["elapsed_s"] - 3 * pause
    assert f"(on {summary['device']}, precision" in (tmp_path / "run" / "MODEL_CARD.md").read_text()
    out = capsys.readouterr().out
    assert "step 2/8 | loss " in out and " tokens/s | ETA " in out and "step 8/8 | loss" in out


def test_a_warmup_longer_than_the_run_is_said(byte_data, tmp_path, capsys):
    cfg = tiny_train_config(byte_data, tmp_path / "run", max_steps=3, optim=OptimConfig(lr=3e-3, warmup_steps=5))
    assert cfg.warnings() and "never leaves warmup" in cfg.warnings()[0]
    train(cfg)
    assert "effllm: warning: optim.warmup_steps=5 spans the whole 3-step schedule" in capsys.readouterr().out
    assert tiny_train_config(byte_data, tmp_path / "b", max_steps=3).warnings() == []


@pytest.mark.parametrize("field,value", [("lr", 0.0), ("lr", float("nan")), ("beta1", 1.0), ("beta2", -0.1),
                                         ("min_lr_ratio", 1.5), ("eps", 0.0), ("weight_decay", -0.1),
                                         ("grad_clip", -1.0), ("warmup_steps", -1)])
def test_optimizer_settings_that_cannot_work_are_refused_on_construction(field, value):
    with pytest.raises(ConfigError, match=f"optim.{field}=.* cannot work — use "):
        OptimConfig(**{field: value})


@pytest.mark.parametrize("signame", ["SIGTERM", "SIGINT"])
def test_a_stop_signal_checkpoints_the_step_and_resume_continues_exactly(byte_data, tmp_path, monkeypatch, signame):
    """Preemption (SIGTERM) or a first Ctrl-C during step 6 lets that step finish, writes its
    checkpoint (the last interval's was at 4), exits 128 + the signal naming the checkpoint, and
    puts the previous signal handlers back; --resume then repeats the uninterrupted run."""
    import os
    import signal

    signum = getattr(signal, signame)
    cfg = tiny_train_config(byte_data, tmp_path / "full", max_steps=10, ckpt_interval=4)
    train(cfg)
    reference = losses(tmp_path / "full")
    real_batch = train_mod.TokenDataset.train_batch

    def signalled_in_step_6(self, *args, **kwargs):
        if args[3] == 5 and kwargs.get("micro", args[5] if len(args) > 5 else 0) == 0:
            os.kill(os.getpid(), signum)
        return real_batch(self, *args, **kwargs)

    before = signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)
    monkeypatch.setattr(train_mod.TokenDataset, "train_batch", signalled_in_step_6)
    cut = replace(cfg, out_dir=str(tmp_path / "cut"))
    with pytest.raises(TrainingInterrupted, match=f"stopped by {signame} after step 6; the checkpoint .*step_00000006 "
                                                  "is complete: continue with --resume") as stopped:
        train(cut)
    monkeypatch.undo()
    assert stopped.value.exit_code == 128 + signum
    assert (signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)) == before
    assert ckpt_io.latest_checkpoint(tmp_path / "cut" / "checkpoints").name == "step_00000006"
    train(replace(cut, resume=True))
    assert losses(tmp_path / "cut") == reference


def test_effllm_eval_scores_a_checkpoint_as_the_run_did(byte_data, tmp_path, capsys):
    """effllm eval on the run's own windows gives the run's last val loss; perplexity and bits per
    byte follow from it (byte tokens: one byte each, the end-of-text mark none)."""
    from effllm.cli import main
    from effllm.data import TokenDataset
    from effllm.run import evaluate_checkpoint

    summary = train(tiny_train_config(byte_data, tmp_path / "run", max_steps=3, eval_interval=3, eval_tokens=256))
    r = evaluate_checkpoint(tmp_path / "run", max_tokens=256, batch_size=4)
    assert r["loss"] == pytest.approx(summary["final_val_loss"], rel=1e-6) and r["tokens"] == 256
    targets = TokenDataset(byte_data).splits["val"][1:257]
    assert r["bytes"] == int((targets != 0).sum()) and r["perplexity"] == pytest.approx(math.exp(r["loss"]))
    assert r["bits_per_byte"] == pytest.approx(r["loss"] * 256 / r["bytes"] / math.log(2))
    capsys.readouterr()
    assert main(["eval", "--checkpoint", str(tmp_path / "run"), "--json"]) == 0
    whole = json.loads(capsys.readouterr().out)
    assert whole["tokens"] == (len(TokenDataset(byte_data).splits["val"]) - 1) // 32 * 32  # the whole split


def tensorboard_scalars(run: Path) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run / "tensorboard"))
    events.Reload()
    return {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


def test_tensorboard_holds_the_metrics_scalars_and_a_resume_keeps_one_value_per_step(byte_data, tmp_path,
                                                                                     monkeypatch):
    """--tensorboard writes every number of metrics.jsonl as a scalar (tags: the keys, nested ones
    joined by "/", the MoE load per layer included) at its step. A run killed after its checkpoint
    and resumed purges the events past the checkpoint: one value per step, those of the metrics."""
    moe = replace(tiny_train_config(byte_data, tmp_path).model, ffn="moe", first_k_dense=1,
                  moe=MoEConfig(n_routed_experts=4, top_k=2, expert_dim=32))
    cfg = tiny_train_config(byte_data, tmp_path / "run", model=moe, max_steps=8, tensorboard=True)
    real_batch = train_mod.TokenDataset.train_batch

    def dies_at_step_7(self, *args, **kwargs):
        if args[3] == 6:  # after the step-4 checkpoint and the metrics of steps 5 and 6
            raise Killed
        return real_batch(self, *args, **kwargs)

    monkeypatch.setattr(train_mod.TokenDataset, "train_batch", dies_at_step_7)
    with pytest.raises(Killed):
        train(cfg)
    monkeypatch.undo()
    assert [s for s, _ in tensorboard_scalars(tmp_path / "run")["loss"]] == [1, 2, 3, 4, 5, 6]
    train(replace(cfg, resume=True))

    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    scalars = tensorboard_scalars(tmp_path / "run")
    assert {"loss", "lr", "grad_norm", "tokens_per_s", "val_loss", "moe_aux_loss", "moe_load/blocks.1.ffn/cv",
            "moe_load/blocks.1.ffn/max_over_mean"} <= set(scalars)
    for tag, values in scalars.items():
        keys = tag.split("/")
        expected = []
        for r in records:
            value = r
            for key in keys:
                value = value.get(key) if isinstance(value, dict) else None
            if value is not None:
                expected.append((r["step"], pytest.approx(value, rel=1e-6)))  # TensorBoard keeps float32
        assert values == expected, tag
    assert [s for s, _ in scalars["loss"]] == list(range(1, 9)) and [s for s, _ in scalars["val_loss"]] == [4, 8]


def test_tensorboard_without_the_package_is_refused_before_any_work(byte_data, tmp_path, monkeypatch):
    import importlib.util

    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "tensorboard"
                        else real_find_spec(name, *a))
    with pytest.raises(ConfigError, match=r"pip install 'effllm\[tensorboard\]'"):
        train(tiny_train_config(byte_data, tmp_path / "run", tensorboard=True))
    assert not (tmp_path / "run").exists()
