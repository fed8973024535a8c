"""`effllm prepare`: text sources -> tokenizer -> train/val token shards and a manifest.

`prepare()` reads the embedded default corpus (the Python standard library's own .py files, PSF
licence) or a user's text / jsonl files and folders (effllm/sources.py), filters their documents
(effllm/filters.py), tokenizes them (effllm/tokenizer.py: bytes, a BPE trained here, or an existing
tokenizers file given with --tokenizer, e.g. a checkpoint's tokenizer.json), and
writes into one directory:

    train.bin, val.bin   flat token ids (uint16 when the vocabulary fits, else uint32), one
                         end-of-text token after each document
    manifest.json        every source file (path, sha256, bytes, tokens, split, licence), the
                         tokenizer, the split rule, the filters, the languages and domains
                         (effllm/content.py) and the totals
    tokenizer.json       the trained BPE, or a byte-for-byte copy of the given file

The output is a pure function of the input files and options: re-running gives byte-identical
files. It is written into a hidden folder that replaces the output only once complete. Only one
file's text is held in memory at a time, so corpora larger than memory prepare fine. The stages:
`_read` (hash, filter and split every file), the BPE training (train split only), `_tokenize`,
and `_manifest`. effllm/data.py reads the result.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import multiprocessing
import os
import pickle
import shutil
import sys
from collections import deque
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
from tqdm import tqdm

from effllm.content import ContentStats, domain_of, language_of
from effllm.data import MANIFEST_FORMAT, mixture_weights
from effllm.docfields import documented
from effllm.errors import ConfigError, DataError
from effllm.filters import DocumentFilter
from effllm.fsutil import claim_output_dir, new_temp_dir, refuse_overlap, replace_dir, resolved
from effllm.licenses import licence_list
from effllm.sources import (
    DEFAULT_EXTENSIONS,
    Source,
    SourceFile,
    read_documents,
    split_source_spec,
    stdlib_root,
    stdlib_source,
    user_sources,
)
from effllm.tokenizer import BPETokenizer, ByteTokenizer, FileTokenizer, tokenizer_spec

SPLIT_RULE = "a document is in val when the first 8 bytes of sha256(document id), big-endian, are < val_fraction * 2**64"
PREPARED_FILES = ("train.bin", "val.bin", "manifest.json", "tokenizer.json")  # all that `prepare` writes


@documented
@dataclass
class PrepareConfig:
    """Options of `effllm prepare`."""

    sources: tuple[str, ...] = ()  # text/jsonl files or folders, each optionally PATH=LICENSE; empty = the stdlib corpus
    out: str = "data/stdlib"  # output directory
    license: str | None = None  # licence (SPDX id, or "unknown") of the sources that name none of their own
    allow_licenses: tuple[str, ...] = ()  # keep sources with these SPDX ids (commas or spaces, any case); empty = all
    opt_out: str | None = None  # a file of origin patterns (URL prefix, domain or path glob) whose documents are dropped
    origin_field: str | None = None  # jsonl: the record field holding the document's origin URL (for opt-outs)
    date_field: str | None = None  # jsonl: the record field holding its collection date (ISO 8601), for the period
    mix: tuple[float, ...] = ()  # sampling weights per source (--sources order); () = in proportion to size
    mix_per: Literal["tokens", "documents"] = "tokens"  # --mix weights are shares of training tokens, or of documents
    near_dup_threshold: float = 0.0  # drop documents this similar (MinHash Jaccard) to an earlier one; 0 = off
    tokenizer: str = "byte"  # "byte" (vocab 256), "bpe" (trained on the train split), or a tokenizers file (tokenizer.json)
    eot_token: str | None = None  # tokenizer file: its special token ending each document; None = its tokenizer_config.json's eos
    vocab_size: int = 4096  # BPE vocabulary size (ignored for byte and a tokenizer file)
    val_fraction: float = 0.02  # share of documents held out for validation
    text_field: str = "text"  # the field of each jsonl record that holds its text
    extensions: tuple[str, ...] = DEFAULT_EXTENSIONS  # which files of a folder are read
    overwrite: bool = False  # replace an existing prepared directory
    workers: int = 0  # tokenizing processes (the output is the same for any number); 0 = one per core for BPE from 64 MB


def doc_hash(doc_id: str) -> int:
    """The split rule's number for a document: the first 8 bytes of sha256(id), big-endian."""
    return int.from_bytes(hashlib.sha256(doc_id.encode()).digest()[:8], "big")


