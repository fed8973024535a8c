"""Data: text sources -> tokenizer -> train/val token shards + manifest; a resumable batch loader.

`prepare()` reads the embedded default corpus (the Python standard library's own .py files, PSF
licence) or a user's text / jsonl files and folders, tokenizes them (bytes, or a BPE trained here
with the `tokenizers` package), and writes into one directory:

    train.bin, val.bin   flat token ids (uint16 when the vocabulary fits, else uint32), one
                         end-of-text token after each document
    manifest.json        every source file (path, sha256, bytes, tokens, split, licence), the
                         tokenizer, the split rule and the totals
    tokenizer.json       the trained BPE (BPE only)

The output is a pure function of the input files and options: re-running gives byte-identical
files. `TokenDataset` opens such a directory; `TokenDataset.train_batch` is deterministic in
(seed, step, rank, micro-step), so a resumed run sees exactly the batches of an uninterrupted one.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import sysconfig
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Literal

import numpy as np
import torch

from effllm.errors import DataError
from effllm.filters import NearDuplicates, OptOut, text_sha256
from effllm.fsutil import claim_output_dir, new_temp_dir, refuse_overlap, replace_dir, resolved, sha256_file

MANIFEST_FORMAT = "effllm-tokens/1"
EOT_TEXT = "<|endoftext|>"
# Directories of the standard library that hold tests, or third-party packages with licences of
# their own (site-packages sits inside the stdlib directory of many installs).
STDLIB_EXCLUDED_DIRS = {"test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__"}
STDLIB_LICENSE = "PSF-2.0"
DEFAULT_EXTENSIONS = (".txt", ".md", ".jsonl")
DROP_REASONS = ("license", "opt_out", "exact_duplicate", "near_duplicate")


# ---------------------------------------------------------------------------------------------
# Tokenizers


class ByteTokenizer:
    """UTF-8 bytes as tokens: vocabulary 256; byte 0 (NUL) marks the end of a document.

    NUL characters are removed from the text before encoding, so id 0 only ever means
    end-of-text; decoding replaces invalid UTF-8 (a sample cut mid-character) with U+FFFD.
    """

    kind = "byte"
    vocab_size = 256
    eot_id = 0

    def encode(self, text: str) -> list[int]:
        return list(text.replace("\x00", "").encode("utf-8"))

    def encode_array(self, texts: list[str]) -> list[np.ndarray]:
        return [np.frombuffer(t.replace("\x00", "").encode("utf-8"), dtype=np.uint8) for t in texts]

    def decode(self, ids: list[int]) -> str:
        return bytes(i for i in ids if 0 < i < 256).decode("utf-8", errors="replace")

    def save(self, directory: Path) -> None:
        """The byte tokenizer has no file: its spec in the manifest is all it needs."""


class BPETokenizer:
    """Byte-level BPE (GPT-2 style pre-tokenization) from the `tokenizers` package.

    `<|endoftext|>` is id 0 and marks the end of a document.
    """

    kind = "bpe"
    eot_id = 0

    def __init__(self, tokenizer):
        self._tok = tokenizer
        self.vocab_size = tokenizer.get_vocab_size()

    @classmethod
    def train(cls, texts: Iterator[str], vocab_size: int) -> "BPETokenizer":
        from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size,
            special_tokens=[EOT_TEXT],
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        )
        tok.train_from_iterator(texts, trainer=trainer)
        return cls(tok)

    @classmethod
    def load(cls, path: Path) -> "BPETokenizer":
        from tokenizers import Tokenizer

        return cls(Tokenizer.from_file(str(path)))

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text).ids

    def encode_array(self, texts: list[str]) -> list[np.ndarray]:
        return [np.asarray(e.ids, dtype=np.int64) for e in self._tok.encode_batch(texts)]

    def decode(self, ids: list[int]) -> str:
        return self._tok.decode([i for i in ids if i != self.eot_id])

    def save(self, directory: Path) -> None:
        self._tok.save(str(directory / "tokenizer.json"))


def load_tokenizer(directory: str | Path, spec: dict):
    """The tokenizer a manifest (or checkpoint) `spec` describes, reading its file from `directory`."""
    if spec["kind"] == "byte":
        return ByteTokenizer()
    if spec["kind"] == "bpe":
        path = Path(directory) / spec["file"]
        if not path.is_file():
            raise DataError(f"tokenizer file {path} is missing: re-run `effllm prepare` for this data")
        return BPETokenizer.load(path)
    raise DataError(f"unknown tokenizer kind {spec['kind']!r} in {directory}")


# ---------------------------------------------------------------------------------------------
# Sources


@dataclass
class PrepareConfig:
    """Options of `effllm prepare`."""

    sources: tuple[str, ...] = ()  # text/jsonl files or folders, each optionally PATH=LICENSE; empty = the stdlib corpus
    out: str = "data/stdlib"  # output directory
    license: str | None = None  # licence (SPDX id, or "unknown") of the sources that name none of their own
    allow_licenses: tuple[str, ...] = ()  # keep only sources with these licences ("unknown" only if listed); empty = all
    opt_out: str | None = None  # a file of origin patterns (URL prefix, domain or path glob) whose documents are dropped
    origin_field: str | None = None  # jsonl: the record field holding the document's origin URL (for opt-outs)
    near_dup_threshold: float = 0.0  # drop documents this similar (MinHash Jaccard) to an earlier one; 0 = off
    tokenizer: Literal["byte", "bpe"] = "byte"  # byte-level (vocab 256) or a BPE trained on the train split
    vocab_size: int = 4096  # BPE vocabulary size (ignored for byte)
    val_fraction: float = 0.02  # share of documents held out for validation
    text_field: str = "text"  # the field of each jsonl record that holds its text
    extensions: tuple[str, ...] = DEFAULT_EXTENSIONS  # which files of a folder are read
    overwrite: bool = False  # replace an existing prepared directory


@dataclass
class SourceFile:
    source: int  # index into the manifest's sources
    path: Path  # absolute path
    rel: str  # path relative to its source root, as the manifest records it
    jsonl: bool = False


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
    "=" and exists is read as a path)."""
    if "=" in spec and not Path(spec).exists():
        path, licence = spec.rsplit("=", 1)
        if licence.strip():
            return path, licence.strip()
    if not default:
        raise DataError(
            f"source {spec} has no licence: every source needs one in the manifest. Name it with "
            f"{spec}=SPDX-ID, or pass --license for all sources (an SPDX id such as CC-BY-4.0, or the "
            "explicit word 'unknown')"
        )
    return spec, default


