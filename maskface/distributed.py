"""Where a run computes: the device, the torchrun processes (DistributedDataParallel), the random
state that makes a run and its resume exact, and the host allocator's tuning.
"""
from __future__ import annotations

import os
import random
from dataclasses import dataclass

import numpy as np
import torch

from maskface.cli import UserError


def tune_host_allocator() -> None:
    """Let glibc reuse freed memory for big tensors instead of mapping fresh pages every batch.

    Above its mmap threshold (32 MB at most) glibc maps each allocation anew and unmaps it on free,
    so every 224x224 batch paid ~10k page faults per temporary; measured here, raising the threshold
    doubled the CPU batch-augmentation throughput. A no-op where glibc's mallopt is missing.
    """
    import ctypes
    import sys
    if not sys.platform.startswith("linux"):
        return
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return
    m_trim_threshold, m_mmap_threshold = -1, -3
    libc.mallopt(m_mmap_threshold, 1 << 30)
    libc.mallopt(m_trim_threshold, 1 << 30)


def resolve_device(name: str) -> torch.device:
    """--device: auto (CUDA when there is one), cpu, cuda or cuda:N; UserError when unusable."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UserError(f"--device '{name}': expected auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"--device {name}: CUDA is not available on this machine; use --device cpu")
    return device


@dataclass(frozen=True)
class Processes:
    """This process's place among the torchrun processes (rank 0 of 1 without torchrun)."""
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world > 1

    def barrier(self) -> None:
        if self.distributed:
            torch.distributed.barrier()

    def broadcast(self, value):
        """rank 0's value, on every rank."""
        if not self.distributed:
            return value
        holder = [value]
        torch.distributed.broadcast_object_list(holder, src=0)
        return holder[0]

    def gather(self, value) -> list:
        if not self.distributed:
            return [value]
        out = [None] * self.world
        torch.distributed.all_gather_object(out, value)
        return out

    def say(self, message: str) -> None:
        """Print on rank 0 only: one line per event, however many processes run."""
        if self.main:
            print(message, flush=True)


def start_processes(device_name: str) -> Processes:
    """Join the torchrun group when WORLD_SIZE > 1 (NCCL on CUDA, gloo on CPU)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return Processes()
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = device_name != "cpu" and torch.cuda.is_available()
    if use_cuda:
        torch.cuda.set_device(local_rank)
    if not torch.distributed.is_initialized():
        torch.distributed.init_process_group("nccl" if use_cuda else "gloo")
    return Processes(rank, world, local_rank)


def process_device(device_name: str, procs: Processes) -> torch.device:
    """--device for this process: its own GPU (LOCAL_RANK) under torchrun."""
    device = resolve_device(device_name)
    if procs.distributed and device.type == "cuda":
        return torch.device("cuda", procs.local_rank)
    return device


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def rng_state() -> dict:
    """Every random generator's state, as tensors and plain values (checkpoints are loaded with
    weights_only=True, which takes no numpy arrays)."""
    kind, keys, position, has_gauss, cached_gaussian = np.random.get_state()
    state = {"torch": torch.get_rng_state(),
             "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), position, has_gauss,
                       cached_gaussian],
             "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    kind, keys, *rest = state["numpy"]  # an ndarray in checkpoints of earlier versions
    np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), *rest))
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
