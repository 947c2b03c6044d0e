"""The radix-key codec of the global selection, shared by the plain-torch reference (`surgery.select`) and the
Triton kernels (`surgery.kernels.triton_select`): fp32 scores as order-preserving integer keys, and back."""

from __future__ import annotations

import math

import torch


def order_keys(scores: torch.Tensor) -> torch.Tensor:
    """Map fp32 scores to int64 keys in [0, 2^32) with the same order as the numbers.

    The fp32 bit pattern read as an integer orders positive floats correctly and negative floats
    backwards; flipping the magnitude bits of negatives and then the sign bit fixes both. -0.0 becomes
    +0.0 and NaN -inf first, so equal scores get equal keys. The Triton kernels use the same map.
    """
    s = scores.to(torch.float32, copy=True)
    s.masked_fill_(s.isnan(), -math.inf).masked_fill_(s == 0, 0.0)
    bits = s.view(torch.int32)
    signed = bits ^ ((bits >> 31) & 0x7FFFFFFF)  # two's-complement order == float order
    return signed.to(torch.int64) + (1 << 31)  # shift to unsigned so radix digits are plain bit fields


def key_to_float(key: int) -> float:
    """Inverse of `order_keys` for one key."""
    signed = key - (1 << 31)
    bits = signed ^ 0x7FFFFFFF if signed < 0 else signed
    return torch.tensor([bits], dtype=torch.int64).to(torch.int32).view(torch.float32).item()


def pick_digit(hist: torch.Tensor, need: int) -> tuple[int, int]:
    """In a histogram of radix digits, the digit d holding the `need`-th largest element.

    Returns (d, need - count of elements with a digit above d): how many of bucket d are still wanted.
    """
    at_or_above = hist.flip(0).cumsum(0).flip(0)  # at_or_above[d] = count with digit >= d
    d = int((at_or_above >= need).nonzero().max())
    return d, need - int(at_or_above[d] - hist[d])
