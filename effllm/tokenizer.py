"""Tokenizers: UTF-8 bytes, or a byte-level BPE trained on the train split (the `tokenizers` package).

Both mark the end of a document with id 0 (`ByteTokenizer`: byte NUL, removed from the text;
`BPETokenizer`: the special token `<|endoftext|>`). `load_tokenizer` opens the one a manifest or a
checkpoint describes.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from effllm.errors import DataError

EOT_TEXT = "<|endoftext|>"


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

    def token_bytes(self) -> np.ndarray:
        """Text bytes each id stands for: 1, and 0 for the end-of-text mark (bits per byte counts text)."""
        out = np.ones(256, dtype=np.int64)
        out[self.eot_id] = 0
        return out

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
        return cls(Tokenizer.from_file(str(path)))

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text).ids

    def encode_array(self, texts: list[str]) -> list[np.ndarray]:
        return [np.asarray(e.ids, dtype=np.int64) for e in self._tok.encode_batch(texts)]

    def decode(self, ids: list[int]) -> str:
        return self._tok.decode([i for i in ids if i != self.eot_id])

    def token_bytes(self) -> np.ndarray:
        """Text bytes each id stands for. Byte-level BPE spells every token in one character per
        byte, so a token's length is its byte count; special tokens (end-of-text) stand for none."""
        out = np.zeros(self.vocab_size, dtype=np.int64)
        special = {t.content for t in self._tok.get_added_tokens_decoder().values()}
        for token, i in self._tok.get_vocab(with_added_tokens=True).items():
            out[i] = 0 if token in special else len(token)
        return out

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