def user_sources(cfg: PrepareConfig) -> list[Source]:
    """The files named by `cfg.sources` (folders read recursively, filtered by extension)."""
    sources = []
    for i, spec in enumerate(cfg.sources):
        name, licence = split_source_spec(spec, cfg.license)
        path = Path(name).resolve()
        if path.is_file():
            src = Source("files", path.parent, licence)
            src.files.append(SourceFile(i, path, path.name, path.suffix == ".jsonl"))
        elif path.is_dir():
            src = Source("files", path, licence)
            for dirpath, dirnames, filenames in os.walk(path):
                dirnames.sort()
                for fname in sorted(filenames):
                    if Path(fname).suffix in cfg.extensions:
                        p = Path(dirpath) / fname
                        src.files.append(SourceFile(i, p, p.relative_to(path).as_posix(), p.suffix == ".jsonl"))
            src.files.sort(key=lambda f: f.rel)
            if not src.files:
                raise DataError(f"folder {path} holds no files ending in {', '.join(cfg.extensions)}: "
                                "point at other files or pass --extensions")
        else:
            raise DataError(f"source {name} does not exist: pass existing files or folders")
        sources.append(src)
    return sources


def read_documents(f: SourceFile, raw: bytes, text_field: str, origin_field: str | None = None
                   ) -> list[tuple[str, str, str]]:
    """(document id, text, origin) of one file: the whole file, or one per jsonl record. The origin
    is the file's path, or a record's `origin_field` (a URL) when it has one."""
    text = raw.decode("utf-8")
    if not f.jsonl:
        return [(f.rel, text, str(f.path))]
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
        docs.append((f"{f.rel}:{n}", record[text_field], origin if isinstance(origin, str) else f"{f.path}:{n}"))
    return docs


