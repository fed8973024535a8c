"""The public summary of training content that Article 53(1)(d) of the EU AI Act asks of a
general-purpose AI model's provider, in the section order and headings of the template the
Commission's AI Office published on 24 July 2025, written from a checkpoint and its data manifest.

Every figure is read from the checkpoint's state and the manifest (the same records the model card
reads): data size, languages by share of tokens, sources by licence, the domains of web documents,
the licence filter, the opt-outs honoured and what each pattern removed, deduplication. What effllm
cannot know (who the provider is, whether the data was crawled by the provider, whether user data
or synthetic data was used, what was done against illegal content outside effllm) is read from a
provider file (`ProviderInfo`, JSON) and otherwise left visibly blank, never guessed.

`summary(state, manifest, provider)` gives the summary as a dict (written as JSON);
`markdown(summary)` renders that dict, so the two never disagree. `write_summary` writes both
atomically: EU_TRAINING_SUMMARY.md and eu_training_summary.json.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field, fields
from pathlib import Path

from effllm.card import check_card_target, find_manifest, licence_shares
from effllm.checkpoint import read_state, resolve_checkpoint
from effllm.docfields import documented
from effllm.errors import ConfigError
from effllm.fsutil import resolved, write_text_atomic

TEMPLATE = "Template for the Public Summary of Training Content for general-purpose AI models (AI Office, 24 July 2025)"
SUMMARY_MD, SUMMARY_JSON = "EU_TRAINING_SUMMARY.md", "eu_training_summary.json"
SUMMARY_HEADER = "# Public summary of training content\n\nWritten by effllm"
BLANK = "(not provided)"
# public: publicly available datasets; licensed: commercially licensed by rightsholders; private: other
# third parties' private datasets; crawled: crawled or scraped from online sources; user, synthetic, other
SOURCE_KINDS = ("public", "licensed", "private", "crawled", "user", "synthetic", "other")
TOP_DOMAIN_SHARE = 0.10  # the template's "top 10% of all domain names", by size of content


@documented
@dataclass
class ProviderInfo:
    """What only the provider knows, from `--provider FILE` (JSON with any of these fields)."""

    name: str | None = None  # the provider's name
    contact: str | None = None  # the provider's contact (address, e-mail or web form)
    model_name: str | None = None  # the versioned model name, as placed on the market
    model_dependencies: str | None = None  # the general-purpose model this one was fine-tuned or derived from, if any
    placed_on_market: str | None = None  # the date the model was placed on the Union market
    latest_collection: str | None = None  # the latest date of data collection (month/year), where the manifest has none
    source_kinds: list[str] = field(default_factory=list)  # each manifest source's kind, in order (SOURCE_KINDS)
    source_names: list[str] = field(default_factory=list)  # each manifest source's public name, in order
    crawler: str | None = None  # for crawled data: the crawlers, their purpose and behaviour (robots.txt), the period
    user_data: str | None = None  # whether and which user data was used ("none" if none)
    synthetic_data: str | None = None  # whether and which synthetic data was used, and by which model ("none" if none)
    other_sources: str | None = None  # any other data used, not in the manifest
    tdm_measures: str | None = None  # measures to respect text-and-data-mining opt-outs besides effllm's opt-out list
    illegal_content: str | None = None  # measures taken to remove illegal content
    other_information: str | None = None  # anything else the provider adds

    @classmethod
    def from_file(cls, path: str | Path | None) -> "ProviderInfo":
        if path is None:
            return cls()
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"provider file {path} does not exist — write a JSON file with any of: "
                              + ", ".join(f.name for f in fields(cls)))
        try:
            d = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise ConfigError(f"provider file {path} is not valid JSON ({e}) — fix the file") from None
        if not isinstance(d, dict):
            raise ConfigError(f"provider file {path} holds {type(d).__name__}, not an object of fields")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ConfigError(f"provider file {path}: unknown field(s) {', '.join(unknown)} — the fields are "
                              + ", ".join(sorted(known)))
        info = cls(**d)
        bad = [k for k in info.source_kinds if k not in SOURCE_KINDS]
        if bad:
            raise ConfigError(f"provider file {path}: source_kinds {bad} — each is one of {', '.join(SOURCE_KINDS)}")
        return info


def size_range(tokens: int) -> str:
    """The template's text size ranges."""
    if tokens < 10**9:
        return "Less than 1 billion tokens"
    return "1 billion to 10 trillion tokens" if tokens <= 10**13 else "More than 10 trillion tokens"


