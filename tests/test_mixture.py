"""Data mixtures: per-source sampling weights (`prepare --mix`, a run's `--data-mix`).

Two sources whose texts use disjoint letters, so each window tells which source it came from.
The shares drawn match the weights, windows never straddle two sources, batches stay a pure
function of (seed, step, rank, micro-step), and a resumed run repeats the uninterrupted one.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from helpers import tiny_train_config

from effllm.data import TokenDataset, mixture_rows
from effllm.errors import ConfigError, DataError
from effllm.prepare import PrepareConfig, prepare
from effllm.train import train


def two_sources(tmp_path):
    """Source "big" of a-words (about 4x the tokens of) source "small" of b-words."""
    big, small = tmp_path / "big", tmp_path / "small"
    big.mkdir(parents=True)
    small.mkdir()
    rng = np.random.default_rng(0)  # word lengths at random: no two documents alike (duplicates are dropped)
    for i in range(40):
        (big / f"{i:02d}.txt").write_text(" ".join("a" * n for n in rng.integers(1, 6, 120)))
    for i in range(10):
        (small / f"{i:02d}.txt").write_text(" ".join("b" * n for n in rng.integers(1, 6, 120)))
    return big, small


def prepared(tmp_path, mix=(), name="d"):
    big, small = two_sources(tmp_path)
    return prepare(PrepareConfig(sources=(f"{big}=MIT", f"{small}=CC0-1.0"), out=str(tmp_path / name), mix=mix,
                                 val_fraction=0.1), progress=False)


def share_of_small(ds: TokenDataset, steps: int = 400, seq_len: int = 16) -> float:
    from_small = 0
    for step in range(steps):
        x, _ = ds.train_batch(8, seq_len, seed=3, step=step)
        for row in x.tolist():
            letters = {chr(t) for t in row} - {" ", "\x00"}
            assert len(letters) == 1, letters  # a window lies within one source
            from_small += letters == {"b"}
    return from_small / (steps * 8)


def test_windows_are_drawn_by_the_weights_and_within_one_source(tmp_path):
    data = prepared(tmp_path, mix=(1, 1))
    manifest = json.loads((data / "manifest.json").read_text())
    assert manifest["mixture"]["token_shares"] == [0.5, 0.5] and manifest["mixture"]["given"] == [1, 1]
    big_tokens, small_tokens = (s["train_tokens"] for s in manifest["sources"])
    assert 3 < big_tokens / small_tokens < 5
    assert abs(share_of_small(TokenDataset(data)) - 0.5) < 0.04  # 3,200 windows: sd 0.009
    assert abs(share_of_small(TokenDataset(data, (0.9, 0.1))) - 0.1) < 0.03  # a run's --data-mix overrides
    # without a mixture each source is drawn by its size (and windows may straddle the boundary, rarely)
    natural = TokenDataset(prepared(tmp_path / "n"))
    x = np.concatenate([natural.train_batch(8, 16, 3, s)[0].numpy() for s in range(400)])
    small_share = np.mean([(row == ord("b")).any() and not (row == ord("a")).any() for row in x])
    assert abs(small_share - small_tokens / (big_tokens + small_tokens)) < 0.04


def test_weights_per_document_sample_each_source_by_its_documents(tmp_path):
    """--mix-per documents: equal weights draw equal numbers of documents, so token shares follow
    the sources' mean document lengths (here "long" documents are 4x "short" ones)."""
    long, short = tmp_path / "long", tmp_path / "short"
    long.mkdir()
    short.mkdir()
    rng = np.random.default_rng(1)
    for i in range(20):
        (long / f"{i}.txt").write_text(" ".join("a" * n for n in rng.integers(1, 6, 400)))
        (short / f"{i}.txt").write_text(" ".join("b" * n for n in rng.integers(1, 6, 100)))
    data = prepare(PrepareConfig(sources=(f"{long}=MIT", f"{short}=MIT"), out=str(tmp_path / "d"), mix=(1, 1),
                                 mix_per="documents", val_fraction=0.1), progress=False)
    manifest = json.loads((data / "manifest.json").read_text())
    tokens = [sum(f["tokens"]["train"] + f["tokens"]["val"] for f in manifest["files"] if f["source"] == s) for s in (0, 1)]
    want = tokens[1] / sum(tokens)  # equal documents: each source's share of tokens is its share of all text
    assert manifest["mixture"]["per"] == "documents"
    assert manifest["mixture"]["token_shares"][1] == pytest.approx(want)
    assert abs(share_of_small(TokenDataset(data)) - want) < 0.04
    rows = mixture_rows(manifest, (), 10_000)
    assert rows[0]["documents_seen"] == pytest.approx(rows[1]["documents_seen"], rel=0.02)
    # the same weights per token: half the tokens each
    assert TokenDataset(data, (1, 1), "tokens").mix.tolist() == [0.5, 0.5]


