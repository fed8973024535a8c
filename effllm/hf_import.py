"""Import from the Hugging Face transformers layout: `load_hf(DIR)` gives an effllm Transformer with
the weights of a transformers checkpoint in the Llama or DeepseekV3 layout (config.json and
safetensors, one file or sharded).

It is the export (effllm/hf.py) read backwards: the config by `model_config_from_hf`, the inverse
of `hf_config`, and every tensor by the export's own name mapping, `hf_names`, so export then
import gives every weight back bit for bit. DeepSeek's interleaved RoPE is reordered into
effllm's halves order (`deinterleave_rope`). What effllm cannot compute the same way, or a tensor
that has no place in its model, is refused by name.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
from safetensors import safe_open

from effllm import checkpoint as ckpt_io
from effllm.config import TrainConfig
from effllm.docfields import documented
from effllm.errors import ConfigError
from effllm.fsutil import claim_output_dir, new_temp_dir, refuse_overlap, replace_dir, resolved, sha256_file
from effllm.hf import HF_LATENT_NORM_EPS, MTP_SHARED, byte_tokenizer_json, hf_names, swap_mtp_inputs
from effllm.mla import MLAConfig
from effllm.model import ModelConfig, Transformer
from effllm.moe import MoEConfig
from effllm.tokenizer import ByteTokenizer, FileTokenizer, tokenizer_spec

IMPORTED_FILES = ("config.json", "checkpoints")  # all that `import_hf` writes in a run directory


@documented
@dataclass
class ImportConfig:
    """Options of `effllm import-hf`."""

    source: str  # a transformers checkpoint folder: config.json and safetensors (one file or sharded), tokenizer.json
    out: str  # the run directory to write (new or empty, unless --overwrite replaces an earlier import)
    eot_token: str | None = None  # the tokenizer's end-of-document token; None = tokenizer_config.json's eos_token
    overwrite: bool = False  # replace `out` if it holds an earlier effllm import-hf (and nothing else)


def _refuse(what: str) -> None:
    raise ConfigError(f"cannot import: {what}")


def model_config_from_hf(hf: dict, mtp_depth: int = 0) -> ModelConfig:
    """The ModelConfig of a transformers config.json in the Llama or DeepseekV3 layout (the inverse
    of `hf_config`), with `mtp_depth` MTP modules (the MTP layers the checkpoint holds). What effllm
    cannot compute the same way is refused by name."""
    kind = hf.get("model_type")
    if kind not in ("llama", "deepseek_v3"):
        _refuse(f"model_type {kind!r}: effllm imports the 'llama' and 'deepseek_v3' layouts")
    if hf.get("hidden_act", "silu") != "silu":
        _refuse(f"hidden_act {hf['hidden_act']!r}: effllm's SwiGLU uses silu")
    if hf.get("attention_bias") or hf.get("mlp_bias"):
        _refuse("attention_bias / mlp_bias: effllm's linears have no biases")
    rope = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    theta = float(rope.get("rope_theta", hf.get("rope_theta", 10000.0)))
    common = dict(vocab_size=hf["vocab_size"], dim=hf["hidden_size"], n_layers=hf["num_hidden_layers"],
                  n_heads=hf["num_attention_heads"], ffn_hidden_dim=hf["intermediate_size"],
                  max_seq_len=hf["max_position_embeddings"], norm_eps=hf["rms_norm_eps"],
                  tie_embeddings=bool(hf.get("tie_word_embeddings", False)), rope_theta=theta,
                  init_std=hf.get("initializer_range", 0.02))
    if kind == "llama":
        if rope_type != "default":
            _refuse(f"rope_type {rope_type!r}: effllm's Llama-layout attention runs plain RoPE")
        head_dim = hf.get("head_dim") or hf["hidden_size"] // hf["num_attention_heads"]
        if head_dim * hf["num_attention_heads"] != hf["hidden_size"]:
            _refuse(f"head_dim {head_dim} x {hf['num_attention_heads']} heads != hidden_size {hf['hidden_size']}: "
                    "effllm's heads split the model width")
        kv = hf.get("num_key_value_heads") or hf["num_attention_heads"]
        return ModelConfig(**common, n_kv_heads=None if kv == hf["num_attention_heads"] else kv)
    if rope_type not in ("default", "yarn"):
        _refuse(f"rope_type {rope_type!r}: effllm's MLA runs plain RoPE or YaRN")
    yarn = {}
    if rope_type == "yarn":
        if rope.get("mscale", 1.0) != rope.get("mscale_all_dim", rope.get("mscale", 1.0)):
            _refuse("YaRN with mscale != mscale_all_dim: effllm leaves cos/sin unscaled")
        yarn = dict(rope_factor=float(rope["factor"]), original_max_position=rope["original_max_position_embeddings"],
                    beta_fast=float(rope.get("beta_fast", 32.0)), beta_slow=float(rope.get("beta_slow", 1.0)),
                    mscale=float(rope.get("mscale", 1.0)))
    mla = MLAConfig(q_lora_rank=hf.get("q_lora_rank") or 0, kv_lora_rank=hf["kv_lora_rank"],
                    qk_nope_head_dim=hf["qk_nope_head_dim"], qk_rope_head_dim=hf["qk_rope_head_dim"],
                    v_head_dim=hf["v_head_dim"], rope_theta=theta, norm_eps=HF_LATENT_NORM_EPS, **yarn)
    first_dense = hf.get("first_k_dense_replace", 0)
    if first_dense >= hf["num_hidden_layers"]:
        return ModelConfig(**common, attention="mla", mla=mla, mtp_depth=mtp_depth)
    if hf.get("scoring_func", "sigmoid") != "sigmoid" or hf.get("topk_method", "noaux_tc") != "noaux_tc":
        _refuse("a router other than sigmoid scores with noaux_tc top-k (DeepSeek-V3's)")
    moe = MoEConfig(n_routed_experts=hf["n_routed_experts"], n_shared_experts=hf["n_shared_experts"],
                    top_k=hf["num_experts_per_tok"], expert_dim=hf["moe_intermediate_size"], score_func="sigmoid",
                    route_scale=float(hf.get("routed_scaling_factor", 1.0)),
                    norm_topk_prob=bool(hf.get("norm_topk_prob", True)), n_group=hf.get("n_group") or 1,
                    topk_group=hf.get("topk_group") or 1)
    return ModelConfig(**common, attention="mla", mla=mla, ffn="moe", moe=moe, first_k_dense=first_dense,
                       mtp_depth=mtp_depth)


def deinterleave_rope(key: str, w: torch.Tensor, cfg: ModelConfig) -> torch.Tensor:
    """Rows of an interleaved-RoPE checkpoint's query and rotary-key projections in effllm's order.

    Interleaved RoPE rotates the pairs (x0, x1), (x2, x3), ...; effllm's rotates (x_i, x_{i+R/2}),
    as transformers does after permuting the interleaved slice to [x0, x2, ..., x1, x3, ...]. The
    same permutation of the projection's rotary rows makes effllm's linear output that order
    directly: per head in the query projection (its last R of N + R rows), and the key's R rows
    after the latent in `wkv_a`. Other tensors pass unchanged."""
    m = cfg.mla
    name = key.split(".")  # blocks.{i}.attn.{proj}.weight, or mtp.{k}.block.attn.{proj}.weight
    proj = name[name.index("attn") + 1] if "attn" in name[:-1] else None
    if proj not in ("wq", "wq_b", "wkv_a"):
        return w
    R = m.qk_rope_head_dim
    order = torch.cat([torch.arange(0, R, 2), torch.arange(1, R, 2)])
    if proj == "wkv_a":
        C = m.kv_lora_rank
        return torch.cat([w[:C], w[C:][order]])
    heads = w.view(cfg.n_heads, m.qk_nope_head_dim + R, -1)
    rope = heads[:, m.qk_nope_head_dim:][:, order]
    return torch.cat([heads[:, :m.qk_nope_head_dim], rope], dim=1).reshape(w.shape)


def dequantize_blocks(q: torch.Tensor, scale_inv: torch.Tensor, block: tuple[int, int] = (128, 128)) -> torch.Tensor:
    """fp32 values of a block-scaled FP8 weight: q (N, K) float8_e4m3fn times `scale_inv`
    (ceil(N/bn), ceil(K/bk)), one factor per block (DeepSeek-V3's `weight_scale_inv`: despite its
    name the factor that multiplies, dequantized = q * scale_inv); partial edge blocks included."""
    N, K = q.shape
    bn, bk = block
    want = (-(-N // bn), -(-K // bk))
    if tuple(scale_inv.shape) != want:
        raise ConfigError(f"cannot import: a ({N}, {K}) FP8 weight has scales of shape {tuple(scale_inv.shape)}, "
                          f"{bn}x{bk} blocks need {want}")
    s = scale_inv.float().repeat_interleave(bn, 0)[:N].repeat_interleave(bk, 1)[:, :K]
    return q.float() * s


def _fp8_block(hf: dict) -> tuple[int, int]:
    """The (rows, columns) of a block of the checkpoint's FP8 weights (its quantization_config)."""
    q = hf.get("quantization_config") or {}
    if q and (q.get("quant_method") != "fp8" or q.get("activation_scheme", "dynamic") != "dynamic"):
        _refuse(f"quantization_config {q}: effllm dequantizes block-scaled FP8 weights (quant_method 'fp8', dynamic "
                "activations, DeepSeek-V3's) only")
    bn, bk = q.get("weight_block_size", (128, 128))
    return int(bn), int(bk)


