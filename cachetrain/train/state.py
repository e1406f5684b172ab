"""What is done and what is stale in a run: every answer derived from the run's files, none stored.

"Is stage j trained? Is its cache complete? Why is it stale? What would `cachetrain train` do next?"
are answered here (RunState), from the config and what the run directory holds: the stages'
checkpoints, plan.json, and the cache stores' manifests. Nothing here writes, so the answers cannot
drift from the files: a state file would have to be kept in step with every crash and every hand edit.

Freshness is by fingerprint: stage j is up to date when its checkpoint records the fingerprint of
the input it would read now (the dataset's, or the output fingerprint of stage j-1's finished
checkpoint), the same content digests of the stores it read, and a config that still applies to it.
Retraining a stage therefore makes its cache and every later stage stale without touching their files.

Within one command the checkpoints, content digests and plan are read once; whoever changes those
files (training a stage, writing a cache) calls `forget_checkpoints` / `forget_digests`.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

from rich.console import Console

from cachetrain.cache.formats import storage_tag
from cachetrain.cache import CacheState, StoreInfo, disk_bytes, output_fingerprint, store_state
from cachetrain.cache.manifest import content_digest
from cachetrain.cache.writer import missing_chunks
from cachetrain.config import Config
from cachetrain.errors import StageError
from cachetrain.source import SPLITS
from cachetrain.train.identity import RunIdentity, stage_config_ok
from cachetrain.train.rundir import RunDir


def command(verb: str, j: int | None = None) -> str:
    """A command to suggest in a message, the one place one is spelled; the CLI adds the user's own
    --config/--run/--set to it (cachetrain.cli.with_run_options), since only it knows how the run was named."""
    return f"cachetrain {verb}" + (f" --j {j}" if j is not None else "")


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
    chunks_missing: int = 0  # over every store, when the cache is being written
    reason: str | None = None  # why the stage is stale, in words


class RunState:
    """The state of one run's stages and caches as the files show it now.

    `dataset_fingerprint` is asked only when stage 0's freshness is judged: it opens the dataset, which
    is slow, and a command that never needs it (status of an empty run) should not pay for it."""

    def __init__(self, cfg: Config, run: RunDir, identity: RunIdentity, console: Console,
                 dataset_fingerprint: Callable[[], str]):
        self.cfg = cfg
        self.run = run
        self.identity = identity
        self.console = console
        self.dataset_fingerprint = dataset_fingerprint
        self._ckpts: dict[int, dict | None] = {}
        self._digests: dict[Path, str | None] = {}  # store -> content digest, read once per command
        self._plan: set[int] | None = None

    @property
    def depth(self) -> int:
        return self.cfg.model.stages

    @cached_property
    def history(self) -> list[dict]:
        """The run's recorded config changes (cachetrain.train.identity); the CLI sets it anew after recording one."""
        return self.identity.history()

    # -- what is on disk ---------------------------------------------------------------------------
    def checkpoint(self, j: int) -> dict | None:
        if j not in self._ckpts:
            self._ckpts[j] = self.run.load_checkpoint(j, warn=lambda msg: self.console.print(f"warning: {msg}",
                                                                                            markup=False))
        return self._ckpts[j]

    def forget_checkpoints(self) -> None:
        """A stage's checkpoint changed: every fingerprint derived from it may have too."""
        self._ckpts = {}

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
                raise StageError(f"cache.mode: 'plan' needs {plan}; make one with: {command('plan')}")
            try:
                cached = set(json.loads(plan.read_text())["cached"])
                assert all(isinstance(j, int) and 0 <= j < self.depth - 1 for j in cached)
            except (ValueError, KeyError, TypeError, AssertionError):
                raise StageError(f"{plan}: expected {{\"cached\": [stage indices in 0..{self.depth - 2}]}}; "
                                 f"make a new one with: {command('plan')}") from None
            self._plan = cached
        return self._plan

    def stores(self, j: int) -> list[tuple[str, int, Path]]:
        """(split, view, path) of every store stage j's cache consists of: the training views, the validation
        split's store when the run has one (data.val_samples), the test split's."""
        views = {"train": self.cfg.cache.views, "val": int(self.cfg.data.has_val), "test": 1}
        return [(split, v, self.run.store_path(j, split, v)) for split in SPLITS for v in range(views[split])]

    # -- freshness -----------------------------------------------------------------------------------
    def input_fingerprint(self, j: int) -> str | None:
        """What stage j's input is now: the dataset for j = 0, else stage j-1's outputs, cached or computed
        on the fly (None when stage j-1 is not trained and up to date, so nothing after it can be)."""
        if j == 0:
            return self.dataset_fingerprint()
        storage = storage_tag(self.cfg.cache) if j - 1 in self.cached_stages() else "recomputed"
        return self.output_fingerprint(j - 1, storage)

    def output_fingerprint(self, j: int, storage: str | None = None) -> str | None:
        if self.stage_state(j) != "trained":
            return None
        ck = self.checkpoint(j)
        return output_fingerprint(j, ck["weights_hash"], ck["input_fingerprint"], storage or storage_tag(self.cfg.cache))

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
            now = self.content_digest(self.run.store_at(store))
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

    def forget_digests(self) -> None:
        """A cache was written or repaired: its stores' digests may have changed."""
        self._digests = {}

    def input_stores(self, j: int) -> list[Path]:
        """The stores stage j's input is read from: every store of the nearest cached stage before j
        (its outputs, forwarded through the frozen stages in between when that is not j-1)."""
        a = max((i for i in self.cached_stages() if i < j), default=-1)
        return [] if a < 0 else [path for _, _, path in self.stores(a)]

    def input_digests(self, j: int) -> dict[str, str | None]:
        """{store relative to the run: its content digest now}, recorded in stage j's checkpoint."""
        return {self.run.store_key(path): self.content_digest(path) for path in self.input_stores(j)}

    # -- the run as a whole ------------------------------------------------------------------------
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
                j=j, state=self.stage_state(j), reason=self.stale_reason(j), k=ck["k"] if ck else None,
                epochs_done=ck["epoch"] if ck else 0,
                batch=ck.get("batch", 0) if ck else 0, epochs=ck["epochs"] if ck else self.cfg.stage_train(j).epochs,
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