def split_of(doc_id: str, val_fraction: float) -> str:
    """'val' for a stable val_fraction share of document ids, chosen by hash, else 'train'."""
    h = int.from_bytes(hashlib.sha256(doc_id.encode()).digest()[:8], "big")
    return "val" if h < val_fraction * 2**64 else "train"


SPLIT_RULE = "a document is in val when the first 8 bytes of sha256(document id), big-endian, are < val_fraction * 2**64"


# ---------------------------------------------------------------------------------------------
# prepare


def prepare(cfg: PrepareConfig, progress: bool = True) -> Path:
    """Tokenize the sources of `cfg` into `cfg.out`; returns the output directory."""
    if not 0 < cfg.val_fraction < 1:
        raise DataError(f"val_fraction must lie in (0, 1), got {cfg.val_fraction}")
    if cfg.tokenizer == "bpe" and not 256 < cfg.vocab_size < 2**31:
        raise DataError(f"BPE vocab_size must exceed the 256 byte symbols, got {cfg.vocab_size}")
    out = resolved(cfg.out)
    given = [split_source_spec(spec, cfg.license)[0] for spec in cfg.sources] or [stdlib_root()]
    refuse_overlap(out, given)
    if cfg.opt_out:
        refuse_overlap(out, [cfg.opt_out], what="opt-out file")
    claim_output_dir(out, writer="effllm prepare", owned=PREPARED_FILES, is_ours=is_prepared, overwrite=cfg.overwrite)
    sources = user_sources(cfg) if cfg.sources else [stdlib_source()]
    files = [f for s in sources for f in s.files]
    if not files:
        raise DataError("no source files found")

    from tqdm import tqdm

    def documents(f: SourceFile) -> tuple[str, list[tuple[str, str, str]]]:
        raw = f.path.read_bytes()
        return hashlib.sha256(raw).hexdigest(), read_documents(f, raw, cfg.text_field, cfg.origin_field)

    allowed = set(cfg.allow_licenses) or None
    opt_out = OptOut(cfg.opt_out) if cfg.opt_out else None
    near = NearDuplicates(cfg.near_dup_threshold) if cfg.near_dup_threshold else None
    seen: set[str] = set()
    dropped = {reason: {"documents": 0, "bytes": 0} for reason in DROP_REASONS}
    dropped_ids: dict[int, set[str]] = {}  # kept file index -> ids of its dropped documents

    def verdict(f: SourceFile, text: str, origin: str) -> str | None:
        """Why this document is dropped, or None to keep it (checked in this order)."""
        if allowed is not None and sources[f.source].license not in allowed:
            return "license"
        if opt_out is not None and opt_out.match(origin):
            return "opt_out"
        digest = text_sha256(text)
        if digest in seen:
            return "exact_duplicate"
        seen.add(digest)
        if near is not None and near.seen(text):
            return "near_duplicate"
        return None

    # Pass 1: hash every file, filter its documents and assign the kept ones to a split. Only one
    # file's text is held in memory at a time, here and below, so corpora larger than memory
    # prepare fine.
    kept, entries, skipped = [], [], []
    n_docs = {"train": 0, "val": 0}
    for f in tqdm(files, desc="reading", unit="file", disable=not progress or None):
        try:
            digest, file_docs = documents(f)
        except UnicodeDecodeError as e:
            skipped.append({"source": f.source, "path": f.rel, "reason": f"not UTF-8 ({e.reason} at byte {e.start})"})
            continue
        entry = {"source": f.source, "path": f.rel, "sha256": digest, "bytes": f.path.stat().st_size,
                 "documents": 0, "kept_bytes": 0, "tokens": {"train": 0, "val": 0}}
        for doc_id, text, origin in file_docs:
            reason = verdict(f, text, origin)
            if reason is None:
                entry["documents"] += 1
                entry["kept_bytes"] += len(text.encode("utf-8"))
                n_docs[split_of(doc_id, cfg.val_fraction)] += 1
                continue
            dropped_ids.setdefault(len(kept), set()).add(doc_id)
            dropped[reason]["documents"] += 1
            dropped[reason]["bytes"] += len(text.encode("utf-8"))
            entry.setdefault("dropped", {}).setdefault(reason, 0)
            entry["dropped"][reason] += 1
        kept.append(f)
        entries.append(entry)
    for split, n in n_docs.items():
        if not n:
            raise DataError(f"the {split} split is empty ({sum(n_docs.values())} documents kept, "
                            f"{sum(d['documents'] for d in dropped.values())} dropped by the filters): "
                            "add documents, loosen the filters or change --val-fraction")

    def texts_of(i: int, split: str | None = None) -> list[tuple[str, str]]:
        f, entry = kept[i], entries[i]
        digest, file_docs = documents(f)
        if digest != entry["sha256"]:
            raise DataError(f"{f.path} changed while being prepared: run `effllm prepare` again")
        drop = dropped_ids.get(i, ())
        return [(doc_id, text) for doc_id, text, _ in file_docs
                if doc_id not in drop and split in (None, split_of(doc_id, cfg.val_fraction))]

    # Pass 2 (BPE only): learn merges from the train split alone, so val stays unseen.
    if cfg.tokenizer == "byte":
        tokenizer = ByteTokenizer()
    else:
        train_texts = (text for i in range(len(kept)) for _, text in texts_of(i, "train"))
        tokenizer = BPETokenizer.train(train_texts, cfg.vocab_size)
    dtype = np.uint16 if tokenizer.vocab_size <= 2**16 else np.uint32

    # Pass 3: tokenize file by file, appending each document and an end-of-text token to its split,
    # into a new hidden folder that replaces `out` only once complete (and is removed on failure).
    tmp = new_temp_dir(out)
    try:
        counts = np.zeros(tokenizer.vocab_size, dtype=np.int64)
        eot = np.array([tokenizer.eot_id], dtype=dtype)
        with open(tmp / "train.bin", "wb") as train_fh, open(tmp / "val.bin", "wb") as val_fh:
            handles = {"train": train_fh, "val": val_fh}
            for i in tqdm(range(len(kept)), desc="tokenizing", unit="file", disable=not progress or None):
                entry = entries[i]
                file_docs = texts_of(i)
                for (doc_id, _), ids in zip(file_docs, tokenizer.encode_array([t for _, t in file_docs])):
                    split = split_of(doc_id, cfg.val_fraction)
                    ids = np.concatenate((ids.astype(dtype), eot))
                    handles[split].write(ids.tobytes())
                    entry["tokens"][split] += len(ids)
                    if split == "train":
                        counts += np.bincount(ids, minlength=tokenizer.vocab_size)
        totals = {f"{split}_tokens": sum(e["tokens"][split] for e in entries) for split in ("train", "val")}
        tokenizer.save(tmp)

        # Cross-entropy of the val split under the train split's unigram distribution (add-one
        # smoothed): the loss a model gets from token frequencies alone, the bar training must clear.
        val = np.fromfile(tmp / "val.bin", dtype=dtype)
        logp = np.log((counts + 1) / (counts.sum() + len(counts)))
        unigram = float(-np.mean(logp[val]))

        tok_spec = {"kind": tokenizer.kind, "vocab_size": tokenizer.vocab_size, "eot_id": tokenizer.eot_id}
        if tokenizer.kind == "bpe":
            tok_spec |= {"file": "tokenizer.json", "sha256": sha256_file(tmp / "tokenizer.json")}
        manifest = {
            "format": MANIFEST_FORMAT,
            "sources": [
                {"kind": s.kind, "root": str(s.root), "license": s.license}
                | ({"python": sys.version.split()[0], "note": "Python standard library source, tests excluded"}
                   if s.kind == "stdlib" else {})
                for s in sources
            ],
            "tokenizer": tok_spec,
            "dtype": np.dtype(dtype).name,
            "split": {"rule": SPLIT_RULE, "val_fraction": cfg.val_fraction, "document_id": "path relative to "
                      "its source root, plus ':line' for a jsonl record"},
            "totals": {"files": len(entries), "documents": sum(n_docs.values()),
                       "bytes": sum(e["bytes"] for e in entries), **totals,
                       "unigram_val_loss": round(unigram, 6)},
            "filters": {
                "allow_licenses": sorted(allowed) if allowed else None,
                "opt_out": ({"file": str(opt_out.path.resolve()), "sha256": sha256_file(opt_out.path),
                             "patterns": len(opt_out.patterns)} if opt_out else None),
                "exact_dedup": "sha256 of each document's text; the first occurrence in source order is kept",
                "near_dedup": ({"threshold": cfg.near_dup_threshold, "method": f"MinHash, {near.NUM_PERM} permutations "
                                f"over {near.SHINGLE}-word shingles, LSH with {near.BANDS} bands"} if near else None),
            },
            "dropped": dropped,
            "files": entries,
            "skipped": skipped,
        }
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n")
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    replace_dir(tmp, out)
    return out


