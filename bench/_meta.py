"""The machine a benchmark ran on, recorded next to its figures by every script in bench/.

A time means little without the load it was taken under: :func:`machine_meta` returns the load average,
the CPU model, the cores this process may use and the threads torch uses, plus the software versions and
(when CUDA is up) the GPU. Call it when the figures are written, so the load matches the run.
"""
from __future__ import annotations

import os
import platform
from typing import Any

__all__ = ["machine_meta", "cpu_model", "meta_line"]


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