def _share(part: float, whole: float) -> float:
    return part / whole if whole else 0.0


def _sources(manifest: dict, provider: ProviderInfo) -> list[dict]:
    """Each manifest source with its kind (the provider's; the embedded corpus is public), licence,
    size and shares, languages and top domains."""
    n = len(manifest["sources"])
    for name, given in (("source_kinds", provider.source_kinds), ("source_names", provider.source_names)):
        if given and len(given) != n:
            raise ConfigError(f"the provider file's {name} has {len(given)} entries and the manifest {n} sources: "
                              "give one per source, in the manifest's order")
    content = manifest.get("content") or {}
    train_total = manifest["totals"]["train_tokens"]
    bytes_by, tokens_by = [0] * n, [0] * n
    for f in manifest["files"]:
        if f.get("documents", 1):
            bytes_by[f["source"]] += f.get("kept_bytes", f["bytes"])
            tokens_by[f["source"]] += f["tokens"]["train"]
    rows = []
    for i, s in enumerate(manifest["sources"]):
        kind = provider.source_kinds[i] if provider.source_kinds else ("public" if s.get("kind") == "stdlib" else None)
        name = (provider.source_names[i] if provider.source_names else
                (f"Python {s.get('python')} standard library" if s.get("kind") == "stdlib"
                 else Path(s.get("root") or s.get("path") or "").name))
        langs = content.get("languages", {}).get("by_source", [[]] * n)[i]
        domains = content.get("domains", {}).get("by_source", [[]] * n)[i]
        rows.append({"index": i, "name": name, "kind": kind, "license": s.get("license") or "unknown",
                     "bytes": bytes_by[i], "train_tokens": tokens_by[i],
                     "token_share": _share(tokens_by[i], train_total),
                     "languages": [{"language": r["language"], "token_share": _share(r["train_tokens"], tokens_by[i])}
                                   for r in langs],
                     "domains": len(domains), "top_domains": _top_domains(domains)})
    return rows


def _top_domains(domains: list[dict]) -> list[dict]:
    """The template's most relevant domains: the top 10% by bytes (at least one when there are any)."""
    keep = math.ceil(TOP_DOMAIN_SHARE * len(domains))
    total = sum(d["bytes"] for d in domains)
    return [{"domain": d["domain"], "bytes": d["bytes"], "byte_share": _share(d["bytes"], total)}
            for d in domains[:keep]]


