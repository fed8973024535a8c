"""CUDA paths: bf16 autocast training, torch.compile, decoding caches. Skipped without a GPU."""

from __future__ import annotations

import json

import pytest
import torch
from helpers import REL_TOL, tiny_train_config

from effllm.model import ModelConfig, Transformer
from effllm.train import train

pytestmark = pytest.mark.gpu


SMALL = ModelConfig(vocab_size=256, dim=96, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=64)


def cuda_run(byte_data, out, model=SMALL, **overrides) -> tuple[dict, list[float]]:
    # The CPU learning test's run (test_train.py) on CUDA: 150 steps of 512 tokens.
    cfg = tiny_train_config(byte_data, out, device="cuda", max_steps=150, eval_interval=150, eval_tokens=4096,
                            ckpt_interval=0, batch_size=8, seq_len=64, model=model, **overrides)
    summary = train(cfg)
    curve = [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    return summary, curve


@pytest.fixture(scope="module")
def fp32_cuda_run(byte_data, tmp_path_factory):
    return cuda_run(byte_data, tmp_path_factory.mktemp("fp32") / "run", precision="fp32")


@pytest.mark.parametrize("compile", [False, True])
def test_bf16_training_on_cuda_learns_like_fp32(byte_data, tmp_path, compile, fp32_cuda_run):
    summary, curve = cuda_run(byte_data, tmp_path / "run", compile=compile)
    reference, _ = fp32_cuda_run
    assert summary["precision"] == "torch.bfloat16" and summary["device"].startswith("NVIDIA")
    assert sum(curve[-10:]) / 10 < sum(curve[:10]) / 10 - 1.0
    assert summary["final_val_loss"] < summary["unigram_val_loss"] - 0.1
    # Mixed precision must not cost learning: seen on an H100, bf16 eager 2.88 (and the CPU's
    # fp32 2.76) after 77k tokens; the fp32 CUDA run is the reference measured here.
    assert abs(summary["final_val_loss"] - reference["final_val_loss"]) < 0.15
    if "H100" in summary["device"] or "H200" in summary["device"]:
        assert summary["mfu"] is not None and 0 < summary["mfu"] < 1


def test_cuda_forward_matches_cpu_and_cached_decoding_matches_uncached():
    cfg = ModelConfig(vocab_size=300, dim=128, n_layers=3, n_heads=8, n_kv_heads=2, max_seq_len=96)
    torch.manual_seed(0)
    model = Transformer(cfg)
    tokens = torch.randint(0, 300, (3, 57))
    ref, _ = model(tokens)
    gpu = model.cuda()
    logits, _ = gpu(tokens.cuda())
    torch.testing.assert_close(logits.cpu(), ref, rtol=1e-3, atol=1e-3)  # TF32-free fp32; kernels differ
    with torch.autocast("cuda", dtype=torch.bfloat16):
        low, _ = gpu(tokens.cuda())
    assert (low.float().cpu() - ref).abs().max() < 0.05
    prompt = tokens[:, :9].cuda()
    a = gpu.generate(prompt, 40, temperature=0.0, use_cache=True)
    b = gpu.generate(prompt, 40, temperature=0.0, use_cache=False)
    assert torch.equal(a, b)


@pytest.mark.parametrize("compile", [False, True])
def test_moe_training_on_cuda(byte_data, tmp_path, compile):
    from effllm.moe import MoEConfig

    moe = MoEConfig(n_routed_experts=8, n_shared_experts=1, top_k=2, expert_dim=64, seq_aux_loss_weight=1e-4)
    model = ModelConfig(**{**SMALL.__dict__, "ffn": "moe", "moe": moe})
    summary, curve = cuda_run(byte_data, tmp_path / "run", model=model, compile=compile)
    assert sum(curve[-10:]) / 10 < sum(curve[:10]) / 10 - 1.0
    assert summary["final_val_loss"] < summary["unigram_val_loss"] - 0.1
    last = json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[-1])
    assert last["moe_aux_loss"] > 0 and set(last["moe_load"]) == {"blocks.0.ffn", "blocks.1.ffn"}


