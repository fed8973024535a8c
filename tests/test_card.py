"""Provenance: checkpoints name their data manifest, and the model card's numbers are the run's."""

from __future__ import annotations

import json
import re

import pytest
from helpers import LANGUAGE_SAMPLES, tiny_train_config
from safetensors import safe_open

from effllm import checkpoint as ckpt_io
from effllm.card import CardConfig, licence_shares, write_card
from effllm.cli import main
from effllm.config import OptimConfig
from effllm.errors import CheckpointError, OutputError
from effllm.hf import ExportConfig, export_hf
from effllm.model import ModelConfig, Transformer
from effllm.run import build_optimizer
from effllm.train import train


def test_card_and_checkpoint_carry_the_runs_provenance(byte_data, tmp_path, capsys):
    run = tmp_path / "run"
    summary = train(tiny_train_config(byte_data, run, max_steps=4, goldfish_k=4))
    manifest = json.loads((byte_data / "manifest.json").read_text())
    ckpt = ckpt_io.latest_checkpoint(run / "checkpoints")
    state = ckpt_io.read_state(ckpt)
    with safe_open(str(ckpt / "model.safetensors"), "pt") as f:
        assert f.metadata()["data_manifest_sha256"] == state["data_manifest_sha256"]

    card = (run / "MODEL_CARD.md").read_text()
    assert f"{summary['tokens_seen']:,} tokens seen" in card
    assert f"{summary['params']['total']:,} in total, {summary['params']['active']:,} active" in card
    assert f"`{state['data_manifest_sha256']}`" in card
    assert f"{summary['final_val_loss']:.4f} nats/token" in card
    assert "Goldfish loss drops 1/4" in card
    assert "Opt-outs honoured: no opt-out list was given." in card and "Exact deduplication: sha256" in card
    t = manifest["totals"]
    kept_bytes = sum(f["kept_bytes"] for f in manifest["files"])
    row = f"| PSF-2.0 | 1 | {t['files']:,} | {kept_bytes:,} | 100.0% | {t['train_tokens']:,} | 100.0% |"
    assert row in card
    hours = re.search(r"= ([0-9.e-]+) device-hours", card).group(1)
    assert float(hours) == pytest.approx(state["elapsed_s"] / 3600, rel=1e-2)

    # `effllm card` writes the same card from the checkpoint alone
    (run / "MODEL_CARD.md").unlink()
    assert main(["card", "--checkpoint", str(run)]) == 0
    assert (run / "MODEL_CARD.md").read_text() == card
    # data that is not the run's is refused, not described
    other = tmp_path / "other"
    other.mkdir()
    (other / "manifest.json").write_text(json.dumps({**manifest, "totals": {**t, "files": 1}}))
    with pytest.raises(CheckpointError, match="not the manifest"):
        write_card(CardConfig(checkpoint=str(run), data_dir=str(other)))


def test_licence_shares_split_bytes_and_tokens_by_licence():
    manifest = {"sources": [{"license": "MIT"}, {"license": "CC-BY-4.0"}, {"license": None}],
                "files": [{"source": 0, "bytes": 300, "tokens": {"train": 30, "val": 1}},
                          {"source": 1, "bytes": 100, "tokens": {"train": 10, "val": 0}},
                          {"source": 0, "bytes": 300, "tokens": {"train": 50, "val": 0}},
                          {"source": 2, "bytes": 300, "tokens": {"train": 10, "val": 0}}]}
    rows = {r["license"]: r for r in licence_shares(manifest)}
    assert rows["MIT"]["bytes"] == 600 and rows["MIT"]["byte_share"] == pytest.approx(0.6)
    assert rows["MIT"]["token_share"] == pytest.approx(80 / 100) and rows["MIT"]["files"] == 2
    assert rows["unknown"]["bytes"] == 300  # no licence recorded is said so, never dropped silently
    assert sum(r["token_share"] for r in rows.values()) == pytest.approx(1.0)


