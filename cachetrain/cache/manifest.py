"""What a cache store is and how it describes itself.

A stage's cache is a zarr v3 group per split and view, `<run>/cache/stage_<j>/{train,val,test}.zarr` (and
`train_v<v>.zarr` for augmented views: cachetrain.run.layout), each holding
`features` (N, C, H, W), sample-major, chunked along N only, and `labels` (N,). The group's attributes
say what produced the store (stage j, k, the stage's weights hash, its input's fingerprint, dtype,
codec) and whether it is complete. Readers compare the `fingerprint` attribute with the one they
expect from the current checkpoint and name what differs.

Every chunk file ends with the crc32c of its bytes (zarr's Crc32cCodec). A complete store also holds
a checksum manifest, `chunk_crc32c` (uint32, one entry per features chunk, then one for the labels:
the trailing crc32c of each file), and the attribute `content_digest`, the first 16 hex digits of the
sha256 of those crcs in that order (`content_digest()`): two stores with the same digest hold the same
bytes. Both are recomputed from the files whenever the store becomes complete, in the same attribute
update that sets `complete`, so a repair that restores the exact bytes keeps the digest. Readers
check each chunk's crc32c, and its trailing crc against the manifest, before using it
(cachetrain/cache/reader.py).

Store states and their transitions (`CacheState`):

    ABSENT --create--> WRITING --last chunk + labels written and fsynced, manifest + flag set--> COMPLETE
    WRITING/COMPLETE/DAMAGED --producing stage retrained (fingerprint differs)--> STALE --rebuild--> WRITING
    COMPLETE --a chunk or labels file (or the features metadata) lost--> DAMAGED
    DAMAGED --`cachetrain cache --j J --repair` (any caching pass)--> WRITING --missing chunks rewritten--> COMPLETE

DAMAGED is found by a presence check only (a stat of every chunk file, at the size `missing_chunks`
expects; nothing is read), so `status` can afford it. A chunk whose bytes are wrong but whose file is
whole is found when read (reader.py) or by `cachetrain verify`, and `--repair` drops and rewrites it.
A store whose group metadata (`zarr.json`) is missing or unreadable is ABSENT or STALE: nothing in it
can be trusted, and it is rebuilt; readers and `verify` call it "store metadata missing".
A store whose arrays' metadata disagrees with its record (the group attributes), or whose record was
changed after it was written, is DAMAGED (`metadata_mismatch`): refused on open before any chunk is read,
named by `verify` as "store metadata disagrees with its record: ...", and rebuilt by a caching pass.

A store is only ever read as input in state COMPLETE. WRITING survives a crash: zarr's local store
writes each chunk file atomically (temp file + rename), so after a process crash a chunk file that
exists is whole, and a rebuild resumes by writing only the chunks that are missing. A power cut can
also leave a renamed file whose data never reached the disk, so a chunk counts as present only at
its expected size, and COMPLETE is set only once everything it vouches for is fsynced.
"""

from __future__ import annotations

import enum
import functools
import hashlib
import json
import math
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import zarr
from cachetrain.cache.formats import FORMATS, StorageFormat
from cachetrain.cache.location import RemotePath, location, raise_if_transport, zarr_store
from cachetrain.errors import CacheError, Fix

FORMAT_VERSION = 1


