"""VOC image lists, image-level class labels, ground truth, and the stage-one datasets.

Reference formats kept: list files hold plain ids or ``/JPEGImages/<id>.jpg [/SegmentationClassAug/<id>.png]``
lines (ids of any length are accepted, not only 11 characters); ``cls_labels.npy`` is ``np.save`` of a
dict ``{id: float32 (20,) multi-hot}``.
"""
from __future__ import annotations

import os
import random
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from tools.errors import DataError, MissingFileError, require_dir, require_file
from tools.imutils import NUM_CLASSES, normalize_imagenet, pil_resize, read_label_png, read_rgb

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


def hwc_to_chw(x: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(x.transpose(2, 0, 1))


# ----------------------------------------------------------------------------------------------
# Stage one: training pairs (stage1.md §3.3)
# ----------------------------------------------------------------------------------------------

def random_resize_long(img: np.ndarray, rng: random.Random, lo: int, hi: int) -> np.ndarray:
    """Resize so the long side is ``randint(lo, hi)`` (inclusive), aspect kept, PIL bicubic."""
    h, w = img.shape[:2]
    target = rng.randint(int(lo), int(hi))
    if w < h:
        new_w, new_h = round(w * target / h), target
    else:
        new_w, new_h = target, round(h * target / w)
    return pil_resize(img, (new_h, new_w), "bicubic")


def random_crop_pad(arrays: Sequence[np.ndarray], crop: int, rng: random.Random) -> list[np.ndarray]:
    """Crop every ``(H, W, C)`` array with one window of side ``crop`` into a zero container.

    Per axis (horizontal first, then vertical): a longer image gets a random offset and the container
    offset 0; a shorter one is pasted at a random container offset (the rest stays 0).
    """
    h, w = arrays[0].shape[:2]
    ch, cw = min(crop, h), min(crop, w)
    if w > crop:
        w_img, w_cont = rng.randrange(w - crop + 1), 0
    else:
        w_img, w_cont = 0, rng.randrange(crop - w + 1)
    if h > crop:
        h_img, h_cont = rng.randrange(h - crop + 1), 0
    else:
        h_img, h_cont = 0, rng.randrange(crop - h + 1)
    out = []
    for a in arrays:
        c = np.zeros((crop, crop) + a.shape[2:], dtype=a.dtype)
        c[h_cont:h_cont + ch, w_cont:w_cont + cw] = a[h_img:h_img + ch, w_img:w_img + cw]
        out.append(c)
    return out


class ClsPairDataset(Dataset):
    """Stage-one training set: each item is an image and a partner that shares one of its classes.

    Item dict: ``img_a``/``img_a2`` (3, crop, crop) float32 normalised (zero = mean colour outside the
    pasted image), ``img_p``/``img_p2`` the same window of raw 0..255 pixels, ``label``/``label2``
    (20,) float32, ``name``/``name2`` ids. Randomness comes from a per-item ``random.Random`` seeded by
    ``(seed, epoch, index)``, so draws are reproducible regardless of DataLoader workers; call
    :meth:`set_epoch` each epoch.
    """

    def __init__(self, ids: Sequence[str], root: os.PathLike | str, cls_labels: dict[str, np.ndarray],
                 resize: Sequence[float] = (256, 512), crop: int = 320, seed: int = 5137,
                 labels_source: str = "cls_labels.npy") -> None:
        if int(resize[0]) > int(resize[1]):
            raise ValueError(f"--resize must be (min, max), got {resize}")
        self.ids = list(ids)
        self.root = Path(root)
        self.labels = labels_for(self.ids, cls_labels, labels_source)
        empty = [self.ids[i] for i in np.flatnonzero(self.labels.sum(1) == 0)]
        if empty:
            raise DataError(f"{len(empty)} training image(s) have no class at all (e.g. {empty[0]}); "
                            "image-level training needs at least one class per image.")
        self.class_members = [np.flatnonzero(self.labels[:, c] > 0) for c in range(NUM_CLASSES)]
        self.resize = (int(resize[0]), int(resize[1]))
        self.crop = int(crop)
        self.seed = int(seed)
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self.ids)

    def _transform(self, img: np.ndarray, rng: random.Random) -> tuple[np.ndarray, np.ndarray]:
        img = random_resize_long(img, rng, *self.resize)
        if rng.random() < 0.5:
            img = img[:, ::-1]
        norm = normalize_imagenet(img)
        a, p = random_crop_pad([norm, img.astype(np.float32)], self.crop, rng)
        return hwc_to_chw(a), hwc_to_chw(p)

    def partner_index(self, idx: int, rng: random.Random) -> int:
        """An image (possibly ``idx`` itself) that contains a class drawn from ``idx``'s classes."""
        c = rng.choice(list(np.flatnonzero(self.labels[idx] > 0)))
        return int(rng.choice(list(self.class_members[c])))

    def __getitem__(self, idx: int) -> dict:
        rng = random.Random(hash((self.seed, self.epoch, int(idx))))
        idx2 = self.partner_index(idx, rng)
        out = {}
        for i, sfx in ((idx, ""), (idx2, "2")):
            a, p = self._transform(load_image(self.root, self.ids[i]), rng)
            out["img_a" + sfx] = torch.from_numpy(a)
            out["img_p" + sfx] = torch.from_numpy(p)
            out["label" + sfx] = torch.from_numpy(self.labels[i].copy())
            out["name" + sfx] = self.ids[i]
        return out


# ----------------------------------------------------------------------------------------------
# Stage one: multi-scale + flip inference inputs (stage1.md §3.4)
# ----------------------------------------------------------------------------------------------

def msf_inputs(img: np.ndarray, scales: Sequence[float] = (0.5, 1.0, 1.5, 2.0)) -> list[np.ndarray]:
    """The multi-scale inputs of one image: for each scale the normalised ``(3, round(H s), round(W s))``
    float32 array, then its horizontal flip -> ``2 * len(scales)`` arrays ``[s0, s0 flip, s1, ...]``.
    Sizes use Python's round (half to even) and PIL bicubic on the original image, as the reference."""
    h, w = img.shape[:2]
    out = []
    for s in scales:
        r = pil_resize(img, (round(h * s), round(w * s)), "bicubic")
        x = hwc_to_chw(normalize_imagenet(r))
        out.append(x)
        out.append(np.ascontiguousarray(x[:, :, ::-1]))
    return out


class MSFDataset(Dataset):
    """Inference/validation set: item = ``(id, list of 2*len(scales) float32 CHW arrays, label (20,))``."""

    def __init__(self, ids: Sequence[str], root: os.PathLike | str, cls_labels: dict[str, np.ndarray],
                 scales: Sequence[float] = (0.5, 1.0, 1.5, 2.0), labels_source: str = "cls_labels.npy") -> None:
        self.ids = list(ids)
        self.root = Path(root)
        self.labels = labels_for(self.ids, cls_labels, labels_source)
        self.scales = tuple(scales)

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, idx: int):
        img = load_image(self.root, self.ids[idx])
        return self.ids[idx], msf_inputs(img, self.scales), self.labels[idx]
