"""One lifecycle for every trainable unit: a greedy stage j, or the end-to-end network.

`train_unit(run, unit)` takes a unit through the same six steps, whichever it is:

    1. state    its state (cachetrain.run.state): TRAINED is kept (unless a restart, or another k, is
                asked), PARTIAL resumes, UNTRAINED and STALE start from scratch
    2. build    its modules at their seeded initial weights (`Unit.build`): stage j's block and a new
                auxiliary head of depth k, or the whole network and the last stage's head
    3. inputs   what it trains on (`Unit.source`): stage j's input (cachetrain.train.inputs), or the images
    4. resume   a PARTIAL unit's weights, optimizer, scheduler, RNG, running epoch sums and early-stopping
                choice come from its checkpoint (shapes checked first; a mid-epoch checkpoint only with
                the number of processes that wrote it), and its metrics rows after that checkpoint go;
                it keeps the schedule (epochs) it started with. On the CPU, a resumed unit ends with the
                same bits as an uninterrupted one: sample order and augmentation are pure functions of
                (seed, epoch, batch)
    5. train    cachetrain.train.trainer.fit: epochs, evaluation, early stopping
    6. save     a checkpoint (cachetrain.run.checkpoint) after every epoch and every
                train.checkpoint_steps steps, recording what the unit trained on (its input fingerprint,
                and a stage's input store digests) and, at the end, a stage's weights hash; a metrics row
                per finished epoch, and the same numbers (with step rows) as TensorBoard curves
                (cachetrain.run.events), flushed before each checkpoint

The rules are the same for both: a fresh start keeps the previous training's metrics until it writes
its own first row or checkpoint, so a start that fails on its first batch (a corrupt input, say) loses
nothing; under torchrun every rank runs all six steps and rank 0 writes. What differs is only the `Unit`:
what is built, what it reads, and what its checkpoint must record of its lineage.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace

import torch
from torch import nn

from cachetrain.cache import weights_hash
from cachetrain.config import TrainConfig
from cachetrain.errors import Fix, StageError
from cachetrain.faults import fault_point
from cachetrain.models.factory import e2e_network, stage_model
from cachetrain.run import E2E, Run, StageState
from cachetrain.run.checkpoint import Checkpoint
from cachetrain.step import make_optimizer, make_scheduler
from cachetrain.train.inputs import StageInputs
from cachetrain.train.trainer import EpochStats, Position, Selection, fit


@dataclass
class Built:
    """A unit's modules: `model` is what the optimizer steps; `parts` maps the checkpoint's state-dict fields
    ("model", "head") to modules; `hashed` is the module whose weights hash ends a stage's lineage."""

    model: nn.Module
    parts: dict[str, nn.Module]
    hashed: nn.Module | None = None


class Stage:
    """Greedy stage j: its block and auxiliary head, on stage j's input."""

    def __init__(self, run: Run, inputs: StageInputs, j: int):
        self.run, self.inputs, self.key, self.name = run, inputs, j, f"stage {j}"

    def title(self, k: int) -> str:
        return f"{self.name} (k={k})"

    def settings(self) -> TrainConfig:
        return self.run.cfg.stage_train(self.key)  # train.*, the slowdown rule, then stages.<j>.* overrides

    def source(self):
        return self.inputs.input_source(self.key)

    def build(self, k: int, t: TrainConfig) -> Built:
        net = self.inputs.fresh_network()  # seeded initial weights, not ones this process loaded earlier
        model = stage_model(self.run.cfg, net, self.key, k, self.run.data.num_classes, t.seed,
                            checkpoint_activations=t.checkpoint_activations)
        return Built(model, {"model": model.stage, "head": model.head}, hashed=model.stage)

    def lineage(self) -> dict:
        state = self.run.state
        # the bytes it trains on: a later rebuild that changes them makes it stale
        return {"input_fingerprint": state.input_fingerprint(self.key), "input_digests": state.input_digests(self.key)}


class EndToEnd:
    """The end-to-end network: every stage and the last stage's head, trained jointly on the images, from
    their seeded initial weights (the baseline) or, with train.e2e_init "greedy", from the run's trained
    greedy stages and last head (fine-tuning the assembled network; its lineage then names them, so
    retraining a stage makes it stale: cachetrain.run.state)."""

    key = name = E2E

    def __init__(self, run: Run):
        self.run = run

    def title(self, k: int) -> str:
        return "fine-tuning" if self.run.cfg.train.e2e_init == "greedy" else self.name

    def settings(self) -> TrainConfig:
        t = self.run.cfg.train
        return replace(t, epochs=t.e2e_epochs or t.epochs, lr=t.e2e_lr or t.lr)

    def source(self):
        return self.run.data

    def build(self, k: int, t: TrainConfig) -> Built:
        run, data = self.run, self.run.data
        model = e2e_network(run.cfg, data.sample_shape, data.num_classes)
        if run.cfg.train.e2e_init == "greedy":
            last = run.depth - 1
            untrained = run.state.first_unfinished()
            if untrained is not None:
                raise StageError(f"train.e2e_init: 'greedy' fine-tunes the trained greedy stages, and stage "
                                 f"{untrained} is {run.state.stage_state(untrained).value}", Fix.of("train"))
            for j in range(run.depth):  # names the file and the shapes if they do not fit
                run.state.checkpoint(j).load_state(model[j], "model")
            run.state.checkpoint(last).load_state(model[run.depth], "head")
        return Built(model, {"model": model})

    def lineage(self) -> dict:
        return {"input_fingerprint": self.run.state.input_fingerprint(E2E)}


