"""Prefix sharing: which runs of a sweep train which stages, and what the sweep costs with sharing and without.

Stage j of a run depends on every config key whose scope (cachetrain.config.key_scope, declared beside
each key) starts at a stage <= j: two runs with the same values for all of those, the seed included,
train identical stages 0..j. So the runs of a sweep form a forest. Each run, in order, looks for the
earlier run it shares the most leading stages with: sharing none, it is a root and trains every stage;
sharing stages 0..f-1, it is a fork at f (cachetrain.train.fork: those stages and their caches are hard
links to the parent's) and trains stages f..J-1 only; sharing all J (a change only the end-to-end
network sees, such as train.e2e_epochs), it trains no stage.

Caches follow the stages: a fork at f reuses the parent's caches of stages 0..f-1, since every key they
depend on (the stages', and cache.*, whose scope starts at stage 1) is equal when f >= 2. At f = 1 a
difference in cache.* (the dtype, the number of views) means stage 0's cache is made again (counted as
one caching pass; for extra views only the missing stores are written). A caching pass is one stage's
outputs written for every split and view; a run with cache.mode `none` makes none, and `plan` counts
as caching every stage (the plan file is not known before the run).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import NamedTuple

from cachetrain.config import Config, key_scope
from cachetrain.run.identity import result_keys
from cachetrain.sweep.spec import PlannedRun


@dataclass(frozen=True)
class Node:
    run: PlannedRun
    parent: str | None  # the run it forks from
    at: int  # the first stage it trains: 0 for a root, model.stages when it trains none
    stage_trainings: int
    caching_passes: int
    unshared_stage_trainings: int  # what it would train alone
    unshared_caching_passes: int


class Totals(NamedTuple):
    stage_trainings: int
    caching_passes: int
    e2e_trainings: int


def stage_signatures(cfg: Config) -> list[str]:
    """sig[j]: a digest of every result key that can change stages 0..j (equal sig[j]: identical stages 0..j)."""
    keys = result_keys(cfg)
    scopes = {k: key_scope(k).first_stage for k in keys}
    sigs = []
    for j in range(cfg.model.stages):
        part = {k: v for k, v in keys.items() if scopes[k] is not None and scopes[k] <= j}
        sigs.append(hashlib.sha256(json.dumps(part, sort_keys=True, default=str).encode()).hexdigest())
    return sigs


def _storage(cfg: Config) -> dict:
    """The keys that decide what a cache holds, besides the stages that wrote it."""
    return {k: v for k, v in result_keys(cfg).items() if k.startswith("cache.")}


def cached_count(cfg: Config) -> int:
    return 0 if cfg.cache.mode == "none" else cfg.model.stages - 1


def plan(runs: list[PlannedRun]) -> list[Node]:
    """Each run's place in the forest (the module docstring), in the runs' order: a parent before its forks."""
    sigs = {r.name: stage_signatures(r.cfg) for r in runs}
    nodes: list[Node] = []
    for i, run in enumerate(runs):
        mine = sigs[run.name]
        depth = run.cfg.model.stages
        best, shared = None, 0
        for earlier in runs[:i]:
            theirs = sigs[earlier.name]
            n = 0
            while n < min(len(mine), len(theirs)) and mine[n] == theirs[n]:
                n += 1
            if n > shared:
                best, shared = earlier, n
        caches = cached_count(run.cfg)
        if best is None:
            nodes.append(Node(run, None, 0, depth, caches, depth, caches))
            continue
        # the parent's caches of stages 0..shared-1 are linked; the child writes its own from stage `shared` on,
        # and stage 0's again when the cache.* settings differ (only possible at shared == 1)
        own = max(0, caches - shared)
        if shared == 1 and caches and _storage(run.cfg) != _storage(best.cfg):
            own += 1
        nodes.append(Node(run, best.name, shared, depth - shared, own, depth, caches))
    return nodes


def totals(nodes: list[Node], shared: bool) -> Totals:
    return Totals(sum(n.stage_trainings if shared else n.unshared_stage_trainings for n in nodes),
                  sum(n.caching_passes if shared else n.unshared_caching_passes for n in nodes),
                  sum(n.run.e2e for n in nodes))
