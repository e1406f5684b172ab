"""Greedy layerwise training: for each stage j, train it on its input, then cache its outputs.

    for j in stages:
        train stage j      (unless it is TRAINED)  cachetrain.train.unit: one lifecycle, resumable
        cache stage j      (if it is cached)       cachetrain.train.caching: only missing chunks

Stage j's input is the images (j = 0), stage j-1's cache, or the nearest cached stage's outputs
forwarded through the frozen stages in between (cachetrain.train.inputs). What is done, what is stale
and why, is the run's state (cachetrain.run.state); every step above asks it, so a rerun skips
finished work and a killed run continues where its files say it stopped.

`Greedy` is this loop over one opened run (cachetrain.run.Run), with the other whole-network jobs a
command asks for: verifying every store, and evaluating the assembled network.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from torch import nn

from cachetrain.cache import CacheError
from cachetrain.cache.formats import FORMATS
from cachetrain.cache.verify import ChunkProblem
from cachetrain.errors import Fix, StageError
from cachetrain.models.factory import StageModel
from cachetrain.run import Run, StageState, StageStatus
from cachetrain.train import caching
from cachetrain.train.inputs import StageInputs
from cachetrain.train.trainer import predict
from cachetrain.train.unit import Stage, train_unit


class Greedy:
    def __init__(self, run: Run):
        self.run = run
        self.cfg, self.dist, self.state = run.cfg, run.dist, run.state
        self.inputs = StageInputs(run)

    def train_all(self, after_stage: Callable[[int], None] | None = None) -> list[StageStatus]:
        """Train and cache every stage not done yet; `after_stage(j)` runs on rank 0 once stage j and its cache
        are (the CLI records its probes there: cachetrain.train.diagnostics)."""
        for j in range(self.run.depth):
            if self.state.stage_state(j) is not StageState.TRAINED:
                self.train_stage(j)
            if j in self.state.cached_stages():
                self.cache_stage(j)
            if after_stage is not None:
                if self.dist.writer:
                    after_stage(j)
                self.dist.barrier()
        return self.state.status()

    def train_stage(self, j: int, k: int | None = None, restart: bool = False) -> float:
        """Train stage j (cachetrain.train.unit); under torchrun, every rank returns once rank 0 has written
        its last checkpoint."""
        acc = train_unit(self.run, Stage(self.run, self.inputs, j), k, restart)
        self.dist.barrier()
        self.state.forget_checkpoints()  # the other ranks read the checkpoint rank 0 wrote
        return acc

    def cache_stage(self, j: int, repair: bool = False) -> dict[str, int]:
        """Write stage j's outputs to every store of its cache, computing only what is missing. With
        `repair`, first verify every chunk and drop the corrupt ones, so exactly those are recomputed."""
        state = self.state.stage_state(j)
        if state is not StageState.TRAINED:
            raise StageError(f"stage {j} is {state.value}, so there is nothing to cache yet", Fix.of("stage", j=j))
        if repair and self.dist.writer:
            for problem in caching.drop_corrupt_chunks(self.state.stores(j)):
                self.run.console.print(f"repair: {problem}", markup=False)
        self.dist.barrier()
        ck = self.state.checkpoint(j)
        job = caching.CacheJob(j=j, k=ck.k, stage=self.inputs.trained_stage(j), source=self.inputs.input_source(j),
                               out_shape=self.inputs.net.out_shapes[j], fingerprint=self.state.output_fingerprint(j),
                               weights_hash=ck.weights_hash, input_fingerprint=ck.input_fingerprint,
                               stores=self.state.stores(j), view_inputs=lambda view: self.inputs.view_inputs(j, view))
        t0 = time.perf_counter()
        try:
            with self.run.stop.graceful():  # SIGTERM or Ctrl-C: the chunk group being written is finished, then stop
                computed = caching.cache_stage(job, self.cfg.cache, self.run.device, self.cfg.train.amp,
                                               self.run.console, self.dist, self.run.stop)
        finally:
            self.state.forget_digests()  # the stores' digests may have changed
        # the pass's write rate and bytes, in the run's curves (cachetrain.run.events)
        sample_bytes = FORMATS[self.cfg.cache.dtype].sample_bytes(job.out_shape)
        self.run.events.cache_pass(j, sum(computed.values()), sample_bytes, time.perf_counter() - t0,
                                   [path for _, _, path in job.stores])
        return computed

    def verify(self, stages: list[int]) -> dict[tuple[int, str], list[ChunkProblem] | None]:
        """Problems per (stage, store name) (cachetrain.train.caching.verify)."""
        out = {}
        for j in stages:
            expected = j in self.state.cached_stages() and self.state.stage_state(j) is StageState.TRAINED
            out.update({(j, name): found for name, found in caching.verify(self.state.stores(j), expected).items()})
        return out

    def evaluate_network(self) -> dict:
        """Accuracy of stages 0..J-1 + the last stage's head on the raw test images, and how often it agrees
        with the cached-feature path (stage J-1 + head on stage J-2's cached test features)."""
        depth = self.state.trained_depth()
        if depth == 0:
            raise StageError("no stage is trained yet", Fix.of("train"))
        inputs, batch = self.inputs, 2 * self.cfg.train.batch_size
        model = nn.Sequential(*[inputs.trained_stage(j) for j in range(depth)], inputs.trained_head(depth - 1))
        preds, labels = predict(model, self.run.data.eval_batches("test", batch), self.run.device, self.cfg.train.amp)
        result = {"stages": depth, "test_acc": float((preds == labels).mean()), "agreement": None}
        if depth > 1:
            try:
                source = inputs.input_source(depth - 1)
            except (CacheError, StageError):
                return result
            cached = StageModel(inputs.trained_stage(depth - 1), inputs.trained_head(depth - 1))
            cached_preds, _ = predict(cached, source.eval_batches("test", batch), self.run.device, self.cfg.train.amp)
            result["agreement"] = float((cached_preds == preds).mean())
            result["cached_test_acc"] = float((cached_preds == labels).mean())
        return result
