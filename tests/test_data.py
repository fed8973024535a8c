"""prepare(): determinism, a complete manifest, licences, tokenizers; the loader; bad data."""

from __future__ import annotations

import hashlib
import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import LANGUAGE_SAMPLES

from effllm.data import TokenDataset
from effllm.errors import DataError, OutputError
from effllm.prepare import PrepareConfig, prepare
from effllm.sources import STDLIB_EXCLUDED_DIRS, stdlib_source
from effllm.tokenizer import load_tokenizer


def files_of(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir())}


@pytest.mark.parametrize("tokenizer", ["byte", "bpe"])
def test_prepare_is_byte_identical_when_rerun_and_in_parallel(tmp_path, small_prepare_config, tokenizer):
    """Re-running gives the same bytes, and so does tokenizing in 3 processes (more than the files
    in flight per worker allow at once, so results wait in order) instead of this one."""
    outs = []
    for name, workers in (("a", 1), ("b", 1), ("c", 3)):
        cfg = replace(small_prepare_config, out=str(tmp_path / name), tokenizer=tokenizer, vocab_size=600,
                      workers=workers)
        outs.append(files_of(prepare(cfg, progress=False)))
    expected = {"manifest.json", "train.bin", "val.bin"} | ({"tokenizer.json"} if tokenizer == "bpe" else set())
    assert set(outs[0]) == expected
    assert outs[0] == outs[1] == outs[2]


def test_manifest_records_every_file_with_hash_licence_and_tokens(byte_data, small_prepare_config):
    manifest = json.loads((byte_data / "manifest.json").read_text())
    root = Path(small_prepare_config.sources[0])
    on_disk = sorted(p.relative_to(root).as_posix() for p in root.rglob("*.py"))
    assert [f["path"] for f in manifest["files"]] == on_disk
    assert manifest["sources"] == [{"kind": "files", "root": str(root.resolve()), "license": "PSF-2.0",
                                    "train_tokens": manifest["totals"]["train_tokens"]}]
    for f in manifest["files"]:
        raw = (root / f["path"]).read_bytes()
        assert f["sha256"] == hashlib.sha256(raw).hexdigest() and f["bytes"] == len(raw)
        # Byte tokens: one per UTF-8 byte, plus the end-of-text token.
        assert f["tokens"]["train"] + f["tokens"]["val"] == len(raw) + 1
    totals = manifest["totals"]
    assert totals["train_tokens"] == sum(f["tokens"]["train"] for f in manifest["files"])
    assert totals["val_tokens"] == sum(f["tokens"]["val"] for f in manifest["files"]) > 0
    assert (byte_data / "train.bin").stat().st_size == 2 * totals["train_tokens"]
    assert manifest["tokenizer"] == {"kind": "byte", "vocab_size": 256, "eot_id": 0}
    assert "sha256(document id)" in manifest["split"]["rule"] and manifest["split"]["val_fraction"] == 0.15
    assert 0 < totals["unigram_val_loss"] < np.log(256)


def test_byte_shards_decode_back_to_the_source_text(byte_data, small_prepare_config):
    manifest = json.loads((byte_data / "manifest.json").read_text())
    root = Path(small_prepare_config.sources[0])
    val_files = [f["path"] for f in manifest["files"] if f["tokens"]["val"]]
    expected = b"".join((root / p).read_bytes() + b"\x00" for p in val_files)
    assert np.fromfile(byte_data / "val.bin", dtype=np.uint16).astype(np.uint8).tobytes() == expected


def test_embedded_corpus_is_the_stdlib_without_tests_or_third_party_code(tmp_path):
    src = stdlib_source()
    assert src.license == "PSF-2.0" and len(src.files) > 100
    for f in src.files:
        assert f.rel.endswith(".py") and not Path(f.rel).name.startswith("test_")
        assert not set(Path(f.rel).parts[:-1]) & STDLIB_EXCLUDED_DIRS, f.rel
    assert any(f.rel == "json/decoder.py" for f in src.files)
    out = prepare(PrepareConfig(out=str(tmp_path / "stdlib")), progress=False)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["sources"][0]["kind"] == "stdlib" and manifest["sources"][0]["license"] == "PSF-2.0"
    assert manifest["totals"]["files"] + len(manifest["skipped"]) == len(src.files)
    assert manifest["totals"]["train_tokens"] > 5_000_000


