"""What is done and what is stale in a run, and why: every answer derived from the run's files, none stored.

A trainable unit (greedy stage j, or the end-to-end network) is in one of four states, judged from its
checkpoint against what the unit would train on now:

    state      its checkpoint                                  what `train` (or `e2e`) does with it
    UNTRAINED  none                                            trains it from scratch
    PARTIAL    fresh, epoch < epochs (mid-epoch included)      resumes it where the checkpoint stands
    TRAINED    fresh, epoch == epochs                          keeps it; builds its cache if that is missing
    STALE      no longer fresh, for a `StaleReason`            retrains it from scratch

    UNTRAINED --first checkpoint written--------------------------------------------------> PARTIAL
    PARTIAL   --last epoch's checkpoint written (or early stopping kept its best epoch)---> TRAINED
    PARTIAL, TRAINED --any StaleReason below----------------------------------------------> STALE
    STALE     --retrained from scratch: its first checkpoint------------------------------> PARTIAL
    TRAINED   --`stage --j J` (an explicit retrain) or another `--k`---------------------> PARTIAL

A checkpoint is fresh when none of these holds (checked in this order; the first one is the reason):

    StaleReason.INPUT        it records another input fingerprint than the input it would read now:
                             an earlier stage was retrained, or its outputs are stored differently
                             (cache.dtype, cache.mode), or the dataset changed (files, split, subset)
    StaleReason.INPUT_BYTES  a store it read has other bytes now (its content digest changed: the store
                             was rebuilt or repaired to different values)
    StaleReason.CONFIG       the run's config changed in a key that shapes results, from this stage or an
                             earlier one (`--from-stage`; cachetrain.run.identity); the end-to-end network
                             is stale after any such change, since every stage is part of it

So "why did `train` retrain stage 2?": stage 2 was STALE, and `cachetrain status` prints which
reason. Retraining stage j changes its output fingerprint, which makes its cache and every later
stage stale without touching their files: there is no state file that could fall out of step.

Caches have their own states (cachetrain.cache.manifest.CacheState), judged against the current
checkpoint of the stage that writes them (`cache_state`).

Within one command the checkpoints, content digests and plan are read once; whoever changes those
files (training a stage, writing a cache) calls `forget_checkpoints` / `forget_digests`.
"""

from __future__ import annotations

import enum
from collections.abc import Callable
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

from cachetrain.cache import CacheState, StoreInfo, disk_bytes, output_fingerprint, store_state
from cachetrain.cache.formats import storage_tag
from cachetrain.cache.manifest import content_digest
from cachetrain.cache.writer import missing_chunks
from cachetrain.config import Config
from cachetrain.errors import Fix
from cachetrain.run.checkpoint import Checkpoint, Checkpoints
from cachetrain.run.identity import RunIdentity, config_hash, stage_config_ok
from cachetrain.run.layout import E2E, RunLayout, Unit
from cachetrain.run.records import Records
from cachetrain.source import SPLITS


class StageState(enum.Enum):
    UNTRAINED = "untrained"
    PARTIAL = "partial"
    TRAINED = "trained"
    STALE = "stale"


class StaleReason(enum.Enum):
    INPUT = "its input changed since it was trained (an earlier stage was retrained or re-stored)"
    INPUT_BYTES = "the bytes of an input store changed since it was trained"
    CONFIG = "the run's config changed from this stage or an earlier one (--from-stage)"


@dataclass(frozen=True)
class Staleness:
    reason: StaleReason
    detail: str = ""  # the store and both digests, for INPUT_BYTES

    def __str__(self) -> str:
        return self.detail or self.reason.value


@dataclass
class StageStatus:
    j: int
    state: StageState
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
    stale: Staleness | None = None  # why the stage is stale

    @property
    def reason(self) -> str | None:
        return None if self.stale is None else str(self.stale)


