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


@pytest.mark.parametrize("q_lora_rank", [0, 24])
def test_the_mla_peer_computes_effllms_attention(q_lora_rank):
    """benchmarks/mla_layer.py times transformers' DeepseekV3Attention (sdpa and eager) beside
    effllm's MLA on the weights it copies over: output and input gradient agree at an odd length,
    and with the query latent too (deepseek_600m has none; DeepSeek-V3 does)."""
    pytest.importorskip("transformers")
    import mla_layer

    from effllm.mla import MLAConfig
    from effllm.model import ModelConfig

    mla = ModelConfig(vocab_size=96, dim=64, n_layers=2, n_heads=4, max_seq_len=64, attention="mla",
                      mla=MLAConfig(n_heads=4, q_lora_rank=q_lora_rank, kv_lora_rank=32, qk_nope_head_dim=16,
                                    qk_rope_head_dim=8, v_head_dim=12))
    dense = ModelConfig(vocab_size=96, dim=64, n_layers=2, n_heads=4, max_seq_len=64)
    cases, errors = mla_layer.cases_for(mla, dense, 3, 29, torch.device("cpu"), torch.float32)
    assert set(cases) == {"effllm", "peer[sdpa]", "peer[eager]", "mha"}
    for name, (out_err, grad_err) in errors.items():
        assert out_err < 1e-5 and grad_err < 1e-5, name


def test_the_power_law_fit_recovers_a_known_exponent_and_the_multiplier():
    """benchmarks/compute_multiplier.py: on synthetic points of L = a C^-b the fit gives a and b
    back, and a DeepSeek-style curve that reaches every loss with 2.5x fewer FLOPs gives a
    multiplier of 2.5 (inside the measured range: not extrapolated)."""
    import compute_multiplier as cm

    flops = [1e12, 3e12, 1e13, 4e13]
    a, b = cm.fit_power_law(flops, [7.0 * c ** -0.08 for c in flops])
    assert a == pytest.approx(7.0, rel=1e-9) and b == pytest.approx(0.08, rel=1e-9)
    dense = [{"flops": c, "val_loss": 7.0 * c ** -0.08} for c in flops]
    deepseek = [{"flops": c, "val_loss": 7.0 * (2.5 * c) ** -0.08} for c in flops]
    result = cm.multiplier({"dense": dense, "deepseek": deepseek})
    assert result["multiplier"] == pytest.approx(2.5, rel=1e-9) and not result["extrapolated"]
    with pytest.raises(ValueError, match="two points"):
        cm.fit_power_law([1e12], [3.0])


def test_the_size_sweep_matches_active_size_and_flops_at_every_width():
    """Each width's dense and DeepSeek-style models have the same active parameters and forward
    FLOPs per token within 5%, so the multiplier compares architectures, not sizes."""
    import compute_multiplier as cm

    from effllm.flops import forward_flops_per_token
    from effllm.model import Transformer

    for widths in cm.WIDTHS.values():
        for width in widths:
            models = cm.models_at(width)
            with torch.device("meta"):
                active = {arch: Transformer(m).param_counts()["active"] for arch, m in models.items()}
            flops = {arch: forward_flops_per_token(m, 256) for arch, m in models.items()}
            assert abs(active["deepseek"] / active["dense"] - 1) < 0.05, (width, active)
            assert abs(flops["deepseek"] / flops["dense"] - 1) < 0.05, (width, flops)


def test_every_ladder_rung_costs_what_effllm_flops_says():
    """The FLOPs each rung of benchmarks/ladder.py is compared at (effllm.flops) are the matrix
    products its model runs, counted by torch.utils.flop_counter on the math attention kernel and the
    per-expert loop, full attention's extra keys added back as tests/test_flops.py does; every
    rung but the dense model of equal total within 5% of the baseline's forward FLOPs."""
    from dataclasses import replace

    import ladder
    from helpers import full_attention_extra
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    from effllm import flops
    from effllm.model import Transformer

    T = 64
    rungs = ladder.rungs("quick")
    base = flops.forward_flops_per_token(rungs[0][1].model, T)
    for name, cfg, _ in rungs:
        model_cfg = replace(cfg.model, max_seq_len=T, moe=replace(cfg.model.moe, grouped_gemm="loop"))
        model = Transformer(model_cfg).train()
        x = torch.randint(0, model_cfg.vocab_size, (1, T))
        with FlopCounterMode(display=False) as counter, sdpa_kernel(SDPBackend.MATH):
            model(x, x, return_aux=True)
        expected = flops.forward_flops_per_token(model_cfg, T) + model_cfg.n_layers * full_attention_extra(model_cfg, T)
        expected += flops.mtp_flops_per_token(model_cfg, T)
        expected += sum((T - k) / T * full_attention_extra(model_cfg, T - k) for k in range(1, model_cfg.mtp_depth + 1))
        assert counter.get_total_flops() / T == pytest.approx(expected, rel=1e-9), name
        if name != "dense, equal total":
            assert abs(flops.forward_flops_per_token(model_cfg, T) / base - 1) < 0.05, name


@pytest.mark.slow
def test_the_ladder_runs_end_to_end_at_the_smallest_size(byte_data, tmp_path):
    """A smoke run of benchmarks/ladder.py: two rungs, one seed, a one-point sweep, a few steps;
    it writes its JSON, report and plot, with every rung's figures."""
    import json
    import subprocess
    import sys

    script = Path(__file__).resolve().parent.parent / "benchmarks" / "ladder.py"
    run = subprocess.run([sys.executable, str(script), "--quick", "--steps", "4", "--sweep-steps", "2", "--seeds", "1",
                          "--lr-sweep", "1", "--evals", "2", "--eval-tokens", "256", "--only", "+moe",
                          "--data-dir", str(byte_data), "--out", str(tmp_path / "out")],
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    result = json.loads((tmp_path / "out" / "cpu-quick.json").read_text())
    names = [row["name"] for row in result["rows"]]
    assert names == ["dense", "+moe"]
    moe = result["rows"][1]
    assert moe["vs_below"]["final_val_loss_ratio"]["n"] == 1 and 0 < moe["matmul_share"]
    assert moe["val_loss_equal_tokens"]["mean"] == moe["seeds"][0]["summary"]["final_val_loss"]
    report = (tmp_path / "out" / "report.md").read_text()
    assert "| +moe |" in report and (tmp_path / "out" / "ladder-quick.png").is_file()


def test_no_multiplier_from_a_sweep_whose_losses_rise_with_compute():
    """A size sweep in which the larger dense model trained worse has no power law: no multiplier."""
    import compute_multiplier as cm

    dense = [{"flops": 1e12, "val_loss": 1.84}, {"flops": 2e12, "val_loss": 1.72}, {"flops": 4e12, "val_loss": 1.88}]
    deepseek = [{"flops": c["flops"], "val_loss": c["val_loss"] * 0.95} for c in dense[:2]] + [
        {"flops": 4e12, "val_loss": 1.6}]
    result = cm.multiplier({"dense": dense, "deepseek": deepseek})
    assert result["multiplier"] is None and "dense losses do not fall" in result["why"]
