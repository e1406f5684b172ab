"""Storage formats: how a cache store holds stage outputs, one class per format, in one registry.

A format (`cache.dtype`, the `dtype` attribute of a store) says everything that depends on the
storage dtype, modelled on zarr v3's codec classes (each knows its own encode and decode):
- `numpy_dtype`: what the chunk files hold (zarr's data type); `torch_dtype`: what the loader's
  batches hold before `decode`; `itemsize`: bytes per element, so `sample_bytes` of a shape;
- `encode(y, quant)`: stage outputs (any device) -> a new host array of `numpy_dtype` (the writer);
- `as_tensor(block)`: a raw numpy block read from a chunk -> a tensor of `torch_dtype`, no copy;
- `decode(x, quant)`: a batch of `torch_dtype`, or a float32 copy of one -> float32 on x's device;
- `calibrated`: whether the caching pass must first fix a per-channel (scale, offset) (`quant`);
- `tag(cache)`: the storage part of the output fingerprint: everything about the storage that changes
  the values a reader gets back, so stores written another way are stale;
- `dali`: the nvidia.dali.types name the DALI loader reads the format as, or None.

Adding a format is a class here and its name in `CacheConfig.dtype` (cachetrain/config.py, which stays
a leaf module and so cannot read this registry; tests/test_formats.py checks the two agree).

The bytes and attributes of a store never depend on this module's layout: a store written before it
existed reads back the same (tests/test_cache.py and tests/test_storage.py write and read every format).
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, ClassVar

import numpy as np
import torch

from cachetrain.cache.quant import Quant, dequantize, quantize

if TYPE_CHECKING:
    from cachetrain.config import CacheConfig


def _to_host(y: torch.Tensor) -> np.ndarray:
    """A device tensor as a new host array. From CUDA through pinned memory: on the H200 host a pageable
    device-to-host copy moved 1.3 GB/s, slower than the writer. torch's caching host allocator hands
    the pinned block back once the writer has dropped the array, so pinning costs once per pass."""
    if y.device.type != "cuda":
        return y.cpu().numpy()
    host = torch.empty(y.shape, dtype=y.dtype, pin_memory=True)
    host.copy_(y)  # synchronous: whole when it returns
    return host.numpy()


class StorageFormat:
    """A float format stored as itself (float16, float32); subclasses change what differs."""

    name: ClassVar[str]
    numpy_dtype: ClassVar[np.dtype]
    torch_dtype: ClassVar[torch.dtype]
    dali: ClassVar[str | None] = None
    calibrated: ClassVar[bool] = False

    @property
    def itemsize(self) -> int:
        return self.numpy_dtype.itemsize

    def sample_bytes(self, shape: tuple[int, ...]) -> int:
        """Bytes of one stored sample of `shape` (uncompressed)."""
        return math.prod(shape) * self.itemsize

    def encode(self, y: torch.Tensor, quant: Quant | None = None) -> np.ndarray:
        return _to_host(y.to(self.torch_dtype))

    def as_tensor(self, block: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(block)

    def decode(self, x: torch.Tensor, quant: Quant | None = None) -> torch.Tensor:
        # a float32 x (the loader's channels-last copy) comes back as itself: one pass per batch
        return x.float()

    def tag(self, cache: CacheConfig) -> str:
        return self.name + (f"/bitround{cache.bitround}" if cache.bitround else "")

    def __repr__(self) -> str:
        return f"StorageFormat({self.name!r})"


class Float16(StorageFormat):
    name, numpy_dtype, torch_dtype, dali = "float16", np.dtype(np.float16), torch.float16, "FLOAT16"


class Float32(StorageFormat):
    name, numpy_dtype, torch_dtype, dali = "float32", np.dtype(np.float32), torch.float32, "FLOAT"


class BFloat16(StorageFormat):
    """numpy has no bfloat16: the files hold the raw bits as uint16, which torch reinterprets (through
    int16: torch.from_numpy takes no uint16 in older torch)."""

    name, numpy_dtype, torch_dtype = "bfloat16", np.dtype(np.uint16), torch.bfloat16

    def encode(self, y: torch.Tensor, quant: Quant | None = None) -> np.ndarray:
        return _to_host(y.to(torch.bfloat16).view(torch.int16)).view(self.numpy_dtype)

    def as_tensor(self, block: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(block.view(np.int16)).view(torch.bfloat16)


class Uint8(StorageFormat):
    """Per-channel affine quantisation (cachetrain/cache/quant.py), with the store's (scale, offset)."""

    name, numpy_dtype, torch_dtype = "uint8", np.dtype(np.uint8), torch.uint8
    calibrated = True

    def encode(self, y: torch.Tensor, quant: Quant | None = None) -> np.ndarray:
        return _to_host(quantize(y, self._needs(quant)))

    def decode(self, x: torch.Tensor, quant: Quant | None = None) -> torch.Tensor:
        # in place when x is already a float32 copy: the loader hands it one
        return dequantize(x, self._needs(quant))

    def tag(self, cache: CacheConfig) -> str:
        return super().tag(cache) + f"/p{cache.quant_percentile}/{cache.quant_batches}"

    @staticmethod
    def _needs(quant: Quant | None) -> Quant:
        if not quant:
            raise ValueError("uint8 storage needs the store's per-channel (scale, offset); got none")
        return quant


# in the order of CacheConfig.dtype's choices (the CLI offers them in this order)
FORMATS: dict[str, StorageFormat] = {f.name: f for f in (Float16(), BFloat16(), Float32(), Uint8())}


def storage_tag(cache: CacheConfig) -> str:
    """The storage part of the output fingerprint for a cache configuration (`StorageFormat.tag`)."""
    return FORMATS[cache.dtype].tag(cache)
