"""Running a sweep: its folder, its plan printed first, every run trained (or forked, then trained), resumably.

    <out>/sweep.json      what the sweep is (its spec's identity: base config hash, grids, seeds, e2e) and every
                          run: name, group, seed, settings, parent, fork stage, whether it trains end to end
    <out>/steps.jsonl     one row per finished step of a run (fork, train, e2e, heads): seconds, stages
                          trained and caches written, so the sweep's own cost is on record
    <out>/runs/<name>/    each run, an ordinary run directory (every command works on it)
    <out>/report/         `report` over all the runs, seeds aggregated (cachetrain.study.report)
    <out>/.lock           held by the sweep's process

Rerunning the same command resumes: a finished run is skipped (its state, read from its files, says so),
a killed one continues where its files say it stopped (a fork is made whole or not at all), and a sweep
folder holding another grid is refused in one line. The runs go seed by seed, each parent before its
forks.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

from rich.console import Console

from cachetrain.cache import CacheState
from cachetrain.config import ConfigError
from cachetrain.dist import Dist
from cachetrain.durable import append_line, write_json
from cachetrain.run import Access, E2E, Run, RunLayout, StageState
from cachetrain.run.identity import config_hash, differences
from cachetrain.run.lock import RunLock
from cachetrain.sweep.plan import Node, plan, totals
from cachetrain.sweep.spec import SweepSpec, _show

HEADS = 4  # head averaging over the last 1..HEADS stages is recorded for every run (cachetrain.train.ensemble)


class Sweep:
    def __init__(self, spec: SweepSpec, out: Path, console: Console):
        self.spec, self.out, self.console = spec, Path(out), console
        self.runs = spec.runs(self.out)
        self.nodes = plan(self.runs)

    # -- the folder ------------------------------------------------------------------------------------
    @property
    def meta_path(self) -> Path:
        return self.out / "sweep.json"

    @property
    def steps_path(self) -> Path:
        return self.out / "steps.jsonl"

    def description(self) -> dict:
        return {"spec": self.spec.identity(), "config": self.spec.config, "sets": list(self.spec.sets),
                "described": self.spec.describe(),
                "runs": [{"name": n.run.name, "group": n.run.group, "seed": n.run.seed,
                          "settings": [[k, v] for k, v in n.run.settings], "path": f"runs/{n.run.name}",
                          "parent": n.parent, "at": n.at, "e2e": n.run.e2e, "config_hash": config_hash(n.run.cfg),
                          # the plan: what it trains and caches here, and what it would alone
                          "stage_trainings": n.stage_trainings, "caching_passes": n.caching_passes,
                          "unshared_stage_trainings": n.unshared_stage_trainings,
                          "unshared_caching_passes": n.unshared_caching_passes}
                         for n in self.nodes]}

    def check_folder(self) -> None:
        """A folder with another sweep's sweep.json is refused (a rerun must be the same sweep)."""
        if not self.meta_path.exists():
            if self.out.exists() and any(p.name not in (".lock",) for p in self.out.iterdir()):
                raise ConfigError(f"--out {self.out}: exists and holds no sweep.json; give an empty or new folder")
            return
        try:
            saved = json.loads(self.meta_path.read_text())
            spec = saved["spec"]
        except (ValueError, KeyError, TypeError):
            raise ConfigError(f"{self.meta_path}: unreadable; expected the sweep description cachetrain writes "
                              f"(restore it, or give another --out)") from None
        if spec != self.spec.identity():
            raise ConfigError(f"--out {self.out}: holds another sweep ({saved.get('described', '?')}, base config "
                              f"{spec.get('base_config_hash')}); this one is {self.spec.describe()}, base config "
                              f"{self.spec.identity()['base_config_hash']}: rerun that sweep as it was, or give "
                              f"another --out")

    # -- the plan ----------------------------------------------------------------------------------------
    def plan_lines(self) -> list[str]:
        lines = [f"sweep: {self.spec.describe()}: {len(self.runs)} runs under {self.out / 'runs'}"]
        width = max(len(n.run.name) for n in self.nodes)
        for n in self.nodes:
            how = "trains every stage" if n.parent is None else \
                f"fork of {n.parent} at stage {n.at}: " + (f"trains stages {n.at}..{n.run.cfg.model.stages - 1}"
                                                           if n.stage_trainings else "trains no stage")
            lines.append(f"  {n.run.name:<{width}}  {how}; {_passes(n.caching_passes)}"
                         + ("; end to end" if n.run.e2e else ""))
        with_, without = totals(self.nodes, True), totals(self.nodes, False)
        lines.append(f"with prefix sharing: {with_.stage_trainings} stage trainings, {with_.caching_passes} caching "
                     f"passes; without: {without.stage_trainings} stage trainings, {without.caching_passes} caching "
                     f"passes; {with_.e2e_trainings} end-to-end trainings either way")
        return lines

    # -- running -----------------------------------------------------------------------------------------
    def run(self, report: bool = True) -> dict:
        """Check the folder, print the plan, run every step not done, then report over every run."""
        self.check_folder()
        for line in self.plan_lines():
            self.console.print(line, markup=False, highlight=False)
        self.out.mkdir(parents=True, exist_ok=True)
        lock = RunLock(RunLayout.of(self.out))
        lock.acquire()
        try:
            write_json(self.meta_path, self.description())
            (self.out / "runs").mkdir(exist_ok=True)
            for tmp in (self.out / "runs").glob(".*.forking-*"):  # a fork a killed sweep left half-made
                shutil.rmtree(tmp, ignore_errors=True)
            for n in self.nodes:
                self._run_one(n)
            result = {"runs": len(self.nodes)}
            if report:
                from cachetrain.study.report import write_report

                write_report([self.out], self.out / "report")
                result["report"] = str(self.out / "report")
            return result
        finally:
            lock.release()

    def _run_one(self, n: Node) -> None:
        run, path = n.run, n.run.path
        if n.parent is not None and not (path / "config.yaml").exists():
            parent = next(x for x in self.nodes if x.run.name == n.parent).run
            overrides = [f"{k}={json.dumps(new)}" for k, (_, new) in differences(parent.cfg, run.cfg).items()]
            t0 = time.perf_counter()
            from cachetrain.train.fork import fork_run

            cfg = fork_run(parent.path, n.at, path, overrides, self.console)
            if config_hash(cfg) != config_hash(run.cfg):  # fork_run resolves the same keys: a bug otherwise
                raise RuntimeError(f"sweep: the fork {path} has config {config_hash(cfg)}, planned "
                                   f"{config_hash(run.cfg)}")
            self._record(run.name, "fork", time.perf_counter() - t0, stages=0, caches=0)
        self._train(n)

    def _train(self, n: Node) -> None:
        """Train what the run lacks: its stages and caches (with their probes), the end-to-end network (with its
        probes and CKA) when the run asks for it, and the averaged heads' accuracy."""
        from cachetrain.train.diagnostics import Diagnostics
        from cachetrain.train.ensemble import HeadEnsemble
        from cachetrain.train.greedy import Greedy
        from cachetrain.train.unit import EndToEnd, train_unit

        with self.open(n) as run:
            todo = pending(run, n.run.e2e)
            greedy = Greedy(run)
            diag = Diagnostics(greedy) if run.cfg.train.probes else None
            probes = diag is not None and bool(diag.missing_stages())
            if not (todo["stages"] or todo["caches"] or todo["e2e"] or probes or HeadEnsemble(greedy).missing(HEADS)):
                self.console.print(f"{n.run.name}: done", markup=False, highlight=False)
                return
            self.console.print(f"== {n.run.name}: {settings_line(n.run.settings)}, seed {n.run.seed}", markup=False,
                               highlight=False)
            t0 = time.perf_counter()
            greedy.train_all(after_stage=None if diag is None else diag.after_stage)
            self._record(n.run.name, "train", time.perf_counter() - t0, stages=len(todo["stages"]),
                         caches=len(todo["caches"]))
            if n.run.e2e:
                t0 = time.perf_counter()
                train_unit(run, EndToEnd(run))
                if diag is not None:
                    diag.catch_up_e2e()
                self._record(n.run.name, "e2e", time.perf_counter() - t0, e2e=int(todo["e2e"]))
            ensemble = HeadEnsemble(greedy)
            if ensemble.missing(HEADS):
                t0 = time.perf_counter()
                ensemble.record(HEADS)
                self._record(n.run.name, "heads", time.perf_counter() - t0)

    def _record(self, name: str, step: str, seconds: float, **counts) -> None:
        append_line(self.steps_path, json.dumps({"run": name, "step": step, "seconds": round(seconds, 3), **counts,
                                                 "time": time.strftime("%Y-%m-%dT%H:%M:%S%z")}))

    def open(self, n: Node) -> Run:
        """The run of node n, opened for writing (its lock held until the context ends)."""
        return Run.open(n.run.cfg, Dist(), Access.WRITE, self.console)


def pending(run: Run, e2e: bool) -> dict:
    """What is left to do in an opened run: stages not trained, caches not complete, the end-to-end network."""
    state = run.state
    stages = [j for j in range(run.depth) if state.stage_state(j) is not StageState.TRAINED]
    caches = [j for j in sorted(state.cached_stages()) if j in stages or state.cache_state(j)[0] is not
              CacheState.COMPLETE]
    return {"stages": stages, "caches": caches,
            "e2e": e2e and state.unit_state(E2E) is not StageState.TRAINED}


def _passes(n: int) -> str:
    return f"{n} caching pass{'' if n == 1 else 'es'}"


def settings_line(settings) -> str:
    return ", ".join(f"{k}={_show(v)}" for k, v in settings) or "the base config"
