"""dense_tiny_wide: the dense model with deepseek_tiny's total parameters (4.67M against 4.64M).

dense_tiny at width 320 (5 heads of 64, SwiGLU of 768): about 2.5x the FLOPs per token of
deepseek_tiny and dense_tiny. It answers "what would the same parameter budget cost dense?" at
the CPU size; dense_600m asks the same at the GPU size. Data, steps, batch and schedule are
dense_tiny's.
"""

from dataclasses import replace

from effllm.config import TrainConfig
from effllm.recipes import dense_tiny


def config() -> TrainConfig:
    base = dense_tiny.config()
    model = replace(base.model, dim=320, n_heads=5, ffn_hidden_dim=768)
    return replace(base, model=model, out_dir="runs/dense_tiny_wide")


if __name__ == "__main__":
    import sys

    from effllm.cli import run_recipe

    run_recipe(config(), sys.argv[1:], prog="python recipes/dense_tiny_wide.py")
