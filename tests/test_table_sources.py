"""Parquet, Arrow and Hugging Face `datasets` folders as `effllm prepare` sources.

Every file is written here (pyarrow, and datasets' own save_to_disk); nothing is downloaded. Each
row is a document, identified by file and row, with its origin and date columns read as a jsonl
record's fields are; the manifest hashes each file it read.
"""

from __future__ import annotations

import datetime
import hashlib
import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from effllm.data import TokenDataset
from effllm.errors import DataError
from effllm.prepare import PrepareConfig, prepare

TEXTS = [f"row {i}: " + "some words of text " * (5 + i % 7) for i in range(40)]
URLS = [f"https://{'blocked.example' if i % 10 == 3 else 'ok.example'}/page/{i}" for i in range(40)]
DATES = [datetime.datetime(2024, 1 + i % 12, 1 + i % 28, 12, 30) for i in range(40)]


def table() -> pa.Table:
    return pa.table({"content": TEXTS, "url": URLS, "crawled": pa.array(DATES, pa.timestamp("s")),
                     "n": list(range(40))})


def all_tokens(out) -> np.ndarray:
    ds = TokenDataset(out)
    return np.concatenate([ds.splits["train"], ds.splits["val"]])


def test_parquet_rows_are_documents_with_origins_dates_and_opt_outs(tmp_path):
    pq.write_table(table(), tmp_path / "web.parquet", row_group_size=7)  # several row groups
    (tmp_path / "opt_out.txt").write_text("blocked.example\n")
    out = prepare(PrepareConfig(sources=(f"{tmp_path / 'web.parquet'}=CC-BY-4.0",), out=str(tmp_path / "d"),
                                text_field="content", origin_field="url", date_field="crawled",
                                opt_out=str(tmp_path / "opt_out.txt"), val_fraction=0.2), progress=False)
    manifest = json.loads((out / "manifest.json").read_text())
    (entry,) = manifest["files"]
    assert entry["format"] == "parquet" and entry["documents"] == 36  # rows 3, 13, 23, 33 opted out
    assert entry["sha256"] == hashlib.sha256((tmp_path / "web.parquet").read_bytes()).hexdigest()
    kept = [t for t, u in zip(TEXTS, URLS) if "blocked" not in u]
    tokens = all_tokens(out)
    assert len(tokens) == sum(len(t.encode()) + 1 for t in kept) and (tokens == 0).sum() == 36
    assert [(d["domain"], d["documents"]) for d in manifest["content"]["domains"]["total"]] == [("ok.example", 36)]
    assert manifest["collection"]["earliest"] == "2024-01-01" and manifest["collection"]["latest"].startswith("2024-12")
    assert manifest["collection"]["documents_dated"] == 36  # timestamps read as their dates
    assert "':row' (from 1)" in manifest["split"]["document_id"]


@pytest.mark.parametrize("writer", ["stream", "file"])
def test_arrow_ipc_streams_and_files_are_read(tmp_path, writer):
    t = table()
    with pa.OSFile(str(tmp_path / "data.arrow"), "wb") as sink:
        w = pa.ipc.new_stream(sink, t.schema) if writer == "stream" else pa.ipc.new_file(sink, t.schema)
        w.write_table(t)
        w.close()
    out = prepare(PrepareConfig(sources=(str(tmp_path / "data.arrow"),), license="MIT", out=str(tmp_path / "d"),
                                text_field="content"), progress=False)
    (entry,) = json.loads((out / "manifest.json").read_text())["files"]
    assert entry["format"] == "arrow" and entry["documents"] == 40
    assert len(all_tokens(out)) == sum(len(t.encode()) + 1 for t in TEXTS)


def test_datasets_save_to_disk_folders_are_sources_in_the_datasets_order(tmp_path):
    import datasets  # a dev dependency: the format is written by the library itself
    d = datasets.Dataset.from_dict({"text": TEXTS, "url": URLS})
    d.save_to_disk(str(tmp_path / "one"), max_shard_size="1KB")  # several Arrow files
    datasets.DatasetDict({"train": d.select(range(30)), "validation": d.select(range(30, 40))}).save_to_disk(
        str(tmp_path / "dict"))
    out = prepare(PrepareConfig(sources=(f"{tmp_path / 'one'}=CC0-1.0", f"{tmp_path / 'dict'}=MIT"),
                                out=str(tmp_path / "d"), origin_field="url"), progress=False)
    manifest = json.loads((out / "manifest.json").read_text())
    assert [s["kind"] for s in manifest["sources"]] == ["hf_dataset", "hf_dataset"]
    one = [e for e in manifest["files"] if e["source"] == 0]
    state = json.loads((tmp_path / "one" / "state.json").read_text())
    assert [e["path"] for e in one] == [f["filename"] for f in state["_data_files"]] and len(one) > 1
    assert sum(e["documents"] for e in one) == 40
    paths = [e["path"] for e in manifest["files"] if e["source"] == 1]
    assert paths[0].startswith("train/") and paths[-1].startswith("validation/")
    for e in manifest["files"]:
        root = tmp_path / ("one" if e["source"] == 0 else "dict")
        assert e["sha256"] == hashlib.sha256((root / e["path"]).read_bytes()).hexdigest()
    # the exact duplicates of the second source (the same rows) are dropped, and counted
    assert sum(e["documents"] for e in manifest["files"]) == 40 and manifest["dropped"]["exact_duplicate"]["documents"] == 40


def test_table_sources_name_a_missing_column_and_a_row_without_text(tmp_path):
    pq.write_table(table(), tmp_path / "web.parquet")
    with pytest.raises(DataError, match=r"web.parquet has no column 'text' \(its columns: content, url, crawled, n\): "
                                        "pass --text-field NAME"):
        prepare(PrepareConfig(sources=(str(tmp_path / "web.parquet"),), license="MIT", out=str(tmp_path / "d")),
                progress=False)
    pq.write_table(pa.table({"text": ["fine text", None, "more"]}), tmp_path / "nulls.parquet")
    with pytest.raises(DataError, match=r"nulls.parquet:row 2 has no string 'text' \(it holds NoneType\)"):
        prepare(PrepareConfig(sources=(str(tmp_path / "nulls.parquet"),), license="MIT", out=str(tmp_path / "d")),
                progress=False)
    (tmp_path / "fake.parquet").write_bytes(b"not parquet at all")
    with pytest.raises(DataError, match="fake.parquet is not a readable Parquet file"):
        prepare(PrepareConfig(sources=(str(tmp_path / "fake.parquet"),), license="MIT", out=str(tmp_path / "d")),
                progress=False)
    assert not (tmp_path / "d").exists()
