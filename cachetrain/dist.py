"""Data-parallel processes under torchrun: who this process is, and the few collectives cachetrain uses.

`torchrun --nproc-per-node N -m cachetrain ...` starts N copies of the same command with RANK,
WORLD_SIZE and LOCAL_RANK set; `Dist.from_env` reads them and joins the process group (on CUDA: NCCL
for CUDA tensors, DDP's gradients, and gloo for the CPU tensors of `sum`/`gather`/`broadcast`; gloo
alone on the CPU). Without torchrun, `Dist()` is one process, world 1, and every method is a no-op, so
the single-process path runs exactly the code it ran before this module existed.

The division of labour, the same in every command:
- every rank trains (DDP over the stage block and its head, or over the end-to-end network) on its
  share of each global batch (`Shard`), and evaluates the whole validation and test splits itself, so
  every rank reaches the same early-stopping decision without a message;
- only rank 0 writes the run's files: checkpoints, metrics, probes, run.json, config.yaml, a store's
  metadata and its `complete` flag; every rank writes the cache chunks of its share of the chunk groups;
- a barrier follows every write another rank will read (a checkpoint, a store's metadata, `complete`).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta

import numpy as np
import torch
import torch.distributed as td
from torch import nn

from cachetrain.errors import ConfigError


@dataclass(frozen=True)
class Shard:
    """Which part of each global batch this rank takes (rank of world)."""

    rank: int = 0
    world: int = 1


def rank_batches(mine: np.ndarray, steps: int) -> list[np.ndarray]:
    """This rank's samples of an epoch cut into exactly `steps` batches (sizes differ by at most one), so
    all ranks take the same number of steps however unevenly whole chunks divide among them. Every rank
    computes `steps` from the global sample count (ceil(N / batch_size)): the global batch stays
    `train.batch_size` and the learning rate keeps its meaning. `check_shares` has made sure, on every
    rank alike, that no batch is empty."""
    return np.array_split(mine, steps)


def check_shares(smallest: int, steps: int, chunked: bool) -> None:
    """Refuse a job in which some rank's share of some epoch could hold fewer samples than the epoch has
    steps (it would get an empty batch). `smallest` is the worst case over all ranks and epochs, computed
    alike on every rank, so every rank raises the same error before its first batch: a check of this
    rank's own share of this epoch failed on one rank only, in some epochs, and left the others waiting."""
    if smallest >= steps:
        return
    fixes = "fewer ranks, a larger batch or smaller cache chunks (cache.chunk_mib)" if chunked else \
        "fewer ranks or a larger batch"
    raise ConfigError(f"train.batch_size: a rank's share of an epoch can hold as few as {smallest} training samples, "
                      f"fewer than the {steps} steps of an epoch; expected {fixes}")


def step_lengths(shares: list[int], steps: int) -> np.ndarray:
    """The global batch length of each of the `steps` steps of an epoch whose rank r holds `shares[r]`
    samples, each cut by `rank_batches` (np.array_split: the first n % steps batches one longer)."""
    first = np.arange(steps)
    return np.sum([n // steps + (first < n % steps) for n in shares], axis=0)


@dataclass(frozen=True)
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @classmethod
    def from_env(cls, device_type: str) -> Dist:
        """This process under torchrun (joining its process group), or a single process."""
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if world == 1:
            return cls()
        rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
        if not td.is_initialized():
            backend, device_id = "gloo", None  # the CPU: unchanged, and what the tests run
            if device_type == "cuda":
                torch.cuda.set_device(local)
                # DDP's collectives are on CUDA tensors (NCCL); `sum`, `gather`, `broadcast` and the weight
                # hashes are on CPU tensors, which NCCL alone refuses: they go over gloo. Untested here (no GPU)
                backend, device_id = "cpu:gloo,cuda:nccl", torch.device("cuda", local)
            # probes and caching passes run on rank 0 while the others wait at a barrier: a long timeout
            timeout = timedelta(hours=2)
            store, rank, world = next(td.rendezvous("env://", timeout=timeout))
            # keys per torchrun attempt: after a restart, the store can still hold the dead workers' gloo
            # addresses, and a restarted rank that read one failed to connect or hung (3 of 5 restarts here;
            # 0 of 5 with the prefix)
            attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
            td.init_process_group(backend, store=td.PrefixStore(f"cachetrain/attempt_{attempt}", store), rank=rank,
                                  world_size=world, timeout=timeout, device_id=device_id)
        return cls(rank, world, local)

    @property
    def writer(self) -> bool:
        """Rank 0: the one process that writes the run's own files."""
        return self.rank == 0

    @property
    def shard(self) -> Shard:
        return Shard(self.rank, self.world)

    def device(self, device: torch.device) -> torch.device:
        """cuda -> this rank's GPU (cuda:LOCAL_RANK); the CPU stays the CPU."""
        return torch.device("cuda", self.local_rank) if device.type == "cuda" and self.world > 1 else device

    def barrier(self) -> None:
        if self.world > 1:
            td.barrier()

    def wrap(self, model: nn.Module) -> nn.Module:
        """DDP over `model` (its parameters are broadcast from rank 0 here), or the model itself."""
        if self.world == 1:
            return model
        from torch.nn.parallel import DistributedDataParallel
        device = next(model.parameters()).device
        # gradients as views into DDP's buckets: no copy between them, and no "grad strides do not match
        # bucket view strides" warning on every 2-rank run (a parameter whose strides differ from its
        # bucket view's, as space-to-depth and channels-last layouts make)
        return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None,
                                       gradient_as_bucket_view=True)

    def sync_buffers(self, model: nn.Module) -> None:
        """Rank 0's BN running statistics on every rank. DDP broadcasts them at the start of each training
        forward, so after an epoch's last step every rank holds its own: evaluation, and the early-stopping
        decision made from it, must see the same ones everywhere."""
        if self.world > 1:
            for b in model.buffers():
                td.broadcast(b, src=0)

    def broadcast_state(self, model: nn.Module) -> None:
        """Rank 0's parameters and buffers on every rank, in place (state_dict tensors share their storage)."""
        if self.world > 1:
            for t in model.state_dict().values():
                td.broadcast(t, src=0)

    def sum(self, values: list[float]) -> list[float]:
        """Element-wise sum over ranks (float64)."""
        if self.world == 1:
            return list(values)
        t = torch.tensor(values, dtype=torch.float64)
        td.all_reduce(t)
        return t.tolist()

    def gather(self, obj) -> list:
        """Every rank's `obj`, in rank order, on every rank."""
        if self.world == 1:
            return [obj]
        out = [None] * self.world
        td.all_gather_object(out, obj)
        return out

    def broadcast(self, obj):
        """Rank 0's `obj` on every rank."""
        if self.world == 1:
            return obj
        box = [obj]
        td.broadcast_object_list(box, src=0)
        return box[0]

    def close(self) -> None:
        if self.world > 1 and td.is_initialized():
            td.destroy_process_group()


def lost_peer(e: BaseException) -> bool:
    """Whether `e` is a collective that failed because another rank of the job is gone (killed, crashed):
    torchrun restarts the group, and this rank's traceback says nothing the user can act on."""
    if isinstance(e, getattr(td, "DistError", ())):
        return True
    text = str(e)
    return isinstance(e, RuntimeError) and any(s in text for s in ("gloo", "Connection closed by peer",
                                                                    "Connection reset by peer", "NCCL"))