def test_bpe_tokenizer_round_trips_and_is_saved(tmp_path, small_prepare_config):
    out = prepare(replace(small_prepare_config, out=str(tmp_path / "bpe"), tokenizer="bpe", vocab_size=700),
                  progress=False)
    manifest = json.loads((out / "manifest.json").read_text())
    spec = manifest["tokenizer"]
    assert spec["kind"] == "bpe" and 256 < spec["vocab_size"] <= 700 and spec["eot_id"] == 0
    assert spec["sha256"] == hashlib.sha256((out / "tokenizer.json").read_bytes()).hexdigest()
    tok = load_tokenizer(out, spec)
    text = "def parse(self, fp):\n    return self._parse(fp.read())  # ünïcode\n"
    assert tok.decode(tok.encode(text)) == text
    assert len(tok.encode(text)) < len(text.encode()) / 1.5  # merges learned from the corpus
    ds = TokenDataset(out)
    assert ds.splits["train"].dtype == np.uint16 and ds.splits["train"].max() < spec["vocab_size"]


def test_jsonl_records_become_documents(tmp_path):
    path = tmp_path / "corpus.jsonl"
    records = [{"text": f"document number {i} " * 20, "meta": i} for i in range(40)]
    path.write_text("\n".join(json.dumps(r) for r in records) + "\n\n")
    out = prepare(PrepareConfig(sources=(str(path),), out=str(tmp_path / "out"), license="CC0-1.0", val_fraction=0.2),
                  progress=False)
    manifest = json.loads((out / "manifest.json").read_text())
    (entry,) = manifest["files"]
    assert entry["documents"] == 40 and manifest["totals"]["documents"] == 40
    assert entry["tokens"]["train"] + entry["tokens"]["val"] == sum(len(r["text"]) + 1 for r in records)
    assert manifest["sources"][0]["license"] == "CC0-1.0"


def test_bad_jsonl_names_the_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"text": "fine"}\n{"text": oops}\n')
    with pytest.raises(DataError, match=r"bad.jsonl:2 is not valid JSON"):
        prepare(PrepareConfig(sources=(str(path),), out=str(tmp_path / "o"), license="MIT"), progress=False)
    path.write_text('{"body": "no text field"}\n')
    with pytest.raises(DataError, match="--text-field"):
        prepare(PrepareConfig(sources=(str(path),), out=str(tmp_path / "o"), license="MIT"), progress=False)


def test_user_sources_need_a_licence_and_must_exist(tmp_path):
    (tmp_path / "a.txt").write_text("hello")
    with pytest.raises(DataError, match="--license"):
        prepare(PrepareConfig(sources=(str(tmp_path / "a.txt"),), out=str(tmp_path / "o")), progress=False)
    with pytest.raises(DataError, match="does not exist"):
        prepare(PrepareConfig(sources=(str(tmp_path / "nope"),), out=str(tmp_path / "o"), license="MIT"), progress=False)
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="holds no files"):
        prepare(PrepareConfig(sources=(str(tmp_path / "empty"),), out=str(tmp_path / "o"), license="MIT"), progress=False)


def test_prepare_refuses_to_overwrite_without_asking(byte_data, small_prepare_config):
    with pytest.raises(OutputError, match="--overwrite"):
        prepare(replace(small_prepare_config, out=str(byte_data)), progress=False)


def tiny_sources(root: Path) -> Path:
    """A folder of three small text files: a source that prepares in milliseconds."""
    src = root / "texts"
    src.mkdir(parents=True)
    for i in range(3):
        (src / f"doc{i}.txt").write_text(f"document {i}: " + "some words of text " * (20 + i))
    return src


