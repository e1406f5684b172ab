"""The feature cache: a manifest (what a store is), a writer (the caching pass) and a reader."""

from cachetrain.cache.manifest import (CacheError, CacheState, Layout, StoreInfo, disk_bytes, plan_layout,
                                       output_fingerprint, store_state, weights_hash)
from cachetrain.cache.reader import CacheReader
from cachetrain.cache.writer import write_store

__all__ = ["CacheError", "CacheReader", "CacheState", "Layout", "StoreInfo", "disk_bytes", "plan_layout",
           "output_fingerprint", "store_state", "weights_hash", "write_store"]
