"""argparse ``type=`` validators shared by every command-line entry point.

A value outside its natural range is refused while the command line is parsed, so argparse prints
its usual usage line plus one ``error: argument --flag: ...`` line and exits with status 2, before
any data is read or any network is built. Each validator returns the converted value (so defaults
and accepted spellings are unchanged) or raises :class:`argparse.ArgumentTypeError`.
"""
from __future__ import annotations

import argparse
import math
import re
from typing import Any, Callable, Mapping

__all__ = ["positive_int", "nonneg_int", "positive_float", "nonneg_float", "fraction", "device", "str2bool",
           "int_at_least", "int_range", "float_range", "DEVICE_HELP", "add_compat_flags"]

DEVICE_HELP = "auto | cpu | cuda | cuda:N"
_DEVICE = re.compile(r"^(auto|cpu|cuda(:\d+)?)$")


def _number(conv: Callable[[str], float], kind: str, s: str):
    try:
        v = conv(s)
    except (TypeError, ValueError):
        raise argparse.ArgumentTypeError(f"expected {kind}, got {s!r}") from None
    if isinstance(v, float) and not math.isfinite(v):
        raise argparse.ArgumentTypeError(f"expected a finite number, got {s!r}")
    return v


def int_at_least(lo: int, meaning: str = "") -> Callable[[str], int]:
    """``type=`` for an integer ``>= lo``; ``meaning`` is added to the message (e.g. "0 = off")."""
    def conv(s: str) -> int:
        v = _number(int, "an integer", s)
        if v < lo:
            extra = f" ({meaning})" if meaning else ""
            raise argparse.ArgumentTypeError(f"must be an integer >= {lo}{extra}, got {s!r}")
        return v
    conv.__name__ = f"int>={lo}"
    return conv


def int_range(lo: int, hi: int) -> Callable[[str], int]:
    """``type=`` for an integer in ``lo..hi`` (both included)."""
    def conv(s: str) -> int:
        v = _number(int, "an integer", s)
        if not lo <= v <= hi:
            raise argparse.ArgumentTypeError(f"must be an integer in {lo}..{hi}, got {s!r}")
        return v
    conv.__name__ = f"int in {lo}..{hi}"
    return conv


def float_range(lo: float | None = None, hi: float | None = None, lo_open: bool = False,
                hi_open: bool = False) -> Callable[[str], float]:
    """``type=`` for a finite float in the interval given by ``lo``/``hi`` (None = unbounded; ``*_open``
    excludes the bound)."""
    left = "(" if lo_open else "["
    right = ")" if hi_open else "]"
    interval = f"{left}{'-inf' if lo is None else f'{lo:g}'}, {'inf' if hi is None else f'{hi:g}'}{right}"
    if lo is not None and lo_open and hi is None:
        wanted = f"a number > {lo:g}"
    elif lo is not None and hi is None:
        wanted = f"a number >= {lo:g}"
    else:
        wanted = f"a number in {interval}"

    def conv(s: str) -> float:
        v = _number(float, "a number", s)
        bad = ((lo is not None and (v < lo or (lo_open and v == lo)))
               or (hi is not None and (v > hi or (hi_open and v == hi))))
        if bad:
            raise argparse.ArgumentTypeError(f"must be {wanted}, got {s!r}")
        return v
    conv.__name__ = f"float in {interval}"
    return conv


#: integer > 0 (batch sizes, epochs, widths, crop sizes)
positive_int = int_at_least(1)
#: integer >= 0 (workers, threads where 0 means "default", seeds)
nonneg_int = int_at_least(0)
#: float > 0 (learning rates, scales, width multipliers)
positive_float = float_range(0.0, lo_open=True)
#: float >= 0 (loss weights, weight decay)
nonneg_float = float_range(0.0)
#: float in [0, 1] (thresholds on normalised scores, fractions)
fraction = float_range(0.0, 1.0)


def device(s: str) -> str:
    """``--device``: ``auto``, ``cpu``, ``cuda`` or ``cuda:N`` (case-insensitive; returned lower-case).

    Whether CUDA is present is checked when the device is opened (``tools.misc.get_device``), not
    here: parsing must stay fast and must not import torch.
    """
    v = str(s).strip().lower()
    if not _DEVICE.match(v):
        raise argparse.ArgumentTypeError(f"expected {DEVICE_HELP}, got {s!r}")
    return v


def str2bool(v: str | bool) -> bool:
    """Booleans: accepts true/false, 1/0, yes/no, on/off (case-insensitive); a bool passes through."""
    if isinstance(v, bool):
        return v
    s = str(v).strip().lower()
    if s in ("1", "true", "t", "yes", "y", "on"):
        return True
    if s in ("0", "false", "f", "no", "n", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected a boolean (true/false), got {v!r}")


def add_compat_flags(parser: argparse.ArgumentParser, flags: Mapping[str, Mapping[str, Any]]) -> None:
    """Register reference flags that do nothing in this implementation: a reference command line still
    parses (same type, ``nargs`` and default, so the parsed namespace and logged settings are unchanged),
    but ``--help`` does not show them.

    ``flags``: ``{"--flag": add_argument keyword arguments}``, e.g. ``{"--lr": dict(type=float, default=0.01)}``.
    """
    for flag, kwargs in flags.items():
        parser.add_argument(flag, help=argparse.SUPPRESS, **dict(kwargs))
