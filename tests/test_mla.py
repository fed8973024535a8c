"""Multi-head latent attention: training path == naive decode == absorbed decode, the latent cache,
RoPE / YaRN, gradients, and bad configs."""

from __future__ import annotations

import math
from dataclasses import replace

import pytest
import torch
from helpers import perturbed_model

from effllm import ConfigError, ModelConfig, Transformer
from effllm.attention import RotaryEmbedding, apply_rotary, yarn_inv_freq, yarn_mscale
from effllm.flops import forward_flops_per_token
from effllm.mla import MLA, MLAConfig

MLAS = {
    "q-direct": MLAConfig(n_heads=4, q_lora_rank=0, kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=4,
                          v_head_dim=12),
    "q-latent-yarn": MLAConfig(n_heads=3, q_lora_rank=24, kv_lora_rank=20, qk_nope_head_dim=10, qk_rope_head_dim=6,
                               v_head_dim=8, rope_factor=4.0, original_max_position=16, mscale=0.7),
}


def mla_model(name: str, decode: str = "absorbed", seed: int = 0) -> Transformer:
    mla = replace(MLAS[name], decode=decode)
    cfg = ModelConfig(vocab_size=97, dim=48, n_layers=2, n_heads=mla.n_heads, attention="mla", mla=mla, max_seq_len=48)
    return perturbed_model(cfg, seed).eval()


@pytest.mark.parametrize("name", MLAS)
def test_changing_a_token_never_changes_earlier_logits(name):
    model = mla_model(name)
    tokens = torch.randint(0, 97, (2, 25))
    base, _ = model(tokens)
    for t in (0, 11, 24):
        changed = tokens.clone()
        changed[:, t] = (changed[:, t] + 1) % 97
        logits, _ = model(changed)
        torch.testing.assert_close(logits[:, :t], base[:, :t], rtol=0, atol=1e-5)
        assert (logits[:, t:] - base[:, t:]).abs().max() > 1e-3


def decode_logits(model: Transformer, tokens: torch.Tensor, chunks) -> torch.Tensor:
    caches, pieces, pos = model.new_caches(tokens.shape[0]), [], 0
    for length in chunks:
        logits, _ = model(tokens[:, pos : pos + length], caches=caches, pos=pos)
        pieces.append(logits)
        pos += length
    return torch.cat(pieces, dim=1)


@pytest.mark.parametrize("name", MLAS)
@pytest.mark.parametrize("decode", ["naive", "absorbed"])
def test_decoding_token_by_token_equals_the_training_path_fp32(name, decode):
    model = mla_model(name, decode)
    tokens = torch.randint(0, 97, (3, 33))
    full, _ = model(tokens)
    # a prefill, a chunk after a cached prefix, then one token at a time
    torch.testing.assert_close(decode_logits(model, tokens, (8, 5) + (1,) * 20), full, rtol=1e-4, atol=2e-5)
    # a prefill longer than ABSORBED_MAX_TOKENS (the expanded path), then absorbed steps
    torch.testing.assert_close(decode_logits(model, tokens, (20, 3) + (1,) * 10), full, rtol=1e-4, atol=2e-5)


@pytest.mark.parametrize("decode", ["naive", "absorbed"])
def test_decoding_equals_the_training_path_bf16(decode):
    model = mla_model("q-latent-yarn", decode)
    tokens = torch.randint(0, 97, (2, 24))
    reference, _ = model(tokens)  # fp32 training path
    with torch.autocast("cpu", dtype=torch.bfloat16):
        full, _ = model(tokens)
        stepped = decode_logits(model, tokens, (6,) + (1,) * 18)
    scale = reference.abs().max()
    # bf16 keeps ~3 significant digits; through two layers the logits stay within 3% of their range
    assert (full.float() - reference).abs().max() < 0.03 * scale
    assert (stepped.float() - reference).abs().max() < 0.03 * scale


