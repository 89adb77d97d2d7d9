"""Helpers shared by the per-worker training loops: seeding, DDP wrapping, sharded loaders, EMA.

Training loops run once per Ray Train worker (``ctx.world_size`` workers, torch.distributed
initialised by Ray Train: gloo on CPU, nccl on GPU) or alone in one process (``world_size == 1``,
no process group). The same loop code serves both: use these helpers instead of branching.
"""

from __future__ import annotations

import copy
import random

import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, Dataset, DistributedSampler, RandomSampler


def seed_everything(seed: int, rank: int = 0) -> torch.Generator:
    """Seed python, numpy and torch (offset by rank); returns a CPU generator seeded the same way."""
    s = int(seed) * 1000 + int(rank)
    random.seed(s)
    np.random.seed(s % (2**32))
    torch.manual_seed(s)
    g = torch.Generator()
    g.manual_seed(s)
    return g


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def wrap_ddp(model: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """Move to ``device`` and wrap in DistributedDataParallel when a process group is running."""
    model = model.to(device)
    if is_distributed():
        from torch.nn.parallel import DistributedDataParallel as DDP

        ids = [device.index] if device.type == "cuda" and device.index is not None else None
        model = DDP(model, device_ids=ids)
    return model


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The bare module inside a DDP wrapper (its state_dict has no ``module.`` prefix)."""
    return model.module if hasattr(model, "module") and isinstance(model, torch.nn.parallel.DistributedDataParallel) \
        else model


def sharded_loader(dataset: Dataset, global_batch: int, *, shuffle: bool, seed: int, drop_last: bool = False,
                   num_workers: int = 0) -> DataLoader:
    """A loader over this worker's shard: per-worker batch = global_batch // world_size.

    Call ``set_epoch(loader, epoch)`` at the start of each epoch so shuffling differs per epoch and
    is identical on all workers.
    """
    world = dist.get_world_size() if is_distributed() else 1
    per_worker = max(1, global_batch // world)
    if is_distributed():
        sampler = DistributedSampler(dataset, shuffle=shuffle, seed=seed, drop_last=drop_last)
    elif shuffle:
        g = torch.Generator()
        g.manual_seed(seed)
        sampler = RandomSampler(dataset, generator=g)
    else:
        sampler = None
    loader = DataLoader(dataset, batch_size=per_worker, sampler=sampler, shuffle=False, drop_last=drop_last,
                        num_workers=num_workers)
    loader.shuffle_seed = int(seed)  # read by set_epoch: the order depends on (seed, epoch)
    return loader


def set_epoch(loader: DataLoader, epoch: int) -> None:
    s = loader.sampler
    if isinstance(s, DistributedSampler):
        s.set_epoch(epoch)
    elif isinstance(s, RandomSampler) and s.generator is not None:
        seed = getattr(loader, "shuffle_seed", 0)
        s.generator.manual_seed((seed * 1_000_003 + epoch * 7919 + 0x5EED) & 0xFFFFFFFF)


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum a tensor over workers (identity without a process group)."""
    if is_distributed():
        t = t.clone()
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def barrier() -> None:
    if is_distributed():
        dist.barrier()


class EMA:
    """Exponential moving average of a model's parameters (buffers copied): ``shadow = d*shadow + (1-d)*p``."""

    def __init__(self, model: torch.nn.Module, decay: float):
        self.decay = float(decay)
        self.shadow = copy.deepcopy(unwrap(model)).eval()
        for p in self.shadow.parameters():
            p.requires_grad_(False)

    @torch.no_grad()
    def update(self, model: torch.nn.Module) -> None:
        src = unwrap(model)
        for s, p in zip(self.shadow.parameters(), src.parameters()):
            s.mul_(self.decay).add_(p.detach(), alpha=1.0 - self.decay)
        for s, b in zip(self.shadow.buffers(), src.buffers()):
            s.copy_(b)

    def state_dict(self) -> dict:
        return self.shadow.state_dict()

    def load_state_dict(self, sd: dict) -> None:
        self.shadow.load_state_dict(sd)
