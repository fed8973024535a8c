"""The loader of prepared data (effllm/prepare.py writes it): `TokenDataset`.

A prepared directory holds train.bin and val.bin (flat token ids, one end-of-text token after each
document), manifest.json (sources, licences, tokenizer, totals) and, for a BPE, tokenizer.json.
`TokenDataset.train_batch` is deterministic in (seed, step, rank, micro-step), so a resumed run
sees exactly the batches of an uninterrupted one; `val_batches` gives the same windows at every
evaluation.

Mixtures: prepare writes each source's documents contiguously, in the sources' order, so source i
holds a known range of train.bin (`source_ranges`). Without a mixture a window starts anywhere in
train.bin, so each source is sampled in proportion to its tokens. With one (`prepare --mix` in the
manifest, or the run's `--data-mix` over it: per-source shares of the training tokens), each
window first draws its source by weight, then its start within that source's range, from the same
seeded generator: still a pure function of (seed, step, rank, micro-step) and the weights. The val
split is not reweighted: it stays the data's own mixture, the same windows at every evaluation.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

from effllm.errors import DataError
from effllm.fsutil import sha256_file
from effllm.tokenizer import load_tokenizer

MANIFEST_FORMAT = "effllm-tokens/1"


def source_ranges(manifest: dict) -> list[tuple[int, int]]:
    """[start, end) of each source's tokens in train.bin (prepare writes the sources' files in order)."""
    order = [f["source"] for f in manifest["files"]]
    if order != sorted(order):
        raise DataError("the manifest's files are not in their sources' order: re-run `effllm prepare`")
    sizes = [0] * len(manifest["sources"])
    for f in manifest["files"]:
        sizes[f["source"]] += f["tokens"]["train"]
    starts = np.concatenate(([0], np.cumsum(sizes)[:-1])).astype(np.int64)
    return [(int(a), int(a + n)) for a, n in zip(starts, sizes)]


def source_names(manifest: dict) -> list[str]:
    """A short name per source: its folder's name, or its file's name when it is a single file
    (never a local path)."""
    files = [[f["path"] for f in manifest["files"] if f["source"] == i] for i in range(len(manifest["sources"]))]
    return [Path(fs[0]).name if s.get("kind") == "files" and len(fs) == 1 else Path(s["root"]).name
            for s, fs in zip(manifest["sources"], files)]


def _mean_document_tokens(manifest: dict) -> np.ndarray:
    """Each source's tokens per kept document (both splits)."""
    tokens = np.zeros(len(manifest["sources"]))
    docs = np.zeros(len(manifest["sources"]))
    for f in manifest["files"]:
        tokens[f["source"]] += f["tokens"]["train"] + f["tokens"]["val"]
        docs[f["source"]] += f.get("documents", 0)
    return np.divide(tokens, docs, out=np.zeros_like(tokens), where=docs > 0)


def mixture_weights(manifest: dict, given: tuple[float, ...] | list[float] = (), per: str = "tokens") -> np.ndarray | None:
    """The per-source shares of the training tokens to sample, normalized: from `given` (a run's
    --data-mix, weights `per` "tokens" or "documents"), else the manifest's own mixture (prepare
    --mix); None for none (each source in proportion to its tokens). Weights per document become
    token shares through each source's mean document length. Weights that cannot work are refused,
    naming the sources."""
    if not given:
        mixture = manifest.get("mixture") or {}
        given, per = mixture.get("given") or mixture.get("weights") or [], mixture.get("per", "tokens")
    weights = list(given)
    if not weights:
        return None
    if per not in ("tokens", "documents"):
        raise DataError(f"mixture weights per {per!r}: give them per 'tokens' or per 'documents'")
    names = source_names(manifest)
    if len(weights) != len(names):
        raise DataError(f"{len(weights)} mixture weights for the {len(names)} sources of the data ({', '.join(names)}): "
                        "give one weight per source, in the manifest's order")
    w = np.asarray(weights, dtype=np.float64)
    if not (np.isfinite(w).all() and (w >= 0).all() and w.sum() > 0):
        raise DataError(f"mixture weights {list(weights)} cannot work: use non-negative numbers, at least one positive")
    empty = [n for n, wi, (a, b) in zip(names, w, source_ranges(manifest)) if wi > 0 and b == a]
    if empty:
        raise DataError(f"source(s) {', '.join(empty)} have a positive mixture weight but no training tokens: give "
                        "them weight 0")
    if per == "documents":
        w = w * _mean_document_tokens(manifest)
    return w / w.sum()


def mixture_rows(manifest: dict, given: tuple[float, ...] | list[float], tokens_seen: int,
                 per: str = "tokens") -> list[dict] | None:
    """Per source, for a run that has seen `tokens_seen` tokens: its name, share of the tokens drawn,
    training tokens, the tokens and documents drawn from it (expected: share x tokens seen, and
    that over its mean document length) and the epochs those make; None without a mixture."""
    w = mixture_weights(manifest, given, per)
    if w is None:
        return None
    rows = []
    for name, wi, (a, b), doc in zip(source_names(manifest), w, source_ranges(manifest),
                                     _mean_document_tokens(manifest)):
        seen = float(wi) * tokens_seen
        rows.append({"source": name, "weight": float(wi), "train_tokens": b - a, "tokens_seen": round(seen),
                     "documents_seen": round(seen / doc) if doc else 0, "epochs": seen / (b - a) if b > a else 0.0})
    return rows


class TokenDataset:
    """A prepared directory: manifest, tokenizer, and memory-mapped train / val tokens; `mix`, if
    given, the per-source sampling weights (per `mix_per`: "tokens" or "documents"; else the
    manifest's mixture)."""

    def __init__(self, directory: str | Path, mix: tuple[float, ...] = (), mix_per: str = "tokens"):
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
        self.mix = mixture_weights(self.manifest, mix, mix_per)
        ranges = np.asarray(source_ranges(self.manifest), dtype=np.int64)
        self.source_starts, self.source_tokens = ranges[:, 0], ranges[:, 1] - ranges[:, 0]

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.vocab_size

    def check_seq_len(self, seq_len: int) -> None:
        """Fail early when a split, or a source the mixture samples, is too short for one window of
        seq_len + 1 tokens."""
        if self.mix is not None:
            short = [(name, int(n)) for name, w, n in zip(source_names(self.manifest), self.mix, self.source_tokens)
                     if w > 0 and n < seq_len + 1]
            if short:
                raise DataError(f"the mixture samples windows of seq_len + 1 = {seq_len + 1} tokens within each source, "
                                f"and {', '.join(f'{n} has {t}' for n, t in short)} training tokens: give it weight 0, "
                                "lower seq_len, or add to it")
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
        if self.mix is None:
            offsets = rng.integers(0, len(data) - seq_len, size=batch_size)
        else:  # each window's source by weight, then its start within that source's tokens
            src = rng.choice(len(self.mix), size=batch_size, p=self.mix)
            span = self.source_tokens[src] - seq_len
            offsets = self.source_starts[src] + np.minimum((rng.random(batch_size) * span).astype(np.int64), span - 1)
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

