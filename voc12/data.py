"""The stage-one datasets (training pairs, multi-scale inference inputs) over the VOC layer.

Lists, labels and paths live in :mod:`voc12.lists` (torch-free) and are re-exported here.
"""
from __future__ import annotations

import os
import random
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from tools.errors import DataError
from tools.dataset import DatasetInfo, get_dataset
from tools.imutils import normalize_imagenet, pil_resize
from voc12.lists import (DEFAULT_CLS_LABELS, DEFAULT_VOC_ROOT, LABELS_HINT, VOC_HINT, check_voc_root,  # noqa: F401
                         gt_path, image_path, labels_for, load_cls_labels, load_gt, load_image, parse_id,
                         read_id_list)


def hwc_to_chw(x: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(x.transpose(2, 0, 1))


def scaled_side(size: float) -> int:
    """A resized side: ``round(size)`` (Python round, half to even, as the reference) but at least 1.
    A tiny image whose side rounds to 0 crashes the reference inside PIL; here it stays one pixel wide
    (docs/deviations.md)."""
    return max(1, round(size))


# ----------------------------------------------------------------------------------------------
# Stage one: training pairs
# ----------------------------------------------------------------------------------------------

def random_resize_long(img: np.ndarray, rng: random.Random, lo: int, hi: int) -> np.ndarray:
    """Resize so the long side is ``randint(lo, hi)`` (inclusive), aspect kept, PIL bicubic."""
    h, w = img.shape[:2]
    target = rng.randint(int(lo), int(hi))
    if w < h:
        new_w, new_h = scaled_side(w * target / h), target
    else:
        new_w, new_h = target, scaled_side(h * target / w)
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


class EpochSeededDataset(Dataset):
    """Base of the training datasets whose augmentation draws come from a per-item ``random.Random``
    seeded by ``(seed, epoch, index)``: reproducible whatever the number of DataLoader workers.
    Subclasses set ``self.ids`` and call :meth:`item_rng`; the trainer calls :meth:`set_epoch`."""

    ids: list
    seed: int = 0
    epoch: int = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self.ids)

    def item_rng(self, idx: int) -> random.Random:
        # hash() of a tuple of ints is not randomised per process (only str/bytes hashes are)
        return random.Random(hash((self.seed, self.epoch, int(idx))))


class ClsPairDataset(EpochSeededDataset):
    """Stage-one training set: each item is an image and a partner that shares one of its classes.

    Item dict: ``img_a``/``img_a2`` (3, crop, crop) float32 normalised (zero = mean colour outside the
    pasted image), ``img_p``/``img_p2`` the same window of raw 0..255 pixels, ``label``/``label2``
    (C,) float32, ``name``/``name2`` ids. Randomness comes from a per-item ``random.Random`` seeded by
    ``(seed, epoch, index)``, so draws are reproducible regardless of DataLoader workers; call
    :meth:`set_epoch` each epoch.
    """

    def __init__(self, ids: Sequence[str], root: os.PathLike | str, cls_labels: dict[str, np.ndarray],
                 resize: Sequence[float] = (256, 512), crop: int = 320, seed: int = 5137,
                 labels_source: str = "cls_labels.npy", dataset: DatasetInfo | str = "voc12") -> None:
        if int(resize[0]) > int(resize[1]):
            raise ValueError(f"--resize must be (min, max), got {resize}")
        self.ids = list(ids)
        self.root = Path(root)
        self.dataset = get_dataset(dataset)
        self.labels = labels_for(self.ids, cls_labels, labels_source, self.dataset)
        empty = [self.ids[i] for i in np.flatnonzero(self.labels.sum(1) == 0)]
        if empty:
            raise DataError(f"{len(empty)} training image(s) have no class at all (e.g. {empty[0]}); "
                            "image-level training needs at least one class per image.")
        self.class_members = [np.flatnonzero(self.labels[:, c] > 0) for c in range(self.labels.shape[1])]
        self.resize = (int(resize[0]), int(resize[1]))
        self.crop = int(crop)
        self.seed = int(seed)
        self.epoch = 0

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
        rng = self.item_rng(idx)
        idx2 = self.partner_index(idx, rng)
        out = {}
        for i, sfx in ((idx, ""), (idx2, "2")):
            a, p = self._transform(load_image(self.root, self.ids[i], self.dataset), rng)
            out["img_a" + sfx] = torch.from_numpy(a)
            out["img_p" + sfx] = torch.from_numpy(p)
            out["label" + sfx] = torch.from_numpy(self.labels[i].copy())
            out["name" + sfx] = self.ids[i]
        return out


# ----------------------------------------------------------------------------------------------
# Stage one: multi-scale + flip inference inputs
# ----------------------------------------------------------------------------------------------

def msf_inputs(img: np.ndarray, scales: Sequence[float] = (0.5, 1.0, 1.5, 2.0)) -> list[np.ndarray]:
    """The multi-scale inputs of one image: for each scale the normalised ``(3, round(H s), round(W s))``
    float32 array, then its horizontal flip -> ``2 * len(scales)`` arrays ``[s0, s0 flip, s1, ...]``.
    Sizes use Python's round (half to even) and PIL bicubic on the original image, as the reference
    (except that a side never drops to 0, see :func:`scaled_side`)."""
    h, w = img.shape[:2]
    out = []
    for s in scales:
        r = pil_resize(img, (scaled_side(h * s), scaled_side(w * s)), "bicubic")
        x = hwc_to_chw(normalize_imagenet(r))
        out.append(x)
        # copy, not ascontiguousarray: a 1-pixel-wide flip already counts as contiguous for numpy but keeps
        # its negative stride, which torch.from_numpy refuses
        out.append(x[:, :, ::-1].copy())
    return out


class MSFDataset(Dataset):
    """Inference/validation set: item = ``(id, list of 2*len(scales) float32 CHW arrays, label (C,))``."""

    def __init__(self, ids: Sequence[str], root: os.PathLike | str, cls_labels: dict[str, np.ndarray],
                 scales: Sequence[float] = (0.5, 1.0, 1.5, 2.0), labels_source: str = "cls_labels.npy",
                 dataset: DatasetInfo | str = "voc12") -> None:
        self.ids = list(ids)
        self.root = Path(root)
        self.dataset = get_dataset(dataset)
        self.labels = labels_for(self.ids, cls_labels, labels_source, self.dataset)
        self.scales = tuple(scales)

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, idx: int):
        img = load_image(self.root, self.ids[idx], self.dataset)
        return self.ids[idx], msf_inputs(img, self.scales), self.labels[idx]
