"""Save and load a trainer's full state: model, optimizer, scaler, epoch, step and RNG states.

A training state is a plain dict written atomically (:func:`tools.io.atomic_torch_save`) and read back
with ``weights_only`` plus numpy arrays (:func:`tools.checkpoint.load_torch_file`), so no code in the
file runs. :func:`rng_state` / :func:`set_rng_state` capture python, numpy, torch (CPU) and every CUDA
generator, plus any ``torch.Generator`` the caller names (a DataLoader's shuffling generator), so a
resumed run draws the same numbers as an uninterrupted one; :func:`reseed_epoch` is the alternative
policy of reseeding every epoch. :func:`keep_last` prunes numbered checkpoint files.
"""
from __future__ import annotations

import os
import random
import re
from pathlib import Path
from typing import Any, Iterable, Mapping

import numpy as np
import torch

from tools.errors import DataError

__all__ = ["rng_state", "set_rng_state", "reseed_epoch", "save_training_state", "load_training_state",
           "keep_last", "numbered_files"]


def rng_state(generators: Mapping[str, torch.Generator] | None = None) -> dict[str, Any]:
    """``{'python', 'numpy', 'torch'[, 'cuda'][, 'generators': {name: ByteTensor}]}``."""
    st: dict[str, Any] = {"python": random.getstate(), "numpy": np.random.get_state(),
                          "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        st["cuda"] = torch.cuda.get_rng_state_all()
    if generators:
        st["generators"] = {k: g.get_state() for k, g in generators.items()}
    return st


def set_rng_state(st: Mapping[str, Any], generators: Mapping[str, torch.Generator] | None = None) -> None:
    """Restore what :func:`rng_state` captured. The CUDA states are restored only where CUDA exists;
    a named generator missing from ``st`` (a state written without it) is left as it is."""
    random.setstate(_as_python_state(st["python"]))
    np.random.set_state(st["numpy"])
    torch.set_rng_state(st["torch"])
    if "cuda" in st and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(st["cuda"])
    saved = st.get("generators") or {}
    for k, g in (generators or {}).items():
        if k in saved:
            g.set_state(saved[k])


def reseed_epoch(seed: int, epoch: int, rank: int = 0) -> int:
    """The other RNG policy (BECO's): seed python/numpy/torch afresh for each epoch of each rank, so a
    resumed run repeats exactly the epochs an uninterrupted run would do without storing RNG states.
    Returns the seed used (data augmentation and the loader's generator take it too)."""
    s = (int(seed) * 1000003 + epoch * 1009 + rank * 17) % (2 ** 31)
    random.seed(s)
    np.random.seed(s)
    torch.manual_seed(s)
    return s


def _as_python_state(s: Any) -> tuple:
    # A state that went through a list-only container comes back with lists where random wants tuples.
    if isinstance(s, list):
        s = tuple(s)
    if len(s) == 3 and isinstance(s[1], list):
        s = (s[0], tuple(s[1]), s[2])
    return s


def save_training_state(path: os.PathLike | str, state: Mapping[str, Any], rng: bool = True,
                        generators: Mapping[str, torch.Generator] | None = None) -> None:
    """Write ``state`` (model/optimizer state_dicts, counters, ...) atomically to ``path``, adding
    ``state['rng']`` = :func:`rng_state` (``generators`` included) unless ``rng`` is False."""
    from tools.io import atomic_torch_save

    out = dict(state)
    if rng:
        out["rng"] = rng_state(generators)
    atomic_torch_save(out, path)


def load_training_state(path: os.PathLike | str, what: str, hint: str, required: Iterable[str] = (),
                        written_by: str = "") -> dict[str, Any]:
    """Read a state written by :func:`save_training_state` (or an older trainer's file of the same
    layout) safely; a dict lacking any ``required`` key is a :class:`DataError` naming the path."""
    from tools.checkpoint import load_torch_file

    st = load_torch_file(path, what, hint, numpy=True)
    need = set(required)
    if not isinstance(st, dict) or not need <= set(st):
        missing = sorted(need - set(st)) if isinstance(st, dict) else sorted(need)
        by = f"; it was not written by {written_by}" if written_by else ""
        raise DataError(f"{what} '{path}' lacks the {'/'.join(missing)} entr{'y' if len(missing) == 1 else 'ies'}"
                        f"{by}. {hint[:1].upper() + hint[1:]}.")
    return st


def numbered_files(folder: os.PathLike | str, pattern: str) -> list[tuple[int, Path]]:
    """``(number, path)`` of the files in ``folder`` whose name matches ``pattern``, a regular expression
    with one group holding the number (e.g. ``r"(\\d+)net_main\\.pth"``), sorted by number."""
    rx = re.compile(pattern)
    out = []
    for p in Path(folder).iterdir() if Path(folder).is_dir() else []:
        m = rx.fullmatch(p.name)
        if m and p.is_file():
            out.append((int(m.group(1)), p))
    return sorted(out)


def keep_last(files: Iterable[tuple[int, Path]], current: int, n: int) -> list[Path]:
    """Keep-last-N: delete the numbered files outside ``(current - n, current]`` (older ones, and newer
    ones left by a superseded run); ``n <= 0`` keeps everything. Returns the deleted paths."""
    if n <= 0:
        return []
    gone = []
    for k, p in files:
        if not (current - n < k <= current):
            p.unlink(missing_ok=True)
            gone.append(p)
    return gone
