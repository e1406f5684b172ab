"""Fork a run at stage J: a new run that reuses stages 0..J-1 of another, and their caches, without copying.

`cachetrain fork --run A --at J --to B [--set ...]` makes run B whose stages 0..J-1 are A's (J = model.stages:
all of them, for a change that only the end-to-end network sees, such as train.e2e_epochs): their
checkpoints and cache chunk files are hard links to A's files, so an ablation of the later stages costs
only the later stages, in time and in disk. B's config is A's with the `--set` changes, recorded in B's
history as a change from stage J (cachetrain.run.identity), so the lineage checks stay exact: B's
stages 0..J-1 are valid because every change was made from stage J, and B's stage J reads the very
bytes A's stage J-1 cached (the same content digests).

Why hard links are safe: nothing cachetrain writes modifies a file in place except the metrics lines
(appended) and the stores' metadata (rewritten by zarr). Checkpoints and chunk files are replaced by
rename (a temp file, then os.replace), which gives B's name a new file and leaves A's untouched; a
repair deletes B's name only. So B's metrics files and every store's JSON metadata are copied, and
everything else is linked. Hard links need one file system: across two, the fork is refused rather than
silently copying terabytes. With `cache.location` on an object store (s3://), the cached stages' stores
are copied there, server-side, object by object (`_copy_objects`).

B is assembled in a hidden folder beside it and renamed into place when whole, so a crash leaves no
half-made run under B's name. A's run lock is held meanwhile, so no job changes A under the fork.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
from pathlib import Path

from rich.console import Console

from cachetrain.cache.location import RemotePath, is_remote, remote_errors
from cachetrain.config import Config, ConfigError, load_config
from cachetrain.dist import Dist
from cachetrain.durable import fsync_path
from cachetrain.errors import Fix, StageError
from cachetrain.run import Access, Run, RunLayout
from cachetrain.run.identity import RunIdentity, change_entry, config_hash, describe
from cachetrain.run.lock import claim_caches

def fork_run(parent: Path, at: int, child: Path, overrides: list[str], console: Console) -> Config:
    """Make run `child` from `parent`'s stages 0..at-1 (see the module docstring); returns its config."""
    parent, child = Path(parent), Path(child)
    ident = RunIdentity(RunLayout.of(parent))
    if not ident.started():
        raise ConfigError(f"--run {parent}: no run there (no config.yaml); fork an existing run")
    if child.exists() and (not child.is_dir() or any(child.iterdir())):
        raise ConfigError(f"--to {child}: already exists and is not empty; fork into a new run directory")
    base = ident.saved_config()
    cfg = load_config(ident.config_path, [*overrides, f"run_dir={child}", f"name={child.name}"])
    depth = base.model.stages
    if not 0 <= at <= depth:  # at == depth: every stage reused, only the end-to-end network is B's own
        raise ConfigError(f"--at {at}: expected a stage index in [0, {depth}] (model.stages is {depth}; {depth}: "
                          f"reuse every stage)")
    changes = ident.check(cfg, from_stage=at)  # refuses data./model. changes unless --at 0, naming them

    with Run.open(base, Dist(), Access.WRITE, console) as run:  # A locked: nothing changes it while it is linked
        j = run.state.first_unfinished()
        if j is not None and j < at:
            raise StageError(f"--at {at}: stage {j} of {parent} is {run.state.stage_state(j).value}; finish it first "
                             f"or fork at an earlier stage", Fix.of("stage", run=parent))
        cached = sorted(j for j in run.state.cached_stages() if j < at)
        tmp = child.parent / f".{child.name}.forking-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        try:
            # the child's stores: in the folder being assembled, or under its own cache.location
            stores = RunLayout.of(child if cfg.cache.location else tmp, cfg.cache.location)
            claim_caches(stores, write=True)  # B's caches under cache.location must not be another run's
            linked = _assemble(run, tmp, stores, at, cached)
            meta = ident.meta()
            history = list(meta["history"])
            if changes:
                history.append(change_entry(base, cfg, at, changes))
            RunIdentity(RunLayout.of(tmp)).start(cfg, meta.get("data"), history, forked_from={
                "run": str(parent.resolve()), "at": at, "config_hash": config_hash(base)})
            if child.exists():
                child.rmdir()  # empty (checked above)
            os.rename(tmp, child)
            fsync_path(child.parent)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    console.print(f"forked {parent} at stage {at} into {child}: stages 0..{at - 1} and the caches of stages "
                  f"{', '.join(map(str, cached)) or 'none'} reused ({linked} files hard-linked)"
                  + (f"; changed from stage {at}: {describe(changes)}" if changes else ""), markup=False)
    return cfg


