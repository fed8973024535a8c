"""The DeepSeekMoE layer: routing against a per-token reference, output and every gradient against
a per-expert loop, balancing, the balance loss, model integration and bad configs."""

from __future__ import annotations

import math
import warnings

import pytest
import torch
import torch.nn.functional as F

from effllm import ConfigError, ModelConfig, MoE, MoEConfig, Transformer, attach_balancing
from effllm.flops import forward_flops_per_token
from effllm.moe import load_stats

ROUTINGS = {
    "sigmoid": MoEConfig(n_routed_experts=8, top_k=3, score_func="sigmoid", route_scale=2.5),
    "softmax": MoEConfig(n_routed_experts=8, top_k=3, score_func="softmax"),
    "softmax-renormalised": MoEConfig(n_routed_experts=8, top_k=3, score_func="softmax", norm_topk_prob=True),
    "sigmoid-not-renormalised": MoEConfig(n_routed_experts=8, top_k=3, norm_topk_prob=False),
    "sigmoid-groups": MoEConfig(n_routed_experts=16, top_k=4, n_group=4, topk_group=2, route_scale=1.5),
    "softmax-groups": MoEConfig(n_routed_experts=12, top_k=2, n_group=3, topk_group=1, score_func="softmax"),
    # bias frozen at zero: DeepSeek's Gate without a bias scores each group by its best expert
    "sigmoid-groups-no-bias": MoEConfig(n_routed_experts=16, top_k=4, n_group=4, topk_group=2, bias_update_rate=0),
    "softmax-groups-no-bias": MoEConfig(n_routed_experts=12, top_k=2, n_group=3, topk_group=1, score_func="softmax",
                                        bias_update_rate=0),
}


def reference_route(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, cfg: MoEConfig):
    """Token by token in fp64, as DeepSeek's official `Gate` (DeepSeek-V3 inference/model.py) routes:
    {expert: gate weight}. That Gate has a bias or not (V3 or V2); here the router has one when
    it can be nonzero (a positive update rate, or a trained bias). With a bias, groups score by the
    sum of their top-2 biased affinities, without one by their best; gates are renormalised for
    sigmoid scores only, unless norm_topk_prob says otherwise."""
    out = []
    E, G = cfg.n_routed_experts, cfg.n_group
    has_bias = cfg.bias_update_rate > 0 or bool(bias.any())
    renormalise = cfg.score_func == "sigmoid" if cfg.norm_topk_prob is None else cfg.norm_topk_prob
    for t in range(x.shape[0]):
        logits = weight.double() @ x[t].double()
        s = logits.sigmoid() if cfg.score_func == "sigmoid" else logits.softmax(0)
        biased = [s[e].item() + bias[e].item() for e in range(E)]
        allowed = list(range(E))
        if G > 1:
            size = E // G
            group_scores = []
            for g in range(G):
                members = sorted(biased[g * size : (g + 1) * size], reverse=True)
                group_scores.append(sum(members[:2]) if has_bias else members[0])
            groups = sorted(range(G), key=group_scores.__getitem__, reverse=True)[: cfg.topk_group]
            allowed = [e for g in groups for e in range(g * size, (g + 1) * size)]
        chosen = sorted(allowed, key=lambda e: biased[e], reverse=True)[: cfg.top_k]
        gates = {e: s[e].item() for e in chosen}
        if renormalise:
            total = sum(gates.values())
            gates = {e: g / total for e, g in gates.items()}
        out.append({e: g * cfg.route_scale for e, g in gates.items()})
    return out


