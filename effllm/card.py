"""MODEL_CARD.md: what a checkpoint is and what it was trained on.

Written at the end of every training run (into the run directory) and by `effllm card
--checkpoint DIR`. In the spirit of the EU AI Act's public summary of training content, it gives:
the architecture and parameter counts; tokens seen and compute used (device-hours); the data's
sources by licence with their byte and token shares, its languages, web domains and collection
period, read from the data manifest whose sha256 the checkpoint records; the files the preparation
skipped and why. effllm/eu_summary.py writes the AI Office's template from the same records. Every number comes from the
checkpoint's state and the manifest; nothing is typed in by hand.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from effllm import checkpoint as ckpt_io
from effllm.data import mixture_rows
from effllm.docfields import documented
from effllm.errors import CheckpointError, OutputError
from effllm.fsutil import resolved, sha256_file, write_text_atomic
from effllm.model import ModelConfig, Transformer


@documented
@dataclass
class CardConfig:
    """Options of `effllm card`."""

    checkpoint: str  # a run directory, its checkpoints/ folder, or one step_* folder
    out: str | None = None  # where to write (default: MODEL_CARD.md in the run directory; with --eu-summary a folder)
    data_dir: str | None = None  # the prepared data, if not at the checkpoint's recorded data_dir
    eu_summary: bool = False  # write the EU AI Act's public summary of training content instead of the card
    provider: str | None = None  # with --eu-summary: a JSON file of what only the provider knows (effllm.eu_summary.ProviderInfo)


def licence_shares(manifest: dict) -> list[dict]:
    """Per licence: sources, files, bytes and train tokens, with their shares of the totals."""
    by = {}
    for f in manifest["files"]:
        if not f.get("documents", 1):
            continue  # every document of this file was filtered out: it was not trained on
        lic = manifest["sources"][f["source"]].get("license") or "unknown"
        row = by.setdefault(lic, {"license": lic, "sources": set(), "files": 0, "bytes": 0, "train_tokens": 0})
        row["sources"].add(f["source"])
        row["files"] += 1
        row["bytes"] += f.get("kept_bytes", f["bytes"])  # the text kept (older manifests: the file's size)
        row["train_tokens"] += f["tokens"]["train"]
    total_bytes = sum(r["bytes"] for r in by.values()) or 1
    total_tokens = sum(r["train_tokens"] for r in by.values()) or 1
    return [{**r, "sources": len(r["sources"]), "byte_share": r["bytes"] / total_bytes,
             "token_share": r["train_tokens"] / total_tokens} for r in sorted(by.values(), key=lambda r: -r["bytes"])]


def model_lines(m: dict, counts: dict) -> list[str]:
    """The card's "Model" section for a model config (as a dict) and its parameter counts."""
    attn = "MLA" if m["attention"] == "mla" else "MHA/GQA"
    ffn = (f"DeepSeekMoE, {m['moe']['n_routed_experts']} routed experts (top-{m['moe']['top_k']}) + "
           f"{m['moe']['n_shared_experts']} shared" if m["ffn"] == "moe" else "dense SwiGLU")
    return ["## Model", "",
            f"- Decoder-only Transformer: {m['n_layers']} layers, width {m['dim']}, {m['n_heads']} heads, {attn} "
            f"attention, {ffn} feed-forwards" + (f", {m['mtp_depth']} multi-token-prediction module(s)"
                                                  if m.get("mtp_depth") else "") + ".",
            f"- Parameters: {counts['total']:,} in total, {counts['active']:,} active per token"
            + (f" (+{counts['mtp']:,} in MTP modules, trained alongside and not part of the exported model)"
               if counts.get("mtp") else "") + ".",
            f"- Vocabulary {m['vocab_size']}, context {m['max_seq_len']} tokens.", ""]


