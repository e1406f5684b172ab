"""zarr 3.1 (what Python 3.11 resolves) and zarr 3.4 (3.12, 3.13) side by side: where the two differ, the
cache's own code still agrees with zarr, whichever is installed. CI runs this file on every Python.

Known difference: a bytes codec's byte order is an `Endian` enum in zarr 3.1 and a plain string in 3.4.
The writer's direct path (uncompressed chunks written without zarr) must apply to little-endian arrays only;
under 3.4 an earlier check took "big" for "little" and wrote byte-swapped values that zarr then read back.
"""

from __future__ import annotations

import numpy as np
import pytest
import zarr
from google_crc32c import value as crc32c
from zarr.codecs import BytesCodec, Crc32cCodec

from cachetrain.cache.writer import BackgroundWriter


@pytest.mark.parametrize("dtype", ["float16", "float32", "uint8"])
@pytest.mark.parametrize("endian", ["little", "big"])
def test_writer_writes_what_zarr_reads_in_either_byte_order(tmp_path, dtype, endian):
    values = (np.arange(70 * 6) % 251).reshape(70, 2, 3).astype(dtype)  # 70 = two chunks of 32 and a short one
    with zarr.config.set({"array.write_empty_chunks": True}):
        array = zarr.create_array(str(tmp_path / "a"), shape=values.shape, chunks=(32, 2, 3), dtype=dtype,
                                  fill_value=0, serializer=BytesCodec(endian=endian), compressors=[Crc32cCodec()])
    writer = BackgroundWriter(array, lambda c: tmp_path / "a" / array.metadata.encode_chunk_key((c, 0, 0)))
    # the case this file is for: little-endian takes the direct path, a multi-byte big-endian one never does
    # (a one-byte dtype has no byte order: zarr versions differ on whether it records one)
    if endian == "little":
        assert writer.direct
    elif dtype != "uint8":
        assert not writer.direct
    writer.put(0, values[:64])
    writer.put(64, values[64:])
    writer.close()

    assert np.array_equal(zarr.open_array(str(tmp_path / "a"), mode="r")[:], values)
    # the first chunk's file, computed by hand: its elements in the array's byte order, then their crc32c
    order = "<" if endian == "little" else ">"
    payload = values[:32].astype(np.dtype(dtype).newbyteorder(order)).tobytes()
    assert (tmp_path / "a" / "c" / "0" / "0" / "0").read_bytes() == payload + crc32c(payload).to_bytes(4, "little")

