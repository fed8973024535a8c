"""Export to the Hugging Face transformers layout: `effllm export-hf --checkpoint DIR --out DIR`.
effllm/hf_import.py reads the layout back (`load_hf`) through this module's name mapping, `hf_names`.

Two layouts, chosen by the model's kinds:
- Llama (`LlamaForCausalLM`): dense feed-forwards with MHA or GQA attention;
- DeepseekV3 (`DeepseekV3ForCausalLM`): MLA attention, with dense or DeepSeekMoE feed-forwards.
  Routed experts are written one tensor per expert (`mlp.experts.{j}.gate_proj.weight`, ...), the
  layout of DeepSeek's own checkpoints, which transformers merges into its fused tensors on load.

What the export writes: config.json, model.safetensors, a model card (README.md) and, where the
tokenizer can be expressed, tokenizer.json with tokenizer_config.json.

Where the layouts differ from effllm, the export says so rather than guess:
- RoPE: effllm rotates the two halves of each rotary slice (as Llama does); DeepSeek's own
  checkpoints rotate interleaved pairs. The DeepseekV3 config is written with
  `rope_interleave: false`, which selects the half-rotation in transformers.
- Multi-token prediction modules: in the DeepseekV3 layout they are written as DeepSeek's own
  checkpoints write theirs, as the layers after the last (`model.layers.{n_layers + k}`: `enorm`,
  `hnorm`, `eh_proj`, `shared_head.norm`, the block's tensors, and copies of the embedding and
  head), with `num_nextn_predict_layers` set; DeepSeek's `eh_proj` reads [embedding; hidden],
  effllm's `proj` [hidden; embedding], so its two column halves are swapped (`swap_mtp_inputs`).
  transformers does not run them (it leaves those tensors unloaded); vLLM and SGLang draft with
  them. The Llama layout has no place for them: they are left out and the card says so.
- An option that transformers' layout cannot express makes the export refuse, naming it
  (`check_exportable`): MoE with MHA attention, softmax routing, MoE layers without shared experts,
  latent norms with an epsilon other than transformers' 1e-6.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from tokenizers import Tokenizer, decoders, models, pre_tokenizers

from effllm import checkpoint as ckpt_io
from effllm.card import card_text, find_manifest, model_lines
from effllm.docfields import documented
from effllm.errors import ConfigError
from effllm.fsutil import claim_output_dir, new_temp_dir, refuse_overlap, replace_dir, resolved
from effllm.model import ModelConfig, Transformer
from effllm.moe import MoE
from effllm.tokenizer import EOT_TEXT

HF_LATENT_NORM_EPS = 1e-6  # transformers builds DeepseekV3's q_a / kv_a layernorms with this epsilon


@documented
@dataclass
class ExportConfig:
    """Options of `effllm export-hf`."""

    checkpoint: str  # a run directory, its checkpoints/ folder, or one step_* folder
    out: str  # the directory to write (must not exist, or be empty, unless --overwrite)
    dtype: Literal["float32", "bfloat16"] = "float32"  # dtype of the exported weights
    overwrite: bool = False  # replace `out` if it holds an earlier effllm export (and nothing else)
    data_dir: str | None = None  # the prepared data, if its manifest is neither in the run nor at its recorded data_dir
    mtp: bool = True  # DeepseekV3 layout: MTP modules as the layers after the last, as DeepSeek's (transformers ignores them)


def layout(cfg: ModelConfig) -> str:
    """"llama" or "deepseek_v3": the transformers architecture that expresses `cfg` (see check_exportable)."""
    check_exportable(cfg)
    return "deepseek_v3" if cfg.attention == "mla" else "llama"


def check_exportable(cfg: ModelConfig) -> None:
    """Raise ConfigError naming the first option of `cfg` that neither layout can express."""
    if cfg.attention == "mha" and cfg.ffn == "moe":
        raise ConfigError("transformers has no layout for DeepSeekMoE feed-forwards with MHA/GQA attention "
                          "(its DeepseekV3 model always uses MLA): train with --model.attention mla to export "
                          "an MoE model, or export a dense model (Llama layout)")
    if cfg.attention == "mla":
        m = cfg.mla
        if m.norm_eps != HF_LATENT_NORM_EPS:
            raise ConfigError(f"model.mla.norm_eps={m.norm_eps}, but transformers' DeepseekV3 fixes the latent "
                              f"RMSNorm epsilon at {HF_LATENT_NORM_EPS}: the exported model would compute "
                              f"something else. Train with --model.mla.norm-eps {HF_LATENT_NORM_EPS} to export")
    if cfg.ffn == "moe" and cfg.first_k_dense < cfg.n_layers:
        e = cfg.moe
        if e.score_func != "sigmoid":
            raise ConfigError(f"model.moe.score_func={e.score_func!r}: transformers' DeepseekV3 router is "
                              "sigmoid-only, so softmax-routed models cannot be exported to it")
        if e.n_shared_experts == 0:
            raise ConfigError("model.moe.n_shared_experts=0: transformers' DeepseekV3 MoE layer always runs "
                              "shared experts, so a model without them cannot be exported to it")
        if e.n_routed_experts // e.n_group < 2:
            raise ConfigError(f"{e.n_routed_experts} routed experts in {e.n_group} groups: transformers' "
                              "DeepseekV3 scores each group by its top-2 experts, which needs 2+ experts per group")


def check_router_exportable(model: Transformer) -> None:
    """Refuse group-limited routers without a bias: they score each group by its best expert (as
    DeepSeek's Gate without a bias does), where transformers' DeepseekV3 always sums the top two."""
    for name, layer in model.named_modules():
        if (isinstance(layer, MoE) and layer.cfg.n_group > 1 and layer.cfg.bias_update_rate == 0
                and not bool(layer.router.expert_bias.any())):
            raise ConfigError(f"{name} routes over {layer.cfg.n_group} groups without a balancing bias, so its groups "
                              "score by their best expert; transformers' DeepseekV3 scores them by the sum of their top "
                              "two and would route differently. Train with moe.bias_update_rate > 0 or moe.n_group=1 "
                              "to export")


def _rope_fields(theta: float, mla=None) -> dict:
    """rope_parameters (transformers 5) and the older rope_theta / rope_scaling (transformers 4)."""
    if mla is None or mla.rope_factor == 1.0:
        return {"rope_theta": theta, "rope_scaling": None,
                "rope_parameters": {"rope_type": "default", "rope_theta": theta}}
    # effllm scales the softmax by yarn_mscale(factor, mscale)^2 and leaves cos/sin unscaled:
    # transformers does the same when mscale == mscale_all_dim (its cos/sin factor is then 1).
    yarn = {"rope_type": "yarn", "factor": mla.rope_factor, "original_max_position_embeddings": mla.original_max_position,
            "beta_fast": mla.beta_fast, "beta_slow": mla.beta_slow, "mscale": mla.mscale, "mscale_all_dim": mla.mscale}
    return {"rope_theta": theta, "rope_scaling": dict(yarn), "rope_parameters": {**yarn, "rope_theta": theta}}


def hf_config(cfg: ModelConfig, eot_id: int | None = None, dtype: str = "float32", mtp: bool = True) -> dict:
    """The transformers config.json for a model of config `cfg`."""
    kind = layout(cfg)
    common = {
        "vocab_size": cfg.vocab_size, "hidden_size": cfg.dim, "intermediate_size": cfg.hidden_dim,
        "num_hidden_layers": cfg.n_layers, "num_attention_heads": cfg.n_heads, "max_position_embeddings": cfg.max_seq_len,
        "rms_norm_eps": cfg.norm_eps, "hidden_act": "silu", "tie_word_embeddings": cfg.tie_embeddings,
        "attention_bias": False, "attention_dropout": 0.0, "initializer_range": cfg.init_std, "use_cache": True,
        "bos_token_id": eot_id, "eos_token_id": eot_id, "pad_token_id": None, "dtype": dtype, "torch_dtype": dtype,
    }
    if kind == "llama":
        return {"architectures": ["LlamaForCausalLM"], "model_type": "llama", **common,
                "num_key_value_heads": cfg.kv_heads, "head_dim": cfg.head_dim, "mlp_bias": False,
                "pretraining_tp": 1, **_rope_fields(cfg.rope_theta)}
    m = cfg.mla
    out = {"architectures": ["DeepseekV3ForCausalLM"], "model_type": "deepseek_v3", **common,
           "num_key_value_heads": cfg.n_heads,  # MLA expands keys and values per head
           "q_lora_rank": m.q_lora_rank or None, "kv_lora_rank": m.kv_lora_rank,
           "qk_nope_head_dim": m.qk_nope_head_dim, "qk_rope_head_dim": m.qk_rope_head_dim, "v_head_dim": m.v_head_dim,
           "rope_interleave": False,  # effllm rotates halves, not interleaved pairs
           "num_nextn_predict_layers": cfg.mtp_depth if mtp else 0,  # the layers after the last, as DeepSeek's
           **_rope_fields(m.rope_theta, m)}
    if cfg.ffn == "moe" and cfg.first_k_dense < cfg.n_layers:
        e = cfg.moe
        out.update(first_k_dense_replace=cfg.first_k_dense, n_routed_experts=e.n_routed_experts,
                   n_shared_experts=e.n_shared_experts, num_experts_per_tok=e.top_k, moe_intermediate_size=e.expert_dim,
                   n_group=e.n_group, topk_group=e.topk_group, norm_topk_prob=e.renormalize,
                   routed_scaling_factor=e.route_scale, scoring_func="sigmoid", topk_method="noaux_tc")
    else:  # every layer dense: the MoE fields must still be consistent
        out.update(first_k_dense_replace=cfg.n_layers, n_routed_experts=2, n_shared_experts=1, num_experts_per_tok=1,
                   moe_intermediate_size=cfg.hidden_dim, n_group=1, topk_group=1, norm_topk_prob=True,
                   routed_scaling_factor=1.0)
    return out


_ATTN_NAMES = {"wq": "q_proj", "wk": "k_proj", "wv": "v_proj", "wo": "o_proj", "wq_a": "q_a_proj",
               "q_norm": "q_a_layernorm", "wq_b": "q_b_proj", "wkv_a": "kv_a_proj_with_mqa",
               "kv_norm": "kv_a_layernorm", "wkv_b": "kv_b_proj"}
_MLP_NAMES = {"w1": "gate_proj", "w3": "up_proj", "w2": "down_proj"}


_MTP_NAMES = {"hidden_norm": "hnorm", "embed_norm": "enorm", "proj": "eh_proj", "out_norm": "shared_head.norm"}
MTP_SHARED = {"model.embed_tokens.weight": "embed_tokens.weight", "lm_head.weight": "shared_head.head.weight"}


def hf_names(key: str, n_experts: int = 0, n_layers: int | None = None) -> list[str] | None:
    """The transformers name(s) of effllm tensor `key`: one name, or one per expert for the stacked
    (E, ...) expert weights. The MTP modules are named as DeepSeek's checkpoints name theirs, as the
    layers after the model's `n_layers` (module k is layer n_layers + k); without `n_layers` (the
    Llama layout, which has no place for them) they are not exported: None. The one mapping, read
    both ways: by the export (`hf_state_dict`) and the import (`load_hf`)."""
    parts = key.split(".")
    if parts[0] == "mtp":
        if n_layers is None:
            return None
        layer = n_layers + int(parts[1])
        if parts[2] == "block":
            return hf_names(".".join(["blocks", str(layer), *parts[3:]]), n_experts)
        if parts[2] in _MTP_NAMES:
            return [f"model.layers.{layer}.{_MTP_NAMES[parts[2]]}.weight"]
        raise ConfigError(f"no transformers name for effllm tensor {key}")
    top = {"tok_emb": "model.embed_tokens.weight", "norm": "model.norm.weight", "head": "lm_head.weight"}
    if parts[0] in top:
        return [top[parts[0]]]
    if parts[0] != "blocks":
        raise ConfigError(f"no transformers name for effllm tensor {key}")
    i, sub, rest = parts[1], parts[2], parts[3:]
    pre = f"model.layers.{i}"
    if sub == "attn_norm":
        return [f"{pre}.input_layernorm.weight"]
    if sub == "ffn_norm":
        return [f"{pre}.post_attention_layernorm.weight"]
    if sub == "attn" and rest[0] in _ATTN_NAMES:
        return [f"{pre}.self_attn.{_ATTN_NAMES[rest[0]]}.weight"]
    if sub == "ffn" and rest[0] in _MLP_NAMES:  # a dense SwiGLU
        return [f"{pre}.mlp.{_MLP_NAMES[rest[0]]}.weight"]
    if sub == "ffn" and rest[0] == "shared":
        return [f"{pre}.mlp.shared_experts.{_MLP_NAMES[rest[1]]}.weight"]
    if sub == "ffn" and rest[0] == "router":  # expert_bias: the aux-loss-free balancing bias
        return [f"{pre}.mlp.gate.weight" if rest[1] == "weight" else f"{pre}.mlp.gate.e_score_correction_bias"]
    if sub == "ffn" and rest[0] == "experts":  # stacked (E, ...) -> one tensor per expert
        return [f"{pre}.mlp.experts.{j}.{_MLP_NAMES[rest[1]]}.weight" for j in range(n_experts)]
    raise ConfigError(f"no transformers name for effllm tensor {key}")


def swap_mtp_inputs(w: torch.Tensor) -> torch.Tensor:
    """An MTP projection's weight with its two column halves swapped: effllm's `proj` reads
    [hidden; embedding], DeepSeek's `eh_proj` [embedding; hidden]. Its own inverse."""
    half = w.shape[1] // 2
    return torch.cat((w[:, half:], w[:, :half]), dim=1)


