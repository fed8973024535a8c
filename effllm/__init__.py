"""effllm: train language models with DeepSeek's efficiency techniques.

The promised API is re-exported here; everything else is reachable by module but may change.
Importing effllm does no work: no CUDA calls, no compiler flags, no global state.
"""

from effllm.config import OptimConfig, TrainConfig
from effllm.errors import (
    CheckpointError,
    ConfigError,
    DataError,
    EffllmError,
    OutputError,
    TrainingDiverged,
    TrainingInterrupted,
)
from effllm.fp8 import FP8Linear, convert_to_fp8
from effllm.mla import MLA, MLAConfig
from effllm.model import ModelConfig, Transformer
from effllm.moe import MoE, MoEConfig, attach_balancing
from effllm.train import train

__version__ = "0.1.0"

__all__ = [
    "Transformer",
    "ModelConfig",
    "MoE",
    "attach_balancing",
    "MLA",
    "FP8Linear",
    "convert_to_fp8",
    "MLAConfig",
    "MoEConfig",
    "TrainConfig",
    "OptimConfig",
    "train",
    "EffllmError",
    "ConfigError",
    "DataError",
    "CheckpointError",
    "OutputError",
    "TrainingDiverged",
    "TrainingInterrupted",
]