def test_naive_and_absorbed_caches_generate_the_same_text_as_no_cache():
    prompt = torch.randint(0, 97, (2, 6))
    outs = [mla_model("q-direct", d).generate(prompt, 30, temperature=0.0, use_cache=c)
            for d, c in (("naive", True), ("absorbed", True), ("absorbed", False))]
    assert torch.equal(outs[0], outs[1]) and torch.equal(outs[1], outs[2])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cache_holds_only_latent_and_rope_key(dtype):
    model = mla_model("q-latent-yarn")
    cfg = model.cfg.mla_layer
    caches = model.new_caches(2)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
        model(torch.randint(0, 97, (2, 10)), caches=caches)
    per_token = sum(c.bytes_per_token() for c in caches)
    assert per_token == (cfg.kv_lora_rank + cfg.qk_rope_head_dim) * model.cfg.n_layers * dtype.itemsize
    assert caches[0].latent.dtype == dtype and caches[0].latent.shape == (2, 48, cfg.kv_lora_rank)
    # versus what MHA of the same heads would cache: 2 x heads x (N+R) per layer
    assert per_token < 2 * cfg.n_heads * cfg.qk_head_dim * model.cfg.n_layers * dtype.itemsize


@pytest.mark.parametrize("inv_freq", ["rope", "yarn"])
def test_rotary_scores_depend_only_on_relative_position(inv_freq):
    freqs = yarn_inv_freq(16, 10000.0, 8.0, 32, 32.0, 1.0) if inv_freq == "yarn" else None
    rope = RotaryEmbedding(16, 200, 10000.0, freqs)
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(1, 1, 1, 16, generator=g), torch.randn(1, 1, 1, 16, generator=g)

    def score(m: int, n: int) -> float:
        return (apply_rotary(q, *rope(m, 1)) * apply_rotary(k, *rope(n, 1))).sum().item()

    for m, n, shift in [(5, 2, 40), (17, 17, 100), (3, 60, 77)]:
        assert score(m, n) == pytest.approx(score(m + shift, n + shift), rel=1e-4, abs=1e-5)
    assert score(9, 2) != pytest.approx(score(9, 3), rel=1e-3)


def test_yarn_factor_one_is_plain_rope_and_larger_factors_stretch_low_frequencies():
    plain = 1.0 / 10000.0 ** (torch.arange(0, 32, 2, dtype=torch.float64) / 32)
    assert torch.equal(yarn_inv_freq(32, 10000.0, 1.0, 4096, 32.0, 1.0), plain)
    cfg = MLAConfig(qk_rope_head_dim=32, rope_factor=1.0)
    torch.testing.assert_close(cfg.rotary(64).cos, RotaryEmbedding(32, 64).cos, rtol=0, atol=0)
    assert yarn_mscale(1.0, 0.707) == 1.0 and cfg.softmax_scale == pytest.approx((32 + 32) ** -0.5)
    stretched = yarn_inv_freq(32, 10000.0, 40.0, 4096, 32.0, 1.0)
    assert stretched[0] == plain[0]  # the fastest-rotating pair keeps its frequency
    assert stretched[-1] == pytest.approx(plain[-1] / 40)  # the slowest is interpolated by the factor
    assert all(plain[i] / 40 - 1e-18 <= stretched[i] <= plain[i] for i in range(16))
    big = MLAConfig(rope_factor=40.0, mscale=1.0)
    assert big.softmax_scale == pytest.approx(big.qk_head_dim**-0.5 * (0.1 * math.log(40) + 1) ** 2)


def test_every_parameter_gets_a_gradient():
    model = mla_model("q-latent-yarn").train()
    _, loss = model(torch.randint(0, 97, (2, 13)), torch.randint(0, 97, (2, 13)))
    loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_standalone_layer_and_flops():
    cfg = MLAS["q-direct"]
    layer = MLA(32, cfg)
    x = torch.randn(2, 9, 32)
    y = layer(x, cfg.rotary(16)(0, 9))
    assert y.shape == x.shape
    assert torch.equal(layer(x), y)  # the layer's own RoPE tables: mla(x) works without a caller's
    yarn_layer = MLA(32, MLAS["q-latent-yarn"], 40)  # YaRN tables, 40 positions
    assert torch.equal(yarn_layer(x), yarn_layer(x, MLAS["q-latent-yarn"].rotary(40)(0, 9)))
    with pytest.raises(ValueError, match="larger max_seq_len"):
        yarn_layer(torch.randn(1, 41, 32))
    model = ModelConfig(vocab_size=97, dim=48, n_layers=1, n_heads=4, attention="mla", mla=cfg)
    H, N, R, V, C, D, T = 4, 8, 4, 12, 16, 48, 20
    attn = 2 * D * H * (N + R) + 2 * D * (C + R) + 2 * C * H * (N + V) + 2 * H * V * D + 2 * H * (N + R + V) * (T + 1) / 2
    dense_rest = forward_flops_per_token(replace(model, attention="mha", n_heads=4), T)
    mha_attn = 2 * D * 3 * D + 2 * D * D + 4 * D * (T + 1) / 2
    assert forward_flops_per_token(model, T) == pytest.approx(dense_rest - mha_attn + attn)