class CacheState(enum.Enum):
    ABSENT = "absent"
    WRITING = "writing"
    COMPLETE = "complete"
    STALE = "stale"
    DAMAGED = "damaged"  # marked complete, but a file it vouches for is gone (see the module docstring)


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
    dtype: str  # a name in FORMATS (cachetrain/cache/formats.py)
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
        if fields.get("dtype") not in FORMATS:  # read as unreadable metadata (`_read_attrs`), not a KeyError later
            raise ValueError(f"dtype {fields.get('dtype')!r} is not a storage format (expected one of "
                             f"{', '.join(FORMATS)})")
        info = cls(**fields)
        info.check()
        return info

    def check(self) -> None:
        """Raise ValueError naming the first attribute that no caching pass writes (a wrong type, a count
        below its least value): everything that sizes a read or a loop is sane before anything uses it."""
        def ok(name: str, good: bool) -> None:
            if not good:
                raise ValueError(f"attribute {name} is {getattr(self, name)!r}")

        def count(x, least: int) -> bool:
            return isinstance(x, int) and not isinstance(x, bool) and x >= least
        for name, least in (("stage", 0), ("k", 0), ("num_samples", 1), ("chunk_samples", 1), ("level", 0),
                            ("bitround", 0), ("view", 0), ("format_version", 1)):
            ok(name, count(getattr(self, name), least))
        ok("sample_shape", len(self.sample_shape) == 3 and all(count(d, 1) for d in self.sample_shape))
        for name in ("split", "fingerprint", "weights_hash", "input_fingerprint", "codec"):
            ok(name, isinstance(getattr(self, name), str))
        ok("codec", self.codec in ("zstd", "none"))
        q = self.quant
        ok("quant", q is None or (len(q) == 2 and all(isinstance(v, (int, float)) and not isinstance(v, bool)
                                                      for part in q for v in part)))

    @property
    def storage_format(self) -> StorageFormat:
        return FORMATS[self.dtype]

    @property
    def num_chunks(self) -> int:
        return math.ceil(self.num_samples / self.chunk_samples)

    @property
    def sample_bytes(self) -> int:
        return self.storage_format.sample_bytes(self.sample_shape)

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


# -- the record and the arrays it describes ----------------------------------------------------------
INFO_DIGEST = "info_digest"  # group attribute: `info_digest(info)` of the StoreInfo written with the store


def info_digest(info: StoreInfo) -> str:
    """16 hex digits over the store's record (`StoreInfo.to_attrs`), written beside it: a record changed
    after the store was written (any one attribute) no longer matches it."""
    return hashlib.sha256(json.dumps(info.to_attrs(), sort_keys=True).encode()).hexdigest()[:16]


def array_specs(info: StoreInfo) -> dict[str, dict]:
    """How the caching pass creates a store's `features` and `labels` arrays (zarr `create_array` keyword
    arguments): the one definition the writer creates them from and the checks compare them with."""
    from zarr.codecs import BitRound, Crc32cCodec, ZstdCodec

    codecs = [ZstdCodec(level=info.level)] if info.codec == "zstd" else []
    return {
        "features": dict(shape=(info.num_samples, *info.sample_shape), chunks=(info.chunk_samples, *info.sample_shape),
                         dtype=info.storage_format.numpy_dtype, fill_value=0,
                         filters=[BitRound(keepbits=info.bitround)] if info.bitround else [],
                         compressors=[*codecs, Crc32cCodec()]),
        # the labels: one chunk; the manifest: one crc per features chunk, then the labels'
        "labels": dict(shape=(info.num_samples,), chunks=(info.num_samples,), dtype=np.int64, fill_value=0,
                       compressors=[Crc32cCodec()]),
        CHECKSUMS: dict(shape=(info.num_chunks + 1,), chunks=(info.num_chunks + 1,), dtype=np.uint32, fill_value=0,
                        compressors=[Crc32cCodec()]),
    }


@functools.lru_cache(maxsize=64)
def _expected_metadata(info: StoreInfo) -> dict[str, dict]:
    """The zarr metadata (as JSON) the caching pass writes for each array of a store with this record,
    made by zarr itself in memory, so it is exactly what zarr would write and read back."""
    from zarr.storage import MemoryStore

    group = zarr.open_group(MemoryStore(), mode="w")
    return {name: _as_json(group.create_array(name, **spec).metadata) for name, spec in array_specs(info).items()}


def _as_json(metadata) -> dict:
    return json.loads(json.dumps(metadata.to_dict(), default=str))


def _shown(value) -> str:
    text = json.dumps(value, default=str)
    return text if len(text) <= 60 else text[:50] + "..."