@dataclass(frozen=True)
class NextAction:
    """What to run next: the command (`fix`) and what it does, in words; `summary` says why, when the
    command is not `train` itself."""

    fix: Fix
    does: str
    summary: str = ""


class RunState:
    """The state of one run's units and caches as the files show it now.

    `dataset_fingerprint` is asked only when stage 0's (or the end-to-end network's) freshness is judged:
    it opens the dataset, which is slow, and a command that never needs it (status of an empty run)
    should not pay for it."""

    def __init__(self, cfg: Config, layout: RunLayout, checkpoints: Checkpoints, records: Records,
                 identity: RunIdentity, dataset_fingerprint: Callable[[], str], warn: Callable[[str], None]):
        self.cfg = cfg
        self.layout = layout
        self.checkpoints = checkpoints
        self.records = records
        self.identity = identity
        self.dataset_fingerprint = dataset_fingerprint
        self.warn = warn
        self._ckpts: dict[Unit, Checkpoint | None] = {}
        self._digests: dict[Path, str | None] = {}  # store -> content digest, read once per command
        self._plan: set[int] | None = None

    @property
    def depth(self) -> int:
        return self.cfg.model.stages

    @cached_property
    def history(self) -> list[dict]:
        """The run's recorded config changes (cachetrain.run.identity); reset when one is recorded."""
        return self.identity.history()

    def forget_history(self) -> None:
        self.__dict__.pop("history", None)

    # -- what is on disk ---------------------------------------------------------------------------
    def checkpoint(self, unit: Unit) -> Checkpoint | None:
        if unit not in self._ckpts:
            self._ckpts[unit] = self.checkpoints.load(unit, warn=self.warn)
        return self._ckpts[unit]

    def forget_checkpoints(self) -> None:
        """A unit's checkpoint changed: every fingerprint derived from it may have too."""
        self._ckpts = {}

    def cached_stages(self) -> set[int]:
        """The stages whose outputs are cached (cache.mode); the others' consumers recompute them."""
        mode = self.cfg.cache.mode
        if mode == "all":
            return set(range(self.depth - 1))
        if mode == "none":
            return set()
        if self._plan is None:
            self._plan = self.records.planned_stages(self.depth)
        return self._plan

    def stores(self, j: int) -> list[tuple[str, int, Path]]:
        """(split, view, path) of every store stage j's cache consists of: the training views, the validation
        split's store when the run has one (data.val_samples), the test split's."""
        views = {"train": self.cfg.cache.views, "val": int(self.cfg.data.has_val), "test": 1}
        return [(split, v, self.layout.store(j, split, v)) for split in SPLITS for v in range(views[split])]

    # -- freshness -----------------------------------------------------------------------------------
    def input_fingerprint(self, unit: Unit) -> str | None:
        """What the unit's input is now: the dataset for stage 0 and the end-to-end network, else stage j-1's
        outputs, cached or computed on the fly (None when stage j-1 is not trained and fresh, so nothing
        after it can be)."""
        if unit == E2E and self.cfg.train.e2e_init == "greedy":  # fine-tuning starts from every greedy stage
            last = self.output_fingerprint(self.depth - 1, "init")
            return None if last is None else f"{self.dataset_fingerprint()}+{last}"
        if unit == 0 or unit == E2E:
            return self.dataset_fingerprint()
        storage = storage_tag(self.cfg.cache) if unit - 1 in self.cached_stages() else "recomputed"
        return self.output_fingerprint(unit - 1, storage)

    def output_fingerprint(self, j: int, storage: str | None = None) -> str | None:
        if self.stage_state(j) is not StageState.TRAINED:
            return None
        ck = self.checkpoint(j)
        return output_fingerprint(j, ck.weights_hash, ck.input_fingerprint, storage or storage_tag(self.cfg.cache))

    def unit_state(self, unit: Unit) -> StageState:
        ck = self.checkpoint(unit)
        if ck is None:
            return StageState.UNTRAINED
        if self.staleness(unit) is not None:
            return StageState.STALE
        return StageState.TRAINED if ck.finished else StageState.PARTIAL

    def stage_state(self, j: int) -> StageState:
        return self.unit_state(j)

    def staleness(self, unit: Unit) -> Staleness | None:
        """Why the unit's checkpoint no longer fits the run (the module docstring's StaleReason), or None."""
        ck = self.checkpoint(unit)
        if ck is None:
            return None
        if ck.input_fingerprint != self.input_fingerprint(unit):
            return Staleness(StaleReason.INPUT)
        for store, recorded in (ck.input_digests or {}).items():
            now = self.content_digest(self.layout.store_at(store))
            if recorded is not None and now != recorded:
                return Staleness(StaleReason.INPUT_BYTES,
                                 f"the bytes of its input store {store} changed since it was trained (content digest "
                                 f"{recorded} -> {now or 'none'}: rebuilt or repaired to different values)")
        if unit == E2E:  # every stage is part of it: any change of a result key
            fresh = ck.config is None or config_hash(ck.config) == config_hash(self.cfg)
        else:
            fresh = stage_config_ok(ck.config, self.cfg, self.history, unit)
        return None if fresh else Staleness(StaleReason.CONFIG)

    def first_unfinished(self) -> int | None:
        """The first stage that is not TRAINED (the one `stage` trains by default), or None."""
        return next((j for j in range(self.depth) if self.stage_state(j) is not StageState.TRAINED), None)

    def trained_depth(self) -> int:
        """How many leading stages are TRAINED."""
        j = self.first_unfinished()
        return self.depth if j is None else j

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
        return {self.layout.store_key(path): self.content_digest(path) for path in self.input_stores(j)}

    # -- the run as a whole ------------------------------------------------------------------------
    def status(self) -> list[StageStatus]:
        rows = []
        for j in range(self.depth):
            ck = self.checkpoint(j)
            metrics = self.records.read_metrics(j)
            cache, size, raw, missing = None, 0, 0, 0
            if j in self.cached_stages() or self.layout.store(j, "train").exists():
                cache, infos = self.cache_state(j)
                size = sum(disk_bytes(path) for _, _, path in self.stores(j))
                raw = sum(info.num_samples * info.sample_bytes for info in infos.values() if info)
                if cache in (CacheState.WRITING, CacheState.DAMAGED):
                    missing = sum(len(missing_chunks(path, infos[path])) for _, _, path in self.stores(j)
                                  if infos[path])
            rows.append(StageStatus(
                j=j, state=self.stage_state(j), stale=self.staleness(j), k=ck.k if ck else None,
                epochs_done=ck.epoch if ck else 0, batch=ck.batch if ck else 0,
                epochs=ck.epochs if ck else self.cfg.stage_train(j).epochs,
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

    def next_action(self) -> NextAction:
        """What `train` would do now."""
        train = Fix.of("train")
        for row in self.status():
            j = row.j
            if row.state is StageState.PARTIAL:
                return NextAction(train, f"resumes stage {j} at epoch {row.epochs_done + 1}, batch {row.batch}")
            if row.state is StageState.STALE:
                return NextAction(train, f"retrains stage {j} from scratch: {row.reason}")
            if row.state is StageState.UNTRAINED:
                return NextAction(train, f"trains stage {j}")
            if row.cache is CacheState.WRITING:
                return NextAction(train, f"finishes the cache of stage {j} ({row.chunks_missing} chunks left to write)")
            if row.cache is CacheState.DAMAGED:
                return NextAction(train, f"repairs the damaged cache of stage {j} ({row.chunks_missing} chunks lost)")
            if row.cache in (CacheState.ABSENT, CacheState.STALE):
                return NextAction(train, f"builds the cache of stage {j}")
        return NextAction(Fix.of("eval"), "tests the assembled network", summary="every stage is trained")