def _hf_tensors(folder: Path) -> dict[str, Path]:
    """Each tensor's safetensors file: model.safetensors, or the shards of model.safetensors.index.json."""
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        return {name: folder / file for name, file in json.loads(index.read_text())["weight_map"].items()}
    single = folder / "model.safetensors"
    if not single.is_file():
        raise ConfigError(f"{folder} holds neither model.safetensors nor model.safetensors.index.json: point at a "
                          "transformers checkpoint saved with safetensors")
    with safe_open(str(single), "pt") as f:
        return dict.fromkeys(f.keys(), single)


def load_hf(folder: str | Path) -> Transformer:
    """An effllm Transformer (fp32, CPU) with the weights of the transformers checkpoint in `folder`
    (config.json and safetensors, Llama or DeepseekV3 layout): the inverse of the export, by the same
    name mapping (`hf_names`). Every tensor of the model must be found with its shape, and every
    tensor of the checkpoint used; anything else is refused by name."""
    folder = Path(folder)
    if not (folder / "config.json").is_file():
        raise ConfigError(f"{folder} has no config.json: point at a transformers checkpoint folder")
    hf = json.loads((folder / "config.json").read_text())
    cfg = model_config_from_hf(hf)
    # DeepSeek's own checkpoints rotate interleaved pairs (rope_interleave, transformers' default for
    # the layout); effllm rotates halves: their rows are reordered on import (`deinterleave_rope`).
    interleaved = cfg.attention == "mla" and hf.get("rope_interleave", True)
    where = _hf_tensors(folder)
    layers = {int(n.split(".")[2]) for n in where if n.startswith("model.layers.")}
    extra = sorted(i for i in layers if i >= hf["num_hidden_layers"])  # DeepSeek's MTP layers follow the last
    nextn = hf.get("num_nextn_predict_layers", 0) if cfg.attention == "mla" else 0
    if extra and extra != list(range(hf["num_hidden_layers"], hf["num_hidden_layers"] + len(extra))):
        _refuse(f"layers {extra} past the {hf['num_hidden_layers']} of config.json are not consecutive MTP layers")
    if len(extra) > nextn:
        _refuse(f"{', '.join(f'model.layers.{i}' for i in extra)} past the {cfg.n_layers} layers: config.json's "
                f"num_nextn_predict_layers={nextn} declares {nextn} multi-token-prediction layers")
    if extra:
        cfg = model_config_from_hf(hf, mtp_depth=len(extra))
    block = _fp8_block(hf)
    model = Transformer(cfg)
    handles: dict[Path, object] = {}  # one open file per shard

    def read(name: str, key: str) -> torch.Tensor:
        if name not in where:
            raise ConfigError(f"cannot import: {folder} has no tensor {name} (effllm's {key})")
        if where[name] not in handles:
            handles[where[name]] = safe_open(str(where[name]), "pt")
        t = handles[where[name]].get_tensor(name)
        used.add(name)
        if t.dtype == torch.float8_e4m3fn:
            scale = name.removesuffix("weight") + "weight_scale_inv"
            if scale not in where:
                _refuse(f"{name} is FP8 without its {scale}")
            return dequantize_blocks(t, read(scale, key), block)
        if t.dtype.is_floating_point and t.dtype.itemsize == 1:
            _refuse(f"{name} is {t.dtype}: effllm dequantizes float8_e4m3fn block-scaled weights only")
        return t.float()

    used, state = set(), {}
    n_layers = cfg.n_layers if cfg.attention == "mla" else None
    for key, t in model.state_dict().items():
        names = hf_names(key, t.shape[0] if t.dim() else 0, n_layers)
        if names is None:
            continue
        if key == "head.weight" and cfg.tie_embeddings:
            continue  # tied: the embedding's tensor
        pieces = [read(name, key) for name in names]
        value = torch.stack(pieces) if ".ffn.experts." in key else pieces[0]
        if value.shape != t.shape:
            raise ConfigError(f"cannot import: {names[0]} has shape {tuple(value.shape)}, effllm's {key} needs "
                              f"{tuple(t.shape)}")
        if key.startswith("mtp.") and key.endswith(".proj.weight"):
            value = swap_mtp_inputs(value)
        state[key] = deinterleave_rope(key, value, cfg) if interleaved else value
    for k in range(cfg.mtp_depth):  # DeepSeek's MTP layers carry copies of the embedding and head
        for main, copy in MTP_SHARED.items():
            name = f"model.layers.{cfg.n_layers + k}.{copy}"
            if name in where:
                shared = state["tok_emb.weight" if main.startswith("model.") or cfg.tie_embeddings else "head.weight"]
                if not torch.equal(read(name, f"mtp.{k}"), shared):
                    _refuse(f"{name} differs from {main}: effllm's MTP modules share the model's embedding and head")
    unused = sorted(set(where) - used - ({"lm_head.weight"} if cfg.tie_embeddings else set()))
    if unused:
        raise ConfigError(f"cannot import: {len(unused)} tensors of {folder} have no place in effllm's model "
                          f"({', '.join(unused[:5])}{' ...' if len(unused) > 5 else ''})")
    model.load_state_dict(state, strict=False)
    return model


