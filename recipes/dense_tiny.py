"""dense_tiny: the default recipe, a small dense Transformer on the embedded corpus.

Sized to train on 2 CPU cores in about four minutes with byte-level tokens; on a GPU it runs in
seconds. It is the dense baseline of moe_tiny and deepseek_tiny, with their active parameters
(1.82M against 1.83M and 1.77M) and forward FLOPs per token (4.03M against 4.05M and 4.03M at
256 tokens). deepseek_tiny's MTP module adds training FLOPs that plain inference does not pay.
"""

from effllm.config import OptimConfig, TrainConfig
from effllm.model import ModelConfig


def config() -> TrainConfig:
    return TrainConfig(
        model=ModelConfig(vocab_size=256, dim=192, n_layers=4, n_heads=6, max_seq_len=256),
        optim=OptimConfig(lr=3e-3, warmup_steps=50, schedule="cosine"),
        data_dir="data/stdlib",
        out_dir="runs/dense_tiny",
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

    run_recipe(config(), sys.argv[1:], prog="python recipes/dense_tiny.py")
