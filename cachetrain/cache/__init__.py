"""The feature cache: a manifest (what a store is), a writer (the caching pass) and a reader."""

import warnings

from zarr.errors import ZarrUserWarning

# BitRound (cache.bitround) is a numcodecs codec outside the zarr v3 spec; zarr warns on every open of
# such an array. These stores are read by cachetrain only, so the warning says nothing actionable.
warnings.filterwarnings("ignore", message="Numcodecs codecs are not in the Zarr version 3", category=ZarrUserWarning)

from cachetrain.cache.manifest import (CacheError, CacheState, Layout, StoreInfo, disk_bytes, plan_layout,
                                       output_fingerprint, store_state, weights_hash)
from cachetrain.cache.reader import CacheReader
from cachetrain.cache.writer import write_store

__all__ = ["CacheError", "CacheReader", "CacheState", "Layout", "StoreInfo", "disk_bytes", "plan_layout",
           "output_fingerprint", "store_state", "weights_hash", "write_store"]
