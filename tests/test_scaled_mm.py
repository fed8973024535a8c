"""torch's FP8 GEMMs (F.scaled_mm) for FP8Linear, tested on a CPU.

Block-scaled (cuBLAS on sm_90, not runnable here): torch's meta kernels apply the CUDA layout checks,
so each product's exact invocation is run on meta tensors, K/128 not a multiple of 4 (K = 1280,
1408) and ragged token counts included; and an emulator that reads the scales by cuBLAS's layouts
is held to effllm's reference GEMM on block grids that are not square, so a transposed or
mis-padded scale fails. Row-wise runs for real: torch has a CPU kernel for it.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from helpers import assert_fp8_trains_like_fp32, rel, tiny_train_config

from effllm.errors import ConfigError
from effllm.fp8 import FP8Linear, convert_to_fp8
from effllm.kernels.backends import fp8_backend
from effllm.kernels.fp8_gemm import fp8_gemm_ref
from effllm.kernels.fp8_quant import quant_blocks_t_ref, quant_rows_and_cols_ref
from effllm.kernels.scaled_mm import (
    blocks_l4,
    blockwise_args,
    emulate_scaled_mm,
    outer_major,
    quant_rowwise,
    quant_tensorwise,
    rowwise_mm,
    tensorwise_mm,
)
from effllm.model import ModelConfig

E4 = torch.float8_e4m3fn


def products(x: torch.Tensor, w: torch.Tensor, dy: torch.Tensor) -> dict:
    """The three GEMMs of FP8Linear as its blockwise path calls them: (a, a_s, b, b_s, b_row_scales)."""
    q_x, s_x, qt_x, st_x = quant_rows_and_cols_ref(x)
    q_w, s_w, qt_w = quant_blocks_t_ref(w)
    q_dy, s_dy, qt_dy, st_dy = quant_rows_and_cols_ref(dy)
    return {"forward": (q_x, s_x, q_w, s_w, False), "dgrad": (q_dy, s_dy, qt_w, s_w.t(), False),
            "wgrad": (qt_dy, st_dy, qt_x, st_x, True)}


@pytest.mark.parametrize("m,n,k", [(200, 384, 1280), (77, 256, 1408), (128, 128, 512)])
def test_every_blockwise_invocation_passes_torchs_layout_checks(m, n, k):
    """On meta tensors F.scaled_mm checks the shapes and strides cuBLAS needs; the products' own
    shapes are (M, N), (M, K) and (N, K)."""
    q = lambda r, c: torch.empty(r, c, dtype=E4, device="meta")  # noqa: E731
    s = lambda r, c: torch.empty(r, c, device="meta")  # noqa: E731
    kb, nb, mb = k // 128, n // 128, -(-m // 128)
    calls = {"forward": (q(m, k), s(m, kb), q(n, k), s(nb, kb), False, (m, n)),
             "dgrad": (q(m, n), s(m, nb), q(k, n), s(nb, kb).t(), False, (m, k)),
             "wgrad": (q(n, m), s(n, mb), q(k, m), s(k, mb), True, (n, k))}
    for name, (a, a_s, b, b_s, rows, shape) in calls.items():
        y = F.scaled_mm(*blockwise_args(a, a_s, b, b_s, rows), output_dtype=torch.bfloat16)
        assert tuple(y.shape) == shape and y.dtype == torch.bfloat16, name
    # the checks have teeth: row-major 1x128 scales, and unpadded 128x128 ones, are refused
    a, a_s, b, b_s = q(m, k), s(m, kb), q(n, k), s(nb, kb)
    ST = F.ScalingType
    with pytest.raises(RuntimeError):
        F.scaled_mm(a, b.t(), a_s.contiguous(), ST.BlockWise1x128, blocks_l4(b_s), ST.BlockWise128x128)
    if kb % 4:
        with pytest.raises(RuntimeError):
            F.scaled_mm(a, b.t(), outer_major(a_s), ST.BlockWise1x128, b_s.t(), ST.BlockWise128x128)


def test_the_layouts_hold_the_scales_cublas_reads():
    s = torch.rand(3, 5)  # 3 row blocks x 5 K blocks: not square, so a transposition cannot pass
    ll = blocks_l4(s)
    assert tuple(ll.shape) == (8, 3) and ll.stride() == (1, 8)
    assert torch.equal(ll[:5], s.t()) and torch.equal(ll[5:], torch.ones(3, 3))
    o = outer_major(torch.rand(7, 5))
    assert o.stride() == (1, 7)


@pytest.mark.parametrize("m", [200, 77])
def test_the_emulated_cublas_products_equal_effllms_reference_gemm(m):
    """Each product, its scales laid out for cuBLAS and read back as cuBLAS reads them, equals
    fp8_gemm_ref in fp32 (the same sums, in another order: 1e-5). N = 384 and K = 640 make 3 x 5
    block grids; the tokens (m) are ragged, so wgrad's K is padded."""
    torch.manual_seed(0)
    x, w, dy = torch.randn(m, 640), torch.randn(384, 640) * 0.05, torch.randn(m, 384)
    for name, (a, a_s, b, b_s, rows) in products(x, w, dy).items():
        want = fp8_gemm_ref(a, a_s, b, b_s, torch.float32, b_row_scales=rows)
        got = emulate_scaled_mm(*blockwise_args(a, a_s, b, b_s, rows), output_dtype=torch.float32)
        assert rel(got, want) < 1e-5, name
        # scales of the wrong blocks (row blocks in reverse order) change the product: the emulator sees it
        if not rows:
            args = list(blockwise_args(a, a_s, b, b_s, rows))
            args[4] = blocks_l4(b_s.flip(0))
            assert rel(emulate_scaled_mm(*args, output_dtype=torch.float32), want) > 1e-3, name


