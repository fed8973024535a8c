"""The single-launch grouped FP8 kernels (kernels/fp8_grouped.py) against the per-expert PyTorch
reference: the grouped quantization (with and without the fused dispatch gather), the grouped
block-scaled GEMM in its forward and dgrad layouts, and the grouped wgrad; ragged, empty (first,
middle, last) and multi-tile groups. Without a GPU the kernels run under TRITON_INTERPRET=1."""

from __future__ import annotations

import functools

import helpers
import pytest
import torch
from helpers import REL_TOL, rel, same_bits

from effllm.fp8_experts import fp8_grouped_mm, fp8_swiglu_experts
from effllm.kernels import fp8_grouped, fp8_grouped_gemm
from effllm.kernels.fp8_gemm import fp8_gemm_ref
from effllm.kernels.fp8_quant import quant_blocks, quant_blocks_ref, quant_cols_ref, quant_rows_ref
from effllm.kernels.grouped_gemm import grouped_mm_reference

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
SIZES = [[13, 0, 150, 7, 0], [0, 1, 128, 0], [37]]






randn = functools.partial(helpers.randn, device=DEVICE)


def offsets_of(sizes):
    return torch.tensor(sizes).cumsum(0).to(torch.int32).to(DEVICE)


def bounds(sizes):
    b = [0]
    for n in sizes:
        b.append(b[-1] + n)
    return b


@pytest.mark.parametrize("sizes", SIZES)
@pytest.mark.parametrize("gather", [False, True])
def test_grouped_quantization_equals_the_per_group_reference(sizes, gather):
    M, K = sum(sizes), 256
    src = torch.randperm(M, generator=torch.Generator().manual_seed(M)).to(DEVICE) if gather else None
    x = randn(M, K, seed=M)
    sched = fp8_grouped.schedule(offsets_of(sizes), M)
    q, s, qt, st = fp8_grouped.quant_grouped(x, sched, src)
    rows = x[src] if gather else x
    qr, sr = quant_rows_ref(rows)  # 1x128 along K does not depend on the groups
    assert same_bits(q, qr) and torch.equal(s, sr)
    group, first = sched.group.tolist(), sched.first.tolist()
    assert qt.shape == (K, 128 * len(group))
    for g, (lo, hi) in enumerate(zip(bounds(sizes), bounds(sizes)[1:])):
        if hi == lo:
            continue
        qtr, str_ = quant_cols_ref(rows[lo:hi])  # tiles of 128 of this group's own rows
        tiles = list(range(first[g], first[g] + str_.shape[1]))
        assert all(group[t] == g for t in tiles) and torch.equal(st[:, tiles], str_)
        # tile t in columns 128t .. 128t+127 of qt, zeros past the group's end
        cols = torch.cat([qt[:, 128 * t : 128 * (t + 1)] for t in tiles], dim=1)
        n = hi - lo
        assert same_bits(cols[:, :n], qtr) and not cols[:, n:].view(torch.uint8).any()


