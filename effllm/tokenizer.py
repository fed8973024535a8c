"""Tokenizers: UTF-8 bytes, a byte-level BPE trained on the train split (the `tokenizers` package),
or an existing `tokenizers` file (`FileTokenizer`: a tokenizer.json shipped with a checkpoint).

Each marks the end of a document with one id: `ByteTokenizer` byte NUL (id 0, removed from the
text), `BPETokenizer` its special token `<|endoftext|>` (id 0), `FileTokenizer` the file's own
end-of-document token (its eos, e.g. `</s>` or `<|end_of_text|>`). `load_tokenizer` opens the one
a manifest or a checkpoint describes.
"""

from __future__ import annotations

import json
import re
import shutil
from collections.abc import Iterator
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from effllm.errors import DataError
from effllm.fsutil import sha256_file

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


# End-of-document tokens of widely used tokenizers, for a file whose tokenizer_config.json does not say.
KNOWN_EOT = ("<|endoftext|>", "</s>", "<|end_of_text|>", "<eos>", "<|end▁of▁sentence|>")
_BYTE_FALLBACK = re.compile(r"<0x[0-9A-Fa-f]{2}>")


class FileTokenizer(BPETokenizer):
    """An existing `tokenizers` file (tokenizer.json: Llama, GPT-2, DeepSeek, ... as shipped with a
    checkpoint), used as it is, with its own special token `eot_token` (id `eot_id`) ending each
    document. Text is encoded without the file's template tokens (no BOS per document: the
    end-of-document token separates documents, as in effllm's other tokenizers)."""

    kind = "file"

    def __init__(self, tokenizer, eot_token: str):
        super().__init__(tokenizer)
        self.vocab_size = tokenizer.get_vocab_size(with_added_tokens=True)
        eot_id = tokenizer.token_to_id(eot_token)
        if eot_id is None:
            raise DataError(f"the end-of-document token {eot_token!r} is not in the tokenizer's vocabulary: pass one "
                            "of its special tokens with --eot-token")
        self.eot_token, self.eot_id = eot_token, eot_id

    @classmethod
    def open(cls, path: str | Path, eot_token: str | None = None) -> "FileTokenizer":
        """The tokenizer in file `path`, ending documents with `eot_token`; None = the eos_token of
        the tokenizer_config.json beside the file, else the one of KNOWN_EOT the file has."""
        path = Path(path)
        if not path.is_file():
            raise DataError(f"tokenizer file {path} does not exist: pass a tokenizers file (tokenizer.json)")
        try:
            tok = Tokenizer.from_file(str(path))
        except Exception as e:  # tokenizers raises a bare Exception for a file it cannot parse
            raise DataError(f"{path} is not a tokenizers file ({e}): pass a tokenizer.json that the `tokenizers` "
                            "package (transformers' fast tokenizers) reads") from None
        return cls(tok, eot_token or default_eot(tok, path))

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def encode_array(self, texts: list[str]) -> list[np.ndarray]:
        return [np.asarray(e.ids, dtype=np.int64) for e in self._tok.encode_batch(texts, add_special_tokens=False)]

    def token_bytes(self) -> np.ndarray:
        """Text bytes each id stands for. Byte-level files (GPT-2, Llama 3, DeepSeek) spell each token
        one character per byte, as effllm's BPE does: exact. Others (SentencePiece-style, e.g. Llama
        2's) are measured by decoding each token after a fixed one, so a word-initial space counts;
        byte-fallback tokens (<0x0A>) count one byte, special tokens none."""
        if self._is_byte_level():
            return super().token_bytes()
        special = {t.content for t in self._tok.get_added_tokens_decoder().values()}
        pivot = self._tok.encode("a", add_special_tokens=False).ids[:1]
        base = len(self._tok.decode(pivot).encode())
        out = np.zeros(self.vocab_size, dtype=np.int64)
        ids = range(self.vocab_size)
        texts = self._tok.decode_batch([pivot + [i] for i in ids], skip_special_tokens=False)
        for i, text in zip(ids, texts):
            token = self._tok.id_to_token(i)
            if token is None or token in special:
                continue
            out[i] = 1 if _BYTE_FALLBACK.fullmatch(token) else max(0, len(text.encode()) - base)
        return out

    def _is_byte_level(self) -> bool:
        decoder = json.loads(self._tok.to_str()).get("decoder") or {}
        kinds = [decoder.get("type")] + [d.get("type") for d in decoder.get("decoders", [])]
        return "ByteLevel" in kinds

    def save(self, directory: Path, source: Path | None = None) -> None:
        """The file itself, byte for byte (its sha256 is the source's)."""
        if source is not None:
            shutil.copyfile(source, directory / "tokenizer.json")
        else:
            self._tok.save(str(directory / "tokenizer.json"))


def default_eot(tok, path: Path) -> str:
    """A tokenizer file's end-of-document token: tokenizer_config.json's eos_token beside it, else the
    one token of KNOWN_EOT among its special tokens; otherwise the user must name it."""
    config = path.with_name("tokenizer_config.json")
    if config.is_file():
        eos = json.loads(config.read_text()).get("eos_token")
        eos = eos.get("content") if isinstance(eos, dict) else eos
        if eos:
            return eos
    special = [t.content for t in tok.get_added_tokens_decoder().values() if t.special]
    known = [t for t in KNOWN_EOT if t in special]
    if len(known) == 1:
        return known[0]
    raise DataError(f"{path}: cannot tell which special token ends a document (no tokenizer_config.json with an "
                    f"eos_token beside it; special tokens {special[:8]}) — pass it with --eot-token, e.g. "
                    f"--eot-token '{special[0] if special else '</s>'}'")


def tokenizer_spec(tokenizer, directory: Path) -> dict:
    """The manifest's (and checkpoints') record of `tokenizer`, whose file, if any, is in `directory`."""
    spec = {"kind": tokenizer.kind, "vocab_size": tokenizer.vocab_size, "eot_id": tokenizer.eot_id}
    if tokenizer.kind in ("bpe", "file"):
        spec |= {"file": "tokenizer.json", "sha256": sha256_file(directory / "tokenizer.json")}
    if tokenizer.kind == "file":
        spec["eot_token"] = tokenizer.eot_token
    return spec


def same_tokenizer(a: dict | None, b: dict | None) -> bool:
    """Whether two tokenizer specs encode alike: both byte-level, or the same file (sha256) with the
    same end-of-document id, whatever their kind ("bpe" trained here or "file" given)."""
    if not a or not b:
        return False
    if a["kind"] == "byte" or b["kind"] == "byte":
        return a["kind"] == b["kind"]
    return a.get("sha256") == b.get("sha256") and a["eot_id"] == b["eot_id"]


def load_tokenizer(directory: str | Path, spec: dict):
    """The tokenizer a manifest (or checkpoint) `spec` describes, reading its file from `directory`."""
    if spec["kind"] == "byte":
        return ByteTokenizer()
    if spec["kind"] in ("bpe", "file"):
        path = Path(directory) / spec["file"]
        if not path.is_file():
            raise DataError(f"tokenizer file {path} is missing: re-run `effllm prepare` for this data")
        if spec.get("sha256") and sha256_file(path) != spec["sha256"]:
            raise DataError(f"tokenizer file {path} is not the one recorded (its sha256 differs): restore it, or "
                            "re-run `effllm prepare`")
        return BPETokenizer.load(path) if spec["kind"] == "bpe" else FileTokenizer(Tokenizer.from_file(str(path)),
                                                                                  spec["eot_token"])
    raise DataError(f"unknown tokenizer kind {spec['kind']!r} in {directory}")
