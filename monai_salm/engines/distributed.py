"""torch.distributed for SALM under ``torchrun``: the process group from torchrun's environment, DDP wrapping, and
the few reductions training and release need (through :mod:`ignite.distributed`, so a process group made by the
caller works too)."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import ignite.distributed as idist
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

__all__ = [
    "SharedError",
    "distributed_context",
    "world_size",
    "rank",
    "is_main",
    "wrap_ddp",
    "unwrap",
    "all_reduce",
    "gather",
    "barrier",
    "average_buffers",
]


class SharedError(ValueError):
    """Raised on every process with the message of the first process that failed, so that all stop together."""


def world_size() -> int:
    """Number of processes in the current process group (1 when not distributed)."""
    return idist.get_world_size()


def rank() -> int:
    """This process's rank (0 when not distributed)."""
    return idist.get_rank()


def is_main() -> bool:
    """Whether this is rank 0, the process that logs and writes shared files."""
    return rank() == 0


@contextmanager
def distributed_context(device: str | torch.device = "cpu") -> Iterator[torch.device]:
    """Join the process group ``torchrun`` describes in the environment, for the duration of the block.

    Launched by ``torchrun`` (``WORLD_SIZE`` > 1 in the environment) and with no process group yet, the group is
    initialised from the environment (``env://`` rendezvous: single node or multi-node alike): backend ``nccl`` for a
    CUDA ``device``, ``gloo`` otherwise, and a CUDA device without an index becomes ``cuda:LOCAL_RANK``. The group is
    destroyed when the block ends. Otherwise nothing is done and ``device`` is yielded as it is.

    Args:
        device: the requested torch device.

    Yields:
        this process's device.

    Raises:
        ValueError: when a CUDA device is asked for but this process's local rank has no GPU.
    """
    device = torch.device(device)
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or dist.is_initialized():
        yield device
        return
    if device.type == "cuda":
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        if device.index is None:
            device = torch.device("cuda", local_rank)
        if not torch.cuda.is_available() or device.index >= torch.cuda.device_count():
            raise ValueError(f"--device {device}: no such GPU on this node (local rank {local_rank}, "
                             f"{torch.cuda.device_count()} GPU(s)).")
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    idist.sync()
    try:
        yield device
    finally:
        dist.destroy_process_group()
        idist.sync()


def wrap_ddp(module: torch.nn.Module, device: torch.device, find_unused_parameters: bool = False) -> torch.nn.Module:
    """``module`` in :class:`~torch.nn.parallel.DistributedDataParallel` when distributed (else unchanged).

    Batch-norm statistics stay per process, as in plain DDP (``SyncBatchNorm`` only runs on GPUs).

    Args:
        module: the network, on ``device``.
        device: this process's device.
        find_unused_parameters: for networks with parameters that some forward passes leave unused (DDP's option).
    """
    if world_size() <= 1 or isinstance(module, DistributedDataParallel):
        return module
    return DistributedDataParallel(module, device_ids=[device] if device.type == "cuda" else None,
                                   find_unused_parameters=find_unused_parameters)


def unwrap(module: torch.nn.Module) -> torch.nn.Module:
    """The network inside a :class:`~torch.nn.parallel.DistributedDataParallel` wrapper (or ``module`` itself)."""
    return module.module if isinstance(module, DistributedDataParallel) else module


def all_reduce(tensor: torch.Tensor, op: str = "SUM") -> torch.Tensor:
    """``tensor`` reduced over all processes (``"SUM"``, ``"MAX"``, ...); the tensor itself when not distributed."""
    if world_size() <= 1:
        return tensor
    return idist.all_reduce(tensor, op=op)


def gather(obj: Any) -> list[Any]:
    """Every process's ``obj`` (any picklable value), in rank order; ``[obj]`` when not distributed."""
    if world_size() <= 1:
        return [obj]
    out: list[Any] = [None] * world_size()
    dist.all_gather_object(out, obj)  # objects as they are (ignite's all_gather concatenates tensors)
    return out


def barrier() -> None:
    """Wait for every process (no-op when not distributed)."""
    if world_size() > 1:
        idist.barrier()


def average_buffers(module: torch.nn.Module) -> None:
    """Average ``module``'s floating-point buffers (batch-norm running statistics) over all processes, in place."""
    if world_size() <= 1:
        return
    for buffer in module.buffers():
        if buffer.is_floating_point():
            buffer.copy_(all_reduce(buffer.detach().clone()) / world_size())