def metadata_mismatch(path: Path, info: StoreInfo, attrs: dict) -> str | None:
    """What in the store at `path` disagrees with its record `info` (its group attributes `attrs`), in
    words, or None. Reads the arrays' zarr.json (and, in a complete store, the checksum manifest), never a
    chunk, and uses nothing of `info` that it has not first found consistent, so a record claiming 10**12
    samples is refused before anything counts its chunks:
    - the record is the one written with the store (`info_digest`; stores older than it have none);
    - the features, labels and manifest arrays' metadata is what the caching pass creates for that record
      (`array_specs`): dtype, shape, chunk shape, codecs, fill value, every field zarr reads;
    - a complete store's `content_digest` is its manifest's."""
    recorded = attrs.get(INFO_DIGEST)
    if recorded is not None and recorded != info_digest(info):
        return "its attributes disagree with the record written with it (info_digest): an attribute was changed"
    if info.format_version != FORMAT_VERSION:
        return f"attributes: format_version is {info.format_version}, expected {FORMAT_VERSION}"
    try:
        expected = _expected_metadata(info)
    except Exception as e:  # noqa: BLE001 - a record no caching pass could have written (an older store's)
        return f"its record describes no store zarr can create ({_one_line(e)})"
    for name, want in expected.items():
        if name == CHECKSUMS and not _exists(path / CHECKSUMS / "zarr.json"):
            if attrs.get("complete") is True and "content_digest" in attrs:  # a store with a digest has one
                return f"{CHECKSUMS}/zarr.json is missing"
            continue
        try:
            got = _as_json(zarr.open_array(zarr_store(path / name, read_only=True), mode="r").metadata)
        except Exception as e:  # noqa: BLE001 - not JSON, a field zarr cannot read, no file
            raise_if_transport(e, path, "reading its metadata")
            return f"{name}/zarr.json is unreadable ({_one_line(e)})"
        if got != want:
            field = next(k for k in sorted(set(got) | set(want)) if got.get(k) != want.get(k))
            return (f"{name}/zarr.json: {field} is {_shown(got.get(field))}, the store's record says "
                    f"{_shown(want.get(field))}")
    if attrs.get("complete") is True and "content_digest" in attrs:
        try:
            manifest = read_manifest(path, info)
        except ValueError as e:
            return f"its checksum manifest is unreadable ({e})"
        if manifest is not None and digest_of(manifest) != attrs["content_digest"]:
            return "attributes: content_digest is not its checksum manifest's digest"
    return None


def _exists(file: Path | RemotePath) -> bool:
    return file.is_file() if isinstance(file, RemotePath) else file.exists()


def _read_attrs(path: Path) -> tuple[dict | None, str | None]:
    """(the group's attributes, None), or (None, what is wrong with its metadata)."""
    if isinstance(path, RemotePath):
        # read as bytes, under remote_errors: a network failure is one line (CacheError), never "unreadable
        # metadata", which would have the store rebuilt from nothing
        try:
            raw = (path / "zarr.json").read_bytes()
        except FileNotFoundError:
            return None, "store metadata missing (zarr.json not found)"
        try:
            attrs = dict(json.loads(raw)["attributes"])  # zarr v3 group metadata
            StoreInfo.from_attrs(attrs)
        except Exception as e:  # noqa: BLE001 - not JSON, not a group, not one of ours
            return None, f"store metadata missing (zarr.json unreadable: {_one_line(e)})"
        return attrs, None
    if not (path / "zarr.json").exists():
        return None, "store metadata missing (zarr.json not found)"
    try:
        attrs = dict(zarr.open_group(zarr_store(path, read_only=True), mode="r").attrs)
        StoreInfo.from_attrs(attrs)
    except Exception as e:  # noqa: BLE001 - unreadable metadata, not one of ours, or an older format
        return None, f"store metadata missing (zarr.json unreadable: {_one_line(e)})"
    return attrs, None


def metadata_problem(path: Path) -> str | None:
    """What is wrong with the metadata of the store at `path` (which exists), or None: its group metadata
    missing or unreadable, or metadata that disagrees with its record (`metadata_mismatch`)."""
    attrs, problem = _read_attrs(path)
    if attrs is None:
        return problem
    mismatch = metadata_mismatch(path, StoreInfo.from_attrs(attrs), attrs)
    return f"store metadata disagrees with its record: {mismatch}" if mismatch else None