def summary(state: dict, manifest: dict, provider: ProviderInfo | None = None) -> dict:
    """The summary of the checkpoint with `state`, trained on `manifest`, as a dict in the template's
    order: section -> subsection -> fields. None marks what the provider must still give."""
    provider = provider or ProviderInfo()
    totals = manifest["totals"]
    content = manifest.get("content")
    languages = None
    if content:
        train = totals["train_tokens"]
        languages = {"method": content["languages"]["method"],
                     "by_token_share": [{"language": r["language"], "token_share": _share(r["train_tokens"], train)}
                                        for r in content["languages"]["total"]]}
    code_share = sum(r["token_share"] for r in (languages or {}).get("by_token_share", [])
                     if r["language"].startswith("code:"))
    sources = _sources(manifest, provider)
    by_kind = {kind: [s for s in sources if s["kind"] == kind] for kind in SOURCE_KINDS}
    filters = manifest.get("filters") or {}
    opt = filters.get("opt_out")
    cfg = state["config"]
    return {
        "template": TEMPLATE,
        "data_manifest_sha256": state.get("data_manifest_sha256"),
        "1. General information": {
            "1.1. Provider identification": {"name": provider.name, "contact": provider.contact},
            "1.2. Model identification": {
                "versioned_model_name": provider.model_name, "model_dependencies": provider.model_dependencies,
                "date_placed_on_market": provider.placed_on_market},
            "1.3. Modalities, overall training data size and other characteristics": {
                "modalities": ["text"],
                "text_size_range": size_range(totals["train_tokens"]),
                "text_tokens": {"train": totals["train_tokens"], "validation": totals["val_tokens"],
                                "tokenizer": manifest["tokenizer"]["kind"]},
                "documents": totals["documents"], "bytes": totals["bytes"],
                "types_of_content": ({"source code": code_share, "natural-language text": 1 - code_share}
                                     if languages else None),
                "latest_date_of_collection": (manifest.get("collection") or {}).get("latest") or provider.latest_collection,
                "collection_period": manifest.get("collection"),
                "languages": languages,
                "tokens_seen_in_training": state["tokens_seen"],
                "passes_over_the_training_tokens": _share(state["tokens_seen"], totals["train_tokens"]),
            },
        },
        "2. List of data sources": {
            "2.1. Publicly available datasets": by_kind["public"],
            "2.2. Private non-publicly available datasets obtained from third parties": {
                "2.2.1. Datasets commercially licensed by rightsholders or their representatives": by_kind["licensed"],
                "2.2.2. Private datasets obtained from other third parties": by_kind["private"]},
            "2.3. Data crawled and scraped from online sources": {
                "sources": by_kind["crawled"], "crawlers": provider.crawler if by_kind["crawled"] else "none"},
            "2.4. User data": {"sources": by_kind["user"], "description": provider.user_data},
            "2.5. Synthetic data": {"sources": by_kind["synthetic"], "description": provider.synthetic_data},
            "2.6. Other sources of data": {"sources": by_kind["other"], "description": provider.other_sources},
            "unclassified_sources": [s for s in sources if s["kind"] is None],
            "sources_by_licence": [{k: r[k] for k in ("license", "sources", "bytes", "train_tokens", "token_share")}
                                   for r in licence_shares(manifest)],
        },
        "3. Data processing aspects": {
            "3.1. Respect of reservation of rights from text and data mining exception or limitation": {
                "opt_out_list": ({"file": Path(opt["file"]).name, "sha256": opt["sha256"], "patterns": opt["patterns"],
                                  "documents_removed": (manifest.get("dropped") or {}).get("opt_out", {}).get("documents"),
                                  "documents_matched_per_pattern": opt.get("matched")} if opt else None),
                "licences_allowed": filters.get("allow_licenses"),
                "documents_removed_by_licence": (manifest.get("dropped") or {}).get("license", {}).get("documents"),
                "other_measures": provider.tdm_measures},
            "3.2. Removal of illegal content": {
                "in_effllm": "none: effllm's preparation has no filter for illegal content",
                "measures": provider.illegal_content},
            "3.3. Other information": {
                "deduplication": {"exact": filters.get("exact_dedup"), "near": filters.get("near_dedup"),
                                  "documents_removed": {k: v["documents"] for k, v in (manifest.get("dropped") or {}).items()
                                                        if k in ("exact_duplicate", "near_duplicate")}},
                "files_skipped": len(manifest.get("skipped") or []),
                "goldfish_loss": (f"1/{cfg['goldfish_k']} of target positions left out of the loss"
                                  if cfg.get("goldfish_k") else None),
                "provider": provider.other_information},
        },
    }


def _pct(x: float) -> str:
    return f"{100 * x:.1f}%"


def _value(v) -> str:
    return BLANK if v is None else str(v)


def _source_lines(rows: list[dict]) -> list[str]:
    if not rows:
        return ["None."]
    out = []
    for s in rows:
        langs = ", ".join(f"{r['language']} {_pct(r['token_share'])}" for r in s["languages"][:10]) or "not recorded"
        out.append(f"- **{s['name']}** (source {s['index']}): licence {s['license']}, {s['bytes']:,} bytes, "
                   f"{s['train_tokens']:,} training tokens ({_pct(s['token_share'])} of all); languages: {langs}"
                   + (f"; {s['domains']:,} web domains, the top {len(s['top_domains'])} by size: "
                      + ", ".join(f"{d['domain']} ({_pct(d['byte_share'])})" for d in s["top_domains"])
                      if s["domains"] else "") + ".")
    return out