def test_provenance_survives_a_change_of_folder(byte_data, tmp_path, monkeypatch, capsys):
    """The run keeps a copy of its data manifest (in the run directory and in every checkpoint), so a
    card or export written after the run moved, from another folder, with the data gone, still lists
    its sources and licences. Without any copy (a checkpoint written before they existed) both are
    refused, and a good card is never overwritten by one that lacks them."""
    import shutil

    data = tmp_path / "data"
    shutil.copytree(byte_data, data)
    monkeypatch.chdir(tmp_path)
    train(tiny_train_config("data", tmp_path / "run", max_steps=2))  # data_dir recorded as a relative path
    shutil.move(tmp_path / "run", tmp_path / "moved")
    shutil.rmtree(data)
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    (tmp_path / "moved" / "MODEL_CARD.md").unlink()
    assert main(["card", "--checkpoint", str(tmp_path / "moved")]) == 0
    assert "| PSF-2.0 | 1 |" in (tmp_path / "moved" / "MODEL_CARD.md").read_text()
    assert main(["export-hf", "--checkpoint", str(tmp_path / "moved"), "--out", str(tmp_path / "hf")]) == 0
    assert "PSF-2.0" in (tmp_path / "hf" / "README.md").read_text()

    # a checkpoint with no copy of its manifest, whose data is gone: refused, nothing overwritten
    old = tmp_path / "old"
    ckpt = ckpt_io.latest_checkpoint(tmp_path / "moved" / "checkpoints")
    state = ckpt_io.read_state(ckpt)
    model = Transformer(ModelConfig.from_dict(state["config"]["model"]))
    ckpt_io.load_weights(ckpt, model)
    ckpt_io.save_checkpoint(old / "checkpoints", 2, model, build_optimizer(model, OptimConfig()),
                            state={k: v for k, v in state.items() if k not in ("format", "step", "files")})
    (old / "MODEL_CARD.md").write_text(card := (tmp_path / "moved" / "MODEL_CARD.md").read_text())
    capsys.readouterr()
    assert main(["card", "--checkpoint", str(old)]) == 2
    assert "pass --data-dir" in capsys.readouterr().err
    assert (old / "MODEL_CARD.md").read_text() == card
    assert main(["export-hf", "--checkpoint", str(old), "--out", str(tmp_path / "hf2")]) == 2
    assert not (tmp_path / "hf2").exists()


def test_card_and_export_never_replace_what_effllm_did_not_write(byte_data, tmp_path):
    run = tmp_path / "run"
    train(tiny_train_config(byte_data, run, max_steps=2))
    notes = tmp_path / "notes.md"
    notes.write_text("my notes")
    with pytest.raises(OutputError, match="not a document effllm wrote"):
        write_card(CardConfig(checkpoint=str(run), out=str(notes)))
    assert notes.read_text() == "my notes"
    theirs = tmp_path / "their-model"  # a folder of another model
    theirs.mkdir()
    (theirs / "config.json").write_text("{}")
    for overwrite in (False, True):
        with pytest.raises(OutputError, match="not written by effllm export-hf"):
            export_hf(ExportConfig(checkpoint=str(run), out=str(theirs), overwrite=overwrite))
    assert sorted(p.name for p in theirs.iterdir()) == ["config.json"]
    with pytest.raises(OutputError, match="lies inside --out"):  # the export would replace the checkpoint itself
        export_hf(ExportConfig(checkpoint=str(run), out=str(tmp_path), overwrite=True))
    out = export_hf(ExportConfig(checkpoint=str(run), out=str(tmp_path / "hf")))
    export_hf(ExportConfig(checkpoint=str(run), out=str(out), overwrite=True))  # an earlier export: replaced
    (out / "extra.txt").write_text("mine")
    with pytest.raises(OutputError, match=r"did not write \(extra.txt\)"):
        export_hf(ExportConfig(checkpoint=str(run), out=str(out), overwrite=True))
    assert (out / "extra.txt").read_text() == "mine"


