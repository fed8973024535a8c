"""The `effllm` command as a user runs it: help, recipes, prepare -> train -> generate, bad input."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch
from helpers import SMALL_CORPUS

from effllm.cli import load_recipe, recipe_names
from effllm.errors import ConfigError
from effllm.flops import train_flops_per_token
from effllm.model import Transformer
from effllm.train import TrainConfig


def effllm(*args: str, cwd=None) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "effllm", *args], capture_output=True, text=True, cwd=cwd,
                          env=env, timeout=300)


def test_help_lists_commands_and_every_train_field():
    top = effllm("--help")
    assert top.returncode == 0 and all(c in top.stdout for c in ("prepare", "train", "generate"))
    helptext = effllm("train", "dense_tiny", "--help")
    assert helptext.returncode == 0
    for name in TrainConfig.__dataclass_fields__:
        if name not in ("model", "optim"):
            assert f"--{name.replace('_', '-')}" in helptext.stdout, name
    for flag in ("--model.n-heads", "--model.n-kv-heads", "--optim.lr", "--optim.schedule"):
        assert flag in helptext.stdout
    listing = effllm("recipes").stdout
    assert re.search(r"^deepseek_tiny +4\.64M total, 1\.77M active \(\+1\.46M MTP, trained alongside\) +the DeepSeek-V3 "
                     "recipe in miniature", listing, re.M), listing
    assert len(listing.splitlines()) == len(recipe_names())


def test_unknown_recipe_is_a_clear_error():
    result = effllm("train", "no_such_recipe")
    assert result.returncode == 2
    assert "unknown recipe 'no_such_recipe'" in result.stderr and "dense_tiny" in result.stderr
    assert "Traceback" not in result.stderr
    with pytest.raises(ConfigError, match="unknown recipe"):
        load_recipe("nope")


BAD_INPUT = [  # (command line, what the one error line must name)
    (["train", "dense_tiny", "--optim.lr", "-1"], "optim.lr=-1.0"),
    (["train", "dense_tiny", "--optim.lr", "0"], "optim.lr=0.0"),
    (["train", "dense_tiny", "--optim.beta2", "1.5"], "optim.beta2=1.5"),
    (["train", "dense_tiny", "--optim.min-lr-ratio", "2"], "optim.min_lr_ratio=2.0"),
    (["train", "dense_tiny", "--optim.weight-decay", "-1"], "optim.weight_decay=-1.0"),
    (["train", "dense_tiny", "--optim.grad-clip", "-1"], "optim.grad_clip=-1.0"),
    (["train", "dense_tiny", "--ckpt-interval", "-5"], "ckpt_interval=-5"),
    (["train", "dense_tiny", "--batch-size", "0"], "batch_size must be positive"),
    (["train", "dense_tiny", "--seq-len", "4096"], "exceeds model.max_seq_len"),
    (["train", "dense_tiny", "--model.n-heads", "5"], "not divisible by model.n_heads=5"),
    (["train", "dense_tiny", "--optim.beta2", "x"], "--optim.beta2: could not convert"),
    (["train", "dense_tiny", "--optim.lrr", "3"], "did you mean --optim.lr?"),
    (["train", "dense_tiny", "--precision", "fp16"], "'fp16' is not one of auto, fp32, bf16"),
    (["generate", "--checkpoint", "run", "--temperature", "-1"], "temperature=-1.0"),
    (["generate", "--checkpoint", "run", "--top-k", "0"], "top_k=0"),
    (["generate", "--checkpoint", "run", "--max-new-tokens", "0"], "max_new_tokens=0"),
    (["generate"], "missing --checkpoint"),
    (["generate", "--checkpoint", "run", "--speculative"], "pass --temperature 0 with --speculative"),
    (["prepare", "--val-fraction", "2"], "val_fraction"),
]


@pytest.mark.parametrize("argv,names", BAD_INPUT, ids=[" ".join(a[1:]) or a[0] for a, _ in BAD_INPUT])
def test_bad_input_fails_first_as_one_line_naming_the_problem_and_the_fix(argv, names, tmp_path, capsys,
                                                                          monkeypatch):
    """Every bad value stops the command before any work, with exit code 2 and one line
    `effllm: error: <what> — <how to fix>`: no traceback, no tyro box."""
    monkeypatch.chdir(tmp_path)  # nothing may be written: the folder must stay empty
    from effllm.cli import main

    assert main(argv) == 2
    out, err = capsys.readouterr()
    line = err.strip()
    assert "\n" not in line and line.startswith("effllm: error: ") and names in line, err
    assert " — " in line and "Traceback" not in err and "╭" not in err + out, err
    assert list(tmp_path.iterdir()) == []


def test_asking_for_more_tokens_than_the_context_holds_is_refused(byte_data, tmp_path):
    """generate used to cut --max-new-tokens silently at the model's context."""
    from helpers import tiny_train_config

    from effllm.cli import GenerateConfig, generate_text
    from effllm.train import train

    train(tiny_train_config(byte_data, tmp_path / "run", max_steps=1, eval_interval=1, ckpt_interval=1))
    with pytest.raises(ConfigError, match=r"context is 64 tokens and the prompt takes 4 — pass --max-new-tokens 60"):
        generate_text(GenerateConfig(checkpoint=str(tmp_path / "run"), prompt="def ", max_new_tokens=61))
    assert generate_text(GenerateConfig(checkpoint=str(tmp_path / "run"), prompt="def ", max_new_tokens=60))


