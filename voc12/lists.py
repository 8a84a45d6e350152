"""VOC image lists, image-level class labels, image and ground-truth paths (numpy only, no torch).

Reference formats kept: list files hold plain ids or ``/JPEGImages/<id>.jpg [/SegmentationClassAug/<id>.png]``
lines (ids of any length are accepted, not only 11 characters); ``cls_labels.npy`` is ``np.save`` of a
dict ``{id: float32 (20,) multi-hot}``. Kept free of torch so that evaluation workers and other
light-weight tools start fast; :mod:`voc12.data` re-exports everything here.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

import numpy as np

from tools.errors import DataError, MissingFileError, require_dir, require_file
from tools.imutils import NUM_CLASSES, read_label_png, read_rgb

DEFAULT_VOC_ROOT = "data/VOC2012"
DEFAULT_CLS_LABELS = "voc12/cls_labels.npy"
VOC_HINT = ("Download VOCtrainval_11-May-2012.tar from http://host.robots.ox.ac.uk/pascal/VOC/voc2012/ and "
            "extract it so that <root>/JPEGImages exists (or pass --data_root / --voc12_root); for a quick "
            "start make the toy set: python -m voc12.toy --out data/toy")
LABELS_HINT = "Build it with: python voc12/prepare.py --voc_root <VOC root> (writes voc12/cls_labels.npy and the lists)."


def check_voc_root(root: os.PathLike | str) -> Path:
    """Return ``Path(root)`` if it looks like a VOC tree (has JPEGImages/), else a clear error."""
    root = require_dir(root, "VOC dataset folder", VOC_HINT)
    require_dir(root / "JPEGImages", "VOC JPEGImages folder", VOC_HINT)
    return root


def parse_id(token: str) -> str:
    """``/JPEGImages/2007_000032.jpg`` or ``2007_000032`` -> ``2007_000032``."""
    name = token.strip().rsplit("/", 1)[-1]
    for ext in (".jpg", ".jpeg", ".png", ".JPG", ".JPEG", ".PNG"):
        if name.endswith(ext):
            return name[: -len(ext)]
    return name


def read_id_list(path: os.PathLike | str) -> list[str]:
    """Image ids of a list file (first whitespace token of each non-empty line)."""
    p = require_file(path, "image list", LABELS_HINT)
    ids = [parse_id(line.split()[0]) for line in p.read_text().splitlines() if line.strip()]
    if not ids:
        raise DataError(f"image list '{p}' is empty; expected one image id per line.")
    return ids


def load_cls_labels(path: os.PathLike | str = DEFAULT_CLS_LABELS) -> dict[str, np.ndarray]:
    """``{id: float32 (20,)}`` from a reference-format ``cls_labels.npy``."""
    p = require_file(path, "class-label file (cls_labels.npy)", LABELS_HINT)
    try:
        d = np.load(p, allow_pickle=True).item()
    except Exception as e:
        raise DataError(f"'{p}' is not a cls_labels.npy dictionary ({e}). {LABELS_HINT}") from e
    return {str(k): np.asarray(v, dtype=np.float32) for k, v in d.items()}


def labels_for(ids: Sequence[str], cls_labels: dict[str, np.ndarray], source: str = "cls_labels.npy") -> np.ndarray:
    """``(N, 20)`` float32 labels of ``ids``; an id without a label is an error naming it and ``source``."""
    missing = [i for i in ids if i not in cls_labels]
    if missing:
        raise DataError(f"{len(missing)} image id(s) have no class label in {source}: {', '.join(missing[:5])}"
                        f"{' ...' if len(missing) > 5 else ''}. {LABELS_HINT}")
    return np.stack([cls_labels[i] for i in ids]).astype(np.float32) if ids else np.zeros((0, NUM_CLASSES), np.float32)


def image_path(root: os.PathLike | str, img_id: str) -> Path:
    return Path(root) / "JPEGImages" / f"{img_id}.jpg"


def load_image(root: os.PathLike | str, img_id: str) -> np.ndarray:
    """``(H, W, 3)`` uint8 RGB of ``<root>/JPEGImages/<id>.jpg`` (clear error for a listed id without image)."""
    p = image_path(root, img_id)
    if not p.is_file():
        raise MissingFileError(f"image for list id '{img_id}' not found: '{p}' (expected a JPEG). "
                               f"Is --data_root right and the list made for this dataset?")
    return read_rgb(p)


def gt_path(root: os.PathLike | str, img_id: str, folder: str = "SegmentationClass") -> Path:
    return Path(root) / folder / f"{img_id}.png"


def load_gt(root: os.PathLike | str, img_id: str, folder: str = "SegmentationClass") -> np.ndarray:
    """Ground-truth class-index map ``(H, W)`` uint8 (0 bg, 1..20, 255 ignore) from a palette PNG."""
    p = gt_path(root, img_id, folder)
    if not p.is_file():
        raise MissingFileError(f"ground truth for id '{img_id}' not found: '{p}' (expected a palette PNG in "
                               f"{folder}/).")
    return read_label_png(p)
