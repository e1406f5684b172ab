"""The run: its files, its checkpoints, its identity, its lock and the state of its stages.

    layout.py      where every file of a run is (paths only)
    checkpoint.py  a unit's checkpoint: the typed record, its schema, safe loading, atomic saving
    records.py     metrics lines and the saved cache plan
    events.py      TensorBoard curves under <run>/tb, made from the records as the run trains
    identity.py    the run's config as its identity; `--from-stage` changes and their history
    lock.py        one process per run; one run per cache folder
    state.py       StageState and StaleReason: what is done, what is stale and why, what runs next
    run.py         Run, and Run.open: what opening a run checks, in what order
"""

from cachetrain.run.layout import E2E, RunLayout, Unit, unit_name
from cachetrain.run.run import Access, Run
from cachetrain.run.state import NextAction, StageState, StageStatus, StaleReason

__all__ = ["Access", "E2E", "NextAction", "Run", "RunLayout", "StageState", "StageStatus", "StaleReason", "Unit",
           "unit_name"]
