"""The checkpoint schema, shared by greedy stages and the end-to-end baseline, and its safe loading.

A checkpoint is `<run>/stages/stage_<j>/checkpoint.pt` (greedy stage j) or `<run>/e2e/checkpoint.pt`
(the baseline): one dict written by `torch.save` through cachetrain.train.rundir (atomically, with the one
before kept as checkpoint.prev.pt). Its keys:

    key                type               meaning
    format             int                schema version, FORMAT (absent in checkpoints written before it)
    stage              int | "e2e"        the unit: greedy stage index j, or "e2e" for the baseline
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
                                          e2e) or stage j-1's output fingerprint (legacy e2e: "data")
    weights_hash       str                greedy only, once trained (epoch == epochs): cache.weights_hash
                                          of the stage's weights, part of its output fingerprint
    test_acc           float | None       test accuracy after the last finished epoch; None mid-epoch
    config             dict               Config.to_dict() of the command that wrote it (cachetrain.train.identity
                                          compares it with the run's config)
    input_digests      dict[str, str|None] greedy, optional: {input store relative to the run: its content
                                          digest when the stage was trained} (stale_reason in cachetrain.train.state)
    selection          dict | None        with train.patience > 0: trainer.Selection.to_checkpoint(), the
                                          best epoch by validation loss so far and a copy of its weights
    world              int, optional      the processes that trained it (torchrun's WORLD_SIZE; absent = 1); a
                                          mid-epoch checkpoint resumes only with as many (sample order depends on
                                          it). Under torchrun `stats` holds the sums over every rank

Checkpoints are data, not code: everything above is a tensor or a dict/list/tuple of str, int, float,
bool and None, and `load` reads with `torch.load(weights_only=True)`. A file that needs any other
object to load (a pickle naming a class or a function) is refused with `UnsafeCheckpoint`, none of its
code run. That is not the same as a file a crash or a bad disk damaged (`UnreadableCheckpoint`, which
the run directory answers by falling back to checkpoint.prev.pt): a file whose pickle stream is whole
but asks for code was not written by cachetrain, and falling back silently would hide that (and the
next save would overwrite the evidence), so the user is told and decides.
"""

from __future__ import annotations

import pickle
import pickletools
import re
import zipfile
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from torch import nn

from cachetrain.errors import CheckpointError
from cachetrain.train.trainer import EpochStats, Position

FORMAT = 1
REQUIRED = ("model", "optimizer", "scheduler", "epoch", "epochs")  # every unit's, every format's
REQUIRED_GREEDY = ("stage", "k", "head", "input_fingerprint")


class UnreadableCheckpoint(CheckpointError):
    """Damaged (truncated, corrupt): a crash or a bad disk, not a choice; `reason` is the error's type."""

    def __init__(self, path: Path, reason: str):
        super().__init__(f"{path}: unreadable checkpoint ({reason})")
        self.path, self.reason = path, reason


class UnsafeCheckpoint(CheckpointError):
    """A whole pickle that needs code (`needs`) to load: refused, never executed."""

    def __init__(self, path: Path, needs: str):
        super().__init__(f"{path}: refused: loading it would need {needs}, not only tensors and plain data")
        self.path, self.needs = path, needs


class Checkpoint(dict):
    """A loaded checkpoint: the dict, and the file it came from (for messages)."""

    path: Path | None = None


# -- writing -----------------------------------------------------------------------------------------
def build(*, unit: int | str, k: int, model: nn.Module, optimizer: torch.optim.Optimizer, scheduler, at: Position,
          epochs: int, steps_per_epoch: int, input_fingerprint: str | None, test_acc: float | None,
          config: dict, head: nn.Module | None = None, weights_hash: str | None = None, **extra: Any) -> dict:
    """The checkpoint of a fit standing at `at` (see the module docstring for each key). `extra`: further
    keys of the schema a unit adds (plain data only; document each one above)."""
    ck: dict[str, Any] = {
        "format": FORMAT, "stage": unit, "k": k, "model": model.state_dict(),
        "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
        "epoch": at.epoch, "batch": at.batch, "stats": asdict(at.stats) if at.stats else None, "epochs": epochs,
        "step": at.epoch * steps_per_epoch + at.batch, "rng": {"torch": torch.get_rng_state()},
        "input_fingerprint": input_fingerprint, "test_acc": None if test_acc is None else float(test_acc),
        "config": config,
    }
    if head is not None:
        ck["head"] = head.state_dict()
    if weights_hash is not None:
        ck["weights_hash"] = weights_hash
    ck.update(extra)
    return ck


