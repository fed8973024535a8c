"""The memory estimate a run prints and checks before it allocates anything (effllm.memory)."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from effllm.errors import ConfigError
from effllm.memory import activation_elements, check_fits, estimate
from effllm.mla import MLAConfig
from effllm.model import ModelConfig, Transformer
from effllm.moe import MoEConfig
from effllm.recipes import deepseek_600m, deepseek_tiny, dense_tiny, moe_tiny

MODELS = {
    "dense_tiny": dense_tiny.config().model,
    "moe_tiny": moe_tiny.config().model,
    "deepseek_tiny": deepseek_tiny.config().model,  # MLA + MoE + MTP
    "gqa": ModelConfig(vocab_size=256, dim=96, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=64),
    "mla-q-latent": ModelConfig(vocab_size=256, dim=96, n_layers=2, n_heads=4, max_seq_len=64, attention="mla",
                                mla=MLAConfig(q_lora_rank=48, kv_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=8,
                                              v_head_dim=16)),
    "moe-shared-2-mtp": ModelConfig(vocab_size=256, dim=64, n_layers=2, n_heads=4, max_seq_len=64, ffn="moe",
                                    first_k_dense=1, mtp_depth=1,
                                    moe=MoEConfig(n_routed_experts=8, top_k=2, expert_dim=32, n_shared_experts=2)),
}


def saved_bytes_per_token(model: Transformer, batch: int, seq: int) -> float:
    """The bytes autograd keeps for the backward pass of one training forward, per token: every
    distinct storage a saved tensor points into, the parameters left out."""
    storages = {}

    def pack(t):
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    x = torch.randint(0, model.cfg.vocab_size, (batch, seq))
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(x, x, return_aux=True)
    return sum(n for ptr, n in storages.items() if ptr not in params) / (batch * seq)


@pytest.mark.parametrize("name", MODELS)
def test_the_activation_count_is_what_autograd_saves(name):
    """Counted from the shapes, within 25% of the measured bytes (measured: 0.96-1.06x)."""
    cfg = MODELS[name]
    torch.manual_seed(0)
    model = Transformer(cfg).train()
    every, _, head = activation_elements(cfg)
    estimated = (every + head) * 4  # fp32 on the CPU
    measured = saved_bytes_per_token(model, 4, min(128, cfg.max_seq_len))
    assert 0.75 < estimated / measured < 1.25, (estimated, measured)


def test_a_run_that_cannot_fit_is_refused_before_allocation_with_the_remedies():
    cfg = replace(deepseek_600m.config(), device="cpu")  # fp32 on a CPU: ~44 GiB
    est = estimate(cfg)
    assert est.states == pytest.approx((619.80e6 + 57.51e6) * 16, rel=1e-3)  # fp32 weights, grads, AdamW
    with pytest.raises(ConfigError, match=r"needs ~4\d\.\d\d GiB .* cpu has 24\.00 GiB free — a smaller --batch-size "
                                          r"with --grad-accum .*--activation-checkpointing.*--no-memory-check"):
        check_fits(cfg, est, torch.device("cpu"), available=24 * 2**30)
    check_fits(cfg, est, torch.device("cpu"), available=64 * 2**30)  # fits: no error
    lean = estimate(replace(cfg, activation_checkpointing=True))
    assert lean.states == est.states and lean.activations < est.activations / 5
    assert estimate(replace(cfg, batch_size=8)).activations == pytest.approx(est.activations / 2)


def test_the_trainer_refuses_before_building_the_model(byte_data, tmp_path, monkeypatch, capsys):
    """`effllm train deepseek_600m` on a 24 GiB CPU machine used to be killed by the OOM killer."""
    import sys

    from effllm import memory
    from effllm.cli import main

    monkeypatch.setattr(memory, "available_bytes", lambda device: 8 * 2**30)  # ~18 GiB needed at seq 256
    built = []
    monkeypatch.setattr(sys.modules["effllm.train"], "build_run", lambda *a, **k: built.append(1))
    assert main(["train", "deepseek_600m", "--device", "cpu", "--data-dir", str(byte_data), "--seq-len", "256",
                 "--out-dir", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert "this run needs ~" in err and "GiB free" in err and not built and not (tmp_path / "run").exists()
