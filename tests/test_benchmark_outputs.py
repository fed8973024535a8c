"""Benchmark runs write to a folder of their own: never over the committed record unless asked."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
import common  # noqa: E402


def parser():
    return common.base_parser("doc", common.RESULTS_ROOT / "moe_layer", "quick")


def test_a_run_writes_a_new_folder_and_never_the_record_unless_asked(tmp_path, monkeypatch):
    monkeypatch.setattr(common, "RUNS_ROOT", tmp_path / "runs")
    args = common.parse_args(parser(), ["--quick"])
    assert args.out.parent == tmp_path / "runs" and args.out.name.startswith("moe_layer-")
    again = common.parse_args(parser(), ["--out", str(args.out)])  # a folder this benchmark wrote: reused
    assert again.out == args.out
    with pytest.raises(SystemExit):  # the committed record only through --update-record
        common.parse_args(parser(), ["--out", str(common.RESULTS_ROOT / "moe_layer")])
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "thesis.tex").write_text("x")
    with pytest.raises(SystemExit):
        common.parse_args(parser(), ["--out", str(mine)])
    assert sorted(p.name for p in mine.iterdir()) == ["thesis.tex"]
    monkeypatch.setattr(common, "git_commit", lambda: "abc1234-dirty")
    with pytest.raises(SystemExit):  # a record names a clean commit
        common.parse_args(parser(), ["--update-record"])
    monkeypatch.setattr(common, "git_commit", lambda: "abc1234")
    assert common.parse_args(parser(), ["--update-record"]).out == common.RESULTS_ROOT / "moe_layer"
    monkeypatch.setattr(common, "RESULTS_ROOT", tmp_path / "benchmarks" / "results")
    first = common.base_parser("doc", common.RESULTS_ROOT / "new_bench", "quick")  # no record yet: made
    assert common.parse_args(first, ["--update-record"]).out.is_dir()


@pytest.mark.parametrize("implementation", ["grouped_mm", "batched_mm", "eager"])
def test_the_moe_peer_computes_effllms_layer(implementation):
    """benchmarks/moe_layer.py times transformers' DeepseekV3MoE beside effllm's MoE: with the
    weights it copies over, the peer computes the same function, output and input gradient, so the
    comparison is of speed alone (groups, shared expert and a balancing bias included; odd sizes)."""
    pytest.importorskip("transformers")
    import moe_layer
    from helpers import REL_TOL, rel

    from effllm.moe import MoE, MoEConfig

    torch.manual_seed(0)
    layer = MoE(48, MoEConfig(n_routed_experts=8, top_k=3, expert_dim=24, n_shared_experts=1, n_group=2,
                              topk_group=1)).train()
    with torch.no_grad():
        layer.router.expert_bias.copy_(torch.randn(8) * 0.05)
    peer = moe_layer.transformers_peer(layer, implementation).train()
    x = torch.randn(37, 48)
    dy = torch.randn(37, 48)
    outs, grads = [], []
    for module in (layer, peer):
        xi = x.clone().requires_grad_()
        out = module(xi)
        out.backward(dy)
        outs.append(out.detach())
        grads.append(xi.grad)
    assert rel(outs[1], outs[0]) < REL_TOL[torch.float32]
    assert rel(grads[1], grads[0]) < REL_TOL[torch.float32]


def test_the_step_peer_holds_effllms_weights():
    """benchmarks/peer_step.py times transformers' DeepseekV3ForCausalLM beside effllm's model: its
    in-memory copy of the weights (the export's mapping, experts fused as transformers holds them)
    gives effllm's logits."""
    pytest.importorskip("transformers")
    import peer_step
    from helpers import perturbed_model, rel

    from effllm.mla import MLAConfig
    from effllm.model import ModelConfig
    from effllm.moe import MoEConfig

    cfg = ModelConfig(vocab_size=96, dim=64, n_layers=3, n_heads=4, max_seq_len=64, attention="mla",
                      mla=MLAConfig(n_heads=4, q_lora_rank=0, kv_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=8,
                                    v_head_dim=16),
                      ffn="moe", first_k_dense=1, moe=MoEConfig(n_routed_experts=6, top_k=2, expert_dim=24))
    model = perturbed_model(cfg).eval()
    peer = peer_step.peer_of(model, "eager").eval()
    x = torch.randint(0, 96, (2, 29), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert rel(peer(x).logits, model(x)[0]) < 1e-5
