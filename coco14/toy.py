"""A deterministic synthetic COCO-format dataset: a small tree that ``coco14/prepare.py`` reads like the real one.

Writes under ``--out``:
- ``train2014/COCO_train2014_<12-digit id>.jpg`` and ``val2014/COCO_val2014_<12-digit id>.jpg``;
- ``annotations/instances_{train,val}2014.json`` in the COCO instances format: ``images`` (id,
  file_name, height, width), ``annotations`` (id, image_id, category_id, segmentation, area, bbox,
  iscrowd) and ``categories`` (all 80 real COCO categories, ids 1..90 with gaps, as the real files).
  Images and annotations are listed in a shuffled order, as in the real files.

Objects come from 6 real categories spread over the id range (:data:`TOY_CATEGORY_IDS`: person 1,
cat 17, bottle 44, chair 62, tv 72, toothbrush 90), each drawn with one of the VOC toy's class
signatures (shape, colour, texture; voc12/toy.py). An object's annotation is its full shape, also where
a smaller object drawn on top hides it, so annotations overlap as COCO's polygons do; objects are drawn
largest first, so the picture agrees with prepare's "smaller instance wins" rule. Non-crowd
segmentations cycle through polygon, polygon, uncompressed RLE and compressed RLE; crowd regions
(``iscrowd`` 1, an uncompressed RLE as in the real files) cover a cluster of small objects of one class.

Per split, image 0 holds three nested overlapping objects of different sizes (one per encoding) and
a crowd region overlapping the largest, image 1 has no annotation, image 2 only a crowd region; the others get 1-3
objects and sometimes a crowd region. Deterministic for a given (arguments, seed).

CLI: ``python -m coco14.toy --out data/coco_toy --n_train 200 --n_val 60 [--max_size 500] [--seed 0]``
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import numpy as np
from PIL import Image

from coco14.dataset import COCO_CATEGORY_IDS, COCO_CLASSES, SPLITS
from coco14.prepare import segmentation_rle
from tools import cli
from tools.errors import run_cli
from tools.io import atomic_path, atomic_write_json
from voc12.toy import MIN_SIDE, TOY_META, _background, draw_image_size, draw_object, parse_toy_args

#: the categories objects are drawn from; the k-th uses the VOC toy's class signature k
TOY_CATEGORY_IDS: tuple[int, ...] = (1, 17, 44, 62, 72, 90)
ENCODINGS = ("polygon", "polygon", "rle", "compressed_rle")  # cycled over the non-crowd annotations
MIN_IMAGES = 3  # per split: the three fixed cases (overlaps + crowd, nothing, only crowd)


def image_name(split: str, image_id: int) -> str:
    """``COCO_train2014_000000000009`` for ``("train2014", 9)``."""
    return f"COCO_{split}_{image_id:012d}"


def toy_image_ids(split: str, n: int) -> list[int]:
    """Sparse, split-disjoint COCO image ids (train 9, 26, 43, ...; val 42, 59, 76, ...)."""
    first = 9 if split == "train2014" else 42
    return [first + 17 * j for j in range(n)]


def uncompressed_rle(mask: np.ndarray) -> dict:
    """COCO's uncompressed RLE of a (H, W) bool mask: column-major run lengths, starting with a 0-run."""
    flat = np.asarray(mask, dtype=np.int8).ravel(order="F")
    bounds = np.concatenate([[0], np.flatnonzero(np.diff(flat)) + 1, [flat.size]])
    counts = np.diff(bounds).tolist()
    if flat.size and flat[0] == 1:
        counts = [0] + counts
    return {"counts": [int(c) for c in counts], "size": [int(mask.shape[0]), int(mask.shape[1])]}


