"""moe_tiny: dense_tiny with DeepSeekMoE feed-forwards, at dense_tiny's active size.

Everything but the feed-forwards is dense_tiny's: data, steps, batch, schedule, attention. Layer 0
stays dense (DeepSeek keeps its first layers dense). Layers 1-3 hold 16 routed experts of width 128
plus one shared expert of the same width, 3 routed experts per token. That makes 4 x 128 = 512
active hidden units per token, as in dense_tiny's SwiGLU. Sigmoid routing, aux-loss-free balancing
(u = 1e-3 as in DeepSeek-V3) and a tiny sequence-wise balance loss. About 2.6x dense_tiny's
parameters at the same active FLOPs per token.
"""

from dataclasses import replace

from effllm.config import TrainConfig
from effllm.moe import MoEConfig
from effllm.recipes import dense_tiny


def config() -> TrainConfig:
    base = dense_tiny.config()
    moe = MoEConfig(n_routed_experts=16, n_shared_experts=1, top_k=3, expert_dim=128, score_func="sigmoid",
                    route_scale=1.0, bias_update_rate=1e-3, seq_aux_loss_weight=1e-4)
    return replace(base, model=replace(base.model, ffn="moe", moe=moe, first_k_dense=1), out_dir="runs/moe_tiny")


if __name__ == "__main__":
    import sys

    from effllm.cli import run_recipe

    run_recipe(config(), sys.argv[1:], prog="python recipes/moe_tiny.py")
