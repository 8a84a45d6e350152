"""Atomic writes: every output is written to a temporary file in the same folder and then
``os.replace``d, so an interrupted job never leaves a half-written file a later stage would read."""
from __future__ import annotations

import contextlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any, Iterator

import numpy as np


@contextlib.contextmanager
def atomic_path(path: os.PathLike | str, suffix: str | None = None) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success rename it onto ``path``.

    On any exception (including KeyboardInterrupt) the temporary file is removed and ``path`` is
    untouched. The temporary name is hidden and ends in ``.tmp`` so that a reader globbing
    ``*.npy``/``*.png`` never sees it, even after a SIGKILL; writers must therefore name the format
    explicitly (file handles for np.save, ``format=`` for PIL).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp" if suffix is None else suffix,
                               dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        os.replace(tmp_path, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp_path.unlink()
        raise


def atomic_write_bytes(path: os.PathLike | str, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically."""
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())


def atomic_save_npy(path: os.PathLike | str, obj: Any, allow_pickle: bool = True) -> None:
    """``np.save`` ``obj`` (an array, or a dict saved as a 0-d object array like the reference) atomically."""
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            np.save(f, obj, allow_pickle=allow_pickle)


def atomic_torch_save(obj: Any, path: os.PathLike | str) -> None:
    """``torch.save`` atomically (checkpoints)."""
    import torch

    with atomic_path(path) as tmp:
        torch.save(obj, tmp)


def atomic_write_json(path: os.PathLike | str, obj: Any, indent: int = 2) -> None:
    """Write ``obj`` as JSON atomically (numpy scalars/arrays converted)."""
    def default(o: Any) -> Any:
        if isinstance(o, np.ndarray):
            return o.tolist()
        if isinstance(o, np.generic):
            return o.item()
        if isinstance(o, Path):
            return str(o)
        raise TypeError(f"not JSON serialisable: {type(o)}")

    atomic_write_bytes(path, (json.dumps(obj, indent=indent, default=default) + "\n").encode())


def atomic_write_text(path: os.PathLike | str, text: str) -> None:
    """Write a text file atomically."""
    atomic_write_bytes(path, text.encode())


def save_png(path: os.PathLike | str, arr: np.ndarray, palette: np.ndarray | None = None) -> None:
    """Save a uint8 array (HxW, HxWx3 or HxWx4) as PNG atomically; with ``palette`` (256x3 uint8)
    a 2-D array is written as a palette ('P') image whose pixel values are the indices."""
    from PIL import Image

    arr = np.asarray(arr)
    if arr.dtype != np.uint8:
        raise ValueError(f"save_png expects uint8, got {arr.dtype} for {path}")
    im = Image.fromarray(arr)
    if palette is not None:
        if arr.ndim != 2:
            raise ValueError("a palette PNG needs a 2-D index array")
        im = im.convert("P")  # from mode 'L' this keeps the values as indices
        im.putpalette(np.asarray(palette, dtype=np.uint8).reshape(-1).tolist())
    with atomic_path(path) as tmp:
        im.save(tmp, format="PNG")
