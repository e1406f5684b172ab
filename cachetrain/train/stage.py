"""Training one greedy stage: stage j's block plus its auxiliary head (depth k) on stage j's input.

This is where a stage's model, optimizer and scheduler are built, a partial run of it is resumed from
its checkpoint, and checkpoints are saved as it goes (the schema: cachetrain.train.checkpoint; the loop
itself: cachetrain.train.trainer.fit). What the stage reads comes from cachetrain.train.inputs; what a
checkpoint must record to keep the stage's lineage (its input's fingerprint and the content digests of
the stores it read) from cachetrain.train.state.

Resuming on the CPU gives bit-identical weights to an uninterrupted run: the model, optimizer, scheduler
and running epoch sums come from the checkpoint, and the sample order and augmentation draws are pure
functions of (seed, epoch, batch).
"""

from __future__ import annotations

import torch
from rich.console import Console

from cachetrain.cache import weights_hash
from cachetrain.dist import Dist
from cachetrain.faults import fault_point
from cachetrain.models import make_head
from cachetrain.train import checkpoint
from cachetrain.train.inputs import StageInputs
from cachetrain.train.state import RunState
from cachetrain.train.trainer import Position, Selection, StageModel, fit, make_optimizer, make_scheduler


def train_stage(state: RunState, inputs: StageInputs, console: Console, j: int, k: int | None = None,
                restart: bool = False, dist: Dist = Dist()) -> float:
    """Train stage j, resuming a partial run of it (mid-epoch included) unless `restart` or another k
    is asked; returns its test accuracy. Under torchrun (`dist`) every rank runs this together; rank 0
    writes the checkpoints and metrics."""
    cfg, run, device = state.cfg, state.run, inputs.device
    t = cfg.stage_train(j)  # train.*, the slowdown rule, then stages.<j>.* overrides
    source = inputs.input_source(j)
    ck = state.checkpoint(j)
    resume = (ck is not None and not restart and state.stage_state(j) == "partial"
              and (k is None or k == ck["k"]))
    k = ck["k"] if resume else (cfg.model.k if k is None else k)
    net = inputs.fresh_network()  # stage j starts from its seeded initial weights, not ones loaded earlier
    stage = net.stages[j]
    head = make_head(cfg.model, net, j, k, inputs.data.num_classes, t.seed,
                     checkpoint_activations=t.checkpoint_activations)
    model = StageModel(stage, head).to(device)
    if t.channels_last and device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    steps = source.steps_per_epoch(t.batch_size)
    epochs = ck["epochs"] if resume else t.epochs  # a resumed stage keeps the schedule it started with
    optimizer = make_optimizer(model.parameters(), t)
    scheduler = make_scheduler(optimizer, t, steps, epochs)
    start = Position()
    # early stopping selects over the whole StageModel (block and head together)
    selection = Selection.from_checkpoint(ck.get("selection") if resume else None, t.patience)
    if resume:
        checkpoint.check_world(ck, dist.world, f"stage {j}")
        # shapes checked, then weights, optimizer, scheduler, rng
        start = checkpoint.restore(ck, {"model": stage, "head": head}, optimizer, scheduler)
        run.truncate_metrics(j, start.epoch)
        console.print(f"stage {j}: resuming at epoch {start.epoch + 1}, batch {start.batch}/{steps}")
    # a fresh start leaves the previous training's metrics in place until it writes its own first checkpoint or
    # row: a start that fails on its first batch (a corrupt input, say) then loses nothing
    old_rows = not resume

    def drop_old_rows() -> None:
        nonlocal old_rows
        if old_rows:
            run.truncate_metrics(j, 0)
            old_rows = False

    def log(row: dict) -> None:
        drop_old_rows()
        run.append_metrics(j, {"stage": j, "k": k, **row})

    input_fp = state.input_fingerprint(j)
    input_digests = state.input_digests(j)  # the bytes it trains on: a later rebuild that changes them makes it stale

    def save(at: Position, test_acc: float | None) -> None:
        drop_old_rows()
        run.save_checkpoint(j, checkpoint.build(
            unit=j, k=k, model=stage, head=head, optimizer=optimizer, scheduler=scheduler, at=at, epochs=epochs,
            steps_per_epoch=steps, input_fingerprint=input_fp, test_acc=test_acc, config=cfg.to_dict(),
            input_digests=input_digests, weights_hash=weights_hash(stage) if at.epoch == epochs else None,
            selection=selection.to_checkpoint() if t.patience else None, world=dist.world))
        state.forget_checkpoints()  # stage j changed: every fingerprint derived from it may have too

    test_acc = fit(model, source, t, device, optimizer, scheduler, epochs, start, save,
                   log=log, console=console, title=f"stage {j} (k={k})", selection=selection, dist=dist)
    fault_point("stage_end")
    return test_acc