def markdown(s: dict) -> str:
    """The summary dict as Markdown, in its order; a field the provider has not given reads "(not provided)"."""
    g = s["1. General information"]
    p, m, c = (g["1.1. Provider identification"], g["1.2. Model identification"],
               g["1.3. Modalities, overall training data size and other characteristics"])
    langs = c["languages"]
    lines = [SUMMARY_HEADER.splitlines()[0], "", f"Written by effllm in the section order of the {s['template']}, from "
             f"the checkpoint and its data manifest (sha256 `{s['data_manifest_sha256']}`). Fields marked "
             f"{BLANK} are the provider's to give (`effllm card --eu-summary --provider FILE`).", "",
             "## 1. General information", "", "### 1.1. Provider identification", "",
             f"- Name: {_value(p['name'])}", f"- Contact: {_value(p['contact'])}", "",
             "### 1.2. Model identification", "", f"- Versioned model name: {_value(m['versioned_model_name'])}",
             f"- Model dependencies: {_value(m['model_dependencies'])}",
             f"- Date placed on the market: {_value(m['date_placed_on_market'])}", "",
             "### 1.3. Modalities, overall training data size and other characteristics", "",
             f"- Modalities: {', '.join(c['modalities'])}.",
             f"- Training data size (text): {c['text_size_range']} ({c['text_tokens']['train']:,} training and "
             f"{c['text_tokens']['validation']:,} validation tokens, {c['text_tokens']['tokenizer']} tokenizer; "
             f"{c['documents']:,} documents, {c['bytes']:,} bytes).",
             "- Types of content: " + (", ".join(f"{k} {_pct(v)}" for k, v in c["types_of_content"].items())
                                       if c["types_of_content"] else "not recorded (data prepared before effllm "
                                       "recorded languages)") + " of training tokens.",
             f"- Latest date of data collection: {_value(c['latest_date_of_collection'])}"
             + (f" (the documents' `{c['collection_period']['field']}` field: {c['collection_period']['earliest']} to "
                f"{c['collection_period']['latest']}, {c['collection_period']['documents_dated']:,} documents dated, "
                f"{c['collection_period']['documents_undated']:,} undated)" if c["collection_period"] else "") + ".",
             "- Languages, by share of training tokens: "
             + ("; ".join(f"{r['language']} {_pct(r['token_share'])}" for r in langs["by_token_share"][:20])
                + f" (method: {langs['method']})" if langs else "not recorded") + ".",
             f"- Training: {c['tokens_seen_in_training']:,} tokens seen, "
             f"{c['passes_over_the_training_tokens']:.3g} passes over the training tokens.", "",
             "## 2. List of data sources", ""]
    d = s["2. List of data sources"]
    private = d["2.2. Private non-publicly available datasets obtained from third parties"]
    crawled = d["2.3. Data crawled and scraped from online sources"]
    lines += ["### 2.1. Publicly available datasets", "", *_source_lines(d["2.1. Publicly available datasets"]), "",
              "### 2.2. Private non-publicly available datasets obtained from third parties", "",
              "#### 2.2.1. Datasets commercially licensed by rightsholders or their representatives", "",
              *_source_lines(private["2.2.1. Datasets commercially licensed by rightsholders or their representatives"]),
              "", "#### 2.2.2. Private datasets obtained from other third parties", "",
              *_source_lines(private["2.2.2. Private datasets obtained from other third parties"]), "",
              "### 2.3. Data crawled and scraped from online sources", "", *_source_lines(crawled["sources"]),
              f"- Crawlers: {_value(crawled['crawlers'])}.", ""]
    for heading in ("2.4. User data", "2.5. Synthetic data", "2.6. Other sources of data"):
        v = d[heading]  # the manifest's sources of this kind, if any, and the provider's description
        lines += [f"### {heading}", "", *(_source_lines(v["sources"]) if v["sources"] else []),
                  f"- {_value(v['description'])}", ""]
    if d["unclassified_sources"]:
        lines += ["### Sources not yet classified", "", f"The provider has not said which kind these are "
                  f"(`source_kinds` in the provider file): {BLANK}.", "", *_source_lines(d["unclassified_sources"]), ""]
    lines += ["### Sources by licence", "", "| licence | sources | bytes | training tokens | share of tokens |",
              "|---|---|---|---|---|"]
    lines += [f"| {r['license']} | {r['sources']} | {r['bytes']:,} | {r['train_tokens']:,} | {_pct(r['token_share'])} |"
              for r in d["sources_by_licence"]]
    t = s["3. Data processing aspects"]
    tdm = t["3.1. Respect of reservation of rights from text and data mining exception or limitation"]
    opt = tdm["opt_out_list"]
    lines += ["", "## 3. Data processing aspects", "",
              "### 3.1. Respect of reservation of rights from text and data mining exception or limitation", "",
              (f"- Opt-out list `{opt['file']}` (sha256 `{opt['sha256']}`), {opt['patterns']} patterns: "
               f"{opt['documents_removed']:,} documents removed"
               + ("; per pattern: " + ", ".join(f"`{k}` {v}" for k, v in opt["documents_matched_per_pattern"].items())
                  if opt.get("documents_matched_per_pattern") else "") + "."
               if opt else "- No opt-out list was applied when the data was prepared."),
              "- Licences allowed: " + (", ".join(tdm["licences_allowed"]) + f" ({tdm['documents_removed_by_licence']:,} "
                                        "documents removed by licence)" if tdm["licences_allowed"]
                                        else "all (no allow-list)") + ".",
              f"- Other measures: {_value(tdm['other_measures'])}.", "",
              "### 3.2. Removal of illegal content", "",
              f"- In effllm: {t['3.2. Removal of illegal content']['in_effllm']}.",
              f"- Measures: {_value(t['3.2. Removal of illegal content']['measures'])}.", "",
              "### 3.3. Other information", ""]
    o = t["3.3. Other information"]
    dedup = o["deduplication"]
    lines += [f"- Exact deduplication: {_value(dedup['exact'])}; near-duplicate removal: "
              + (f"{dedup['near']['method']}, threshold {dedup['near']['threshold']}" if dedup["near"] else "off")
              + "; documents removed: " + (", ".join(f"{k.replace('_', ' ')} {v:,}" for k, v in
                                                     dedup["documents_removed"].items()) or "none") + ".",
              f"- Files skipped at preparation: {o['files_skipped']}.",
              f"- Goldfish loss: {o['goldfish_loss'] or 'off'}.",
              f"- From the provider: {_value(o['provider'])}."]
    return "\n".join(lines) + "\n"


