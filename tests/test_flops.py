"""effllm.flops against a count of the matrix products an actual forward pass runs
(torch.utils.flop_counter), for dense MHA/GQA, MoE, MLA and MTP models.

The counter sees what runs, so attention runs on SDPA's math backend for it (the fused CPU kernel has
no FLOP formula in the counter); the experts' grouped GEMMs are counted by the formula their custom
operator registers (kernels/grouped_gemm.py), whichever backend runs them. It counts every query against every key,
while effllm counts the causal half: the expected figure adds that difference back, layer by layer,
and nothing else.
"""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from helpers import full_attention_extra
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from effllm import flops
from effllm.mla import MLAConfig
from effllm.model import ModelConfig, Transformer
from effllm.moe import MoEConfig

BASE = ModelConfig(vocab_size=96, dim=64, n_layers=3, n_heads=4, max_seq_len=64)
MOE = MoEConfig(n_routed_experts=8, top_k=2, expert_dim=32, n_shared_experts=1)
MLA = MLAConfig(n_heads=4, q_lora_rank=32, kv_lora_rank=24, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=12)
CASES = {
    "dense_mha": BASE,
    "dense_gqa": replace(BASE, n_kv_heads=2),
    "moe": replace(BASE, ffn="moe", moe=MOE, first_k_dense=1),
    "mla": replace(BASE, attention="mla", mla=MLA),
    "mla_moe_mtp": replace(BASE, attention="mla", mla=replace(MLA, q_lora_rank=0), ffn="moe", moe=MOE,
                           first_k_dense=1, mtp_depth=2),
}


@pytest.mark.parametrize("name", list(CASES))
def test_flops_per_token_match_the_counted_matmuls(name):
    cfg = CASES[name]
    B, T = 2, 33
    torch.manual_seed(0)
    model = Transformer(cfg)
    x, y = torch.randint(0, cfg.vocab_size, (2, B, T))
    with FlopCounterMode(display=False) as counter, sdpa_kernel(SDPBackend.MATH):
        model(x, y, return_aux=True)  # a training forward: the MTP depths run too
    counted = counter.get_total_flops() / (B * T)
    expected = flops.forward_flops_per_token(cfg, T) + cfg.n_layers * full_attention_extra(cfg, T)
    expected += flops.mtp_flops_per_token(cfg, T)
    expected += sum((T - k) / T * full_attention_extra(cfg, T - k) for k in range(1, cfg.mtp_depth + 1))
    assert counted == pytest.approx(expected, rel=1e-9)
    assert flops.train_flops_per_token(cfg, T) == pytest.approx(
        3 * (flops.forward_flops_per_token(cfg, T) + flops.mtp_flops_per_token(cfg, T)))