def test_generate_speculative_drafts_with_the_mtp_module_and_gives_the_greedy_text(byte_data, tmp_path, capsys):
    from dataclasses import replace

    from helpers import tiny_train_config

    from effllm.cli import GenerateConfig, generate_text, main
    from effllm.train import train

    cfg = tiny_train_config(byte_data, tmp_path / "mtp", max_steps=2, eval_interval=2, ckpt_interval=2)
    train(replace(cfg, model=replace(cfg.model, mtp_depth=1)))
    greedy = generate_text(GenerateConfig(checkpoint=str(tmp_path / "mtp"), prompt="def ", max_new_tokens=20,
                                          temperature=0))
    capsys.readouterr()
    assert main(["generate", "--checkpoint", str(tmp_path / "mtp"), "--prompt", "def ", "--max-new-tokens", "20",
                 "--temperature", "0", "--speculative"]) == 0
    out, err = capsys.readouterr()
    assert out == greedy + "\n" and re.search(r"speculative: \d+ of \d+ MTP drafts accepted", err)
    train(replace(cfg, out_dir=str(tmp_path / "plain")))
    with pytest.raises(ConfigError, match="no MTP module to draft with"):
        generate_text(GenerateConfig(checkpoint=str(tmp_path / "plain"), temperature=0, speculative=True))


def test_heads_that_do_not_divide_dim_fail_before_any_work(tmp_path):
    result = effllm("train", "dense_tiny", "--model.n-heads", "5", "--out-dir", str(tmp_path / "run"))
    assert result.returncode != 0
    assert "not divisible by model.n_heads=5" in result.stdout + result.stderr
    assert not (tmp_path / "run").exists()


def test_recipes_are_valid_configs():
    for name in recipe_names():
        cfg = load_recipe(name)
        assert isinstance(cfg, TrainConfig)
        with torch.device("meta"):  # the GPU-sized recipes would take gigabytes to build for real
            model = Transformer(cfg.model)
        assert model.param_counts()["total"] > 0 and train_flops_per_token(cfg.model, cfg.seq_len) > 0


@pytest.mark.slow
def test_prepare_train_resume_generate_end_to_end(tmp_path):
    data, run = tmp_path / "data", tmp_path / "run"
    result = effllm("prepare", "--sources", str(SMALL_CORPUS), "--license", "PSF-2.0", "--extensions", ".py",
                    "--val-fraction", "0.15", "--out", str(data))
    assert result.returncode == 0, result.stderr
    assert "unigram val loss" in result.stdout
    common = ["--data-dir", str(data), "--out-dir", str(run), "--model.dim", "32", "--model.n-layers", "1",
              "--model.n-heads", "2", "--model.max-seq-len", "32", "--seq-len", "32", "--batch-size", "2",
              "--eval-tokens", "64", "--eval-interval", "2", "--log-interval", "1", "--no-progress"]
    first = effllm("train", "dense_tiny", *common, "--max-steps", "3")
    assert first.returncode == 0, first.stderr
    again = effllm("train", "dense_tiny", *common, "--max-steps", "3")
    assert again.returncode == 2 and "--resume" in again.stderr  # never silently overwrites a run
    resumed = effllm("train", "dense_tiny", *common, "--max-steps", "5", "--resume")
    assert resumed.returncode == 0, resumed.stderr
    steps = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4, 5]
    out = effllm("generate", "--checkpoint", str(run), "--prompt", "class ", "--max-new-tokens", "12")
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("class ")
    missing = effllm("generate", "--checkpoint", str(tmp_path / "nothing"))
    assert missing.returncode == 2 and "no checkpoint found" in missing.stderr


