"""Hugging Face export: transformers loads what effllm writes and computes the same logits.

Each architecture effllm can export is built with perturbed weights (so every tensor matters),
exported, loaded with transformers' AutoModelForCausalLM on the CPU and compared in fp32: the
logits agree to 1e-5 relative (the same arithmetic in another order), and greedy generation through
transformers' own cache gives the same tokens as effllm's. Options transformers cannot express are
refused by name. The CLI test exports a trained checkpoint and reads its model card.
"""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch
from helpers import perturbed_model, tiny_train_config
from tokenizers import Tokenizer
from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

from effllm import ConfigError
from effllm import checkpoint as ckpt_io
from effllm.cli import main
from effllm.hf import byte_tokenizer_json, check_exportable, hf_state_dict, save_hf
from effllm.mla import MLAConfig
from effllm.model import ModelConfig
from effllm.moe import MoEConfig
from effllm.tokenizer import ByteTokenizer
from effllm.train import train

BASE = ModelConfig(vocab_size=96, dim=64, n_layers=2, n_heads=4, max_seq_len=64)
MLA = MLAConfig(n_heads=4, q_lora_rank=32, kv_lora_rank=24, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=12)
MOE = MoEConfig(n_routed_experts=8, n_shared_experts=1, top_k=3, expert_dim=32, n_group=2, topk_group=1,
                route_scale=2.5)

CASES = {
    "llama_gqa_untied": replace(BASE, n_kv_heads=2, tie_embeddings=False),
    "llama_tied": BASE,
    "deepseek_moe_mtp": replace(BASE, n_layers=3, attention="mla", mla=MLA, ffn="moe", moe=MOE, first_k_dense=1,
                                mtp_depth=1, tie_embeddings=False),
    "deepseek_dense_mla": replace(BASE, attention="mla", mla=replace(MLA, q_lora_rank=0)),
    "deepseek_yarn": replace(BASE, attention="mla", mla=replace(MLA, rope_factor=4.0, original_max_position=16,
                                                                mscale=0.707)),
}


def exported(cfg: ModelConfig, path, seed: int = 0):
    model = perturbed_model(cfg, seed).eval()
    with torch.no_grad():  # a trained balancing bias is not zero: make the export carry one
        for name, buf in model.named_buffers():
            if name.endswith("expert_bias"):
                buf.copy_(torch.randn_like(buf) * 0.1)
    out = save_hf(model, path)
    return model, AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()