@pytest.mark.parametrize("sizes", SIZES)
@pytest.mark.parametrize("k_major", [True, False])
def test_grouped_gemm_equals_the_per_group_reference(sizes, k_major):
    M, N, K, G = sum(sizes), 256, 384, len(sizes)
    sched = fp8_grouped.schedule(offsets_of(sizes), M)
    q, s, _, _ = fp8_grouped.quant_grouped(randn(M, K, seed=1), sched)
    qw, sw = quant_blocks(randn(G * N, K, seed=2, scale=0.05))
    qw, sw = qw.view(G, N, K), sw.view(G, N // 128, K // 128)
    if not k_major:  # the same operand read through a transposed view
        qw = qw.transpose(1, 2).contiguous().transpose(1, 2)
    c = fp8_grouped_gemm.grouped_gemm(q, s, qw, sw, sched, torch.float32)
    c0 = randn(M, N, seed=11)
    acc = fp8_grouped_gemm.grouped_gemm(q, s, qw, sw, sched, accumulate=c0.clone())  # adds into what it holds
    for g, (lo, hi) in enumerate(zip(bounds(sizes), bounds(sizes)[1:])):
        if hi > lo:
            ref = fp8_gemm_ref(q[lo:hi], s[lo:hi], qw[g], sw[g], torch.float32)
            assert rel(c[lo:hi], ref) < REL_TOL["fp8_sum"]
            assert rel(acc[lo:hi], c0[lo:hi] + ref) < REL_TOL["fp8_sum"]


@pytest.mark.parametrize("sizes", SIZES)
def test_grouped_wgrad_equals_the_per_group_reference(sizes):
    M, N, K, G = sum(sizes), 128, 256, len(sizes)
    sched = fp8_grouped.schedule(offsets_of(sizes), M)
    dy, x = randn(M, N, seed=3), randn(M, K, seed=4)
    _, _, qt_dy, st_dy = fp8_grouped.quant_grouped(dy, sched)
    _, _, qt_x, st_x = fp8_grouped.quant_grouped(x, sched)
    dw = fp8_grouped_gemm.grouped_wgrad(qt_dy, st_dy, qt_x, st_x, sched)
    assert dw.shape == (G, N, K)
    for g, (lo, hi) in enumerate(zip(bounds(sizes), bounds(sizes)[1:])):
        if hi == lo:  # an expert without tokens: exact zeros
            assert torch.equal(dw[g], torch.zeros_like(dw[g]))
            continue
        a, a_s = quant_cols_ref(dy[lo:hi])
        b, b_s = quant_cols_ref(x[lo:hi])
        ref = fp8_gemm_ref(a, a_s, b, b_s, torch.float32, b_row_scales=True)
        assert rel(dw[g], ref) < REL_TOL["fp8_sum"]
        assert rel(dw[g], dy[lo:hi].double().t() @ x[lo:hi].double()) < 5e-2  # FP8's own error


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_shared_input_and_fused_gather_give_the_gathered_products_and_gradients(backend):
    """fp8_grouped_mm(x, (w1, w3), src=...) is x[src] · w1[g]ᵀ and x[src] · w3[g]ᵀ; the input
    gradient sums both products' dgrads and scatters them back to the source rows."""
    sizes, T, N, K = [20, 0, 45, 9], 40, 128, 256
    M = sum(sizes)
    offsets = offsets_of(sizes)
    src = torch.randint(0, T, (M,), generator=torch.Generator().manual_seed(5)).to(DEVICE)  # repeats: top-k
    x = randn(T, K, seed=6)
    w1, w3 = randn(len(sizes), N, K, seed=7, scale=0.05), randn(len(sizes), N, K, seed=8, scale=0.05)
    dy1, dy3 = randn(M, N, seed=9), randn(M, N, seed=10)
    xq, w1q, w3q = (t.clone().requires_grad_() for t in (x, w1, w3))
    y1, y3 = fp8_grouped_mm(xq, (w1q, w3q), offsets, backend, src=src)
    torch.autograd.backward((y1, y3), (dy1, dy3))
    xr, w1r, w3r = (t.clone().requires_grad_() for t in (x, w1, w3))
    r1, r3 = grouped_mm_reference(xr[src], w1r, offsets), grouped_mm_reference(xr[src], w3r, offsets)
    torch.autograd.backward((r1, r3), (dy1, dy3))
    tol = 5e-2  # the FP8Linear bound: E4M3 rounding of both operands (tests/test_fp8.py)
    assert rel(y1, r1) < tol and rel(y3, r3) < tol and rel(xq.grad, xr.grad) < tol
    for g, n in enumerate(sizes):
        for a, b in ((w1q.grad[g], w1r.grad[g]), (w3q.grad[g], w3r.grad[g])):
            assert torch.equal(a, torch.zeros_like(a)) if n == 0 else rel(a, b) < tol


@pytest.mark.parametrize("grad", [False, True])
def test_quant_swiglu_quantizes_the_swiglu_terms_like_the_grouped_quantization(grad):
    """silu(gate)·up, and its gradients along gate and along up side by side, computed in the
    quantization pass, against swiglu_ref: each tile's scale is its amax / 448 and each element
    within the E4M3 rounding bound, in both layouts. gate and up are the halves of one (M, 2F)
    tensor, as the fused experts' GEMM writes them. Not bit for bit: Triton's sigmoid and torch's
    differ in the last bit for ~17% of inputs, which moves a scale by an ulp. (quant_grouped's
    rounding is checked bit for bit above.)"""
    sizes, F = [13, 0, 150, 7, 0], 256
    M = sum(sizes)
    gate_up, dh = randn(M, 2 * F, seed=31, scale=3.0), randn(M, F, seed=33)
    gate, up = gate_up[:, :F], gate_up[:, F:]
    sched = fp8_grouped.schedule(offsets_of(sizes), M)
    q, s, qt, st = fp8_grouped.quant_swiglu(gate, up, sched, dh=dh if grad else None)
    v = fp8_grouped.swiglu_ref(gate, up, dh if grad else None).double()
    assert q.shape == v.shape == (M, 2 * F if grad else F)
    if grad:  # the halves are the gradients along gate and along up
        ga, u, d = gate.double(), up.double(), dh.double()
        sig = torch.sigmoid(ga)
        assert torch.allclose(v[:, :F], d * u * (sig + ga * sig * (1 - sig)), rtol=1e-5, atol=1e-6)
        assert torch.allclose(v[:, F:], d * ga * sig, rtol=1e-5, atol=1e-6)
    width = v.shape[1]

    def check(q, s, v):
        """q e4m3 and v fp64 (rows, 128 n), s (rows, n): one scale per row of each 128-wide tile."""
        amax = v.abs().unflatten(1, (-1, 128)).amax(dim=2)
        assert torch.allclose(s.double(), amax.clamp_min(1e-12) / 448, rtol=1e-6, atol=0)
        scale = s.double().repeat_interleave(128, dim=1)
        bound = scale * torch.clamp((v / scale).abs() * 2**-4, min=2**-10)  # half an E4M3 step
        assert torch.all((q.double() * scale - v).abs() <= bound * (1 + 1e-5))

    check(q, s, v)  # 1x128 along the features
    first = sched.first.tolist()
    for g, (lo, hi) in enumerate(zip(bounds(sizes), bounds(sizes)[1:])):
        for i in range((hi - lo + 127) // 128):  # each of the group's 128-row tiles, along the rows
            t, r0 = first[g] + i, lo + 128 * i
            n = min(128, hi - r0)
            rows = torch.zeros(128, width, dtype=torch.float64, device=v.device)
            rows[:n] = v[r0 : r0 + n]  # the kernel pads the tile with zeros past the group's end
            check(qt[:, 128 * t : 128 * (t + 1)], st[:, t : t + 1], rows.t())
            assert not qt[:, 128 * t + n : 128 * (t + 1)].view(torch.uint8).any()
    with pytest.raises(ValueError, match="one layout"):
        fp8_grouped.quant_swiglu(gate, up.contiguous(), sched)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("pow2", [False, True])
def test_expert_weights_quantized_side_by_side_equal_the_block_reference(dtype, pow2):
    """quant_expert_weights: gate (3, 256, 384) and up (3, 128, 384) quantized into one stacked
    operand, bit for bit what quant_blocks_ref gives each expert's weight, and the dgrad copy each
    expert's stacked matrix transposed, K-major."""
    G, K = 3, 384
    ws = [randn(G, n, K, seed=40 + n, scale=0.05).to(dtype) for n in (256, 128)]
    q, s, qt = fp8_grouped.quant_expert_weights(ws, pow2)
    assert q.shape == (G, 384, K) and s.shape == (G, 3, 3) and qt.shape == (G, K, 384) and qt.is_contiguous()
    lo = 0
    for w in ws:
        hi = lo + w.shape[1]
        for g in range(G):
            qr, sr = quant_blocks_ref(w[g], pow2)
            assert same_bits(q[g, lo:hi], qr) and torch.equal(s[g, lo // 128 : hi // 128], sr)
            assert same_bits(qt[g, :, lo:hi], qr.t())
        lo = hi
    ref = fp8_grouped.quant_expert_weights_ref(ws, pow2)
    assert same_bits(q, ref[0]) and torch.equal(s, ref[1]) and same_bits(qt, ref[2])
    with pytest.raises(ValueError, match="multiples of 128"):
        fp8_grouped.quant_expert_weights([ws[0][:, :200]], pow2)


@pytest.mark.parametrize("D", [200, 1030])  # one partial column block; two column blocks
@pytest.mark.parametrize("out_dtype", [torch.float32, torch.bfloat16])
def test_sum_by_source_equals_the_sequential_index_add(D, out_dtype):
    """The fused gather's gradient: each source row sums its sorted rows in increasing order, which
    is the order of a CPU index_add, so the fp32 sums agree bit for bit (on a GPU too, where the
    index_add would use atomics). Rows that no sorted row reads get zeros."""
    rows, M = 23, 61
    src = torch.randint(0, rows - 3, (M,), generator=torch.Generator().manual_seed(21)).to(DEVICE)  # 3 unread
    dx = randn(M, D, seed=22)
    out = fp8_grouped.sum_by_source(dx, src, rows, out_dtype)
    ref = torch.zeros(rows, D).index_add_(0, src.cpu(), dx.cpu())
    if out_dtype == torch.bfloat16 and DEVICE == "cpu":
        # Triton's interpreter rounds fp32 -> bf16 toward zero (its cast passes no rounding mode);
        # compiled kernels round to nearest even, as torch does. Same fp32 sums, so exact either way.
        ref = (ref.view(torch.int32) & ~0xFFFF).view(torch.float32)
    assert out.dtype == out_dtype and torch.equal(out.cpu(), ref.to(out_dtype))
    assert torch.equal(out[rows - 3:].cpu(), torch.zeros(3, D, dtype=out_dtype))
    assert fp8_grouped.sum_by_source(dx[:0], src[:0], rows, out_dtype).abs().sum() == 0  # no rows: zeros
    with pytest.raises(ValueError, match="src"):
        fp8_grouped.sum_by_source(dx, src[1:], rows, out_dtype)


def test_bad_operands_are_refused():
    sched = fp8_grouped.schedule(offsets_of([3, 4]), 7)
    with pytest.raises(ValueError, match="multiple of 128"):
        fp8_grouped.quant_grouped(randn(7, 100, seed=0), sched)
    with pytest.raises(ValueError, match="rows"):
        fp8_grouped.quant_grouped(randn(8, 128, seed=0), sched)
    with pytest.raises(ValueError, match="int32"):
        fp8_grouped.schedule(offsets_of([3, 4]).long(), 7)
    q, s, _, _ = fp8_grouped.quant_grouped(randn(7, 128, seed=0), sched)
    qw, sw = quant_blocks(randn(3 * 128, 128, seed=1))
    with pytest.raises(ValueError, match="G groups"):
        fp8_grouped_gemm.grouped_gemm(q, s, qw.view(3, 128, 128), sw.view(3, 1, 1), sched)


@pytest.mark.gpu
@pytest.mark.parametrize("gather", [False, True])
def test_triton_path_never_waits_for_the_host(gather):
    """One launch per kernel, grids sized from shapes alone: no device-to-host sync in a step, the
    fused gather and its gradient (sum_by_source) and the fused SwiGLU experts included."""
    if torch.cuda.get_device_capability() < (8, 9):
        pytest.skip("no FP8 tensor cores")
    sizes = [300, 0, 129, 1000]
    offsets = offsets_of(sizes)
    M = sum(sizes)
    src = torch.randperm(M, generator=torch.Generator().manual_seed(13)).to(DEVICE) % 700 if gather else None
    x = randn(700 if gather else M, 256, seed=11).requires_grad_()
    w = randn(len(sizes), 384, 256, seed=12, scale=0.05).requires_grad_()
    w2 = randn(len(sizes), 256, 384, seed=14, scale=0.05).requires_grad_()

    def step():
        fp8_grouped_mm(x, w, offsets, "triton", src=src).sum().backward()
        fp8_swiglu_experts(x, w, w, w2, offsets, "triton", src=src).sum().backward()

    step()  # autotunes (which syncs) once
    torch.cuda.set_sync_debug_mode("error")
    try:
        step()
    finally:
        torch.cuda.set_sync_debug_mode("default")