def split_of(doc_id: str, val_fraction: float) -> str:
    """'val' for a stable val_fraction share of document ids, chosen by hash, else 'train'."""
    return "val" if doc_hash(doc_id) < val_fraction * 2**64 else "train"


def is_prepared(directory: Path) -> bool:
    """Whether `directory` holds an earlier `prepare`'s output (an effllm manifest)."""
    try:
        return json.loads((directory / "manifest.json").read_text()).get("format") == MANIFEST_FORMAT
    except (OSError, ValueError, AttributeError):
        return False


class _Corpus:
    """The files kept by the read pass, each with its manifest entry and the ids of its dropped
    documents; `documents(i, split)` reads file i again (checking it did not change) and gives its
    kept (id, text) pairs, of one split or both."""

    def __init__(self, cfg: PrepareConfig, sources: list[Source]):
        self.cfg, self.sources = cfg, sources
        self.files: list[SourceFile] = []
        self.entries: list[dict] = []
        self.dropped_ids: dict[int, set[str]] = {}  # kept file index -> ids of its dropped documents
        self.skipped: list[dict] = []
        self.n_docs = {"train": 0, "val": 0}
        self.forced_val: str | None = None  # a small corpus's one val document, when the hash rule gave none

    def split(self, doc_id: str) -> str:
        return "val" if doc_id == self.forced_val else split_of(doc_id, self.cfg.val_fraction)

    def read(self, f: SourceFile) -> tuple[str, list[tuple[str, str, str]]]:
        raw = f.path.read_bytes()
        return hashlib.sha256(raw).hexdigest(), read_documents(f, raw, self.cfg.text_field, self.cfg.origin_field,
                                                          self.cfg.date_field)

    def documents(self, i: int, split: str | None = None) -> list[tuple[str, str, str, str | None]]:
        """(document id, text, origin, date) of file i's kept documents (of `split`, when given)."""
        f, entry = self.files[i], self.entries[i]
        digest, file_docs = self.read(f)
        if digest != entry["sha256"]:
            raise DataError(f"{f.path} changed while being prepared: run `effllm prepare` again")
        drop = self.dropped_ids.get(i, ())
        return [doc for doc in file_docs if doc[0] not in drop and split in (None, self.split(doc[0]))]


def _read(cfg: PrepareConfig, sources: list[Source], filters: DocumentFilter, progress: bool) -> _Corpus:
    """Pass 1: hash every file, filter its documents and assign the kept ones to a split."""
    corpus = _Corpus(cfg, sources)
    files = [f for s in sources for f in s.files]
    lowest: tuple[int, str] | None = None  # the kept document whose hash is closest to the val rule
    for f in tqdm(files, desc="reading", unit="file", disable=not progress or None):
        try:
            digest, file_docs = corpus.read(f)
        except UnicodeDecodeError as e:
            corpus.skipped.append({"source": f.source, "path": f.rel,
                                   "reason": f"not UTF-8 ({e.reason} at byte {e.start})"})
            continue
        entry = {"source": f.source, "path": f.rel, "sha256": digest, "bytes": f.path.stat().st_size,
                 **({"format": f.format} if f.format != "text" else {}),
                 "documents": 0, "kept_bytes": 0, "tokens": {"train": 0, "val": 0}}
        for doc_id, text, origin, _ in file_docs:
            reason = filters.verdict(sources[f.source].license, text, origin)
            if reason is None:
                entry["documents"] += 1
                entry["kept_bytes"] += len(text.encode("utf-8"))
                corpus.n_docs[split_of(doc_id, cfg.val_fraction)] += 1
                key = (doc_hash(doc_id), doc_id)
                lowest = min(lowest, key) if lowest else key
                continue
            corpus.dropped_ids.setdefault(len(corpus.files), set()).add(doc_id)
            entry.setdefault("dropped", {}).setdefault(reason, 0)
            entry["dropped"][reason] += 1
        corpus.files.append(f)
        corpus.entries.append(entry)
    kept = sum(corpus.n_docs.values())
    if kept < 2:
        drops = {reason: d["documents"] for reason, d in filters.dropped.items() if d["documents"]}
        by = ", ".join(f"{reason} {n}" for reason, n in drops.items()) or "none"
        licences = sorted({s.license for s in sources})
        raise DataError(f"{kept} document{'s' if kept != 1 else ''} kept of {kept + sum(drops.values())} read: a "
                        f"train and a val split need at least 2 (dropped by filter: {by})"
                        + (f"; the sources' licences are {', '.join(licences)} and --allow-licenses keeps "
                           f"{', '.join(sorted(filters.allowed))}" if drops.get("license") and filters.allowed else "")
                        + " — add documents or loosen the filters that dropped them")
    if corpus.n_docs["val"] == 0:  # a small corpus: the document nearest the rule goes to val
        corpus.forced_val = lowest[1]
        corpus.n_docs = {"train": kept - 1, "val": 1}
    elif corpus.n_docs["train"] == 0:
        raise DataError(f"all {kept} documents fell in the val split (--val-fraction {cfg.val_fraction}) — lower "
                        "--val-fraction")
    return corpus


