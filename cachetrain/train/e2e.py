"""The end-to-end baseline: the same stages plus the last stage's auxiliary head, trained jointly with
backprop on the same data, augmentation, optimizer and schedule family as a greedy stage.

Run directory: `<run>/e2e/{checkpoint.pt, metrics.jsonl}`, with the same atomic checkpoints (the same
schema, cachetrain.train.checkpoint: model, optimizer, scheduler, position, RNG, config), mid-epoch resume and
metrics rows as a greedy stage, so the benchmark can put the two side by side. Resuming on the CPU gives
bit-identical weights to an uninterrupted run, as for a stage.
"""

from __future__ import annotations

import torch
from rich.console import Console
from torch import nn

from cachetrain.train import checkpoint as ckpt
from cachetrain.config import Config
from cachetrain.data import open_dataset
from cachetrain.device import resolve_device
from cachetrain.dist import Dist
from cachetrain.models import build_network, make_head, stage_seed
from cachetrain.train.identity import config_hash
from cachetrain.train.rundir import RunDir
from cachetrain.train.trainer import Position, Selection, fit, make_optimizer, make_scheduler

E2E = "e2e"  # the run directory's unit for the baseline: <run>/e2e/


def e2e_network(cfg: Config, data) -> nn.Sequential:
    net = build_network(cfg.model, data.sample_shape, cfg.train.seed,
                        checkpoint_activations=cfg.train.checkpoint_activations)
    head = make_head(cfg.model, net, net.depth - 1, cfg.model.k, data.num_classes, cfg.train.seed,
                     checkpoint_activations=cfg.train.checkpoint_activations)
    return nn.Sequential(*net.stages, head)


def train_e2e(cfg: Config, console: Console, data=None, dist: Dist = Dist()) -> float:
    """Train (or resume) the baseline; under torchrun every rank runs this together, DDP over the whole
    network, and rank 0 writes its checkpoints and metrics. `data` must be sharded for `dist` (open_dataset's
    `shard`)."""
    t = cfg.train
    device = dist.device(resolve_device(t.device))
    data = data or open_dataset(cfg.data, stage_seed(t.seed, 0), device, cfg.loader.workers, cfg.loader.backend,
                                dist.shard)
    run = RunDir(cfg.run_path, writer=dist.writer, cache_location=cfg.cache.location)
    model = e2e_network(cfg, data).to(device)
    if t.channels_last and device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    steps = data.steps_per_epoch(t.batch_size)
    ck = run.load_checkpoint(E2E, warn=lambda m: console.print(f"warning: {m}", markup=False))
    # the baseline is the same network trained jointly: any change of a result key (--from-stage) retrains it
    resume = (ck is not None and ckpt.input_fingerprint(ck) == data.fingerprint
              and config_hash(ck.get("config") or {}) == config_hash(cfg))
    epochs = ck["epochs"] if resume else (t.e2e_epochs or t.epochs)
    optimizer = make_optimizer(model.parameters(), t)
    scheduler = make_scheduler(optimizer, t, steps, epochs)
    start = Position()
    selection = Selection.from_checkpoint(ck.get("selection") if resume else None, t.patience)
    if resume and ck["epoch"] < ck["epochs"]:
        ckpt.check_world(ck, dist.world, "the end-to-end baseline")
        start = ckpt.restore(ck, {"model": model}, optimizer, scheduler)  # shapes checked; weights, rng, ...
        run.truncate_metrics(E2E, start.epoch)
        console.print(f"e2e: resuming at epoch {start.epoch + 1}, batch {start.batch}/{steps}")
    elif resume:
        console.print(f"e2e: already trained ({ck['epoch']} epochs, test acc {ck['test_acc']:.4f})")
        return ck["test_acc"]
    elif dist.writer:
        run.metrics_path(E2E).unlink(missing_ok=True)

    def save(at: Position, test_acc: float | None) -> None:
        run.save_checkpoint(E2E, ckpt.build(unit=E2E, k=cfg.model.k, model=model, optimizer=optimizer,
                                            scheduler=scheduler, at=at, epochs=epochs, steps_per_epoch=steps,
                                            input_fingerprint=data.fingerprint, test_acc=test_acc,
                                            config=cfg.to_dict(),
                                            selection=selection.to_checkpoint() if t.patience else None,
                                            world=dist.world))

    return fit(model, data, t, device, optimizer, scheduler, epochs, start, save,
               log=lambda row: run.append_metrics(E2E, row), console=console, title="e2e", selection=selection,
               dist=dist)
