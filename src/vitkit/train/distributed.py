"""Process-group helpers: the same training code runs alone or under `torchrun` (DDP).

torchrun sets RANK, WORLD_SIZE and LOCAL_RANK for each process; when WORLD_SIZE > 1 we join the process group
(NCCL on GPUs, gloo on CPU) and each process drives one device. Everything here is a no-op for one process.
"""

from __future__ import annotations

import io
import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist


@dataclass
class DistInfo:
    """Where this process sits: its rank among world_size processes and the device it trains on."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        """Rank 0 alone logs and writes files."""
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def resolve_device(device: str | torch.device | None, local_rank: int = 0) -> torch.device:
    """'auto' -> cuda when available else cpu; under DDP a bare 'cuda' means this process's GPU (LOCAL_RANK)."""
    device = "auto" if device is None else str(device)
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ValueError(f"device={device!r} was requested but CUDA is not available (use device='cpu')")
        if device == "cuda":
            device = f"cuda:{local_rank}"
    if device == "mps" and not torch.backends.mps.is_available():
        raise ValueError("device='mps' was requested but MPS is not available (use device='cpu')")
    return torch.device(device)


def init_distributed(device: str | torch.device | None = "auto") -> DistInfo:
    """Join the torchrun process group if there is one, and pick this process's device."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    dev = resolve_device(device, local_rank)
    if world_size > 1:
        if dev.type == "cuda":
            torch.cuda.set_device(dev)
        if not dist.is_initialized():
            dist.init_process_group(backend="nccl" if dev.type == "cuda" else "gloo")
    return DistInfo(rank=rank, world_size=world_size, local_rank=local_rank, device=dev)


def cleanup_distributed() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def all_reduce_sum(values: list[float] | torch.Tensor, info: DistInfo) -> list[float]:
    """Sum a short list of numbers over all processes (in float64, so counts stay exact)."""
    t = torch.as_tensor(values, dtype=torch.float64)
    if info.enabled:
        t = t.to(info.device)
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t.cpu().tolist()


def all_reduce_max(values: list[float], info: DistInfo) -> list[float]:
    """Element-wise maximum over all processes (used to agree on flags such as 'stop now')."""
    t = torch.as_tensor(values, dtype=torch.float64)
    if info.enabled:
        t = t.to(info.device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t.cpu().tolist()


def broadcast_object(obj: Any, info: DistInfo) -> Any:
    """Rank 0's `obj` on every process (e.g. the run directory name, which contains a timestamp)."""
    if not info.enabled:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def gather_objects(obj: Any, info: DistInfo) -> list[Any]:
    """Every process's `obj`, in rank order, on every process (e.g. RNG states for a checkpoint)."""
    if not info.enabled:
        return [obj]
    # Ship torch.save bytes: all_gather_object's own pickling cannot carry tensors across processes on every
    # backend (gloo fails to unpickle tensor storages), while bytes always travel.
    buf = io.BytesIO()
    torch.save(obj, buf)
    out: list[Any] = [None] * info.world_size
    dist.all_gather_object(out, buf.getvalue())
    return [torch.load(io.BytesIO(b), weights_only=False) for b in out]


def barrier(info: DistInfo) -> None:
    if info.enabled:
        dist.barrier()