# Tokenizing processes. Parallel output is the serial output: every file is tokenized by the same
# function (`_tokenize_file`), wherever it runs, and written in file order. Memory is bounded:
# each worker holds one file's text and tokens, and at most IN_FLIGHT_PER_WORKER finished files
# per worker wait to be written, so it does not grow with the corpus.
IN_FLIGHT_PER_WORKER = 2
PARALLEL_MIN_BYTES = 64 << 20  # workers=0 (auto): a smaller corpus tokenizes in this process (workers take ~2 s to start)
_worker: dict = {}  # a tokenizing process's own (state file, corpus, tokenizer, dtype), loaded once


def _start_worker() -> None:
    """Runs once in each tokenizing process (spawned: nothing of the parent's threads is inherited)."""
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # this process's own: the processes are the parallelism


def _ready() -> None:
    """A first task: makes the pool start its processes (they import effllm) while this one reads."""


def _tokenize_in_worker(state: str, i: int):
    if _worker.get("state") != state:
        with open(state, "rb") as fh:
            _worker.update(zip(("corpus", "tokenizer", "dtype"), pickle.load(fh)), state=state)
    return _tokenize_file(_worker["corpus"], _worker["tokenizer"], _worker["dtype"], i)


def _tokenize_file(corpus: _Corpus, tokenizer, dtype, i: int):
    """File i's kept documents, tokenized: (train tokens, val tokens), each document followed by an
    end-of-text token, in document order; per document (split, language, domain, bytes, tokens,
    date); and the train tokens' counts as (ids, counts)."""
    eot = np.array([tokenizer.eot_id], dtype=dtype)
    docs = corpus.documents(i)
    parts = {"train": [], "val": []}
    meta = []
    for (doc_id, text, origin, date), ids in zip(docs, tokenizer.encode_array([d[1] for d in docs])):
        split = corpus.split(doc_id)
        ids = np.concatenate((ids.astype(dtype), eot))
        parts[split].append(ids)
        meta.append((split, language_of(doc_id, text), domain_of(origin), len(text.encode("utf-8")), len(ids), date))
    train, val = (np.concatenate(parts[k]) if parts[k] else np.zeros(0, dtype) for k in ("train", "val"))
    return train, val, meta, np.unique(train, return_counts=True)


def tokenizing_workers(cfg: PrepareConfig, n_bytes: int) -> int:
    """The processes to tokenize `n_bytes` of sources with: cfg.workers, or for 0 one per usable
    core for a BPE or tokenizer file and PARALLEL_MIN_BYTES or more. The byte tokenizer stays in this
    process: it runs at tens of MB/s (benchmarks/results/prepare_speed/), faster than workers start
    and send their tokens back; so does a small corpus, done before workers would have started."""
    if cfg.workers:
        return cfg.workers
    if cfg.tokenizer == "byte" or n_bytes < PARALLEL_MIN_BYTES:
        return 1
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def _pool(workers: int) -> ProcessPoolExecutor:
    """`workers` spawned tokenizing processes, asked to start now, so that they import effllm while
    this process reads and filters the corpus (and trains the BPE)."""
    pool = ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"), initializer=_start_worker)
    for _ in range(workers):
        pool.submit(_ready)
    return pool