def _tokenizer(folder: Path, eot_token: str | None):
    """The checkpoint's tokenizer (tokenizer.json in `folder`), or None: effllm's byte tokenizer when
    the file is effllm's export of it, else the file as it is (`FileTokenizer`)."""
    path = folder / "tokenizer.json"
    if not path.is_file():
        return None
    try:
        if json.loads(path.read_text()) == byte_tokenizer_json():
            return ByteTokenizer()
    except (ValueError, UnicodeDecodeError):
        pass  # FileTokenizer.open names what is wrong with the file
    return FileTokenizer.open(path, eot_token)


def _is_import(directory: Path) -> bool:
    try:
        return "imported_from" in ckpt_io.read_state(ckpt_io.resolve_checkpoint(directory))
    except Exception:  # not a checkpoint at all, or a damaged one: not ours to replace
        return False


def import_hf(cfg: ImportConfig) -> Path:
    """Write the transformers checkpoint `cfg.source` as an effllm run directory `cfg.out`:

        checkpoints/step_00000000/  model.safetensors (fp32), state.json, tokenizer.json (if any)
        config.json                 a TrainConfig of the model, with init_from the checkpoint

    The checkpoint holds weights only (`load_hf`'s model): `effllm generate`, `eval`, `card`,
    `export-hf` read it as any checkpoint, and `effllm train --from OUT --data-dir D --out-dir RUN`
    starts a new run from its weights (the data prepared with `--tokenizer OUT/checkpoints/
    step_00000000/tokenizer.json`). state.json records where the weights came from: the folder and
    the sha256 of each file read. Written into a hidden folder that replaces `out` once complete."""
    source = resolved(cfg.source)
    out = resolved(cfg.out)
    refuse_overlap(out, [source], what="checkpoint")
    claim_output_dir(out, writer="effllm import-hf", owned=IMPORTED_FILES, is_ours=_is_import, overwrite=cfg.overwrite)
    model = load_hf(source)  # every refusal before anything is written
    tokenizer = _tokenizer(source, cfg.eot_token)
    if tokenizer is not None and tokenizer.vocab_size > model.cfg.vocab_size:
        raise ConfigError(f"{source / 'tokenizer.json'} has {tokenizer.vocab_size:,} tokens, the model's embedding "
                          f"{model.cfg.vocab_size:,}: this tokenizer is not the model's")
    hf = json.loads((source / "config.json").read_text())
    files = sorted({*_hf_tensors(source).values(), source / "config.json"}
                   | ({source / "model.safetensors.index.json"} if (source / "model.safetensors.index.json").is_file()
                      else set()))
    train_cfg = TrainConfig(model=model.cfg, seq_len=min(256, model.cfg.max_seq_len), init_from=str(out))
    tmp = new_temp_dir(out)
    try:
        extra = {}
        if tokenizer is not None and tokenizer.kind == "file":
            shutil.copyfile(source / "tokenizer.json", tmp / "tokenizer.json")
            extra["tokenizer.json"] = tmp / "tokenizer.json"
        state = {"config": asdict(replace(train_cfg, init_from=None)),
                 "tokenizer": tokenizer_spec(tokenizer, tmp) if tokenizer is not None else None,
                 "imported_from": {"path": str(source), "model_type": hf.get("model_type"),
                                   "architectures": hf.get("architectures"),
                                   "files": {str(f.relative_to(source)): sha256_file(f) for f in files}},
                 "tokens_seen": 0}
        ckpt_io.save_checkpoint(tmp / "checkpoints", 0, model, None, state, extra_files=extra, keep=1)
        (tmp / "tokenizer.json").unlink(missing_ok=True)
        (tmp / "config.json").write_text(json.dumps(asdict(train_cfg), indent=1) + "\n")
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    replace_dir(tmp, out)
    return out
