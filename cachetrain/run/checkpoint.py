"""A unit's checkpoint: one typed, frozen record, its file, and its safe loading.

A checkpoint is `<run>/stages/stage_<j>/checkpoint.pt` (greedy stage j) or `<run>/e2e/checkpoint.pt`
(the end-to-end network), the one before it kept as checkpoint.prev.pt. On disk it is one plain dict
written by `torch.save`; in the code it is a `Checkpoint`, and this module is the only one that reads
or writes the dict's keys:

    key                type               meaning
    format             int                schema version, FORMAT (absent in checkpoints written before it)
    stage              int | "e2e"        the unit: greedy stage index j, or "e2e" for the end-to-end network
    k                  int                auxiliary head depth (e2e: model.k, the depth of its last head)
    model              dict[str, Tensor]  state dict: stage j's block (greedy), or the whole network,
                                          stages then head, as one nn.Sequential (e2e)
    head               dict[str, Tensor]  greedy only: stage j's auxiliary head
    optimizer          dict               optimizer.state_dict(): tensors (momentum, ...) and plain values
    scheduler          dict               the lr scheduler's state_dict() (plain values)
    epoch              int                finished epochs
    batch              int                batches done of the epoch after `epoch` (0 at an epoch's end)
    stats              dict | None        that partial epoch's running sums, asdict(trainer.EpochStats);
                                          None at an epoch's end
    epochs             int                the length of the schedule; a resumed run keeps it
    step               int                optimizer steps taken: epoch * steps_per_epoch + batch
    rng                dict[str, Tensor]  {"torch": torch.get_rng_state()}: the CPU generator, a uint8
                                          tensor (sample order and augmentation are drawn from seeded
                                          numpy generators per (seed, epoch, batch), not from it)
    input_fingerprint  str                what the unit was trained on: the dataset's fingerprint (stage 0,
                                          e2e) or stage j-1's output fingerprint (e2e before FORMAT 1: "data")
    weights_hash       str                greedy only, once trained (epoch == epochs): cache.weights_hash
                                          of the stage's weights, part of its output fingerprint
    test_acc           float | None       test accuracy after the last finished epoch; None mid-epoch
    config             dict               Config.to_dict() of the command that wrote it (cachetrain.run.state
                                          compares it with the run's config)
    input_digests      dict[str, str|None] greedy, optional: {input store relative to the run: its content
                                          digest when the stage was trained} (cachetrain.run.state)
    selection          dict | None        with train.patience > 0: trainer.Selection.to_checkpoint(), the
                                          best epoch by validation loss so far and a copy of its weights
    world              int, optional      the processes that trained it (torchrun's WORLD_SIZE; absent = 1); a
                                          mid-epoch checkpoint resumes only with as many (sample order depends on
                                          it). Under torchrun `stats` holds the sums over every rank

Checkpoints are data, not code: everything above is a tensor or a dict/list/tuple of str, int, float,
bool and None, and `load` reads with `torch.load(weights_only=True)`. A file that needs any other
object to load (a pickle naming a class or a function) is refused with `UnsafeCheckpoint`, none of its
code run. That is not the same as a file a crash or a bad disk damaged (`UnreadableCheckpoint`, which
`Checkpoints.load` answers by falling back to checkpoint.prev.pt): a file whose pickle stream is whole
but asks for code was not written by cachetrain, and falling back silently would hide that (and the
next save would overwrite the evidence), so the user is told and decides.

Saving: atomically and durably (cachetrain.durable.atomic_write); between the temp file's fsync and
its rename the current checkpoint becomes checkpoint.prev.pt (a hard link, so the current name is
never missing). A crash or a full disk at any moment leaves a readable checkpoint.pt: the new one or
the one before it.
"""

from __future__ import annotations

import os
import pickle
import pickletools
import re
import zipfile
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import torch
from torch import nn