def hf_state_dict(model: Transformer, dtype: torch.dtype = torch.float32, mtp: bool = True) -> dict[str, torch.Tensor]:
    """model's weights under transformers' names, contiguous, in `dtype`; in the DeepseekV3 layout
    with the MTP modules (`mtp`) as the layers after the last (each with copies of the embedding and
    head, as DeepSeek's checkpoints carry them), in the Llama layout without them.

    The balancing bias of each router stays fp32, as transformers keeps it.
    """
    cfg = model.cfg
    n_layers = cfg.n_layers if mtp and layout(cfg) == "deepseek_v3" else None
    out: dict[str, torch.Tensor] = {}
    for key, t in model.state_dict().items():
        names = hf_names(key, t.shape[0] if t.dim() else 0, n_layers)
        if names is None:
            continue
        keep_fp32 = key.endswith("expert_bias")
        if key.startswith("mtp.") and key.endswith(".proj.weight"):
            t = swap_mtp_inputs(t)
        pieces = list(t) if ".ffn.experts." in key else [t]
        for name, piece in zip(names, pieces, strict=True):
            out[name] = piece.detach().to(torch.float32 if keep_fp32 else dtype).contiguous().clone()
    for k in range(cfg.mtp_depth if n_layers is not None else 0):
        for main, copy in MTP_SHARED.items():
            source = out.get(main, out["model.embed_tokens.weight"])  # a tied head is the embedding
            out[f"model.layers.{n_layers + k}.{copy}"] = source.clone()
    return out


