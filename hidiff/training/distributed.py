"""Multi-process training under ``torchrun`` (DistributedDataParallel), and seeds per rank.

``torchrun --nproc_per_node=2 -m hidiff.training ...`` sets ``WORLD_SIZE``/``RANK``/``LOCAL_RANK``;
:func:`setup_distributed` then joins the process group (``nccl`` on GPU, ``gloo`` on CPU). The
segmentor and the refiner(s) are wrapped *separately* (:func:`wrap`); a frozen network is always
run through :func:`unwrap` (its plain module), with ``requires_grad`` off, so it never takes part
in a DDP reduction. Only rank 0 writes files, logs and shows progress.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

__all__ = [
    "DistContext", "all_true", "broadcast_object", "derive_seed", "gather_objects",
    "barrier", "parameter_digest", "setup_distributed", "teardown_distributed", "unwrap", "wrap",
]


@dataclass(frozen=True)
class DistContext:
    """This process's place in the run."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    owns_group: bool = False  # True when setup_distributed created the process group

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    return default if value in (None, "") else int(value)


def _parse_device(device: str | torch.device) -> torch.device:
    """``torch.device(device)`` for ``cpu``, ``cuda`` or ``cuda:N``; ``ValueError`` otherwise."""
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as err:
        raise ValueError(f"device {device!r} is not a device name; allowed: cpu, cuda, "
                         "cuda:N") from err
    if dev.type not in ("cpu", "cuda"):
        raise ValueError(f"device {device!r}: training runs on cpu, cuda or cuda:N")
    given = str(device).partition(":")[2]
    if given and (not given.isdigit() or int(given) != dev.index):  # torch wraps it to 8 bits
        raise ValueError(f"device {device!r}: index out of range")
    return dev


def setup_distributed(device: str | torch.device | None = None) -> DistContext:
    """Join the torchrun process group when ``WORLD_SIZE > 1``; pick the device.

    ``device`` None: ``cuda:LOCAL_RANK`` when CUDA is available, else CPU.
    """
    world = _env_int("WORLD_SIZE", 1)
    rank, local_rank = _env_int("RANK", 0), _env_int("LOCAL_RANK", 0)
    if device is None:
        dev = torch.device(f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu")
    else:
        dev = _parse_device(device)
        if dev.type == "cuda" and dev.index is None:
            dev = torch.device(f"cuda:{local_rank if world > 1 else 0}")
    if dev.type == "cuda" and not 0 <= dev.index < torch.cuda.device_count():
        found = torch.cuda.device_count()
        raise ValueError(f"device {str(dev)!r}: this machine has {found} CUDA device(s)"
                         + ("" if found else " (or this torch build has no CUDA)")
                         + "; pass --device cpu or leave it out")
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    owns = False
    if world > 1:
        if not dist.is_initialized():
            dist.init_process_group(backend="nccl" if dev.type == "cuda" else "gloo")
            owns = True
        rank, world = dist.get_rank(), dist.get_world_size()
    return DistContext(rank, world, local_rank, dev, owns)


def barrier(ctx: DistContext) -> None:
    """Wait until every process of the run gets here (nothing without a process group)."""
    if ctx.enabled:
        dist.barrier()


def teardown_distributed(ctx: DistContext) -> None:
    if ctx.owns_group and dist.is_initialized():
        dist.destroy_process_group()


def wrap(module: nn.Module, ctx: DistContext) -> nn.Module:
    """``module`` on the device, in DistributedDataParallel when the run has several processes."""
    module = module.to(ctx.device)
    if not ctx.enabled:
        return module
    ids = [ctx.device.index] if ctx.device.type == "cuda" else None
    return DistributedDataParallel(module, device_ids=ids)


def unwrap(module: nn.Module) -> nn.Module:
    """The plain module inside a DDP wrapper (or the module itself)."""
    return module.module if isinstance(module, DistributedDataParallel) else module


def broadcast_object(obj: object, ctx: DistContext) -> object:
    """Rank 0's ``obj`` on every rank."""
    if not ctx.enabled:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def gather_objects(obj: object, ctx: DistContext) -> list[object]:
    """Every rank's ``obj``, in rank order, on every rank."""
    if not ctx.enabled:
        return [obj]
    out: list[object] = [None] * ctx.world_size
    dist.all_gather_object(out, obj)
    return out


def all_true(flag: bool, ctx: DistContext) -> bool:
    """True only when ``flag`` holds on every rank (ranks must call this in step)."""
    if not ctx.enabled:
        return bool(flag)
    value = torch.tensor([0 if flag else 1], dtype=torch.int64,
                         device=ctx.device if ctx.device.type == "cuda" else "cpu")
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return int(value.item()) == 0


def derive_seed(seed: int, *keys: int) -> int:
    """A 63-bit seed from the base seed and keys (rank, purpose), via numpy's SeedSequence."""
    words = np.random.SeedSequence([int(seed), *(int(k) for k in keys)]).generate_state(2)
    return int((int(words[0]) << 31) ^ int(words[1])) & ((1 << 63) - 1)


def parameter_digest(*modules: nn.Module | None) -> str:
    """SHA-256 of every parameter's name and bytes (None modules skipped): compares ranks."""
    h = hashlib.sha256()
    for i, module in enumerate(modules):
        if module is None:
            continue
        for name, p in unwrap(module).named_parameters():
            h.update(f"{i}.{name}".encode())
            h.update(p.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    return h.hexdigest()
