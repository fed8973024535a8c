"""Where prepared text comes from, and under which licence: the embedded corpus or the user's files.

A `Source` is a root folder with one licence (SPDX id, or the explicit word "unknown") and its
files in a fixed order; `read_documents` cuts a file into documents (the whole file, or one per
jsonl record or Parquet / Arrow row) with the id the split and the manifest use, and the origin
an opt-out matches. A folder written by Hugging Face `datasets`' `save_to_disk` (a Dataset or a
DatasetDict) is a source whose files are its Arrow data files, in the dataset's order. Parquet and
Arrow are read with pyarrow (`pip install effllm[arrow]`), imported only when such a file is read.
The embedded default corpus is the running Python's standard library: its .py files, tests and
third-party packages excluded, under the PSF licence.
"""

from __future__ import annotations

import json
import os
import re
import sysconfig
from dataclasses import dataclass, field
from pathlib import Path

from effllm.errors import DataError
from effllm.licenses import canonical

# Directories of the standard library that hold tests, or third-party packages with licences of
# their own (site-packages sits inside the stdlib directory of many installs).
STDLIB_EXCLUDED_DIRS = {"test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__"}
STDLIB_LICENSE = "PSF-2.0"
DEFAULT_EXTENSIONS = (".txt", ".md", ".jsonl", ".parquet", ".arrow")
FORMATS = {".jsonl": "jsonl", ".parquet": "parquet", ".arrow": "arrow"}  # by suffix; any other file is one text


@dataclass
class SourceFile:
    source: int  # index into the manifest's sources
    path: Path  # absolute path
    rel: str  # path relative to its source root, as the manifest records it
    format: str = "text"  # text (one document), jsonl (one per record), parquet / arrow (one per row)


def format_of(path: Path) -> str:
    return FORMATS.get(path.suffix, "text")


def hf_dataset_files(folder: Path) -> list[Path] | None:
    """The Arrow data files of a `datasets` save_to_disk folder, in the dataset's order (a
    DatasetDict's splits in its dataset_dict.json's order), or None if `folder` is not one."""
    if (folder / "dataset_dict.json").is_file():
        splits = json.loads((folder / "dataset_dict.json").read_text()).get("splits", [])
        return [f for split in splits for f in hf_dataset_files(folder / split) or []]
    state = folder / "state.json"
    if not (state.is_file() and (folder / "dataset_info.json").is_file()):
        return None
    try:
        return [folder / d["filename"] for d in json.loads(state.read_text())["_data_files"]]
    except (KeyError, TypeError, ValueError):
        raise DataError(f"{state} lists no _data_files: is {folder} a folder that datasets' save_to_disk wrote?") from None


@dataclass
class Source:
    kind: str  # "stdlib" or "files"
    root: Path
    license: str
    files: list[SourceFile] = field(default_factory=list)


def stdlib_root() -> Path:
    """The folder of the running Python's standard library: the embedded corpus."""
    return Path(sysconfig.get_paths()["stdlib"]).resolve()


def stdlib_source() -> Source:
    """The standard library's .py files of the running Python, tests and site-packages excluded."""
    root = stdlib_root()
    src = Source("stdlib", root, STDLIB_LICENSE)
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in STDLIB_EXCLUDED_DIRS)
        for name in sorted(filenames):
            if name.endswith(".py") and not name.startswith("test_"):
                path = Path(dirpath) / name
                src.files.append(SourceFile(0, path, path.relative_to(root).as_posix()))
    src.files.sort(key=lambda f: f.rel)
    return src


def split_source_spec(spec: str, default: str | None) -> tuple[str, str]:
    """"PATH=LICENSE" -> (PATH, LICENSE); a bare PATH takes `default` (a path that itself contains
    "=" and exists is read as a path). The licence is checked and spelled as SPDX spells it
    (effllm.licenses.canonical)."""
    if "=" in spec and not Path(spec).exists():
        path, licence = spec.rsplit("=", 1)
        if licence.strip():
            return path, canonical(licence)
    if not default:
        raise DataError(
            f"source {spec} has no licence: every source needs one in the manifest. Name it with "
            f"{spec}=SPDX-ID, or pass --license for all sources (an SPDX id such as CC-BY-4.0, or the "
            "explicit word 'unknown')"
        )
    return spec, canonical(default)


def user_sources(specs: tuple[str, ...], license: str | None = None,
                 extensions: tuple[str, ...] = DEFAULT_EXTENSIONS) -> list[Source]:
    """The files named by `specs` ("PATH" or "PATH=LICENSE"; folders read recursively, keeping the
    files ending in `extensions`); `license` is the licence of the specs that name none."""
    sources = []
    for i, spec in enumerate(specs):
        name, licence = split_source_spec(spec, license)
        path = Path(name).resolve()
        dataset = hf_dataset_files(path) if path.is_dir() else None
        if path.is_file():
            src = Source("files", path.parent, licence)
            src.files.append(SourceFile(i, path, path.name, format_of(path)))
        elif dataset is not None:  # a datasets save_to_disk folder: its Arrow files, in its order
            src = Source("hf_dataset", path, licence)
            for p in dataset:
                if not p.is_file():
                    raise DataError(f"{p}, a data file of the dataset {path}, is missing: save the dataset again")
                src.files.append(SourceFile(i, p, p.relative_to(path).as_posix(), "arrow"))
        elif path.is_dir():
            src = Source("files", path, licence)
            for dirpath, dirnames, filenames in os.walk(path):
                dirnames.sort()
                for fname in sorted(filenames):
                    if Path(fname).suffix in extensions:
                        p = Path(dirpath) / fname
                        src.files.append(SourceFile(i, p, p.relative_to(path).as_posix(), format_of(p)))
            src.files.sort(key=lambda f: f.rel)
            if not src.files:
                raise DataError(f"folder {path} holds no files ending in {', '.join(extensions)}: "
                                "point at other files or pass --extensions")
        else:
            raise DataError(f"source {name} does not exist: pass existing files or folders")
        sources.append(src)
    return sources