def test_wheel_ships_kernels_and_recipes_inside_the_package(tmp_path):
    root = Path(__file__).resolve().parents[1]
    build = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                            "-w", str(tmp_path), str(root)], capture_output=True, text=True, timeout=300)
    assert build.returncode == 0, build.stderr
    (wheel,) = tmp_path.glob("effllm-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert "effllm/kernels/__init__.py" in names and "effllm/recipes/dense_tiny.py" in names
    assert not [n for n in names if n.split("/")[0] in ("kernels", "recipes", "tests", "benchmarks")]
    entry_points = zipfile.ZipFile(wheel).read(next(n for n in names if n.endswith("entry_points.txt"))).decode()
    assert "effllm = effllm.cli:console" in entry_points


@pytest.mark.parametrize("world_size", ["1", "2"])
@pytest.mark.slow
def test_the_command_flushes_its_output_and_keeps_its_exit_code_under_torchrun(world_size):
    """Under torchrun (WORLD_SIZE > 1) `python -m effllm` ends with os._exit, skipping the
    interpreter's finalization, in which gloo's threads could abort a finished rank. Its output
    must still arrive whole through a pipe (block-buffered, so lost without a flush), and its exit
    code must be main()'s."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"} | {"WORLD_SIZE": world_size}
    ok = subprocess.run([sys.executable, "-m", "effllm", "recipes"], capture_output=True, text=True, env=env,
                        timeout=120)
    assert ok.returncode == 0 and [line.split()[0] for line in ok.stdout.splitlines()] == recipe_names()
    bad = subprocess.run([sys.executable, "-m", "effllm", "no-such-command"], capture_output=True, text=True,
                         env=env, timeout=120)
    assert bad.returncode == 2 and "unknown command 'no-such-command'" in bad.stderr


def test_help_on_every_config_shows_what_each_field_means():
    """help(MoEConfig) and the other configs list every field with its default and the comment
    `--help` shows (effllm.docfields.documented), not one line."""
    import dataclasses

    from effllm.card import CardConfig
    from effllm.cli import GenerateConfig
    from effllm.config import OptimConfig
    from effllm.docfields import field_comments
    from effllm.hf import ExportConfig
    from effllm.mla import MLAConfig
    from effllm.model import ModelConfig
    from effllm.moe import MoEConfig
    from effllm.prepare import PrepareConfig

    for cls in (TrainConfig, OptimConfig, ModelConfig, MoEConfig, MLAConfig, PrepareConfig, GenerateConfig,
                CardConfig, ExportConfig):
        comments = field_comments(cls)
        for f in dataclasses.fields(cls):
            assert comments.get(f.name), f"{cls.__name__}.{f.name} has no comment to show in --help and help()"
            assert f"\n    {f.name} " in cls.__doc__ and comments[f.name] in cls.__doc__, (cls.__name__, f.name)
    assert "top_k = 2: K routed experts per token" in MoEConfig.__doc__


def test_train_from_a_config_file_or_from_a_run(byte_data, tmp_path, capsys):
    """`effllm train config.yaml|json` takes any subset of TrainConfig's fields (an unknown one is
    refused with its closest match); `effllm train --from RUN_DIR` starts a new run with that run's
    configuration, the command line changing what it names."""
    import yaml

    from effllm.cli import config_from_file, main

    spec = {"model": {"dim": 32, "n_layers": 1, "n_heads": 2, "max_seq_len": 32}, "optim": {"lr": 1e-3, "warmup_steps": 1},
            "data_dir": str(byte_data), "out_dir": str(tmp_path / "a"), "batch_size": 2, "seq_len": 32, "max_steps": 2,
            "eval_tokens": 64, "progress": False}
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(spec))
    (tmp_path / "c.json").write_text(json.dumps(spec))
    cfg = config_from_file(tmp_path / "c.yaml")
    assert cfg == config_from_file(tmp_path / "c.json")
    assert cfg.model.dim == 32 and cfg.optim.lr == 1e-3 and cfg.optim.beta2 == TrainConfig().optim.beta2
    assert main(["train", str(tmp_path / "c.yaml")]) == 0
    assert main(["train", "--from", str(tmp_path / "a"), "--out-dir", str(tmp_path / "b"), "--max-steps", "3"]) == 0
    a, b = (json.loads((tmp_path / r / "config.json").read_text()) for r in "ab")
    assert b["model"] == a["model"] and b["optim"]["lr"] == 1e-3 and b["max_steps"] == 3
    assert b["optim"]["schedule_steps"] == 3  # a new run: its own schedule, not the first run's 2 steps
    capsys.readouterr()
    (tmp_path / "typo.json").write_text(json.dumps({"optim": {"lrr": 1.0}}))
    assert main(["train", str(tmp_path / "typo.json")]) == 2
    assert "'lrr' is no field of OptimConfig — did you mean 'lr'?" in capsys.readouterr().err
    assert main(["train", "--from", str(tmp_path / "nowhere")]) == 2
    assert "no config.json there" in capsys.readouterr().err
