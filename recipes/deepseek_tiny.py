"""deepseek_tiny: the DeepSeek-V3 recipe in miniature: MLA + DeepSeekMoE + multi-token prediction.

It is moe_tiny (dense_tiny's data, steps, batch and schedule, with MoE feed-forwards at the same
active size and layer 0 dense) with two changes:
- multi-head latent attention: 6 heads, a 64-wide kv latent and 16-wide decoupled RoPE keys, so
  the cache holds 80 numbers per token and layer against dense_tiny's 384;
- one MTP module, with loss weight 0.3 as in DeepSeek-V3.
The MTP module also drafts for self-speculative decoding.
"""

from dataclasses import replace

from effllm.config import TrainConfig
from effllm.mla import MLAConfig
from effllm.recipes import moe_tiny


def config() -> TrainConfig:
    base = moe_tiny.config()
    mla = MLAConfig(q_lora_rank=0, kv_lora_rank=64, qk_nope_head_dim=32,
                    qk_rope_head_dim=16, v_head_dim=32)
    model = replace(base.model, attention="mla", mla=mla, mtp_depth=1, mtp_lambda=0.3)
    return replace(base, model=model, out_dir="runs/deepseek_tiny")


if __name__ == "__main__":
    import sys

    from effllm.cli import run_recipe

    run_recipe(config(), sys.argv[1:], prog="python recipes/deepseek_tiny.py")
