"""Where a caching pass spends its time: the cache writer's throughput, piece by piece.

The question: when a caching pass writes far slower than the disk can, which part of the write path
is slow? It prints MB/s and MB per CPU-second per row, and saves OUT/results.json (the README's
writer table, `benchmarks/figures/writer_h200_*.json`), including whether the store read back exactly.

On an H200 host a caching pass of the ImageNet layout's stage 0 wrote about 150 MB/s, into tmpfs as
into the disk, while `dd` moved 1.2-2 GB/s: the forward took 0.05 s of a 54 s pass. This splits the
pass up. Samples are the shape of that stage's outputs (128x112x112 fp16, 3.2 MB; --tiny shrinks
them), laid out in chunks as `cachetrain cache` lays them out, and written:

- raw: each chunk's bytes to its own file (what the file system takes from Python);
- zarr: the same chunks through zarr alone, with no checksum and with crc32c (the store's codecs);
- write_store: `cachetrain`'s caching pass with an identity stage, outputs already in host memory;
- write_store from device: the same with the outputs on the GPU (adds the device-to-host copies);
- d2h: those copies alone.

Each row gives MB/s of wall time and MB per CPU-second of the process (all threads), which says
whether a row is bound by one core or by waiting.

    python benchmarks/writer_bench.py [--samples 1024] [--dir /dev/shm] [--out bench/writer] [--tiny]
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import shutil
import tempfile
from pathlib import Path

import torch
import zarr
from zarr.codecs import Crc32cCodec

from cachetrain.bench.tools import stopwatch, store_layout, write_features
from cachetrain.cache import CacheReader


def cpu_seconds() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def timed(fn, nbytes: int, device: torch.device | None = None) -> dict:
    c0 = cpu_seconds()
    with stopwatch(device) as watch:
        fn()
    wall, cpu = watch.seconds, cpu_seconds() - c0
    return {"seconds": wall, "MB_per_s": nbytes / wall / 1e6, "MB_per_cpu_s": nbytes / max(cpu, 1e-9) / 1e6}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--samples", type=int, default=1024)
    p.add_argument("--batch", type=int, default=256, help="forward batch of the caching pass")
    p.add_argument("--dir", default=None, help="where to write (default: the temp dir)")
    p.add_argument("--out", default="bench/writer")
    p.add_argument("--tiny", action="store_true")
    args = p.parse_args(argv)
    shape = (8, 16, 16) if args.tiny else (128, 112, 112)
    n = 64 if args.tiny else args.samples
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    x = torch.randn(n, *shape, generator=torch.Generator().manual_seed(0)).relu_().half()
    host = x.numpy()
    nbytes = host.nbytes
    info, layout = store_layout(shape, n, "none", args.batch)
    cs = info.chunk_samples
    rows: dict = {}
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        tmp = Path(tmp)

        def fresh(name: str) -> Path:
            path = tmp / name
            shutil.rmtree(path, ignore_errors=True)
            return path

        def raw() -> None:
            path = fresh("raw")
            path.mkdir()
            for c in range(0, n, cs):
                (path / str(c)).write_bytes(host[c:c + cs].tobytes())

        def through_zarr(compressors) -> None:
            a = zarr.create_array(str(fresh("z")), shape=host.shape, chunks=(cs, *shape), dtype="float16",
                                  fill_value=0, compressors=compressors, config={"write_empty_chunks": True})
            for s in range(0, n, layout.forward_batch):  # one assignment per forward batch, as the writer does
                a[s:s + layout.forward_batch] = host[s:s + layout.forward_batch]

        def store(source: torch.Tensor) -> None:
            write_features(fresh("store.zarr"), info, layout, source)

        rows["raw_files"] = timed(raw, nbytes)
        rows["zarr_no_checksum"] = timed(lambda: through_zarr([]), nbytes)
        rows["zarr_crc32c"] = timed(lambda: through_zarr([Crc32cCodec()]), nbytes)
        def read_back_equal() -> bool:
            """Every chunk of the store just written holds exactly the samples it was given."""
            reader = CacheReader(tmp / "store.zarr", "fp")
            return all(torch.equal(reader.read_chunk(c), x[c * cs:(c + 1) * cs]) for c in range(info.num_chunks))

        rows["write_store_from_host"] = timed(lambda: store(x), nbytes)
        exact = {"write_store_from_host": read_back_equal()}
        if device.type == "cuda":
            xd = x.to(device)
            rows["write_store_from_device"] = timed(lambda: store(xd), nbytes, device)
            exact["write_store_from_device"] = read_back_equal()

            def d2h() -> None:
                for i in range(0, n, layout.forward_batch):
                    xd[i:i + layout.forward_batch].cpu()
            rows["d2h_pageable"] = timed(d2h, nbytes, device)
    result = {"machine": f"{platform.machine()}, Python {platform.python_version()}, torch {torch.__version__}, "
                         f"zarr {zarr.__version__}",
              "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
              "dir": args.dir or tempfile.gettempdir(), "samples": n, "sample_shape": list(shape),
              "chunk_samples": cs, "forward_batch": layout.forward_batch, "MB": nbytes / 1e6, "rows": rows,
              "read_back_equal": exact}
    for name, r in rows.items():
        print(f"{name:24s} {r['MB_per_s']:8.0f} MB/s   {r['MB_per_cpu_s']:8.0f} MB per CPU-second")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(result, indent=2))
    print(f"read back exactly: {exact}")
    print(f"wrote {out / 'results.json'}")


if __name__ == "__main__":
    main()
