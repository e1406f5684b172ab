"""Device choice and mixed precision, in one place for the trainer and the caching pass."""

from __future__ import annotations

from contextlib import nullcontext

import torch

from cachetrain.config import ConfigError


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("train.device: expected 'auto' or 'cpu' on this machine (torch sees no CUDA device), "
                          "got 'cuda'")
    return torch.device(name)


def autocast(device: torch.device, amp: bool):
    """bf16 autocast on CUDA when asked; on the CPU, plain fp32 (deterministic, and what the tests pin)."""
    return torch.autocast("cuda", dtype=torch.bfloat16) if amp and device.type == "cuda" else nullcontext()