@pytest.mark.parametrize("decode", ["naive", "absorbed"])
def test_mla_decoding_on_cuda_equals_training_path(decode):
    from effllm.mla import MLAConfig

    mla = MLAConfig(n_heads=8, q_lora_rank=64, kv_lora_rank=64, qk_nope_head_dim=32, qk_rope_head_dim=16,
                    v_head_dim=32, decode=decode)
    cfg = ModelConfig(vocab_size=256, dim=128, n_layers=2, n_heads=8, attention="mla", mla=mla, max_seq_len=64)
    torch.manual_seed(0)
    model = Transformer(cfg).cuda().eval()
    tokens = torch.randint(0, 256, (2, 40), device="cuda")
    full, _ = model(tokens)
    caches, pieces, pos = model.new_caches(2), [], 0
    for length in (9,) + (1,) * 31:
        logits, _ = model(tokens[:, pos : pos + length], caches=caches, pos=pos)
        pieces.append(logits)
        pos += length
    torch.testing.assert_close(torch.cat(pieces, 1), full, rtol=1e-3, atol=1e-4)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        low = model.generate(tokens[:, :8], 24, temperature=0.0)
        assert low.shape == (2, 32)


def test_fp8_linear_triton_path_on_cuda_matches_reference_and_compiles():
    """Needs FP8 tensor cores (sm_89+)."""
    from effllm import FP8Linear

    if torch.cuda.get_device_capability() < (8, 9):
        pytest.skip("no FP8 tensor cores")
    torch.manual_seed(0)
    w = torch.nn.Parameter(torch.randn(512, 1024, device="cuda") * 0.03)
    x = torch.randn(300, 1024, device="cuda")
    dy = torch.randn(300, 512, device="cuda")
    outs = []
    for backend, compile in (("torch", False), ("triton", False), ("triton", True)):
        layer = FP8Linear(1024, 512, backend=backend, weight=w)
        fn = torch.compile(layer, fullgraph=True) if compile else layer
        xi = x.clone().requires_grad_()
        y = fn(xi)
        y.backward(dy)
        outs.append((y.detach(), xi.grad, w.grad.clone()))
        w.grad = None
    for other in outs[1:]:  # the same quantized operands, summed by the MMA accumulator or in fp32
        for a, b in zip(outs[0], other):
            assert ((a - b).norm() / b.norm()).item() < REL_TOL["fp8_sum"]


def test_fp8_linear_cublas_path_matches_the_reference_at_a_padded_k():
    """Needs torch's block-scaled F.scaled_mm (cuBLAS 12.9+, sm_90). K = 1280 (K/128 = 10, padded to
    12 in the 128x128 scales) and 300 tokens (wgrad's K padded to 384): forward and both gradients
    equal the PyTorch reference to the FP8 sum tolerance; the rowwise recipe runs on CUDA too."""
    from effllm import FP8Linear
    from effllm.kernels.backends import cublas_blockwise_works, fp8_backend

    if torch.cuda.get_device_capability() != (9, 0) or not cublas_blockwise_works(torch.cuda.current_device()):
        pytest.skip("no block-scaled cuBLAS F.scaled_mm on this GPU / torch")
    assert fp8_backend(torch.device("cuda")) == "cublas"
    torch.manual_seed(0)
    w = torch.nn.Parameter(torch.randn(512, 1280, device="cuda") * 0.03)
    x = torch.randn(300, 1280, device="cuda")
    dy = torch.randn(300, 512, device="cuda")
    outs = {}
    for backend, recipe in (("torch", "blockwise"), ("cublas", "blockwise"), ("auto", "rowwise")):
        layer = FP8Linear(1280, 512, backend=backend, weight=w, recipe=recipe)
        xi = x.clone().requires_grad_()
        y = layer(xi)
        y.backward(dy)
        outs[(backend, recipe)] = (y.detach(), xi.grad, w.grad.clone())
        w.grad = None
    for a, b in zip(outs[("cublas", "blockwise")], outs[("torch", "blockwise")]):
        assert ((a - b).norm() / b.norm()).item() < REL_TOL["fp8_sum"]
    dense = [x @ w.detach().t(), dy @ w.detach(), dy.t() @ x]
    for a, b in zip(outs[("auto", "rowwise")], dense):  # row-wise FP8 against fp32: E4M3's error, as on the CPU
        assert ((a - b).norm() / b.norm()).item() < 5e-2
