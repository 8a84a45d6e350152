"""Small helpers shared by the IRN steps: pending-output filtering, CAM-file IO, per-GPU fan-out."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch

from tools.errors import DataError, require_file
from tools.io import atomic_save_npy

CAM_HINT = "run the make_cam step first (python run_sample.py --make_cam_pass true)"


def pending(ids: Sequence[str], out_dir: os.PathLike | str, suffix: str, overwrite: bool) -> list[str]:
    """Ids whose ``<out_dir>/<id><suffix>`` does not exist yet (all ids with ``overwrite``)."""
    if overwrite:
        return list(ids)
    out_dir = Path(out_dir)
    return [i for i in ids if not (out_dir / f"{i}{suffix}").exists()]


def save_cam_dict(path: os.PathLike | str, keys: np.ndarray, cam: np.ndarray, high_res: np.ndarray) -> None:
    """``cam/<id>.npy``: pickled dict of plain numpy arrays ``keys`` int64 (C,) fg indices 0..19,
    ``cam`` float32 (C, ceil(H/4), ceil(W/4)), ``high_res`` float32 (C, H, W) (no torch tensors)."""
    atomic_save_npy(path, {"keys": np.asarray(keys, dtype=np.int64), "cam": np.asarray(cam, dtype=np.float32),
                           "high_res": np.asarray(high_res, dtype=np.float32)})


def load_cam_dict(path: os.PathLike | str) -> dict[str, np.ndarray]:
    """Read a ``cam/<id>.npy`` (ours or the reference's, whose ``keys``/``cam`` are torch tensors)."""
    p = require_file(path, "IRN CAM file", CAM_HINT)
    try:
        d = np.load(p, allow_pickle=True).item()
    except Exception as e:
        raise DataError(f"cannot read CAM file '{p}': {e}; expected np.save of a dict {{keys, cam, high_res}}. "
                        f"Re-create it with --overwrite.") from e
    out = {}
    for k in ("keys", "cam", "high_res"):
        if k not in d:
            raise DataError(f"CAM file '{p}' has no '{k}' entry (keys: {sorted(d)}); {CAM_HINT} with --overwrite")
        v = d[k]
        out[k] = v.cpu().numpy() if isinstance(v, torch.Tensor) else np.asarray(v)
    out["keys"] = out["keys"].astype(np.int64)
    return out


def cuda_devices(device: torch.device) -> list[int]:
    """GPU indices to fan out over: all visible GPUs for ``cuda`` without an index, else none."""
    if device.type != "cuda":
        return []
    if device.index is not None:
        return [device.index]
    return list(range(torch.cuda.device_count()))


def _spawn_entry(rank: int, fn: Callable, gpus: list[int], ids: list[str], args: Any) -> None:
    torch.cuda.set_device(gpus[rank])
    fn(ids[rank::len(gpus)], args, torch.device("cuda", gpus[rank]), rank)


def run_split(fn: Callable[[list[str], Any, torch.device, int], None], ids: Sequence[str], args: Any,
              device: torch.device) -> None:
    """Run ``fn(ids_part, args, device, rank)`` once per GPU (spawned processes, interleaved
    ``i::n`` split) or once in-process on CPU / a single device."""
    gpus = cuda_devices(device)
    ids = list(ids)
    if len(gpus) > 1 and len(ids) > 1:
        import torch.multiprocessing as mp

        mp.spawn(_spawn_entry, nprocs=min(len(gpus), len(ids)), args=(fn, gpus[:len(ids)], ids, args), join=True)
    else:
        fn(ids, args, torch.device("cuda", gpus[0]) if gpus else device, 0)


def mp_start_method() -> str:
    """``fork`` where available (workers start instantly and inherit imports, as DataLoader does;
    they run numpy/CRF code only), else ``spawn``."""
    import multiprocessing as mp

    return "fork" if "fork" in mp.get_all_start_methods() else "spawn"
