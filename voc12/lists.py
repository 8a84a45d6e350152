"""VOC image lists, image-level class labels, image and ground-truth paths (numpy only, no torch).

Reference formats kept: list files hold plain ids or ``/JPEGImages/<id>.jpg [/SegmentationClassAug/<id>.png]``
lines (ids of any length are accepted, not only 11 characters); ``cls_labels.npy`` is ``np.save`` of a
dict ``{id: float32 (C,) multi-hot}`` (C from the dataset descriptor, :mod:`tools.dataset`). Kept free
of torch so that evaluation workers and other light-weight tools start fast; :mod:`voc12.data` re-exports everything here.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

import numpy as np

from tools.errors import DataError, MissingFileError, require_dir, require_file
from tools.dataset import DatasetInfo, get_dataset
from tools.imutils import read_gt_png, read_rgb
from voc12.dataset import VOC12

DEFAULT_VOC_ROOT = VOC12.default_root
DEFAULT_CLS_LABELS = VOC12.cls_labels
VOC_HINT = VOC12.root_hint
LABELS_HINT = VOC12.labels_hint


def check_voc_root(root: os.PathLike | str, dataset: DatasetInfo | str = VOC12) -> Path:
    """Return ``Path(root)`` if it looks like a tree of ``dataset`` (VOC: has JPEGImages/), else a clear error."""
    ds = get_dataset(dataset)
    root = require_dir(root, f"{ds.name} dataset folder", ds.root_hint)
    if ds.image_folder:
        require_dir(root / ds.image_folder, f"{ds.name} {ds.image_folder} folder", ds.root_hint)
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


def load_cls_labels(path: os.PathLike | str = DEFAULT_CLS_LABELS,
                    dataset: DatasetInfo | str = VOC12) -> dict[str, np.ndarray]:
    """``{id: float32 (C,)}`` from a reference-format ``cls_labels.npy``; every vector must have the
    dataset's ``C`` foreground classes (a VOC file given to a COCO run is refused, naming the file)."""
    from tools.safe_load import load_npy

    ds = get_dataset(dataset)
    n, hint = ds.num_fg, ds.labels_hint
    what = "class-label file (cls_labels.npy)"
    d = load_npy(path, what, hint, holds=f"a dict {{image id: {n}-vector}}")
    if not isinstance(d, dict):
        raise DataError(f"{what} '{path}' holds a {type(d).__name__}, expected a dict {{image id: float32 "
                        f"({n},)}}. {hint}")
    out = {}
    for k, v in d.items():
        if isinstance(k, (bool, np.bool_)) or not isinstance(k, (str, int, np.integer)):
            raise DataError(f"{what} '{path}' has key {k!r} ({type(k).__name__}); expected image ids. {hint}")
        if (not isinstance(v, np.ndarray) or v.shape != (n,) or v.dtype.kind not in "fiub"
                or not np.isfinite(v).all()):
            desc = f"{v.dtype} {v.shape}" if isinstance(v, np.ndarray) else type(v).__name__
            raise DataError(f"{what} '{path}' entry {k!r} is {desc}; expected a finite ({n},) "
                            f"multi-hot vector of {ds.name}'s classes. {hint}")
        out[str(k)] = v.astype(np.float32, copy=False)
    return out


def labels_for(ids: Sequence[str], cls_labels: dict[str, np.ndarray], source: str = "cls_labels.npy",
               dataset: DatasetInfo | str = VOC12) -> np.ndarray:
    """``(N, C)`` float32 labels of ``ids``; an id without a label is an error naming it and ``source``."""
    missing = [i for i in ids if i not in cls_labels]
    if missing:
        raise DataError(f"{len(missing)} image id(s) have no class label in {source}: {', '.join(missing[:5])}"
                        f"{' ...' if len(missing) > 5 else ''}. {get_dataset(dataset).labels_hint}")
    if not ids:
        return np.zeros((0, get_dataset(dataset).num_fg), np.float32)
    return np.stack([cls_labels[i] for i in ids]).astype(np.float32)


def image_path(root: os.PathLike | str, img_id: str, dataset: DatasetInfo | str = VOC12) -> Path:
    """Where the image of ``img_id`` lies (VOC: ``<root>/JPEGImages/<id>.jpg``; see the descriptor)."""
    return get_dataset(dataset).image_path(root, img_id)


def load_image(root: os.PathLike | str, img_id: str, dataset: DatasetInfo | str = VOC12) -> np.ndarray:
    """``(H, W, 3)`` uint8 RGB of the image of ``img_id`` (clear error for a listed id without image)."""
    p = image_path(root, img_id, dataset)
    if not p.is_file():
        raise MissingFileError(f"image for list id '{img_id}' not found: '{p}' (expected a JPEG). "
                               f"Is --data_root right and the list made for this dataset?")
    return read_rgb(p)


def gt_path(root: os.PathLike | str, img_id: str, folder: str = VOC12.gt_folder,
            dataset: DatasetInfo | str = VOC12) -> Path:
    """The mask of ``img_id`` in ``<root>/<folder>`` (COCO adds the split subfolder; see the descriptor)."""
    return get_dataset(dataset).gt_path(Path(root) / folder, img_id)


def load_gt(root: os.PathLike | str, img_id: str, folder: str = VOC12.gt_folder,
            num_classes: int | None = None, dataset: DatasetInfo | str = VOC12) -> np.ndarray:
    """Ground-truth class-index map ``(H, W)`` uint8 (0 bg, 1..C, 255 ignore) from a palette PNG; any
    other value is a :class:`DataError` naming the file (``num_classes`` counts the background;
    default: the dataset's)."""
    ds = get_dataset(dataset)
    num_classes = ds.num_classes if num_classes is None else num_classes
    p = gt_path(root, img_id, folder, ds)
    if not p.is_file():
        raise MissingFileError(f"ground truth for id '{img_id}' not found: '{p}' (expected a palette PNG in "
                               f"{folder}/).")
    return read_gt_png(p, num_classes)