def card_text(state: dict, counts: dict, manifest: dict, title: str = "# Model card") -> str:
    """The card's markdown from a checkpoint's state, the model's parameter counts and the manifest:
    the model, its training and compute, and its data by licence with the filters applied. The one
    card writer: `effllm card` and every run write it as MODEL_CARD.md, `effllm export-hf` as the
    export's README.md (under the hub's front matter, `title` its own)."""
    cfg = state["config"]
    m = cfg["model"]
    hours = state["elapsed_s"] / 3600
    lines = [title, "", "Written by effllm from the checkpoint and its data manifest.", "",
             *model_lines(m, counts),
             "## Training", "",
             f"- {state['step']:,} optimizer steps, {state['tokens_seen']:,} tokens seen"
             + (f" over {state['data']['world_size']} ranks" if state.get("data", {}).get("world_size", 1) > 1 else "")
             + ".",
             f"- Compute: {state['elapsed_s']:,.1f} s of wall-clock training = {hours:.3g} device-hours"
             + (f" x {state['data']['world_size']} devices" if state.get("data", {}).get("world_size", 1) > 1 else "")
             + (f", of which {state['train_s']:,.1f} s in training steps (the rest evaluations and checkpoints)"
                if "train_s" in state else "")
             + (f" (on {state['device_name']}" if state.get("device_name") else f" (device setting: {cfg.get('device')}")
             + f", precision: {cfg.get('precision')}"
             + (f", FP8 linears ({cfg.get('fp8_recipe', 'blockwise')} scaling)" if cfg.get("fp8") else "") + ").",
             *([f"- Started from the weights of the checkpoint `{cfg['init_from']}` (`--init-from`), not from a "
                "random initialization: what those weights learned before is that checkpoint's record."]
               if cfg.get("init_from") else []),
             "- Objective: next-token cross-entropy"
             + (f" + {m['mtp_lambda']} x multi-token prediction" if m.get("mtp_depth") else "")
             + (f"; Goldfish loss drops 1/{cfg['goldfish_k']} of target positions (context hash over "
                f"{cfg['goldfish_h']} tokens)" if cfg.get("goldfish_k") else "") + ".",
             "- Last validation loss: " + (f"{state['val_loss']:.4f} nats/token." if state.get("val_loss") is not None
                                           else "not recorded."), "",
             "## Training data", "",
             f"- Data manifest sha256: `{state.get('data_manifest_sha256')}`."]
    t = manifest["totals"]
    lines += [f"- {t['documents']:,} documents in {t['files']:,} files, {t['bytes']:,} bytes; {t['train_tokens']:,} "
              f"training and {t['val_tokens']:,} validation tokens ({manifest['tokenizer']['kind']} tokenizer).",
              f"- Validation split: {manifest['split']['rule']} (val_fraction {manifest['split']['val_fraction']}).",
              "", "### Sources by licence", "", "| licence | sources | files | bytes | share of bytes | training tokens "
              "| share of tokens |", "|---|---|---|---|---|---|---|"]
    for r in licence_shares(manifest):
        lines.append(f"| {r['license']} | {r['sources']} | {r['files']:,} | {r['bytes']:,} | {100 * r['byte_share']:.1f}% "
                     f"| {r['train_tokens']:,} | {100 * r['token_share']:.1f}% |")
    mix = mixture_rows(manifest, cfg.get("data_mix") or (), state.get("tokens_seen", 0), cfg.get("data_mix_per", "tokens"))
    if mix:
        lines += ["", "### Sampling mixture", "", "Training windows drawn per source by these shares of the training "
                  "tokens (" + ("the run's --data-mix" if cfg.get("data_mix") else "the data's prepare --mix")
                  + "); tokens and documents drawn are the expected counts: share x tokens seen, and that over the "
                  "source's mean document length.", "",
                  "| source | share of tokens | training tokens | tokens drawn | documents drawn | epochs |",
                  "|---|---|---|---|---|---|"]
        lines += [f"| {r['source']} | {100 * r['weight']:.1f}% | {r['train_tokens']:,} | {r['tokens_seen']:,} | "
                  f"{r['documents_seen']:,} | {r['epochs']:.2f} |" for r in mix]
    content = manifest.get("content")
    if content:  # recorded by prepare since languages and domains were (effllm/content.py)
        train = t["train_tokens"] or 1
        lines += ["", "### Languages", "", f"By {content['languages']['method']}.", "",
                  "| language | documents | training tokens | share of tokens |", "|---|---|---|---|"]
        lines += [f"| {r['language']} | {r['documents']:,} | {r['train_tokens']:,} | {100 * r['train_tokens'] / train:.1f}% |"
                  for r in content["languages"]["total"]]
        domains = content["domains"]["total"]
        if domains:
            total_bytes = sum(d["bytes"] for d in domains) or 1
            lines += ["", f"### Web domains ({len(domains):,}; the first {min(10, len(domains))} by bytes)", "",
                      "| domain | documents | bytes | share of web bytes |", "|---|---|---|---|"]
            lines += [f"| {d['domain']} | {d['documents']:,} | {d['bytes']:,} | {100 * d['bytes'] / total_bytes:.1f}% |"
                      for d in domains[:10]]
    collection = manifest.get("collection")
    if collection:
        lines += ["", f"Collection period (the documents' `{collection['field']}` field): {collection['earliest']} to "
                  f"{collection['latest']}; {collection['documents_dated']:,} documents dated, "
                  f"{collection['documents_undated']:,} undated."]
    lines += ["", "### Sources", ""]
    for i, s in enumerate(manifest["sources"]):
        where = Path(s.get("root") or s.get("path") or "").name  # the folder's name: no local path leaves the machine
        lines.append(f"{i}. {s.get('kind')}: `{where}`, licence {s.get('license') or 'unknown'}"
                     + (f" ({s['note']})" if s.get("note") else ""))
    lines += ["", "### Filters applied", ""]
    filters = manifest.get("filters")
    if filters is None:
        lines.append("- No licence filter, opt-out list or deduplication was applied when this data was prepared.")
    else:
        allow = filters.get("allow_licenses")
        lines.append("- Licences allowed: " + (", ".join(allow) if allow else "all (no allow-list)") + ".")
        opt = filters.get("opt_out")
        unmatched = [p for p, n in (opt or {}).get("matched", {}).items() if not n]
        lines.append(f"- Opt-outs honoured: {opt['patterns']} patterns from `{Path(opt['file']).name}` (sha256 "
                     f"`{opt['sha256']}`)"
                     + (f"; {sum(opt['matched'].values()):,} documents matched one" if "matched" in opt else "")
                     + (f"; {len(unmatched)} matched no document: " + ", ".join(f"`{p}`" for p in unmatched[:10])
                        if unmatched else "") + "."
                     if opt else "- Opt-outs honoured: no opt-out list was given.")
        lines.append(f"- Exact deduplication: {filters.get('exact_dedup')}.")
        near = filters.get("near_dedup")
        lines.append(f"- Near-duplicate removal: {near['method']}, threshold {near['threshold']}." if near
                     else "- Near-duplicate removal: off.")
        for reason, d in (manifest.get("dropped") or {}).items():
            lines.append(f"- Dropped ({reason.replace('_', ' ')}): {d['documents']:,} documents, {d['bytes']:,} bytes.")
    skipped = manifest.get("skipped") or []
    lines.append(f"- Files skipped at preparation: {len(skipped)}"
                 + (": " + "; ".join(f"{s['path']} ({s['reason']})" for s in skipped[:20])
                    + (" ..." if len(skipped) > 20 else "") if skipped else "") + ".")
    return "\n".join(lines) + "\n"


