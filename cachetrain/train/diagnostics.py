"""Linear probes and CKA of a run's representations, recorded as the run trains (issue: the layerwise study).

What each stage has learned is measured on its frozen output, not only through its auxiliary head:

- A **linear probe** (cachetrain.study.probe): each stage's output, global-average-pooled ("gap") and
  pooled to 2x2 ("2x2"), a logistic regression fitted on the training split and scored on the
  validation and test splits. Greedy stages are read from their cache (a stage that has none, such as
  the last, is computed by the frozen stage over its input), so a probe costs a read and a small fit,
  not a pass through the network. The end-to-end network is probed at the same stage boundaries from
  one forward pass over the images.
- **Linear CKA** (cachetrain.study.cka) between the greedy and the end-to-end output of each stage on the
  first CKA_SAMPLES test images: how alike the two training regimes' representations are, depth by depth.

Rows go to `<run>/probes.jsonl` and `<run>/cka.jsonl` (appended and fsynced; the last row for a key
wins). Each row names the weights it measured (`weights_hash`), so `cachetrain probe` computes only
what is missing for the weights a run has now, and `cachetrain report` reads them without recomputing.

The probe fits on at most PROBE_TRAIN_SAMPLES training samples, spread over the split (every s-th
sample: image folders are sorted by class, so a prefix would be a few classes).
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Iterator

import torch
from torch import nn

from cachetrain.cache import CacheState, weights_hash
from cachetrain.device import autocast
from cachetrain.durable import append_line, read_lines
from cachetrain.models import stage_seed
from cachetrain.study.cka import cka_features, linear_cka
from cachetrain.study.probe import PROBE_POOLS, fit_probe, pool_features
from cachetrain.models.factory import e2e_network
from cachetrain.run import E2E, StageState
from cachetrain.train.greedy import Greedy

PROBE_TRAIN_SAMPLES = 10_000
CKA_SAMPLES = 2_000
BATCH = 512
SPLITS = ("train", "val", "test")


class Diagnostics:
    """Probes and CKA of one run (a Greedy over its run directory)."""

    def __init__(self, greedy: Greedy):
        self.greedy = greedy
        self.run, self.state, self.inputs = greedy.run, greedy.run.state, greedy.inputs
        self.probes_path = greedy.run.layout.probes
        self.cka_path = greedy.run.layout.cka

    def _trained(self, j: int) -> bool:
        return self.state.stage_state(j) is StageState.TRAINED

    # -- greedy stages -----------------------------------------------------------------------------
    def stage_outputs(self, j: int, split: str) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Stage j's frozen outputs over a split, in sample order: its cache when complete, else computed."""
        run, state, inputs = self.run, self.state, self.inputs
        if j in state.cached_stages() and state.cache_state(j)[0] is CacheState.COMPLETE:
            yield from inputs.cache_source(j, stage_seed(run.cfg.train.seed, j + 1)).eval_batches(split, BATCH)
            return
        stage = inputs.trained_stage(j)
        with torch.no_grad():
            for x, y in inputs.input_source(j).eval_batches(split, BATCH):
                with autocast(run.device, run.cfg.train.amp):
                    yield stage(x).float(), y

    def missing_stages(self) -> list[int]:
        """Trained stages whose current weights have no probe rows yet."""
        done = {(r["stage"], r.get("weights_hash")) for r in read_lines(self.probes_path) if r.get("net") == "greedy"}
        return [j for j in range(self.run.depth) if self._trained(j)
                and (j, self.state.checkpoint(j).weights_hash) not in done]

    def probe_stage(self, j: int) -> list[dict]:
        """Fit and record stage j's probes; returns the rows."""
        t0 = time.perf_counter()
        feats = {split: _pooled(self.stage_outputs(j, split), self._stride(split)) for split in SPLITS}
        read_seconds = time.perf_counter() - t0
        rows = self._fit(feats, {"net": "greedy", "stage": j, "weights_hash": self.state.checkpoint(j).weights_hash},
                         read_seconds)
        for row in rows:
            val = "" if row["val_acc"] is None else f"val {100 * row['val_acc']:.2f}%  "
            self.run.console.print(f"probe stage {j} ({row['pool']}, {row['dims']} features): train "
                            f"{100 * row['train_acc']:.2f}%  {val}test {100 * row['test_acc']:.2f}%  "
                            f"({row['seconds']:.1f} s)", highlight=False)
        self.run.events.probes(rows)  # by_stage view of the run's curves (cachetrain.run.events)
        return rows

    # -- the end-to-end network ----------------------------------------------------------------------
    def e2e_model(self) -> nn.Sequential | None:
        run = self.run
        if run.state.unit_state(E2E) is not StageState.TRAINED:
            return None
        model = e2e_network(run.cfg, run.data.sample_shape, run.data.num_classes)
        run.state.checkpoint(E2E).load_state(model)
        return model.to(run.device).eval()

    def probe_e2e(self, model: nn.Sequential) -> list[dict]:
        """Probes of the end-to-end network's output at every stage boundary, from one forward pass."""
        run = self.run
        depth = run.depth
        stages = list(model)[:depth]
        t0 = time.perf_counter()
        per_stage: dict[int, dict[str, dict]] = {j: {} for j in range(depth)}
        for split in SPLITS:
            outs = _pooled_all(_forward_all(stages, run.data.eval_batches(split, BATCH), run.device, run.cfg.train.amp),
                               depth, self._stride(split))
            for j in range(depth):
                per_stage[j][split] = outs[j]
        read_seconds = (time.perf_counter() - t0) / depth
        wh = weights_hash(model)
        rows = []
        for j in range(depth):
            rows += self._fit(per_stage[j], {"net": "e2e", "stage": j, "weights_hash": wh}, read_seconds)
        run.console.print("e2e probes (gap, test): " + "  ".join(
            f"{r['stage']}: {100 * r['test_acc']:.1f}%" for r in rows if r["pool"] == "gap"), highlight=False)
        run.events.probes(rows)
        return rows

    def e2e_missing(self, model: nn.Sequential) -> bool:
        wh = weights_hash(model)
        return not any(r.get("net") == "e2e" and r.get("weights_hash") == wh for r in read_lines(self.probes_path))

    def cka(self, model: nn.Sequential) -> list[dict]:
        """Linear CKA between greedy stage j's and the end-to-end network's stage-j output, for every
        trained greedy stage, on the first CKA_SAMPLES test images."""
        run = self.run
        depth = self.state.trained_depth()
        if depth == 0:
            return []
        t0 = time.perf_counter()
        e2e = _first(_forward_all(list(model)[:depth], run.data.eval_batches("test", BATCH), run.device,
                                  run.cfg.train.amp), depth, CKA_SAMPLES)
        greedy = _first(_forward_all([self.inputs.trained_stage(j) for j in range(depth)],
                                     run.data.eval_batches("test", BATCH), run.device, run.cfg.train.amp),
                        depth, CKA_SAMPLES)
        seconds = (time.perf_counter() - t0) / depth
        wh = weights_hash(model)
        rows = []
        for j in range(depth):
            t1 = time.perf_counter()
            value = linear_cka(greedy[j], e2e[j])
            row = {"stage": j, "cka": value, "samples": len(greedy[j]), "features": "avg-pooled to <= 4x4",
                   "seconds": seconds + time.perf_counter() - t1, "weights_hash": self.state.checkpoint(j).weights_hash,
                   "e2e_weights_hash": wh}
            append_line(self.cka_path, json.dumps(row))
            rows.append(row)
        run.console.print("CKA greedy vs e2e by stage: " + "  ".join(f"{r['stage']}: {r['cka']:.3f}" for r in rows),
                        highlight=False)
        return rows

    def cka_missing(self, model: nn.Sequential) -> bool:
        wh = weights_hash(model)
        have = {(r["stage"], r.get("weights_hash")) for r in read_lines(self.cka_path) if r.get("e2e_weights_hash") == wh}
        trained = [j for j in range(self.run.depth) if self._trained(j)]
        return any((j, self.state.checkpoint(j).weights_hash) not in have for j in trained)

    # -- what the commands and sweeps call ------------------------------------------------------------------
    def after_stage(self, j: int) -> None:
        """Stage j's probes, unless they exist for its weights (Greedy.train_all's after_stage)."""
        if j in self.missing_stages():
            self.probe_stage(j)

    def catch_up_e2e(self) -> bool:
        """The end-to-end network's probes and greedy-vs-e2e CKA where they are missing for its weights;
        False when there is no trained end-to-end network."""
        model = self.e2e_model()
        if model is None:
            return False
        if self.e2e_missing(model):
            self.probe_e2e(model)
        if self.cka_missing(model):
            self.cka(model)
        return True

    # -- shared --------------------------------------------------------------------------------------
    def _stride(self, split: str) -> int:
        n = self.run.data.num_samples(split)
        return max(1, math.ceil(n / PROBE_TRAIN_SAMPLES)) if split == "train" else 1

    def _fit(self, feats: dict[str, dict], key: dict, read_seconds: float) -> list[dict]:
        rows = []
        for pool in PROBE_POOLS:
            if pool not in feats["train"]:
                continue  # an output smaller than 2x2
            evals = {s: feats[s][pool] for s in ("val", "test") if pool in feats[s] and len(feats[s][pool][1])}
            result = fit_probe(feats["train"][pool], evals, self.run.data.num_classes, seed=self.run.cfg.train.seed)
            row = {**key, "pool": pool, "dims": int(feats["train"][pool][0].shape[1]),
                   "train_acc": result["train_acc"], "val_acc": result.get("val_acc"),
                   "test_acc": result["test_acc"], "train_samples": len(feats["train"][pool][1]),
                   "seconds": round(read_seconds + result["seconds"], 3),
                   "time": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
            append_line(self.probes_path, json.dumps(row))
            rows.append(row)
        return rows


def _pooled(batches, stride: int) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """{pool: (features, labels)} of every `stride`-th sample of a stream of (outputs, labels) batches."""
    return _pooled_all((([x], y) for x, y in batches), 1, stride)[0]


def _pooled_all(batches, depth: int = 1, stride: int = 1) -> list[dict[str, tuple[torch.Tensor, torch.Tensor]]]:
    """Like _pooled, for batches of per-stage outputs ([x_0, .., x_{depth-1}], y)."""
    feats: list[dict[str, list]] = [{} for _ in range(depth)]
    labels: list[torch.Tensor] = []
    seen = 0
    for xs, y in batches:
        keep = torch.arange((-seen) % stride, len(y), stride)
        seen += len(y)
        labels.append(y[keep].cpu())
        for j, x in enumerate(xs):
            x = x[keep.to(x.device)].float()
            for pool in PROBE_POOLS:
                if pool == "2x2" and min(x.shape[-2:]) < 2:
                    continue
                feats[j].setdefault(pool, []).append(pool_features(x, pool).cpu())
    y_all = torch.cat(labels) if labels else torch.zeros(0, dtype=torch.long)
    return [{pool: (torch.cat(parts), y_all) for pool, parts in f.items()} for f in feats]


def _forward_all(stages: list[nn.Module], batches, device, amp: bool):
    """([output of stage 0, .., stage D-1], labels) per batch of images."""
    with torch.no_grad():
        for x, y in batches:
            outs = []
            with autocast(device, amp):
                for stage in stages:
                    x = stage(x)
                    outs.append(x.float())
            yield outs, y


def _first(batches, depth: int, n: int) -> list[torch.Tensor]:
    """cka_features of each stage's output for the first n samples."""
    parts: list[list[torch.Tensor]] = [[] for _ in range(depth)]
    seen = 0
    for xs, y in batches:
        take = min(len(y), n - seen)
        for j, x in enumerate(xs):
            parts[j].append(cka_features(x[:take]).cpu())
        seen += take
        if seen >= n:
            break
    return [torch.cat(p) for p in parts]