def byte_tokenizer_json() -> dict:
    """A `tokenizers` file that encodes text as effllm's byte tokenizer does: token id = UTF-8 byte.

    The ByteLevel pre-tokenizer maps each byte to a printable character; a BPE with those 256
    characters as its vocabulary and no merges gives every byte its own id.
    """
    # GPT-2's byte -> character table: printable Latin-1 bytes stand for themselves, the other
    # bytes take the characters from U+0100 on, in byte order.
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    char_of, extra = {}, 0
    for b in range(256):
        if b in printable:
            char_of[b] = chr(b)
        else:
            char_of[b] = chr(256 + extra)
            extra += 1
    if set(char_of.values()) != set(pre_tokenizers.ByteLevel.alphabet()):
        raise RuntimeError("tokenizers' ByteLevel alphabet is not GPT-2's byte table: cannot write a byte tokenizer")
    byte_of = {c: b for b, c in char_of.items()}
    tok = Tokenizer(models.BPE(vocab=byte_of, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    return json.loads(tok.to_str())


def _tokenizer_files(spec: dict, ckpt: Path | None) -> dict[str, str]:
    """tokenizer.json and tokenizer_config.json for the tokenizer `spec` describes ({} if none)."""
    if spec.get("kind") == "byte":
        table = byte_tokenizer_json()
        tokenizer = json.dumps(table, ensure_ascii=False)
        # id 0 is byte NUL, which effllm removes from text and uses as end-of-text: config.json's
        # bos/eos_token_id 0, so the tokenizer's eos and bos are the character that stands for it
        eot = next(char for char, i in table["model"]["vocab"].items() if i == 0)
    elif spec.get("kind") in ("bpe", "file") and ckpt is not None and (ckpt / "tokenizer.json").is_file():
        tokenizer, eot = (ckpt / "tokenizer.json").read_text(), spec.get("eot_token", EOT_TEXT)
    else:
        return {}
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "clean_up_tokenization_spaces": False,
              "model_max_length": None, **({"eos_token": eot, "bos_token": eot} if eot else {})}
    return {"tokenizer.json": tokenizer, "tokenizer_config.json": json.dumps(config, indent=1) + "\n"}


def model_card(cfg: ModelConfig, counts: dict, state: dict | None, manifest: dict | None, kind: str,
               mtp: bool = True) -> str:
    """README.md for the export: effllm's model card (effllm.card.card_text: the model, its training,
    its data by licence) under the hub's front matter, then how to load it and the export's notes."""
    front = ["---", "library_name: transformers", "tags: [effllm, " + kind + "]", "pipeline_tag: text-generation",
             "---", ""]
    title = f"# A {'DeepseekV3' if kind == 'deepseek_v3' else 'Llama'}-layout model trained with effllm"
    if state is not None:
        body = card_text(state, counts, manifest, title=title)
    else:
        body = "\n".join([title, "", *model_lines(asdict(cfg), counts), "## Training", "",
                          "- Not exported from a training checkpoint: no training record and no training data.", ""])
    notes = ["", "## Using it", "", "```python", "from transformers import AutoModelForCausalLM",
             "model = AutoModelForCausalLM.from_pretrained(PATH)", "```", "",
             "## Export notes", "",
             f"- The export holds {counts['total']:,} parameters"
             + (f": the {counts['mtp']:,} of the multi-token-prediction modules are not exported (the Llama layout "
                "has no place for them)." if counts["mtp"] and kind == "llama" else
                f": the {counts['mtp']:,} of the multi-token-prediction modules are not exported (--no-mtp)."
                if counts["mtp"] and not mtp else
                f", and the multi-token-prediction modules ({counts['mtp']:,}) as the layers after the last, as "
                "DeepSeek's checkpoints hold theirs (transformers leaves them unloaded)." if counts["mtp"] else "."),
             "- RoPE rotates the two halves of each rotary slice, as in Llama"
             + ("; the config sets `rope_interleave: false` (DeepSeek's own checkpoints interleave pairs)."
                if kind == "deepseek_v3" else "."),
             "- Routed experts are stored one tensor per expert, as in DeepSeek's checkpoints, and the "
             "balancing bias as `mlp.gate.e_score_correction_bias`." if cfg.ffn == "moe" else None,
             "- Byte-level model: token id = UTF-8 byte; id 0 (NUL) marks the end of a document."
             if (state or {}).get("tokenizer", {}).get("kind") == "byte" else None, ""]
    return "\n".join(front) + body + "\n".join(line for line in notes if line is not None) + "\n"


def save_hf(model: Transformer, out: str | Path, dtype: torch.dtype = torch.float32, state: dict | None = None,
            manifest: dict | None = None, tokenizer_spec: dict | None = None, ckpt: Path | None = None,
            overwrite: bool = False, mtp: bool = True) -> Path:
    """Write `model` to `out` in the transformers layout, atomically (temp dir, then rename), with
    its MTP modules in the DeepseekV3 layout unless `mtp` is False. A model from a training
    checkpoint (`state`) needs its data `manifest`: the card lists the data's sources and licences,
    and is never written without them."""

    cfg = model.cfg
    kind = layout(cfg)  # refuses before anything is written
    check_router_exportable(model)
    if state is not None and manifest is None:
        raise ConfigError("a model from a training checkpoint is exported with its data manifest (the card lists its "
                          "sources and licences): pass manifest=, as export_hf does")
    out = resolved(out)
    if ckpt is not None:
        refuse_overlap(out, [ckpt], what="checkpoint")
    claim_output_dir(out, writer="effllm export-hf", owned=EXPORT_FILES, is_ours=is_export, overwrite=overwrite)
    tensors = hf_state_dict(model, dtype, mtp)
    dtype_name = str(dtype).removeprefix("torch.")
    eot = (tokenizer_spec or {}).get("eot_id")
    tmp = new_temp_dir(out)
    try:
        if cfg.tie_embeddings:  # transformers ties lm_head to the embedding itself
            tensors.pop("lm_head.weight")
        save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt", "exported_by": "effllm"})
        (tmp / "config.json").write_text(json.dumps(hf_config(cfg, eot, dtype_name, mtp), indent=1) + "\n")
        shutil.copymode(tmp / "config.json", tmp / "model.safetensors")  # safetensors writes 0600
        if eot is not None:
            (tmp / "generation_config.json").write_text(json.dumps({"bos_token_id": eot, "eos_token_id": eot}) + "\n")
        for name, text in _tokenizer_files(tokenizer_spec or {}, ckpt).items():
            (tmp / name).write_text(text)
        (tmp / "README.md").write_text(model_card(cfg, model.param_counts(), state, manifest, kind, mtp))
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    replace_dir(tmp, out)
    return out


EXPORT_FILES = ("model.safetensors", "config.json", "generation_config.json", "tokenizer.json",
                "tokenizer_config.json", "README.md")  # all that `save_hf` writes


def is_export(directory: Path) -> bool:
    """Whether `directory` holds an earlier effllm export (its weights say exported_by=effllm)."""
    try:
        with safe_open(str(directory / "model.safetensors"), "pt") as f:
            return (f.metadata() or {}).get("exported_by") == "effllm"
    except (OSError, SafetensorError):
        return False


def export_hf(cfg: ExportConfig) -> Path:
    """Load the checkpoint `cfg.checkpoint` and write it to `cfg.out` in the transformers layout."""
    ckpt = ckpt_io.resolve_checkpoint(cfg.checkpoint)
    state = ckpt_io.read_state(ckpt)
    check_exportable(ModelConfig.from_dict(state["config"]["model"]))  # before anything is read or built
    manifest = find_manifest(ckpt, state, cfg.data_dir)  # refuses an export without its data's provenance
    model, _, _ = ckpt_io.load_model(ckpt)
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[cfg.dtype]
    return save_hf(model, cfg.out, dtype, state, manifest, state.get("tokenizer"), ckpt, cfg.overwrite, cfg.mtp)
