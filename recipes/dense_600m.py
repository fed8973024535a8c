"""dense_600m: the dense model with deepseek_600m's total parameters (618M against 619M).

12 layers of width 2048, 16 heads of 128, SwiGLU of width 5632: about 4.8x the FLOPs per token of
deepseek_600m. It answers "what would the same parameter budget cost dense?". Data, tokens per step,
steps and schedule are deepseek_600m's, with a lower learning rate for the wider model.
"""

from dataclasses import replace

from effllm.config import TrainConfig
from effllm.model import ModelConfig
from effllm.recipes import deepseek_600m


def config() -> TrainConfig:
    base = deepseek_600m.config()
    model = ModelConfig(vocab_size=256, dim=2048, n_layers=12, n_heads=16, max_seq_len=1024, ffn_hidden_dim=5632,
                        tie_embeddings=False)
    return replace(base, model=model, optim=replace(base.optim, lr=3e-4), out_dir="runs/dense_600m")


if __name__ == "__main__":
    import sys

    from effllm.cli import run_recipe

    run_recipe(config(), sys.argv[1:], prog="python recipes/dense_600m.py")
