"""The training runtime shared by the three trainers (stage one, IRN, BECO) and the CAM inference code.

One place for each mechanism a trainer needs around its loop body:

- :func:`select_device` / :func:`setup_runtime`: the device and the torchrun/DDP process group
  (built on :mod:`tools.dist`), returned as a :class:`Runtime`.
- :func:`spawn_per_gpu`: the one ``mp.spawn`` launcher, for the commands that start one process per
  GPU themselves (BECO's ``python main.py -dist`` outside torchrun, the IRN steps' per-GPU fan-out).
- :func:`amp_dtype`, :func:`autocast`, :func:`amp_setup`: the mixed-precision context and the
  ``GradScaler`` (fp16 with loss scaling on CUDA, bf16 without a scaler on CPU).
- :func:`sgd_momentum`, :func:`poly_sgd`, :class:`PolySchedule`: SGD plus the poly learning-rate rule,
  with the reference's momentum quirk as an explicit argument.
- :func:`add_speed_args`, :func:`set_backends`, :func:`loader_kwargs`, :func:`to_device`,
  :func:`prepare_module`: the opt-in GPU speed features (channels_last, cudnn.benchmark, pinned memory with
  non-blocking copies, persistent loader workers, torch.compile), each off by default.

Saving and loading the full training state (RNG included) lives in :mod:`tools.train_state`.
"""
from __future__ import annotations

import contextlib
import os
import socket
from dataclasses import dataclass
from typing import Any, Callable, ContextManager, Iterable, Sequence

import torch

from tools import dist as tdist
from tools.misc import get_device, poly_lr

__all__ = ["Runtime", "select_device", "setup_runtime", "spawn_per_gpu", "free_port", "amp_dtype", "autocast",
           "amp_setup", "sgd_momentum", "poly_sgd", "PolySchedule", "get_device", "poly_lr", "add_speed_args",
           "set_backends", "loader_kwargs", "channels_last_on", "to_device", "prepare_module"]


# ---------------------------------------------------------------------------------------------- device
@dataclass(frozen=True)
class Runtime:
    """Where this process runs: its device, rank and the number of processes."""

    device: torch.device
    rank: int = 0
    world_size: int = 1
    distributed: bool = False

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def select_device(name: str | None = "auto", local_rank: int | None = None) -> torch.device:
    """The device of this process: ``--device`` through :func:`tools.misc.get_device` (an unavailable
    CUDA is an error, not a CPU fallback); a CUDA choice under DDP becomes ``cuda:<local_rank>``
    (one GPU per process). ``local_rank`` None = not distributed."""
    dev = get_device(name)
    if dev.type == "cuda" and local_rank is not None:
        return torch.device("cuda", local_rank)
    return dev


def setup_runtime(args: Any) -> Runtime:
    """Read the torchrun environment (RANK, WORLD_SIZE, LOCAL_RANK), start the process group when there
    are several processes, and pick the device from ``args.device``.

    Sets ``args.distributed/rank/world_size/gpu/dist_backend`` as :func:`tools.dist.init_distributed_mode`
    does. Without torchrun: one process, rank 0.
    """
    tdist.init_distributed_mode(args)
    device = select_device(getattr(args, "device", "auto"), args.gpu if args.distributed else None)
    return Runtime(device, tdist.get_rank(), tdist.get_world_size(), bool(args.distributed))


def free_port() -> int:
    """A TCP port nobody listens on now (for a spawned process group's MASTER_PORT)."""
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def _spawned(local_rank: int, fn: Callable[..., None], nprocs: int, torchrun_env: bool, fn_args: tuple) -> None:
    if torchrun_env:
        os.environ.update(RANK=str(local_rank), LOCAL_RANK=str(local_rank), WORLD_SIZE=str(nprocs))
    fn(local_rank, *fn_args)


def spawn_per_gpu(fn: Callable[..., None], nprocs: int, args: tuple = (), torchrun_env: bool = False) -> None:
    """Run ``fn(local_rank, *args)`` in ``nprocs`` new processes and wait for all of them.

    ``torchrun_env=True`` gives each process the environment torchrun would (RANK, LOCAL_RANK,
    WORLD_SIZE, and a MASTER_ADDR/MASTER_PORT on this host), so ``fn`` can call :func:`setup_runtime`
    exactly as under torchrun; without it the processes are independent workers (no process group).
    """
    import torch.multiprocessing as mp

    if torchrun_env:
        os.environ.setdefault("MASTER_ADDR", "localhost")
        os.environ.setdefault("MASTER_PORT", str(free_port()))
    mp.spawn(_spawned, args=(fn, nprocs, torchrun_env, tuple(args)), nprocs=nprocs, join=True)