def multilingual_run(tmp_path, samples) -> tuple:
    """Prepared web (jsonl with URLs, one opt-out) and code sources, and a 3-step run on them."""
    from effllm.prepare import PrepareConfig, prepare

    web = tmp_path / "web.jsonl"
    records = [{"text": f"{samples[lang]} ({i})", "url": f"https://{host}/p{i}", "date": f"2024-0{1 + i % 6}-15T08:00:00Z"}
               for i, (lang, host) in enumerate([("nl", "nieuws.example.nl"), ("de", "zeitung.example.de"),
                                                 ("nl", "blog.example.nl"), ("en", "optout.example.com")] * 4)]
    web.write_text("".join(json.dumps(r) + "\n" for r in records))
    code = tmp_path / "code"
    code.mkdir()
    for i in range(3):
        (code / f"m{i}.py").write_text(f"def f{i}(x):\n    return x + {i}\n" * 8)
    opt_out = tmp_path / "opt_out.txt"
    opt_out.write_text("optout.example.com\nnever.example.org\n")
    data = prepare(PrepareConfig(sources=(f"{web}=CC-BY-4.0", f"{code}=MIT"), out=str(tmp_path / "data"),
                                 origin_field="url", date_field="date", opt_out=str(opt_out), val_fraction=0.25,
                                 extensions=("jsonl", "py")), progress=False)
    run = tmp_path / "run"
    train(tiny_train_config(data, run, max_steps=3, seq_len=16, eval_tokens=64))
    return data, run