def polygons(mask: np.ndarray) -> list[list[float]]:
    """Outer contours of a (H, W) bool mask as COCO polygons ``[x0, y0, x1, y1, ...]`` through the
    boundary pixels' centres; contours of fewer than 3 points are dropped."""
    import cv2

    contours, _ = cv2.findContours(mask.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
    return [[round(float(v) + 0.5, 2) for v in c.reshape(-1)] for c in contours if len(c) >= 3]


def encode(mask: np.ndarray, encoding: str) -> tuple[object, str]:
    """``(segmentation, encoding used)`` of a bool mask; a polygon too small to trace becomes an RLE."""
    from pycocotools import mask as mask_utils

    if encoding == "polygon":
        poly = polygons(mask)
        if poly:
            return poly, "polygon"
        encoding = "rle"
    if encoding == "compressed_rle":
        rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
        return {"counts": rle["counts"].decode("ascii"), "size": [int(s) for s in rle["size"]]}, encoding
    return uncompressed_rle(mask), "rle"


def _layout(rng: np.random.Generator, j: int, h: int, w: int) -> tuple[list, tuple | None]:
    """Objects ``[(toy class, size px, (cy, cx))]`` and the crowd ``(toy class, [(size, centre)])`` (or
    None) of the ``j``-th image of a split."""
    s = min(h, w)
    n_cls = len(TOY_CATEGORY_IDS)
    if j == 0:  # nested overlaps of three sizes, a crowd region reaching into the largest
        classes = rng.choice(n_cls, size=3, replace=False)
        cy, cx = h / 2, w / 2
        objs = [(int(c), f * s, (cy + rng.uniform(-0.06, 0.06) * s, cx + rng.uniform(-0.06, 0.06) * s))
                for c, f in zip(classes, (0.42, 0.27, 0.14))]
        crowd_centre = (cy + 0.22 * s, cx - 0.22 * s)
        return objs, (int(rng.integers(n_cls)), crowd_centre)
    if j == 1:
        return [], None
    if j == 2:
        return [], (int(rng.integers(n_cls)), (rng.uniform(0.3, 0.7) * h, rng.uniform(0.3, 0.7) * w))
    n_obj = int(rng.choice([1, 2, 3], p=[0.5, 0.35, 0.15]))
    objs = [(int(rng.integers(n_cls)), rng.uniform(0.15, 0.42) * s,
             (rng.uniform(0.2, 0.8) * h, rng.uniform(0.2, 0.8) * w)) for _ in range(n_obj)]
    crowd = None
    if rng.random() < 0.25:
        crowd = (int(rng.integers(n_cls)), (rng.uniform(0.25, 0.75) * h, rng.uniform(0.25, 0.75) * w))
    return objs, crowd


def render(rng: np.random.Generator, j: int, h: int, w: int) -> tuple[np.ndarray, list, list]:
    """One image: ``(H, W, 3)`` uint8, the non-crowd objects ``[(category id, full (H, W) bool mask)]``
    and the crowd regions ``[(category id, (H, W) bool mask)]``."""
    from scipy.ndimage import binary_dilation

    objs, crowd = _layout(rng, j, h, w)
    s = min(h, w)
    items = [(size, c, centre, None) for c, size, centre in objs]
    if crowd is not None:
        c, (cy, cx) = crowd
        for _ in range(int(rng.integers(3, 6))):
            centre = (cy + rng.uniform(-0.12, 0.12) * s, cx + rng.uniform(-0.12, 0.12) * s)
            items.append((rng.uniform(0.05, 0.09) * s, c, centre, "crowd"))
    img = _background(rng, h, w)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    instances, members = [], []
    # largest first: a smaller object is drawn over a larger one, as prepare's overlap rule assumes
    for size, c, centre, kind in sorted(items, key=lambda t: -t[0]):
        m = draw_object(rng, img, yy, xx, c, size=size, centre=centre)
        if m is None:
            continue
        (members if kind else instances).append((TOY_CATEGORY_IDS[c], m))
    crowds = []
    if members:
        union = np.logical_or.reduce([m for _, m in members])
        crowds.append((members[0][0], binary_dilation(union, iterations=max(1, round(0.03 * s)))))
    img = np.clip(img + rng.normal(0, 6.0, img.shape), 0, 255).astype(np.uint8)
    return img, instances, crowds


def generate(out: os.PathLike | str, n_train: int = 200, n_val: int = 60, max_size: int = 500,
             min_size: int | None = None, seed: int = 0, quiet: bool = True) -> dict:
    """Write the toy COCO tree under ``out`` (``n_train``/``n_val`` >= 3 images; sides in
    ``[min_size, max_size]``, default ``min_size = 0.6 * max_size``) and return a summary dict."""
    from pycocotools import mask as mask_utils

    out = Path(out)
    min_size = int(min_size or round(max_size * 0.6))
    if min(n_train, n_val) < MIN_IMAGES:
        raise ValueError(f"n_train and n_val must be at least {MIN_IMAGES}, got {n_train} and {n_val}")
    categories = [{"id": i, "name": n} for i, n in zip(COCO_CATEGORY_IDS, COCO_CLASSES)]
    counts = {"images": {}, "annotations": {}, "encodings": {"polygon": 0, "rle": 0, "compressed_rle": 0},
              "crowd": 0, "no_annotation": 0, "only_crowd": 0}
    next_ann = 1
    for code, (split, n) in enumerate(zip(SPLITS, (n_train, n_val))):
        (out / split).mkdir(parents=True, exist_ok=True)
        images, anns = [], []
        names = list(enumerate(toy_image_ids(split, n)))
        it = names
        if not quiet:
            from tqdm import tqdm
            it = tqdm(names, desc=f"toy {split}")
        for j, image_id in it:
            rng = np.random.default_rng([seed, j, code])
            h, w = draw_image_size(rng, min_size, max_size)
            img, instances, crowds = render(rng, j, h, w)
            name = image_name(split, image_id)
            with atomic_path(out / split / f"{name}.jpg") as tmp:
                Image.fromarray(img).save(tmp, format="JPEG", quality=90)
            images.append({"id": image_id, "file_name": f"{name}.jpg", "height": h, "width": w})
            entries = []
            for k, (cid, m) in enumerate(instances):
                wanted = ("polygon", "rle", "compressed_rle")[k] if j == 0 else ENCODINGS[next_ann % 4]
                entries.append((cid, encode(m, wanted), 0))
            entries += [(cid, (uncompressed_rle(m), "rle"), 1) for cid, m in crowds]
            # ids in no particular size order (instances were drawn largest first), as in the real files
            entries = [entries[i] for i in rng.permutation(len(entries))]
            for cid, (segm, used), crowd in entries:
                rle = segmentation_rle(segm, h, w)
                anns.append({"id": next_ann, "image_id": image_id, "category_id": cid, "segmentation": segm,
                             "area": float(mask_utils.area(rle)),
                             "bbox": [round(float(v), 2) for v in mask_utils.toBbox(rle)], "iscrowd": crowd})
                counts["encodings"][used] += 1
                counts["crowd"] += crowd
                next_ann += 1
            counts["no_annotation"] += not entries
            counts["only_crowd"] += bool(crowds) and not instances
        order = np.random.default_rng([seed, 99, code])
        data = {"info": {"description": "ktse-wsss synthetic COCO-format toy set (python -m coco14.toy)",
                         "seed": seed},
                "licenses": [],
                "images": [images[i] for i in order.permutation(len(images))],
                "annotations": [anns[i] for i in order.permutation(len(anns))],
                "categories": categories}
        atomic_write_json(out / "annotations" / f"instances_{split}.json", data, indent=None)
        counts["images"][split] = len(images)
        counts["annotations"][split] = len(anns)
    summary = {"n_train": n_train, "n_val": n_val, "size": [min_size, max_size], "seed": seed,
               "categories": [COCO_CLASSES[COCO_CATEGORY_IDS.index(i)] for i in TOY_CATEGORY_IDS], **counts}
    # Written last: its presence (with matching arguments) tells a pipeline the set is complete.
    atomic_write_json(out / TOY_META, summary)
    return {"root": str(out), **summary}


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description="Generate the synthetic toy COCO-format dataset.")
    ap.add_argument("--out", default="data/coco_toy", help="output COCO root (default data/coco_toy)")
    ap.add_argument("--n_train", type=cli.int_at_least(MIN_IMAGES), default=200, help="train2014 images")
    ap.add_argument("--n_val", type=cli.int_at_least(MIN_IMAGES), default=60, help="val2014 images")
    ap.add_argument("--max_size", type=cli.int_at_least(MIN_SIDE), default=500, help="long image side in px")
    ap.add_argument("--min_size", type=cli.int_at_least(MIN_SIDE), default=None,
                    help="smallest side (default 0.6 * max_size; at most --max_size)")
    ap.add_argument("--seed", type=cli.nonneg_int, default=0)
    return ap


def run(a: argparse.Namespace) -> None:
    s = generate(a.out, a.n_train, a.n_val, a.max_size, a.min_size, a.seed, quiet=False)
    print(f"toy COCO set at {s['root']}: {s['n_train']} train + {s['n_val']} val images, sides "
          f"{s['size'][0]}-{s['size'][1]} px, categories {', '.join(s['categories'])}")
    print(f"annotations: {s['annotations']} ({s['crowd']} crowd); encodings {s['encodings']}; "
          f"{s['no_annotation']} images without annotations, {s['only_crowd']} with only crowd")
    print(f"next: python coco14/prepare.py --coco_root {a.out}")


def main(argv: list[str] | None = None) -> int:
    return run_cli(run, parse_toy_args(build_parser(), argv))


if __name__ == "__main__":
    sys.exit(main())