from cachetrain.durable import atomic_write
from cachetrain.errors import CheckpointError
from cachetrain.faults import fault_point
from cachetrain.run.layout import E2E, RunLayout, Unit, unit_name

FORMAT = 1


class UnreadableCheckpoint(CheckpointError):
    """Damaged (truncated, corrupt): a crash or a bad disk, not a choice; `reason` is the error's type."""

    def __init__(self, path: Path, reason: str):
        super().__init__(f"{path}: unreadable checkpoint ({reason})")
        self.path, self.reason = path, reason

    def __reduce__(self):
        return type(self), (self.path, self.reason)


class UnsafeCheckpoint(CheckpointError):
    """A whole pickle that needs code (`needs`) to load: refused, never executed."""

    def __init__(self, path: Path, needs: str):
        super().__init__(f"{path}: refused: loading it would need {needs}, not only tensors and plain data")
        self.path, self.needs = path, needs

    def __reduce__(self):
        return type(self), (self.path, self.needs)


@dataclass(frozen=True)
class Checkpoint:
    """One checkpoint (the module docstring's table, key for key; `unit` is the key `stage`)."""

    unit: Unit
    k: int
    model: dict
    optimizer: dict
    scheduler: dict
    epoch: int
    epochs: int
    batch: int = 0
    stats: dict | None = None
    step: int = 0
    head: dict | None = None
    rng: dict | None = None
    input_fingerprint: str | None = None
    weights_hash: str | None = None
    test_acc: float | None = None
    config: dict | None = None
    input_digests: dict | None = None
    selection: dict | None = None
    world: int = 1
    format: int = FORMAT
    path: Path | None = field(default=None, compare=False)  # the file it was read from, for messages

    @property
    def finished(self) -> bool:
        """Every epoch of its schedule is done."""
        return self.epoch >= self.epochs

    @property
    def where(self) -> str:
        return str(self.path) if self.path else f"the checkpoint of {unit_name(self.unit)}"

    # -- the file's dict ---------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """What torch.save writes: the table's keys; the optional ones only when set."""
        out: dict[str, Any] = {}
        for f in fields(self):
            if f.name == "path":
                continue
            value = getattr(self, f.name)
            if f.name in _OPTIONAL and value is None:
                continue
            out["stage" if f.name == "unit" else f.name] = value
        return out

    @classmethod
    def from_dict(cls, raw: Any, path: Path | None = None, unit: Unit | None = None) -> Checkpoint:
        """Check a loaded dict's keys and types; CheckpointError (one line, naming the file) if it is not a
        checkpoint of `unit` (a greedy stage needs its head and lineage too)."""
        where = path or "checkpoint"
        required = _REQUIRED + (_REQUIRED_GREEDY if isinstance(unit, int) else ())
        missing = [key for key in required if not isinstance(raw, dict) or key not in raw]
        if missing:
            raise CheckpointError(f"{where}: not a cachetrain checkpoint (no {', '.join(missing)}); move it "
                                  f"away to train from scratch")
        for key in ("epoch", "epochs", "batch", "step", "k", "world"):
            value = raw.get(key, 0)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise CheckpointError(f"{where}: not a cachetrain checkpoint ({key} is {value!r}, not a "
                                      f"count); move it away to train from scratch")
        names = {f.name for f in fields(cls)} - {"unit", "path", "input_fingerprint"}
        values = {k: v for k, v in raw.items() if k in names}
        return cls(unit=raw.get("stage", unit if unit is not None else E2E), path=path,
                   input_fingerprint=raw.get("input_fingerprint", raw.get("data")),  # "data": e2e before FORMAT 1
                   **{"k": raw.get("k", 0), **values})

    # -- putting a fit back where it stood -----------------------------------------------------------
    def load_state(self, module: nn.Module, key: str = "model") -> None:
        """`module.load_state_dict(self.<key>)` after checking every name and shape: a checkpoint made for
        another model (model.width changed, a file copied from another run) is one CheckpointError naming
        the file, the first mismatching parameter and both shapes, not a traceback from torch."""
        hint = ("it was made for a model with other settings (model.* in the config); use the config it was "
                f"trained with, or delete {self.where} to retrain")
        state = getattr(self, key)
        if not isinstance(state, dict):
            raise CheckpointError(f"{self.where}: '{key}' is not a state dict; {hint}")
        own = module.state_dict()
        for name, tensor in own.items():
            if name not in state:
                raise CheckpointError(f"{self.where}: {key} has no {name}, which the configured model has; {hint}")
            theirs = state[name]
            if not isinstance(theirs, torch.Tensor) or theirs.shape != tensor.shape:
                shape = list(theirs.shape) if isinstance(theirs, torch.Tensor) else type(theirs).__name__
                raise CheckpointError(f"{self.where}: {key} parameter {name} has shape {shape} in the checkpoint "
                                      f"but {list(tensor.shape)} in the configured model; {hint}")
        extra = [name for name in state if name not in own]
        if extra:
            raise CheckpointError(f"{self.where}: {key} has {extra[0]}, which the configured model has not; {hint}")
        module.load_state_dict(state)

    def restore(self, modules: dict[str, nn.Module], optimizer: torch.optim.Optimizer, scheduler) -> None:
        """Put a fit back where this checkpoint left it: each module's weights (`modules` maps "model" /
        "head" to its module, shapes checked first), the optimizer, the scheduler and the CPU RNG."""
        for key, module in modules.items():
            self.load_state(module, key)
        try:
            optimizer.load_state_dict(self.optimizer)
            scheduler.load_state_dict(self.scheduler)
        except (ValueError, KeyError, TypeError, RuntimeError) as e:
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise CheckpointError(f"{self.where}: its optimizer or scheduler state does not fit the configured "
                                  f"training ({first}); use the config it was trained with, or delete {self.where} "
                                  f"to retrain") from None
        if self.rng:
            torch.set_rng_state(self.rng["torch"])

    def check_world(self, world: int) -> None:
        """A checkpoint taken mid-epoch resumes only with the number of processes that wrote it: which samples
        form batch b of an epoch depends on it. At an epoch boundary any number resumes."""
        if self.batch and self.world != world:
            raise CheckpointError(f"{unit_name(self.unit)}: its checkpoint was taken mid-epoch by {self.world} "
                                  f"process(es); expected {self.world} to resume it, got {world}; rerun with torchrun "
                                  f"and {self.world} processes in all (nnodes x nproc-per-node)")


