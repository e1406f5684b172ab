"""What zstd makes of each stage's outputs: the ratio, and how fast chunks compress and decompress.

A cache's bytes on disk are its storage format's bytes (cachetrain/cache/formats.py) over what zstd
achieves on them, and zstd achieves what the data allows: ReLU maps of a trained stage are sparse and
compress, noise does not. So the ratio is measured on real outputs: a few batches of the configured
training split, spread over it, forwarded through the stages, each stage's outputs encoded in every
storage format (uint8 with a scale calibrated on those outputs, as a caching pass would), cut into the
chunks a store of that stage would hold (`cache.chunk_mib`) and compressed with zstd at `cache.level`,
the codec the writer uses (zarr's ZstdCodec is numcodecs' Zstd). Decompressing them back is timed too:
it is the reader's work for every chunk of every epoch. Both are timed in this thread's CPU seconds
(time.thread_time): zstd runs on one thread, and on a shared machine its wall time would count the other
processes' turns on the core too.

The stages are the trained ones where the caller has them (`trained(j)`: a run's stage j with its
weights, or None), else the initialised ones, whose outputs can compress very differently; each
stage's figure says which it came from (`weights`). A stage's input is the previous stage's output as
measured here, so stages after an untrained one see untrained features.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from numcodecs import Zstd
from torch import nn

from cachetrain.cache.formats import FORMATS
from cachetrain.cache.quant import calibrate
from cachetrain.config import Config
from cachetrain.device import autocast
from cachetrain.models import build_network
from cachetrain.source import Source

# which weights a stage's outputs came from when its ratio was measured
TRAINED, INITIALISED = "trained weights", "initialised weights"


@dataclass(frozen=True)
class CodecFigures:
    ratios: dict[str, list[float]]  # storage dtype -> per stage, raw bytes / zstd bytes
    compress_bytes_per_s: dict[str, float]  # storage dtype -> raw bytes compressed a second, one thread
    decompress_bytes_per_s: dict[str, float]  # storage dtype -> raw bytes decompressed a second, one thread
    weights: list[str]  # per stage: TRAINED or INITIALISED
    samples: int  # forwarded through the stages
    level: int

    def source(self) -> str:
        """What the ratios were measured on, in words (which weights, how many samples)."""
        trained = [j for j, w in enumerate(self.weights) if w == TRAINED]
        if len(trained) == len(self.weights):
            stages = "the trained stages"
        elif not trained:
            stages = "the initialised stages (none is trained yet: a trained stage's outputs may compress differently)"
        else:
            stages = f"trained stages {_span(trained)} and the initialised ones after them"
        return f"zstd-{self.level} on {self.samples} training samples through {stages}"


def _span(js: list[int]) -> str:
    return str(js[0]) if len(js) == 1 else f"{js[0]}..{js[-1]}"


def _batches(source: Source, batch_size: int, count: int):
    """`count` plain batches spread over the training split (image folders are sorted by class)."""
    n = source.num_samples("train")
    for start in sorted(set(np.linspace(0, max(0, n - batch_size), count).astype(int).tolist())):
        batches = source.eval_batches("train", batch_size, start)
        batch = next(iter(batches), None)
        close = getattr(batches, "close", None)
        if close is not None:
            close()
        if batch is not None:
            yield batch[0]


def stage_outputs(cfg: Config, source: Source, device: torch.device,
                  trained: Callable[[int], nn.Module | None] | None = None, batch_size: int = 8,
                  batches: int = 2) -> tuple[list[torch.Tensor], list[str]]:
    """Each stage's outputs (on the CPU) for a few plain training batches, and which weights made them."""
    net = build_network(cfg.model, source.sample_shape, cfg.train.seed)
    stages, weights = [], []
    for j in range(net.depth):
        stage = trained(j) if trained is not None else None
        weights.append(TRAINED if stage is not None else INITIALISED)
        stages.append((stage if stage is not None else net.stages[j]).to(device).eval())
    outputs: list[list[torch.Tensor]] = [[] for _ in stages]
    with torch.no_grad(), autocast(device, cfg.train.amp):
        for x in _batches(source, batch_size, batches):
            for j, stage in enumerate(stages):
                x = stage(x.to(device))
                outputs[j].append(x.float().cpu())
    return [torch.cat(o) for o in outputs], weights


def _chunks(block: np.ndarray, chunk_mib: float) -> list[np.ndarray]:
    """The block cut into the chunks a store of it would hold: whole samples, about chunk_mib each."""
    per = max(1, round(chunk_mib * 2**20 / (block[0].nbytes or 1)))
    return [np.ascontiguousarray(block[i:i + per]) for i in range(0, len(block), per)]


def measure_codec(cfg: Config, source: Source, device: torch.device,
                  trained: Callable[[int], nn.Module | None] | None = None, dtypes: list[str] | None = None,
                  batch_size: int = 8, batches: int = 2, repeats: int = 3) -> CodecFigures:
    """zstd at cache.level on each stage's outputs in each storage format (all of FORMATS by default); each
    chunk's compression and decompression timed `repeats` times, the fastest kept."""
    outputs, weights = stage_outputs(cfg, source, device, trained, batch_size, batches)
    codec = Zstd(level=cfg.cache.level)
    ratios: dict[str, list[float]] = {}
    compress, decompress = {}, {}
    for dtype in dtypes or list(FORMATS):
        fmt = FORMATS[dtype]
        raw_total = packed_total = 0
        t_compress = t_decompress = 0.0
        ratios[dtype] = []
        for y in outputs:
            quant = calibrate([y], cfg.cache.quant_percentile) if fmt.calibrated else None
            raw = packed = 0
            for chunk in _chunks(fmt.encode(y, quant), cfg.cache.chunk_mib):
                best_c = best_d = float("inf")
                for _ in range(repeats):  # the fastest of a few
                    t0 = time.thread_time()
                    data = codec.encode(chunk)
                    t1 = time.thread_time()
                    codec.decode(data)
                    best_c, best_d = min(best_c, t1 - t0), min(best_d, time.thread_time() - t1)
                t_compress, t_decompress = t_compress + best_c, t_decompress + best_d
                raw, packed = raw + chunk.nbytes, packed + len(data)
            ratios[dtype].append(raw / packed)
            raw_total, packed_total = raw_total + raw, packed_total + packed
        compress[dtype] = raw_total / max(t_compress, 1e-9)
        decompress[dtype] = raw_total / max(t_decompress, 1e-9)
    return CodecFigures(ratios, compress, decompress, weights, len(outputs[0]), cfg.cache.level)
