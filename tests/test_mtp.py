"""Multi-token prediction: each depth's loss against a direct recomputation, causality per depth,
gradients through the shared embedding and head, counts, FLOPs, and training with the trainer."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from helpers import perturbed_model, tiny_train_config

from effllm import ConfigError, ModelConfig, Transformer
from effllm.flops import attention_flops, forward_flops_per_token, mtp_flops_per_token, train_flops_per_token
from effllm.mla import MLAConfig
from effllm.moe import MoEConfig
from effllm.train import OptimConfig, train

CONFIGS = {
    "dense": ModelConfig(vocab_size=97, dim=48, n_layers=2, n_heads=4, max_seq_len=32, mtp_depth=2),
    "mla-moe": ModelConfig(vocab_size=97, dim=48, n_layers=2, n_heads=4, max_seq_len=32, mtp_depth=1,
                           attention="mla", mla=MLAConfig(n_heads=4, kv_lora_rank=16, qk_nope_head_dim=8,
                                                          qk_rope_head_dim=4, v_head_dim=8),
                           ffn="moe", moe=MoEConfig(n_routed_experts=4, top_k=2, expert_dim=16), first_k_dense=1),
}


def model_for(name: str) -> Transformer:
    return perturbed_model(CONFIGS[name]).train()


@pytest.mark.parametrize("name", CONFIGS)
def test_each_depth_predicts_k_tokens_further(name):
    model = model_for(name)
    x = torch.randint(0, 97, (2, 20))
    y = torch.randint(0, 97, (2, 20))
    out = model(x, y, return_aux=True)
    assert len(out.mtp_losses) == model.cfg.mtp_depth
    # recompute by hand: depth k at position i sees h_{k-1}[i] and token i+k, predicts y[i+k]
    with torch.no_grad():
        embed = model.tok_emb(x)
        h = embed
        for block in model.blocks:
            h, _ = block(h, model.rope(0, 20))
        for k, module in enumerate(model.mtp, start=1):
            n = 20 - k
            z = module.proj(torch.cat((module.hidden_norm(h[:, :n]), module.embed_norm(embed[:, k:])), -1))
            h, _ = module.block(z, model.rope(0, n))
            expected = F.cross_entropy(model.head(module.out_norm(h)).flatten(0, 1), y[:, k:].flatten())
            torch.testing.assert_close(out.mtp_losses[k - 1].detach(), expected, rtol=1e-5, atol=1e-6)
    assert out.mtp_loss.item() == pytest.approx(sum(l.item() for l in out.mtp_losses) / len(out.mtp_losses))  # noqa: E741
    torch.testing.assert_close(model(x, y)[1], out.loss)  # without return_aux: (logits, the same loss)


def test_depth_k_never_sees_past_token_i_plus_k():
    model = model_for("dense")
    logits_at = {}

    def capture(k):
        def hook(block, inputs, output):
            logits_at[k] = model.head(model.mtp[k - 1].out_norm(output[0])).detach()  # (hidden, balance loss)
        return hook

    for k, module in enumerate(model.mtp, start=1):
        module.block.register_forward_hook(capture(k))
    x = torch.randint(0, 97, (1, 24))
    model(x, x, return_aux=True)  # a training forward with targets: the MTP depths run
    base = dict(logits_at)
    changed = x.clone()
    changed[0, 15] = (changed[0, 15] + 1) % 97
    model(changed, changed, return_aux=True)
    for k in (1, 2):  # depth k at position i uses tokens <= i+k: positions < 15-k are untouched
        torch.testing.assert_close(logits_at[k][:, : 15 - k], base[k][:, : 15 - k], rtol=0, atol=1e-5)
        assert (logits_at[k][:, 15 - k] - base[k][:, 15 - k]).abs().max() > 1e-4


def test_mtp_loss_trains_its_modules_and_the_shared_embedding_and_head():
    model = model_for("mla-moe")
    x = torch.randint(0, 97, (2, 12))
    model(x, x, return_aux=True).mtp_loss.backward()
    for name, p in model.named_parameters():
        if name.startswith("mtp.") and "experts" not in name and "router" not in name:
            assert p.grad is not None and p.grad.abs().sum() > 0, name
    assert model.tok_emb.weight.grad.abs().sum() > 0 and model.head.weight.grad.abs().sum() > 0
    model.eval()
    assert model(x, x, return_aux=True).mtp_loss is None  # not computed outside training
    out = model.generate(x[:, :4], 6, temperature=0.0)
    assert out.shape == (2, 10)  # plain inference ignores the MTP modules


def test_counts_and_flops_keep_mtp_out_of_inference():
    cfg = CONFIGS["dense"]
    model = Transformer(cfg)
    plain = Transformer(ModelConfig(**{**cfg.__dict__, "mtp_depth": 0}))
    counts = model.param_counts()
    assert counts["mtp"] == sum(p.numel() for p in model.mtp.parameters()) > 0
    assert counts["active"] == plain.param_counts()["active"]
    assert counts["total"] == plain.param_counts()["total"]  # the inference model: what the export holds
    assert sum(p.numel() for p in model.parameters()) == counts["total"] + counts["mtp"]
    assert forward_flops_per_token(cfg, 32) == forward_flops_per_token(plain.cfg, 32)
    assert train_flops_per_token(cfg, 32) == 3 * (forward_flops_per_token(cfg, 32) + mtp_flops_per_token(cfg, 32))
    # depth k runs on the 32 - k positions with a token k ahead: projection, one block, the head
    per_depth = [(32 - k) / 32 * (4 * 48 * 48 + attention_flops(cfg, 32 - k) + 6 * 48 * cfg.hidden_dim + 2 * 48 * 97)
                 for k in (1, 2)]
    assert mtp_flops_per_token(cfg, 32) == pytest.approx(sum(per_depth), rel=1e-12)
    with pytest.raises(ConfigError, match="mtp_depth"):
        ModelConfig(mtp_depth=-1)


def test_trainer_adds_the_weighted_mtp_loss_and_logs_it(byte_data, tmp_path):
    model = ModelConfig(vocab_size=256, dim=64, n_layers=2, n_heads=4, max_seq_len=64, mtp_depth=1, mtp_lambda=0.3)
    cfg = tiny_train_config(byte_data, tmp_path / "run", model=model, max_steps=40, eval_interval=40,
                            ckpt_interval=20, optim=OptimConfig(lr=3e-3, warmup_steps=5))
    train(cfg)
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert all("mtp_loss" in r for r in records)
    assert records[-1]["mtp_loss"] < records[0]["mtp_loss"] - 1.0
    assert records[-1]["loss"] < records[0]["loss"] - 1.0


def test_speculative_decoding_equals_greedy_and_accepts_drafts_once_trained():
    from effllm.mtp import speculative_generate

    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=16, dim=32, n_layers=2, n_heads=2, max_seq_len=96, mtp_depth=1, mtp_lambda=1.0)
    model = Transformer(cfg)
    prompt = torch.tensor([[3, 1, 4, 1, 5, 9, 2, 6]])
    untrained = speculative_generate(model.eval(), prompt, 30)[0]
    assert torch.equal(untrained, model.generate(prompt, 30, temperature=0.0))  # the reject path
    # Teach it a cycle of 7 tokens, so that both the model and its MTP module become certain.
    cycle = torch.tensor([2, 7, 1, 8, 2, 8, 1])
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model.train()
    for _ in range(150):
        starts = torch.randint(0, 7, (16,))
        seq = cycle[(starts[:, None] + torch.arange(41)) % 7]
        out = model(seq[:, :-1], seq[:, 1:], return_aux=True)
        (out.loss + out.mtp_loss).backward()
        opt.step()
        opt.zero_grad()
    model.eval()
    prompt = cycle[torch.arange(10) % 7][None]
    greedy = model.generate(prompt, 60, temperature=0.0)
    out, stats = speculative_generate(model, prompt, 60)
    assert torch.equal(out, greedy) and torch.equal(model.generate(prompt, 60, 0.0, speculative=True), greedy)
    # seen: acceptance 0.84, 33 model passes for 60 tokens (greedy takes 60)
    assert stats["acceptance"] > 0.5 and stats["drafted"] < 45
    with pytest.raises(ValueError, match="temperature=0"):
        model.generate(prompt, 5, temperature=1.0, speculative=True)
    with pytest.raises(ValueError, match="mtp_depth >= 1"):
        speculative_generate(Transformer(ModelConfig(vocab_size=16, dim=32, n_layers=1, n_heads=2)), prompt, 5)
