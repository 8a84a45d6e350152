"""A deterministic synthetic VOC-format dataset: the embedded default for the demo and the tests.

Each of the 20 VOC classes has its own signature -- a shape, a colour and a texture -- drawn with
per-instance jitter (size, aspect, rotation, hue, brightness) on cluttered backgrounds (smooth colour
fields, random distractor blobs, noise). Images hold 1-3 objects that may overlap; masks carry a
255 band on object borders like VOC. Learnable from image-level labels by a small CNN on CPU, but not
trivially: colour alone is ambiguous (distractors take any hue), objects occlude each other and
backgrounds vary.

CLI: ``python -m voc12.toy --out data/toy --n_train 200 --n_val 60 [--max_size 500] [--seed 0]``
"""
from __future__ import annotations

import argparse
import colorsys
import os
import sys
from pathlib import Path
from xml.sax.saxutils import escape

import numpy as np
from PIL import Image

from tools import cli
from tools.errors import run_cli
from voc12.dataset import VOC12, VOC_CLASSES
from tools.io import atomic_path, atomic_write_json, atomic_write_text, save_png
from tools.imutils import voc_palette

TOY_META = "toy_meta.json"
SHAPES = ("circle", "square", "triangle", "diamond", "hexagon", "star", "cross", "ring", "ellipse", "crescent")
TEXTURES = ("solid", "stripes", "checker", "dots")


