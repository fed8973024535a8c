"""dense_120m: the dense baseline of deepseek_600m with the same active parameters and FLOPs.

deepseek_600m with a dense SwiGLU of width 1920 in every layer and MHA (16 heads of 64) in place of
MLA: 121M parameters against deepseek_600m's 118M active, and 0.268 against 0.267 forward GFLOPs
per token at 1,024 tokens. Data, batch, steps and schedule are deepseek_600m's.
"""

from dataclasses import replace

from effllm.config import TrainConfig
from effllm.model import ModelConfig
from effllm.recipes import deepseek_600m


def config() -> TrainConfig:
    base = deepseek_600m.config()
    model = ModelConfig(vocab_size=256, dim=1024, n_layers=12, n_heads=16, max_seq_len=1024, ffn_hidden_dim=1920,
                        tie_embeddings=False)
    return replace(base, model=model, out_dir="runs/dense_120m")


if __name__ == "__main__":
    import sys

    from effllm.cli import run_recipe

    run_recipe(config(), sys.argv[1:], prog="python recipes/dense_120m.py")
