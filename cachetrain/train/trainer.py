"""Training one stage: plain train_one_epoch / evaluate_split functions over batches from any source.

The model trained at stage j is its block followed by its auxiliary head; everything before it is
either a cache (its batches come from the loader) or, for j = 0, the images. Time spent waiting
for the next batch is measured separately from the step itself, since the loader's speed is the
product's claim.

`train_one_epoch` runs the one training step (cachetrain.step.train_step), which the memory and FLOP
counts (cachetrain.plan) and every benchmark that times a step run too.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, replace

import numpy as np
import torch
from torch import nn

from cachetrain.config import TrainConfig
from cachetrain.device import autocast
from cachetrain.dist import Dist, step_lengths
from cachetrain.faults import fault_point
from cachetrain.step import train_step
from cachetrain.stop import StopRequests


@dataclass
class EpochStats:
    """Running sums over the batches of one epoch; saved in mid-epoch checkpoints so a resumed epoch
    reports the same loss and accuracy as an uninterrupted one."""

    batches: int = 0
    loss_sum: float = 0.0
    correct: int = 0
    samples: int = 0
    step_seconds: float = 0.0
    data_seconds: float = 0.0
    # after the first WARMUP batches of the epoch (allocator, thread pools, page cache warm): steady state
    steady_samples: int = 0
    steady_seconds: float = 0.0

    @property
    def loss(self) -> float:
        return self.loss_sum / max(1, self.samples)

    @property
    def accuracy(self) -> float:
        return self.correct / max(1, self.samples)

    @property
    def samples_per_s(self) -> float:
        return self.samples / max(1e-9, self.step_seconds + self.data_seconds)

    @property
    def steady_samples_per_s(self) -> float:
        return self.steady_samples / self.steady_seconds if self.steady_seconds else self.samples_per_s


WARMUP = 5
STEP_ROWS = 100  # step rows per epoch, at most: a curve point every ~1% of an epoch


def step_period(steps: int, sync_every: int = 1) -> int:
    """Every how many steps `fit` reports a step row: ~1% of an epoch (STEP_ROWS points, enough to see an
    epoch's shape, few enough to cost nothing), a multiple of `sync_every` (on CUDA the running sums reach
    the host only then), at least 1."""
    every = max(1, math.ceil(steps / STEP_ROWS))
    return math.ceil(every / sync_every) * sync_every


def timed(batches: Iterable, stats: EpochStats) -> Iterator:
    """Yield from `batches`, adding the time spent waiting for each to stats.data_seconds."""
    it = iter(batches)
    while True:
        t0 = time.perf_counter()
        try:
            item = next(it)
        except StopIteration:
            return
        stats.data_seconds += time.perf_counter() - t0
        yield item


def loss_scale_of(local: int, step: int, dist: Dist, global_lengths: Sequence[int] | None) -> float:
    """This rank's loss weight in step `step`: DDP averages the ranks' gradients, so each rank's mean loss
    weighs alike however many samples it had (shares of whole chunks differ by up to a chunk). Times
    world * local / global, the average is the gradient of the mean loss over the whole global batch,
    as one process would take it. The global length comes from `global_lengths` (every rank computes it
    alike from the plan), else from a sum over the ranks (one more collective per step)."""
    if dist.world == 1:
        return 1.0
    total = global_lengths[step] if global_lengths is not None else dist.sum([local])[0]
    return float(dist.world * local / total)


def train_one_epoch(model: nn.Module, batches: Iterable, optimizer: torch.optim.Optimizer, scheduler,
                    device: torch.device, amp: bool = False, channels_last: bool = False,
                    stats: EpochStats | None = None,
                    on_step: Callable[[EpochStats], None] = lambda s: None, sync_every: int = 1,
                    dist: Dist = Dist(), global_lengths: Sequence[int] | None = None) -> EpochStats:
    """One pass over `batches`. Loss and accuracy sums stay on the device and reach `stats` every
    `sync_every` steps (a host sync each time: on CUDA, not every step). Under torchrun (`dist`, `model`
    DDP-wrapped), each step's loss is weighted by this rank's share of the global batch (`loss_scale_of`;
    `global_lengths[i]`: the global length of the i-th batch of `batches`)."""
    stats = stats or EpochStats()
    model.train()
    data_before = stats.data_seconds
    loss_acc = torch.zeros((), device=device)
    correct_acc = torch.zeros((), dtype=torch.long, device=device)

    def flush() -> None:
        nonlocal loss_acc, correct_acc
        stats.loss_sum += float(loss_acc)
        stats.correct += int(correct_acc)
        loss_acc, correct_acc = torch.zeros_like(loss_acc), torch.zeros_like(correct_acc)

    for i, (x, y) in enumerate(timed(batches, stats)):
        t0 = time.perf_counter()
        waited = stats.data_seconds - data_before
        scale = loss_scale_of(len(y), i, dist, global_lengths)
        loss, logits = train_step(model, x, y, optimizer, scheduler, device, amp, channels_last, scale)
        loss_acc += loss.detach() * len(y)
        correct_acc += (logits.argmax(1) == y).sum()
        stats.samples += len(y)
        stats.batches += 1
        if stats.batches % sync_every == 0:
            flush()
        elapsed = time.perf_counter() - t0
        stats.step_seconds += elapsed
        if stats.batches > WARMUP:
            stats.steady_samples += len(y)
            stats.steady_seconds += elapsed + waited
        data_before = stats.data_seconds
        fault_point("train_step")
        on_step(stats)
    flush()
    return stats


def all_ranks(stats: EpochStats, dist: Dist) -> EpochStats:
    """`stats` with the loss, accuracy and sample sums of every rank (batches and seconds stay this rank's:
    the position in the epoch, and the wall time all ranks share)."""
    if dist.world == 1:
        return stats
    loss_sum, correct, samples, steady = dist.sum([stats.loss_sum, stats.correct, stats.samples, stats.steady_samples])
    return replace(stats, loss_sum=loss_sum, correct=int(correct), samples=int(samples), steady_samples=int(steady))


@dataclass
class Position:
    """Where a fit stands: `epoch` finished epochs, then `batch` batches of the next one, with that
    epoch's running sums in `stats` (None at an epoch boundary)."""

    epoch: int = 0
    batch: int = 0
    stats: EpochStats | None = None


