"""Process-group helpers: the same training code runs alone or under `torchrun` (DDP or FSDP2).

torchrun sets RANK, WORLD_SIZE and LOCAL_RANK for each process; when WORLD_SIZE > 1 we join the process group
(NCCL on GPUs, gloo on CPU) and each process drives one device. Everything here is a no-op for one process, except
the FSDP2 helpers at the end, which need the process group.
"""

from __future__ import annotations

import contextlib
import io
import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn


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


# ----------------------------------------------------------------------------------------------------------------
# FSDP2: parameters, gradients and optimiser state sharded over the processes
# ----------------------------------------------------------------------------------------------------------------
def device_mesh(info: DistInfo) -> Any:
    """A 1-D mesh over all processes of the group (what `fully_shard` shards over)."""
    from torch.distributed.device_mesh import init_device_mesh

    return init_device_mesh(info.device.type, (info.world_size,))


def fsdp_units(model: nn.Module) -> list[nn.Module]:
    """The submodules sharded as units of their own, innermost first (the root is sharded last).

    A unit's parameters are gathered just before it runs and freed after it, so a device holds one whole unit at a
    time on top of its shards. The units come from the model contract's `feature_info`: each feature module's
    blocks (a ViT's `blocks.i` is a block itself; a Swin/ConvNeXt/ResNet-v2 stage lists `.blocks`; a ResNet stage
    is a Sequential of blocks), then the stage itself when it holds parameters outside its blocks (a downsample).
    A model without `feature_info` gives none: it is sharded at the root only.
    """
    units: list[nn.Module] = []
    for entry in getattr(model, "feature_info", None) or []:
        stage = model.get_submodule(entry["module"])
        blocks = getattr(stage, "blocks", stage if isinstance(stage, nn.Sequential) else None)
        inner = [b for b in blocks if any(True for _ in b.parameters())] if blocks is not None else []
        if not inner:
            units.append(stage)
            continue
        units.extend(inner)
        covered = {id(p) for b in inner for p in b.parameters()}
        if any(id(p) not in covered for p in stage.parameters()):
            units.append(stage)
    return units


def shard_model(model: nn.Module, mesh: Any, param_dtype: torch.dtype | None = None) -> int:
    """Apply FSDP2 (`fully_shard`) in place to each of `fsdp_units(model)`, then to the root.

    Args:
        model: on its training device; its parameters become DTensors sharded along dim 0 over `mesh`.
        mesh: from `device_mesh`.
        param_dtype: with AMP, the dtype parameters are gathered and computed in (half the all-gather volume);
            gradients are still reduced and stored in float32, and the sharded master weights stay float32.

    Returns:
        The number of units sharded apart from the root.
    """
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mp = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32 if param_dtype else None)
    units = fsdp_units(model)
    for unit in units:
        fully_shard(unit, mesh=mesh, mp_policy=mp)
    # The root too reshards after forward (FSDP2 keeps it gathered by default): outside forward/backward every
    # parameter is then its shard, so in-place updates of the shards (the EMA) are always what the next forward
    # gathers, never a stale gathered copy left over from an evaluation.
    fully_shard(model, mesh=mesh, mp_policy=mp, reshard_after_forward=True)
    return len(units)


def is_sharded(model: nn.Module) -> bool:
    """Whether `model` (or the module inside torch.compile) was sharded by `fully_shard`."""
    from torch.distributed.fsdp import FSDPModule

    return isinstance(getattr(model, "_orig_mod", model), FSDPModule)


def local_tensor(t: torch.Tensor) -> torch.Tensor:
    """This process's shard of a DTensor (sharing its storage); any other tensor as it is."""
    from torch.distributed.tensor import DTensor

    return t.to_local() if isinstance(t, DTensor) else t


@contextlib.contextmanager
def no_grad_sync(model: nn.Module) -> Iterator[None]:
    """Accumulate this micro-batch's gradients locally, without the cross-process reduction (DDP or FSDP2).

    FSDP2 then keeps unsharded gradients until the synchronised micro-batch: accumulation costs a full gradient's
    memory per process, in exchange for one reduce-scatter per optimiser step instead of one per micro-batch.
    """
    inner = getattr(model, "_orig_mod", model)
    if not is_sharded(inner):
        with model.no_sync():
            yield
        return
    inner.set_requires_gradient_sync(False)
    try:
        yield
    finally:
        inner.set_requires_gradient_sync(True)


def broadcast_buffers(model: nn.Module, info: DistInfo) -> None:
    """Rank 0's buffers (e.g. BatchNorm running statistics) on every process.

    FSDP shards parameters but leaves buffers alone, so each process's running statistics follow its own batches
    (DDP instead broadcasts rank 0's before every forward). Synchronising them before evaluating and saving makes
    every process evaluate with the statistics that are saved, and a resumed run start from what the uninterrupted
    run holds at that point.
    """
    for buf in model.buffers():
        dist.broadcast(buf.data, src=0)


def full_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The whole (unsharded) state dict of a sharded model, on rank 0's CPU; {} on the other ranks.

    Every process must call it: each sends its shards. Plain names and float32 tensors, as `model.state_dict()` of
    the unsharded model gives them.
    """
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def load_full_state_dict(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Copy a whole state dict (given on every process) into a sharded model: each process keeps its shards."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    # A copy: set_model_state_dict replaces the dict's values by DTensors.
    set_model_state_dict(model, dict(state), options=StateDictOptions(full_state_dict=True, strict=True))