@pytest.mark.parametrize("name", ROUTINGS)
@pytest.mark.parametrize("with_bias", [False, True])
def test_routing_matches_deepseeks_gate(name, with_bias):
    cfg = ROUTINGS[name]
    torch.manual_seed(1)
    layer = MoE(24, cfg)
    with torch.no_grad():
        layer.router.weight.normal_(0, 0.5)
        if with_bias:
            layer.router.expert_bias.copy_(torch.randn(cfg.n_routed_experts) * 0.3)
    x = torch.randn(37, 24)
    weights, indices, _ = layer.router(x)
    expected = reference_route(x, layer.router.weight, layer.router.expert_bias, cfg)
    for t in range(37):
        got = dict(zip(indices[t].tolist(), weights[t].tolist()))
        assert set(got) == set(expected[t]), t
        for e, g in expected[t].items():
            assert got[e] == pytest.approx(g, rel=1e-5, abs=1e-7)


def test_bias_changes_selection_never_gate_weights():
    cfg = ROUTINGS["sigmoid"]
    torch.manual_seed(2)
    layer = MoE(24, cfg)
    x = torch.randn(50, 24)
    w0, i0, scores = layer.router(x)
    with torch.no_grad():
        layer.router.expert_bias[5] = 10.0  # expert 5 now always wins a place
    w1, i1, _ = layer.router(x)
    assert (i1 == 5).any(dim=1).all() and not (i0 == 5).any(dim=1).all()
    # gate weights come from the unbiased scores of whatever was chosen
    chosen = scores.gather(1, i1)
    torch.testing.assert_close(w1, chosen / chosen.sum(1, keepdim=True) * cfg.route_scale)
    assert (w1.gather(1, (i1 == 5).long().argmax(1, keepdim=True)) < 1).all()  # no bias leaks in


def reference_moe(layer: MoE, x: torch.Tensor, params: dict) -> torch.Tensor:
    """Per expert: run the expert on the tokens that chose it; plain fp64 ops, autograd gradients."""
    cfg = layer.cfg
    tokens = x.reshape(-1, x.shape[-1])
    _, indices, _ = layer.router(tokens.float())  # selection (tested above); no gradient through it
    logits = tokens @ params["router"].t()
    s = logits.sigmoid() if cfg.score_func == "sigmoid" else logits.softmax(-1)
    gates = s.gather(1, indices)
    if cfg.renormalize:
        gates = gates / gates.sum(1, keepdim=True)
    gates = gates * cfg.route_scale
    out = torch.zeros_like(tokens)
    for e in range(cfg.n_routed_experts):
        rows, slot = (indices == e).nonzero(as_tuple=True)
        h = tokens[rows]
        y = (F.silu(h @ params["w1"][e].t()) * (h @ params["w3"][e].t())) @ params["w2"][e].t()
        out = out.index_add(0, rows, y * gates[rows, slot].unsqueeze(1))
    if layer.shared is not None:
        out = out + (F.silu(tokens @ params["s1"].t()) * (tokens @ params["s3"].t())) @ params["s2"].t()
    return out.view(x.shape)


DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# (backend, dtype, relative tolerance vs fp64); the Triton kernels run under the interpreter on CPU.
LAYER_CASES = [("loop", torch.float32, 1e-5), ("torch", torch.float32, 1e-5), ("triton", torch.float32, 1e-5)]
if DEVICE == "cuda":  # torch._grouped_mm on CUDA is bf16 (Hopper); bf16 rounds inputs and outputs
    LAYER_CASES = [("loop", torch.float32, 1e-5), ("triton", torch.float32, 1e-5),
                   ("triton", torch.bfloat16, 2e-2), ("torch", torch.bfloat16, 2e-2)]


