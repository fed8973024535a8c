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
    # the MTP module as DeepSeek's layer after the last: eh_proj reads [embedding; hidden], effllm's proj
    # [hidden; embedding]; the layer carries copies of the embedding and head
    w, d = model.mtp[0].proj.weight, model.cfg.dim
    assert torch.equal(sd["model.layers.3.eh_proj.weight"], torch.cat((w[:, d:], w[:, :d]), dim=1))
    assert torch.equal(sd["model.layers.3.hnorm.weight"], model.mtp[0].hidden_norm.weight)
    assert torch.equal(sd["model.layers.3.mlp.experts.2.down_proj.weight"], model.mtp[0].block.ffn.experts.w2[2])
    assert torch.equal(sd["model.layers.3.shared_head.head.weight"], model.head.weight)
    assert not [k for k in hf_state_dict(model, mtp=False) if k.startswith("model.layers.3.")]
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
    """load_hf reads the export by the same name mapping: every weight back bit for bit, the MTP
    modules' included, the config the same model."""
    from effllm.hf_import import load_hf

    cfg = CASES[name]
    model, _ = exported(cfg, tmp_path / name)
    back = load_hf(tmp_path / name)
    # the same model; what effllm derives comes back explicit (ffn_hidden_dim is config.json's
    # intermediate_size, norm_topk_prob its own field), and init_std is not used past the init
    moe = replace(cfg.moe, norm_topk_prob=cfg.moe.renormalize) if cfg.ffn == "moe" else cfg.moe
    assert back.cfg == replace(cfg, init_std=back.cfg.init_std, ffn_hidden_dim=cfg.hidden_dim, moe=moe)
    theirs = back.state_dict()
    assert theirs.keys() == model.state_dict().keys()
    for key, t in model.state_dict().items():
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
    ("model.layers.2.eh_proj.weight", r"model.layers.2 past the 2 layers: config.json's num_nextn_predict_layers=0"),
    ("model.layers.0.self_attn.q_proj.weight_scale_inv", "1 tensors of .* have no place in effllm's model"),
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


