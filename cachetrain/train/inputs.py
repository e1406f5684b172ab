"""What stage j reads: the images, a cache, or a cached stage's outputs recomputed through frozen stages.

Data flows one way: dataset -> stage 0 -> cache 0 -> loader -> stage 1 -> ... Stage j's input is the
images for j = 0, stage j-1's complete cache when stage j-1 is cached, and otherwise the nearest cached
stage's outputs (or the images) forwarded through the trained, frozen stages in between
(cachetrain.train.recompute). Which stages are cached, and whether they are trained and up to date, is
the run state's answer (cachetrain.run.state); this module only assembles the Source (cachetrain.source)
from it, so training, caching and evaluation all read a stage's input the same way.

StageInputs also holds the network whose frozen stages it forwards through, built once per command on
first use (building a network is slow); the dataset is the run's (cachetrain.run.Run.data).
"""

from __future__ import annotations

from functools import cached_property

import numpy as np
import torch
from torch import nn

from cachetrain.cache import CacheReader
from cachetrain.cache.copies import LocalCopies
from cachetrain.cache.loader import CacheLoader
from cachetrain.cache.source import CacheSource
from cachetrain.errors import Fix, StageError
from cachetrain.models import Network, make_head, stage_seed
from cachetrain.models.factory import network
from cachetrain.run import Run
from cachetrain.train.recompute import RecomputeSource


class StageInputs:
    def __init__(self, run: Run):
        self.run = run
        self.cfg = run.cfg
        self.state = run.state
        self.device = run.device
        self.shard = run.dist.shard  # under torchrun: this rank's part of each training batch

    @property
    def data(self):
        """The images (stage 0's input), with stage 0's shuffle and augmentation seed."""
        return self.run.data

    @cached_property
    def net(self) -> Network:
        """The network the frozen stages are taken from; `trained_stage` loads weights into its stages."""
        return network(self.cfg, self.data.sample_shape)

    def fresh_network(self) -> Network:
        """A new network at its seeded initial weights, replacing `net` (a stage about to be trained must
        not start from trained weights this process loaded into it earlier)."""
        self.net = network(self.cfg, self.data.sample_shape)
        return self.net

    # -- stage j's input ---------------------------------------------------------------------------
    def input_source(self, j: int):
        """Stage j's input: the images (j = 0), stage j-1's cache, or the nearest cached stage's outputs
        (or the images) forwarded through the frozen stages in between."""
        if j == 0:
            return self.data
        state = self.state
        i = state.first_unfinished()
        if i is not None and i < j:
            raise StageError(f"stage {j} needs stage {i} trained first ({state.stage_state(i).value})",
                             Fix.of("stage", j=i))
        t = self.cfg.stage_train(j)  # stages.<j>.feature_* apply to the stage that reads the input
        a = max((i for i in state.cached_stages() if i < j), default=-1)  # nearest cached ancestor
        seed = stage_seed(t.seed, j)
        aug = (t.feature_crop_padding, t.feature_flip) if a == j - 1 else (0, False)
        base = self.data if a < 0 else self.cache_source(a, seed, *aug)
        if a == j - 1:
            return base
        frozen = [self.trained_stage(i) for i in range(a + 1, j)]
        return RecomputeSource(base, frozen, self.net.out_shapes[j - 1], state.input_fingerprint(j), self.device,
                               t.amp, seed, t.feature_crop_padding, t.feature_flip,
                               augment_base=self.cfg.cache.mode == "none")

    def cache_source(self, a: int, seed: int, crop_padding: int = 0, flip: bool = False) -> CacheSource:
        """Stage a's cache (every training view, the validation split when the run has one, and the test
        split) as a Source, checked against stage a's current output fingerprint."""
        fp = self.state.output_fingerprint(a)
        hint = Fix.of("cache", j=a)
        copies = self._copies()
        readers = {(split, v): CacheReader(path, fp, rebuild=hint, copies=copies)
                   for split, v, path in self.state.stores(a)}
        views = [readers["train", v] for v in range(self.cfg.cache.views)]
        return CacheSource(views, readers["test", 0], self.cfg.loader, seed, self.device, crop_padding, flip,
                           num_classes=self.data.num_classes, val=readers.get(("val", 0)), shard=self.shard)

    def _copies(self) -> LocalCopies | None:
        """Where remote chunk objects are kept once fetched (cache.remote_copies), or None."""
        c = self.cfg.cache
        return LocalCopies(c.remote_copies, int(c.remote_copies_gib * 2**30)) if c.remote_copies else None

    def view_inputs(self, j: int, view: int):
        """batches(start, size) -> stage j's inputs for training view v > 0, in sample order from `start`:
        the images under stage-0 augmentation (j = 0), else view v of stage j-1's cache."""
        if j == 0:
            return lambda start, size: self.data.augmented_batches(size, start, view)
        prev = CacheReader(self.run.layout.store(j - 1, "train", view), self.state.output_fingerprint(j - 1),
                           rebuild=Fix.of("cache", j=j - 1))
        loader = CacheLoader(prev, self.device, self.cfg.loader.workers, self.cfg.loader.prefetch_chunks)
        return lambda start, size: loader.batches(np.arange(start, prev.info.num_samples), size)

    # -- the frozen stages -------------------------------------------------------------------------
    def trained_stage(self, j: int) -> nn.Module:
        """Stage j with its trained weights, in eval mode (its BN uses running statistics)."""
        stage = self.net.stages[j]
        self.state.checkpoint(j).load_state(stage, "model")  # names the file and shapes if they do not fit
        return stage.to(self.device).eval()

    def trained_head(self, j: int) -> nn.Module:
        """Stage j's auxiliary head with its trained weights, in eval mode."""
        ck = self.state.checkpoint(j)
        head = make_head(self.cfg.model, self.net, j, ck.k, self.data.num_classes, self.cfg.train.seed)
        ck.load_state(head, "head")  # names the file and shapes if they do not fit
        return head.to(self.device).eval()