@pytest.mark.parametrize("backend,dtype,tol", LAYER_CASES)
@pytest.mark.parametrize("name", ["sigmoid", "softmax-groups"])
def test_moe_output_and_every_gradient_match_per_expert_loop(backend, dtype, tol, name):
    if backend == "torch" and not hasattr(torch, "_grouped_mm"):
        pytest.skip("this PyTorch has no torch._grouped_mm")
    cfg = MoEConfig(**{**ROUTINGS[name].__dict__, "expert_dim": 32, "n_shared_experts": 2, "grouped_gemm": backend})
    torch.manual_seed(3)
    layer = MoE(16, cfg)
    with torch.no_grad():
        layer.router.weight.normal_(0, 0.5)
        layer.router.expert_bias[0] = 5.0  # one popular expert ...
        layer.router.expert_bias[1] = -5.0  # ... and one that gets no token at all
    layer = layer.to(DEVICE, dtype)
    layer.router.float()  # the router stays fp32, as in training
    x = torch.randn(2, 7, 16, device=DEVICE).to(dtype).requires_grad_()
    y = layer(x)
    assert layer.last_load[1] == 0 and layer.last_load.sum() == 14 * cfg.top_k
    dy = torch.randn_like(y)
    y.backward(dy)

    params = {"router": layer.router.weight, "w1": layer.experts.w1, "w3": layer.experts.w3, "w2": layer.experts.w2,
              "s1": layer.shared.w1.weight, "s3": layer.shared.w3.weight, "s2": layer.shared.w2.weight}
    params = {k: v.detach().double().requires_grad_() for k, v in params.items()}
    xr = x.detach().double().requires_grad_()
    ref = reference_moe(layer, xr, params)
    ref.backward(dy.double())

    def rel(a, b):
        return ((a.double() - b).norm() / b.norm()).item()

    assert rel(y, ref) < tol
    assert rel(x.grad, xr.grad) < tol
    grads = {"router": layer.router.weight.grad, "w1": layer.experts.w1.grad, "w3": layer.experts.w3.grad,
             "w2": layer.experts.w2.grad, "s1": layer.shared.w1.weight.grad, "s3": layer.shared.w3.weight.grad,
             "s2": layer.shared.w2.weight.grad}
    for k, g in grads.items():
        assert rel(g, params[k].grad) < tol, k
    assert torch.equal(layer.experts.w1.grad[1], torch.zeros_like(layer.experts.w1.grad[1]))  # the idle expert


def skewed_inputs(dim: int, tokens: int, seed: int):
    """Tokens sharing one direction that experts 0 and 1 love: a router that starts unbalanced.
    The tokens must also differ enough for a bias to split them: near-identical tokens all flip
    together and the sign update oscillates (seen: cv 1.1-1.4 forever with 0.3x noise)."""
    g = torch.Generator().manual_seed(seed)
    u = torch.randn(dim, generator=g)
    x = torch.randn(tokens, dim, generator=g) + u
    return x, u


@pytest.mark.parametrize("score_func", ["sigmoid", "softmax"])
def test_bias_updates_balance_the_load(score_func):
    cfg = MoEConfig(n_routed_experts=8, top_k=2, expert_dim=8, score_func=score_func, bias_update_rate=1e-2)
    torch.manual_seed(4)
    layer = MoE(32, cfg).train()
    x, u = skewed_inputs(32, 256, seed=5)
    with torch.no_grad():
        layer.router.weight.normal_(0, 0.02)
        layer.router.weight[:2] += u / u.norm() * 0.6
    cvs = []
    with torch.no_grad():
        for _ in range(300):
            layer(x)
            cvs.append(load_stats(layer.update_bias())["cv"])
    assert cvs[0] > 1.0  # built to be skewed: two experts take most tokens
    settled = sum(cvs[-20:]) / 20  # sign updates end in a small oscillation: judge its mean
    assert settled <= 0.5 * cvs[0], (cvs[0], settled)  # seen: 1.73 -> 0.34 sigmoid, 0.67 softmax

    frozen = MoE(32, MoEConfig(**{**cfg.__dict__, "bias_update_rate": 0.0})).train()
    frozen.load_state_dict(layer.state_dict() | {"router.expert_bias": torch.zeros(8)})
    with torch.no_grad():
        frozen(x)
        first = load_stats(frozen.update_bias())
        for _ in range(5):
            frozen(x)
            last = load_stats(frozen.update_bias())
    assert torch.equal(frozen.router.expert_bias, torch.zeros(8)) and first == last


