"""Console + file logging and a tensorboard writer that is silent where it should be."""
from __future__ import annotations

import logging
import os
import sys
from pathlib import Path
from typing import Any


def setup_logger(log_file: str | os.PathLike | None = None, name: str = "wsss",
                 level: int = logging.INFO) -> logging.Logger:
    """Logger writing plain messages to stdout and, when given, to ``log_file`` (appended)."""
    logger = logging.getLogger(name)
    logger.setLevel(level)
    logger.propagate = False
    for h in list(logger.handlers):
        logger.removeHandler(h)
        h.close()
    fmt = logging.Formatter("%(message)s")
    sh = logging.StreamHandler(sys.stdout)
    sh.setFormatter(fmt)
    logger.addHandler(sh)
    if log_file is not None:
        Path(log_file).parent.mkdir(parents=True, exist_ok=True)
        fh = logging.FileHandler(log_file)
        fh.setFormatter(logging.Formatter("%(asctime)s %(message)s"))
        logger.addHandler(fh)
    return logger


class TBWriter:
    """``SummaryWriter`` wrapper; a no-op when disabled (non-zero rank) or tensorboard is missing."""

    def __init__(self, log_dir: str | os.PathLike, enabled: bool = True) -> None:
        self._w = None
        if enabled:
            try:
                from torch.utils.tensorboard import SummaryWriter
                self._w = SummaryWriter(str(log_dir))
            except Exception:  # tensorboard absent: logging to file still happens
                self._w = None

    def scalar(self, tag: str, value: Any, step: int) -> None:
        if self._w is not None:
            self._w.add_scalar(tag, float(value), step)

    def scalars(self, values: dict[str, Any], step: int, prefix: str = "") -> None:
        for k, v in values.items():
            self.scalar(prefix + k, v, step)

    def image(self, tag: str, img: Any, step: int, dataformats: str = "HWC") -> None:
        if self._w is not None:
            self._w.add_image(tag, img, step, dataformats=dataformats)

    def close(self) -> None:
        if self._w is not None:
            self._w.close()
