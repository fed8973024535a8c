"""The dense baseline: causality, cached == uncached decoding, init, counts, FLOPs, bad configs."""

from __future__ import annotations

import math

import pytest
import torch
from helpers import perturbed_model

from effllm import ConfigError, ModelConfig, Transformer
from effllm.flops import (
    forward_flops_per_token,
    mfu,
    peak_bf16_flops,
    train_flops_per_token,
)

CONFIGS = {
    "mha": ModelConfig(vocab_size=97, dim=48, n_layers=2, n_heads=4, max_seq_len=40),
    "gqa": ModelConfig(vocab_size=97, dim=48, n_layers=3, n_heads=6, n_kv_heads=2, max_seq_len=40, tie_embeddings=False),
}


def model_for(name: str, seed: int = 0) -> Transformer:
    return perturbed_model(CONFIGS[name], seed).eval()


@pytest.mark.parametrize("name", CONFIGS)
def test_changing_a_token_never_changes_earlier_logits(name):
    model = model_for(name)
    tokens = torch.randint(0, 97, (2, 23))
    base, _ = model(tokens)
    for t in (0, 7, 22):
        changed = tokens.clone()
        changed[:, t] = (changed[:, t] + 1) % 97
        logits, _ = model(changed)
        torch.testing.assert_close(logits[:, :t], base[:, :t], rtol=0, atol=1e-5)
        assert (logits[:, t:] - base[:, t:]).abs().max() > 1e-3, "the changed token must affect its own logits"


@pytest.mark.parametrize("name", CONFIGS)
def test_incremental_decoding_matches_full_forward(name):
    model = model_for(name)
    tokens = torch.randint(0, 97, (3, 31))
    full, _ = model(tokens)
    caches = model.new_caches(3)
    # Prefill 9 tokens, a chunk of 5 after a cached prefix (explicit-mask path), then one at a time.
    pieces, pos = [], 0
    for length in (9, 5) + (1,) * 17:
        logits, _ = model(tokens[:, pos : pos + length], caches=caches, pos=pos)
        pieces.append(logits)
        pos += length
    torch.testing.assert_close(torch.cat(pieces, dim=1), full, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name", CONFIGS)
@pytest.mark.parametrize("temperature,top_k", [(0.0, None), (1.0, None), (0.8, 5)])
def test_cached_generation_equals_uncached(name, temperature, top_k):
    model = model_for(name)
    prompt = torch.randint(0, 97, (2, 7))
    outs = []
    for use_cache in (True, False):
        gen = torch.Generator().manual_seed(123)
        outs.append(model.generate(prompt, 25, temperature, top_k, use_cache=use_cache, generator=gen))
    assert outs[0].shape == (2, 32)
    assert torch.equal(outs[0][:, :7], prompt)
    assert torch.equal(outs[0], outs[1])


def test_greedy_generation_follows_argmax():
    model = model_for("mha")
    prompt = torch.randint(0, 97, (1, 5))
    out = model.generate(prompt, 4, temperature=0.0)
    for i in range(4):
        logits, _ = model(out[:, : 5 + i])
        assert out[0, 5 + i] == logits[0, -1].argmax()


def test_generation_longer_than_max_seq_len_is_refused():
    model = model_for("mha")
    with pytest.raises(ValueError, match="max_seq_len=40"):
        model.generate(torch.zeros(1, 30, dtype=torch.long), 20)


def test_loss_is_mean_cross_entropy_and_ignores_minus_one():
    model = model_for("gqa")
    x = torch.randint(0, 97, (2, 9))
    y = torch.randint(0, 97, (2, 9))
    y[0, :4] = -1
    logits, loss = model(x, y)
    keep = y != -1
    ref = torch.nn.functional.cross_entropy(logits[keep], y[keep])
    torch.testing.assert_close(loss, ref)


def test_every_parameter_gets_a_gradient():
    model = model_for("gqa").train()
    _, loss = model(torch.randint(0, 97, (2, 11)), torch.randint(0, 97, (2, 11)))
    loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_bf16_autocast_forward_on_cpu():
    model = model_for("mha")
    x = torch.randint(0, 97, (2, 16))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits, loss = model(x, x)
    assert logits.dtype == torch.bfloat16 and torch.isfinite(loss)
    ref, _ = model(x)
    assert (logits.float() - ref).abs().max() < 0.1  # bf16 keeps ~3 significant digits


def test_residual_projections_get_depth_scaled_init():
    cfg = ModelConfig(vocab_size=64, dim=256, n_layers=8, n_heads=4)
    torch.manual_seed(0)
    model = Transformer(cfg)
    expected = cfg.init_std / math.sqrt(2 * cfg.n_layers)
    for block in model.blocks:
        assert abs(block.attn.wo.weight.std().item() - expected) < 0.1 * expected
        assert abs(block.ffn.w2.weight.std().item() - expected) < 0.1 * expected
        assert abs(block.attn.wq.weight.std().item() - cfg.init_std) < 0.1 * cfg.init_std


def test_param_counts_separate_total_active_and_embedding():
    tied = Transformer(CONFIGS["mha"])
    untied = Transformer(ModelConfig(**{**CONFIGS["mha"].to_dict(), "tie_embeddings": False}))
    for model in (tied, untied):
        counts = model.param_counts()
        assert counts["total"] == sum(p.numel() for p in model.parameters())
        assert counts["active"] == counts["total"]  # dense: every parameter is touched by every token
        assert counts["embedding"] == 97 * 48
    assert untied.param_counts()["total"] - tied.param_counts()["total"] == 97 * 48


def test_flops_per_token_by_hand():
    cfg = ModelConfig(vocab_size=100, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_hidden_dim=160)
    T = 31
    hs = 16
    qkvo = 2 * 64 * (4 * hs + 2 * 2 * hs) + 2 * 4 * hs * 64
    mixing = 4 * 4 * hs * (T + 1) / 2
    ffn = 2 * 3 * 64 * 160
    head = 2 * 64 * 100
    assert forward_flops_per_token(cfg, T) == 2 * (qkvo + mixing + ffn) + head
    assert train_flops_per_token(cfg, T) == 3 * forward_flops_per_token(cfg, T)
    # Away from attention, forward FLOPs are 2 x the matmul parameters (embedding lookups are free).
    model = Transformer(ModelConfig(**{**cfg.to_dict(), "tie_embeddings": False}))
    matmul_params = sum(p.numel() for n, p in model.named_parameters() if p.dim() == 2 and "tok_emb" not in n)
    assert forward_flops_per_token(cfg, T) - 2 * mixing == 2 * matmul_params


def test_mfu_needs_a_known_peak():
    assert peak_bf16_flops("CPU") is None and mfu(1e6, 1e9, None) is None
    assert peak_bf16_flops("NVIDIA H100 80GB HBM3") == 989e12
    assert mfu(1e5, 6e9, 989e12) == pytest.approx(1e5 * 6e9 / 989e12)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(dim=100, n_heads=3), "not divisible by model.n_heads"),
        (dict(dim=96, n_heads=6, n_kv_heads=4), "not a multiple of model.n_kv_heads"),
        (dict(dim=36, n_heads=4), "odd"),
        (dict(n_layers=0), "n_layers must be positive"),
    ],
)
def test_impossible_model_configs_fail_on_construction(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        ModelConfig(**kwargs)
