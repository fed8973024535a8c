"""The loader of prepared data (effllm/prepare.py writes it): `TokenDataset`.

A prepared directory holds train.bin and val.bin (flat token ids, one end-of-text token after each
document), manifest.json (sources, licences, tokenizer, totals) and, for a BPE, tokenizer.json.
`TokenDataset.train_batch` is deterministic in (seed, step, rank, micro-step), so a resumed run
sees exactly the batches of an uninterrupted one; `val_batches` gives the same windows at every
evaluation.
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