@pytest.mark.parametrize("name", list(CASES))
def test_transformers_computes_effllm_logits(name, tmp_path):
    cfg = CASES[name]
    model, hf = exported(cfg, tmp_path / name)
    expected = "DeepseekV3ForCausalLM" if cfg.attention == "mla" else "LlamaForCausalLM"
    assert type(hf).__name__ == expected
    assert sum(p.numel() for p in hf.parameters()) == model.param_counts()["total"]
    x = torch.randint(0, cfg.vocab_size, (2, 37), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref, got = model(x)[0], hf(x).logits
    assert ((got - ref).norm() / ref.norm()).item() < 1e-5
    assert (got.argmax(-1) == ref.argmax(-1)).float().mean().item() > 0.99


@pytest.mark.parametrize("name", ["llama_gqa_untied", "deepseek_moe_mtp"])
def test_greedy_generation_matches_through_transformers_cache(name, tmp_path):
    model, hf = exported(CASES[name], tmp_path / name, seed=3)
    prompt = torch.randint(0, 96, (1, 9), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ours = model.generate(prompt, 20, temperature=0.0)
        theirs = hf.generate(prompt, max_new_tokens=20, min_new_tokens=20, do_sample=False, use_cache=True,
                             pad_token_id=0)
    assert torch.equal(ours, theirs)


def test_expert_tensors_use_deepseeks_per_expert_names():
    model = perturbed_model(CASES["deepseek_moe_mtp"])
    sd = hf_state_dict(model)
    assert torch.equal(sd["model.layers.1.mlp.experts.5.up_proj.weight"], model.blocks[1].ffn.experts.w3[5])
    assert sd["model.layers.1.mlp.gate.e_score_correction_bias"].dtype == torch.float32
    assert not [k for k in sd if "mtp" in k]
    assert hf_state_dict(model, torch.bfloat16)["model.layers.0.self_attn.kv_b_proj.weight"].dtype == torch.bfloat16


@pytest.mark.parametrize("change,message", [
    (dict(ffn="moe", moe=MOE), "MHA/GQA attention"),
    (dict(attention="mla", mla=MLA, ffn="moe", moe=replace(MOE, score_func="softmax")), "sigmoid-only"),
    (dict(attention="mla", mla=MLA, ffn="moe", moe=replace(MOE, n_shared_experts=0)), "shared experts"),
    (dict(attention="mla", mla=replace(MLA, norm_eps=1e-5)), "norm-eps"),
])
def test_what_transformers_cannot_express_is_refused_by_name(change, message, tmp_path):
    cfg = replace(BASE, **change)
    with pytest.raises(ConfigError, match=message):
        check_exportable(cfg)
    with pytest.raises(ConfigError, match=message):
        save_hf(perturbed_model(cfg), tmp_path / "out")
    assert not (tmp_path / "out").exists()  # refused before writing anything


def test_group_routing_without_a_bias_is_refused(tmp_path):
    """Without a bias effllm's groups score by their best expert (DeepSeek's Gate); transformers'
    DeepseekV3 always sums the top two, so such a router would route differently there."""
    cfg = replace(BASE, attention="mla", mla=MLA, ffn="moe", moe=replace(MOE, bias_update_rate=0.0))
    model = perturbed_model(cfg)
    for layer in model.moe_layers().values():
        layer.router.expert_bias.zero_()
    with pytest.raises(ConfigError, match="best expert"):
        save_hf(model, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    for layer in model.moe_layers().values():  # a bias trained before: groups sum their top two, as in transformers
        layer.router.expert_bias[0] = 0.1
    save_hf(model, tmp_path / "out")


def test_byte_tokenizer_file_encodes_like_effllm():
    tok = PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(json.dumps(byte_tokenizer_json())))
    text = "def f(x):\n\treturn 'héllo' + \"wörld\"  # 中文 😀\r\n"
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert ids == ByteTokenizer().encode(text)
    assert tok.decode(ids) == text


def test_cli_exports_a_trained_checkpoint_with_its_card(byte_data, tmp_path, capsys):
    cfg = tiny_train_config(byte_data, tmp_path / "run", max_steps=4)
    summary = train(cfg)
    out = tmp_path / "hf"
    assert main(["export-hf", "--checkpoint", str(tmp_path / "run"), "--out", str(out)]) == 0
    assert "LlamaForCausalLM" in capsys.readouterr().out
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "llama" and config["num_key_value_heads"] == 2 and config["eos_token_id"] == 0
    card = (out / "README.md").read_text()
    assert f"{summary['tokens_seen']:,} tokens" in card and "PSF-2.0" in card
    assert f"{summary['final_val_loss']:.4f}" in card
    hf = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    tok = PreTrainedTokenizerFast.from_pretrained(out)
    ids = tok("import os\n", return_tensors="pt")["input_ids"]
    assert ids[0].tolist() == list(b"import os\n")
    assert tok.eos_token_id == config["eos_token_id"] == 0 and tok.bos_token_id == config["bos_token_id"] == 0
    assert tok.pad_token_id is config["pad_token_id"] is None
    modes = {f.name: f.stat().st_mode & 0o777 for f in out.iterdir()}
    assert len(set(modes.values())) == 1, modes  # model.safetensors as readable as the rest
    ckpt = ckpt_io.latest_checkpoint(tmp_path / "run" / "checkpoints")
    assert len({f.stat().st_mode & 0o777 for f in ckpt.iterdir()}) == 1
    with torch.no_grad():
        assert torch.isfinite(hf(ids).logits).all()
    # an existing export is never overwritten by accident
    assert main(["export-hf", "--checkpoint", str(tmp_path / "run"), "--out", str(out)]) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert main(["export-hf", "--checkpoint", str(tmp_path / "run"), "--out", str(out), "--overwrite"]) == 0


@pytest.mark.parametrize("name", list(CASES))
def test_export_then_import_gives_back_the_same_weights(name, tmp_path):
    """load_hf reads the export by the same name mapping: every weight back bit for bit (the MTP
    modules, which the export leaves out, aside), the config the same model."""
    from effllm.hf_import import load_hf

    cfg = CASES[name]
    model, _ = exported(cfg, tmp_path / name)
    back = load_hf(tmp_path / name)
    assert back.cfg.attention == cfg.attention and back.cfg.ffn == cfg.ffn and back.cfg.mtp_depth == 0
    theirs = back.state_dict()
    for key, t in model.state_dict().items():
        if not key.startswith("mtp"):
            assert torch.equal(theirs[key], t), key
    x = torch.randint(0, cfg.vocab_size, (2, 17))
    with torch.no_grad():
        torch.testing.assert_close(back.eval()(x)[0], model(x)[0], rtol=0, atol=0)


@pytest.mark.parametrize("interleave", [False, True])
def test_a_transformers_deepseek_v3_model_imports_with_its_logits_and_greedy_tokens(tmp_path, interleave):
    """A DeepseekV3ForCausalLM built and saved by transformers itself, in shards (MLA, a dense layer,
    then MoE with groups, a balancing bias and YaRN) -> load_hf -> the same logits in fp32 and the
    same greedy tokens. Also with interleaved RoPE (DeepSeek's own checkpoints): its rotary rows are
    reordered on import."""
    from transformers import DeepseekV3Config, DeepseekV3ForCausalLM

    from effllm.hf_import import load_hf

    torch.manual_seed(0)
    hf_cfg = DeepseekV3Config(vocab_size=80, hidden_size=48, intermediate_size=96, moe_intermediate_size=24,
                              num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=4, n_routed_experts=8,
                              n_shared_experts=1, num_experts_per_tok=2, first_k_dense_replace=1, n_group=2,
                              topk_group=1, routed_scaling_factor=2.5, q_lora_rank=24, kv_lora_rank=16,
                              qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=12, max_position_embeddings=64,
                              rope_interleave=interleave, tie_word_embeddings=False,
                              rope_parameters={"rope_type": "yarn", "rope_theta": 10000.0, "factor": 2.0,
                                               "original_max_position_embeddings": 32, "beta_fast": 32.0,
                                               "beta_slow": 1.0, "mscale": 0.707, "mscale_all_dim": 0.707})
    theirs = DeepseekV3ForCausalLM(hf_cfg).eval()
    with torch.no_grad():
        for name, p in theirs.named_parameters():
            p.add_(torch.randn_like(p) * 0.05)  # past the init, so every weight matters
        for name, b in theirs.named_buffers():
            if name.endswith("e_score_correction_bias"):
                b.copy_(torch.randn_like(b) * 0.1)
    theirs.save_pretrained(tmp_path / "hf", max_shard_size="100KB")  # shards and their index
    assert (tmp_path / "hf" / "model.safetensors.index.json").is_file()
    ours = load_hf(tmp_path / "hf").eval()
    assert ours.cfg.moe.n_group == 2 and ours.cfg.mla.rope_factor == 2.0 and ours.cfg.first_k_dense == 1
    x = torch.randint(0, 80, (2, 21))
    with torch.no_grad():
        want = theirs(x).logits
        got = ours(x)[0]
    assert ((got - want).norm() / want.norm()).item() < 1e-5
    prompt = x[:1, :5]
    theirs.generation_config.eos_token_id = None  # no stop token: 12 new tokens on both sides
    with torch.no_grad():
        ref = theirs.generate(prompt, max_new_tokens=12, do_sample=False, pad_token_id=0)
    assert torch.equal(ours.generate(prompt, 12, temperature=0.0), ref)


@pytest.mark.parametrize("change,message", [
    ({"model_type": "mistral"}, "model_type 'mistral'"),
    ({"hidden_act": "gelu"}, "hidden_act 'gelu'"),
])
def test_what_effllm_cannot_import_is_refused_by_name(change, message, tmp_path):
    from effllm.hf_import import load_hf

    exported(CASES["deepseek_dense_mla"], tmp_path / "hf")
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    (tmp_path / "hf" / "config.json").write_text(json.dumps({**config, **change}))
    with pytest.raises(ConfigError, match=message):
        load_hf(tmp_path / "hf")


@pytest.mark.parametrize("extra,message", [
    ("model.layers.2.eh_proj.weight", r"model.layers.2 \(a multi-token-prediction layer"),
    ("model.layers.0.self_attn.q_proj.weight_scale_inv", "block-scaled FP8 weights"),
    ("model.layers.0.self_attn.rotary_emb.extra", "1 tensors of .* have no place in effllm's model"),
])
def test_checkpoint_tensors_effllm_cannot_place_are_refused_by_name(extra, message, tmp_path):
    from safetensors.torch import load_file, save_file

    from effllm.hf_import import load_hf

    exported(CASES["deepseek_dense_mla"], tmp_path / "hf")
    path = tmp_path / "hf" / "model.safetensors"
    save_file({**load_file(str(path)), extra: torch.ones(2, 2)}, str(path))
    with pytest.raises(ConfigError, match=message):
        load_hf(tmp_path / "hf")