# ---------------------------------------------------------------------------------------------- AMP
def amp_dtype(device: torch.device, choice: str = "auto") -> torch.dtype:
    """``--amp_dtype``: ``auto`` = fp16 on CUDA (with loss scaling), bf16 elsewhere (CPU autocast has no
    useful fp16); ``fp16`` / ``bf16`` force one."""
    if choice == "auto":
        choice = "fp16" if device.type == "cuda" else "bf16"
    if choice not in ("fp16", "bf16"):
        raise ValueError(f"amp dtype {choice!r}: expected auto | fp16 | bf16")
    return torch.float16 if choice == "fp16" else torch.bfloat16


def autocast(device: torch.device, enabled: bool, dtype: torch.dtype | str | None = None) -> ContextManager:
    """The mixed-precision context of a forward pass: ``torch.autocast`` in ``dtype`` (default per
    :func:`amp_dtype`) when ``enabled``, else a null context (plain fp32)."""
    if not enabled:
        return contextlib.nullcontext()
    if dtype is None or isinstance(dtype, str):
        dtype = amp_dtype(device, dtype or "auto")
    return torch.autocast(device_type=device.type, dtype=dtype)


def amp_setup(device: torch.device, enabled: bool, choice: str = "auto"
              ) -> tuple[Callable[[], ContextManager], "torch.amp.GradScaler | None"]:
    """The training AMP pair: a zero-argument factory of the forward's autocast context, and the
    ``GradScaler`` (only for fp16 on CUDA; bf16 and fp32 need none). Disabled: null contexts, no scaler."""
    if not enabled:
        return contextlib.nullcontext, None
    dtype = amp_dtype(device, choice)
    scaler = torch.amp.GradScaler("cuda") if (dtype == torch.float16 and device.type == "cuda") else None
    return (lambda: torch.autocast(device_type=device.type, dtype=dtype)), scaler


# ---------------------------------------------------------------------------------------------- speed
def add_speed_args(p: Any, cudnn_benchmark: bool = True, amp_dtype: bool = True) -> None:
    """Add the opt-in GPU speed flags to argparse parser ``p`` (all off by default):
    ``--channels_last``, ``--compile``, ``--persistent_workers``, and unless told otherwise
    ``--cudnn_benchmark`` and ``--amp_dtype`` (a trainer that already has its own leaves them out)."""
    p.add_argument("--channels_last", action="store_true",
                   help="channels_last memory format for the training network and its input batches "
                        "(CUDA only: ignored on CPU, where a channels_last backward can crash)")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile the training network (first steps are slow while it compiles)")
    p.add_argument("--persistent_workers", action="store_true",
                   help="keep DataLoader workers alive across epochs (workers then draw their augmentation "
                        "seeds once, not per epoch, so the crops differ from a run without it)")
    if cudnn_benchmark:
        p.add_argument("--cudnn_benchmark", action="store_true",
                       help="cudnn.benchmark: pick the fastest convolution kernels per input shape (CUDA)")
    if amp_dtype:
        p.add_argument("--amp_dtype", default="auto", choices=["auto", "fp16", "bf16"],
                       help="autocast dtype with --amp: auto = fp16 with loss scaling on CUDA, bf16 on CPU")


def set_backends(device: torch.device, benchmark: bool = False, deterministic: bool = False,
                 tf32: bool | None = None) -> None:
    """Set the cuDNN/TF32 switches of this process from the trainer's flags; nothing happens on CPU.
    ``tf32`` None leaves PyTorch's TF32 settings as they are."""
    if device.type != "cuda":
        return
    torch.backends.cudnn.benchmark = bool(benchmark)
    torch.backends.cudnn.deterministic = bool(deterministic)
    if tf32 is not None:
        torch.backends.cuda.matmul.allow_tf32 = bool(tf32)
        torch.backends.cudnn.allow_tf32 = bool(tf32)