def class_signature(c: int) -> tuple[str, float, str]:
    """(shape, hue in [0,1), texture) of class index ``c`` (0..19). Every triple is unique."""
    n = VOC12.num_fg  # hues spread over the VOC classes
    return SHAPES[c % 10], ((c * 7) % n) / float(n), TEXTURES[(c // 10) * 2 + (c % 2)]


def _hsv(h: float, s: float, v: float) -> np.ndarray:
    return np.array(colorsys.hsv_to_rgb(h % 1.0, s, v), dtype=np.float32) * 255.0


def _shape_mask(shape: str, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Inside-test on normalised, rotated coordinates (object spans about [-1, 1]^2)."""
    r = np.sqrt(u * u + v * v)
    ang = np.arctan2(v, u)
    if shape == "circle":
        return r <= 1.0
    if shape == "square":
        return (np.abs(u) <= 0.85) & (np.abs(v) <= 0.85)
    if shape == "triangle":
        return (v <= 0.75) & (1.7 * np.abs(u) <= 0.75 - v) & (v >= -1.0)
    if shape == "diamond":
        return np.abs(u) + np.abs(v) <= 1.0
    if shape == "hexagon":
        return (np.abs(v) <= 0.87) & (np.abs(v) * 0.577 + np.abs(u) <= 1.0)
    if shape == "star":
        return r <= 0.55 + 0.45 * np.cos(5 * ang) ** 2
    if shape == "cross":
        return ((np.abs(u) <= 0.3) & (np.abs(v) <= 1.0)) | ((np.abs(v) <= 0.3) & (np.abs(u) <= 1.0))
    if shape == "ring":
        return (r <= 1.0) & (r >= 0.55)
    if shape == "ellipse":
        return (u / 1.0) ** 2 + (v / 0.5) ** 2 <= 1.0
    if shape == "crescent":
        return (r <= 1.0) & (np.sqrt((u - 0.45) ** 2 + v ** 2) >= 0.75)
    raise ValueError(shape)


def _texture(tex: str, u: np.ndarray, v: np.ndarray, freq: float) -> np.ndarray:
    """0/1 pattern selecting the secondary colour."""
    if tex == "solid":
        return np.zeros_like(u, dtype=bool)
    if tex == "stripes":
        return (np.floor((u + v) * freq) % 2) == 0
    if tex == "checker":
        return ((np.floor(u * freq) + np.floor(v * freq)) % 2) == 0
    if tex == "dots":
        fu, fv = (u * freq) % 1.0 - 0.5, (v * freq) % 1.0 - 0.5
        return fu * fu + fv * fv < 0.09
    raise ValueError(tex)


def _smooth_field(rng: np.random.Generator, h: int, w: int, cells: int) -> np.ndarray:
    """Low-frequency random field in [0,1], (h, w, 3): a tiny random image upsampled bilinearly."""
    small = (rng.random((cells, cells, 3)) * 255).astype(np.uint8)
    return np.asarray(Image.fromarray(small).resize((w, h), Image.BILINEAR), dtype=np.float32) / 255.0


def _background(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    base = _hsv(rng.random(), rng.uniform(0.1, 0.5), rng.uniform(0.35, 0.85))
    field = _smooth_field(rng, h, w, int(rng.integers(2, 6)))
    img = base[None, None] * 0.55 + field * 255.0 * 0.45
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    for _ in range(int(rng.integers(2, 7))):  # distractor blobs: any hue, no texture, irregular outline
        cy, cx = rng.uniform(0, h), rng.uniform(0, w)
        rad = rng.uniform(0.05, 0.2) * min(h, w)
        a = np.arctan2(yy - cy, xx - cx)
        wobble = 1.0 + 0.25 * np.sin(int(rng.integers(2, 5)) * a + rng.uniform(0, 6.3))
        m = np.hypot(yy - cy, xx - cx) <= rad * wobble
        img[m] = img[m] * 0.4 + _hsv(rng.random(), rng.uniform(0.2, 0.9), rng.uniform(0.3, 0.9)) * 0.6
    return img


def draw_object(rng: np.random.Generator, img: np.ndarray, yy: np.ndarray, xx: np.ndarray, c: int,
                size: float | None = None, centre: tuple[float, float] | None = None) -> np.ndarray | None:
    """Paint one object of class index ``c`` into ``img`` (H, W, 3) float, in place, with its class
    signature and random pose and colour jitter; ``yy``/``xx`` are the (H, W) pixel coordinate grids.
    ``size`` (px) and ``centre`` (cy, cx in px) are drawn from ``rng`` unless given. Returns the
    object's full (H, W) bool mask, or None when it falls outside the image (nothing painted)."""
    h, w = yy.shape
    shape, hue, tex = class_signature(c)
    size = rng.uniform(0.22, 0.42) * min(h, w) if size is None else size
    cy = rng.uniform(0.2, 0.8) * h if centre is None else centre[0]
    cx = rng.uniform(0.2, 0.8) * w if centre is None else centre[1]
    th = rng.uniform(0, np.pi) if shape not in ("triangle",) else rng.uniform(-0.3, 0.3)
    asp = rng.uniform(0.8, 1.25)
    du, dv = (xx - cx) / size, (yy - cy) / size
    u = (np.cos(th) * du + np.sin(th) * dv) * asp
    v = (-np.sin(th) * du + np.cos(th) * dv) / asp
    m = _shape_mask(shape, u, v)
    if not m.any():
        return None
    col1 = _hsv(hue + rng.uniform(-0.02, 0.02), rng.uniform(0.65, 1.0), rng.uniform(0.6, 1.0))
    col2 = _hsv(hue + 0.5, rng.uniform(0.3, 0.7), rng.uniform(0.15, 0.45))
    pat = _texture(tex, u, v, freq=rng.uniform(2.5, 4.0))
    shade = 0.85 + 0.15 * np.clip(1 - 0.5 * (u + v), 0, 2)[..., None]
    obj = np.where(pat[..., None], col2, col1) * shade
    img[m] = obj[m]
    return m


def render_image(rng: np.random.Generator, h: int, w: int, n_obj: int,
                 n_classes: int = VOC12.num_fg) -> tuple[np.ndarray, np.ndarray, list]:
    """One image: ``(H, W, 3)`` uint8, ``(H, W)`` uint8 mask (0, 1..20, 255 borders), objects list
    ``[(class_idx, (xmin, ymin, xmax, ymax))]`` of the visible objects. Objects are drawn from the
    class indices ``0 .. n_classes - 1``."""
    img = _background(rng, h, w)
    inst = np.full((h, w), -1, dtype=np.int32)
    n_obj = min(n_obj, n_classes)
    classes = rng.choice(n_classes, size=n_obj, replace=bool(rng.random() < 0.15))
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    objs = []
    for k, c in enumerate(classes):
        m = draw_object(rng, img, yy, xx, int(c))
        if m is None:
            continue
        inst[m] = k
        objs.append(int(c))
    img = img + rng.normal(0, 6.0, img.shape)
    img = np.clip(img, 0, 255).astype(np.uint8)

    label = np.zeros((h, w), dtype=np.uint8)
    visible = []
    for k, c in enumerate(classes):
        m = inst == k
        if m.sum() < 0.004 * h * w:  # fully or almost fully occluded: not labelled, like VOC
            inst[m] = -1
            continue
        label[m] = int(c) + 1
        ys, xs = np.nonzero(m)
        visible.append((int(c), (int(xs.min()) + 1, int(ys.min()) + 1, int(xs.max()) + 1, int(ys.max()) + 1)))
    # 255 band on every border between different instances/background, like VOC's outline band.
    band = max(1, round(min(h, w) / 160))
    edge = np.zeros((h, w), dtype=bool)
    edge[:, 1:] |= inst[:, 1:] != inst[:, :-1]
    edge[1:, :] |= inst[1:, :] != inst[:-1, :]
    if edge.any():
        from scipy.ndimage import binary_dilation
        edge = binary_dilation(edge, iterations=band)
    label[edge] = 255
    return img, label, visible


def _xml(img_id: str, w: int, h: int, objects: list) -> str:
    parts = [f"<annotation><folder>VOC2012</folder><filename>{img_id}.jpg</filename>",
             f"<size><width>{w}</width><height>{h}</height><depth>3</depth></size><segmented>1</segmented>"]
    for c, (x0, y0, x1, y1) in objects:
        parts.append(f"<object><name>{escape(VOC_CLASSES[c])}</name><pose>Unspecified</pose><truncated>0</truncated>"
                     f"<difficult>0</difficult><bndbox><xmin>{x0}</xmin><ymin>{y0}</ymin><xmax>{x1}</xmax>"
                     f"<ymax>{y1}</ymax></bndbox></object>")
    parts.append("</annotation>\n")
    return "\n".join(parts)


def draw_image_size(rng: np.random.Generator, min_size: int, max_size: int) -> tuple[int, int]:
    """``(h, w)`` of one toy image: the long side mostly ``max_size`` (like VOC's 500), both sides in
    ``[min_size, max_size]``, landscape 70 % of the time."""
    long_side = max_size if rng.random() < 0.7 else int(rng.integers(min_size, max_size + 1))
    short_side = int(rng.integers(min_size, max_size + 1))
    return (long_side, short_side) if rng.random() < 0.3 else (short_side, long_side)


def toy_ids(n_train: int, n_val: int) -> tuple[list[str], list[str]]:
    """VOC-like 11-character ids: train ``2100_NNNNNN``, val ``2101_NNNNNN``."""
    return [f"2100_{i:06d}" for i in range(n_train)], [f"2101_{i:06d}" for i in range(n_val)]


def generate(out: os.PathLike | str, n_train: int = 200, n_val: int = 60, max_size: int = 500,
             min_size: int | None = None, seed: int = 0, quiet: bool = True, n_classes: int = VOC12.num_fg) -> dict:
    """Write the toy VOC tree under ``out``; deterministic for a given (arguments, seed).

    ``n_classes`` < 20 draws objects from the first ``n_classes`` VOC classes only (distinct shapes and
    hues up to 10): fewer classes to learn, so the tiny CPU budgets of the pipeline's toy presets
    train every stage; the others are simply absent (IoU 0 in the 21-class mean, as for any class
    missing from a split).

    Image sides are drawn in ``[min_size, max_size]`` (default ``min_size = 0.6 * max_size``), the long
    side mostly ``max_size`` like VOC's 500. Existing files with the same name are overwritten
    (atomically). Returns a summary dict (counts, class histogram).
    """
    out = Path(out)
    min_size = int(min_size or round(max_size * 0.6))
    if not 1 <= n_classes <= VOC12.num_fg:
        raise ValueError(f"n_classes must be in 1..{VOC12.num_fg}, got {n_classes}")
    train_ids, val_ids = toy_ids(n_train, n_val)
    for sub in ("JPEGImages", "SegmentationClass", "SegmentationClassAug", "Annotations", "ImageSets/Segmentation"):
        (out / sub).mkdir(parents=True, exist_ok=True)
    pal = voc_palette()
    hist = np.zeros(VOC12.num_fg, dtype=np.int64)
    n_cls = np.zeros(4, dtype=np.int64)
    all_ids = train_ids + val_ids
    iterator = all_ids
    if not quiet:
        from tqdm import tqdm
        iterator = tqdm(all_ids, desc="toy images")
    for i, img_id in enumerate(iterator):
        rng = np.random.default_rng([seed, i, 0 if i < n_train else 1])
        h, w = draw_image_size(rng, min_size, max_size)
        n_obj = int(rng.choice([1, 2, 3], p=[0.5, 0.35, 0.15]))
        for _ in range(10):
            img, label, objs = render_image(rng, h, w, n_obj, n_classes)
            if objs:
                break
        with atomic_path(out / "JPEGImages" / f"{img_id}.jpg") as tmp:
            Image.fromarray(img).save(tmp, format="JPEG", quality=90)
        save_png(out / "SegmentationClass" / f"{img_id}.png", label, palette=pal)
        save_png(out / "SegmentationClassAug" / f"{img_id}.png", label, palette=pal)
        atomic_write_text(out / "Annotations" / f"{img_id}.xml", _xml(img_id, w, h, objs))
        present = sorted({c for c, _ in objs})
        hist[present] += 1
        n_cls[len(present)] += 1
    seg = out / "ImageSets" / "Segmentation"
    atomic_write_text(seg / "train.txt", "\n".join(train_ids) + "\n")
    atomic_write_text(seg / "val.txt", "\n".join(val_ids) + "\n")
    atomic_write_text(seg / "trainval.txt", "\n".join(train_ids + val_ids) + "\n")
    summary = {"n_train": n_train, "n_val": n_val, "size": [min_size, max_size], "seed": seed, "classes": n_classes,
               "images_per_class": dict(zip(VOC_CLASSES, hist.tolist())),
               "classes_per_image": {str(k): int(n_cls[k]) for k in (1, 2, 3)}}
    # Written last: its presence (with matching arguments) tells a pipeline the set is complete.
    atomic_write_json(out / TOY_META, summary)
    return {"root": str(out), **summary}


def existing_toy(out: os.PathLike | str) -> dict | None:
    """The summary of a complete toy set at ``out`` (None if absent or interrupted mid-way)."""
    p = Path(out) / TOY_META
    if not p.is_file():
        return None
    import json

    return json.loads(p.read_text())


#: smallest image side the generator draws: objects stay a few pixels wide and keep their 255 border band
MIN_SIDE = 16


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description="Generate the synthetic toy VOC-format dataset.")
    ap.add_argument("--out", default="data/toy", help="output VOC root (default data/toy)")
    ap.add_argument("--n_train", type=cli.positive_int, default=200,
                    help="training images (ImageSets/Segmentation/train.txt)")
    ap.add_argument("--n_val", type=cli.positive_int, default=60, help="validation images (val.txt)")
    ap.add_argument("--max_size", type=cli.int_at_least(MIN_SIDE), default=500, help="long image side in px (VOC: 500)")
    ap.add_argument("--min_size", type=cli.int_at_least(MIN_SIDE), default=None,
                    help="smallest side (default 0.6 * max_size; at most --max_size)")
    ap.add_argument("--seed", type=cli.nonneg_int, default=0)
    ap.add_argument("--classes", type=cli.int_range(1, VOC12.num_fg), default=VOC12.num_fg,
                    help="draw objects from the first N VOC classes only (the pipeline's toy presets use fewer)")
    return ap


def run(a: argparse.Namespace) -> None:
    s = generate(a.out, a.n_train, a.n_val, a.max_size, a.min_size, a.seed, quiet=False, n_classes=a.classes)
    print(f"toy VOC set at {s['root']}: {s['n_train']} train + {s['n_val']} val images, sides {s['size'][0]}-{s['size'][1]} px")
    print("classes per image: " + ", ".join(f"{k}: {v}" for k, v in s["classes_per_image"].items()))
    print("images per class: " + ", ".join(f"{k} {v}" for k, v in s["images_per_class"].items()))
    print(f"next: python voc12/prepare.py --voc_root {a.out}")


def parse_toy_args(ap: argparse.ArgumentParser, argv: list[str] | None) -> argparse.Namespace:
    """Parse a toy generator's command line; ``--min_size`` above ``--max_size`` is refused like any bad
    flag (usage line, one error line, exit 2)."""
    a = ap.parse_args(argv)
    if a.min_size is not None and a.min_size > a.max_size:
        ap.error(f"argument --min_size: must be at most --max_size ({a.max_size}), got {a.min_size}")
    return a


def main(argv: list[str] | None = None) -> int:
    return run_cli(run, parse_toy_args(build_parser(), argv))

if __name__ == "__main__":
    sys.exit(main())