def test_load_accumulates_over_micro_batches_and_only_in_training():
    layer = MoE(16, MoEConfig(n_routed_experts=4, top_k=2, expert_dim=8))
    x = torch.randn(10, 16)
    layer.train()
    layer(x)
    layer(x)
    assert layer.step_load.sum() == 2 * 10 * 2
    layer.eval()
    layer(x)
    assert layer.step_load.sum() == 40 and layer.last_load.sum() == 20
    assert load_stats(torch.tensor([1.0, 1.0, 1.0, 1.0])) == {"max_over_mean": 1.0, "cv": 0.0}


def test_sequence_balance_loss_matches_the_formula_and_trains_the_router():
    cfg = MoEConfig(n_routed_experts=6, top_k=2, expert_dim=8, seq_aux_loss_weight=1e-2)
    layer = MoE(16, cfg).train()
    x = torch.randn(3, 11, 16)
    out, aux = layer(x, return_aux=True)
    torch.testing.assert_close(out, layer(x))  # without return_aux: the output alone
    _, idx, s = layer.router(x.reshape(-1, 16))
    idx, s = idx.view(3, 11, 2), s.view(3, 11, 6).double()
    expected = 0.0
    for b in range(3):
        f = torch.bincount(idx[b].flatten(), minlength=6).double() * 6 / (2 * 11)
        p = (s[b] / s[b].sum(-1, keepdim=True)).mean(0)
        expected += 1e-2 * (f * p).sum().item() / 3
    assert aux.item() == pytest.approx(expected, rel=1e-5)
    aux.backward()
    assert layer.router.weight.grad.abs().sum() > 0
    layer.eval()
    assert layer(x, return_aux=True)[1] is None


def test_attach_balancing_moves_every_layers_bias_after_each_optimizer_step():
    """One call attaches the bias update to the optimizer: each step moves every MoE layer's bias
    exactly as update_bias() by hand does, `loads` holds the step's load, and remove() detaches it."""
    torch.manual_seed(0)
    model = Transformer(moe_model_config(moe=MoEConfig(n_routed_experts=8, top_k=2, expert_dim=16,
                                                       bias_update_rate=0.05)))
    by_hand = Transformer(model.cfg)
    by_hand.load_state_dict(model.state_dict())
    x = torch.randint(0, 97, (2, 24))
    opt, opt2 = (torch.optim.SGD(m.parameters(), lr=0.1) for m in (model, by_hand))
    balancing = attach_balancing(model, opt)
    for _ in range(3):
        for m, o in ((model, opt), (by_hand, opt2)):
            m(x, x)[1].backward()
            o.step()
            o.zero_grad()
        hand_loads = {name: layer.update_bias() for name, layer in by_hand.moe_layers().items()}
        assert list(balancing.loads) == ["blocks.1.ffn", "blocks.2.ffn"]
        for name, load in balancing.loads.items():
            assert torch.equal(load, hand_loads[name]) and load.sum() == 2 * 24 * 2
    for (name, layer), twin in zip(model.moe_layers().items(), by_hand.moe_layers().values()):
        assert layer.router.expert_bias.abs().sum() > 0, name  # it moved
        assert torch.equal(layer.router.expert_bias, twin.router.expert_bias)
    balancing.remove()
    before = [layer.router.expert_bias.clone() for layer in model.moe_layers().values()]
    model(x, x)[1].backward()
    opt.step()
    assert all(torch.equal(b, layer.router.expert_bias) for b, layer in zip(before, model.moe_layers().values()))
    with pytest.raises(ValueError, match="holds no MoE layer"):
        attach_balancing(torch.nn.Linear(2, 2), opt)


