"""The recipe pairs compare what their docstrings say they compare: a dense baseline with the same
active parameters and forward FLOPs per token as the DeepSeek-style model, and one with the same
total parameters (MTP modules, which plain inference drops, left out of the totals)."""

from __future__ import annotations

import pytest
import torch

from effllm.cli import load_recipe
from effllm.flops import forward_flops_per_token
from effllm.fp8 import convert_to_fp8
from effllm.model import Transformer


def sizes(name: str) -> tuple[dict, float]:
    cfg = load_recipe(name)
    with torch.device("meta"):
        counts = Transformer(cfg.model).param_counts()
    return counts, forward_flops_per_token(cfg.model, cfg.seq_len)


def close(a: float, b: float, tol: float) -> bool:
    return abs(a - b) / b <= tol


@pytest.mark.parametrize("deepseek,dense", [("deepseek_tiny", "dense_tiny"), ("moe_tiny", "dense_tiny"),
                                            ("deepseek_600m", "dense_120m")])
def test_equal_active_pairs(deepseek, dense):
    (ds, ds_flops), (dn, dn_flops) = sizes(deepseek), sizes(dense)
    assert close(ds["active"], dn["active"], 0.05) and close(ds_flops, dn_flops, 0.02)
    assert ds["total"] - ds["mtp"] > 2 * dn["total"]  # the sparse model holds far more parameters


@pytest.mark.parametrize("deepseek,dense,ratio", [("deepseek_tiny", "dense_tiny_wide", 2),
                                                  ("deepseek_600m", "dense_600m", 4)])
def test_equal_total_pairs(deepseek, dense, ratio):
    (ds, ds_flops), (dn, dn_flops) = sizes(deepseek), sizes(dense)
    assert close(ds["total"] - ds["mtp"], dn["total"], 0.01)
    assert dn_flops > ratio * ds_flops


def test_fp8_recipe_converts_attention_and_dense_linears():
    cfg = load_recipe("deepseek_tiny_fp8")
    assert cfg.fp8
    report = convert_to_fp8(Transformer(cfg.model))
    assert {"blocks.0.attn.wq", "blocks.0.attn.wkv_b", "blocks.0.attn.wo", "blocks.0.ffn.w1",
            "blocks.1.ffn.shared.w2", "mtp.0.proj"} <= set(report["converted"])
    assert "not a multiple of 128" in report["skipped"]["blocks.0.attn.wkv_a"]
