"""Where a run's files are: paths only; nothing here reads or writes.

    <run>/config.yaml                          the run's resolved config, written once (cachetrain.run.identity)
    <run>/run.json                             its config hash, the history of --from-stage changes, what the
                                               data said of itself, where it was forked from
    <run>/plan.json                            `plan`'s choice of cached stages (cachetrain.run.records)
    <run>/rates.json                           the rates a measured plan used (cachetrain.plan.rates)
    <run>/stages/stage_<j>/checkpoint.pt       stage j's checkpoint (schema: cachetrain.run.checkpoint)
    <run>/stages/stage_<j>/checkpoint.prev.pt  the one before it
    <run>/stages/stage_<j>/metrics.jsonl       one JSON object per finished epoch (cachetrain.run.records)
    <run>/e2e/{checkpoint.pt,metrics.jsonl}    the end-to-end network, kept like a stage
    <run>/cache/stage_<j>/<split>[_v<v>].zarr  stage j's outputs (cachetrain.cache.manifest); with
                                               cache.location L: L/<run folder name>/stage_<j>/..., L a
                                               folder or an s3:// URL, claimed by L/<name>/owner.json
    <run>/probes.jsonl, <run>/cka.jsonl        linear probes and CKA (cachetrain.train.diagnostics)
    <run>/heads.jsonl                          the last auxiliary heads averaged (cachetrain.train.ensemble)
    <run>/tb/events.out.tfevents.*             TensorBoard curves (cachetrain.run.events): one file per unit
                                               (`...stage_<j>`, `...e2e`) and the run's summary (`...run`),
                                               made from the records above; `tensorboard --logdir <run>/tb`
    <run>/.lock                                held (flock) by the process working on the run

A trainable *unit* is a greedy stage j (an int) or the end-to-end network (`E2E`); both keep a
checkpoint and metrics in a folder of their own.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Literal, Union

from cachetrain.cache.location import RemotePath, location
from cachetrain.source import SPLITS

E2E = "e2e"
Unit = Union[int, Literal["e2e"]]


def unit_name(unit: Unit) -> str:
    """How messages name a unit."""
    return "the end-to-end network" if unit == E2E else f"stage {unit}"


@dataclass(frozen=True)
class RunLayout:
    path: Path
    # the caches live in <run>/cache, or under cache.location: <location>/<run folder name>, a local folder
    # or an object store's prefix (cachetrain/cache/location.py)
    cache_root: Path | RemotePath

    @classmethod
    def of(cls, run: Path, cache_location: str = "") -> RunLayout:
        run = Path(run)
        return cls(run, location(cache_location) / run.name if cache_location else run / "cache")

    # -- the run's own small files -------------------------------------------------------------
    @property
    def config(self) -> Path:
        return self.path / "config.yaml"

    @property
    def meta(self) -> Path:
        return self.path / "run.json"

    @property
    def plan(self) -> Path:
        return self.path / "plan.json"

    @property
    def lock(self) -> Path:
        return self.path / ".lock"

    @property
    def probes(self) -> Path:
        return self.path / "probes.jsonl"

    @property
    def cka(self) -> Path:
        return self.path / "cka.jsonl"

    @property
    def heads(self) -> Path:
        return self.path / "heads.jsonl"

    @property
    def tb(self) -> Path:
        return self.path / "tb"

    # -- units: stages and the end-to-end network ----------------------------------------------------
    def unit_dir(self, unit: Unit) -> Path:
        return self.path / E2E if unit == E2E else self.path / "stages" / f"stage_{unit}"

    def checkpoint(self, unit: Unit) -> Path:
        return self.unit_dir(unit) / "checkpoint.pt"

    def previous_checkpoint(self, unit: Unit) -> Path:
        return self.unit_dir(unit) / "checkpoint.prev.pt"

    def metrics(self, unit: Unit) -> Path:
        return self.unit_dir(unit) / "metrics.jsonl"

    # -- caches ----------------------------------------------------------------------------------------
    @property
    def cache_owner(self) -> Path | RemotePath:
        """Under cache.location only: which run the caches there belong to (cachetrain.run.lock.claim_caches)."""
        return self.cache_root / "owner.json"

    @property
    def caches_elsewhere(self) -> bool:
        return self.cache_root != self.path / "cache"

    def cache_dir(self, j: int) -> Path | RemotePath:
        return self.cache_root / f"stage_{j}"

    def store(self, j: int, split: str, view: int = 0) -> Path | RemotePath:
        assert split in SPLITS, split
        return self.cache_dir(j) / (f"{split}.zarr" if view == 0 else f"{split}_v{view}.zarr")

    def store_key(self, store: Path | RemotePath) -> str:
        """A store's name in the run's records (a checkpoint's input digests): `cache/stage_<j>/<split>.zarr`
        wherever cache.location puts it, so moving the caches does not change what a checkpoint names."""
        return str(PurePosixPath("cache") / store.relative_to(self.cache_root))

    def store_at(self, key: str) -> Path | RemotePath:
        """The store a record names (`store_key`)."""
        return self.cache_root / str(PurePosixPath(key).relative_to("cache"))