def _assemble(run: Run, tmp: Path, stores: RunLayout, at: int, cached: list[int]) -> int:
    """Link or copy stages 0..at-1 into `tmp` and the cached stages' stores to where `stores` keeps them;
    returns the files linked."""
    layout = run.layout
    linked = 0
    for j in range(at):
        linked += _mirror(layout.unit_dir(j), tmp / layout.unit_dir(j).relative_to(layout.path),
                          copy=lambda p: p.name.endswith(".jsonl"))
    for j in cached:
        for _, _, store in run.state.stores(j):
            if not store.exists():
                continue
            target = stores.store_at(layout.store_key(store))
            if is_remote(store) or is_remote(target):
                _copy_objects(store, target)
            else:
                linked += _mirror(store, target, copy=lambda p: p.suffix == ".json")
    probes = layout.probes
    if probes.exists():
        rows = [line for line in probes.read_text().splitlines() if line.strip()]
        keep = [r for r in rows if _greedy_row_before(json.loads(r), at)]
        if keep:
            (tmp / probes.name).write_text("\n".join(keep) + "\n")
            fsync_path(tmp / probes.name)
    if at == run.depth and layout.heads.exists():  # every stage reused: the averaged heads measured the same ones
        shutil.copy2(layout.heads, tmp / layout.heads.name)
        fsync_path(tmp / layout.heads.name)
    return linked


def _greedy_row_before(row: dict, at: int) -> bool:
    return row.get("net") == "greedy" and isinstance(row.get("stage"), int) and row["stage"] < at


def _copy_objects(src: RemotePath, dst: RemotePath) -> None:
    """Copy a store within one object store, object by object (the store copies them server-side: no
    bytes pass through this machine), the group's zarr.json last: until it is there the copy is no store,
    and a crash midway leaves nothing that claims to be complete. An object store has no hard links."""
    if not (is_remote(src) and is_remote(dst) and src.scheme == dst.scheme):
        raise ConfigError(f"cache.location: {dst} and {src}: a fork copies caches within one object store, or "
                          f"links them on one file system; keep the parent's cache.location")
    keys = sorted(src.sizes(), key=lambda k: k == "zarr.json")
    with remote_errors("copying the store", str(src)):
        for key in keys:
            src.fs.copy(f"{src.key}/{key}", f"{dst.key}/{key}")


def _mirror(src: Path, dst: Path, copy) -> int:
    """Recreate folder `src` at `dst`: files for which copy(path) holds are copied, the rest hard-linked;
    every file and folder made durable. Returns the number of links."""
    links = 0
    for folder, dirs, files in os.walk(src):
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        out = dst / Path(folder).relative_to(src)
        out.mkdir(parents=True, exist_ok=True)
        for name in files:
            if name.startswith(".") or name.endswith(".tmp"):
                continue  # a lock, a temp file of an interrupted write
            a, b = Path(folder) / name, out / name
            if copy(a):
                shutil.copy2(a, b)
                fsync_path(b)
                continue
            try:
                os.link(a, b)
            except OSError as e:
                if e.errno == errno.EXDEV:
                    raise ConfigError(f"--to {dst}: on another file system than {a}; a fork hard-links the parent's "
                                      f"files, so put the new run on the same file system") from None
                raise
            links += 1
        fsync_path(out)
    return links
