"""What stage j reads: the images, a cache, or a cached stage's outputs recomputed through frozen stages.

Data flows one way: dataset -> stage 0 -> cache 0 -> loader -> stage 1 -> ... Stage j's input is the
images for j = 0, stage j-1's complete cache when stage j-1 is cached, and otherwise the nearest cached
stage's outputs (or the images) forwarded through the trained, frozen stages in between
(cachetrain.train.recompute). Which stages are cached, and whether they are trained and up to date, is
the run state's answer (cachetrain.train.state); this module only assembles the Source (cachetrain.source)
from it, so training, caching and evaluation all read a stage's input the same way.

StageInputs also holds the network whose frozen stages it forwards through, and the dataset: both are
opened once per command, on first use (opening a dataset or building a network is slow).
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
from cachetrain.config import Config
from cachetrain.data import open_dataset
from cachetrain.dist import Shard
from cachetrain.errors import StageError
from cachetrain.models import Network, build_network, make_head, stage_seed
from cachetrain.train.checkpoint import load_state
from cachetrain.train.recompute import RecomputeSource
from cachetrain.train.state import RunState, command


class StageInputs:
    def __init__(self, cfg: Config, state: RunState, device: torch.device, shard: Shard = Shard()):
        self.cfg = cfg
        self.state = state
        self.device = device
        self.shard = shard  # under torchrun: this rank's part of each training batch

    @cached_property
    def data(self):
        """The images (stage 0's input), with stage 0's shuffle and augmentation seed."""
        return open_dataset(self.cfg.data, stage_seed(self.cfg.train.seed, 0), self.device, self.cfg.loader.workers,
                            self.cfg.loader.backend, self.shard)

    @cached_property
    def net(self) -> Network:
        """The network the frozen stages are taken from; `trained_stage` loads weights into its stages."""
        return build_network(self.cfg.model, self.data.sample_shape, self.cfg.train.seed,
                             checkpoint_activations=self.cfg.train.checkpoint_activations)

    def fresh_network(self) -> Network:
        """A new network at its seeded initial weights, replacing `net` (a stage about to be trained must
        not start from trained weights this process loaded into it earlier)."""
        self.net = build_network(self.cfg.model, self.data.sample_shape, self.cfg.train.seed,
                                 checkpoint_activations=self.cfg.train.checkpoint_activations)
        return self.net

    # -- stage j's input ---------------------------------------------------------------------------
    def input_source(self, j: int):
        """Stage j's input: the images (j = 0), stage j-1's cache, or the nearest cached stage's outputs
        (or the images) forwarded through the frozen stages in between."""
        if j == 0:
            return self.data
        state = self.state
        for i in range(j):
            if state.stage_state(i) != "trained":
                raise StageError(f"stage {j} needs stage {i} trained first ({state.stage_state(i)}); run: "
                                 f"{command('stage', i)}")
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
        hint = f"run: {command('cache', a)}"
        copies = self._copies()
        readers = {(split, v): CacheReader(path, fp, rebuild_hint=hint, copies=copies)
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
        prev = CacheReader(self.state.run.store_path(j - 1, "train", view), self.state.output_fingerprint(j - 1),
                           rebuild_hint=f"run: {command('cache', j - 1)}")
        loader = CacheLoader(prev, self.device, self.cfg.loader.workers, self.cfg.loader.prefetch_chunks)
        return lambda start, size: loader.batches(np.arange(start, prev.info.num_samples), size)

    # -- the frozen stages -------------------------------------------------------------------------
    def trained_stage(self, j: int) -> nn.Module:
        """Stage j with its trained weights, in eval mode (its BN uses running statistics)."""
        stage = self.net.stages[j]
        load_state(stage, self.state.checkpoint(j), "model")  # names the file and shapes if they do not fit
        return stage.to(self.device).eval()

    def trained_head(self, j: int) -> nn.Module:
        """Stage j's auxiliary head with its trained weights, in eval mode."""
        ck = self.state.checkpoint(j)
        head = make_head(self.cfg.model, self.net, j, ck["k"], self.data.num_classes, self.cfg.train.seed)
        load_state(head, ck, "head")  # names the file and shapes if they do not fit
        return head.to(self.device).eval()