def recorded_stage(path: Path) -> int | None:
    """The stage a store's attributes name (for the repair command of a store whose record is not trusted)."""
    attrs, _ = _read_attrs(path)
    stage = attrs.get("stage") if attrs else None
    return stage if isinstance(stage, int) and not isinstance(stage, bool) else None


def store_state(path: Path, expected_fingerprint: str | None) -> tuple[CacheState, StoreInfo | None]:
    """The store's state and its record (None when there is none to trust). A store whose metadata disagrees
    with its record is DAMAGED with no record: it is refused, and a caching pass rebuilds it."""
    attrs, problem = _read_attrs(path)
    if attrs is None:  # no metadata: nothing to resume; unreadable metadata, or an older format: rebuild it
        return (CacheState.ABSENT if problem.endswith("(zarr.json not found)") else CacheState.STALE), None
    info = StoreInfo.from_attrs(attrs)
    if expected_fingerprint is not None and info.fingerprint != expected_fingerprint:
        return CacheState.STALE, info
    if metadata_mismatch(path, info, attrs) is not None:
        return CacheState.DAMAGED, None
    if attrs.get("complete") is not True:
        return CacheState.WRITING, info
    return (CacheState.DAMAGED if damage(path, info) else CacheState.COMPLETE), info


def damage(path: Path, info: StoreInfo) -> str | None:
    """What a store marked complete lacks, in words, or None: the presence check behind DAMAGED (a
    stat per file, nothing read)."""
    try:
        features = zarr.open_array(zarr_store(path / "features", read_only=True), mode="r")
        labels = labels_file(path)
    except Exception as e:  # noqa: BLE001
        raise_if_transport(e, path, "reading its metadata")
        return f"store metadata missing (features or labels metadata unreadable: {_one_line(e)})"
    missing = missing_chunks(path, info, features)
    if missing:
        c = missing[0]
        more = f" (and {len(missing) - 1} more chunks)" if len(missing) > 1 else ""
        return f"chunk {c} (samples {c * info.chunk_samples}-" \
               f"{min((c + 1) * info.chunk_samples, info.num_samples) - 1}) is missing or cut short{more}"
    if not labels.is_file():
        return "the labels file is missing"
    return None


def missing_chunks(path: Path, info: StoreInfo, features=None) -> list[int]:
    """Chunks without a whole file. zarr renames a chunk file into place whole, but a power cut can
    still leave a renamed file whose data never reached the disk: an uncompressed chunk must have its
    exact size (the padded chunk + the 4-byte crc32c), a compressed one more than its checksum."""
    try:
        array = features if features is not None else zarr.open_array(zarr_store(path / "features", read_only=True), mode="r")
    except Exception as e:  # noqa: BLE001 - its metadata is gone: no chunk can be read
        raise_if_transport(e, path, "reading its metadata")
        return list(range(info.num_chunks))
    want = info.raw_chunk_file_bytes if info.codec == "none" else None
    if isinstance(path, RemotePath):  # one listing, not a request per chunk
        sizes = (path / "features").sizes()
        size_of = lambda c: sizes.get(array.metadata.encode_chunk_key((c,) + (0,) * (array.ndim - 1)))  # noqa: E731
    else:
        def size_of(c: int) -> int | None:
            try:
                return os.stat(chunk_file(path, array, c)).st_size
            except FileNotFoundError:
                return None

    def whole(c: int) -> bool:
        size = size_of(c)
        return size is not None and (size == want if want is not None else size > 4)
    return [c for c in range(info.num_chunks) if not whole(c)]


def chunk_file(store: Path, features, c: int) -> Path:
    """The file of chunk c of a store's `features` array (a local store: one file per chunk)."""
    return store / "features" / features.metadata.encode_chunk_key((c,) + (0,) * (features.ndim - 1))


