"""What this machine offers: the torch device, mixed precision, and NVIDIA DALI (extra `cachetrain[dali]`),
in one place for the trainer, the caching pass and the loaders."""

from __future__ import annotations

from contextlib import nullcontext

import torch

from cachetrain.errors import ConfigError, DaliMissing


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


INSTALL = "pip install 'cachetrain[dali]'"


def require_dali():
    try:
        import nvidia.dali  # noqa: F401
    except ImportError:
        raise DaliMissing(f"loader.backend: 'dali' needs NVIDIA DALI, which is not installed; install it with: "
                          f"{INSTALL}") from None
    import nvidia.dali as dali
    return dali


def dali_available() -> bool:
    try:
        require_dali()
        return True
    except DaliMissing:
        return False


def dali_device_id(device: torch.device) -> int | None:
    return (device.index or 0) if device.type == "cuda" else None
