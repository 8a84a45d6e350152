"""Multi-scale + flip CAM inference of stage one and what infer.py / training's
validation do with the result: CAM overlays and CRF dictionaries, as the reference writes them.

Output format (the reference ``infer.py --dict``): ``{class index k (int, 0..19): float32 (H, W)}`` for
every class with ``label[k] > 1e-5``, keys ascending, values in [0, 1), saved with ``np.save`` as a
pickled 0-d object array.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from voc12.dataset import VOC_CLASSES
from tools.runtime import autocast

LABEL_EPS = 1e-5  # reference: a class is present when label[k] > 1e-5
NORM_EPS = 1e-5  # reference: cam / (spatial max + 1e-5)
#: CRF settings of the reference infer.py: unary -log(clip(p)), Gaussian 3/3, bilateral 80/13/10.
CRF_PARAMS = dict(n_iter=10, gauss_sxy=3, gauss_compat=3, bil_sxy=80, bil_srgb=13, bil_compat=10)


def _as_batch(x: torch.Tensor | np.ndarray) -> torch.Tensor:
    t = torch.as_tensor(x)
    return t if t.dim() == 4 else t.unsqueeze(0)


def raw_cam(net: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Raw class maps ``(B, C, h, w)``: ``net(x)[0]``, through ``forward_cam`` when the network has it
    (identical values: the cam is computed before the GPP head, which it skips)."""
    fwd = getattr(net, "forward_cam", None)
    if fwd is None and hasattr(net, "module"):  # DataParallel / DDP wrapper
        fwd = getattr(net.module, "forward_cam", None)
    return fwd(x) if fwd is not None else net(x)[0]


def msf_cam(net: torch.nn.Module, inputs: Sequence[torch.Tensor | np.ndarray],
            label: torch.Tensor | np.ndarray, size: tuple[int, int] | None = None,
            amp: bool = False, batch_same_shape: bool | None = None) -> dict[int, np.ndarray]:
    """Multi-scale + flip CAM of one image (reference ``infer_multi``).

    net: the stage-one network in eval mode (dropout off); its device is used.
    inputs: ``[s0, s0 flipped, s1, s1 flipped, ...]`` float32 ``(3, h_s, w_s)`` or ``(1, 3, h_s, w_s)``;
        odd positions are horizontally flipped copies (``voc12.data.msf_inputs``).
    label: ``(C,)`` multi-hot; size: original ``(H, W)`` (default: the shape of ``inputs[2]``, the
        unflipped scale-1.0 input, as the reference).
    Per input: cam -> bilinear (align_corners=False) to (H, W) -> ReLU -> x label -> flip back if flipped;
    the 8 maps are summed and each class divided by (its max + 1e-5).
    ``batch_same_shape``: run inputs of equal shape (a scale and its flip) as one batch; the values equal
    the one-by-one loop up to float rounding (~1e-7 relative). Default: on CUDA only; on a CPU the
    one-by-one loop was faster at equal output and equal peak memory (bench/infer_speed.py: 1.35x at
    width 0.25 on 2 cores).
    Returns ``{k: float32 (H, W)}`` for classes with ``label[k] > 1e-5``, keys ascending; ``{}`` if none.
    """
    label_np = np.asarray(torch.as_tensor(label).detach().cpu(), dtype=np.float32).reshape(-1)
    keys = [int(k) for k in np.flatnonzero(label_np > LABEL_EPS)]
    if not keys:
        return {}
    batches = [_as_batch(x) for x in inputs]
    if size is None:
        size = tuple(batches[2 if len(batches) > 2 else 0].shape[-2:])
    size = (int(size[0]), int(size[1]))
    device = next(net.parameters()).device
    if batch_same_shape is None:
        batch_same_shape = device.type == "cuda"
    sel = torch.as_tensor(keys, device=device)
    lab = torch.as_tensor(label_np[keys], device=device).view(1, -1, 1, 1)

    # group inputs by shape (a scale and its flip share one) keeping the reference order in the sum
    groups: dict[tuple, list[int]] = {}
    for i, b in enumerate(batches):
        key = tuple(b.shape[-2:]) if batch_same_shape else (i,)
        groups.setdefault(key, []).append(i)
    maps: list[torch.Tensor | None] = [None] * len(batches)
    with torch.inference_mode():
        for idx in groups.values():
            x = torch.cat([batches[i] for i in idx]).to(device, non_blocking=True).float()
            with autocast(device, amp):
                cam = raw_cam(net, x)
            cam = cam.float().index_select(1, sel)  # only the labelled classes are ever used
            cam = F.interpolate(cam, size=size, mode="bilinear", align_corners=False)
            cam = F.relu(cam) * lab
            for j, i in enumerate(idx):
                maps[i] = cam[j].flip(-1) if i % 2 == 1 else cam[j]
        total = maps[0].clone()
        for m in maps[1:]:
            total += m
        total = total / (total.amax(dim=(1, 2), keepdim=True) + NORM_EPS)
        out = total.cpu().numpy().astype(np.float32, copy=False)
    return {k: out[j] for j, k in enumerate(keys)}