# -- reading ----------------------------------------------------------------------------------------
def input_fingerprint(ck: dict) -> str | None:
    return ck.get("input_fingerprint", ck.get("data"))


def position(ck: dict) -> Position:
    return Position(ck["epoch"], ck.get("batch", 0), EpochStats(**ck["stats"]) if ck.get("stats") else None)


def restore(ck: dict, modules: dict[str, nn.Module], optimizer: torch.optim.Optimizer, scheduler) -> Position:
    """Put a fit back where `ck` left it: each module's weights (`modules` maps a checkpoint key to its
    module, shapes checked first), the optimizer, the scheduler and the CPU RNG; returns the position."""
    for key, module in modules.items():
        load_state(module, ck, key)
    try:
        optimizer.load_state_dict(ck["optimizer"])
        scheduler.load_state_dict(ck["scheduler"])
    except (ValueError, KeyError, TypeError, RuntimeError) as e:
        where = getattr(ck, "path", None) or "checkpoint"
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"{where}: its optimizer or scheduler state does not fit the configured training "
                              f"({first}); use the config it was trained with, or delete {where} to retrain") from None
    if "rng" in ck:
        torch.set_rng_state(ck["rng"]["torch"])
    return position(ck)


def load_state(module: nn.Module, ck: dict, key: str = "model") -> None:
    """`module.load_state_dict(ck[key])`, after checking every name and shape: a checkpoint made for
    another model (model.width changed, a file copied from another run) is one CheckpointError naming
    the file, the first mismatching parameter and both shapes, not a traceback from torch."""
    where = getattr(ck, "path", None) or "checkpoint"
    hint = ("it was made for a model with other settings (model.* in the config); use the config it was "
            f"trained with, or delete {where} to retrain")
    state = ck.get(key)
    if not isinstance(state, dict):
        raise CheckpointError(f"{where}: '{key}' is not a state dict; {hint}")
    own = module.state_dict()
    for name, tensor in own.items():
        if name not in state:
            raise CheckpointError(f"{where}: {key} has no {name}, which the configured model has; {hint}")
        theirs = state[name]
        if not isinstance(theirs, torch.Tensor) or theirs.shape != tensor.shape:
            shape = list(theirs.shape) if isinstance(theirs, torch.Tensor) else type(theirs).__name__
            raise CheckpointError(f"{where}: {key} parameter {name} has shape {shape} in the checkpoint but "
                                  f"{list(tensor.shape)} in the configured model; {hint}")
    extra = [name for name in state if name not in own]
    if extra:
        raise CheckpointError(f"{where}: {key} has {extra[0]}, which the configured model has not; {hint}")
    module.load_state_dict(state)


def load(path: Path, unit: int | str | None = None) -> Checkpoint:
    """Read a checkpoint as data (weights_only=True) and check its keys. Raises UnreadableCheckpoint
    (damaged), UnsafeCheckpoint (needs code) or CheckpointError (loads, but is not a checkpoint of
    `unit`)."""
    path = Path(path)
    try:
        raw = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        if _whole_pickle(path):
            raise UnsafeCheckpoint(path, _needs(str(e))) from None
        raise UnreadableCheckpoint(path, type(e).__name__) from None
    except Exception as e:  # noqa: BLE001 - any damaged file gets the same answer
        raise UnreadableCheckpoint(path, type(e).__name__) from None
    required = REQUIRED + (REQUIRED_GREEDY if isinstance(unit, int) else ())
    missing = [key for key in required if not isinstance(raw, dict) or key not in raw]
    if missing:
        raise CheckpointError(f"{path}: not a cachetrain checkpoint (no {', '.join(missing)}); move it away to "
                              f"train from scratch")
    for key in ("epoch", "epochs", "batch"):
        if key in raw and (not isinstance(raw[key], int) or isinstance(raw[key], bool) or raw[key] < 0):
            raise CheckpointError(f"{path}: not a cachetrain checkpoint ({key} is {raw[key]!r}, not a count); "
                                  f"move it away to train from scratch")
    ck = Checkpoint(raw)
    ck.path = path
    return ck


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


def check_world(ck: dict, world: int, unit: str) -> None:
    """A checkpoint taken mid-epoch resumes only with the number of processes that wrote it (`world`):
    which samples form batch b of an epoch depends on it. At an epoch boundary any number resumes."""
    wrote = ck.get("world", 1)
    if ck.get("batch", 0) and wrote != world:
        raise CheckpointError(f"{unit}: its checkpoint was taken mid-epoch by {wrote} process(es); expected "
                              f"{wrote} to resume it, got {world}; rerun with torchrun and {wrote} processes in "
                              f"all (nnodes x nproc-per-node)")
