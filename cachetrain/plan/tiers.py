"""Where a cache lives, and what that storage delivers: the tiers of the seconds model.

A stage reads its input cache at the rate of the storage holding it (cachetrain/plan/seconds.py
`Rates.read_rate`): the page cache while the cache's stores fit in free RAM, the local disk's cold rate
beyond that, or an object store's when `cache.location` is a URL, every epoch, unless
`cache.remote_copies` keeps each fetched chunk on a local disk for the epochs after the first.

`measure_object_store` measures the last: incompressible probe objects the size of a cache chunk are
PUT and then fetched back with as many requests in flight as the caching pass and the loader keep
(cachetrain/cache/writer.py `REMOTE_PUTS`, cachetrain/cache/feeds.py `REMOTE_THREADS`), under a
prefix of the configured location that is removed afterwards. What the local copies are read at is the
local disk's rates, measured where the copies live (cachetrain/plan/rates.py `measure_disk`).
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import numpy as np

from cachetrain.cache.feeds import REMOTE_THREADS
from cachetrain.cache.location import RemotePath, location, remote_errors
from cachetrain.cache.writer import REMOTE_PUTS

PROBE_BYTES = 64 * 2**20
OBJECT_BYTES = 4 * 2**20  # cache.chunk_mib's default


def cache_root(cfg_location: str, run_path: Path) -> Path | RemotePath:
    """Where the caches of a run live: cache.location, else the run directory (cachetrain/run/layout.py)."""
    return location(cfg_location) if cfg_location else Path(run_path) / "cache"


def local_folder(cfg_location: str, copies: str, run_path: Path) -> Path:
    """The local folder whose disk a run's caches (or, for a remote location, their local copies) are read
    from: the folder to measure with `measure_disk`. A remote location without copies has none: the run
    directory's disk stands in for it (its rates then matter only for nothing)."""
    root = cache_root(cfg_location, run_path)
    if isinstance(root, RemotePath):
        return Path(copies) if copies else Path(run_path)
    return root if cfg_location else Path(run_path)  # <run>/cache is on the run directory's disk


def measure_object_store(root: RemotePath, nbytes: int = PROBE_BYTES, object_bytes: int = OBJECT_BYTES) -> dict:
    """PUT then GET rates (bytes/s) of the object store holding `root`, with `nbytes` of probe objects of
    `object_bytes` each under root/.rates-probe-<pid>/, removed afterwards."""
    count = max(1, nbytes // object_bytes)
    data = np.random.default_rng(0).integers(0, 256, object_bytes, dtype=np.uint8).tobytes()  # nothing to compress
    probe = root / f".rates-probe-{os.getpid()}"
    fs = root.fs
    keys = [f"{probe.key}/{i}" for i in range(count)]
    with remote_errors("measuring the object store's rates", str(probe)):
        try:
            t0 = time.perf_counter()
            fs.pipe({k: data for k in keys}, batch_size=REMOTE_PUTS)
            put = count * object_bytes / (time.perf_counter() - t0)
            t0 = time.perf_counter()
            got = fs.cat(keys, batch_size=REMOTE_THREADS)
            get = sum(len(v) for v in got.values()) / (time.perf_counter() - t0)
        finally:
            probe.rmtree()
    return {"read": get, "write": put}