def snapshot(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_prepare_never_deletes_what_it_did_not_write(tmp_path):
    """--out equal to a source, inside or around one, or a folder of other files is refused before any
    work, with or without --overwrite, and nothing on disk changes; --overwrite replaces only an
    earlier preparation that holds nothing else, and a folder named like prepare's old temporary
    folder is left alone."""
    src = tiny_sources(tmp_path)
    (tmp_path / "datasets" / "other").mkdir(parents=True)
    (tmp_path / "datasets" / "other" / "big.bin").write_bytes(b"precious")
    (src / "sub").mkdir()
    before = snapshot(tmp_path)
    base = PrepareConfig(sources=(str(src),), license="CC0-1.0", val_fraction=0.34)
    for out, overwrite, message in [(src, False, "lies inside the source"), (src, True, "lies inside the source"),
                                    (src / "sub", True, "lies inside the source"),
                                    (tmp_path, True, "lies inside --out"),
                                    (tmp_path / "datasets", False, "not written by effllm prepare"),
                                    (tmp_path / "datasets", True, "not written by effllm prepare")]:
        with pytest.raises(OutputError, match=message):
            prepare(replace(base, out=str(out), overwrite=overwrite), progress=False)
    assert snapshot(tmp_path) == before

    out = tmp_path / "prepared"
    (tmp_path / "prepared.tmp").mkdir()  # the temporary name an earlier version used, then deleted
    (tmp_path / "prepared.tmp" / "keep.txt").write_text("mine")
    prepare(replace(base, out=str(out)), progress=False)
    assert (tmp_path / "prepared.tmp" / "keep.txt").read_text() == "mine"
    first = files_of(out)
    with pytest.raises(OutputError, match="--overwrite"):
        prepare(replace(base, out=str(out)), progress=False)
    prepare(replace(base, out=str(out), overwrite=True), progress=False)  # an earlier preparation: replaced
    assert files_of(out) == first
    (out / "notes.md").write_text("my notes")
    with pytest.raises(OutputError, match=r"did not write \(notes.md\)"):
        prepare(replace(base, out=str(out), overwrite=True), progress=False)
    assert (out / "notes.md").read_text() == "my notes"
    with pytest.raises(OutputError, match="lies inside --out"):  # a source inside the folder it would replace
        prepare(replace(base, sources=(str(out / "notes.md"),), out=str(out), overwrite=True), progress=False)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary folder left behind


def test_out_dot_is_a_folder_like_any_other(tmp_path, monkeypatch):
    src = tiny_sources(tmp_path / "in")
    monkeypatch.chdir(tmp_path / "in")
    with pytest.raises(OutputError, match="lies inside"):  # "." holds the source
        prepare(PrepareConfig(sources=(str(src),), license="CC0-1.0", val_fraction=0.34, out="."), progress=False)
    (tmp_path / "empty").mkdir()
    monkeypatch.chdir(tmp_path / "empty")
    out = prepare(PrepareConfig(sources=(str(src),), license="CC0-1.0", val_fraction=0.34, out="."), progress=False)
    assert out == tmp_path / "empty" and (tmp_path / "empty" / "manifest.json").is_file()


def test_train_batches_depend_only_on_seed_step_rank_micro(byte_data):
    ds = TokenDataset(byte_data)
    a = ds.train_batch(4, 16, seed=1, step=7, rank=0, micro=1)
    ds.train_batch(4, 16, seed=1, step=3)  # an unrelated draw in between changes nothing
    b = TokenDataset(byte_data).train_batch(4, 16, seed=1, step=7, rank=0, micro=1)
    assert all(torch.equal(u, v) for u, v in zip(a, b))
    x, y = a
    assert x.shape == y.shape == (4, 16) and x.dtype == torch.int64
    assert torch.equal(x[:, 1:], y[:, :-1])  # targets are the inputs shifted by one
    for other in (dict(seed=2, step=7), dict(seed=1, step=8), dict(seed=1, step=7, rank=1), dict(seed=1, step=7, micro=0)):
        assert not torch.equal(ds.train_batch(4, 16, **other)[0], x), other


def test_val_batches_are_fixed_and_bounded(byte_data):
    ds = TokenDataset(byte_data)
    first = list(ds.val_batches(3, 32, 320))
    second = list(ds.val_batches(3, 32, 320))
    assert sum(x.shape[0] for x, _ in first) == 10
    assert all(torch.equal(a[0], b[0]) for a, b in zip(first, second))
    val = torch.from_numpy(ds.splits["val"][:321].astype(np.int64))
    assert torch.equal(torch.cat([x for x, _ in first]).flatten(), val[:320])


def test_missing_or_empty_data_directory_says_to_prepare(tmp_path):
    with pytest.raises(DataError, match="does not exist.*effllm prepare"):
        TokenDataset(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no manifest.json.*effllm prepare"):
        TokenDataset(tmp_path / "empty")


def test_truncated_shard_is_detected(tmp_path, byte_data):
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(byte_data, copy)
    with open(copy / "train.bin", "r+b") as fh:
        fh.truncate(100)
    with pytest.raises(DataError, match="not the size the manifest states"):
        TokenDataset(copy)


def test_seq_len_longer_than_a_split_is_refused(byte_data):
    ds = TokenDataset(byte_data)
    with pytest.raises(DataError, match="lower seq_len"):
        ds.check_seq_len(len(ds.splits["val"]))


def _words(seed: int, n: int = 200) -> str:
    rng = np.random.Generator(np.random.PCG64(seed))
    return " ".join(f"w{i}" for i in rng.integers(0, 5000, size=n))


def _filter_corpus(tmp_path: Path) -> tuple[Path, Path, list[dict]]:
    """Two sources with different licences; web records with URLs, duplicates and a near duplicate."""
    mit, web = tmp_path / "mit", tmp_path / "web.jsonl"
    mit.mkdir()
    for i in range(12):
        (mit / f"doc{i}.txt").write_text(_words(i))
    (mit / "copy_of_doc3.txt").write_text(_words(3))  # exact duplicate of doc3.txt
    near = _words(5).split()
    near[100] = "changed"
    (mit / "near_doc5.txt").write_text(" ".join(near))  # one word of 200 changed
    records = [{"text": _words(100 + i), "url": f"https://site{i % 4}.example.org/page{i}"} for i in range(16)]
    records.append({"text": _words(101), "url": "https://elsewhere.net/mirror"})  # duplicate of record 1
    web.write_text("\n".join(json.dumps(r) for r in records) + "\n")
    return mit, web, records


def test_every_source_has_a_licence_and_the_allow_list_filters_by_it(tmp_path):
    mit, web, records = _filter_corpus(tmp_path)
    base = PrepareConfig(sources=(f"{mit}=MIT", f"{web}=unknown"), out=str(tmp_path / "all"), val_fraction=0.25)
    everything = json.loads((prepare(base, progress=False) / "manifest.json").read_text())
    assert [s["license"] for s in everything["sources"]] == ["MIT", "unknown"]
    only_mit = json.loads((prepare(replace(base, out=str(tmp_path / "mit_only"), allow_licenses=("MIT",)),
                                   progress=False) / "manifest.json").read_text())
    web_docs = len(records) - 1  # the duplicate record is dropped as a duplicate only when web is kept
    assert only_mit["dropped"]["license"]["documents"] == len(records)
    assert only_mit["totals"]["documents"] == everything["totals"]["documents"] - web_docs
    assert only_mit["filters"]["allow_licenses"] == ["MIT"]
    # "unknown" is a licence like any other: it passes only when listed
    listed = json.loads((prepare(replace(base, out=str(tmp_path / "u"), allow_licenses=("MIT", "unknown")),
                                 progress=False) / "manifest.json").read_text())
    assert listed["dropped"]["license"]["documents"] == 0
    with pytest.raises(DataError, match="has no licence"):
        prepare(PrepareConfig(sources=(str(mit),), out=str(tmp_path / "x")), progress=False)


def test_opt_outs_drop_documents_by_url_domain_and_path(tmp_path):
    mit, web, records = _filter_corpus(tmp_path)
    opt_out = tmp_path / "opt_out.txt"
    opt_out.write_text("# publishers who opted out\nsite1.example.org\nhttps://site2.example.org/page6\n"
                       "*/mit/doc7.txt  # one file\n")
    cfg = PrepareConfig(sources=(f"{mit}=MIT", f"{web}=CC-BY-4.0"), out=str(tmp_path / "o"), origin_field="url",
                        opt_out=str(opt_out), val_fraction=0.25)
    manifest = json.loads((prepare(cfg, progress=False) / "manifest.json").read_text())
    site1 = sum(1 for r in records if "site1." in r["url"])  # the whole domain
    assert manifest["dropped"]["opt_out"]["documents"] == site1 + 1 + 1  # + one URL + one file
    assert manifest["filters"]["opt_out"]["patterns"] == 3
    doc7 = next(e for e in manifest["files"] if e["path"] == "doc7.txt")
    assert doc7["documents"] == 0 and doc7["dropped"] == {"opt_out": 1}


def test_exact_and_near_duplicates_are_dropped_and_counted(tmp_path):
    mit, web, records = _filter_corpus(tmp_path)
    cfg = PrepareConfig(sources=(f"{mit}=MIT", f"{web}=CC-BY-4.0"), out=str(tmp_path / "exact"), val_fraction=0.25)
    exact = json.loads((prepare(cfg, progress=False) / "manifest.json").read_text())
    assert exact["dropped"]["exact_duplicate"]["documents"] == 2  # copy_of_doc3 and the mirrored record
    assert exact["dropped"]["near_duplicate"]["documents"] == 0 and exact["filters"]["near_dedup"] is None
    near = json.loads((prepare(replace(cfg, out=str(tmp_path / "near"), near_dup_threshold=0.8), progress=False)
                       / "manifest.json").read_text())
    assert near["dropped"]["near_duplicate"]["documents"] == 1  # near_doc5 (Jaccard ~0.95 with doc5)
    assert next(e for e in near["files"] if e["path"] == "near_doc5.txt")["dropped"] == {"near_duplicate": 1}
    assert near["totals"]["documents"] == exact["totals"]["documents"] - 1
    # dropped documents are not in the shards: the token counts shrink by exactly their bytes + EOT
    assert exact["totals"]["train_tokens"] + exact["totals"]["val_tokens"] - (
        near["totals"]["train_tokens"] + near["totals"]["val_tokens"]) == near["dropped"]["near_duplicate"]["bytes"] + 1


def test_licence_lists_take_commas_or_spaces_any_case_and_refuse_typos(tmp_path):
    """`--allow-licenses MIT,CC-BY-4.0` (the README's own example) was read as one licence and
    dropped every document."""
    from effllm.errors import ConfigError
    from effllm.licenses import allowed, canonical, licence_list

    assert licence_list(("MIT,CC-BY-4.0",)) == licence_list(("MIT", "CC-BY-4.0")) == licence_list(("mit cc-by-4.0",)) \
        == ("MIT", "CC-BY-4.0")
    assert licence_list(("unknown, LicenseRef-Internal",)) == ("unknown", "LicenseRef-Internal")
    assert canonical("apache-2.0 or mit") == "Apache-2.0 OR MIT"
    assert canonical("GPL-2.0-only WITH Classpath-exception-2.0") == "GPL-2.0-only WITH Classpath-exception-2.0"
    for typo, closest in (("CC-BY-4", "CC-BY-4.0"), ("Apache2.0", "Apache-2.0"), ("MTI", "MIT")):
        with pytest.raises(ConfigError, match=f"did you mean '{closest}'"):
            canonical(typo)
    with pytest.raises(ConfigError, match="parentheses"):
        canonical("(MIT OR Apache-2.0)")
    assert allowed("MIT OR GPL-3.0-only", {"MIT"}) and not allowed("MIT AND GPL-3.0-only", {"MIT"})
    assert allowed("GPL-2.0-only WITH Classpath-exception-2.0", {"GPL-2.0-only"})

    mit, web, records = _filter_corpus(tmp_path)
    base = PrepareConfig(sources=(f"{mit}=mit", f"{web}=cc-by-4.0"), out=str(tmp_path / "all"), val_fraction=0.25)
    both = json.loads((prepare(replace(base, allow_licenses=("MIT,CC-BY-4.0",)), progress=False)
                       / "manifest.json").read_text())
    assert [s["license"] for s in both["sources"]] == ["MIT", "CC-BY-4.0"]  # spelled as SPDX spells them
    assert both["dropped"]["license"]["documents"] == 0 and both["filters"]["allow_licenses"] == ["CC-BY-4.0", "MIT"]
    with pytest.raises(ConfigError, match="did you mean 'CC-BY-4.0'"):  # before any work: nothing written
        prepare(replace(base, out=str(tmp_path / "typo"), allow_licenses=("MIT,CC-BY-4",)), progress=False)
    assert not (tmp_path / "typo").exists()


def test_a_filter_that_empties_the_data_is_named_and_a_small_corpus_gets_a_val_document(tmp_path):
    mit, web, records = _filter_corpus(tmp_path)
    with pytest.raises(DataError, match=r"0 documents kept of \d+ read.*dropped by filter: license \d+.*"
                                        r"the sources' licences are MIT and --allow-licenses keeps Apache-2.0"):
        prepare(PrepareConfig(sources=(f"{mit}=MIT",), out=str(tmp_path / "none"), allow_licenses=("Apache-2.0",)),
                progress=False)
    small = tmp_path / "small"
    small.mkdir()
    for i in range(3):
        (small / f"d{i}.txt").write_text(_words(i))
    out = prepare(PrepareConfig(sources=(f"{small}=MIT",), out=str(tmp_path / "s"), val_fraction=0.01,
                                extensions=("txt",)), progress=False)  # no dot: read as .txt
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["totals"]["documents"] == 3 and manifest["totals"]["val_tokens"] > 0
    forced = manifest["split"]["forced_val"]
    assert forced in {"d0.txt", "d1.txt", "d2.txt"}
    assert next(e for e in manifest["files"] if e["path"] == forced)["tokens"]["train"] == 0


def test_opt_out_patterns_are_normalised_and_their_matches_recorded(tmp_path):
    """A URL without its scheme, a host in upper case, http against https and a relative path
    glob used to match nothing, silently."""
    from effllm.filters import OptOut

    rules = tmp_path / "opt_out.txt"
    rules.write_text("SITE1.Example.org\nsite2.example.org/page6\nhttp://site3.example.org/page7\n"
                     "mit/doc7.txt\nnowhere.example.com\n")
    opt = OptOut(rules)
    assert opt.match("https://www.site1.example.org/x") == "SITE1.Example.org"
    assert opt.match("https://SITE2.example.org/page6") == "site2.example.org/page6"
    assert opt.match("https://site2.example.org/page5") is None
    assert opt.match("https://site3.example.org/page7?x=1") == "http://site3.example.org/page7"
    assert opt.match(str(tmp_path / "mit" / "doc7.txt")) == "mit/doc7.txt"
    assert opt.match(str(tmp_path / "mit" / "doc8.txt")) is None
    mit, web, records = _filter_corpus(tmp_path)
    cfg = PrepareConfig(sources=(f"{mit}=MIT", f"{web}=CC-BY-4.0"), out=str(tmp_path / "o"), origin_field="url",
                        opt_out=str(rules), val_fraction=0.25)
    matched = json.loads((prepare(cfg, progress=False) / "manifest.json").read_text())["filters"]["opt_out"]["matched"]
    assert matched["nowhere.example.com"] == 0 and matched["mit/doc7.txt"] == 1
    assert matched["SITE1.Example.org"] == sum(1 for r in records if "site1." in r["url"])
    from dataclasses import asdict

    from effllm.card import card_text
    from effllm.model import ModelConfig

    state = {"config": {"model": asdict(ModelConfig()), "device": "cpu", "precision": "fp32"}, "elapsed_s": 1.0,
             "step": 1, "tokens_seen": 1}
    card = card_text(state, {"total": 1, "active": 1, "mtp": 0}, json.loads((tmp_path / "o" / "manifest.json").read_text()))
    assert "1 matched no document: `nowhere.example.com`" in card and str(tmp_path) not in card




def test_the_manifest_records_languages_by_tokens_code_as_code_and_web_domains_by_bytes(tmp_path):
    """Per source and in total: each document's language (code by its extension, text by py3langid,
    the method recorded), ranked by train tokens that add up to the totals, and the domains of URL
    origins ranked by bytes. Prepared twice: the same manifest."""
    web = tmp_path / "web.jsonl"
    records = [{"text": f"{LANGUAGE_SAMPLES[lang]} ({i})", "url": f"https://{host}/page{i}"}
               for i, (lang, host) in enumerate([("nl", "nieuws.example.nl"), ("nl", "NIEUWS.example.nl:8080"),
                                                 ("nl", "blog.example.nl"), ("de", "zeitung.example.de"),
                                                 ("en", "news.example.com"), ("nl", "nieuws.example.nl")] * 3)]
    web.write_text("".join(json.dumps(r) + "\n" for r in records))
    code = tmp_path / "code"
    code.mkdir()
    for i in range(4):
        (code / f"mod{i}.py").write_text(f"def f{i}(x):\n    return x * {i}\n" * (i + 1))
    cfg = PrepareConfig(sources=(f"{web}=CC-BY-4.0", f"{code}=MIT"), out=str(tmp_path / "out"), origin_field="url",
                        val_fraction=0.2, extensions=("jsonl", "py"))
    manifest = json.loads((prepare(cfg, progress=False) / "manifest.json").read_text())
    content = manifest["content"]
    assert "py3langid" in content["languages"]["method"]
    web_langs, code_langs = content["languages"]["by_source"]
    assert [r["language"] for r in web_langs] == ["nl", "de", "en"]
    assert {r["language"]: r["documents"] for r in web_langs} == {"nl": 12, "de": 3, "en": 3}
    assert [(r["language"], r["documents"]) for r in code_langs] == [("code:Python", 4)]
    total = content["languages"]["total"]
    assert total[0]["language"] == "nl" and {r["language"] for r in total} == {"nl", "de", "en", "code:Python"}
    assert [r["train_tokens"] for r in total] == sorted((r["train_tokens"] for r in total), reverse=True)
    for split in ("train", "val"):
        assert sum(r[f"{split}_tokens"] for r in total) == manifest["totals"][f"{split}_tokens"]
    assert sum(r["bytes"] for r in total) == sum(e["kept_bytes"] for e in manifest["files"])
    domains = content["domains"]["total"]
    # the host in lower case, without the port: two spellings of nieuws.example.nl are one domain
    assert [d["domain"] for d in domains][0] == "nieuws.example.nl" and domains[0]["documents"] == 9
    assert {d["domain"] for d in domains} == {"nieuws.example.nl", "blog.example.nl", "zeitung.example.de",
                                              "news.example.com"}
    assert [d["bytes"] for d in domains] == sorted((d["bytes"] for d in domains), reverse=True)
    assert content["domains"]["by_source"][1] == []  # files have paths, not URLs
    again = json.loads((prepare(replace(cfg, out=str(tmp_path / "again")), progress=False) / "manifest.json")
                       .read_text())
    assert again["content"] == content


def test_a_record_date_that_is_not_iso_8601_is_refused_with_its_line(tmp_path):
    path = tmp_path / "dated.jsonl"
    path.write_text(json.dumps({"text": "a " * 50, "d": "2024-03"}) + "\n" + json.dumps({"text": "b " * 50, "d": "May 3"})
                    + "\n")
    with pytest.raises(DataError, match=r"dated.jsonl:2 has date 'May 3', not an ISO 8601 date"):
        prepare(PrepareConfig(sources=(f"{path}=CC0-1.0",), out=str(tmp_path / "o"), date_field="d"), progress=False)


def test_a_rank_reads_only_its_windows_of_a_large_train_split(tmp_path, small_prepare_config):
    """Under many ranks each reads only its own micro-batches' windows: train.bin is memory-mapped,
    never read whole. A 4 GiB (sparse) train split costs a loader process a few MB, not 4 GiB."""
    import subprocess
    import sys

    out = prepare(replace(small_prepare_config, out=str(tmp_path / "d")), progress=False)
    manifest = json.loads((out / "manifest.json").read_text())
    tokens = 2 << 30  # uint16 ids: 4 GiB
    with open(out / "train.bin", "r+b") as fh:
        fh.truncate(tokens * 2)
    manifest["totals"]["train_tokens"] = tokens
    manifest["files"][-1]["tokens"]["train"] += tokens - sum(f["tokens"]["train"] for f in manifest["files"])
    (out / "manifest.json").write_text(json.dumps(manifest))
    script = (
        "import resource, sys\n"
        "from effllm.data import TokenDataset\n"
        "before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
        f"ds = TokenDataset({str(out)!r})\n"
        "for step in range(50):\n"
        "    x, y = ds.train_batch(8, 64, seed=1, step=step, rank=1, micro=0)\n"
        "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before)\n"
    )
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert int(r.stdout.split()[-1]) < 64 * 1024  # KiB: under 64 MiB against the split's 4 GiB
