"""The greedy loop over stages: train stage j on its input, cache its outputs, move on to j+1.

Data flows one way: dataset -> stage 0 -> cache 0 -> loader -> stage 1 -> cache 1 -> ... Stage j's
input is the images for j = 0 and stage j-1's complete cache otherwise; the frozen stages before it
are never run while it trains.

Freshness is derived from fingerprints, never stored: stage j is up to date when its checkpoint
records the fingerprint of the input it would read now (the dataset's, or the output fingerprint
of stage j-1's finished checkpoint). Retraining a stage therefore makes its cache and every later
stage stale without touching their files.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import numpy as np
import torch
from rich.console import Console
from torch import nn

from cachetrain.errors import StageError
from cachetrain.cache import (CacheError, CacheReader, CacheState, StoreInfo, disk_bytes, output_fingerprint,
                              store_state, weights_hash)
from cachetrain.cache.manifest import content_digest
from cachetrain.cache.verify import ChunkProblem
from cachetrain.cache.writer import missing_chunks
from cachetrain.train import caching
from cachetrain.config import Config
from cachetrain.data import open_dataset
from cachetrain.source import SPLITS
from cachetrain.device import resolve_device
from cachetrain.faults import fault_point
from cachetrain.train.identity import RunIdentity, stage_config_ok
from cachetrain.cache.loader import CacheLoader
from cachetrain.cache.source import CacheSource
from cachetrain.models import Network, build_network, make_head, stage_seed
from cachetrain.train.recompute import RecomputeSource
from cachetrain.train.rundir import RunDir
from cachetrain.train.trainer import Position, StageModel, fit, make_optimizer, make_scheduler, predict


@dataclass
class StageStatus:
    j: int
    state: str  # untrained | partial | trained | stale
    k: int | None
    epochs_done: int
    batch: int  # batches done in the epoch after epochs_done (a mid-epoch checkpoint)
    epochs: int
    train_acc: float | None
    test_acc: float | None
    cache: CacheState | None  # None: not cached (the last stage, or recomputed by the stages after it)
    cache_bytes: int
    raw_bytes: int
    chunks_missing: int = 0  # over both splits, when the cache is being written
    reason: str | None = None  # why the stage is stale, in words


class Greedy:
    def __init__(self, cfg: Config, console: Console | None = None):
        self.cfg = cfg
        self.run = RunDir(cfg.run_path)
        self.identity = RunIdentity(cfg.run_path)
        self.device = resolve_device(cfg.train.device)
        self.console = console or Console()
        self._ckpts: dict[int, dict | None] = {}
        self._digests: dict[Path, str | None] = {}  # store -> content digest, read once per command
        self._plan: set[int] | None = None

    @cached_property
    def data(self):
        return open_dataset(self.cfg.data, stage_seed(self.cfg.train.seed, 0), self.device, self.cfg.loader.workers,
                            self.cfg.loader.backend)

    @cached_property
    def net(self) -> Network:
        return build_network(self.cfg.model, self.data.sample_shape, self.cfg.train.seed)

    @property
    def depth(self) -> int:
        return self.cfg.model.stages

    @cached_property
    def history(self) -> list[dict]:
        """The run's recorded config changes (cachetrain.train.identity)."""
        return self.identity.history()

    @staticmethod
    def command(verb: str, j: int | None = None) -> str:
        """A command to suggest; the CLI adds the user's own --config/--run/--set to it."""
        return f"cachetrain {verb}" + (f" --j {j}" if j is not None else "")

    # -- what is done --------------------------------------------------------------------------
    def checkpoint(self, j: int) -> dict | None:
        if j not in self._ckpts:
            self._ckpts[j] = self.run.load_checkpoint(j, warn=lambda msg: self.console.print(f"warning: {msg}",
                                                                                            markup=False))
        return self._ckpts[j]

    def cached_stages(self) -> set[int]:
        """The stages whose outputs are cached (cache.mode); the others' consumers recompute them."""
        mode = self.cfg.cache.mode
        if mode == "all":
            return set(range(self.depth - 1))
        if mode == "none":
            return set()
        if self._plan is None:
            plan = self.run.path / "plan.json"
            if not plan.exists():
                raise StageError(f"cache.mode: 'plan' needs {plan}; make one with: {self.command('plan')}")
            try:
                cached = set(json.loads(plan.read_text())["cached"])
                assert all(isinstance(j, int) and 0 <= j < self.depth - 1 for j in cached)
            except (ValueError, KeyError, TypeError, AssertionError):
                raise StageError(f"{plan}: expected {{\"cached\": [stage indices in 0..{self.depth - 2}]}}; "
                                 f"make a new one with: {self.command('plan')}") from None
            self._plan = cached
        return self._plan

    def input_fingerprint(self, j: int) -> str | None:
        """What stage j's input is now: the dataset for j = 0, else stage j-1's outputs, cached or computed
        on the fly (None when stage j-1 is not trained and up to date, so nothing after it can be)."""
        if j == 0:
            return self.data.fingerprint
        storage = self.cfg.cache.storage if j - 1 in self.cached_stages() else "recomputed"
        return self.output_fingerprint(j - 1, storage)

    def output_fingerprint(self, j: int, storage: str | None = None) -> str | None:
        if self.stage_state(j) != "trained":
            return None
        ck = self.checkpoint(j)
        return output_fingerprint(j, ck["weights_hash"], ck["input_fingerprint"], storage or self.cfg.cache.storage)

    def stage_state(self, j: int) -> str:
        ck = self.checkpoint(j)
        if ck is None:
            return "untrained"
        if self.stale_reason(j) is not None:
            return "stale"
        return "trained" if ck["epoch"] >= ck["epochs"] else "partial"

    def stale_reason(self, j: int) -> str | None:
        """Why stage j's checkpoint no longer fits the run, or None when it does: its input was produced
        differently (a stage before it retrained, another storage), its input store's bytes changed
        (a rebuild or a repair that did not restore them exactly), or the config changed from a stage
        at or before j (--from-stage)."""
        ck = self.checkpoint(j)
        if ck is None:
            return None
        if ck["input_fingerprint"] != self.input_fingerprint(j):
            return "its input changed since it was trained (an earlier stage was retrained or re-stored)"
        for store, recorded in (ck.get("input_digests") or {}).items():
            now = self.content_digest(self.run.path / store)
            if recorded is not None and now != recorded:
                return (f"the bytes of its input store {store} changed since it was trained (content digest "
                        f"{recorded} -> {now or 'none'}: rebuilt or repaired to different values)")
        if not stage_config_ok(ck.get("config"), self.cfg, self.history, j):
            return "the run's config changed from this stage or an earlier one (--from-stage)"
        return None

    # -- lineage by content ------------------------------------------------------------------------
    def content_digest(self, path: Path) -> str | None:
        if path not in self._digests:
            self._digests[path] = content_digest(path)
        return self._digests[path]

    def input_stores(self, j: int) -> list[Path]:
        """The stores stage j's input is read from: every store of the nearest cached stage before j
        (its outputs, forwarded through the frozen stages in between when that is not j-1)."""
        a = max((i for i in self.cached_stages() if i < j), default=-1)
        return [] if a < 0 else [path for _, _, path in self.stores(a)]

    def input_digests(self, j: int) -> dict[str, str | None]:
        """{store relative to the run: its content digest now}, recorded in stage j's checkpoint."""
        return {str(path.relative_to(self.run.path)): self.content_digest(path) for path in self.input_stores(j)}

    def next_stage(self) -> int | None:
        return next((j for j in range(self.depth) if self.stage_state(j) != "trained"), None)

    def status(self) -> list[StageStatus]:
        rows = []
        for j in range(self.depth):
            ck = self.checkpoint(j)
            metrics = self.run.read_metrics(j)
            cache, size, raw, missing = None, 0, 0, 0
            if j in self.cached_stages() or self.run.store_path(j, "train").exists():
                cache, infos = self.cache_state(j)
                size = sum(disk_bytes(path) for _, _, path in self.stores(j))
                raw = sum(info.num_samples * info.sample_bytes for info in infos.values() if info)
                if cache in (CacheState.WRITING, CacheState.DAMAGED):
                    missing = sum(len(missing_chunks(path, infos[path])) for _, _, path in self.stores(j)
                                  if infos[path])
            rows.append(StageStatus(
                j=j, state=self.stage_state(j), reason=self.stale_reason(j), k=ck["k"] if ck else None, epochs_done=ck["epoch"] if ck else 0,
                batch=ck.get("batch", 0) if ck else 0, epochs=ck["epochs"] if ck else self.cfg.train.epochs,
                train_acc=metrics[-1]["train_acc"] if metrics else None,
                test_acc=metrics[-1]["test_acc"] if metrics else None, cache=cache, cache_bytes=size, raw_bytes=raw,
                chunks_missing=missing))
        return rows

    def cache_state(self, j: int) -> tuple[CacheState, dict[Path, StoreInfo | None]]:
        """One state for all of stage j's stores, judged against stage j's current checkpoint."""
        fp = self.output_fingerprint(j)
        found = {path: store_state(path, fp) for _, _, path in self.stores(j)}
        states = [st for st, _ in found.values()]
        infos = {path: info for path, (_, info) in found.items()}
        if fp is None:  # stage j is not trained: whatever is on disk came from an older stage j
            return (CacheState.ABSENT if all(st is CacheState.ABSENT for st in states) else CacheState.STALE), infos
        if CacheState.STALE in states:
            return CacheState.STALE, infos
        if CacheState.DAMAGED in states:
            return CacheState.DAMAGED, infos
        if all(st is states[0] for st in states):
            return states[0], infos
        return CacheState.WRITING, infos

    def next_action(self) -> str:
        """What `cachetrain train` would do now, in words."""
        for row in self.status():
            j = row.j
            if row.state == "partial":
                return f"train resumes stage {j} at epoch {row.epochs_done + 1}, batch {row.batch}"
            if row.state == "stale":
                return f"train retrains stage {j} from scratch (its input changed since it was trained)"
            if row.state == "untrained":
                return f"train trains stage {j}"
            if row.cache is CacheState.WRITING:
                return f"train finishes the cache of stage {j} ({row.chunks_missing} chunks left to write)"
            if row.cache is CacheState.DAMAGED:
                return f"train repairs the damaged cache of stage {j} ({row.chunks_missing} chunks lost)"
            if row.cache in (CacheState.ABSENT, CacheState.STALE):
                return f"train builds the cache of stage {j}"
        return "every stage is trained: cachetrain eval tests the assembled network"

    # -- inputs ----------------------------------------------------------------------------------
    def input_source(self, j: int):
        """Stage j's input: the images (j = 0), stage j-1's cache, or the nearest cached stage's outputs
        (or the images) forwarded through the frozen stages in between."""
        if j == 0:
            return self.data
        for i in range(j):
            if self.stage_state(i) != "trained":
                raise StageError(f"stage {j} needs stage {i} trained first ({self.stage_state(i)}); run: "
                                 f"{self.command('stage', i)}")
        t = self.cfg.train
        cached = self.cached_stages()
        a = max((i for i in cached if i < j), default=-1)  # nearest cached ancestor
        seed = stage_seed(t.seed, j)
        aug = (t.feature_crop_padding, t.feature_flip) if a == j - 1 else (0, False)
        base = self.data if a < 0 else self.cache_source(a, seed, *aug)
        if a == j - 1:
            return base
        frozen = [self.trained_stage(i) for i in range(a + 1, j)]
        return RecomputeSource(base, frozen, self.net.out_shapes[j - 1], self.input_fingerprint(j), self.device,
                               t.amp, seed, t.feature_crop_padding, t.feature_flip,
                               augment_base=self.cfg.cache.mode == "none")

    def cache_source(self, a: int, seed: int, crop_padding: int = 0, flip: bool = False) -> CacheSource:
        fp = self.output_fingerprint(a)
        hint = f"run: {self.command('cache', a)}"
        readers = {(split, v): CacheReader(path, fp, rebuild_hint=hint) for split, v, path in self.stores(a)}
        views = [readers["train", v] for v in range(self.cfg.cache.views)]
        return CacheSource(views, readers["test", 0], self.cfg.loader, seed, self.device, crop_padding, flip,
                           num_classes=self.data.num_classes)

    def trained_stage(self, j: int) -> nn.Module:
        """Stage j with its trained weights, in eval mode (its BN uses running statistics)."""
        stage = self.net.stages[j]
        from cachetrain.train.checkpoint import load_state  # names the file and shapes if they do not fit

        load_state(stage, self.checkpoint(j), "model")
        return stage.to(self.device).eval()

    def trained_head(self, j: int) -> nn.Module:
        ck = self.checkpoint(j)
        head = make_head(self.cfg.model, self.net, j, ck["k"], self.data.num_classes, self.cfg.train.seed)
        from cachetrain.train.checkpoint import load_state  # names the file and shapes if they do not fit

        load_state(head, ck, "head")
        return head.to(self.device).eval()

    # -- training --------------------------------------------------------------------------------
    def train_stage(self, j: int, k: int | None = None, restart: bool = False) -> float:
        """Train stage j, resuming a partial run of it (mid-epoch included) unless `restart` or another k
        is asked. Resuming on the CPU gives bit-identical weights to an uninterrupted run: the model,
        optimizer, scheduler and running epoch sums come from the checkpoint, and the sample order and
        augmentation draws are pure functions of (seed, epoch, batch)."""
        t = self.cfg.train
        source = self.input_source(j)
        ck = self.checkpoint(j)
        resume = (ck is not None and not restart and self.stage_state(j) == "partial"
                  and (k is None or k == ck["k"]))
        k = ck["k"] if resume else (self.cfg.model.k if k is None else k)
        # a fresh network: stage j starts from its seeded initial weights even if this process loaded
        # trained weights into it earlier
        self.net = build_network(self.cfg.model, self.data.sample_shape, t.seed)
        stage = self.net.stages[j]
        head = make_head(self.cfg.model, self.net, j, k, self.data.num_classes, t.seed)
        model = StageModel(stage, head).to(self.device)
        if t.channels_last and self.device.type == "cuda":
            model = model.to(memory_format=torch.channels_last)
        steps = source.steps_per_epoch(t.batch_size)
        epochs = ck["epochs"] if resume else t.epochs  # a resumed stage keeps the schedule it started with
        optimizer = make_optimizer(model.parameters(), t)
        scheduler = make_scheduler(optimizer, t, steps, epochs)
        start = Position()
        if resume:
            from cachetrain.train.checkpoint import restore  # shapes checked, then weights, optimizer, scheduler, rng

            start = restore(ck, {"model": stage, "head": head}, optimizer, scheduler)
            self.run.truncate_metrics(j, start.epoch)
            self.console.print(f"stage {j}: resuming at epoch {start.epoch + 1}, batch {start.batch}/{steps}")
        else:
            self.run.metrics_path(j).unlink(missing_ok=True)
        input_fp = self.input_fingerprint(j)
        input_digests = self.input_digests(j)  # the bytes it trains on: a later rebuild that changes them makes it stale

        def save(at: Position, test_acc: float | None) -> None:
            from cachetrain.train.checkpoint import build  # the schema: cachetrain/checkpoint.py

            checkpoint = build(unit=j, k=k, model=stage, head=head, optimizer=optimizer, scheduler=scheduler, at=at,
                               epochs=epochs, steps_per_epoch=steps, input_fingerprint=input_fp, test_acc=test_acc,
                               config=self.cfg.to_dict(), input_digests=input_digests,
                               weights_hash=weights_hash(stage) if at.epoch == epochs else None)
            self.run.save_checkpoint(j, checkpoint)
            self._ckpts = {}  # stage j changed: every fingerprint derived from it may have too

        test_acc = fit(model, source, t, self.device, optimizer, scheduler, epochs, start, save,
                       log=lambda row: self.run.append_metrics(j, {"stage": j, "k": k, **row}),
                       console=self.console, title=f"stage {j} (k={k})")
        fault_point("stage_end")
        return test_acc

    # -- caching (cachetrain.train.caching does the work) ----------------------------------------------
    def stores(self, j: int) -> list[tuple[str, int, Path]]:
        """(split, view, path) of every store stage j's cache consists of."""
        views = {"train": self.cfg.cache.views, "test": 1}
        return [(split, v, self.run.store_path(j, split, v)) for split in SPLITS for v in range(views[split])]

    def cache_stage(self, j: int, repair: bool = False) -> dict[str, int]:
        """Write stage j's outputs to every store of its cache, computing only what is missing. With
        `repair`, first verify every chunk and drop the corrupt ones, so exactly those are recomputed."""
        if self.stage_state(j) != "trained":
            raise StageError(f"stage {j} is {self.stage_state(j)}, so there is nothing to cache yet; run: "
                             f"{self.command('stage', j)}")
        if repair:
            for problem in caching.drop_corrupt_chunks(self.stores(j)):
                self.console.print(f"repair: {problem}", markup=False)
        ck = self.checkpoint(j)
        job = caching.CacheJob(j=j, k=ck["k"], stage=self.trained_stage(j), source=self.input_source(j),
                               out_shape=self.net.out_shapes[j], fingerprint=self.output_fingerprint(j),
                               weights_hash=ck["weights_hash"], input_fingerprint=ck["input_fingerprint"],
                               stores=self.stores(j), view_inputs=lambda view: self._view_inputs(j, view))
        try:
            return caching.cache_stage(job, self.cfg.cache, self.device, self.cfg.train.amp, self.console)
        finally:
            self._digests = {}  # the stores' digests may have changed

    def _view_inputs(self, j: int, view: int):
        """batches(start, size) -> stage j's inputs for training view v > 0, in sample order from `start`:
        the images under stage-0 augmentation (j = 0), else view v of stage j-1's cache."""
        if j == 0:
            return lambda start, size: self.data.augmented_batches(size, start, view)
        prev = CacheReader(self.run.store_path(j - 1, "train", view), self.output_fingerprint(j - 1),
                           rebuild_hint=f"run: {self.command('cache', j - 1)}")
        loader = CacheLoader(prev, self.device, self.cfg.loader.workers, self.cfg.loader.prefetch_chunks)
        return lambda start, size: loader.batches(np.arange(start, prev.info.num_samples), size)

    def verify(self, stages: list[int]) -> dict[tuple[int, str], list[ChunkProblem] | None]:
        """Problems per (stage, store name) (cachetrain.train.caching.verify)."""
        out = {}
        for j in stages:
            expected = j in self.cached_stages() and self.stage_state(j) == "trained"
            out.update({(j, name): found for name, found in caching.verify(self.stores(j), expected).items()})
        return out

    # -- the whole run ---------------------------------------------------------------------------
    def train_all(self) -> list[StageStatus]:
        for j in range(self.depth):
            if self.stage_state(j) != "trained":
                self.train_stage(j)
            if j in self.cached_stages():
                self.cache_stage(j)
        return self.status()

    def evaluate_network(self) -> dict:
        """Accuracy of stages 0..J-1 + the last stage's head on the raw test images, and how often it agrees
        with the cached-feature path (stage J-1 + head on stage J-2's cached test features)."""
        depth = self.next_stage()
        depth = self.depth if depth is None else depth
        if depth == 0:
            raise StageError(f"no stage is trained yet; run: {self.command('train')}")
        model = nn.Sequential(*[self.trained_stage(j) for j in range(depth)], self.trained_head(depth - 1))
        preds, labels = predict(model, self.data.eval_batches("test", 2 * self.cfg.train.batch_size), self.device,
                                self.cfg.train.amp)
        result = {"stages": depth, "test_acc": float((preds == labels).mean()), "agreement": None}
        if depth > 1:
            try:
                source = self.input_source(depth - 1)
            except (CacheError, StageError):
                return result
            cached = StageModel(self.trained_stage(depth - 1), self.trained_head(depth - 1))
            cached_preds, _ = predict(cached, source.eval_batches("test", 2 * self.cfg.train.batch_size),
                                      self.device, self.cfg.train.amp)
            result["agreement"] = float((cached_preds == preds).mean())
            result["cached_test_acc"] = float((cached_preds == labels).mean())
        return result


