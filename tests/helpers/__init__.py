"""What the tests share: tolerances, small random inputs, tiny training runs, fixtures built once.

Test modules import from here (`from helpers import ...`; tests/ is on sys.path under pytest);
conftest.py holds only pytest's hooks and fixtures. The scripts beside this file (die_at_step.py,
train_several.py) are run by tests in subprocesses.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import socket
import sysconfig
from collections.abc import Callable
from pathlib import Path

import torch

from effllm import flops
from effllm.config import OptimConfig, TrainConfig
from effllm.model import ModelConfig, Transformer
from effllm.train import train

# Relative error allowed between the FP8 GEMM and an exact sum of the same quantized operands. On a
# CPU (the interpreter, or the PyTorch path) every sum is fp32: 1e-6. On NVIDIA tensor cores each
# 128-wide K block is summed in the FP8 MMA's own accumulator, which keeps about 14 bits (DeepSeek-V3
# report §3.3.2), before the kernel promotes it to fp32: measured 1.25e-4 on an H100 (K=256), so
# 2^-11 there. tests/test_fp8_gemm.py checks on the GPU that the error does not grow with K.
FP8_SUM_TOL = 2**-11 if torch.cuda.is_available() else 1e-6

# The relative error ‖out − ref‖ / ‖ref‖ (`rel`) a kernel may have against its reference on the
# same inputs, for every kernel test:
# - per dtype of the operands, against a float64 reference: fp32 differs by summation order only;
#   fp16 and bf16 round the inputs and the output (2^-11 and 2^-8 per rounding), over K-long sums;
# - "fp8_sum": an FP8 GEMM against the exact sum of the same quantized operands (FP8_SUM_TOL);
# - "bf16_output": an fp32-accumulated result rounded once to bf16 (2^-9 relative, twice over).
REL_TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2,
           "fp8_sum": FP8_SUM_TOL, "bf16_output": 4e-3}


def rel(out: torch.Tensor, ref: torch.Tensor) -> float:
    """‖out − ref‖ / ‖ref‖ in float64."""
    ref = ref.double()
    return ((out.double() - ref).norm() / ref.norm().clamp_min(1e-30)).item()


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal bit for bit (an FP8 tensor's bytes, NaN payloads and signed zeros included)."""
    return torch.equal(a.view(torch.uint8), b.view(torch.uint8))


def randn(*shape: int, seed: int, scale: float = 1.0, device: str = "cpu") -> torch.Tensor:
    """Fresh normal values from their own generator: the same for a seed on every machine."""
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=g) * scale).to(device)


def full_attention_extra(cfg: ModelConfig, length: int) -> float:
    """Per position: what attending all `length` keys costs beyond the causal (length+1)/2 that
    effllm.flops counts (a FLOP counter on SDPA's math kernel counts every query against every key)."""
    per_key = 2 * (flops.attention_flops(cfg, 1) - flops.attention_flops(cfg, 0))  # mixing FLOPs per key
    return per_key * (length - (length + 1) / 2)