def _rms(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w


def test_an_imported_mtp_layer_computes_deepseeks_formula(tmp_path):
    """DeepSeek's MTP layer projects [enorm(embedding); hnorm(hidden)] by eh_proj (embedding first);
    effllm's module concatenates [hidden; embedding]. The imported module computes DeepSeek's formula,
    written here from the checkpoint's own tensors, and drafts with it."""
    from safetensors.torch import load_file

    from effllm.hf_import import load_hf

    cfg = CASES["deepseek_moe_mtp"]
    exported(cfg, tmp_path / "hf")
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["num_nextn_predict_layers"] == 1
    t = load_file(str(tmp_path / "hf" / "model.safetensors"))
    ours = load_hf(tmp_path / "hf").eval()
    hidden, emb = torch.randn(2, 5, cfg.dim), torch.randn(2, 5, cfg.dim)
    eps = cfg.norm_eps
    want = torch.cat((_rms(emb, t["model.layers.3.enorm.weight"], eps), _rms(hidden, t["model.layers.3.hnorm.weight"], eps)),
                     dim=-1) @ t["model.layers.3.eh_proj.weight"].T
    m = ours.mtp[0]
    with torch.no_grad():
        got = m.proj(torch.cat((m.hidden_norm(hidden), m.embed_norm(emb)), dim=-1))
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(m.out_norm.weight, t["model.layers.3.shared_head.norm.weight"], rtol=0, atol=0)


def test_an_mtp_layer_with_its_own_embedding_is_refused(tmp_path):
    """effllm's MTP modules share the model's embedding and head: a checkpoint whose MTP layer holds
    different ones cannot be expressed."""
    from safetensors.torch import load_file, save_file

    from effllm.hf_import import load_hf

    exported(CASES["deepseek_moe_mtp"], tmp_path / "hf")
    path = tmp_path / "hf" / "model.safetensors"
    tensors = load_file(str(path))
    tensors["model.layers.3.embed_tokens.weight"] = tensors["model.layers.3.embed_tokens.weight"] + 1
    save_file(tensors, str(path))
    with pytest.raises(ConfigError, match="model.layers.3.embed_tokens.weight differs from model.embed_tokens"):
        load_hf(tmp_path / "hf")


def _quantize_blocks(w: torch.Tensor, bn: int, bk: int) -> tuple[torch.Tensor, torch.Tensor]:
    """DeepSeek-V3's weight quantization, written out block by block: scale = amax / 448 per bn x bk
    block (edge blocks partial), q = w / scale in float8_e4m3fn, weight_scale_inv = scale."""
    n, k = w.shape
    s = torch.empty(-(-n // bn), -(-k // bk))
    q = torch.empty(n, k, dtype=torch.float8_e4m3fn)
    for i in range(s.shape[0]):
        for j in range(s.shape[1]):
            block = w[i * bn:(i + 1) * bn, j * bk:(j + 1) * bk]
            s[i, j] = block.abs().max() / 448.0
            q[i * bn:(i + 1) * bn, j * bk:(j + 1) * bk] = (block / s[i, j]).to(torch.float8_e4m3fn)
    return q, s


def test_block_scaled_fp8_weights_are_dequantized_on_import(tmp_path):
    """A checkpoint in DeepSeek-V3's FP8 format (float8_e4m3fn linears with weight_scale_inv per block;
    24x24 blocks here, so edge blocks are partial): each weight imports as q * its block's scale,
    element by element, and the model computes what the dequantized weights compute."""
    from safetensors.torch import load_file, save_file

    from effllm.hf_import import load_hf

    cfg = CASES["deepseek_moe_mtp"]
    exported(cfg, tmp_path / "hf")
    path, config = tmp_path / "hf" / "model.safetensors", tmp_path / "hf" / "config.json"
    tensors = load_file(str(path))
    want = {}
    for name in [n for n, t in tensors.items() if t.dim() == 2 and n.endswith("proj.weight")]:
        q, s = _quantize_blocks(tensors[name], 24, 24)
        tensors[name], tensors[name + "_scale_inv"] = q, s
        rows, cols = torch.meshgrid(torch.arange(q.shape[0]) // 24, torch.arange(q.shape[1]) // 24, indexing="ij")
        want[name] = q.float() * s[rows, cols]
    assert len(want) > 20 and all(any(t.shape[d] % 24 for t in want.values()) for d in (0, 1))  # partial edge blocks are there
    save_file(tensors, str(path))
    config.write_text(json.dumps({**json.loads(config.read_text()), "quantization_config": {
        "quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic", "weight_block_size": [24, 24]}}))
    ours = load_hf(tmp_path / "hf")
    sd = ours.state_dict()
    assert torch.equal(sd["blocks.1.ffn.experts.w2"][4], want["model.layers.1.mlp.experts.4.down_proj.weight"])
    assert torch.equal(sd["blocks.0.attn.wkv_b.weight"], want["model.layers.0.self_attn.kv_b_proj.weight"])
    assert torch.equal(sd["blocks.2.ffn.shared.w1.weight"], want["model.layers.2.mlp.shared_experts.gate_proj.weight"])
    d = cfg.dim
    w = want["model.layers.3.eh_proj.weight"]
    assert torch.equal(sd["mtp.0.proj.weight"], torch.cat((w[:, d:], w[:, :d]), dim=1))
    # a quantization config effllm does not dequantize is refused by name
    config.write_text(json.dumps({**json.loads(config.read_text()), "quantization_config": {"quant_method": "gptq"}}))
    with pytest.raises(ConfigError, match="quant_method 'fp8'"):
        load_hf(tmp_path / "hf")


def test_dequantized_weights_requantize_to_the_same_fp8_bytes():
    """effllm's FP8 training quantizes each weight in 128x128 blocks as DeepSeek-V3 does: the
    dequantized import of a DeepSeek FP8 weight requantizes to its very bytes and scales, so --fp8
    training starts from the checkpoint's FP8 weights (N = 320: a partial block row)."""
    from effllm.hf_import import dequantize_blocks
    from effllm.kernels.fp8_quant import quant_blocks_ref

    q, s = _quantize_blocks(torch.randn(320, 384) * 0.02, 128, 128)
    q2, s2 = quant_blocks_ref(dequantize_blocks(q, s))
    assert torch.equal(q2.view(torch.uint8), q.view(torch.uint8))
    torch.testing.assert_close(s2, s, rtol=2**-22, atol=0)


def test_import_hf_makes_a_run_whose_weights_start_new_training(byte_data, tmp_path, capsys):
    """train -> export-hf -> import-hf -> train --from: the new run starts from exactly the trained
    weights (seen by a model hook before the first step), generates what the original does, and the
    imported checkpoint (weights only) is refused for a resume, a different model and other data."""
    from effllm.cli import from_run
    from effllm.errors import CheckpointError

    train(tiny_train_config(byte_data, tmp_path / "run", max_steps=4))
    assert main(["export-hf", "--checkpoint", str(tmp_path / "run"), "--out", str(tmp_path / "hf")]) == 0
    assert main(["import-hf", str(tmp_path / "hf"), "--out", str(tmp_path / "imported")]) == 0
    printed = capsys.readouterr().out
    assert "imported" in printed and f"effllm train --from {tmp_path / 'imported'}" in printed
    ckpt = ckpt_io.resolve_checkpoint(tmp_path / "imported")
    state = ckpt_io.read_state(ckpt)
    assert state["weights_only"] and state["tokenizer"]["kind"] == "byte"  # effllm's byte table, recognised
    assert state["imported_from"]["path"] == str(tmp_path / "hf")
    assert set(state["imported_from"]["files"]) == {"config.json", "model.safetensors"}
    assert not (ckpt / "optimizer.pt").exists()
    trained, _, _ = ckpt_io.load_model(tmp_path / "run")

    start = {}
    cfg = replace(from_run(tmp_path / "imported"), data_dir=str(byte_data), out_dir=str(tmp_path / "ft"), max_steps=2,
                  batch_size=2, seq_len=32, eval_interval=2, eval_tokens=64, progress=False, device="cpu")
    assert cfg.init_from == str(tmp_path / "imported")
    train(cfg, model_hook=lambda m: start.update({k: v.clone() for k, v in m.state_dict().items()}))
    for key, t in trained.state_dict().items():
        assert torch.equal(start[key], t), key
    assert "Started from the weights of the checkpoint" in (tmp_path / "ft" / "MODEL_CARD.md").read_text()

    args = ["--prompt", "def ", "--temperature", "0", "--max-new-tokens", "12"]
    capsys.readouterr()
    assert main(["generate", "--checkpoint", str(tmp_path / "run"), *args]) == 0
    want = capsys.readouterr().out
    assert main(["generate", "--checkpoint", str(tmp_path / "imported"), *args]) == 0
    assert capsys.readouterr().out == want

    with pytest.raises(CheckpointError, match="holds weights only"):
        train(replace(cfg, out_dir=str(tmp_path / "imported"), init_from=None, resume=True))
    with pytest.raises(ConfigError, match="holds a different model .*n_layers"):
        train(replace(cfg, model=replace(cfg.model, n_layers=1), out_dir=str(tmp_path / "ft2")))
    assert not (tmp_path / "ft2").exists()  # refused before anything was written
    # an existing import is never replaced without --overwrite
    assert main(["import-hf", str(tmp_path / "hf"), "--out", str(tmp_path / "imported")]) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert main(["import-hf", str(tmp_path / "hf"), "--out", str(tmp_path / "imported"), "--overwrite"]) == 0