@dataclass
class Selection:
    """Early stopping on validation loss (train.patience): the best epoch so far, its test accuracy and a
    copy of its weights. Kept in the checkpoint (`selection`), so a resumed fit stops where an
    uninterrupted one would and keeps the same weights."""

    patience: int
    best_epoch: int = 0
    best_val_loss: float = math.inf
    best_test_acc: float | None = None
    best_state: dict | None = None

    def observe(self, epoch: int, val_loss: float, test_acc: float, model: nn.Module) -> bool:
        """Record finished epoch `epoch` (1-based); True when training should stop."""
        if val_loss < self.best_val_loss:
            self.best_epoch, self.best_val_loss, self.best_test_acc = epoch, val_loss, test_acc
            # on the host: a second copy of the weights should not take device memory from training
            self.best_state = {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}
        return epoch - self.best_epoch >= self.patience

    def to_checkpoint(self) -> dict:
        return {"patience": self.patience, "best_epoch": self.best_epoch, "best_val_loss": self.best_val_loss,
                "best_test_acc": self.best_test_acc, "best_state": self.best_state}

    @classmethod
    def from_checkpoint(cls, saved: dict | None, patience: int) -> Selection:
        if not saved:
            return cls(patience)
        return cls(patience, saved["best_epoch"], saved["best_val_loss"], saved["best_test_acc"], saved["best_state"])


def keep_best(model: nn.Module, selection: Selection, dist: Dist) -> None:
    """`model` back to the selected epoch's weights, rank 0's on every rank. Each rank selected from its own
    evaluation, which on GPUs need not match rank 0's to the last bit; a rank keeping another epoch (or
    other buffers) would hold other weights than the checkpoint rank 0 writes, and fail the weight-hash
    check that ends `fit`. So rank 0's parameters and buffers, and its selection, are broadcast."""
    model.load_state_dict(selection.best_state)
    dist.broadcast_state(model)
    selection.best_epoch, selection.best_val_loss, selection.best_test_acc = dist.broadcast(
        (selection.best_epoch, selection.best_val_loss, selection.best_test_acc))


def evaluate_split(model: nn.Module, batches: Iterable, device: torch.device, amp: bool = False,
                   limit: int | None = None) -> tuple[float, float] | tuple[None, None]:
    """(accuracy, mean cross-entropy) over `batches` (the first `limit` samples); (None, None) when empty."""
    model.eval()
    correct, loss_sum, n = 0, 0.0, 0
    with torch.no_grad():
        for x, y in batches:
            if limit is not None and n >= limit:
                break
            if limit is not None and n + len(y) > limit:
                x, y = x[:limit - n], y[:limit - n]
            with autocast(device, amp):
                logits = model(x).float()
            loss_sum += float(nn.functional.cross_entropy(logits, y, reduction="sum"))
            correct += int((logits.argmax(1) == y).sum())
            n += len(y)
    return (correct / n, loss_sum / n) if n else (None, None)