# ----------------------------------------------------------------------------------------------
# Visualisation and CRF (run on the writer thread of models/cam_infer.py; numpy/matplotlib only)
# ----------------------------------------------------------------------------------------------

def overlay_path(folder: os.PathLike | str, tag: int, img_id: str, k: int,
                 class_names: Sequence[str] = VOC_CLASSES) -> Path:
    """Reference name: ``<folder>/<tag:03d>_<id>_cam_<classname>.png`` (``class_names``: the dataset's
    foreground names; a space in a name, as in COCO's 'traffic light', becomes '_')."""
    return Path(folder) / f"{int(tag):03d}_{img_id}_cam_{class_names[k].replace(' ', '_')}.png"


def save_overlays(img: np.ndarray, cam_dict: Mapping[int, np.ndarray], folder: os.PathLike | str,
                  tag: int, img_id: str, class_names: Sequence[str] = VOC_CLASSES) -> list[Path]:
    """One PNG per class: the image with its normalised CAM over it (``jet``, alpha 0.6, axes off,
    matplotlib's default 6.4x4.8 in at 100 dpi), as the reference ``--vis``.

    img: ``(H, W, 3)`` uint8 RGB; cam_dict: ``{k: (H, W)}``. Uses matplotlib's object API (thread-safe,
    no pyplot state). Returns the written paths.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    from tools.io import atomic_path

    written = []
    for k, cam in cam_dict.items():
        fig = Figure(figsize=(6.4, 4.8), dpi=100)
        FigureCanvasAgg(fig)
        ax = fig.add_subplot(1, 1, 1)
        ax.imshow(img)
        ax.imshow(cam, cmap="jet", alpha=0.6)
        ax.axis("off")
        path = overlay_path(folder, tag, img_id, int(k), class_names)
        with atomic_path(path) as tmp:
            fig.savefig(tmp, format="png")
        written.append(path)
    return written


def crf_dict(img: np.ndarray, cam_dict: Mapping[int, np.ndarray], alpha: float) -> dict[int, np.ndarray]:
    """Reference CRF dictionary for one alpha: ``v`` = the CAMs stacked in key order,
    ``bg = (1 - max_k v)^alpha``, probabilities ``[bg, v...]`` (not renormalised) through the dense CRF
    (unary ``-log(clip(p, 1e-5, 1))``, 10 iterations, Gaussian 3/3, bilateral 80/13/10).
    Returns ``{0: background, k+1: class k}`` float32 ``(H, W)``.
    """
    from tools.crf import dense_crf_softmax

    keys = list(cam_dict.keys())
    v = np.stack([np.asarray(cam_dict[k], np.float32) for k in keys]) if keys else \
        np.zeros((0,) + img.shape[:2], np.float32)
    bg = np.power(1 - (np.max(v, axis=0) if keys else np.zeros(img.shape[:2], np.float32)), alpha)
    probs = np.concatenate([bg[None].astype(np.float32), v], axis=0)
    q = dense_crf_softmax(img, probs, **CRF_PARAMS)
    out = {0: q[0]}
    for i, k in enumerate(keys):
        out[int(k) + 1] = q[i + 1]
    return out
