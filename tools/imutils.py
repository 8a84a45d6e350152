"""Image reading, the VOC palette and label PNGs, ImageNet normalisation and PIL resizing.

Every stage reads images through :func:`read_rgb` so that a missing or corrupt file always gives
the same clear error naming the path.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from PIL import Image

from tools.errors import DataError, MissingFileError

# VOC's names stay importable from here for older callers; the class set of a run comes from its
# dataset descriptor (tools.dataset), whose VOC instance is the default of every function below.
from voc12.dataset import VOC12, VOC_CLASSES  # noqa: E402,F401

CAT_NAMES_BG: tuple[str, ...] = VOC12.names_bg
IGNORE_INDEX = 255

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def voc_palette(n: int = 256) -> np.ndarray:
    """The standard VOC bit-interleaved colour map, ``(n, 3)`` uint8 (1 -> (128,0,0), 255 -> (224,224,192));
    every dataset's palette (:meth:`tools.dataset.DatasetInfo.palette`) follows this rule."""
    from tools.dataset import bit_interleaved_palette

    return bit_interleaved_palette(n)


def _open_image(path: os.PathLike | str, what: str) -> Image.Image:
    p = Path(path)
    if not p.is_file():
        raise MissingFileError(f"{what} not found: '{p}' (expected a file).")
    try:
        im = Image.open(p)
        im.load()  # decode now so truncation surfaces here, with the path
    except (OSError, SyntaxError, ValueError) as e:
        raise DataError(f"cannot decode {what} '{p}': {e}. The file is corrupt or truncated; "
                        "re-download or re-extract it.") from e
    return im


def read_rgb(path: os.PathLike | str) -> np.ndarray:
    """Read an image file as RGB, ``(H, W, 3)`` uint8. Missing/corrupt files raise errors naming the path."""
    im = _open_image(path, "image")
    return np.asarray(im.convert("RGB"), dtype=np.uint8).copy()


def read_label_png(path: os.PathLike | str, num_classes: int | None = None) -> np.ndarray:
    """Read a label map PNG as class indices ``(H, W)`` uint8.

    Palette ('P') PNGs give their indices (never colours); grayscale ('L') PNGs their values. A
    16/32-bit grayscale PNG ('I;16', 'I') is accepted only when every value fits in 0..255 (a plain
    cast would read 256 as 0 and 257 as 1). An RGB image is refused: its colours are not indices.
    ``num_classes``: when given, every value must be a class index ``< num_classes`` or
    ``IGNORE_INDEX`` (use :func:`read_gt_png` for ground truth); predictions are read without it.
    """
    im = _open_image(path, "label map")
    if im.mode in ("P", "L"):
        lab = np.asarray(im, dtype=np.uint8).copy()
    elif im.mode.startswith("I"):
        wide = np.asarray(im)
        if wide.size and (int(wide.min()) < 0 or int(wide.max()) > 255):
            raise DataError(f"label map '{path}' is a {im.mode} PNG with values from {int(wide.min())} to "
                            f"{int(wide.max())}; class indices must lie in 0..255. Save it as an 8-bit palette "
                            "(P) or grayscale (L) PNG of class indices.")
        lab = wide.astype(np.uint8)
    else:
        raise DataError(f"label map '{path}' has PIL mode {im.mode}; expected a palette (P) or grayscale (L) "
                        "PNG whose pixel values are class indices.")
    if num_classes is not None:
        check_class_values(lab, path, num_classes)
    return lab


def check_class_values(lab: np.ndarray, path: os.PathLike | str, num_classes: int = VOC12.num_classes) -> None:
    """Raise :class:`DataError` naming ``path`` unless every value of ``lab`` is ``< num_classes`` or
    ``IGNORE_INDEX``. A value such as 30 would otherwise be counted as a valid pixel of no class."""
    if not lab.size or int(lab.max()) < num_classes:
        return
    bad = (lab >= num_classes) & (lab != IGNORE_INDEX)
    if bad.any():
        vals = np.unique(lab[bad])
        raise DataError(f"label map '{path}' holds value(s) {', '.join(str(int(v)) for v in vals[:5])}"
                        f"{' ...' if vals.size > 5 else ''} in {int(bad.sum())} pixel(s); expected class indices "
                        f"0..{num_classes - 1} and {IGNORE_INDEX} (ignore) only, as in the dataset's SegmentationClass "
                        "palette PNGs. Check that the folder holds label maps of this dataset's classes.")


def read_gt_png(path: os.PathLike | str, num_classes: int = VOC12.num_classes) -> np.ndarray:
    """Ground-truth label map ``(H, W)`` uint8: values ``0..num_classes-1`` or 255,
    anything else is a :class:`DataError` naming the file. Every ground-truth read goes through here."""
    return read_label_png(path, num_classes=num_classes)


def write_label_png(path: os.PathLike | str, label: np.ndarray, palette: bool = True) -> None:
    """Write a ``(H, W)`` uint8 label map atomically, as a VOC palette PNG (default) or plain grayscale."""
    from tools.io import save_png

    save_png(path, np.asarray(label, dtype=np.uint8), palette=voc_palette() if palette else None)


def normalize_imagenet(img: np.ndarray) -> np.ndarray:
    """``(H, W, 3)`` uint8 RGB -> ``(H, W, 3)`` float32 ``(v/255 - mean)/std`` (computed in float64 as the reference)."""
    x = np.asarray(img, dtype=np.float64) / 255.0
    x = (x - np.asarray(IMAGENET_MEAN)) / np.asarray(IMAGENET_STD)
    return x.astype(np.float32)


def denormalize_imagenet(x: np.ndarray) -> np.ndarray:
    """Inverse of :func:`normalize_imagenet` for display: ``(H, W, 3)`` float -> uint8 RGB (clipped)."""
    v = (np.asarray(x, dtype=np.float64) * np.asarray(IMAGENET_STD) + np.asarray(IMAGENET_MEAN)) * 255.0
    return np.clip(np.round(v), 0, 255).astype(np.uint8)


_PIL_ORDERS = {"bicubic": Image.BICUBIC, "bilinear": Image.BILINEAR, "nearest": Image.NEAREST}


def pil_resize(img: np.ndarray, size_hw: tuple[int, int], order: str = "bicubic") -> np.ndarray:
    """Resize a uint8 ``(H, W[, C])`` array to ``size_hw`` with PIL (antialiased bicubic when shrinking,
    as the reference numerics require)."""
    h, w = int(size_hw[0]), int(size_hw[1])
    if img.shape[0] == h and img.shape[1] == w:
        return img
    return np.asarray(Image.fromarray(img).resize((w, h), resample=_PIL_ORDERS[order]))
