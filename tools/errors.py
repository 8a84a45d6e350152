"""Errors with messages a researcher can act on: the path, what was expected, where to get it."""
from __future__ import annotations

import errno
import os
import signal
import sys
import threading
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence


class WSSSError(Exception):
    """Base class of every error this project raises on purpose."""


class MissingFileError(WSSSError, FileNotFoundError):
    """A file or folder the user must provide is absent."""

    def __str__(self) -> str:  # FileNotFoundError would otherwise format errno/filename
        return self.args[0] if self.args else ""


class DeviceError(WSSSError, RuntimeError):
    """The requested ``--device`` is not available on this machine (CUDA missing, index too high)."""


class DataError(WSSSError, ValueError):
    """A file exists but its content is not what was expected (corrupt image, bad list entry, ...)."""


def _message(path: os.PathLike | str, what: str, hint: str, kind: str) -> str:
    msg = f"{what} not found: '{path}' (expected {kind})."
    if hint:
        msg += f" {hint}"
    return msg


def require_file(path: os.PathLike | str, what: str, hint: str = "") -> Path:
    """Return ``Path(path)`` if it is an existing file, else raise :class:`MissingFileError`.

    ``what`` names the file for the user ("stage-one checkpoint"), ``hint`` says where to get it.
    """
    p = Path(path)
    if not p.is_file():
        kind = "a file, but it is a folder" if p.is_dir() else "a file"
        raise MissingFileError(_message(p, what, hint, kind))
    return p


def require_dir(path: os.PathLike | str, what: str, hint: str = "") -> Path:
    """Return ``Path(path)`` if it is an existing folder, else raise :class:`MissingFileError`."""
    p = Path(path)
    if not p.is_dir():
        raise MissingFileError(_message(p, what, hint, "a folder"))
    return p


#: Exit statuses shared by every command-line entry point (argparse also exits 2 on a bad flag).
EXIT_OK, EXIT_ERROR, EXIT_INTERRUPTED = 0, 2, 130
INTERRUPTED_MESSAGE = "interrupted: finished files are complete; rerun the same command to continue"

# errno values of OSErrors a user fixes outside the code (permissions, a full or read-only disk);
# any other OSError is treated as a bug and keeps its traceback.
_USER_FIXABLE_ERRNO = {errno.EACCES: "permission denied", errno.EPERM: "operation not permitted",
                       errno.EROFS: "read-only file system", errno.ENOSPC: "no space left on device",
                       errno.EDQUOT: "disk quota exceeded"}


def _missing(path, what: str, hint: str, kind: str) -> str | None:
    """The message for one requirement (``hint`` appended), or None when it is met. ``path`` may be a
    list of alternatives (met when any exists; the message names the first)."""
    alts = list(path) if isinstance(path, (list, tuple)) else [path]
    if kind == "module":
        import importlib.util

        if any(importlib.util.find_spec(str(m)) is not None for m in alts):
            return None
        msg = f"{what} is not installed (Python module '{alts[0]}')."
        return f"{msg} {hint}" if hint else msg
    test = Path.is_dir if kind == "dir" else Path.is_file
    if any(test(Path(a)) for a in alts):
        return None
    first = Path(alts[0])
    expected = "a folder" if kind == "dir" else ("a file, but it is a folder" if first.is_dir() else "a file")
    return _message(first, what, hint, expected)


def missing_inputs(needs: Iterable[tuple]) -> list[str]:
    """Messages for the unmet entries of ``needs``: ``(path, what, hint)`` or ``(path, what, hint, kind)``
    with kind ``"file"`` (default), ``"dir"`` or ``"module"``; ``path`` None means "not needed".
    A hint already given for an earlier entry is not repeated (several VOC folders, one download)."""
    out: list[str] = []
    given: set[str] = set()
    seen: set[str] = set()  # one entry per path, also when several steps need it
    for n in needs:
        path, what, hint = n[0], n[1], n[2]
        kind = n[3] if len(n) > 3 else "file"
        if path is None:
            continue
        key = str(list(path) if isinstance(path, (list, tuple)) else path)
        if key in seen:
            continue
        seen.add(key)
        m = _missing(path, what, "" if hint in given else hint, kind)
        if m:
            out.append(m if hint not in given else m.rstrip(".") + " (see above)")
            given.add(hint)
    return out


def raise_missing(problems: Sequence[str], context: str = "") -> None:
    """Raise ONE :class:`MissingFileError` listing every message of ``problems`` (nothing if empty).

    ``context`` says what was about to run ("before any IRN step ran"); the message stays on one line
    so that the CLI error is the single ``error: ...`` line.
    """
    problems = list(dict.fromkeys(problems))  # a message given twice is listed once
    if not problems:
        return
    where = f" {context}" if context else ""
    if len(problems) == 1:
        raise MissingFileError(f"{problems[0]} (checked{where})" if context else problems[0])
    listed = " ".join(f"({i}) {m}" + ("" if m.endswith((".", ")")) else ".") for i, m in enumerate(problems, 1))
    raise MissingFileError(f"{len(problems)} required inputs are missing (checked{where}): {listed}")


def require_all(needs: Iterable[tuple], context: str = "") -> None:
    """Check every entry of ``needs`` (see :func:`missing_inputs`) and raise ONE error naming all the
    missing ones, each with where to get it (nothing when all are there)."""
    raise_missing(missing_inputs(needs), context)