_REQUIRED = ("model", "optimizer", "scheduler", "epoch", "epochs")  # every unit's, every format's
_REQUIRED_GREEDY = ("stage", "k", "head", "input_fingerprint")
_OPTIONAL = {"head", "weights_hash", "input_digests", "selection", "rng"}  # written only when set


class Checkpoints:
    """The checkpoints of one run's units: loaded (with the fall-back to checkpoint.prev.pt) and saved.
    Under torchrun only rank 0 writes (`writer`); the others read what it wrote."""

    def __init__(self, layout: RunLayout, writer: bool = True):
        self.layout, self.writer = layout, writer
        self._unreadable: set[Unit] = set()  # units whose checkpoint.pt failed to load (prev.pt was used)

    def save(self, ck: Checkpoint) -> None:
        if not self.writer:
            return
        unit = ck.unit
        path, prev = self.layout.checkpoint(unit), self.layout.previous_checkpoint(unit)

        def keep_previous(tmp: Path) -> None:
            fault_point("checkpoint_write", str(tmp))
            # keep the current file as the previous one, unless it is the unreadable one we fell back from
            if path.exists() and unit not in self._unreadable:
                prev_tmp = prev.with_name(prev.name + ".tmp")
                prev_tmp.unlink(missing_ok=True)
                try:
                    os.link(path, prev_tmp)
                    os.replace(prev_tmp, prev)
                except BaseException:
                    prev_tmp.unlink(missing_ok=True)
                    raise

        atomic_write(path, lambda f: torch.save(ck.to_dict(), f), before_replace=keep_previous)
        self._unreadable.discard(unit)

    def load(self, unit: Unit, warn=lambda msg: None) -> Checkpoint | None:
        """The unit's checkpoint, read as data, never as code; None when it has none. An unreadable
        checkpoint.pt (truncated by hand, say) falls back to checkpoint.prev.pt, with a warning. One that
        would need code to load is refused (CheckpointError) without falling back: no crash writes such
        a file, so it was planted or tampered with, and the user should know rather than lose it to the
        next save."""
        path = self.layout.checkpoint(unit)
        if not path.exists():
            return None
        try:
            return load(path, unit)
        except UnreadableCheckpoint as e:
            reason = e.reason
        except UnsafeCheckpoint as e:
            raise self._refusal(unit, e) from None
        prev = self.layout.previous_checkpoint(unit)
        if prev.exists():
            try:
                ck = load(prev, unit)
            except UnreadableCheckpoint:
                pass
            except UnsafeCheckpoint as e:
                raise self._refusal(unit, e) from None
            else:
                self._unreadable.add(unit)
                warn(f"{path}: unreadable checkpoint ({reason}); using the previous one, {prev.name} "
                     f"(epoch {ck.epoch}, batch {ck.batch})")
                return ck
        raise CheckpointError(f"{path}: unreadable checkpoint ({reason}) and no readable previous one; delete "
                              f"{path} to retrain {unit_name(unit)} from scratch")

    def _refusal(self, unit: Unit, e: UnsafeCheckpoint) -> CheckpointError:
        folder = self.layout.unit_dir(unit)
        return CheckpointError(f"{e}; cachetrain did not write it (or it was tampered with), and none of its code "
                               f"was run; replace it with a checkpoint you trust, or delete {folder}/checkpoint*.pt "
                               f"to retrain {unit_name(unit)} from scratch")


