"""torch.distributed in one place: who am I, how many are we, wait for the others.

Every long job (generation, annotation, training) runs the same code in one process or under
``torchrun``; these helpers answer (0, 1) and do nothing when no process group is initialised.
"""

from __future__ import annotations

import os
from contextlib import contextmanager

import torch

__all__ = ["is_on", "rank_and_world", "barrier", "torchrun_session"]


def is_on() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def rank_and_world(rank: int | None = None, world_size: int | None = None) -> tuple[int, int]:
    """The given rank / world size, or torch.distributed's, or (0, 1); validated."""
    if rank is None:
        rank = torch.distributed.get_rank() if is_on() else 0
    if world_size is None:
        world_size = torch.distributed.get_world_size() if is_on() else 1
    if isinstance(rank, bool) or isinstance(world_size, bool) or not all(
            isinstance(v, int) or hasattr(v, "__index__") for v in (rank, world_size)):
        raise TypeError(f"rank and world_size must be integers, got {rank!r}, {world_size!r}")
    rank, world_size = int(rank), int(world_size)
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"need 0 <= rank < world_size, got rank {rank}, world_size {world_size}")
    return rank, world_size


def barrier() -> None:
    if is_on() and torch.distributed.get_world_size() > 1:
        torch.distributed.barrier()


@contextmanager
def torchrun_session(device: str | None = None):
    """For a command-line job: yields its device and, when ``torchrun`` launched it (RANK and
    WORLD_SIZE set), runs it inside a process group (NCCL on GPUs, gloo on CPUs) that is torn down at
    the end. Under torchrun on GPUs each rank takes ``cuda:LOCAL_RANK``. ``device`` None or "auto":
    CUDA when available, else the CPU."""
    launched = "RANK" in os.environ and "WORLD_SIZE" in os.environ
    if device in (None, "auto"):
        device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(device)
    if device.type == "cuda":
        if launched:
            device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)
    started = launched and not is_on()
    if started:
        torch.distributed.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    try:
        yield device
    finally:
        if started and is_on():
            torch.distributed.destroy_process_group()
