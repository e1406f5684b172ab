"""A run's config is its identity: what may change between commands on one run, and what may not.

`<run>/config.yaml` is written once, when the run starts. A later command whose resolved config
differs from it in a key that shapes results (model, data, train, cache, the loader's traversal
order) is refused in one line naming each key and both values, unless the user asks to retrain
from stage J (`--from-stage J`). That change is recorded in `<run>/run.json`'s history:

    {"config_hash": "<hash of the result keys now>",
     "history": [{"from_stage": J, "changes": {"train.lr": [0.05, 0.01]},
                  "hash_before": "...", "hash_after": "...", "time": "..."}]}

Stage j's checkpoint holds the config it was trained with. It is still valid under the current
config when the two agree on every result key, or when every change since then was made from a
stage after j (`stage_config_ok`): `--from-stage 2` keeps stages 0 and 1 and retrains 2 onwards.
"""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path
from typing import Any

from cachetrain.config import Config, ConfigError, added_keys, free_keys, load_config, save_config
from cachetrain.durable import write_json
from cachetrain.run.layout import RunLayout

# keys that shape every stage's tensors: a change to them leaves no earlier stage reusable
WHOLE_RUN_SECTIONS = ("data.", "model.")
STAGE_LOCAL_KEYS = frozenset({"model.k", "model.aux", "model.aux_width"})  # heads only: a later stage may differ


def flatten(raw: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in raw.items():
        if isinstance(value, dict):
            out.update(flatten(value, f"{prefix}{key}."))
        else:
            out[prefix + key] = value
    return out


def result_keys(cfg: Config | dict) -> dict[str, Any]:
    """The flattened config without the keys that cannot change results. A saved config (a checkpoint's)
    is read through the current schema first, so a key added since, at its default, is no difference."""
    if isinstance(cfg, dict):
        try:
            cfg = Config.from_dict(cfg)
        except ConfigError:
            pass  # a key since removed or renamed: compared as saved, so it differs
    raw = cfg.to_dict() if isinstance(cfg, Config) else cfg
    free = free_keys()  # marked where each key is declared (cachetrain.config.FREE)
    return {k: v for k, v in flatten(raw).items() if k not in free}


def config_hash(cfg: Config | dict) -> str:
    """12 hex digits over the result keys; a key marked `added` (cachetrain.config) counts only once set to
    something other than its default, so a run started before it existed keeps its hash."""
    added = added_keys()
    keys = {k: v for k, v in result_keys(cfg).items() if k not in added or v != added[k]}
    blob = json.dumps(keys, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


def differences(old: Config | dict, new: Config | dict) -> dict[str, tuple[Any, Any]]:
    """{key: (old, new)} for every result key whose value differs (a key absent on one side: None)."""
    a, b = result_keys(old), result_keys(new)
    return {k: (a.get(k), b.get(k)) for k in sorted(a.keys() | b.keys()) if a.get(k) != b.get(k)}


def describe(changes: dict[str, tuple[Any, Any]]) -> str:
    return ", ".join(f"{k} {_show(old)} -> {_show(new)}" for k, (old, new) in changes.items())


def _show(value: Any) -> str:
    return json.dumps(value) if isinstance(value, (list, dict, str)) or value is None else str(value)


class RunIdentity:
    """`<run>/config.yaml` and `<run>/run.json` of one run directory."""

    def __init__(self, layout: RunLayout):
        self.config_path = layout.config
        self.meta_path = layout.meta

    def started(self) -> bool:
        return self.config_path.exists()

    def saved_config(self) -> Config:
        return load_config(self.config_path)

    def meta(self) -> dict:
        if not self.meta_path.exists():
            return {"history": []}
        try:
            meta = json.loads(self.meta_path.read_text())
            assert isinstance(meta.get("history", []), list)
            return {"history": [], **meta}
        except (ValueError, AssertionError):
            raise ConfigError(f"{self.meta_path}: unreadable run metadata; expected the JSON object cachetrain "
                              f"writes (restore it from a backup, or start a new run directory)") from None

    def history(self) -> list[dict]:
        return self.meta()["history"]

    def check(self, cfg: Config, from_stage: int | None) -> dict[str, tuple[Any, Any]]:
        """Refuse `cfg` if it differs from the run's saved config in a result key, unless `from_stage` is
        given and allows the change; returns the differences (empty when none)."""
        changes = differences(self.saved_config(), cfg)
        if not changes:
            return {}
        if from_stage is None:
            raise ConfigError(
                f"{self.config_path}: this run was started with a different config: {describe(changes)}; "
                f"start a new run (--run DIR, or another run_dir) or retrain from stage J with --from-stage J")
        whole = [k for k in changes if k.startswith(WHOLE_RUN_SECTIONS) and k not in STAGE_LOCAL_KEYS]
        if whole and from_stage != 0:
            raise ConfigError(f"--from-stage {from_stage}: {', '.join(whole)} shape every stage, so no earlier stage "
                              f"can be kept; use --from-stage 0 or start a new run")
        return changes

    def start(self, cfg: Config, data: dict | None = None, history: list[dict] = (), **extra: Any) -> None:
        """A new run: its config and metadata (with what the dataset says of itself, e.g. an image folder's
        class list and skipped files; a fork's history and `forked_from`), each written atomically."""
        save_config(cfg, self.config_path)
        write_json(self.meta_path, {"config_hash": config_hash(cfg), "history": list(history),
                                    "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), **extra,
                                    **({"data": data} if data else {})})

    def record_change(self, cfg: Config, from_stage: int, changes: dict[str, tuple[Any, Any]]) -> None:
        """`--from-stage J`: the new config replaces the saved one and the change joins the history. The
        metadata goes first: a crash between the two writes leaves a history entry whose hash_after
        does not match config.yaml, which the next command detects as a config change again."""
        meta = self.meta()
        meta["history"].append(change_entry(self.saved_config(), cfg, from_stage, changes))
        meta["config_hash"] = config_hash(cfg)
        write_json(self.meta_path, meta)
        save_config(cfg, self.config_path)


def change_entry(before: Config, after: Config, from_stage: int, changes: dict[str, tuple[Any, Any]]) -> dict:
    """One entry of run.json's history: a change of result keys accepted from stage `from_stage`."""
    return {"from_stage": from_stage, "changes": {k: list(v) for k, v in changes.items()},
            "hash_before": config_hash(before), "hash_after": config_hash(after),
            "time": time.strftime("%Y-%m-%dT%H:%M:%S%z")}


def stage_config_ok(trained_with: dict | None, current: Config, history: list[dict], j: int) -> bool:
    """Whether stage j, trained with config `trained_with`, is valid under `current`: the same result
    keys, or an older config that every later change left in force for stage j (each was made
    --from-stage J with J > j). Checkpoints without a config (none are written so) count as valid."""
    if trained_with is None:
        return True
    h = config_hash(trained_with)
    if h == config_hash(current):
        return True
    for change in reversed(history):  # newest first: a change from stage <= j ends what stage j may keep
        if change["from_stage"] <= j:
            return False
        if h == change["hash_before"]:
            return True
    return False