def test_a_training_layer_that_is_never_balanced_warns_once(monkeypatch):
    """Forgetting update_bias() leaves the load to grow unbalanced: after UNBALANCED_FORWARDS
    training forwards the layer says so, once; an update resets the count; a frozen bias
    (bias_update_rate=0) and evaluation never warn."""
    monkeypatch.setattr(MoE, "UNBALANCED_FORWARDS", 5)
    x = torch.randn(6, 16)
    layer = MoE(16, MoEConfig(n_routed_experts=4, top_k=2, expert_dim=8)).train()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(4):
            layer(x)
            layer.update_bias()
        layer(x)  # 4 updates reset the count: this is forward 1 since the last
        assert not caught
        for _ in range(9):  # forwards 2..10 with no update: one warning, at the 5th
            layer(x)
        assert len(caught) == 1 and "attach_balancing" in str(caught[0].message)
        layer.eval()
        for _ in range(10):
            layer(x)
        frozen = MoE(16, MoEConfig(n_routed_experts=4, top_k=2, expert_dim=8, bias_update_rate=0.0)).train()
        for _ in range(10):
            frozen(x)
        assert len(caught) == 1


def test_moe_compiles_as_one_graph_equal_to_eager_for_any_routing():
    """torch.compile(MoE, fullgraph=True): no data-dependent guard on the expert offsets and no
    host read stops the trace (the grouped GEMM is a custom operator); the compiled output and
    every gradient equal eager's, and new routing with the same shapes reuses the graph. aot_eager
    traces forward and backward as inductor would, without its C++ build."""
    torch.manual_seed(3)
    layer = MoE(32, MoEConfig(n_routed_experts=8, n_shared_experts=1, top_k=2, expert_dim=16,
                              seq_aux_loss_weight=1e-2)).train()
    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")

    def grads(fn, x):
        layer.zero_grad()
        x = x.clone().requires_grad_()
        y, aux = fn(x, return_aux=True)
        ((y * y).sum() + aux).backward()
        return [y.detach(), aux.detach(), x.grad] + [p.grad.clone() for p in layer.parameters()]

    x = torch.randn(2, 9, 32)
    for got, want in zip(grads(compiled, x), grads(layer, x)):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)  # fp32: the same ops, maybe reordered
    with torch._dynamo.config.patch(error_on_recompile=True):
        for seed in range(3):  # different tokens route differently; same shapes: the same graph
            x = (torch.randn(2, 9, 32, generator=torch.Generator().manual_seed(seed)) * (seed + 1)).requires_grad_()
            torch.testing.assert_close(compiled(x, return_aux=True)[0], layer(x, return_aux=True)[0],
                                       rtol=1e-5, atol=1e-6)


def test_a_deepseek_model_compiles_as_one_graph_and_trains_without_recompiling():
    """deepseek_tiny's design (MLA + MoE after a dense layer + one MTP module) under
    torch.compile(fullgraph=True): one graph for training steps, whatever the routing, and one
    more for evaluation (no_grad), where a graph break per block used to recompile each block
    kind and each sequence length until the recompile limit."""
    from effllm.mla import MLAConfig

    torch.manual_seed(5)
    mla = MLAConfig(q_lora_rank=0, kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=8)
    model = Transformer(moe_model_config(attention="mla", mla=mla, mtp_depth=1, dim=32, n_heads=2,
                                         moe=MoEConfig(n_routed_experts=4, top_k=2, expert_dim=16)))
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    balancing = attach_balancing(model, opt)

    def step(seed):
        g = torch.Generator().manual_seed(seed)
        x, y = torch.randint(0, 97, (2, 20), generator=g), torch.randint(0, 97, (2, 20), generator=g)
        out = compiled(x, y, return_aux=True)
        (out.loss + 0.3 * out.mtp_loss).backward()
        opt.step()
        opt.zero_grad()
        return out.loss.item()

    first = step(0)
    with torch._dynamo.config.patch(error_on_recompile=True):
        losses = [step(0) for _ in range(3)] + [step(seed) for seed in (1, 2)]
    assert losses[2] < first  # the same batch, three steps on: it trains
    # 2 x 20 tokens x top-2 per main block; the MTP block sees the 19 positions with a next-next target
    assert {k: v.sum().item() for k, v in balancing.loads.items()} == {
        "blocks.1.ffn": 80, "blocks.2.ffn": 80, "mtp.0.block.ffn": 76}
    model.eval()
    with torch.no_grad():
        x = torch.randint(0, 97, (2, 20))
        torch.testing.assert_close(compiled(x)[0], model(x)[0], rtol=1e-5, atol=1e-5)
        with torch._dynamo.config.patch(error_on_recompile=True):
            compiled(torch.randint(0, 97, (2, 20)))


