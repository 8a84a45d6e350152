"""Errors with messages a researcher can act on: the path, what was expected, where to get it."""
from __future__ import annotations

import os
from pathlib import Path


class WSSSError(Exception):
    """Base class of every error this project raises on purpose."""


class MissingFileError(WSSSError, FileNotFoundError):
    """A file or folder the user must provide is absent."""

    def __str__(self) -> str:  # FileNotFoundError would otherwise format errno/filename
        return self.args[0] if self.args else ""


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


def run_cli(fn, args) -> int:
    """Run ``fn(args)`` for a command-line entry point: a :class:`WSSSError` becomes one
    ``error: ...`` line on stderr and exit status 2 (no traceback for user-fixable problems)."""
    import sys

    try:
        fn(args)
    except WSSSError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0
