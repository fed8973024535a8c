"""Shared fixtures: a small real corpus (one package of the standard library) prepared once."""

from __future__ import annotations

import json
import os
import sysconfig
from dataclasses import replace
from pathlib import Path

import pytest
import torch

# Without a GPU the Triton kernels run in Triton's interpreter. triton.jit reads this variable when
# a kernel is decorated, so it must be set before effllm.kernels is first imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
else:  # on a GPU the FP8 kernels run one fixed configuration: autotuning every test shape takes minutes
    os.environ.setdefault("EFFLLM_FP8_AUTOTUNE", "0")

from effllm.data import PrepareConfig, prepare

# Relative error allowed between the FP8 GEMM and an exact sum of the same quantized operands. On a
# CPU (the interpreter, or the PyTorch path) every sum is fp32: 1e-6. On NVIDIA tensor cores each
# 128-wide K block is summed in the FP8 MMA's own accumulator, which keeps about 14 bits (DeepSeek-V3
# report §3.3.2), before the kernel promotes it to fp32: measured 1.25e-4 on an H100 (K=256), so
# 2^-11 there. tests/test_fp8_gemm.py checks on the GPU that the error does not grow with K.
FP8_SUM_TOL = 2**-11 if torch.cuda.is_available() else 1e-6
from effllm.model import ModelConfig, Transformer
from effllm.train import OptimConfig, TrainConfig, train

# The `email` package of the running Python: ~0.4 MB of real text, ~30 files, PSF licence.
SMALL_CORPUS = Path(sysconfig.get_paths()["stdlib"]) / "email"


@pytest.fixture(autouse=True)
def _threads():
    # Small tensors: one thread avoids oversubscription when the suite runs beside other work.
    torch.set_num_threads(1)
    yield


@pytest.fixture(scope="session")
def small_prepare_config() -> PrepareConfig:
    return PrepareConfig(sources=(str(SMALL_CORPUS),), license="PSF-2.0", extensions=(".py",), val_fraction=0.15)


@pytest.fixture(scope="session")
def byte_data(tmp_path_factory, small_prepare_config) -> Path:
    out = tmp_path_factory.mktemp("data") / "email-byte"
    return prepare(replace(small_prepare_config, out=str(out)), progress=False)


def tiny_train_config(data_dir: Path, out_dir: Path, **overrides) -> TrainConfig:
    """A model and run small enough to take a second or two per few steps on one core. On the CPU
    even where a GPU is present: exact resume is promised (and tested) bit for bit on the CPU."""
    fields = dict(
        model=ModelConfig(vocab_size=256, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=64),
        optim=OptimConfig(lr=3e-3, warmup_steps=2),
        data_dir=str(data_dir), out_dir=str(out_dir), batch_size=4, seq_len=32, max_steps=8,
        log_interval=1, eval_interval=4, eval_tokens=256, ckpt_interval=4, progress=False, device="cpu",
    )
    fields.update(overrides)
    return TrainConfig(**fields)


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


def perturbed_model(cfg: ModelConfig, seed: int = 0) -> Transformer:
    """A model whose weights are pushed past their small init, so that every position matters and
    equality checks between decoding paths have teeth."""
    torch.manual_seed(seed)
    model = Transformer(cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model


def assert_fp8_trains_like_fp32(data_dir, out: Path, model: ModelConfig) -> None:
    """Train `model` 200 steps in fp32 and in FP8 with the same seed and data (2,048 tokens per step,
    lr 1e-3: a regime where 1% is not seed noise); the final val losses must be within 1%, and the
    FP8 run must learn (well under the unigram bar, its loss curve falling)."""
    common = dict(model=model, max_steps=200, eval_interval=200, eval_tokens=16384, ckpt_interval=0, batch_size=32,
                  seq_len=64, optim=OptimConfig(lr=1e-3, warmup_steps=20))
    full = train(tiny_train_config(data_dir, out / "fp32", **common))
    fp8 = train(tiny_train_config(data_dir, out / "fp8", fp8=True, **common))
    assert fp8["final_val_loss"] < fp8["unigram_val_loss"] - 0.2
    assert abs(fp8["final_val_loss"] - full["final_val_loss"]) / full["final_val_loss"] < 0.01, (fp8, full)
    curve = [json.loads(line)["loss"] for line in (out / "fp8" / "metrics.jsonl").read_text().splitlines()]
    assert sum(curve[-10:]) / 10 < sum(curve[:10]) / 10 - 1.5
