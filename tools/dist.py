"""torchrun-style distributed helpers (torchvision references' ``init_distributed_mode`` shape)."""
from __future__ import annotations

import os
from typing import Any, Sequence, TypeVar

import torch
import torch.distributed as dist

T = TypeVar("T")


def init_distributed_mode(args: Any) -> None:
    """Read torchrun's env (RANK, WORLD_SIZE, LOCAL_RANK) and start the process group.

    Sets ``args.distributed``, ``args.rank``, ``args.world_size``, ``args.gpu`` (local rank) and
    ``args.dist_backend`` (nccl on CUDA, gloo on CPU). Without torchrun env: single process.
    """
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ and int(os.environ["WORLD_SIZE"]) >= 1:
        args.rank = int(os.environ["RANK"])
        args.world_size = int(os.environ["WORLD_SIZE"])
        args.gpu = int(os.environ.get("LOCAL_RANK", 0))
    else:
        args.rank, args.world_size, args.gpu = 0, 1, 0
        args.distributed = False
        args.dist_backend = None
        return
    args.distributed = args.world_size > 1
    use_cuda = torch.cuda.is_available() and getattr(args, "device", "auto") not in ("cpu",)
    args.dist_backend = "nccl" if use_cuda else "gloo"
    if not args.distributed:
        return
    if use_cuda:
        torch.cuda.set_device(args.gpu)
    if not dist.is_initialized():
        dist.init_process_group(backend=args.dist_backend, init_method="env://",
                                world_size=args.world_size, rank=args.rank)
    dist.barrier()


def is_dist() -> bool:
    return dist.is_available() and dist.is_initialized()


def get_rank() -> int:
    return dist.get_rank() if is_dist() else 0


def get_world_size() -> int:
    return dist.get_world_size() if is_dist() else 1


def is_main_process() -> bool:
    return get_rank() == 0


def barrier() -> None:
    if is_dist():
        dist.barrier()


def split_for_rank(items: Sequence[T], rank: int | None = None, world_size: int | None = None) -> list[T]:
    """The interleaved share ``items[rank::world_size]`` of this process."""
    r = get_rank() if rank is None else rank
    w = get_world_size() if world_size is None else world_size
    return list(items[r::w])