def os_error_message(e: OSError) -> str | None:
    """One line for an OSError the user can fix (permissions, full or read-only disk), naming the path;
    None for any other OSError (a bug: it keeps its traceback)."""
    reason = _USER_FIXABLE_ERRNO.get(e.errno)
    if reason is None:
        return None
    name = e.filename
    if name is None:
        return f"{reason} ({e.strerror or e}). Free space or fix the permissions of the output folder and rerun."
    path = Path(os.fsdecode(name))
    if path.name.startswith(".") and path.name.endswith(".tmp"):
        path = path.parent  # an atomic write's temporary file: the folder is what the user fixes
    target = f"'{path}'" + (f" and '{os.fsdecode(e.filename2)}'" if e.filename2 else "")
    if e.errno == errno.ENOSPC or e.errno == errno.EDQUOT:
        fix = "free some space there (or write elsewhere) and rerun"
    elif path.exists() or path == path.parent:
        fix = "make it writable (or choose another output folder) and rerun"
    else:  # a folder or file that could not be created: its nearest existing folder is what to fix
        top = next((p for p in path.parents if p.exists()), path.parent)
        fix = f"make '{top}' writable (or choose another output folder) and rerun"
    return f"{reason}: {target}; {fix}."


class _ParentOnlySigint:
    """While active, Ctrl-C raises KeyboardInterrupt in this process only, and a Ctrl-C that Python
    drops is raised again.

    Ctrl-C reaches the terminal's whole process group, so forked DataLoader and multiprocessing
    workers receive it too and would each print a traceback; a forked worker inherits this handler
    and ignores the signal instead (the parent stops its workers when it unwinds). Executed programs
    get the default handler back, as for any Python-level handler.

    A KeyboardInterrupt raised while Python runs a finaliser or a weakref callback (``__del__``,
    logging's handler clean-up) cannot propagate: Python hands it to ``sys.unraisablehook``, which
    prints "Exception ignored" and drops it, and the job would go on as if Ctrl-C had never been
    pressed. The hook installed here takes such an interrupt instead and sends the signal again a
    moment later, from another thread, so that it is raised where the program can unwind.
    """

    RESEND_S = 0.02

    def __enter__(self) -> "_ParentOnlySigint":
        self.installed = self.active = False
        self.lock = threading.Lock()
        self.timers: list[threading.Timer] = []
        if threading.current_thread() is threading.main_thread():
            self.pid = os.getpid()
            self.old = signal.signal(signal.SIGINT, self._handle)
            self.old_hook, sys.unraisablehook = sys.unraisablehook, self._unraisable
            self.installed = self.active = True
        return self

    def _handle(self, signum, frame) -> None:
        if os.getpid() == self.pid and self.active:
            raise KeyboardInterrupt
        # else: a forked worker, or a resend that arrives while the context is closing

    def _unraisable(self, unraisable: Any) -> None:
        exc_type = getattr(unraisable, "exc_type", None)
        if not (os.getpid() == self.pid and isinstance(exc_type, type) and issubclass(exc_type, KeyboardInterrupt)):
            return self.old_hook(unraisable)
        with self.lock:
            if self.active:
                t = threading.Timer(self.RESEND_S, self._resend)
                t.daemon = True
                self.timers.append(t)
                t.start()

    def _resend(self) -> None:
        with self.lock:  # __exit__ takes the lock: nothing is sent once it has begun
            if self.active:
                os.kill(self.pid, signal.SIGINT)

    def __exit__(self, *exc) -> None:
        if self.installed:
            with self.lock:
                self.active = False
                for t in self.timers:
                    t.cancel()
            # a signal sent just before the lock was taken is handled (and ignored: inactive) by the
            # time signal.signal returns, which checks pending signals before it changes the handler
            sys.unraisablehook = self.old_hook
            signal.signal(signal.SIGINT, self.old)


def _end_progress_bars() -> None:
    """Close the progress bars a stopped step left open, so its message starts a line of its own (a bar
    leaves the cursor after its last drawing, with no newline)."""
    bar_cls = getattr(sys.modules.get("tqdm"), "tqdm", None)  # never import tqdm just for this
    for bar in list(getattr(bar_cls, "_instances", None) or ()):
        try:
            bar.close()
        except Exception:  # a half-torn-down bar must not hide the message it is closed for
            pass


def run_cli(fn: Callable[[Any], Any], args: Any) -> int:
    """Run ``fn(args)`` for a command-line entry point and return its exit status.

    The one error path of every CLI: a :class:`WSSSError` or a user-fixable OSError (see
    :func:`os_error_message`) becomes one ``error: ...`` line on stderr and status 2; Ctrl-C becomes
    one ``interrupted: ...`` line (from rank 0 only under torchrun) and status 130 (no traceback, also
    not from forked workers).
    Anything else is a bug and propagates with its traceback.
    """
    try:
        with _ParentOnlySigint():
            fn(args)
    except WSSSError as e:
        _end_progress_bars()
        print(f"error: {e}", file=sys.stderr, flush=True)
        return EXIT_ERROR
    except KeyboardInterrupt:
        _end_progress_bars()
        # under torchrun every rank gets the Ctrl-C: rank 0 speaks for all of them
        if os.environ.get("RANK", "0") in ("", "0"):
            print(INTERRUPTED_MESSAGE, file=sys.stderr, flush=True)
        return EXIT_INTERRUPTED
    except OSError as e:
        msg = os_error_message(e)
        if msg is None:
            raise
        _end_progress_bars()
        print(f"error: {msg}", file=sys.stderr, flush=True)
        return EXIT_ERROR
    return EXIT_OK