def moe_model_config(**kw) -> ModelConfig:
    moe = MoEConfig(n_routed_experts=8, n_shared_experts=1, top_k=2, expert_dim=32)
    return ModelConfig(**{**dict(vocab_size=97, dim=48, n_layers=3, n_heads=4, max_seq_len=32, ffn="moe",
                                 moe=moe, first_k_dense=1), **kw})


def test_model_with_moe_layers_counts_active_parameters_and_flops():
    cfg = moe_model_config()
    model = Transformer(cfg)
    assert [type(b.ffn).__name__ for b in model.blocks] == ["SwiGLU", "MoE", "MoE"]
    assert list(model.moe_layers()) == ["blocks.1.ffn", "blocks.2.ffn"]
    counts = model.param_counts()
    per_expert = 3 * 48 * 32
    assert counts["total"] - counts["active"] == 2 * (8 - 2) * per_expert
    dense = ModelConfig(**{**cfg.__dict__, "ffn": "dense"})
    moe_ffn = 2 * 3 * 48 * 32 * (2 + 1) + 2 * 48 * 8
    dense_ffn = 2 * 3 * 48 * dense.hidden_dim
    assert forward_flops_per_token(cfg, 32) - forward_flops_per_token(dense, 32) == 2 * (moe_ffn - dense_ffn)
    # The causal test of the dense model holds for MoE too: routing is per token.
    torch.manual_seed(0)
    tokens = torch.randint(0, 97, (2, 20))
    base, _ = model(tokens)
    changed = tokens.clone()
    changed[:, 12] = (changed[:, 12] + 1) % 97
    torch.testing.assert_close(model(changed)[0][:, :12], base[:, :12], rtol=0, atol=1e-5)


def test_moe_model_generates_with_cache_like_without():
    torch.manual_seed(0)
    model = Transformer(moe_model_config()).eval()
    prompt = torch.randint(0, 97, (2, 5))
    assert torch.equal(model.generate(prompt, 12, 0.0), model.generate(prompt, 12, 0.0, use_cache=False))


def test_model_config_round_trips_through_a_dict():
    cfg = moe_model_config()
    assert ModelConfig.from_dict(cfg.to_dict()) == cfg


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(n_routed_experts=4, top_k=5), "top_k=5 exceeds moe.n_routed_experts=4"),
        (dict(n_routed_experts=8, n_group=4, topk_group=5), "topk_group=5 exceeds moe.n_group=4"),
        (dict(n_routed_experts=10, n_group=4), "not divisible by moe.n_group=4"),
        (dict(n_routed_experts=8, n_group=4, topk_group=1, top_k=3), "raise topk_group"),
        (dict(n_routed_experts=4, n_group=4, top_k=1), "at least 2 experts"),
        (dict(n_routed_experts=4, n_group=4, top_k=1, score_func="softmax"), "at least 2 experts"),
        (dict(expert_dim=0), "expert_dim must be positive"),
    ],
)
def test_impossible_moe_configs_fail_on_construction(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        MoEConfig(**kwargs)


def test_first_k_dense_beyond_the_model_is_refused():
    with pytest.raises(ConfigError, match="first_k_dense=4"):
        moe_model_config(first_k_dense=4)


def test_bf16_autocast_runs_the_experts_in_bf16():
    torch.manual_seed(0)
    layer = MoE(16, MoEConfig(n_routed_experts=4, top_k=2, expert_dim=16))
    x = torch.randn(2, 5, 16)
    ref = layer(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(x)
    assert y.dtype == torch.float32  # the residual stream keeps its dtype
    assert (y - ref).abs().max() < 0.05 * ref.abs().max() + 1e-3
    assert not math.isnan(y.sum().item())