Trainable = Stage | EndToEnd


def train_unit(run: Run, unit: Trainable, k: int | None = None, restart: bool = False) -> float:
    """Train `unit` through the module docstring's six steps; returns the test accuracy of the weights kept."""
    state, ck = run.state.unit_state(unit.key), run.state.checkpoint(unit.key)
    same_k = ck is not None and k in (None, ck.k)
    if state is StageState.TRAINED and same_k and not restart:
        run.console.print(f"{unit.name}: already trained ({ck.epoch} epochs, test acc {ck.test_acc:.4f})")
        return ck.test_acc
    resume = ck if state is StageState.PARTIAL and same_k and not restart else None
    k = resume.k if resume else (k or run.cfg.model.k)
    t = unit.settings()
    source = unit.source()
    built = unit.build(k, t)
    model = built.model.to(run.device)
    if t.channels_last and run.device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    steps = source.steps_per_epoch(t.batch_size)
    epochs = resume.epochs if resume else t.epochs  # a resumed unit keeps the schedule it started with
    optimizer = make_optimizer(model.parameters(), t)
    scheduler = make_scheduler(optimizer, t, steps, epochs)
    # early stopping selects over the whole model (a stage's block and head together)
    selection = Selection.from_checkpoint(resume.selection if resume else None, t.patience)
    start = Position()
    if resume:
        resume.check_world(run.dist.world)
        resume.restore(built.parts, optimizer, scheduler)  # shapes checked, then weights, optimizer, scheduler, rng
        start = Position(resume.epoch, resume.batch, EpochStats(**resume.stats) if resume.stats else None)
        run.records.truncate_metrics(unit.key, start.epoch)
        run.console.print(f"{unit.name}: resuming at epoch {start.epoch + 1}, batch {start.batch}/{steps}")
    metrics = Metrics(run, unit.key, k, keep_old=not resume, steps=steps, start=start)
    lineage = unit.lineage()

    def save(at: Position, test_acc: float | None) -> None:
        metrics.before_checkpoint()
        finished = at.epoch == epochs
        run.checkpoints.save(Checkpoint(
            unit=unit.key, k=k, model=built.parts["model"].state_dict(),
            head=built.parts["head"].state_dict() if "head" in built.parts else None,
            optimizer=optimizer.state_dict(), scheduler=scheduler.state_dict(), epoch=at.epoch, batch=at.batch,
            stats=asdict(at.stats) if at.stats else None, epochs=epochs, step=at.epoch * steps + at.batch,
            rng={"torch": torch.get_rng_state()}, test_acc=None if test_acc is None else float(test_acc),
            config=run.cfg.to_dict(), selection=selection.to_checkpoint() if t.patience else None,
            weights_hash=weights_hash(built.hashed) if built.hashed is not None and finished else None,
            world=run.dist.world, **lineage))
        run.state.forget_checkpoints()  # the unit changed: every fingerprint derived from it may have too

    finished = False
    try:
        with run.stop.graceful():  # SIGTERM or Ctrl-C: checkpoint at the step it came, then stop (cachetrain.stop)
            test_acc = fit(model, source, t, run.device, optimizer, scheduler, epochs, start, save, log=metrics.log,
                           console=run.console, title=unit.title(k), selection=selection, dist=run.dist,
                           stop=run.stop, log_step=metrics.log_step)
        finished = True
    finally:
        metrics.close(finished)
    fault_point("stage_end")
    return test_acc


class Metrics:
    """A unit's metrics rows, and its TensorBoard curves made from the same numbers (cachetrain.run.events:
    step rows go there only). A fresh start (`keep_old`) leaves the previous training's rows in place until
    it writes its own first row or checkpoint (`begin`)."""

    def __init__(self, run: Run, unit, k: int, keep_old: bool, steps: int, start: Position):
        self.run, self.unit, self.k, self.old = run, unit, k, keep_old
        self.curves = run.events.unit(unit, steps, start.epoch, start.batch)

    def begin(self) -> None:
        if self.old:
            self.run.records.truncate_metrics(self.unit, 0)
            self.old = False

    def log(self, row: dict) -> None:
        self.begin()
        self.run.records.append_metrics(self.unit, {"stage": self.unit, "k": self.k, **row})
        self.curves.epoch(row)

    def log_step(self, step: int, row: dict) -> None:
        self.curves.step(step, row)

    def before_checkpoint(self) -> None:
        """Every event the checkpoint covers is on disk before it is (a resume continues the curves there)."""
        self.begin()
        self.curves.flush()

    def close(self, finished: bool) -> None:
        self.curves.close()
        if finished:
            self.run.events.unit_finished(self.unit)  # the kept epoch's accuracies, in the by_stage view