PREPARED_FILES = ("train.bin", "val.bin", "manifest.json", "tokenizer.json")  # all that `prepare` writes


def is_prepared(directory: Path) -> bool:
    """Whether `directory` holds an earlier `prepare`'s output (an effllm manifest)."""
    try:
        return json.loads((directory / "manifest.json").read_text()).get("format") == MANIFEST_FORMAT
    except (OSError, ValueError, AttributeError):
        return False


# ---------------------------------------------------------------------------------------------
# Loading


class TokenDataset:
    """A prepared directory: manifest, tokenizer, and memory-mapped train / val tokens."""

    def __init__(self, directory: str | Path):
        self.dir = Path(directory)
        manifest = self.dir / "manifest.json"
        if not self.dir.is_dir():
            raise DataError(f"data directory {self.dir} does not exist: run `effllm prepare --out {self.dir}` first")
        if not manifest.is_file():
            raise DataError(f"data directory {self.dir} holds no manifest.json: "
                            f"run `effllm prepare --out {self.dir}` to prepare it")
        self.manifest = json.loads(manifest.read_text())
        if self.manifest.get("format") != MANIFEST_FORMAT:
            raise DataError(f"{manifest} is not an effllm manifest of format {MANIFEST_FORMAT}: re-run `effllm prepare`")
        self.manifest_sha256 = sha256_file(manifest)
        self.tokenizer = load_tokenizer(self.dir, self.manifest["tokenizer"])
        dtype = np.dtype(self.manifest["dtype"])
        self.splits = {}
        for split in ("train", "val"):
            path = self.dir / f"{split}.bin"
            expected = self.manifest["totals"][f"{split}_tokens"]
            if not path.is_file() or path.stat().st_size != expected * dtype.itemsize:
                raise DataError(f"{path} is missing or not the size the manifest states "
                                f"({expected} tokens): re-run `effllm prepare --overwrite`")
            if expected == 0:
                raise DataError(f"the {split} split of {self.dir} is empty: prepare more data")
            self.splits[split] = np.memmap(path, dtype=dtype, mode="r")

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.vocab_size

    def check_seq_len(self, seq_len: int) -> None:
        """Fail early when a split is too short for one window of seq_len + 1 tokens."""
        for split, data in self.splits.items():
            if len(data) < seq_len + 1:
                raise DataError(f"the {split} split has {len(data)} tokens, fewer than seq_len + 1 = "
                                f"{seq_len + 1}: lower seq_len or prepare more data")

    def train_batch(self, batch_size: int, seq_len: int, seed: int, step: int, rank: int = 0,
                    micro: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        """(input, target) windows, each (batch_size, seq_len) int64, at random offsets drawn from
        a generator seeded by (seed, step, rank, micro) alone: the same call always gives the
        same batch, whatever ran before it."""
        data = self.splits["train"]
        rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence([seed, step, rank, micro])))
        offsets = rng.integers(0, len(data) - seq_len, size=batch_size)
        return windows(data, offsets, seq_len)

    def val_batches(self, batch_size: int, seq_len: int, max_tokens: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Consecutive non-overlapping windows from the start of the val split, up to `max_tokens`
        input tokens: the same windows at every evaluation."""
        data = self.splits["val"]
        n_windows = min((len(data) - 1) // seq_len, max(1, max_tokens // seq_len))
        for start in range(0, n_windows, batch_size):
            offsets = np.arange(start, min(start + batch_size, n_windows)) * seq_len
            yield windows(data, offsets, seq_len)


def windows(data: np.ndarray, offsets: np.ndarray, seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    rows = np.stack([np.asarray(data[o : o + seq_len + 1], dtype=np.int64) for o in offsets])
    t = torch.from_numpy(rows)
    return t[:, :-1].contiguous(), t[:, 1:].contiguous()

