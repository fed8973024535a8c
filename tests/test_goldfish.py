"""Goldfish loss: the dropped positions are a function of the preceding h tokens alone, about 1/k
of them drop, and the trainer leaves them out of the loss."""

from __future__ import annotations

import json

import pytest
import torch
from helpers import tiny_train_config

from effllm import ConfigError
from effllm.goldfish import apply_goldfish, goldfish_drop
from effllm.train import train


def test_about_one_in_k_positions_drop():
    x = torch.randint(0, 256, (64, 2048), generator=torch.Generator().manual_seed(0))
    for k in (2, 4, 8):
        rate = goldfish_drop(x, k, 13)[:, 12:].float().mean().item()
        assert abs(rate - 1 / k) < 0.01, (k, rate)  # 130k positions: sampling error ~0.002


def test_the_same_text_drops_the_same_positions_wherever_it_stands():
    text = torch.randint(0, 256, (300,), generator=torch.Generator().manual_seed(1))
    h = 5
    a = goldfish_drop(text[None, :200], 3, h)[0]  # one window
    b = goldfish_drop(text[None, 50:250], 3, h)[0]  # another window, shifted by 50
    # positions with h tokens of context inside both windows agree
    assert torch.equal(a[50 + h - 1:], b[h - 1:150])
    assert not a[: h - 1].any() and not b[: h - 1].any()  # too little context: always kept
    assert a.any() and not a.all()
    # and the decision depends on the context: change one token, the next h positions may change
    c = text.clone()
    c[100] = (c[100] + 1) % 256
    d = goldfish_drop(c[None, :200], 3, h)[0]
    assert torch.equal(a[: 100], d[: 100]) and torch.equal(a[100 + h:], d[100 + h:])


def test_dropped_targets_become_the_ignore_index():
    x = torch.randint(0, 256, (4, 64), generator=torch.Generator().manual_seed(2))
    y = torch.randint(0, 256, (4, 64), generator=torch.Generator().manual_seed(3))
    masked = apply_goldfish(x, y, 4, 3)
    drop = goldfish_drop(x, 4, 3)
    assert (masked[drop] == -1).all() and torch.equal(masked[~drop], y[~drop])
    with pytest.raises(ValueError, match="k >= 2"):
        goldfish_drop(x, 1, 3)


def test_trainer_trains_with_goldfish_loss(byte_data, tmp_path):
    with pytest.raises(ConfigError, match="drop every token"):
        tiny_train_config(byte_data, tmp_path / "bad", goldfish_k=1)
    summary = train(tiny_train_config(byte_data, tmp_path / "run", goldfish_k=4, goldfish_h=8, max_steps=8))
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in records)
    assert summary["final_val_loss"] < records[0]["loss"]  # it learns; validation uses every token
