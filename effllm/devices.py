"""Devices: which one a run uses, its autocast dtype, and its peak memory."""

from __future__ import annotations

import resource

import torch

from effllm.errors import ConfigError


def resolve_device(name: str) -> torch.device:
    """"auto" = the GPU when one is visible, else the CPU; any other name is checked and taken."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device={name!r} asked for but no CUDA GPU is visible: pass --device cpu")
    return device


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype, or None for plain fp32."""
    if precision == "bf16" or (precision == "auto" and device.type == "cuda"):
        return torch.bfloat16
    return None


def peak_memory_bytes(device: torch.device) -> int:
    """Peak CUDA memory allocated by tensors on a GPU; peak resident memory of the process on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
