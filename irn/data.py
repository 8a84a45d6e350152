"""IRN-specific datasets (reference ``voc12/dataloader.py`` of the IRN fork).

The multi-scale + flip CAM inputs come from ``voc12.data.MSFDataset`` (same pipeline: PIL
bicubic, ImageNet normalisation, [image, flip] per scale); this file only adds the two sets
train_irn needs.  Randomness is drawn from a per-item ``random.Random`` seeded by
(seed, epoch, index), so results do not depend on the number of loader workers.
"""
from __future__ import annotations

import os
import random
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from irn.path_index import PathIndex, affinity_labels
from tools.imutils import normalize_imagenet, pil_resize, read_label_png
from tools.errors import DataError
from tools.dataset import DatasetInfo, get_dataset
from voc12.data import EpochSeededDataset, hwc_to_chw, load_image, random_crop_pad, scaled_side

IGNORE = 255


def crop_image_and_label(img: np.ndarray, label: np.ndarray, crop: int, rng: random.Random
                         ) -> tuple[np.ndarray, np.ndarray]:
    """One random ``crop`` window for a normalised image (pad 0) and its label (pad 255).

    Uses the shared ``random_crop_pad`` (zero container) on the label shifted by +1, so a 0
    in the container marks "outside the image" and becomes 255.
    """
    shifted = label.astype(np.int16)[..., None] + 1
    img_c, lab_c = random_crop_pad([img, shifted], crop, rng)
    lab_c = lab_c[..., 0]
    return img_c, np.where(lab_c == 0, IGNORE, lab_c - 1).astype(np.uint8)


def top_left_crop(img: np.ndarray, crop: int, fill: float = 0) -> np.ndarray:
    """Top-left ``crop`` window of (H, W, ...) padded with ``fill`` (reference ``top_left_crop``)."""
    h, w = img.shape[:2]
    out = np.full((crop, crop) + img.shape[2:], fill, dtype=img.dtype)
    out[:min(crop, h), :min(crop, w)] = img[:crop, :crop]
    return out


class AffinityDataset(EpochSeededDataset):
    """train_irn samples: ``img`` (3, crop, crop) float32, ``aff_bg_pos_label`` / ``aff_fg_pos_label``
    / ``aff_neg_label`` (n_dirs, n_src) float32 for ``path_index`` on the (crop/4)² grid.

    Per item: random scale U[0.5, 1.5) (image bicubic, label nearest, size round(dim·s)),
    normalise, horizontal flip p=0.5, random crop (image pad 0, label pad 255), label ×0.25
    nearest, affinity labels.
    """

    def __init__(self, ids: Sequence[str], voc_root: os.PathLike | str, label_dir: os.PathLike | str,
                 path_index: PathIndex, crop_size: int = 512, rescale: tuple[float, float] = (0.5, 1.5),
                 hor_flip: bool = True, seed: int = 0, dataset: DatasetInfo | str = "voc12") -> None:
        self.ids = list(ids)
        self.voc_root = Path(voc_root)
        self.dataset = get_dataset(dataset)
        self.label_dir = Path(label_dir)
        self.path_index = path_index
        self.crop_size = int(crop_size)
        self.rescale = rescale
        self.hor_flip = hor_flip
        self.seed = int(seed)
        self.epoch = 0

    def __getitem__(self, idx: int) -> dict:
        rng = self.item_rng(idx)
        name = self.ids[idx]
        img = load_image(self.voc_root, name, self.dataset)
        label = read_label_png(self.label_dir / f"{name}.png")
        if label.shape != img.shape[:2]:
            raise DataError(f"ir_label {self.label_dir / (name + '.png')} is {label.shape}, image {img.shape[:2]}; "
                            "re-create it (run_sample.py --cam_to_ir_label_pass true --overwrite)")
        if self.rescale:
            s = self.rescale[0] + rng.random() * (self.rescale[1] - self.rescale[0])
            size = (scaled_side(img.shape[0] * s), scaled_side(img.shape[1] * s))
            img = pil_resize(img, size, "bicubic")
            label = pil_resize(label, size, "nearest")
        img = normalize_imagenet(img)
        if self.hor_flip and rng.getrandbits(1):
            img, label = img[:, ::-1], label[:, ::-1]
        img, label = crop_image_and_label(img, label, self.crop_size, rng)
        h, w = label.shape
        reduced = pil_resize(label, (scaled_side(h * 0.25), scaled_side(w * 0.25)), "nearest")
        bg, fg, neg = affinity_labels(reduced, self.path_index.src_indices, self.path_index.dst_indices,
                                      self.dataset.num_classes)
        return {"name": name, "img": torch.from_numpy(hwc_to_chw(img)),
                "aff_bg_pos_label": torch.from_numpy(bg), "aff_fg_pos_label": torch.from_numpy(fg),
                "aff_neg_label": torch.from_numpy(neg)}


class TopLeftCropDataset(Dataset):
    """Normalised images, top-left ``crop`` window padded with 0 (train_irn's displacement-mean pass)."""

    def __init__(self, ids: Sequence[str], voc_root: os.PathLike | str, crop_size: int = 512,
                 dataset: DatasetInfo | str = "voc12") -> None:
        self.ids = list(ids)
        self.voc_root = Path(voc_root)
        self.crop_size = int(crop_size)
        self.dataset = get_dataset(dataset)

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, idx: int) -> dict:
        img = normalize_imagenet(load_image(self.voc_root, self.ids[idx], self.dataset))
        return {"name": self.ids[idx], "img": torch.from_numpy(hwc_to_chw(top_left_crop(img, self.crop_size, 0)))}


class ImageFlipDataset(Dataset):
    """make_sem_seg_labels inputs: ``(id, (2,3,H,W) float32 [image, W-flipped image])`` at scale 1.0."""

    def __init__(self, ids: Sequence[str], voc_root: os.PathLike | str, dataset: DatasetInfo | str = "voc12") -> None:
        self.ids = list(ids)
        self.voc_root = Path(voc_root)
        self.dataset = get_dataset(dataset)

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, idx: int) -> tuple[str, np.ndarray]:
        from voc12.data import msf_inputs

        pair = msf_inputs(load_image(self.voc_root, self.ids[idx], self.dataset), (1.0,))
        return self.ids[idx], np.stack(pair)
