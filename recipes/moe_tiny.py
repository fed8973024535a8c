"""moe_tiny: dense_tiny with DeepSeekMoE feed-forwards, at dense_tiny's active size.

Layer 0 stays dense (DeepSeek keeps its first layers dense). Layers 1-3 hold 16 routed experts of
width 128 plus one shared expert of the same width, 3 routed experts per token. That makes 4 x 128
= 512 active hidden units per token, as in dense_tiny's SwiGLU. Sigmoid routing, aux-loss-free
balancing (u = 1e-3 as in DeepSeek-V3) and a tiny sequence-wise balance loss. Compare it with
dense_tiny: same data, steps and active FLOPs per token, about 2.6x the parameters.
"""

from effllm.model import ModelConfig
from effllm.moe import MoEConfig
from effllm.train import OptimConfig, TrainConfig


def config() -> TrainConfig:
    moe = MoEConfig(n_routed_experts=16, n_shared_experts=1, top_k=3, expert_dim=128, score_func="sigmoid",
                    route_scale=1.0, bias_update_rate=1e-3, seq_aux_loss_weight=1e-4)
    return TrainConfig(
        model=ModelConfig(vocab_size=256, dim=192, n_layers=4, n_heads=6, max_seq_len=256, ffn="moe", moe=moe,
                          first_k_dense=1),
        optim=OptimConfig(lr=3e-3, warmup_steps=50, schedule="cosine"),
        data_dir="data/stdlib",
        out_dir="runs/moe_tiny",
        batch_size=16,
        seq_len=256,
        max_steps=600,
        log_interval=10,
        eval_interval=100,
        eval_tokens=65536,
        ckpt_interval=200,
    )


if __name__ == "__main__":
    import sys

    from effllm.cli import run_recipe

    run_recipe(config(), sys.argv[1:], prog="python recipes/moe_tiny.py")
