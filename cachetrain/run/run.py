"""The run: one run directory under one config, and what opening it checks, in order.

A `Run` ties together what a command works on: the config, this process's place in a torchrun job
(`dist`), the run directory's layout (cachetrain.run.layout), its checkpoints (cachetrain.run.checkpoint),
metrics and plan (cachetrain.run.records), its identity (config.yaml and run.json:
cachetrain.run.identity), its lock, the dataset, and the state of every stage (cachetrain.run.state).

Commands open a run with `Run.open(cfg, dist, access)`, a context manager that does every check and
side effect of opening, in this order:

    before it (the CLI)  refuse torchrun for a command that runs in one process (before the config
                         is read: `fork`, `report` too); read the config; join the torchrun process
                         group (`Dist.from_env`)
    1. checks            the command's own argument checks against this run (stage indices, k): one
                         line and nothing touched, not even the object store
    2. cache location    READ and WRITE: with an s3:// cache.location, the bucket exists and these
                         credentials may use it (WRITE: a test object is put and deleted, by rank 0);
                         the caches there are this run's (`claim_caches`; WRITE: rank 0 claims them
                         if nobody has)
    3. identity (read)   CONFIG and READ: a started run's config.yaml must be this config (reading a
                         run with another config would misreport it); nothing is written
    4. lock              WRITE, rank 0: the run's flock, or one line naming the process holding it
    5. identity (write)  WRITE, rank 0: a new run writes config.yaml and run.json (with what the data
                         says of itself); a started run's config must be its own, or differ only as
                         `--from-stage J` allows, and then the change is recorded in run.json
    6. barrier           WRITE under torchrun: no rank goes on before rank 0 has done 4 and 5
    ...the command runs...
    on leaving           the lock is released (the OS releases it too, if the process dies)

Access levels: CONFIG (the run's config and files only, nothing on the cache location: `plan`),
READ (`status`, `verify`), WRITE (every command that trains, caches, evaluates or probes: they take
the lock, and may start the run).
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from functools import cached_property

from rich.console import Console

from cachetrain.cache.location import RemotePath
from cachetrain.config import Config
from cachetrain.data import open_dataset
from cachetrain.device import resolve_device
from cachetrain.dist import Dist
from cachetrain.models import stage_seed
from cachetrain.run.checkpoint import Checkpoints
from cachetrain.run.events import RunEvents
from cachetrain.run.identity import RunIdentity, describe
from cachetrain.run.layout import RunLayout
from cachetrain.run.lock import RunLock, claim_caches
from cachetrain.run.records import Records
from cachetrain.run.state import RunState
from cachetrain.stop import StopRequests


class Access(enum.IntEnum):
    CONFIG = 1
    READ = 2
    WRITE = 3


class Run:
    def __init__(self, cfg: Config, dist: Dist = Dist(), console: Console | None = None):
        self.cfg = cfg
        self.dist = dist  # under torchrun: this process's rank; rank 0 writes the run's files
        self.console = console or Console()
        self.layout = RunLayout.of(cfg.run_path, cfg.cache.location)
        self.checkpoints = Checkpoints(self.layout, writer=dist.writer)
        self.records = Records(self.layout, writer=dist.writer)
        self.identity = RunIdentity(self.layout)
        self.device = dist.device(resolve_device(cfg.train.device))
        # the dataset is opened on first use; the state asks for its fingerprint only then
        self.state = RunState(cfg, self.layout, self.checkpoints, self.records, self.identity,
                              lambda: self.data.fingerprint,
                              warn=lambda msg: self.console.print(f"warning: {msg}", markup=False))
        self._lock = RunLock(self.layout)
        self.stop = StopRequests()  # SIGTERM / Ctrl-C while a unit trains or a cache is written

    @property
    def depth(self) -> int:
        return self.cfg.model.stages

    @cached_property
    def events(self) -> RunEvents:
        """The run's TensorBoard curves under <run>/tb (cachetrain.run.events); rank 0 writes them, from the
        first event on (a missing tensorboard package is said once, then training goes on)."""
        return RunEvents(self.layout, self.cfg, self.records, writer=self.dist.writer,
                         say=lambda msg: self.console.print(msg, markup=False, highlight=False))

    @cached_property
    def data(self):
        """The images (stage 0's and the end-to-end network's input), with stage 0's shuffle and augmentation
        seed, this rank's share of each batch under torchrun."""
        return open_dataset(self.cfg.data, stage_seed(self.cfg.train.seed, 0), self.device, self.cfg.loader.workers,
                            self.cfg.loader.backend, self.dist.shard)

    @classmethod
    @contextmanager
    def open(cls, cfg: Config, dist: Dist, access: Access, console: Console | None = None, *,
             from_stage: int | None = None, checks: Iterable[Callable[[Run], None]] = ()) -> Iterator[Run]:
        """The run, opened for `access` (the module docstring gives every step, in order)."""
        run = cls(cfg, dist, console)
        try:
            for check in checks:
                check(run)
            writes = access is Access.WRITE and dist.writer
            if access >= Access.READ:
                if isinstance(run.layout.cache_root, RemotePath):
                    run.layout.cache_root.check_bucket(write=writes)
                claim_caches(run.layout, write=writes)
            if access < Access.WRITE and run.identity.started():
                run.identity.check(cfg, None)
            if writes:
                run._lock.acquire()
                run._settle_identity(from_stage)
            if access is Access.WRITE:
                dist.barrier()
            yield run
        finally:
            run._lock.release()

    def _settle_identity(self, from_stage: int | None) -> None:
        """Start the run (config.yaml, written once) or check that this config is the run's, recording an
        accepted `--from-stage` change; called with the run locked, so two commands cannot race on it."""
        cfg, identity = self.cfg, self.identity
        if not identity.started():
            describe_data = getattr(self.data, "metadata", None)
            identity.start(cfg, describe_data() if describe_data else None)
            return
        changes = identity.check(cfg, from_stage)
        if from_stage is None:
            return
        if not changes:
            self.console.print(f"--from-stage {from_stage}: the config is the run's own; nothing is retrained for it")
            return
        identity.record_change(cfg, from_stage, changes)
        self.state.forget_history()
        self.console.print(f"config changed from stage {from_stage}: {describe(changes)}; stages {from_stage}.. are "
                           f"retrained")
