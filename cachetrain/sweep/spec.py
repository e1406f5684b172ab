"""What a sweep is: a base config, grids of values for config keys, and seeds; each point of it one run.

A grid is a product: `--grid model.k=1,2,3 --grid train.lr=0.05,0.1` is six points. A grids file
(`--grids FILE`) holds several grids, their points joined:

    # each entry: config keys with their values (a list, or one value); `e2e: true` also trains the
    # end-to-end baseline of the entry's runs
    - {}                                              # the base config alone
    - {model.k: [1, 3]}
    - {model.arch: [vgg, resnet], model.stages: 5, e2e: true}

Every point runs once per seed, grid by grid (all seeds of the first grid, then the next). Seed i
(0..N-1) sets train.seed (initial weights, every shuffle and augmentation draw: stage 0's image order,
the caches' orders) and data.split_seed (which training samples are held out for validation) to the
base config's value plus i, so the seeds' runs are independent draws of everything random. Points whose
configs are the same (a value equal to the base's, say) are one run, named after the first.

A run is named by its settings and its train.seed, `k=3,seed=1` (a key is shortened to its last part
where that is unambiguous in the sweep; values made filesystem-safe), `base,seed=0` for the base config;
the runs' names are checked unique.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import re
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from cachetrain.config import Config, ConfigError, key_scope, load_config
from cachetrain.run.identity import config_hash

SEED_KEYS = ("train.seed", "data.split_seed")  # what --seeds sets; a grid may not
E2E_FLAG = "e2e"  # a grids-file entry's flag, not a config key


@dataclass(frozen=True)
class Grid:
    """One product of values: ((key, (v1, v2, ...)), ...); `e2e`: its runs train the end-to-end baseline too."""

    keys: tuple[tuple[str, tuple[Any, ...]], ...]
    e2e: bool = False

    def points(self) -> list[tuple[tuple[str, Any], ...]]:
        names = [k for k, _ in self.keys]
        return [tuple(zip(names, combo)) for combo in itertools.product(*(v for _, v in self.keys))]

    def describe(self) -> str:
        text = " ".join(f"{k}={','.join(_show(v) for v in vs)}" for k, vs in self.keys) or "(the base config)"
        return text + (" with end to end" if self.e2e else "")


@dataclass(frozen=True)
class Point:
    """One run of the sweep before seeds: its settings over the base config."""

    settings: tuple[tuple[str, Any], ...]
    e2e: bool


@dataclass(frozen=True)
class PlannedRun:
    name: str
    group: str  # the name without the seed: the runs of one group differ only in seed
    seed: int  # its train.seed
    settings: tuple[tuple[str, Any], ...]
    cfg: Config
    e2e: bool

    @property
    def path(self) -> Path:
        return self.cfg.run_path


@dataclass(frozen=True)
class SweepSpec:
    config: str  # the base config file
    sets: tuple[str, ...]  # --set overrides of the base
    grids: tuple[Grid, ...]
    seeds: int
    e2e: bool  # --e2e: every run trains the end-to-end baseline

    def base(self) -> Config:
        return load_config(self.config, list(self.sets))

    def identity(self) -> dict:
        """What makes two sweeps the same sweep (paths aside): sweep.json keeps it, a rerun must match it."""
        return {"base_config_hash": config_hash(self.base()), "grids": [self._grid_json(g) for g in self.grids],
                "seeds": self.seeds, "e2e": self.e2e}

    @staticmethod
    def _grid_json(g: Grid) -> dict:
        return {"keys": [[k, list(v)] for k, v in g.keys], "e2e": g.e2e}

    def describe(self) -> str:
        grids = "; ".join(g.describe() for g in self.grids)
        return f"{grids}; {self.seeds} seed{'s' if self.seeds != 1 else ''}" + ("; end to end" if self.e2e else "")

    def points(self, grid: Grid | None = None) -> list[Point]:
        out: list[Point] = []
        for g in self.grids if grid is None else [grid]:
            out += [Point(p, g.e2e or self.e2e) for p in g.points()]
        return out

    def runs(self, out: Path) -> list[PlannedRun]:
        """Every run, grid by grid and within a grid seed by seed (all its points of seed 0 first), each with its
        resolved config under out/runs/<name>: a sweep stopped early has whole grids, each with whole seeds.
        A ConfigError names the setting a config refuses."""
        base = self.base()
        keys = [k for p in self.points() for k, _ in p.settings]
        short = _short_names(keys)
        runs: list[PlannedRun] = []
        seen: dict[str, PlannedRun] = {}  # config hash -> its run (points that coincide are one run)
        names: dict[str, tuple] = {}
        for i, p in ((i, p) for g in self.grids for i in range(self.seeds) for p in self.points(g)):
            group = ",".join(f"{short[k]}={_slug(v)}" for k, v in p.settings) or "base"
            seed = base.train.seed + i
            name = f"{group},seed={seed}"
            seeds = [f"train.seed={seed}", f"data.split_seed={base.data.split_seed + i}"]
            path = out / "runs" / name
            sets = [*self.sets, *(f"{k}={json.dumps(v)}" for k, v in p.settings), *seeds, f"run_dir={path}",
                    f"name={name}"]
            cfg = load_config(self.config, sets)
            h = config_hash(cfg)
            if h in seen:  # the same config as an earlier point: one run, which trains e2e if either asks
                first = seen[h]
                if p.e2e and not first.e2e:
                    runs[runs.index(first)] = seen[h] = PlannedRun(first.name, first.group, first.seed,
                                                                   first.settings, first.cfg, True)
                continue
            if name in names and names[name] != p.settings:
                raise ConfigError(f"sweep: the settings {_show_settings(names[name])} and "
                                  f"{_show_settings(p.settings)} both make the run name {name!r}; give one of "
                                  f"them another value spelling")
            names[name] = p.settings
            run = PlannedRun(name, group, seed, p.settings, cfg, p.e2e)
            seen[h] = run
            runs.append(run)
        return runs


def _show(v: Any) -> str:
    return json.dumps(v) if isinstance(v, (list, dict)) or v is None else str(v).lower() if isinstance(v, bool) else \
        str(v)


def _show_settings(settings: tuple) -> str:
    return ", ".join(f"{k}={_show(v)}" for k, v in settings) or "(none)"


def _slug(v: Any) -> str:
    """A value as part of a folder name: letters, digits and . + - only."""
    if isinstance(v, list):
        text = "-".join(_slug(x) for x in v) or "empty"
    else:
        text = _show(v)
    return re.sub(r"[^A-Za-z0-9.+-]", "-", text) or "empty"


def _short_names(keys: list[str]) -> dict[str, str]:
    """Each key as its last part (`model.k` -> `k`) where no other key of the sweep has the same last part."""
    last = {}
    for k in dict.fromkeys(keys):
        last.setdefault(k.rsplit(".", 1)[-1], []).append(k)
    return {k: (k.rsplit(".", 1)[-1] if len(last[k.rsplit(".", 1)[-1]]) == 1 else k) for k in dict.fromkeys(keys)}


# -- parsing ------------------------------------------------------------------------------------------------------
def _check_key(key: str, where: str) -> str:
    key = key.strip()
    try:
        scope = key_scope(key)
    except ConfigError:
        raise ConfigError(f"{where}: {key!r} is not a config key (expected a dotted key such as model.k or "
                          f"stages.3.lr)") from None
    if key in SEED_KEYS:
        raise ConfigError(f"{where}: {key} is what --seeds sets; give the number of seeds with --seeds N instead")
    if scope.first_stage is None and not scope.e2e:
        raise ConfigError(f"{where}: {key} changes no result (where files live, how many processes read); a sweep "
                          f"over it would train the same run again; set it with --set")
    return key


def _split_values(text: str) -> list[str]:
    """`1,2,[1, 3]` -> ["1", "2", "[1, 3]"]: commas inside brackets or quotes do not split."""
    parts, depth, quote, cur = [], 0, None, ""
    for ch in text:
        if quote:
            quote = None if ch == quote else quote
        elif ch in "\"'":
            quote = ch
        elif ch in "[{":
            depth += 1
        elif ch in "]}":
            depth -= 1
        elif ch == "," and depth == 0:
            parts.append(cur)
            cur = ""
            continue
        cur += ch
    parts.append(cur)
    return [p.strip() for p in parts]


def parse_grid_option(text: str) -> tuple[str, tuple[Any, ...]]:
    """`--grid key=v1,v2` -> (key, (v1, v2)); each value read as YAML (`3`, `true`, `[1, 3]`)."""
    where = f"--grid {text!r}"
    if "=" not in text:
        raise ConfigError(f"{where}: expected key=value1,value2,... (e.g. --grid model.k=1,2,3)")
    key, values = text.split("=", 1)
    key = _check_key(key, where)
    parts = _split_values(values)
    if not values.strip() or any(not p for p in parts):
        raise ConfigError(f"{where}: expected comma-separated values after {key}=, none empty")
    try:
        parsed = tuple(yaml.safe_load(p) for p in parts)
    except yaml.YAMLError as e:
        raise ConfigError(f"{where}: a value is not valid YAML ({str(e).splitlines()[0]})") from None
    return key, _unique(parsed, where)


def _unique(values: tuple, where: str) -> tuple:
    dup = [v for i, v in enumerate(values) if v in values[:i]]
    if dup:
        raise ConfigError(f"{where}: the value {_show(dup[0])} is given twice")
    return values


def read_grids_file(path: str | Path) -> list[Grid]:
    """A grids file (the module docstring), checked: every key a config key, every value list non-empty."""
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"--grids {path}: file not found") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"--grids {path}: not valid YAML ({str(e).splitlines()[0]})") from None
    if not isinstance(raw, list) or not raw:
        raise ConfigError(f"--grids {path}: expected a list of grids, each a mapping of config keys to values")
    grids = []
    for i, entry in enumerate(raw):
        where = f"--grids {path}: entry {i + 1}"
        if entry is None:
            entry = {}
        if not isinstance(entry, dict):
            raise ConfigError(f"{where}: expected a mapping of config keys to values, got {entry!r}")
        e2e = entry.get(E2E_FLAG, False)
        if not isinstance(e2e, bool):
            raise ConfigError(f"{where}: e2e: expected true/false, got {e2e!r}")
        keys = []
        for key, values in entry.items():
            if key == E2E_FLAG:
                continue
            key = _check_key(str(key), where)
            values = tuple(values) if isinstance(values, list) and values and _is_value_list(key, values) else \
                (values,)
            if not values:
                raise ConfigError(f"{where}: {key}: expected at least one value")
            keys.append((key, _unique(values, f"{where}: {key}")))
        grids.append(Grid(tuple(keys), e2e))
    return grids


def _is_value_list(key: str, values: list) -> bool:
    """Whether a list in a grids file is the key's values, or one value of a list-typed key (model.downsample:
    [1, 3] is one value; [[1], [1, 3]] two)."""
    return not _list_typed(key) or all(isinstance(v, list) for v in values)


def _list_typed(key: str) -> bool:
    tp: Any = Config
    for part in key.split("."):
        if not dataclasses.is_dataclass(tp):
            return False  # stages.<j>.<key>: scalars
        tp = typing.get_type_hints(tp).get(part)
    return typing.get_origin(tp) is list


def make_spec(config: str, sets: list[str], grid_options: list[str], grids_file: str | None, seeds: int,
              e2e: bool) -> SweepSpec:
    if seeds < 1:
        raise ConfigError(f"--seeds {seeds}: expected a number of seeds >= 1")
    grids: list[Grid] = read_grids_file(grids_file) if grids_file else []
    if grid_options:
        keys = [parse_grid_option(g) for g in grid_options]
        dup = [k for i, (k, _) in enumerate(keys) if k in [x for x, _ in keys[:i]]]
        if dup:
            raise ConfigError(f"--grid {dup[0]}: given twice; give all its values in one --grid")
        grids.append(Grid(tuple(keys)))
    if not grids:
        grids = [Grid(())]  # seeds of the base config alone
    spec = SweepSpec(str(config), tuple(sets), tuple(grids), seeds, e2e)
    spec.base()  # a bad base config or --set fails here, before anything
    return spec
