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
from tools.imutils import NUM_CLASSES, read_gt_png, read_rgb

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


_WARNED_DUPLICATES: set[str] = set()


def read_id_list(path: os.PathLike | str) -> list[str]:
    """Image ids of a list file (first whitespace token of each non-empty line), in file order.

    A UTF-8 byte-order mark and Windows line endings are ignored. A repeated id is kept once (first
    occurrence) with a warning on stderr: it would otherwise be inferred twice and counted twice.
    """
    p = require_file(path, "image list", LABELS_HINT)
    # utf-8-sig drops a leading BOM, which would otherwise stick to the first id
    raw = [parse_id(line.split()[0]) for line in p.read_text(encoding="utf-8-sig").splitlines() if line.strip()]
    if not raw:
        raise DataError(f"image list '{p}' is empty; expected one image id per line.")
    ids = list(dict.fromkeys(raw))
    if len(ids) < len(raw) and str(p) not in _WARNED_DUPLICATES:
        _WARNED_DUPLICATES.add(str(p))  # once per process: the pipeline reads a list many times
        import sys
        from collections import Counter

        dup = next(i for i, n in Counter(raw).items() if n > 1)
        print(f"warning: image list '{p}' repeats {len(raw) - len(ids)} id(s) (e.g. '{dup}'); each id is used "
              "once.", file=sys.stderr)
    return ids


def load_cls_labels(path: os.PathLike | str = DEFAULT_CLS_LABELS) -> dict[str, np.ndarray]:
    """``{id: float32 (20,)}`` from a reference-format ``cls_labels.npy``."""
    from tools.safe_load import load_npy

    what = "class-label file (cls_labels.npy)"
    d = load_npy(path, what, LABELS_HINT, holds=f"a dict {{image id: {NUM_CLASSES}-vector}}")
    if not isinstance(d, dict):
        raise DataError(f"{what} '{path}' holds a {type(d).__name__}, expected a dict {{image id: float32 "
                        f"({NUM_CLASSES},)}}. {LABELS_HINT}")
    out = {}
    for k, v in d.items():
        if isinstance(k, (bool, np.bool_)) or not isinstance(k, (str, int, np.integer)):
            raise DataError(f"{what} '{path}' has key {k!r} ({type(k).__name__}); expected image ids. {LABELS_HINT}")
        if (not isinstance(v, np.ndarray) or v.shape != (NUM_CLASSES,) or v.dtype.kind not in "fiub"
                or not np.isfinite(v).all()):
            desc = f"{v.dtype} {v.shape}" if isinstance(v, np.ndarray) else type(v).__name__
            raise DataError(f"{what} '{path}' entry {k!r} is {desc}; expected a finite ({NUM_CLASSES},) "
                            f"multi-hot vector. {LABELS_HINT}")
        out[str(k)] = v.astype(np.float32, copy=False)
    return out


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


def load_gt(root: os.PathLike | str, img_id: str, folder: str = "SegmentationClass",
            num_classes: int = NUM_CLASSES + 1) -> np.ndarray:
    """Ground-truth class-index map ``(H, W)`` uint8 (0 bg, 1..20, 255 ignore) from a palette PNG; any
    other value is a :class:`DataError` naming the file (``num_classes`` counts the background)."""
    p = gt_path(root, img_id, folder)
    if not p.is_file():
        raise MissingFileError(f"ground truth for id '{img_id}' not found: '{p}' (expected a palette PNG in "
                               f"{folder}/).")
    return read_gt_png(p, num_classes)