def labels_file(store: Path) -> Path:
    """The file holding a store's labels (one chunk)."""
    labels = zarr.open_array(zarr_store(store / "labels", read_only=True), mode="r")
    return store / "labels" / labels.metadata.encode_chunk_key((0,))


# -- the checksum manifest ---------------------------------------------------------------------------
CHECKSUMS = "chunk_crc32c"  # the manifest array: features chunks 0..n-1, then the labels


def trailing_crc32c(file: Path | str | RemotePath) -> int | None:
    """The crc32c zarr appended to a chunk file (its last 4 bytes, little-endian); None if it has none."""
    if isinstance(file, RemotePath):
        tail = file.read_bytes(-4)
        return int.from_bytes(tail, "little") if len(tail) == 4 else None  # a suffix range: all of a shorter one
    with open(file, "rb") as f:
        if f.seek(0, os.SEEK_END) < 4:
            return None
        f.seek(-4, os.SEEK_END)
        return int.from_bytes(f.read(4), "little")


def file_checksums(path: Path, info: StoreInfo) -> np.ndarray:
    """The trailing crc32c of every features chunk file, then of the labels file, as the manifest holds
    them. Raises CacheError naming a file that is missing or shorter than its checksum."""
    features = zarr.open_array(zarr_store(path / "features", read_only=True), mode="r")
    files = [chunk_file(path, features, c) for c in range(info.num_chunks)] + [labels_file(path)]
    crcs = np.zeros(len(files), dtype=np.uint32)
    # an object store answers the requests together; a local file is one short read each
    tails = path.tails(files, 4) if isinstance(path, RemotePath) else None
    for i, file in enumerate(files):
        if tails is not None:
            crc = int.from_bytes(tails[i], "little") if tails[i] is not None and len(tails[i]) == 4 else None
        else:
            try:
                crc = trailing_crc32c(file)
            except FileNotFoundError:
                crc = None
        if crc is None:
            raise CacheError(f"{path}: {file} is missing or shorter than its checksum",
                             Fix.of("cache", j=info.stage, repair=True))
        crcs[i] = crc
    return crcs


def digest_of(checksums: np.ndarray) -> str:
    """`content_digest` of a manifest: sha256 over the crcs (uint32 little-endian, in manifest order)."""
    return hashlib.sha256(np.asarray(checksums, dtype="<u4").tobytes()).hexdigest()[:16]


def read_manifest(path: Path, info: StoreInfo) -> np.ndarray | None:
    """The store's checksum manifest (num_chunks + 1 crcs), or None when it has none (written before
    manifests existed). Raises ValueError when it exists but cannot be read or does not fit the store."""
    if not (path / CHECKSUMS / "zarr.json").exists():
        return None
    try:
        crcs = zarr.open_array(zarr_store(path / CHECKSUMS, read_only=True), mode="r")[:]  # its own crc32c is checked by zarr
    except Exception as e:  # noqa: BLE001
        raise_if_transport(e, path, "reading its checksum manifest")
        raise ValueError(_one_line(e)) from None
    if crcs.shape != (info.num_chunks + 1,) or crcs.dtype != np.uint32:
        raise ValueError(f"expected {info.num_chunks + 1} uint32 crcs, found {crcs.dtype} {crcs.shape}")
    return crcs


def content_digest(path: Path) -> str | None:
    """The `content_digest` of the complete store at `path`: 16 hex digits that change whenever the
    bytes of any chunk or of the labels do. None when the store has none (missing, not complete, or
    written before digests existed). Reads the group metadata only: it does not check the files (a
    DAMAGED store still reports the digest of what it should hold; `cachetrain verify` checks that)."""
    attrs, _ = _read_attrs(location(path))
    if attrs is None or attrs.get("complete") is not True:
        return None
    digest = attrs.get("content_digest")
    return digest if isinstance(digest, str) else None


def _one_line(e: BaseException) -> str:
    text = str(e).splitlines()[0] if str(e) else type(e).__name__
    return text[:120]


def disk_bytes(path: Path | RemotePath) -> int:
    if isinstance(path, RemotePath):
        return sum(path.sizes().values())
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) if path.exists() else 0
