"""Atomic writes: every output is written to a temporary file in the same folder and then
``os.replace``d, so an interrupted job never leaves a half-written file a later stage would read.

Temporary files are named ``.<final name>.<pid>@<host>.<random>.tmp`` so that a cleanup can tell
whether the process writing one is still alive (:func:`is_stale_temp`). They are created with the
mode a plain ``open`` would give (``0666`` less the umask), so outputs on shared storage stay
readable for colleagues. A write that fails for lack of space, quota or permission raises
:class:`OutputWriteError` naming the destination, with the temporary file removed.
"""
from __future__ import annotations

import contextlib
import json
import os
import re
import secrets
import socket
import time
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from tools.errors import WSSSError, os_error_message

#: A temporary file without a writer pid (older versions), or written on another host, counts as
#: left over by a dead writer once it has not been modified for this long.
STALE_TEMP_AGE_S = 10 * 60

_HOST = re.sub(r"[^A-Za-z0-9-]", "-", socket.gethostname().split(".")[0])[:32] or "host"
# .<final>.<pid>@<host>.<random>.tmp ; the final name may itself contain dots
_TEMP_RE = re.compile(r"^\.(?P<final>.+)\.(?P<pid>\d+)@(?P<host>[A-Za-z0-9-]+)\.(?P<rand>[A-Za-z0-9_]+)\.tmp$")
_OLD_TEMP_RE = re.compile(r"^\.(?P<final>.+)\.(?P<rand>[A-Za-z0-9_]+)\.tmp$")


class OutputWriteError(WSSSError, OSError):
    """An output could not be written (no space, quota, read-only file system, no permission)."""

    def __str__(self) -> str:  # OSError would otherwise format errno/filename
        return self.args[0] if self.args else ""


def _write_failure(exc: BaseException, path: Path) -> OutputWriteError | None:
    """The user-facing error for a failed write of ``path``, or ``None`` if ``exc`` is not one."""
    if isinstance(exc, OutputWriteError):
        return None
    if isinstance(exc, OSError):
        reason = os_error_message(exc)  # None unless no space / quota / read-only / permission
        if reason is None:
            return None
    elif isinstance(exc, RuntimeError) and re.search(r"basic_ios|iostream error|file write failed|"
                                                     r"PytorchStreamWriter failed", str(exc)):
        # torch.save reports a failed write without an errno; a full disk is by far the usual reason
        try:
            full = os.statvfs(path.parent).f_bavail == 0
        except OSError:
            full = False
        detail = " ".join(str(exc).split())[:120]
        reason = ("no space left on device; free some space there (or write elsewhere) and rerun" if full else
                  f"the write failed ({detail}); check free space and quota of that file system and rerun")
    else:
        return None
    return OutputWriteError(f"cannot write '{path}': {reason.rstrip('.')} (no partial file was left).")


def _create_temp(path: Path) -> Path:
    # os.open with 0o666 lets the umask (and a folder's default ACL) decide the mode, as a plain open
    # would; tempfile.mkstemp would force 0600.
    for _ in range(100):
        tmp = path.parent / f".{path.name}.{os.getpid()}@{_HOST}.{secrets.token_hex(4)}.tmp"
        try:
            os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
            return tmp
        except FileExistsError:
            continue
    raise FileExistsError(f"no free temporary name for '{path}'")


@contextlib.contextmanager
def atomic_path(path: os.PathLike | str) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success rename it onto ``path``.

    On any exception (including KeyboardInterrupt) the temporary file is removed and ``path`` is
    untouched; a failed write (no space, quota, read-only, permission; torch's ``iostream error``)
    becomes :class:`OutputWriteError` naming ``path``. The temporary name is hidden and ends in
    ``.tmp`` so that a reader globbing ``*.npy``/``*.png`` never sees it, even after a SIGKILL;
    writers must therefore name the format explicitly (file handles for np.save, ``format=`` for PIL).
    """
    path = Path(path)
    tmp_path: Path | None = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp_path = _create_temp(path)
        yield tmp_path
        os.replace(tmp_path, path)
    except BaseException as e:
        if tmp_path is not None:
            with contextlib.suppress(FileNotFoundError):
                tmp_path.unlink()
        failure = _write_failure(e, path)
        if failure is not None:
            raise failure from e
        raise


def temp_final_name(tmp: os.PathLike | str) -> str | None:
    """The final file name a temporary file of :func:`atomic_path` stands for (``None`` if ``tmp``
    is not named like one)."""
    name = Path(tmp).name
    m = _TEMP_RE.match(name) or _OLD_TEMP_RE.match(name)
    return m.group("final") if m else None


def proc_stat_fields(pid: int | str) -> list[str] | None:
    """The fields of ``/proc/<pid>/stat`` after ``pid (comm)``: state (``Z`` for a zombie), ppid, pgrp, ...;
    ``None`` where it cannot be read (no such process, or no ``/proc``)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rpartition(")")[2].split()
    except OSError:
        return None


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    # A zombie (a killed writer nobody has reaped yet) still answers the signal but writes nothing.
    fields = proc_stat_fields(pid)
    return fields is None or fields[:1] != ["Z"]


def is_stale_temp(tmp: os.PathLike | str, max_age_s: float = STALE_TEMP_AGE_S) -> bool:
    """Whether a temporary file of :func:`atomic_path` was left by a writer that is gone.

    A name carrying this host and a pid is stale exactly when that process no longer exists (a live
    writer's file must not be removed under it: its ``os.replace`` would fail). A name without a pid
    (older versions) or from another host is stale once unmodified for ``max_age_s`` seconds.
    Names that are not temporary files of ``atomic_path`` are never stale.
    """
    tmp = Path(tmp)
    m = _TEMP_RE.match(tmp.name)
    if m and m.group("host") == _HOST:
        return not _pid_alive(int(m.group("pid")))
    if not (m or _OLD_TEMP_RE.match(tmp.name)):
        return False
    try:
        return time.time() - tmp.stat().st_mtime > max_age_s
    except FileNotFoundError:
        return False


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