MANIFEST_COPY = "data_manifest.json"  # the run's copy of its data manifest (in the run directory and each checkpoint)
CARD_HEADER = "# Model card\n\nWritten by effllm"


def find_manifest(ckpt: Path, state: dict, data_dir: str | None = None) -> dict:
    """The data manifest checkpoint `ckpt` was trained on, its sha256 checked against the one the
    checkpoint records. Looked for in the checkpoint, its run directory, `data_dir` (when given:
    then it must be the right one) and the data directory the run recorded; refused when none holds
    it, so no card or export is ever written without its data's provenance."""
    want = state.get("data_manifest_sha256")
    if "imported_from" in state:
        raise CheckpointError(f"{ckpt} holds weights imported from {state['imported_from']['path']} "
                              "(effllm import-hf), which effllm did not train: their card is the source's own. Train "
                              "from them (effllm train --from RUN_DIR) and write the card or export of that run")
    if data_dir is not None:
        path = Path(data_dir) / "manifest.json"
        if not path.is_file() or sha256_file(path) != want:
            raise CheckpointError(f"{path} is not the manifest this checkpoint was trained on (sha256 differs or the "
                                  "file is missing): pass --data-dir with the data the run used")
        return json.loads(path.read_text())
    recorded = [state.get("data_dir_resolved"), state["config"].get("data_dir")]
    candidates = [ckpt / MANIFEST_COPY, ckpt.parent.parent / MANIFEST_COPY,
                  *(Path(d) / "manifest.json" for d in recorded if d)]
    for path in candidates:
        if path.is_file() and sha256_file(path) == want:
            return json.loads(path.read_text())
    raise CheckpointError(f"the data manifest of {ckpt} (sha256 {want}) is in none of "
                          + ", ".join(str(c) for c in candidates)
                          + ": pass --data-dir with the data the run was trained on. A card or export is not "
                          "written without the provenance of its data")


def write_card(cfg: CardConfig) -> Path:
    """`effllm card`: MODEL_CARD.md for a checkpoint, written atomically; an existing file is replaced
    only if it is a card effllm wrote."""
    ckpt = ckpt_io.resolve_checkpoint(cfg.checkpoint)
    state = ckpt_io.read_state(ckpt)
    out = resolved(cfg.out) if cfg.out else ckpt.parent.parent / "MODEL_CARD.md"
    check_card_target(out)
    manifest = find_manifest(ckpt, state, cfg.data_dir)
    with torch.device("meta"):
        counts = Transformer(ModelConfig.from_dict(state["config"]["model"])).param_counts()
    write_text_atomic(out, card_text(state, counts, manifest))
    return out


def check_card_target(out: Path, header: str = CARD_HEADER) -> None:
    """Refuse to write a card (or another document that starts with `header`) over anything but a
    file that is itself one effllm wrote."""
    if out.is_dir():
        raise OutputError(f"--out {out} is a folder: name the card's file, e.g. {out / 'MODEL_CARD.md'}")
    if out.exists():
        with open(out, encoding="utf-8", errors="replace") as fh:
            head = fh.read(len(header))
        if head != header:
            raise OutputError(f"{out} exists and is not a document effllm wrote: choose another --out")