def _tokenize(corpus: _Corpus, tokenizer, dtype, tmp: Path, progress: bool,
              pool: ProcessPoolExecutor | None = None, workers: int = 1) -> tuple[np.ndarray, ContentStats]:
    """Pass 3: file by file, each kept document and an end-of-text token appended to its split's
    file in `tmp` (by the `workers` processes of `pool`, written in file order; they read the corpus
    and tokenizer from a state file in `tmp`, removed after); the entries get their token counts,
    and each document's language and domain are counted (effllm/content.py). Returns the train
    split's token counts (V,) and those content counts."""
    counts = np.zeros(tokenizer.vocab_size, dtype=np.int64)
    content = ContentStats(len(corpus.sources), corpus.cfg.date_field)
    n = len(corpus.files)
    with open(tmp / "train.bin", "wb") as train_fh, open(tmp / "val.bin", "wb") as val_fh, \
            tqdm(total=n, desc="tokenizing", unit="file", disable=not progress or None) as bar:
        def write(i: int, result) -> None:
            train, val, meta, (ids, c) = result
            train_fh.write(train.tobytes())
            val_fh.write(val.tobytes())
            entry = corpus.entries[i]
            for split, language, domain, n_bytes, tokens, date in meta:
                entry["tokens"][split] += tokens
                content.add(entry["source"], language, domain, n_bytes, split, tokens, date)
            counts[ids.astype(np.int64)] += c  # ids are unique (np.unique): no two writes to one element
            bar.update()

        if pool is None:
            for i in range(n):
                write(i, _tokenize_file(corpus, tokenizer, dtype, i))
            return counts, content
        state = tmp / ".tokenizing-state.pkl"
        with open(state, "wb") as fh:
            pickle.dump((corpus, tokenizer, dtype), fh)
        pending: deque = deque()
        for i in range(n):
            pending.append(pool.submit(_tokenize_in_worker, str(state), i))
            if len(pending) >= IN_FLIGHT_PER_WORKER * workers:
                write(i - len(pending) + 1, pending.popleft().result())
        for j in range(n - len(pending), n):
            write(j, pending.popleft().result())
        state.unlink()
    return counts, content


def _manifest(cfg: PrepareConfig, corpus: _Corpus, filters: DocumentFilter, tokenizer, dtype, tmp: Path,
              counts: np.ndarray, content: ContentStats, tokenizer_source: Path | None = None) -> dict:
    """The manifest of the prepared files in `tmp`: sources and licences, tokenizer, split, totals,
    filters, drops, languages and domains, and every file."""
    entries = corpus.entries
    totals = {f"{split}_tokens": sum(e["tokens"][split] for e in entries) for split in ("train", "val")}
    # Cross-entropy of the val split under the train split's unigram distribution (add-one
    # smoothed): the loss a model gets from token frequencies alone, the bar training must clear.
    val = np.fromfile(tmp / "val.bin", dtype=dtype)
    logp = np.log((counts + 1) / (counts.sum() + len(counts)))
    unigram = float(-np.mean(logp[val]))
    tok_spec = tokenizer_spec(tokenizer, tmp)  # the file's path is not part of it: the same file anywhere is the same
    return {
        "format": MANIFEST_FORMAT,
        "sources": [
            {"kind": s.kind, "root": str(s.root), "license": s.license,
             "train_tokens": sum(e["tokens"]["train"] for e in entries if e["source"] == i)}
            | ({"python": sys.version.split()[0], "note": "Python standard library source, tests excluded"}
               if s.kind == "stdlib" else {})
            for i, s in enumerate(corpus.sources)
        ],
        **({"mixture": {"per": cfg.mix_per, "given": list(cfg.mix),
                        "unit": "weights given as shares of " + ("training tokens" if cfg.mix_per == "tokens" else
                                                                "documents (sampled as tokens, through each source's "
                                                                "mean document length)"),
                        "rule": "each training window draws its source by weight, then its start within that "
                                "source's tokens (effllm.data.TokenDataset.train_batch)"}} if cfg.mix else {}),
        "tokenizer": tok_spec,
        **({"tokenizer_source": str(tokenizer_source)} if tokenizer_source is not None else {}),
        "dtype": np.dtype(dtype).name,
        "split": {"rule": SPLIT_RULE, "val_fraction": cfg.val_fraction, "document_id": "path relative to "
                  "its source root, plus ':line' for a jsonl record or ':row' (from 1) for a Parquet / Arrow row"}
        | ({"forced_val": corpus.forced_val, "forced_rule": "the rule put no document in val, so the one with "
            "the lowest hash went there"} if corpus.forced_val else {}),
        "totals": {"files": len(entries), "documents": sum(corpus.n_docs.values()),
                   "bytes": sum(e["bytes"] for e in entries), **totals,
                   "unigram_val_loss": round(unigram, 6)},
        "filters": filters.manifest(cfg.near_dup_threshold),
        "dropped": filters.dropped,
        "content": content.manifest(),
        **({"collection": content.collection()} if cfg.date_field else {}),
        "files": entries,
        "skipped": corpus.skipped,
    }