def free_port() -> int:
    """A TCP port no one listens on (for a process group's rendezvous)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# The `email` package of the running Python: ~0.4 MB of real text, ~30 files, PSF licence.
SMALL_CORPUS = Path(sysconfig.get_paths()["stdlib"]) / "email"


def built_once(tmp_path_factory, name: str, build: Callable[[Path], dict]) -> dict:
    """What `build(folder)` makes (its files in folder, and the JSON-able dict it returns), made once
    per test session, also when the suite runs on several workers (make test: pytest -n 2): the first
    worker to ask builds it under a lock in the folder the workers share, the others wait and read it.
    For fixtures that cost tens of seconds, such as a torchrun launch that several tests read."""
    base = tmp_path_factory.getbasetemp()
    root = (base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base) / f"built-once-{name}"
    with open(f"{root}.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
        done = root / "built.json"
        if not done.exists():
            shutil.rmtree(root, ignore_errors=True)  # what a failed build left
            root.mkdir()
            done.write_text(json.dumps(build(root)))
        return json.loads(done.read_text())


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


def perturbed_model(cfg: ModelConfig, seed: int = 0) -> Transformer:
    """A model whose weights are pushed past their small init, so that every position matters and
    equality checks between decoding paths have teeth."""
    torch.manual_seed(seed)
    model = Transformer(cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model


def assert_fp8_trains_like_fp32(data_dir, out: Path, model: ModelConfig, seeds: tuple[int, ...] = (1, 2),
                                recipe: str = "blockwise", bound: float = 0.01) -> None:
    """Train `model` 100 steps in fp32 and in FP8 from each seed, on the same data (2,048 tokens per
    step, lr 1e-3): the FP8 runs' val loss (FP8 `recipe`) must be within `bound` (1%) of the fp32
    runs', as a mean over the seeds of each pair's relative difference, and every FP8 run must learn
    (well under the unigram bar, its loss curve falling).

    Why a mean over paired seeds: one pair of runs measures where two trajectories land, not what
    FP8 costs. Any perturbation of the gradients of about 1% moves the end of a run by several tenths
    of a percent, FP8 or not. Measured on 2 CPU cores with the FP8-experts model of
    tests/test_fp8_experts.py (README, "FP8 experts and the loss they cost"): 1% Gaussian noise on the
    dense weights' gradients of an fp32 run moved its 200-step val loss by -0.28 to +0.51%; the FP8
    experts' 200-step gap was +0.93% before a change of fp32 summation order inside the FP8 GEMM and
    -0.06% after. Paired over seeds at 100 steps the gaps spread by 0.24% (MoE, 6 seeds) and 0.12%
    (dense, 4 seeds) around a mean of -0.05% and 0.00%, so the mean of 2 pairs stays 6 (MoE) and 12
    (dense) standard deviations inside the 1% bound."""
    common = dict(model=model, max_steps=100, eval_interval=100, eval_tokens=16384, ckpt_interval=0, batch_size=32,
                  seq_len=64, optim=OptimConfig(lr=1e-3, warmup_steps=20))
    gaps = []
    for seed in seeds:
        full = train(tiny_train_config(data_dir, out / f"fp32-{seed}", seed=seed, **common))
        fp8 = train(tiny_train_config(data_dir, out / f"fp8-{seed}", seed=seed, fp8=True, fp8_recipe=recipe, **common))
        assert fp8["final_val_loss"] < fp8["unigram_val_loss"] - 0.2
        # on the CPU: the PyTorch reference (blockwise), torch's own row-wise F.scaled_mm (rowwise)
        assert fp8["fp8_backend"] == ("torch" if recipe == "blockwise" else "torch.scaled_mm rowwise")
        assert full["fp8_backend"] is None and fp8["fp8_recipe"]["linears"] == recipe
        curve = [json.loads(line)["loss"] for line in (out / f"fp8-{seed}" / "metrics.jsonl").read_text().splitlines()]
        assert sum(curve[-10:]) / 10 < sum(curve[:10]) / 10 - 1.5
        gaps.append((fp8["final_val_loss"] - full["final_val_loss"]) / full["final_val_loss"])
    assert abs(sum(gaps) / len(gaps)) < bound, gaps


LANGUAGE_SAMPLES = {  # several sentences each, so the identifier has something to read
    "nl": "Het regent vandaag in Amsterdam en de fietsers rijden langs de grachten naar hun werk. "
          "De bakker op de hoek verkoopt vers brood en de kinderen lopen met hun ouders naar school.",
    "de": "Heute regnet es in Berlin, und die Radfahrer fahren durch die Straßen zu ihrer Arbeit. "
          "Der Bäcker an der Ecke verkauft frisches Brot, und die Kinder gehen mit ihren Eltern zur Schule.",
    "en": "It is raining in London today and the cyclists ride along the river to their offices. "
          "The baker on the corner sells fresh bread and the children walk to school with their parents.",
}
