"""Seeding, device choice, the poly learning-rate rule and a step timer."""
from __future__ import annotations

import random
import time
from typing import Iterator
import contextlib

import numpy as np
import torch


def seed_everything(seed: int) -> None:
    """Seed Python, numpy and torch (CPU and CUDA)."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    if torch.cuda.is_available():
        torch.cuda.manual_seed_all(seed)


def get_device(name: str | None = "auto") -> torch.device:
    """``'auto'``/None -> cuda when available else cpu; otherwise ``torch.device(name)``.

    Asking for cuda on a machine without it is an error, not a silent CPU fallback.
    """
    if name in (None, "", "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    from tools.errors import DeviceError

    try:
        dev = torch.device(name)
    except RuntimeError as e:
        raise DeviceError(f"--device {name}: not a device name (expected auto | cpu | cuda | cuda:N)") from e
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise DeviceError(f"--device {name} requested but CUDA is not available; use --device cpu")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise DeviceError(f"--device {name}: this machine has {torch.cuda.device_count()} CUDA device(s) "
                          f"(cuda:0 .. cuda:{torch.cuda.device_count() - 1})")
    return dev


def poly_lr(base_lr: float, step: int, max_step: int, power: float = 0.9) -> float:
    """``base_lr * (1 - step/max_step) ** power`` (clamped at 0 past ``max_step``)."""
    frac = min(max(step / float(max_step), 0.0), 1.0) if max_step > 0 else 1.0
    return base_lr * (1.0 - frac) ** power


from tools.cli import str2bool  # noqa: E402,F401 - argparse types live in tools/cli.py; kept importable here


@contextlib.contextmanager
def Timer(name: str, printer=print) -> Iterator[None]:
    """Print ``name`` at start and its wall time at the end."""
    printer(f"step: {name}")
    t0 = time.perf_counter()
    try:
        yield
    finally:
        printer(f"step: {name} done in {time.perf_counter() - t0:.1f}s")


def backward_step(loss: torch.Tensor, optimizer: torch.optim.Optimizer, scaler=None) -> None:
    """Backward and optimizer step, through a ``torch.amp.GradScaler`` when one is given (fp16 AMP).
    The caller zeroes the gradients before its forward."""
    if scaler is not None:
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
    else:
        loss.backward()
        optimizer.step()