def load(path: Path, unit: Unit | None = None) -> Checkpoint:
    """Read a checkpoint file as data (weights_only=True) and check its keys. Raises UnreadableCheckpoint
    (damaged), UnsafeCheckpoint (needs code) or CheckpointError (loads, but is not a checkpoint of `unit`)."""
    path = Path(path)
    try:
        raw = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        if _whole_pickle(path):
            raise UnsafeCheckpoint(path, _needs(str(e))) from None
        raise UnreadableCheckpoint(path, type(e).__name__) from None
    except Exception as e:  # noqa: BLE001 - any damaged file gets the same answer
        raise UnreadableCheckpoint(path, type(e).__name__) from None
    return Checkpoint.from_dict(raw, path, unit)


def _whole_pickle(path: Path) -> bool:
    """Whether the file's pickle stream is complete and well formed (then a refusal is about what it asks
    for, not about damage). torch's zip format: the archive's data.pkl, CRC-checked; else the file."""
    try:
        with zipfile.ZipFile(path) as z:
            names = [n for n in z.namelist() if n.endswith("/data.pkl") or n == "data.pkl"]
            if len(names) != 1:
                return False
            data = z.read(names[0])
    except zipfile.BadZipFile:
        try:
            data = path.read_bytes()
        except OSError:
            return False
    except Exception:  # noqa: BLE001 - a damaged archive
        return False
    try:
        ops = list(pickletools.genops(data))
    except Exception:  # noqa: BLE001 - a truncated or corrupt stream
        return False
    return bool(ops) and ops[-1][0].name == "STOP"


def _needs(message: str) -> str:
    """What torch's weights-only unpickler refused, from its (many-line) message."""
    m = re.search(r"GLOBAL ([\w.]+)", message)
    if m:
        return f"the Python object {m.group(1)}"
    m = re.search(r"Unsupported operand (\d+)", message)
    if m:
        return f"pickle opcode {chr(int(m.group(1)))!r}"
    return "Python objects"
