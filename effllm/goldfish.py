"""Goldfish loss (Hans et al., 2024, "Be like a Goldfish, Don't Memorize!"; used to train Apertus).

A pseudo-random 1/k of the target positions is dropped from the training loss, so the model never
gets a gradient for those tokens and cannot learn a training document verbatim. Which positions
drop is decided by a hash of the h tokens before each target, not by a random draw: the same text
drops the same positions every time it is seen (in another batch, at another offset, in a
duplicate), which is what keeps repeated documents from being memorised.

Target t (the token after input t) is dropped when hash(inputs[t-h+1 .. t]) mod k == 0. The first
h-1 positions of a window have fewer than h tokens before them inside the window and are always
kept, so the decision never depends on where a window starts.

The hash: a polynomial rolling hash modulo the prime 2^31 - 1 over the h token ids, then a
multiplicative (Knuth) mix to 32 bits; int64 arithmetic throughout, the same on every device.
"""

from __future__ import annotations

import torch

_PRIME = 2**31 - 1
_BASE = 1_000_003
_MIX = 2_654_435_761  # Knuth's multiplicative constant, 2^32 / golden ratio


def goldfish_drop(inputs: torch.Tensor, k: int, h: int) -> torch.Tensor:
    """inputs (B, T) token ids -> (B, T) bool, True where target t is dropped from the loss."""
    if k < 2 or h < 1:
        raise ValueError(f"goldfish needs k >= 2 and h >= 1, got k={k}, h={h}")
    B, T = inputs.shape
    drop = torch.zeros(B, T, dtype=torch.bool, device=inputs.device)
    if T < h:
        return drop
    windows = inputs.long().unfold(1, h, 1)  # (B, T-h+1, h): window j ends at input position j+h-1
    acc = torch.zeros(windows.shape[:2], dtype=torch.int64, device=inputs.device)
    for i in range(h):
        acc = (acc * _BASE + windows[..., i] % _PRIME) % _PRIME
    mixed = (acc * _MIX) % 2**32
    drop[:, h - 1:] = mixed % k == 0
    return drop


def apply_goldfish(inputs: torch.Tensor, targets: torch.Tensor, k: int, h: int) -> torch.Tensor:
    """targets with the dropped positions set to -1 (the models' ignore_index)."""
    return targets.masked_fill(goldfish_drop(inputs, k, h), -1)