def test_the_eu_summary_follows_the_template_and_agrees_with_the_card_and_manifest(tmp_path, capsys):
    """Written at the end of training and by `effllm card --eu-summary`: the template's sections in
    order, every figure the manifest's (size range, tokens, languages, licences, domains, opt-outs
    and what each pattern removed), the provider's fields blank until a provider file gives them."""
    from effllm.eu_summary import BLANK, SUMMARY_JSON, SUMMARY_MD

    data, run = multilingual_run(tmp_path, LANGUAGE_SAMPLES)
    manifest = json.loads((data / "manifest.json").read_text())
    md, js = (run / SUMMARY_MD).read_text(), json.loads((run / SUMMARY_JSON).read_text())
    headings = [line for line in md.splitlines() if line.startswith("#")]
    assert headings[:8] == ["# Public summary of training content", "## 1. General information",
                            "### 1.1. Provider identification", "### 1.2. Model identification",
                            "### 1.3. Modalities, overall training data size and other characteristics",
                            "## 2. List of data sources", "### 2.1. Publicly available datasets",
                            "### 2.2. Private non-publicly available datasets obtained from third parties"]
    assert headings.index("## 3. Data processing aspects") > headings.index("### 2.6. Other sources of data")
    assert f"- Name: {BLANK}" in md and "### Sources not yet classified" in md  # nothing guessed
    general = js["1. General information"]["1.3. Modalities, overall training data size and other characteristics"]
    t = manifest["totals"]
    assert general["text_size_range"] == "Less than 1 billion tokens"
    assert general["text_tokens"] == {"train": t["train_tokens"], "validation": t["val_tokens"], "tokenizer": "byte"}
    langs = {r["language"]: r["token_share"] for r in general["languages"]["by_token_share"]}
    by_tokens = {r["language"]: r["train_tokens"] / t["train_tokens"] for r in manifest["content"]["languages"]["total"]}
    assert langs == pytest.approx(by_tokens) and set(langs) == {"nl", "de", "code:Python"}  # en: opted out
    assert general["types_of_content"]["source code"] == pytest.approx(by_tokens["code:Python"])
    # the en records (i = 3, 7, 11, 15) are opted out; the kept dates run from January (i = 0) to June (i = 5)
    assert manifest["collection"] == {"field": "date", "earliest": "2024-01-15", "latest": "2024-06-15",
                                      "documents_dated": 12, "documents_undated": 3}  # the 3 code files
    assert general["latest_date_of_collection"] == "2024-06-15" and "2024-01-15 to 2024-06-15" in md
    card = (run / "MODEL_CARD.md").read_text()
    for r in js["2. List of data sources"]["sources_by_licence"]:  # the card's licence table, the same numbers
        assert f"| {r['license']} | {r['sources']} |" in card and f"| {r['train_tokens']:,} |" in card
    for lang, share in langs.items():  # and its languages table
        assert re.search(rf"\| {re.escape(lang)} \| [0-9,]+ \| [0-9,]+ \| {100 * share:.1f}% \|", card), lang
    assert "| nieuws.example.nl |" in card and "optout.example.com" not in card
    assert "2024-01-15 to 2024-06-15" in card
    tdm = js["3. Data processing aspects"][
        "3.1. Respect of reservation of rights from text and data mining exception or limitation"]["opt_out_list"]
    assert tdm["documents_removed"] == 4 == manifest["dropped"]["opt_out"]["documents"]
    assert tdm["documents_matched_per_pattern"] == {"optout.example.com": 4, "never.example.org": 0}
    assert "`never.example.org` 0" in md

    provider = tmp_path / "provider.json"
    provider.write_text(json.dumps({"name": "Example Lab", "contact": "ai@example.org", "model_name": "tiny-nl v1",
                                    "source_kinds": ["crawled", "public"], "source_names": ["Web crawl", "Code"],
                                    "crawler": "none of ours: a third party's crawl", "user_data": "none",
                                    "synthetic_data": "none"}))
    out = tmp_path / "summary"
    assert main(["card", "--checkpoint", str(run), "--eu-summary", "--provider", str(provider), "--out", str(out)]) == 0
    md2, js2 = (out / SUMMARY_MD).read_text(), json.loads((out / SUMMARY_JSON).read_text())
    assert "- Name: Example Lab" in md2 and "Sources not yet classified" not in md2
    (crawled,) = js2["2. List of data sources"]["2.3. Data crawled and scraped from online sources"]["sources"]
    assert crawled["name"] == "Web crawl" and crawled["domains"] == 3  # the opted-out domain is not in the data
    web_domains = manifest["content"]["domains"]["by_source"][0]
    assert crawled["top_domains"][0]["domain"] == web_domains[0]["domain"] and len(crawled["top_domains"]) == 1
    assert "#### 2.2.1." in md2 and md2.count("None.") >= 2  # empty kinds say so

    provider.write_text(json.dumps({"nmae": "typo"}))
    assert main(["card", "--checkpoint", str(run), "--eu-summary", "--provider", str(provider)]) == 2
    assert "unknown field(s) nmae" in capsys.readouterr().err
    provider.write_text(json.dumps({"source_kinds": ["crawled"]}))
    assert main(["card", "--checkpoint", str(run), "--eu-summary", "--provider", str(provider)]) == 2
    assert "has 1 entries and the manifest 2 sources" in capsys.readouterr().err


def test_a_manifest_prepared_before_content_records_reads_as_not_recorded(byte_data, tmp_path):
    """Data prepared by an effllm that did not yet record languages, domains or dates: the summary
    says "not recorded" where those go, and guesses nothing."""
    from effllm.eu_summary import markdown, summary

    run = tmp_path / "run"
    train(tiny_train_config(byte_data, run, max_steps=2))
    state = ckpt_io.read_state(ckpt_io.latest_checkpoint(run / "checkpoints"))
    manifest = json.loads((byte_data / "manifest.json").read_text())
    manifest.pop("content")
    s = summary(state, manifest)
    general = s["1. General information"]["1.3. Modalities, overall training data size and other characteristics"]
    assert general["languages"] is None and general["types_of_content"] is None
    assert general["latest_date_of_collection"] is None and general["collection_period"] is None
    md = markdown(s)
    assert "Types of content: not recorded" in md and "Languages, by share of training tokens: not recorded" in md
    (source,) = s["2. List of data sources"]["unclassified_sources"]  # a user's folder: its kind is the provider's
    assert source["languages"] == [] and source["train_tokens"] == manifest["totals"]["train_tokens"]