def prepare(cfg: PrepareConfig, progress: bool = True) -> Path:
    """Tokenize the sources of `cfg` into `cfg.out`; returns the output directory."""
    if not 0 < cfg.val_fraction < 1:
        raise ConfigError(f"val_fraction={cfg.val_fraction} cannot work — use a share in (0, 1), e.g. 0.01 (1% of "
                          "the documents for validation)")
    if cfg.tokenizer not in ("byte", "bpe") and not Path(cfg.tokenizer).is_file():
        raise ConfigError(f"--tokenizer {cfg.tokenizer}: neither 'byte', 'bpe' nor an existing file — pass byte, bpe, "
                          "or the path of a tokenizers file (e.g. a checkpoint's tokenizer.json)")
    if cfg.eot_token is not None and cfg.tokenizer in ("byte", "bpe"):
        raise ConfigError(f"--eot-token is read with a tokenizer file only; the {cfg.tokenizer} tokenizer ends documents "
                          "with its own id 0: drop --eot-token, or pass --tokenizer path/to/tokenizer.json")
    if cfg.tokenizer == "bpe" and not 256 < cfg.vocab_size < 2**31:
        raise ConfigError(f"vocab_size={cfg.vocab_size} cannot work for a BPE — use more than the 256 byte symbols, "
                          "e.g. 4096")
    if cfg.workers < 0:
        raise ConfigError(f"workers={cfg.workers} cannot work — use a number of processes, or 0 for one per core")
    licence_list(cfg.allow_licenses)  # a typo in a licence id fails here, before any work
    if cfg.mix and len(cfg.mix) != max(1, len(cfg.sources)):
        raise ConfigError(f"--mix has {len(cfg.mix)} weights for {max(1, len(cfg.sources))} sources: give one weight per "
                          "source, in --sources order (e.g. --sources a/ b.jsonl --mix 0.7 0.3)")
    if cfg.mix and not (all(w >= 0 for w in cfg.mix) and sum(cfg.mix) > 0):
        raise ConfigError(f"--mix {' '.join(map(str, cfg.mix))} cannot work: use non-negative weights, one positive")
    out = resolved(cfg.out)
    given = [split_source_spec(spec, cfg.license)[0] for spec in cfg.sources] or [stdlib_root()]
    refuse_overlap(out, given)
    if cfg.opt_out:
        refuse_overlap(out, [cfg.opt_out], what="opt-out file")
    claim_output_dir(out, writer="effllm prepare", owned=PREPARED_FILES, is_ours=is_prepared, overwrite=cfg.overwrite)
    extensions = tuple(e if e.startswith(".") else f".{e}" for e in cfg.extensions)  # --extensions txt or .txt
    sources = user_sources(cfg.sources, cfg.license, extensions) if cfg.sources else [stdlib_source()]
    if not any(s.files for s in sources):
        raise DataError("no source files found")
    workers = tokenizing_workers(cfg, sum(f.path.stat().st_size for s in sources for f in s.files))
    with _pool(workers) if workers > 1 else contextlib.nullcontext() as pool:
        return _prepare(cfg, out, sources, progress, pool, workers)


def _prepare(cfg: PrepareConfig, out: Path, sources: list[Source], progress: bool, pool, workers: int) -> Path:
    """The passes of `prepare`, once its checks are done (the tokenizing processes, if any, starting)."""
    filters = DocumentFilter(cfg.allow_licenses, cfg.opt_out, cfg.near_dup_threshold)
    corpus = _read(cfg, sources, filters, progress)

    # Pass 2 (BPE only): learn merges from the train split alone, so val stays unseen.
    source = None if cfg.tokenizer in ("byte", "bpe") else resolved(cfg.tokenizer)
    if cfg.tokenizer == "byte":
        tokenizer = ByteTokenizer()
    elif source is not None:
        tokenizer = FileTokenizer.open(source, cfg.eot_token)
    else:
        train_texts = (text for i in range(len(corpus.files)) for _, text, _, _ in corpus.documents(i, "train"))
        tokenizer = BPETokenizer.train(train_texts, cfg.vocab_size)
    dtype = np.uint16 if tokenizer.vocab_size <= 2**16 else np.uint32

    tmp = new_temp_dir(out)  # replaces `out` only once complete, removed on failure
    try:
        counts, content = _tokenize(corpus, tokenizer, dtype, tmp, progress, pool, workers)
        tokenizer.save(tmp, source) if source is not None else tokenizer.save(tmp)
        manifest = _manifest(cfg, corpus, filters, tokenizer, dtype, tmp, counts, content, source)
        shares = mixture_weights(manifest)  # a weighted source that kept no training tokens fails here
        if shares is not None:
            manifest["mixture"]["token_shares"] = [float(w) for w in shares]
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n")
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    replace_dir(tmp, out)
    return out
