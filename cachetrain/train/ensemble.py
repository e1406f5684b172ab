"""Averaging the auxiliary heads of the last stages: a prediction the trained greedy network gives for free.

Every greedy stage j trains an auxiliary head that classifies from stage j's output; the assembled network
keeps only the last one. Averaging the class probabilities (softmax) of the heads of the last m stages is
an ensemble that costs no training, only m - 1 more heads in the forward pass (small next to the stages):
one pass of the images through the frozen stages gives every head's prediction.

`HeadEnsemble(greedy).record(M)` scores m = 1..M (m = 1 is the assembled network itself) on the
validation and test splits and appends a row per m to `<run>/heads.jsonl`:

    {"heads": m, "stages": [J-m, .., J-1], "val_acc": .., "test_acc": .., "fingerprint": "..", "seconds": ..}

`fingerprint` names the trained stages measured (stage J-1's output fingerprint, which chains every
stage's weights), so `missing(M)` is true again once a stage is retrained; `cachetrain report` reads the
last row per m. Choosing m by validation accuracy and reading its test accuracy keeps the choice honest.
"""

from __future__ import annotations

import json
import time

import torch

from cachetrain.device import autocast
from cachetrain.durable import append_line, read_lines
from cachetrain.errors import Fix, StageError
from cachetrain.train.greedy import Greedy

BATCH = 512


class HeadEnsemble:
    def __init__(self, greedy: Greedy):
        self.greedy, self.run = greedy, greedy.run
        self.path = self.run.layout.heads

    def fingerprint(self) -> str | None:
        return self.run.state.output_fingerprint(self.run.depth - 1, "heads")

    def missing(self, max_heads: int) -> bool:
        """Whether some m <= max_heads (and <= J) has no row for the stages trained now (False when a stage is
        not trained yet: there is nothing to measure)."""
        fp = self.fingerprint()
        if fp is None:
            return False
        have = {r.get("heads") for r in read_lines(self.path) if r.get("fingerprint") == fp}
        return any(m not in have for m in range(1, min(max_heads, self.run.depth) + 1))

    def record(self, max_heads: int) -> list[dict]:
        """Score m = 1..min(max_heads, J) averaged heads on val and test; append and return the rows."""
        run, depth = self.run, self.run.depth
        fp = self.fingerprint()
        if fp is None:
            raise StageError(f"head averaging needs every stage trained; stage {run.state.first_unfinished()} is "
                             f"not", Fix.of("train"))
        m_max = min(max_heads, depth)
        t0 = time.perf_counter()
        inputs = self.greedy.inputs
        stages = [inputs.trained_stage(j) for j in range(depth)]
        heads = {j: inputs.trained_head(j) for j in range(depth - m_max, depth)}
        scores = {}
        for split in ("val", "test"):
            if run.data.num_samples(split) == 0:
                scores[split] = None
                continue
            probs, labels = _head_probs(stages, heads, run.data.eval_batches(split, BATCH), run.device,
                                        run.cfg.train.amp)
            scores[split] = {m: float((sum(probs[j] for j in range(depth - m, depth)).argmax(1) == labels)
                                      .float().mean()) for m in range(1, m_max + 1)}
        seconds = time.perf_counter() - t0
        rows = []
        for m in range(1, m_max + 1):
            row = {"heads": m, "stages": list(range(depth - m, depth)),
                   "val_acc": None if scores["val"] is None else scores["val"][m], "test_acc": scores["test"][m],
                   "fingerprint": fp, "seconds": round(seconds, 3), "time": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
            append_line(self.path, json.dumps(row))
            rows.append(row)
        run.console.print("averaged heads (test acc): " + "  ".join(
            f"last {r['heads']}: {100 * r['test_acc']:.2f}%" for r in rows), highlight=False)
        return rows


@torch.no_grad()
def _head_probs(stages, heads: dict, batches, device, amp: bool) -> tuple[dict, torch.Tensor]:
    """{stage j: (N, classes) softmax of head j} for the heads given, and the labels, in sample order."""
    probs: dict[int, list] = {j: [] for j in heads}
    labels = []
    for x, y in batches:
        with autocast(device, amp):
            for j, stage in enumerate(stages):
                x = stage(x)
                if j in heads:
                    probs[j].append(torch.softmax(heads[j](x).float(), 1).cpu())
        labels.append(y.cpu())
    return {j: torch.cat(p) for j, p in probs.items()}, torch.cat(labels)
