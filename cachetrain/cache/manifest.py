"""What a cache store is and how it describes itself.

A stage's cache is two zarr v3 groups, `<run>/cache/stage_<j>/{train,test}.zarr`, each holding
`features` (N, C, H, W), sample-major, chunked along N only, and `labels` (N,). The group's attributes
say what produced the store (stage j, k, the stage's weights hash, its input's fingerprint, dtype,
codec) and whether it is complete. Readers compare the `fingerprint` attribute with the one they
expect from the current checkpoint and name what differs.

Store states and their transitions (`CacheState`):

    ABSENT --create--> WRITING --last chunk + labels written and fsynced, flag set--> COMPLETE
    WRITING/COMPLETE --producing stage retrained (fingerprint differs)--> STALE --rebuild--> WRITING

A store is only ever read as input in state COMPLETE. WRITING survives a crash: zarr's local store
writes each chunk file atomically (temp file + rename), so after a process crash a chunk file that
exists is whole, and a rebuild resumes by writing only the chunks that are missing. A power cut can
also leave a renamed file whose data never reached the disk, so a chunk counts as present only at
its expected size, and COMPLETE is set only once everything it vouches for is fsynced.
"""

from __future__ import annotations

import enum
import hashlib
import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import zarr

FORMAT_VERSION = 1
# storage dtype -> (numpy dtype on disk, torch dtype the loader reinterprets it as)
DTYPES = {
    "float16": (np.float16, torch.float16),
    "float32": (np.float32, torch.float32),
    "bfloat16": (np.uint16, torch.bfloat16),  # numpy has no bfloat16: raw bits in uint16
    "uint8": (np.uint8, torch.uint8),  # with per-channel scale and offset (StoreInfo.quant)
}


class CacheError(RuntimeError):
    """A cache that cannot be used as asked, phrased as one line for the user."""


class CacheState(enum.Enum):
    ABSENT = "absent"
    WRITING = "writing"
    COMPLETE = "complete"
    STALE = "stale"


@dataclass(frozen=True)
class StoreInfo:
    """The attributes of one store. `fingerprint` identifies what produced the features (the same for
    the train and test stores of a stage); everything else describes the layout."""

    stage: int
    k: int
    split: str
    fingerprint: str
    weights_hash: str
    input_fingerprint: str
    dtype: str
    codec: str
    level: int
    num_samples: int
    sample_shape: tuple[int, int, int]
    chunk_samples: int
    bitround: int = 0
    view: int = 0  # training-set view (0: plain pass; v > 0: pass v with stage-0 augmentation)
    quant: tuple[tuple[float, ...], tuple[float, ...]] | None = None  # uint8: per-channel (scale, offset)
    format_version: int = FORMAT_VERSION

    def to_attrs(self) -> dict:
        attrs = {**asdict(self), "sample_shape": list(self.sample_shape)}
        attrs["quant"] = [list(q) for q in self.quant] if self.quant else None
        return attrs

    @classmethod
    def from_attrs(cls, attrs: dict) -> StoreInfo:
        fields = {k: attrs[k] for k in cls.__dataclass_fields__ if k in attrs}
        fields["sample_shape"] = tuple(fields["sample_shape"])
        if fields.get("quant"):
            fields["quant"] = tuple(tuple(q) for q in fields["quant"])
        return cls(**fields)

    @property
    def num_chunks(self) -> int:
        return math.ceil(self.num_samples / self.chunk_samples)

    @property
    def sample_bytes(self) -> int:
        return math.prod(self.sample_shape) * np.dtype(DTYPES[self.dtype][0]).itemsize

    @property
    def raw_chunk_file_bytes(self) -> int:
        """An uncompressed chunk file: the chunk's raw bytes (the last one padded) and its 4-byte crc32c."""
        return self.chunk_samples * self.sample_bytes + 4


def output_fingerprint(stage: int, weights_hash: str, input_fingerprint: str, dtype: str) -> str:
    """The fingerprint of stage j's outputs as the next stage sees them: a function of everything that
    determines them (`dtype` names the storage, with its rounding options, or "recomputed")."""
    blob = json.dumps([FORMAT_VERSION, stage, weights_hash, input_fingerprint, dtype])
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def weights_hash(module: torch.nn.Module) -> str:
    """sha256 over the stage's parameters and buffers (BN running stats included: they shape the output)."""
    h = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        h.update(name.encode())
        h.update(tensor.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


@dataclass(frozen=True)
class Layout:
    """How a split is chunked and computed. A chunk holds whole samples; the caching pass forwards
    `forward_batch` samples at a time and hands whole groups of `group_chunks` chunks to the writer.
    Batches always start at multiples of `forward_batch` from a group boundary, so recomputing one
    group after a crash sees exactly the batches the first attempt saw (bit-identical output)."""

    chunk_samples: int
    group_chunks: int
    forward_batch: int


def plan_layout(sample_bytes: int, chunk_mib: float, num_samples: int, batch_size: int) -> Layout:
    """Aim chunks at `chunk_mib`: big enough to amortise per-chunk costs, small enough that a window of
    a few chunks fits in memory and shuffles well."""
    target = max(1, round(chunk_mib * 2**20 / sample_bytes))
    if target >= batch_size:  # small samples: a chunk is several forward batches
        cs = min(num_samples, target // batch_size * batch_size)
        return Layout(cs, 1, batch_size)
    group = max(1, batch_size // target)  # big samples: a forward batch is several chunks
    return Layout(min(num_samples, target), group, min(num_samples, target) * group)


def store_state(path: Path, expected_fingerprint: str | None) -> tuple[CacheState, StoreInfo | None]:
    if not (path / "zarr.json").exists():
        return CacheState.ABSENT, None
    try:
        attrs = dict(zarr.open_group(str(path), mode="r").attrs)
        info = StoreInfo.from_attrs(attrs)
    except Exception:  # noqa: BLE001 - unreadable metadata, not one of ours, or an older format: rebuild it
        return CacheState.STALE, None
    if expected_fingerprint is not None and info.fingerprint != expected_fingerprint:
        return CacheState.STALE, info
    return (CacheState.COMPLETE if attrs.get("complete") is True else CacheState.WRITING), info


def chunk_file(store: Path, features, c: int) -> Path:
    """The file of chunk c of a store's `features` array (a local store: one file per chunk)."""
    return store / "features" / features.metadata.encode_chunk_key((c,) + (0,) * (features.ndim - 1))


def disk_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) if path.exists() else 0
