"""The machine a benchmark ran on, recorded next to its figures by every script in bench/.

A time means little without the load it was taken under: :func:`machine_meta` returns the load average,
the CPU model, the cores this process may use and the threads torch uses, plus the software versions and
(when CUDA is up) the GPU. Call it when the figures are written, so the load matches the run.

:func:`stable_time` is the one timing loop of every script here: it repeats a call until its last few
times agree (or a cap is hit) and says honestly whether they did.
"""
from __future__ import annotations

import os
import platform
import statistics
import time
from typing import Any, Callable

__all__ = ["machine_meta", "cpu_model", "meta_line", "stable_time", "stability_text", "timing_cells", "spread_text", "TIMING_HEADER"]


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo (Linux), else what :mod:`platform` knows."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def machine_meta() -> dict[str, Any]:
    """``{"load_average_1_5_15min": [3 floats] | None, "cpu_model", "cpu_count", "cpu_affinity",
    "torch_threads", "host", "python", "torch", "cuda", "gpu"}`` for the JSON of a benchmark
    (``cuda``/``gpu`` None without a usable CUDA device)."""
    import torch

    load = [round(x, 2) for x in os.getloadavg()] if hasattr(os, "getloadavg") else None
    try:
        affinity = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        affinity = os.cpu_count()
    gpu = None
    if torch.cuda.is_available() and torch.cuda.device_count() > 0:
        props = torch.cuda.get_device_properties(torch.cuda.current_device())
        gpu = {"name": props.name, "memory_bytes": int(props.total_memory),
               "capability": f"{props.major}.{props.minor}", "count": torch.cuda.device_count()}
    return {"load_average_1_5_15min": load, "cpu_model": cpu_model(), "cpu_count": os.cpu_count(),
            "cpu_affinity": affinity, "torch_threads": torch.get_num_threads(), "host": platform.node(),
            "python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
            "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None, "gpu": gpu}


def meta_line(meta: dict[str, Any]) -> str:
    """One printable line of :func:`machine_meta`'s record."""
    load = meta.get("load_average_1_5_15min")
    load_s = "/".join(f"{x:.1f}" for x in load) if load else "n/a"
    gpu = f", GPU {meta['gpu']['name']}" if meta.get("gpu") else ""
    return (f"{meta['cpu_model']}, {meta['cpu_affinity']} of {meta['cpu_count']} cores usable, "
            f"torch {meta['torch']} with {meta['torch_threads']} threads, load average {load_s}{gpu}")


def stable_time(fn: Callable[[], Any], min_repeats: int = 3, max_repeats: int = 10, rel_spread: float = 0.05,
                max_seconds: float | None = None, sync: Callable[[], None] | None = None) -> dict[str, Any]:
    """Time ``fn()`` (already warmed up by the caller) until its times are stable or a cap is hit.

    Rule: after each call, the window is the last ``max(2, min_repeats)`` times and its spread is
    ``(max - min) / median`` of that window. Timing stops as soon as the window is full and its spread is at
    most ``rel_spread``, or when ``max_repeats`` calls were made, or when the calls so far took
    ``max_seconds`` in all (at least one call is always made). ``stable`` is True only when the window was
    full and its spread within ``rel_spread``: a single timing is never stable (``max_repeats=1`` is how a
    call too long to repeat is timed once, and recorded as not stable).
    ``sync`` (e.g. ``torch.cuda.synchronize``) runs inside each timed interval, after the call.

    Returns ``{"median_s", "min_s", "max_s", "spread", "repeats", "stable", "rel_spread_limit", "times_s"}``:
    median/min/max/spread describe the final window (``spread`` None after a single call), ``times_s``
    lists every timed call in order.
    """
    if min_repeats < 1 or max_repeats < 1:
        raise ValueError(f"need min_repeats >= 1 and max_repeats >= 1, got {min_repeats}, {max_repeats}")
    times: list[float] = []
    while True:
        t0 = time.perf_counter()
        fn()
        if sync is not None:
            sync()
        times.append(time.perf_counter() - t0)
        window = times[-max(2, min_repeats):]
        med = statistics.median(window)
        full = len(window) >= max(2, min_repeats)
        # a window of one time has no spread: None, never 0, so it cannot pass as stable
        spread = ((max(window) - min(window)) / med if med > 0 else 0.0) if len(window) > 1 else None
        if (full and spread <= rel_spread) or len(times) >= max_repeats or (
                max_seconds is not None and sum(times) >= max_seconds):
            break
    return {"median_s": med, "min_s": min(window), "max_s": max(window), "spread": spread,
            "repeats": len(times), "stable": bool(full and spread is not None and spread <= rel_spread),
            "rel_spread_limit": rel_spread, "times_s": times}


def stability_text(timing: dict[str, Any]) -> str:
    """``"stable"`` or ``"NOT stable (spread x%)"`` for a :func:`stable_time` record, for the printed tables."""
    if timing["stable"]:
        return "stable"
    if timing["spread"] is None:
        return "NOT stable (1 run, no spread)"
    return f"NOT stable (spread {100 * timing['spread']:.0f}%, {timing['repeats']} run(s))"


TIMING_HEADER = f"{'median s':>9} {'spread':>7}  stability"


def timing_cells(timing: dict[str, Any]) -> str:
    """The median, spread and :func:`stability_text` of a :func:`stable_time` record as table cells
    (aligned with :data:`TIMING_HEADER`)."""
    return f"{timing['median_s']:9.3f} {spread_text(timing):>7}  {stability_text(timing)}"


def spread_text(timing: dict[str, Any]) -> str:
    """The spread of a :func:`stable_time` record in percent, or ``"n/a"`` after a single call."""
    return "n/a" if timing["spread"] is None else f"{100 * timing['spread']:.1f}%"
