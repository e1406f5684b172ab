"""Training memory of each greedy stage vs the end-to-end network, ImageNet-shaped, counted on a CPU.

The question: how much less memory does one training step of the largest greedy stage hold than one
of the whole network, at full ImageNet size, without a GPU? It prints one line per stage and the
table the README quotes, and saves OUT/results.json and OUT/results.md.

Belilovsky et al.'s ImageNet k=3 layout (224 px input space-to-depth'd to 12x112x112, J=8, width 128,
downsampling at j=2,4,6) on synthetic data with 1000 classes. For every stage (block + auxiliary head
on its input) and for the whole network end to end, one training step is run at `--batch` and its
memory is counted by `cachetrain.plan.profile.step_memory` (the trainer's own step): tensors saved for
backward + parameters + gradients + SGD momentum. Saved tensors grow with the batch and the rest does
not, so the figures are also given scaled to batch 256. Two auxiliary heads: the naive k=3 head (two
full-resolution convs) and the space-reducing `sr` head.

    python benchmarks/memory_bench.py [--batch 2] [--out bench/memory]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import torch

from cachetrain.bench.tools import DataShape, imagenet_config
from cachetrain.config import Config
from cachetrain.train.e2e import e2e_network
from cachetrain.models import build_network, make_head
from cachetrain.plan.profile import step_memory
from cachetrain.train.trainer import StageModel, make_optimizer

MIB = 2**20


def scaled(mem: dict, batch: int, to: int) -> int:
    """Bytes at batch `to`: saved tensors scale with the batch, parameters and optimizer state do not."""
    return int(mem["saved_bytes"] * to / batch) + mem["param_bytes"] + mem["grad_bytes"] + mem["optimizer_bytes"]


def measure(cfg: Config, batch: int, device: torch.device) -> dict:
    shape = tuple(cfg.data.shape)
    net = build_network(cfg.model, shape, seed=0)
    y = torch.randint(0, cfg.data.num_classes, (batch,), device=device)
    rows = []
    for j in range(net.depth):
        model = StageModel(net.stages[j], make_head(cfg.model, net, j, cfg.model.k, cfg.data.num_classes, 0)).to(device)
        x = torch.randn(batch, *net.in_shapes[j], device=device)
        mem = step_memory(model, x, y, make_optimizer(model.parameters(), cfg.train)).to_dict()
        rows.append({"stage": j, "in_shape": list(net.in_shapes[j]), **mem, "at_256": scaled(mem, batch, 256)})
        print(f"  stage {j}: {mem['total_bytes'] / MIB:8.1f} MiB at batch {batch}, "
              f"{rows[-1]['at_256'] / 2**30:6.2f} GiB at 256", flush=True)
    e2e = e2e_network(cfg, DataShape(shape, cfg.data.num_classes)).to(device)
    x = torch.randn(batch, *shape, device=device)
    mem = step_memory(e2e, x, y, make_optimizer(e2e.parameters(), cfg.train)).to_dict()
    e2e_row = {**mem, "at_256": scaled(mem, batch, 256)}
    print(f"  end to end: {mem['total_bytes'] / MIB:8.1f} MiB at batch {batch}, {e2e_row['at_256'] / 2**30:6.2f} GiB "
          f"at 256", flush=True)
    largest = max(rows, key=lambda r: r["at_256"])
    return {"stages": rows, "e2e": e2e_row, "largest_stage": largest["stage"],
            "largest_over_e2e_at_batch": max(r["total_bytes"] for r in rows) / e2e_row["total_bytes"],
            "largest_over_e2e_at_256": largest["at_256"] / e2e_row["at_256"],
            "saved_per_sample_largest_MB": largest["saved_bytes"] / batch / 1e6,
            "saved_per_sample_e2e_MB": e2e_row["saved_bytes"] / batch / 1e6}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--out", default="bench/memory")
    args = p.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    device = torch.device("cpu")
    result = {"machine": f"{platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}",
              "command": " ".join([Path(sys.executable).name, *sys.argv]), "date": time.strftime("%Y-%m-%d"),
              "batch": args.batch, "heads": {}}
    for aux in ("sr", "conv"):
        print(f"auxiliary head: {aux}, k=3", flush=True)
        result["heads"][aux] = measure(imagenet_config(aux), args.batch, device)
    (out / "results.json").write_text(json.dumps(result, indent=2))
    lines = [f"{result['machine']}; {result['date']}; `{result['command']}`", "",
             "| | stage memory, largest (GiB at batch 256) | end to end (GiB at 256) | ratio | saved MB/sample "
             "largest stage / e2e |", "|---|---:|---:|---:|---:|"]
    for aux, r in result["heads"].items():
        big = max(s["at_256"] for s in r["stages"])
        lines.append(f"| k=3, `{aux}` head | {big / 2**30:.2f} (stage {r['largest_stage']}) | "
                     f"{r['e2e']['at_256'] / 2**30:.2f} | {r['largest_over_e2e_at_256']:.3f} | "
                     f"{r['saved_per_sample_largest_MB']:.1f} / {r['saved_per_sample_e2e_MB']:.1f} |")
    (out / "results.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