ISO_DATE = re.compile(r"^(\d{4})-(\d{2})(?:-(\d{2}))?")


def record_date(value, where: str) -> str | None:
    """A record's date as "YYYY-MM-DD" (or "YYYY-MM"), from an ISO 8601 string (a timestamp's date
    part); None when the record has none; anything else is refused, naming the record."""
    if value is None or value == "":
        return None
    m = ISO_DATE.match(value) if isinstance(value, str) else None
    if not m or not 1 <= int(m.group(2)) <= 12 or (m.group(3) and not 1 <= int(m.group(3)) <= 31):
        raise DataError(f"{where} has date {value!r}, not an ISO 8601 date: write dates as YYYY-MM-DD (a timestamp's "
                        "date part is read), or drop --date-field")
    return m.group(0)


def read_documents(f: SourceFile, raw: bytes, text_field: str, origin_field: str | None = None,
                   date_field: str | None = None) -> list[tuple[str, str, str, str | None]]:
    """(document id, text, origin, date) of one file: the whole file, or one per jsonl record or
    Parquet / Arrow row. The origin is the file's path, or a record's `origin_field` (a URL) when it
    has one; the date a record's `date_field` (None for plain files and undated records)."""
    if f.format in ("parquet", "arrow"):
        return _table_documents(f, raw, text_field, origin_field, date_field)
    text = raw.decode("utf-8")
    if f.format == "text":
        return [(f.rel, text, str(f.path), None)]
    docs = []
    for n, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{f.path}:{n} is not valid JSON ({e.msg}): fix or remove the line") from None
        if not isinstance(record, dict) or not isinstance(record.get(text_field), str):
            raise DataError(f"{f.path}:{n} has no string field {text_field!r}: pass --text-field NAME")
        origin = record.get(origin_field) if origin_field else None
        date = record_date(record.get(date_field), f"{f.path}:{n}") if date_field else None
        docs.append((f"{f.rel}:{n}", record[text_field], origin if isinstance(origin, str) else f"{f.path}:{n}", date))
    return docs


def _read_table(f: SourceFile, raw: bytes):
    """The pyarrow Table in a Parquet file, or an Arrow IPC stream or file (datasets writes streams)."""
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:
        raise DataError(f"{f.path} is {f.format.capitalize()}, read with pyarrow, which is not installed: pip install "
                        "'effllm[arrow]' (or pyarrow)") from None
    buffer = pa.BufferReader(raw)
    try:
        if f.format == "parquet":
            return pq.read_table(buffer)
        try:
            return pa.ipc.open_stream(buffer).read_all()
        except pa.ArrowInvalid:
            return pa.ipc.open_file(pa.BufferReader(raw)).read_all()
    except pa.ArrowException as e:
        raise DataError(f"{f.path} is not a readable {f.format.capitalize()} file ({e}): write it again, or rename it "
                        "if it is another format") from None


def _table_documents(f: SourceFile, raw: bytes, text_field: str, origin_field: str | None,
                     date_field: str | None) -> list[tuple[str, str, str, str | None]]:
    """One document per row: id `rel:row` (rows counted from 1), its `text_field` string, its
    `origin_field` or `path:row`, its `date_field` (an ISO 8601 string, a date or a timestamp)."""
    table = _read_table(f, raw)
    columns = table.column_names
    for name, flag in ((text_field, "--text-field"), (origin_field, "--origin-field"), (date_field, "--date-field")):
        if name and name not in columns:
            raise DataError(f"{f.path} has no column {name!r} (its columns: {', '.join(columns[:10])}): pass {flag} NAME")
    texts = table.column(text_field).to_pylist()
    origins = table.column(origin_field).to_pylist() if origin_field else [None] * len(texts)
    dates = table.column(date_field).to_pylist() if date_field else [None] * len(texts)
    docs = []
    for n, (text, origin, date) in enumerate(zip(texts, origins, dates), start=1):
        where = f"{f.path}:row {n}"
        if not isinstance(text, str):
            raise DataError(f"{where} has no string {text_field!r} (it holds {type(text).__name__}): pass --text-field "
                            "NAME of a string column, or drop the row")
        if hasattr(date, "isoformat"):  # a date or timestamp column
            date = date.isoformat()
        docs.append((f"{f.rel}:{n}", text, origin if isinstance(origin, str) else where,
                     record_date(date, where) if date_field else None))
    return docs
