"""The greedy loop over stages: train stage j on its input, cache its outputs, move on to j+1.

Greedy is the orchestrator a command talks to; each job it composes has its own module:

    cachetrain.train.state    RunState: what is done and what is stale, derived from the run's files
    cachetrain.train.inputs   StageInputs: what stage j reads (the images, a cache, or recomputed
                              through the frozen stages before it)
    cachetrain.train.stage    train_stage: train one stage, resuming from its checkpoint
    cachetrain.train.caching  cache_stage / verify: write and check a stage's cache

The CLI, the benchmarks and the tests ask Greedy for state and inputs too; those methods are one-line
delegations, so the answers live in one place.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from rich.console import Console
from torch import nn

from cachetrain.cache import CacheError, CacheState, StoreInfo
from cachetrain.cache.verify import ChunkProblem
from cachetrain.config import Config
from cachetrain.device import resolve_device
from cachetrain.dist import Dist
from cachetrain.errors import StageError
from cachetrain.models import Network
from cachetrain.train import caching
from cachetrain.train.identity import RunIdentity
from cachetrain.train.inputs import StageInputs
from cachetrain.train.rundir import RunDir
from cachetrain.train.stage import train_stage
from cachetrain.train.state import RunState, StageStatus, command
from cachetrain.train.trainer import StageModel, predict


class Greedy:
    command = staticmethod(command)  # the one place a suggested command is spelled (cachetrain.train.state)

    def __init__(self, cfg: Config, console: Console | None = None, dist: Dist = Dist()):
        self.cfg = cfg
        self.dist = dist  # under torchrun: this process's rank; rank 0 writes the run's files
        self.run = RunDir(cfg.run_path, writer=dist.writer, cache_location=cfg.cache.location)
        self.identity = RunIdentity(cfg.run_path)
        self.device = dist.device(resolve_device(cfg.train.device))
        self.console = console or Console()
        # the dataset is opened by the inputs, on first use; the state asks for its fingerprint only then
        self.state = RunState(cfg, self.run, self.identity, self.console, lambda: self.data.fingerprint)
        self.inputs = StageInputs(cfg, self.state, self.device, dist.shard)

    @property
    def depth(self) -> int:
        return self.cfg.model.stages

    # -- delegations: the run's state (cachetrain.train.state) -------------------------------------
    @property
    def history(self) -> list[dict]:
        return self.state.history

    @history.setter
    def history(self, changes: list[dict]) -> None:  # the CLI, after recording a config change
        self.state.history = changes

    def checkpoint(self, j: int) -> dict | None:
        return self.state.checkpoint(j)

    def cached_stages(self) -> set[int]:
        return self.state.cached_stages()

    def stores(self, j: int) -> list[tuple[str, int, Path]]:
        return self.state.stores(j)

    def stage_state(self, j: int) -> str:
        return self.state.stage_state(j)

    def output_fingerprint(self, j: int, storage: str | None = None) -> str | None:
        return self.state.output_fingerprint(j, storage)

    def cache_state(self, j: int) -> tuple[CacheState, dict[Path, StoreInfo | None]]:
        return self.state.cache_state(j)

    def next_stage(self) -> int | None:
        return self.state.next_stage()

    def status(self) -> list[StageStatus]:
        return self.state.status()

    def next_action(self) -> str:
        return self.state.next_action()

    # -- delegations: what a stage reads (cachetrain.train.inputs) ---------------------------------
    @property
    def data(self):
        return self.inputs.data

    @property
    def net(self) -> Network:
        return self.inputs.net

    def input_source(self, j: int):
        return self.inputs.input_source(j)

    def trained_stage(self, j: int) -> nn.Module:
        return self.inputs.trained_stage(j)

    # -- the jobs ----------------------------------------------------------------------------------
    def train_stage(self, j: int, k: int | None = None, restart: bool = False) -> float:
        """Train stage j (cachetrain.train.stage.train_stage); under torchrun, every rank returns once rank 0
        has written its last checkpoint."""
        acc = train_stage(self.state, self.inputs, self.console, j, k, restart, self.dist)
        self.dist.barrier()
        self.state.forget_checkpoints()  # the other ranks read the checkpoint rank 0 wrote
        return acc

    def cache_stage(self, j: int, repair: bool = False) -> dict[str, int]:
        """Write stage j's outputs to every store of its cache, computing only what is missing. With
        `repair`, first verify every chunk and drop the corrupt ones, so exactly those are recomputed."""
        if self.stage_state(j) != "trained":
            raise StageError(f"stage {j} is {self.stage_state(j)}, so there is nothing to cache yet; run: "
                             f"{command('stage', j)}")
        if repair and self.dist.writer:
            for problem in caching.drop_corrupt_chunks(self.stores(j)):
                self.console.print(f"repair: {problem}", markup=False)
        self.dist.barrier()
        ck = self.checkpoint(j)
        job = caching.CacheJob(j=j, k=ck["k"], stage=self.trained_stage(j), source=self.input_source(j),
                               out_shape=self.net.out_shapes[j], fingerprint=self.output_fingerprint(j),
                               weights_hash=ck["weights_hash"], input_fingerprint=ck["input_fingerprint"],
                               stores=self.stores(j), view_inputs=lambda view: self.inputs.view_inputs(j, view))
        try:
            return caching.cache_stage(job, self.cfg.cache, self.device, self.cfg.train.amp, self.console, self.dist)
        finally:
            self.state.forget_digests()  # the stores' digests may have changed

    def verify(self, stages: list[int]) -> dict[tuple[int, str], list[ChunkProblem] | None]:
        """Problems per (stage, store name) (cachetrain.train.caching.verify)."""
        out = {}
        for j in stages:
            expected = j in self.cached_stages() and self.stage_state(j) == "trained"
            out.update({(j, name): found for name, found in caching.verify(self.stores(j), expected).items()})
        return out

    # -- the whole run ---------------------------------------------------------------------------
    def train_all(self, after_stage: Callable[[int], None] | None = None) -> list[StageStatus]:
        """Train and cache every stage not done yet; `after_stage(j)` runs once stage j and its cache are
        (the CLI records its probes there: cachetrain.train.diagnostics)."""
        for j in range(self.depth):
            if self.stage_state(j) != "trained":
                self.train_stage(j)
            if j in self.cached_stages():
                self.cache_stage(j)
            if after_stage is not None:
                if self.dist.writer:
                    after_stage(j)
                self.dist.barrier()
        return self.status()

    def evaluate_network(self) -> dict:
        """Accuracy of stages 0..J-1 + the last stage's head on the raw test images, and how often it agrees
        with the cached-feature path (stage J-1 + head on stage J-2's cached test features)."""
        depth = self.next_stage()
        depth = self.depth if depth is None else depth
        if depth == 0:
            raise StageError(f"no stage is trained yet; run: {command('train')}")
        model = nn.Sequential(*[self.trained_stage(j) for j in range(depth)], self.inputs.trained_head(depth - 1))
        preds, labels = predict(model, self.data.eval_batches("test", 2 * self.cfg.train.batch_size), self.device,
                                self.cfg.train.amp)
        result = {"stages": depth, "test_acc": float((preds == labels).mean()), "agreement": None}
        if depth > 1:
            try:
                source = self.input_source(depth - 1)
            except (CacheError, StageError):
                return result
            cached = StageModel(self.trained_stage(depth - 1), self.inputs.trained_head(depth - 1))
            cached_preds, _ = predict(cached, source.eval_batches("test", 2 * self.cfg.train.batch_size),
                                      self.device, self.cfg.train.amp)
            result["agreement"] = float((cached_preds == preds).mean())
            result["cached_test_acc"] = float((cached_preds == labels).mean())
        return result