def loader_kwargs(device: torch.device, workers: int, persistent: bool = False) -> dict[str, Any]:
    """DataLoader keyword arguments: ``num_workers``, ``pin_memory`` on CUDA (pair it with
    :func:`to_device`'s non-blocking copy) and ``persistent_workers`` (only meaningful with workers)."""
    return {"num_workers": int(workers), "pin_memory": device.type == "cuda",
            "persistent_workers": bool(persistent) and int(workers) > 0}


def channels_last_on(device: torch.device, enabled: bool) -> bool:
    """Whether ``--channels_last`` applies: only on CUDA (a channels_last CPU backward has crashed)."""
    return bool(enabled) and device.type == "cuda"


def to_device(x: torch.Tensor, device: torch.device, channels_last: bool = False) -> torch.Tensor:
    """``x`` on ``device`` with a non-blocking copy (safe: the consumer runs on the same stream); a 4-D
    ``x`` (N, C, H, W) in channels_last format when :func:`channels_last_on`. Same values and shape."""
    x = x.to(device, non_blocking=True)
    if x.dim() == 4 and channels_last_on(device, channels_last):
        x = x.contiguous(memory_format=torch.channels_last)
    return x


def prepare_module(module: torch.nn.Module, device: torch.device, channels_last: bool = False,
                   compile: bool = False) -> torch.nn.Module:
    """Apply the module-side speed flags in place: channels_last parameters (CUDA only), then
    ``torch.compile`` of its forward when asked (``Module.compile``: the state-dict keys and attributes
    stay as they are, so checkpoints and DDP unwrapping are unaffected). Returns ``module``."""
    if channels_last_on(device, channels_last):
        module.to(memory_format=torch.channels_last)
    if compile:
        module.compile()
    return module


# ---------------------------------------------------------------------------------------------- SGD + poly
def sgd_momentum(momentum: float, weight_decay: float, momentum_quirk: bool) -> float:
    """The momentum SGD really gets. ``momentum_quirk=True`` reproduces the stage-one and IRN
    references, whose optimizer passes the weight decay positionally into SGD's momentum slot (so the
    momentum equals the weight decay and the nominal 0.9 is only the poly power)."""
    return float(weight_decay) if momentum_quirk else float(momentum)


def poly_sgd(groups: Iterable[dict] | Iterable[torch.nn.Parameter], lr: float, weight_decay: float,
             momentum: float = 0.9, momentum_quirk: bool = False) -> torch.optim.SGD:
    """``torch.optim.SGD`` over ``groups`` (per-group ``lr``/``weight_decay`` override the defaults),
    momentum per :func:`sgd_momentum`. Drive its learning rates with :class:`PolySchedule`."""
    return torch.optim.SGD(groups, lr=lr, momentum=sgd_momentum(momentum, weight_decay, momentum_quirk),
                           weight_decay=weight_decay)


class PolySchedule:
    """The poly rule ``lr_g = max(base_g * (1 - step/max_step) ** power, min_lr)`` for each group g.

    Call :meth:`apply` before the optimizer step of iteration ``step`` (0-based). From ``max_step`` on the
    learning rates are left as they are (the stage-one/IRN references stop updating there).
    """

    def __init__(self, base_lrs: Sequence[float], max_step: int, power: float = 0.9, min_lr: float = 0.0) -> None:
        self.base_lrs = [float(b) for b in base_lrs]
        self.max_step = int(max_step)
        self.power = float(power)
        self.min_lr = float(min_lr)

    @classmethod
    def for_optimizer(cls, optimizer: torch.optim.Optimizer, max_step: int, power: float = 0.9,
                      min_lr: float = 0.0, key: str = "lr") -> "PolySchedule":
        """Base rates read from each group's ``key`` (``lr`` when built, or ``initial_lr``)."""
        return cls([g[key] for g in optimizer.param_groups], max_step, power, min_lr)

    def lrs(self, step: int) -> list[float]:
        return [max(poly_lr(b, step, self.max_step, self.power), self.min_lr) for b in self.base_lrs]

    def apply(self, optimizer: torch.optim.Optimizer, step: int) -> bool:
        """Set the groups' ``lr`` for iteration ``step``; returns False (nothing set) past ``max_step``."""
        if step >= self.max_step:
            return False
        for g, lr in zip(optimizer.param_groups, self.lrs(step)):
            g["lr"] = lr
        return True
