"""An existing tokenizer: `effllm prepare --tokenizer path/to/tokenizer.json`.

The files are made here with the `tokenizers` package, in the two families checkpoints ship: a
byte-level BPE (GPT-2, Llama 3, DeepSeek) whose template adds a BOS token, with its eos named in a
tokenizer_config.json beside it; and a SentencePiece-style BPE (Metaspace, byte fallback, Llama 2's
kind) without one. Nothing is downloaded.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

from effllm.cli import main
from effllm.data import TokenDataset
from effllm.errors import ConfigError, DataError
from effllm.prepare import PrepareConfig, prepare
from effllm.tokenizer import FileTokenizer, load_tokenizer

TEXTS = [f"Document {i}: the quick brown fox jumps over {i} lazy dogs, ünïcode and spaces.\n" * 3 for i in range(30)]


def byte_level_file(folder: Path) -> Path:
    """A GPT-2-style tokenizer whose template puts <s> before every text, eos </s> per its config."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(TEXTS, trainers.BpeTrainer(vocab_size=400, special_tokens=["<pad>", "<s>", "</s>"],
                                                       initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                                       show_progress=False))
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    folder.mkdir(parents=True, exist_ok=True)
    tok.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({"eos_token": {"content": "</s>"}, "bos_token": "<s>"}))
    return folder / "tokenizer.json"


def metaspace_file(folder: Path) -> Path:
    """A SentencePiece-style BPE: spaces as ▁, byte-fallback tokens <0x00>..<0xFF> in its vocabulary
    (as Llama 2's), </s> special."""
    trained = Tokenizer(models.BPE())
    trained.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    trained.train_from_iterator(TEXTS, trainers.BpeTrainer(vocab_size=600, special_tokens=["<unk>", "<s>", "</s>"],
                                                           initial_alphabet=["▁"], show_progress=False))
    model = json.loads(trained.to_str())["model"]
    vocab = dict(model["vocab"])
    for b in range(256):
        vocab.setdefault(f"<0x{b:02X}>", len(vocab))
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in model["merges"]]
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, byte_fallback=True, unk_token="<unk>"))
    tok.normalizer = trained.normalizer
    tok.add_special_tokens(["<unk>", "<s>", "</s>"])
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                     decoders.Strip(" ", 1, 0)])
    folder.mkdir(parents=True, exist_ok=True)
    tok.save(str(folder / "tokenizer.json"))
    return folder / "tokenizer.json"


def corpus(tmp_path: Path) -> Path:
    path = tmp_path / "corpus.jsonl"
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in TEXTS))
    return path


def test_prepare_with_a_tokenizer_file_records_it_and_ends_documents_with_its_eos(tmp_path):
    file = byte_level_file(tmp_path / "ckpt")
    out = prepare(PrepareConfig(sources=(str(corpus(tmp_path)),), out=str(tmp_path / "data"), license="CC0-1.0",
                                tokenizer=str(file), val_fraction=0.2), progress=False)
    manifest = json.loads((out / "manifest.json").read_text())
    spec = manifest["tokenizer"]
    eos = Tokenizer.from_file(str(file)).token_to_id("</s>")
    assert spec["kind"] == "file" and spec["eot_token"] == "</s>" and spec["eot_id"] == eos
    assert spec["sha256"] == hashlib.sha256(file.read_bytes()).hexdigest()  # the file itself, byte for byte
    assert (out / "tokenizer.json").read_bytes() == file.read_bytes()
    assert manifest["tokenizer_source"] == str(file.resolve())
    ds = TokenDataset(out)
    ids = np.concatenate([ds.splits["train"], ds.splits["val"]]).astype(np.int64)
    assert (ids == eos).sum() == len(TEXTS) and 1 not in ids  # one eos per document, no template <s>
    tok = load_tokenizer(out, spec)
    docs = [tok.decode(d.tolist()) for d in np.split(ids, np.flatnonzero(ids == eos) + 1)[:-1]]
    assert sorted(docs) == sorted(TEXTS)
    # byte-level: each token's bytes are exact, so a document's tokens count its bytes
    lengths = tok.token_bytes()
    assert lengths[eos] == 0 and sum(lengths[i] for i in tok.encode(TEXTS[3])) == len(TEXTS[3].encode())


