"""BECO datasets: pseudo-label + confidence-mask training set and the resized val set.

Images and ground truth come from :mod:`voc12.data`; pseudo-labels (IRN ``sem_seg/<id>.png``) and
confidence masks (``mask_irn/<id>.png``) are read here because only this stage reads them.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from tools.errors import DataError, require_dir, require_file
from tools.imutils import normalize_imagenet, read_label_png
from tools.dataset import DatasetInfo, get_dataset
from voc12.data import load_gt, load_image

__all__ = ["PseudoMaskTrainSet", "ResizedValSet", "read_confidence_mask", "read_pseudo_label",
           "random_resized_crop_params"]

IRN_HINT = "run IRN (irn/run_sample.py, then irn/gen_mask.py), which writes segmentation/data/sem_seg and mask_irn"


def read_pseudo_label(path: os.PathLike | str) -> np.ndarray:
    """A pseudo-label PNG (mode L or P) -> ``(H, W)`` uint8 class ids (the reference's ``np.array(PIL)``)."""
    return read_label_png(require_file(path, "pseudo-label PNG", IRN_HINT))


def read_confidence_mask(path: os.PathLike | str) -> np.ndarray:
    """A confidence mask PNG -> ``(H, W)`` uint8 {0, 1}.

    The reference opens gen_mask's RGB 0/255 PNG with ``.convert('1')``; for 0/255 data that is
    ``value > 127``, which is computed here directly. A mask stored as 0/1 (max value 1) is read as is,
    where ``convert('1')`` would dither it to noise.
    """
    p = require_file(path, "confidence mask PNG", IRN_HINT)
    with Image.open(p) as im:
        a = np.array(im.convert("L"), dtype=np.uint8)
    return (a > 127).astype(np.uint8) if a.max() > 1 else a


def random_resized_crop_params(height: int, width: int, scale: Sequence[float],
                               ratio: Sequence[float]) -> tuple[int, int, int, int]:
    """Crop box of torchvision's ``RandomResizedCrop`` (its own ``get_params``, torch RNG) for an image of
    ``height`` x ``width``. Returns ``(top, left, h, w)``. torchvision is imported on first use only."""
    from torchvision.transforms import RandomResizedCrop

    probe = torch.empty(1, int(height), int(width))  # get_params only reads the spatial size
    i, j, h, w = RandomResizedCrop.get_params(probe, list(scale), list(ratio))
    return int(i), int(j), int(h), int(w)


def _resized_crop(img: Image.Image, t: int, l: int, h: int, w: int, size: int, resample: int) -> Image.Image:
    # = torchvision.transforms.functional.resized_crop on a PIL image
    return img.crop((l, t, l + w, t + h)).resize((size, size), resample)


def _to_tensor_normalised(img: Image.Image) -> torch.Tensor:
    return torch.from_numpy(normalize_imagenet(np.asarray(img, dtype=np.uint8)).transpose(2, 0, 1).copy())


class PseudoMaskTrainSet(Dataset):
    """Training items ``(image (3,S,S) float32 normalised, label (S,S) int64, mask (S,S) int64, id)``.

    Transform (torch RNG, as torchvision): RandomResizedCrop to ``crop_size`` with area fraction
    U(scale) and log-uniform aspect ratio (image bilinear, label/mask nearest), then a horizontal
    flip with probability 0.5. ``mask_dir=None`` gives an all-ones mask (train on every pixel, e.g.
    with ground truth as labels).
    """

    def __init__(self, root: os.PathLike | str, ids: Sequence[str], label_dir: os.PathLike | str,
                 mask_dir: os.PathLike | str | None, crop_size: int = 512,
                 scale: Sequence[float] = (0.5, 0.75), ratio: Sequence[float] = (3 / 4, 4 / 3),
                 dataset: DatasetInfo | str = "voc12") -> None:
        self.root = Path(root)
        self.dataset = get_dataset(dataset)
        self.ids = list(ids)
        self.label_dir = require_dir(label_dir, "pseudo-label folder", IRN_HINT)
        self.mask_dir = None if mask_dir is None else require_dir(mask_dir, "confidence-mask folder", IRN_HINT)
        self.crop_size = int(crop_size)
        self.scale = (float(scale[0]), float(scale[1]))
        self.ratio = (float(ratio[0]), float(ratio[1]))
        if not self.ids:
            raise DataError(f"training list for {self.root} is empty")

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int):
        name = self.ids[i]
        img = Image.fromarray(load_image(self.root, name, self.dataset))
        lab_arr = read_pseudo_label(self.label_dir / f"{name}.png")
        if lab_arr.shape != (img.height, img.width):
            raise DataError(f"pseudo-label {self.label_dir / (name + '.png')} is {lab_arr.shape}, "
                            f"image is {(img.height, img.width)}")
        lab = Image.fromarray(lab_arr)
        if self.mask_dir is None:
            msk = Image.fromarray(np.ones_like(lab_arr))
        else:
            msk = Image.fromarray(read_confidence_mask(self.mask_dir / f"{name}.png"))
        t, l, h, w = random_resized_crop_params(img.height, img.width, self.scale, self.ratio)
        img = _resized_crop(img, t, l, h, w, self.crop_size, Image.BILINEAR)
        lab = _resized_crop(lab, t, l, h, w, self.crop_size, Image.NEAREST)
        msk = _resized_crop(msk, t, l, h, w, self.crop_size, Image.NEAREST)
        if torch.rand(1).item() < 0.5:
            img, lab, msk = (im.transpose(Image.FLIP_LEFT_RIGHT) for im in (img, lab, msk))
        return (_to_tensor_normalised(img), torch.from_numpy(np.array(lab, dtype=np.int64)),
                torch.from_numpy(np.array(msk, dtype=np.int64)), name)


class ResizedValSet(Dataset):
    """Val/test items ``(image (3,S,S) float32 normalised, label (S,S) int64, id)``: image bilinear and
    label nearest resized to ``size`` x ``size`` (the reference scores main.py on 512x512 labels).
    ``size=0`` keeps the original size (batch size 1 then)."""

    def __init__(self, root: os.PathLike | str, ids: Sequence[str], size: int = 512,
                 label_folder: str | None = None, dataset: DatasetInfo | str = "voc12") -> None:
        self.root = Path(root)
        self.ids = list(ids)
        self.size = int(size)
        self.dataset = get_dataset(dataset)
        self.label_folder = label_folder or self.dataset.aug_gt_folder  # VOC: SegmentationClassAug

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int):
        name = self.ids[i]
        img = Image.fromarray(load_image(self.root, name, self.dataset))
        lab = Image.fromarray(load_gt(self.root, name, folder=self.label_folder, dataset=self.dataset))
        if self.size > 0:
            img = img.resize((self.size, self.size), Image.BILINEAR)
            lab = lab.resize((self.size, self.size), Image.NEAREST)
        return _to_tensor_normalised(img), torch.from_numpy(np.array(lab, dtype=np.int64)), name