@pytest.mark.parametrize(
    "make,match",
    [
        (lambda: MLAConfig(qk_rope_head_dim=7), "qk_rope_head_dim=7 is odd"),
        (lambda: ModelConfig(dim=48, n_heads=4, attention="mla", mla=MLAConfig(n_heads=6)),
         "model.n_heads=4 but model.mla.n_heads=6: MLA takes the model's heads"),
        (lambda: MLA(48, MLAConfig()), "needs its heads"),
        (lambda: MLAConfig(kv_lora_rank=0), "kv_lora_rank must be positive"),
        (lambda: MLAConfig(rope_factor=0.5), "rope_factor=0.5"),
    ],
)
def test_impossible_mla_configs_fail_on_construction(make, match):
    with pytest.raises(ConfigError, match=match):
        make()


def test_prompt_longer_than_the_cache_is_refused():
    model = mla_model("q-direct")
    with pytest.raises(ValueError, match="max_seq_len=48"):
        model.generate(torch.zeros(1, 40, dtype=torch.long), 10)
    caches = model.new_caches(1, max_len=8)
    with pytest.raises(ValueError, match="latent cache holds 8 positions"):
        model(torch.zeros(1, 9, dtype=torch.long), caches=caches)


def test_mla_model_config_round_trips():
    cfg = mla_model("q-latent-yarn").cfg
    assert ModelConfig.from_dict(cfg.to_dict()) == cfg


def test_trainer_trains_resumes_and_samples_an_mla_model(byte_data, tmp_path):
    from helpers import tiny_train_config

    from effllm.cli import GenerateConfig, generate_text
    from effllm.train import train

    mla = MLAConfig(n_heads=4, q_lora_rank=32, kv_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=8,
                    v_head_dim=16)
    model = ModelConfig(vocab_size=256, dim=64, n_layers=2, n_heads=4, attention="mla", mla=mla, max_seq_len=64)
    cfg = tiny_train_config(byte_data, tmp_path / "run", model=model, max_steps=4, ckpt_interval=2)
    summary = train(cfg)
    assert summary["final_train_loss"] < 5.5
    train(replace(cfg, max_steps=6, resume=True))
    text = generate_text(GenerateConfig(checkpoint=str(tmp_path / "run"), prompt="def ", max_new_tokens=8))
    assert text.startswith("def ")


def test_narrow_values_take_the_fused_kernel_and_compute_the_same():
    """causal_sdpa pads MLA's narrower values to the query width for the causal block (so SDPA can
    use its fused kernel) and slices the padding off: output and every gradient equal the math
    kernel's on the unpadded values (fp32; odd sizes)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from effllm.attention import causal_sdpa

    g = torch.Generator().manual_seed(0)
    q, k = (torch.randn(2, 3, 37, 24, generator=g).requires_grad_() for _ in range(2))
    v = torch.randn(2, 3, 37, 10, generator=g).requires_grad_()
    dy = torch.randn(2, 3, 37, 10, generator=g)
    out = causal_sdpa(q, k, v, 0, scale=0.3)
    grads = torch.autograd.grad(out, (q, k, v), dy)
    with sdpa_kernel([SDPBackend.MATH]):
        ref = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, scale=0.3)
    ref_grads = torch.autograd.grad(ref, (q, k, v), dy)
    assert out.shape == ref.shape
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)
    for a, b in zip(grads, ref_grads):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_the_model_sets_mlas_heads_once():
    """ModelConfig.n_heads is MLA's head count: changing it alone changes the layers (it used to
    need mla.n_heads changed to match); an mla.n_heads that agrees is dropped, so configs say it once."""
    mla = replace(MLAS["q-direct"], n_heads=None)
    cfg = ModelConfig(vocab_size=97, dim=48, n_layers=1, n_heads=4, attention="mla", mla=mla, max_seq_len=16)
    wider = replace(cfg, n_heads=6)
    assert Transformer(wider).blocks[0].attn.cfg.n_heads == 6
    assert Transformer(wider).blocks[0].attn.wo.in_features == 6 * mla.v_head_dim
    stated = ModelConfig(vocab_size=97, dim=48, n_layers=1, n_heads=4, attention="mla",
                         mla=replace(mla, n_heads=4), max_seq_len=16)
    assert stated == cfg and stated.mla.n_heads is None and stated.mla_layer.n_heads == 4
