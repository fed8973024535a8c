"""deepseek_tiny_fp8: deepseek_tiny widened so that its linears fit FP8 block scaling, run in FP8.

At deepseek_tiny's width of 192 no linear is a multiple of 128, so `--fp8` would convert nothing.
This recipe keeps deepseek_tiny's design (MLA + DeepSeekMoE with layer 0 dense + one MTP module,
same data, steps and schedule) at width 256: 4 heads of 32+32 (nope + RoPE) query/key and 32 value
dims, a 128-wide kv latent, a dense layer-0 SwiGLU of 512 and 16 routed experts of 128 (top-3, one
shared). With fp8=True these GEMMs run in FP8 on the PyTorch reference path on a CPU and on the Triton
kernels on sm_89+ GPUs: the query, kv up- and output projections, the dense and shared-expert
SwiGLUs, the routed experts' grouped GEMMs and the MTP projection. Kept in higher precision: the
256 -> 160 kv down-projection (160 is not a multiple of 128), routers, norms, embedding and head.

`effllm train deepseek_tiny_fp8 --no-fp8` is the same run in full precision, for comparison.
"""

from dataclasses import replace

from effllm.config import TrainConfig
from effllm.mla import MLAConfig
from effllm.recipes import deepseek_tiny


def config() -> TrainConfig:
    base = deepseek_tiny.config()
    mla = MLAConfig(q_lora_rank=0, kv_lora_rank=128, qk_nope_head_dim=32, qk_rope_head_dim=32,
                    v_head_dim=32)
    model = replace(base.model, dim=256, n_heads=4, mla=mla, ffn_hidden_dim=512)
    return replace(base, model=model, fp8=True, out_dir="runs/deepseek_tiny_fp8")


if __name__ == "__main__":
    import sys

    from effllm.cli import run_recipe

    run_recipe(config(), sys.argv[1:], prog="python recipes/deepseek_tiny_fp8.py")