@pytest.mark.parametrize("m", [200, 128])
def test_the_quantization_kernels_write_the_scales_cublas_reads_without_another_pass(m):
    """quant_rows_and_cols(outer_scales=True) (the Triton kernel; the interpreter on a CPU) stores its
    scales outer-dim-major: the same bits as the row-major ones, and blockwise_args hands them to
    F.scaled_mm without a copy (the same memory)."""
    from effllm.kernels.fp8_quant import quant_rows, quant_rows_and_cols

    x = torch.randn(m, 384)
    row = quant_rows_and_cols(x)
    outer = quant_rows_and_cols(x, outer_scales=True)
    assert outer[1].stride() == (1, m) and outer[3].stride() == (1, 384)
    for a, b in zip(row, outer):
        assert torch.equal(a.view(torch.uint8) if a.dtype == E4 else a, b.view(torch.uint8) if b.dtype == E4 else b)
    q, s = quant_rows(x, outer_scales=True)
    assert torch.equal(s, row[1]) and s.stride() == (1, m)
    w = torch.randn(256, 384)
    q_w, s_w, _ = quant_blocks_t_ref(w)
    args = blockwise_args(outer[0], outer[1], q_w, s_w)
    assert args[2].data_ptr() == outer[1].data_ptr()  # no re-layout of the activation's scales


def test_rowwise_and_tensorwise_mm_run_torchs_kernel_and_equal_the_dequantized_product():
    torch.manual_seed(1)
    a, b = torch.randn(77, 200), torch.randn(96, 200)  # K = 200: padded to a multiple of 16
    (qa, sa), (qb, sb) = quant_rowwise(a), quant_rowwise(b)
    want = (qa.float() * sa) @ (qb.float() * sb).t()
    assert rel(rowwise_mm(qa, sa, qb, sb, torch.float32), want) < 1e-6
    assert sa.shape == (77, 1) and rel(qa.float() * sa, a) < 0.05
    (qa, sa), (qb, sb) = quant_tensorwise(a), quant_tensorwise(b)
    want = (qa.float() * sa) @ (qb.float() * sb).t()
    assert rel(tensorwise_mm(qa, sa, qb, sb, torch.float32), want) < 1e-6 and sa.dim() == 0


@pytest.mark.parametrize("recipe", ["rowwise", "tensorwise"])
@pytest.mark.parametrize("bias", [False, True])
def test_coarse_fp8_linear_forward_and_gradients_match_fp32(bias, recipe):
    """The rowwise and tensorwise recipes end to end on a CPU: forward, input and weight gradients
    (and the bias's) against an fp32 nn.Linear, 3 x 13 tokens. Tolerance as the blockwise recipe's
    (test_fp8.py): E4M3's 3 mantissa bits give ~0.035 relative error for a product of two quantized
    operands; Gaussian rows and tensors span about the same range, so coarser scales cost little
    here (outliers are where they cost)."""
    torch.manual_seed(2)
    dense = torch.nn.Linear(256, 128, bias=bias)
    fp8 = FP8Linear.from_linear(dense, recipe=recipe)
    x = torch.randn(3, 13, 256, requires_grad=True)
    dy = torch.randn(3, 13, 128)
    fp8(x).backward(dy)
    got = [x.grad.clone(), dense.weight.grad.clone()] + ([dense.bias.grad.clone()] if bias else [])
    x.grad = None
    dense.zero_grad()
    y_ref = dense(x)
    y_ref.backward(dy)
    tol = 5e-2
    assert rel(fp8(x), y_ref) < tol
    assert rel(got[0], x.grad) < tol and rel(got[1], dense.weight.grad) < tol
    if bias:
        assert rel(got[2], dense.bias.grad) < 1e-5
    assert f"recipe={recipe}" in repr(fp8)


def test_the_recipe_and_backends_are_chosen_and_reported():
    model = torch.nn.Sequential(torch.nn.Linear(128, 256), torch.nn.Linear(256, 128))
    report = convert_to_fp8(model, recipe="rowwise")
    assert report["recipe"] == {"linears": "rowwise", "experts": "blockwise"}
    assert all(m.recipe == "rowwise" for m in model)
    with pytest.raises(ConfigError, match="unknown FP8 recipe 'tensor'"):
        convert_to_fp8(torch.nn.Linear(128, 128), recipe="tensor")
    cpu, cuda = torch.device("cpu"), torch.device("cuda")  # a device object only: no CUDA call is made
    assert fp8_backend(cpu) == "torch"
    with pytest.raises(ConfigError, match="'cublas' runs torch's F.scaled_mm on a CUDA GPU"):
        fp8_backend(cpu, "cublas")
    assert fp8_backend(cuda, "cublas") == "cublas" and fp8_backend(cuda, "cublas", grouped=True) == "triton"


@pytest.mark.slow
def test_rowwise_fp8_trains_like_fp32(byte_data, tmp_path):
    """A tiny model (width 128) trained 100 steps with rowwise FP8 linears against fp32, paired over
    two seeds: the mean val-loss gap within 0.25%. The card and summary record the recipe."""
    model = ModelConfig(vocab_size=256, dim=128, n_layers=2, n_heads=2, max_seq_len=64, ffn_hidden_dim=256)
    assert_fp8_trains_like_fp32(byte_data, tmp_path, model, recipe="rowwise", bound=0.0025)
    card = (tmp_path / "fp8-1" / "MODEL_CARD.md").read_text()
    assert "FP8 linears (rowwise scaling)" in card
    assert tiny_train_config(byte_data, tmp_path, fp8=True, fp8_recipe="rowwise").fp8_recipe == "rowwise"
