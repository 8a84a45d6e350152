"""Small helpers shared by the IRN steps: per-image output paths, CAM-file IO, per-GPU fan-out."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch

from tools.errors import DataError
from tools.io import atomic_save_npy
from voc12.dataset import VOC12

CAM_HINT = "run the make_cam step first (python run_sample.py --make_cam_pass true)"


def per_id(out_dir: os.PathLike | str, *suffixes: str) -> Callable[[str], list[Path]]:
    """``id -> [<out_dir>/<id><suffix>, ...]``: a step's per-image outputs (for tools.provenance)."""
    out_dir = Path(out_dir)
    return lambda i: [out_dir / f"{i}{s}" for s in suffixes]


def save_cam_dict(path: os.PathLike | str, keys: np.ndarray, cam: np.ndarray, high_res: np.ndarray) -> None:
    """``cam/<id>.npy``: pickled dict of plain numpy arrays ``keys`` int64 (C,) fg indices 0..19,
    ``cam`` float32 (C, ceil(H/4), ceil(W/4)), ``high_res`` float32 (C, H, W) (no torch tensors)."""
    atomic_save_npy(path, {"keys": np.asarray(keys, dtype=np.int64), "cam": np.asarray(cam, dtype=np.float32),
                           "high_res": np.asarray(high_res, dtype=np.float32)})


def load_cam_dict(path: os.PathLike | str, num_fg: int = VOC12.num_fg) -> dict[str, np.ndarray]:
    """Read a ``cam/<id>.npy`` (ours or the reference's, whose ``keys``/``cam`` are torch tensors).

    Returns plain numpy ``keys`` int64 (C,), ``cam`` (C, ceil(H/4), ceil(W/4)), ``high_res`` (C, H, W).
    The pickle is read with the restricted unpickler of :mod:`tools.safe_load` (tensors rebuilt with
    ``weights_only``; no code in the file runs). Inconsistent shapes, keys outside 0..num_fg-1 (the dataset's
    foreground classes) and NaN/inf
    are errors naming the file.
    """
    from tools.safe_load import load_npy, require_finite

    what = "IRN CAM file"
    d = load_npy(path, what, CAM_HINT, holds="a dict {keys, cam, high_res} of arrays or tensors",
                 torch_tensors=True)
    redo = f"{CAM_HINT} with --overwrite"
    if not isinstance(d, dict):
        raise DataError(f"{what} '{path}' holds a {type(d).__name__}; expected np.save of a dict "
                        f"{{keys, cam, high_res}}. {redo}")
    out = {}
    for k in ("keys", "cam", "high_res"):
        if k not in d:
            raise DataError(f"{what} '{path}' has no '{k}' entry (keys: {sorted(map(str, d))}); {redo}")
        v = d[k]
        v = v.cpu().numpy() if isinstance(v, torch.Tensor) else v
        if not isinstance(v, np.ndarray) or v.dtype.kind not in "fiu":
            raise DataError(f"{what} '{path}' entry '{k}' is a {type(v).__name__}"
                            f"{' of ' + str(v.dtype) if isinstance(v, np.ndarray) else ''}; expected a numeric "
                            f"array. {redo}")
        out[k] = v
    keys, cam, high = out["keys"], out["cam"], out["high_res"]
    if keys.ndim != 1 or keys.dtype.kind not in "iu" or (keys.size and not (0 <= keys.min() and keys.max() < num_fg)):
        raise DataError(f"{what} '{path}': 'keys' must be a 1-D integer array of class indices 0..{num_fg - 1}, got "
                        f"{keys.dtype} {keys.shape} {keys.tolist()[:8]}. {redo}")
    c = len(keys)
    ok = cam.ndim == 3 and high.ndim == 3 and cam.shape[0] == c and high.shape[0] == c
    if ok:
        _, h, w = high.shape
        ok = cam.shape[1:] == (-(-h // 4), -(-w // 4))
    if not ok:
        raise DataError(f"{what} '{path}' has inconsistent shapes: keys ({c},), cam {cam.shape}, high_res "
                        f"{high.shape}; expected cam (C, ceil(H/4), ceil(W/4)) and high_res (C, H, W) with C = "
                        f"len(keys). {redo}")
    for k in ("cam", "high_res"):
        require_finite(out[k], path, what, f"entry '{k}'", redo)
    out["keys"] = keys.astype(np.int64)
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
        from tools.runtime import spawn_per_gpu

        spawn_per_gpu(_spawn_entry, min(len(gpus), len(ids)), (fn, gpus[:len(ids)], ids, args))
    else:
        fn(ids, args, torch.device("cuda", gpus[0]) if gpus else device, 0)


def mp_start_method() -> str:
    """``fork`` where available (workers start instantly and inherit imports, as DataLoader does;
    they run numpy/CRF code only), else ``spawn``."""
    import multiprocessing as mp

    return "fork" if "fork" in mp.get_all_start_methods() else "spawn"
