"""From saved BECO logits to a label map, as the reference's ``test.py`` does it: bilinear upsampling,
softmax, the optional dense CRF on the reference's mean-subtracted image, argmax.

``segmentation/test.py`` (the CLI) runs these per image; tests and benches import them from here.
"""
from __future__ import annotations

import os

import numpy as np

from tools.errors import DataError

__all__ = ["MEANSUB_RGB", "CRF_PARAMS", "wrapped_meansub_uint8", "load_logits", "logits_to_prob", "predict_one"]

MEANSUB_RGB = (122.675, 116.669, 104.008)
# segmentation/utils/crf.py DenseCRF defaults (crf.json "beco_test_py").
CRF_PARAMS = dict(n_iter=10, gauss_sxy=1, gauss_compat=3, bil_sxy=67, bil_srgb=3, bil_compat=4)


def wrapped_meansub_uint8(img: np.ndarray) -> np.ndarray:
    """The image the reference's CRF sees: ``(float32 RGB - MEANSUB_RGB).astype(uint8)``, i.e. truncated
    toward zero and wrapped modulo 256 (written out explicitly: numpy leaves negative float -> uint8
    casts platform-defined). img: (H,W,3) uint8 -> (H,W,3) uint8."""
    x = np.asarray(img, dtype=np.float32) - np.asarray(MEANSUB_RGB, dtype=np.float32)
    return (np.trunc(x).astype(np.int64) & 255).astype(np.uint8)


def load_logits(path: str | os.PathLike, num_classes: int | None = None) -> np.ndarray:
    """One saved logits file as a float (C,h,w) array; a truncated, unreadable or misshapen file (or,
    with ``num_classes``, one with another class count, or one holding NaN/inf) raises
    :class:`DataError` naming it (one line) instead of numpy's traceback or a silently wrong score."""
    try:
        a = np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError) as e:
        why = " ".join(str(e).split())
        raise DataError(f"logits file '{path}' is truncated or unreadable ({type(e).__name__}: {why}); "
                        "rerun `python main.py --test --ckpt <file>` to write it again") from None
    if a.ndim != 3 or not np.issubdtype(a.dtype, np.floating):
        raise DataError(f"logits file '{path}' holds a {a.dtype} array of shape {a.shape}, expected float "
                        "(classes, h, w) as main.py --test writes")
    if num_classes is not None and a.shape[0] != num_classes:
        raise DataError(f"logits file '{path}' has {a.shape[0]} classes, expected {num_classes} (--num_classes); "
                        "was it written for another dataset?")
    if num_classes is not None:
        from tools.safe_load import require_finite

        require_finite(a, path, "logits file", "(class scores)",
                       "Rerun `python main.py --test --ckpt <file>` to write it again.")
    return a


def logits_to_prob(logits: np.ndarray, size_hw: tuple[int, int]) -> np.ndarray:
    """(C,h,w) logits -> (C,H,W) float32 softmax after bilinear upsampling (align_corners False)."""
    import torch
    import torch.nn.functional as F

    t = torch.from_numpy(np.ascontiguousarray(logits, dtype=np.float32))[None]
    if tuple(t.shape[-2:]) != tuple(size_hw):
        t = F.interpolate(t, size=tuple(size_hw), mode="bilinear", align_corners=False)
    return torch.softmax(t[0], dim=0).numpy()


def predict_one(logits: np.ndarray, img: np.ndarray, crf: bool, crf_image: str = "wrapped") -> np.ndarray:
    """One image's label map (H,W) uint8 from its saved logits (C,h,w) and image (H,W,3) uint8, after
    the dense CRF when ``crf`` (on the wrapped mean-subtracted image unless ``crf_image="clean"``)."""
    prob = logits_to_prob(logits, img.shape[:2])
    if crf:
        from tools.crf import dense_crf_softmax

        cimg = wrapped_meansub_uint8(img) if crf_image == "wrapped" else np.ascontiguousarray(img)
        prob = dense_crf_softmax(cimg, prob, **CRF_PARAMS)
    return np.argmax(prob, axis=0).astype(np.uint8)