def write_summary(folder: Path, state: dict, manifest: dict, provider: ProviderInfo | None = None) -> Path:
    """EU_TRAINING_SUMMARY.md and eu_training_summary.json in `folder`, each written atomically; an
    existing Markdown file is replaced only if it is a summary effllm wrote. Returns the Markdown's path."""
    md, js = folder / SUMMARY_MD, folder / SUMMARY_JSON
    check_card_target(md, header=SUMMARY_HEADER)
    s = summary(state, manifest, provider)
    write_text_atomic(js, json.dumps(s, indent=1) + "\n")
    write_text_atomic(md, markdown(s))
    return md


def write_summary_for(checkpoint: str, out: str | None, data_dir: str | None, provider_file: str | None) -> Path:
    """`effllm card --eu-summary`: the summary of a checkpoint, into `out` (a folder; default the run
    directory)."""
    provider = ProviderInfo.from_file(provider_file)  # a bad file fails before anything is read
    ckpt = resolve_checkpoint(checkpoint)
    state = read_state(ckpt)
    folder = resolved(out) if out else ckpt.parent.parent
    if folder.exists() and not folder.is_dir():
        raise ConfigError(f"--out {folder} is a file: with --eu-summary, --out names a folder for "
                          f"{SUMMARY_MD} and {SUMMARY_JSON}")
    folder.mkdir(parents=True, exist_ok=True)
    return write_summary(folder, state, find_manifest(ckpt, state, data_dir), provider)


__all__ = ["ProviderInfo", "summary", "markdown", "write_summary", "write_summary_for"]