def spread_batches(source, split: str, batch_size: int, n: int) -> Iterator:
    """About n samples of a split in whole batches spread evenly over it, not its first n: image folders
    are sorted by class, so a prefix would be a few classes. Each batch is read from its own start."""
    total = source.num_samples(split)
    if n >= total:
        yield from source.eval_batches(split, batch_size)
        return
    count = -(-n // batch_size)
    for start in np.linspace(0, total - batch_size, count).astype(int).tolist():
        batches = source.eval_batches(split, batch_size, start)
        yield next(batches)
        batches.close()  # a loader's workers and read-ahead stop here


def epoch_diagnostics(model: nn.Module, source, batch_size: int, device: torch.device, amp: bool) -> dict:
    """What each finished epoch records besides its running training sums: accuracy and loss on the
    validation and test splits, and on a fixed plain (unaugmented, eval-mode) subset of the training split
    as large as the validation split (5,000 samples without one), so train - val is a like-for-like gap."""
    bs = 2 * batch_size
    n_val = source.num_samples("val")
    val_acc, val_loss = evaluate_split(model, source.eval_batches("val", bs), device, amp) if n_val else (None, None)
    test_acc, test_loss = evaluate_split(model, source.eval_batches("test", bs), device, amp)
    train_acc, train_loss = evaluate_split(model, spread_batches(source, "train", bs, n_val or 5000), device, amp)
    return {"val_acc": val_acc, "val_loss": val_loss, "test_acc": test_acc, "test_loss": test_loss,
            "train_eval_acc": train_acc, "train_eval_loss": train_loss,
            "gap": None if val_acc is None else train_acc - val_acc}


def fit(model: nn.Module, source, cfg: TrainConfig, device: torch.device, optimizer, scheduler, epochs: int,
        start: Position, save: Callable[[Position, float | None], None], log: Callable[[dict], None],
        console, title: str, selection: Selection | None = None, dist: Dist = Dist(),
        stop: StopRequests | None = None, log_step: Callable[[int, dict], None] | None = None) -> float:
    """Train for epochs start.epoch..epochs-1 (the first from start.batch), evaluating on the validation,
    test and training splits and calling `save` after every epoch and every cfg.checkpoint_steps steps;
    returns the test accuracy of the weights kept. With a `selection` whose patience is > 0, training stops
    once validation loss has not improved for that many epochs, and the best epoch's weights are kept:
    `save` is then called at Position(epochs) with them, and the last row logged names `selected_epoch`.

    Under torchrun (`dist`), every rank trains DDP over `model` on its share of each batch, and `save`
    and `log` get the sums over all ranks (rank 0 writes them: cachetrain.run); every rank then
    evaluates with rank 0's BN statistics, so all reach the same numbers and the same decisions.

    `stop`: after every step, a stop request (cachetrain.stop: SIGTERM, Ctrl-C) saves a checkpoint at that
    step and raises `Stopped`; every rank stops at the same step.

    `log_step(step, row)`: every `step_period` steps (and before that step's checkpoint), the epoch's
    running train_loss and train_acc over all ranks and the learning rate; `step` counts the unit's
    optimizer steps from its start (epoch * steps per epoch + batch), so it is the same after a resume."""
    from cachetrain.ui import StageProgress  # the UI stays out of the numeric core's imports

    steps = source.steps_per_epoch(cfg.batch_size)
    # CUDA: sync for the running loss every few steps only, but always on a mid-epoch checkpoint step
    sync_every = 1 if device.type != "cuda" else math.gcd(25, cfg.checkpoint_steps or 25)
    select = selection is not None and selection.patience > 0 and source.num_samples("val") > 0
    trained = dist.wrap(model)  # DDP under torchrun: gradients averaged over ranks in the backward
    every = step_period(steps, sync_every)
    test_acc = float("nan")
    for epoch in range(start.epoch, epochs):
        resumed = epoch == start.epoch
        stats = start.stats if resumed and start.stats else EpochStats()
        if resumed and start.stats and not dist.writer:  # the checkpoint's sums are every rank's: rank 0 holds them
            stats = EpochStats(batches=start.stats.batches)
        with StageProgress(console, f"{title} epoch {epoch + 1}/{epochs}", steps) as bar:

            def on_step(s: EpochStats) -> None:
                bar.update(s)
                if log_step is not None and s.batches % every == 0:  # every rank: all_ranks is a collective
                    totals = all_ranks(s, dist)
                    log_step(epoch * steps + s.batches, {"train_loss": totals.loss, "train_acc": totals.accuracy,
                                                         "lr": scheduler.get_last_lr()[0]})
                # one process reads a flag; ranks agree through a collective, so only on sync steps (every step
                # on the CPU; on CUDA a stop still lands within 25 steps, well inside a preemption's grace period)
                polled = dist.world == 1 or s.batches % sync_every == 0
                if s.batches < steps and stop is not None and polled and stop.requested(dist):
                    save(Position(epoch, s.batches, all_ranks(s, dist)), None)
                    raise stop.stopped(f"{title}: checkpoint at epoch {epoch + 1}, batch {s.batches}/{steps} "
                                       f"(step {epoch * steps + s.batches})")
                if cfg.checkpoint_steps and s.batches % cfg.checkpoint_steps == 0 and s.batches < steps:
                    save(Position(epoch, s.batches, all_ranks(s, dist)), None)

            t0 = time.perf_counter()
            first = start.batch if resumed else 0
            batches = source.train_batches(epoch, cfg.batch_size, first)
            lengths = step_lengths(source.share_sizes(epoch), steps)[first:] if dist.world > 1 else None
            train_one_epoch(trained, batches, optimizer, scheduler, device, cfg.amp, cfg.channels_last, stats, on_step,
                            sync_every, dist, lengths)
            train_seconds = time.perf_counter() - t0
            dist.sync_buffers(model)
            stats = all_ranks(stats, dist)
            t0 = time.perf_counter()
            diag = epoch_diagnostics(model, source, cfg.batch_size, device, cfg.amp)
            eval_seconds = time.perf_counter() - t0
        test_acc = diag["test_acc"]
        row = {"epoch": epoch + 1, "train_loss": stats.loss, "train_acc": stats.accuracy, **diag,
               "samples_per_s": stats.samples_per_s, "steady_samples_per_s": stats.steady_samples_per_s,
               "data_seconds": stats.data_seconds, "train_seconds": train_seconds, "eval_seconds": eval_seconds,
               "lr": scheduler.get_last_lr()[0]}
        early = select and dist.broadcast(selection.observe(epoch + 1, diag["val_loss"], test_acc, model))
        last = early or epoch + 1 == epochs
        if select and last:  # keep the best epoch's weights: those are the stage's (or the network's) result
            keep_best(model, selection, dist)
            test_acc = selection.best_test_acc
            row.update(selected_epoch=selection.best_epoch, stopped_early=bool(early and epoch + 1 < epochs))
        log(row)
        val = "" if diag["val_acc"] is None else f"val acc {diag['val_acc']:.4f}  "
        console.print(f"{title} epoch {epoch + 1}/{epochs}: loss {stats.loss:.4f}  train acc {stats.accuracy:.4f}  "
                      f"{val}test acc {diag['test_acc']:.4f}  {stats.samples_per_s:,.0f} samples/s "
                      f"(data wait {stats.data_seconds:.1f} s)")
        if select and last:
            if early and epoch + 1 < epochs:
                console.print(f"{title}: validation loss has not improved for {selection.patience} epochs: stopped "
                              f"after epoch {epoch + 1}")
            console.print(f"{title}: keeps epoch {selection.best_epoch}'s weights (lowest validation loss)")
            save(Position(epochs, 0, None), test_acc)
            break
        save(Position(epoch + 1, 0, None), test_acc)
        if epoch + 1 < epochs and stop is not None and stop.requested(dist):  # the last step of an epoch asked
            raise stop.stopped(f"{title}: checkpoint at the end of epoch {epoch + 1}/{epochs}")
    if dist.world > 1:  # DDP keeps the replicas equal; a rank that drifted would make rank 0's file a lie
        from cachetrain.cache import weights_hash
        hashes = dist.gather(weights_hash(model))
        if len(set(hashes)) > 1:
            raise RuntimeError(f"{title}: the ranks' weights differ after training (hashes {hashes}); the checkpoint "
                               f"rank 0 wrote is not what every rank trained")
    return test_acc


@torch.no_grad()
def predict(model: nn.Module, batches: Iterable, device: torch.device, amp: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """(predicted class, true label) for every sample, in the order of `batches`."""
    model.eval()
    preds, labels = [], []
    for x, y in batches:
        with autocast(device, amp):
            preds.append(model(x).argmax(1).cpu())
        labels.append(y.cpu())
    return torch.cat(preds).numpy(), torch.cat(labels).numpy()