def test_mixed_batches_are_a_pure_function_of_their_numbers(tmp_path):
    ds = TokenDataset(prepared(tmp_path, mix=(0.3, 0.7)))
    a = ds.train_batch(4, 16, seed=1, step=7, rank=1, micro=2)
    b = TokenDataset(ds.dir).train_batch(4, 16, seed=1, step=7, rank=1, micro=2)
    assert all((p == q).all() for p, q in zip(a, b))
    c = ds.train_batch(4, 16, seed=1, step=8, rank=1, micro=2)
    assert not (a[0] == c[0]).all()


def test_a_mixed_run_resumes_exactly_and_its_card_and_summary_show_the_mixture(tmp_path):
    data = prepared(tmp_path, mix=(1, 3))
    full = train(tiny_train_config(data, tmp_path / "full", max_steps=4, ckpt_interval=2, eval_interval=2,
                                   data_mix=(0.25, 0.75)))
    train(tiny_train_config(data, tmp_path / "part", max_steps=2, ckpt_interval=2, eval_interval=2,
                            data_mix=(0.25, 0.75)))
    resumed = train(tiny_train_config(data, tmp_path / "part", max_steps=4, ckpt_interval=2, eval_interval=2,
                                      resume=True))
    assert resumed["final_train_loss"] == full["final_train_loss"]
    rows = full["data_mix"]
    assert [r["source"] for r in rows] == ["big", "small"] and [r["weight"] for r in rows] == [0.25, 0.75]
    assert rows[1]["tokens_seen"] == round(0.75 * full["tokens_seen"])
    assert rows[1]["epochs"] == pytest.approx(0.75 * full["tokens_seen"] / rows[1]["train_tokens"])
    card = (tmp_path / "full" / "MODEL_CARD.md").read_text()
    assert "### Sampling mixture" in card and "the run's --data-mix" in card and "| small | 75.0% |" in card


def test_mixtures_that_cannot_work_are_refused_before_any_work(tmp_path):
    big, small = two_sources(tmp_path)
    srcs = (f"{big}=MIT", f"{small}=MIT")
    with pytest.raises(ConfigError, match="--mix has 3 weights for 2 sources"):
        prepare(PrepareConfig(sources=srcs, out=str(tmp_path / "x"), mix=(1, 2, 3)))
    with pytest.raises(ConfigError, match="non-negative weights"):
        prepare(PrepareConfig(sources=srcs, out=str(tmp_path / "x"), mix=(1, -1)))
    assert not (tmp_path / "x").exists()
    data = prepared(tmp_path / "ok")
    with pytest.raises(DataError, match="3 mixture weights for the 2 sources of the data \\(big, small\\)"):
        TokenDataset(data, (1, 1, 1))
    small = json.loads((data / "manifest.json").read_text())["sources"][1]["train_tokens"]
    with pytest.raises(DataError, match=f"the mixture samples windows of seq_len \\+ 1 = {small + 1} tokens within each "
                                        f"source, and small has {small} training tokens"):
        TokenDataset(data, (0.5, 0.5)).check_seq_len(small)
    TokenDataset(data, (1.0, 0.0)).check_seq_len(small)  # a source of weight 0 is never sampled
    assert mixture_rows(json.loads((data / "manifest.json").read_text()), (), 100) is None