def test_a_sentencepiece_style_file_without_a_config_uses_its_known_eos_and_counts_bytes(tmp_path):
    file = metaspace_file(tmp_path / "sp")
    tok = FileTokenizer.open(file)
    assert tok.eot_token == "</s>"
    text = "the quick brown fox, ünïcode ✓"  # ✓ is in no merge: byte-fallback tokens
    ids = tok.encode(text)
    assert tok.decode(ids) == text
    assert any(Tokenizer.from_file(str(file)).id_to_token(i).startswith("<0x") for i in ids)
    # every token's bytes, decoded after a fixed token so a word-initial ▁ counts its space; the
    # text's first ▁ (the prepended one) is the one byte more
    assert sum(tok.token_bytes()[i] for i in ids) == len(text.encode()) + 1


def test_a_tokenizer_file_without_a_known_eos_must_be_told(tmp_path):
    file = tmp_path / "t" / "tokenizer.json"
    file.parent.mkdir()
    tok = Tokenizer(models.BPE())
    tok.add_special_tokens(["<|a|>", "<|b|>"])
    tok.save(str(file))
    with pytest.raises(DataError, match="--eot-token"):
        FileTokenizer.open(file)
    assert FileTokenizer.open(file, "<|b|>").eot_id == 1
    with pytest.raises(DataError, match="'<|c|>' is not in the tokenizer's vocabulary"):
        FileTokenizer.open(file, "<|c|>")


def test_bad_tokenizer_options_fail_before_any_work(tmp_path, capsys):
    src = corpus(tmp_path)
    with pytest.raises(ConfigError, match="neither 'byte', 'bpe' nor an existing file"):
        prepare(PrepareConfig(sources=(str(src),), out=str(tmp_path / "d"), license="MIT", tokenizer="gpt2"))
    with pytest.raises(ConfigError, match="--eot-token is read with a tokenizer file only"):
        prepare(PrepareConfig(sources=(str(src),), out=str(tmp_path / "d"), license="MIT", eot_token="</s>"))
    (tmp_path / "junk.json").write_text("{}")
    assert main(["prepare", "--sources", str(src), "--license", "MIT", "--out",
                 str(tmp_path / "d"), "--tokenizer", str(tmp_path / "junk.json")]) == 2
    assert "is not a tokenizers file" in capsys.readouterr().err
    assert not (tmp_path / "d").exists()


def test_a_changed_tokenizer_file_is_detected(tmp_path):
    file = byte_level_file(tmp_path / "ckpt")
    out = prepare(PrepareConfig(sources=(str(corpus(tmp_path)),), out=str(tmp_path / "data"), license="CC0-1.0",
                                tokenizer=str(file)), progress=False)
    spec = json.loads((out / "manifest.json").read_text())["tokenizer"]
    (out / "tokenizer.json").write_text((out / "tokenizer.json").read_text().replace("</s>", "</e>"))
    with pytest.raises(DataError, match="not the one recorded"):
        load_tokenizer(out, spec)


def test_a_run_on_a_tokenizer_file_starts_others_only_on_data_of_that_tokenizer(tmp_path, byte_data):
    """--init-from compares tokenizers by file (sha256) and end-of-document id, not by path: data
    prepared with a copy of the file elsewhere is the same tokenizer; byte-level data is refused,
    with the prepare command that fixes it."""
    from dataclasses import replace

    from helpers import tiny_train_config

    from effllm.train import train

    file = byte_level_file(tmp_path / "ckpt")
    src = corpus(tmp_path)
    data = prepare(PrepareConfig(sources=(str(src),), out=str(tmp_path / "data"), license="CC0-1.0",
                                 tokenizer=str(file), val_fraction=0.3), progress=False)
    base = tiny_train_config(data, tmp_path / "run", max_steps=2, seq_len=16, batch_size=2, eval_tokens=32)
    base = replace(base, model=replace(base.model, vocab_size=400))
    train(base)
    copy = byte_level_file(tmp_path / "elsewhere")  # the same bytes at another path
    assert copy.read_bytes() == file.read_bytes()
    data2 = prepare(PrepareConfig(sources=(str(src),), out=str(tmp_path / "data2"), license="CC0-1.0",
                                  tokenizer=str(copy), val_fraction=0.3), progress=False)
    train(replace(base, data_dir=str(data2), out_dir=str(tmp_path / "ft"), init_from=str(tmp_path / "run")))
    with pytest.raises(ConfigError, match=r"prepare the data with `effllm prepare --tokenizer .*tokenizer.json`"):
        train(replace(base, data_dir=str(byte_data), out_dir=str(tmp_path / "ft2"), init_from=str(tmp_path / "run")))
