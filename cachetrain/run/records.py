"""A run's small records besides checkpoints: each unit's metrics lines, and the saved cache plan.

`metrics.jsonl` holds one JSON object per finished epoch of a unit (a stage or the end-to-end
network), appended and fsynced line by line (cachetrain.durable.append_line); a last line torn by a
crash is skipped when read, and rows of epochs after the unit's checkpoint (written by a run that
died before checkpointing them) are dropped on resume (`truncate_metrics`). Under torchrun only rank 0
writes (`writer`).

`plan.json` is `cachetrain.plan.planner.describe`'s result; a run with cache.mode `plan` caches the
stages its `cached` list names.
"""

from __future__ import annotations

import json

from cachetrain.durable import append_line, atomic_write, read_lines, write_json
from cachetrain.errors import Fix, StageError
from cachetrain.run.layout import RunLayout, Unit


class Records:
    def __init__(self, layout: RunLayout, writer: bool = True):
        self.layout, self.writer = layout, writer

    # -- metrics ------------------------------------------------------------------------------------
    def read_metrics(self, unit: Unit) -> list[dict]:
        """The rows of finished epochs; a last line torn by a crash mid-append is skipped (its epoch was
        not checkpointed either, so it is trained again)."""
        return read_lines(self.layout.metrics(unit))

    def append_metrics(self, unit: Unit, row: dict) -> None:
        if self.writer:
            append_line(self.layout.metrics(unit), json.dumps(row))

    def truncate_metrics(self, unit: Unit, epochs: int) -> None:
        """Keep the rows of epochs 1..`epochs` only (and drop a torn last line)."""
        if not self.writer:
            return
        rows = [r for r in self.read_metrics(unit) if r["epoch"] <= epochs]
        atomic_write(self.layout.metrics(unit), "".join(json.dumps(r) + "\n" for r in rows))

    # -- the cache plan -------------------------------------------------------------------------------
    def save_plan(self, plan: dict) -> None:
        """Written atomically and durably: a crash leaves the old plan or the new one."""
        write_json(self.layout.plan, plan)

    def planned_stages(self, depth: int) -> set[int]:
        """The stages plan.json caches, checked against the network's depth (the last stage is never cached)."""
        path = self.layout.plan
        if not path.exists():
            raise StageError(f"cache.mode: 'plan' needs {path}, which plan makes", Fix.of("plan"))
        try:
            cached = set(json.loads(path.read_text())["cached"])
            ok = all(isinstance(j, int) and not isinstance(j, bool) and 0 <= j < depth - 1 for j in cached)
        except (ValueError, KeyError, TypeError):
            ok = False
        if not ok:
            raise StageError(f"{path}: expected {{\"cached\": [stage indices in 0..{depth - 2}]}}; make a new one "
                             f"with plan", Fix.of("plan"))
        return cached
