"""Build the COCO 2014 masks, lists and image-level labels from the instance annotations.

Reads ``<coco_root>/annotations/instances_{train,val}2014.json`` and writes under ``<coco_root>``:

- ``SegmentationClass/{train2014,val2014}/<name>.png``: one palette PNG per listed image (``<name>`` is the
  JSON ``file_name`` without extension, e.g. ``COCO_train2014_000000000009``), at the image's JSON
  ``height`` x ``width``. The mask rule (it decides every COCO number this project reports):

  * class index: the 80 COCO category ids (1..90 with gaps) map to 1..80 in increasing id order
    (person -> 1, ..., toothbrush -> 80); background is 0;
  * overlaps: the non-crowd instances are painted in decreasing area order, so where instances overlap
    the smaller one wins. The area is the instance's own mask pixel count (not the JSON ``area`` field,
    which is a polygon area). Equal areas: the larger annotation id is painted later and wins;
  * crowd: pixels of a crowd region (``iscrowd`` 1) that no non-crowd instance covers become 255
    (ignored by every metric and loss); non-crowd instances keep their class inside crowd regions;
  * an annotation whose mask has no pixel (a degenerate polygon) paints nothing but still labels its
    image (below).

- ``train.txt`` / ``val.txt``: the sorted names of the images with at least one non-crowd annotation
  (images with no annotation, or only crowd ones, are skipped and get no mask); 82,081 / 40,137 names
  on the real files.
- ``val_part.txt``: the first 5,000 lines of the sorted ``val.txt`` (the fixed quick-check subset).
- ``cls_labels.npy``: like VOC's, ``np.save`` of a dict ``{name: float32 (80,) multi-hot}`` for every
  listed image of both splits, from its non-crowd annotations (crowd regions do not label an image).

The images themselves are not read. Masks are reused across runs (``SegmentationClass/<split>/
.provenance.json``, tools/provenance.py): a mask is recomputed only when its PNG is missing or its
image's annotations (or height/width) changed; masks of images that left the list are deleted. See
docs/deviations.md ("COCO") for how this compares with the masks other codebases use.

Usage: ``python coco14/prepare.py --coco_root data/COCO2014 [--workers 8] [--overwrite]``
"""
from __future__ import annotations

import argparse
import hashlib
import json
import multiprocessing as mp
import os
import sys
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the repo importable without installation
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np
from tqdm import tqdm

from coco14.dataset import COCO14, COCO_CATEGORY_IDS, COCO_CLASSES, SPLITS
from tools import cli
from tools.errors import DataError, require_all, require_dir, run_cli
from tools.io import atomic_save_npy, atomic_write_text, save_png
from tools.provenance import Provenance

VERSION = 1  # output format of the masks; bump when the mask rule changes
VAL_PART_SIZE = 5000
ANN_HINT = ("Download annotations_trainval2014.zip from http://images.cocodataset.org/annotations/"
            "annotations_trainval2014.zip and extract it into the COCO root (it holds annotations/"
            "instances_train2014.json); for a quick start make the toy set: python -m coco14.toy --out data/coco_toy")
#: COCO category id -> class index 1..80
CLASS_INDEX: dict[int, int] = {cid: k + 1 for k, cid in enumerate(COCO_CATEGORY_IDS)}

# one annotation as kept for rasterisation: (annotation id, class index 1..80, iscrowd, segmentation)
Ann = tuple


def annotation_path(coco_root: os.PathLike | str, split: str) -> Path:
    """``<coco_root>/annotations/instances_<split>.json``."""
    return Path(coco_root) / "annotations" / f"instances_{split}.json"


@dataclass
class SplitAnnotations:
    """One split's annotations, grouped per image: ``sizes`` name -> (height, width); ``anns`` name ->
    its annotations sorted by id (crowd included; names without any annotation map to [])."""

    split: str
    path: Path
    sizes: dict[str, tuple[int, int]] = field(default_factory=dict)
    anns: dict[str, list[Ann]] = field(default_factory=dict)

    def labelled(self, name: str) -> bool:
        """Whether the image has at least one non-crowd annotation (it is listed and gets a mask)."""
        return any(not a[2] for a in self.anns[name])

    def labels(self, name: str) -> np.ndarray:
        """``(80,)`` float32 multi-hot of the classes of the image's non-crowd annotations."""
        v = np.zeros(len(COCO_CATEGORY_IDS), dtype=np.float32)
        for _, c, crowd, _ in self.anns[name]:
            if not crowd:
                v[c - 1] = 1.0
        return v

    def item_key(self, name: str) -> str:
        """A digest of everything the image's mask depends on (size and annotations)."""
        blob = json.dumps([self.sizes[name], self.anns[name]], separators=(",", ":"))
        return hashlib.sha1(blob.encode()).hexdigest()


def _bad(path: Path, what: str) -> DataError:
    return DataError(f"annotation file '{path}' is malformed: {what}. Expected COCO instances JSON. {ANN_HINT}")


def load_split(path: os.PathLike | str, split: str) -> SplitAnnotations:
    """Parse and check one ``instances_<split>.json``; every problem is one :class:`DataError` naming the file."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            data = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DataError(f"annotation file '{path}' is not valid JSON ({e}); the download or extraction is "
                        f"incomplete. {ANN_HINT}") from e
    if not isinstance(data, dict) or not all(isinstance(data.get(k), list) for k in
                                             ("images", "annotations", "categories")):
        raise _bad(path, "no 'images', 'annotations' and 'categories' lists at the top level")
    try:
        cats = sorted((int(c["id"]), str(c["name"])) for c in data["categories"])
    except (KeyError, TypeError, ValueError) as e:
        raise _bad(path, f"a category without an integer 'id' and a 'name' ({e!r})") from e
    if cats != list(zip(COCO_CATEGORY_IDS, COCO_CLASSES)):
        raise _bad(path, f"its {len(cats)} categories are not the 80 COCO categories (ids 1..90 with gaps, "
                         "person .. toothbrush)")
    out = SplitAnnotations(split, path)
    by_id: dict[int, str] = {}
    for im in data["images"]:
        try:
            name = Path(str(im["file_name"])).stem
            h, w, iid = int(im["height"]), int(im["width"]), int(im["id"])
        except (KeyError, TypeError, ValueError) as e:
            raise _bad(path, f"image entry {str(im)[:80]} lacks an integer 'id', 'height', 'width' or a "
                             f"'file_name' ({e!r})") from e
        if h <= 0 or w <= 0 or iid in by_id or name in out.sizes:
            raise _bad(path, f"image '{name}' (id {iid}) is repeated or has a size of {h}x{w}")
        if name.split("_")[1:2] != [split]:
            raise _bad(path, f"image file name '{im['file_name']}' does not name the {split} split "
                             f"(expected COCO_{split}_<12-digit id>.jpg)")
        by_id[iid] = name
        out.sizes[name] = (h, w)
        out.anns[name] = []
    for k, a in enumerate(data["annotations"]):
        try:
            aid, iid, cid = int(a["id"]), int(a["image_id"]), int(a["category_id"])
            crowd, segm = int(a.get("iscrowd", 0)), a["segmentation"]
        except (KeyError, TypeError, ValueError) as e:
            raise _bad(path, f"annotation #{k} lacks an integer 'id', 'image_id', 'category_id' or a "
                             f"'segmentation' ({e!r})") from e
        if iid not in by_id:
            raise _bad(path, f"annotation {aid} refers to image id {iid}, which is not in 'images'")
        if cid not in CLASS_INDEX:
            raise _bad(path, f"annotation {aid} has category id {cid}, which is not a COCO category")
        out.anns[by_id[iid]].append((aid, CLASS_INDEX[cid], 1 if crowd else 0, segm))
    for anns in out.anns.values():
        anns.sort(key=lambda a: a[0])
    return out


def segmentation_rle(segm, h: int, w: int):
    """pycocotools RLE of a polygon list, an uncompressed RLE (``counts`` list) or a compressed one."""
    from pycocotools import mask as mask_utils

    if isinstance(segm, list):
        return mask_utils.merge(mask_utils.frPyObjects(segm, h, w))
    if isinstance(segm, dict) and "counts" in segm and "size" in segm:
        if [int(s) for s in segm["size"]] != [h, w]:
            raise ValueError(f"RLE size {segm['size']} differs from the image size [{h}, {w}]")
        return mask_utils.frPyObjects(segm, h, w) if isinstance(segm["counts"], list) else segm
    raise ValueError("segmentation is neither a polygon list nor an RLE dict with 'counts' and 'size'")


def rasterise(h: int, w: int, anns: list[Ann], where: str = "") -> np.ndarray:
    """The ``(h, w)`` uint8 class-index mask of one image's annotations by the module's rule
    (0 background, 1..80 classes, 255 crowd not covered by a non-crowd instance)."""
    from pycocotools import mask as mask_utils

    label = np.zeros((h, w), dtype=np.uint8)
    crowd = np.zeros((h, w), dtype=bool)
    painted = []
    for aid, c, is_crowd, segm in anns:
        try:
            rle = segmentation_rle(segm, h, w)
            m, area = mask_utils.decode(rle).view(bool), int(mask_utils.area(rle))
        except Exception as e:  # pycocotools raises bare Exception/TypeError on bad input
            raise DataError(f"annotation {aid}{where} has a segmentation pycocotools cannot read ({e}). "
                            f"{ANN_HINT}") from e
        if is_crowd:
            crowd |= m
        else:
            painted.append((-area, aid, c, m))
    for _, _, c, m in sorted(painted, key=lambda t: (t[0], t[1])):  # largest first; equal area: smaller id first
        label[m] = c
    label[crowd & (label == 0)] = 255
    return label


# Set before the worker pool forks; the workers read it instead of receiving each image's annotations.
_STATE: tuple[SplitAnnotations, Path, np.ndarray] | None = None


def _mask_job(name: str) -> str:
    split, out_dir, palette = _STATE
    h, w = split.sizes[name]
    label = rasterise(h, w, split.anns[name], f" of image '{name}' in '{split.path}'")
    save_png(out_dir / f"{name}.png", label, palette=palette)
    return name


def make_masks(split: SplitAnnotations, out_dir: Path, names: list[str], workers: int,
               overwrite: bool = False, quiet: bool = True) -> tuple[int, int]:
    """Write the masks of ``names`` not reusable from an earlier run; return (written, reused)."""
    global _STATE
    out_dir.mkdir(parents=True, exist_ok=True)
    prov = Provenance(out_dir, "coco14_prepare", VERSION, {}, {"split": split.split})
    old_items = (prov.old or {}).get("items") or {}
    outputs = lambda n: [out_dir / f"{n}.png"]  # noqa: E731
    plan = prov.start(names, outputs, split.item_key, overwrite, f"{split.split} masks")
    listed = set(names)
    for n in old_items:  # masks of images that are no longer listed (their annotations were removed)
        if n not in listed:
            (out_dir / f"{n}.png").unlink(missing_ok=True)
    _STATE = (split, out_dir, COCO14.palette())
    try:
        bar = tqdm(total=len(plan.todo), desc=f"{split.split} masks", disable=quiet or not plan.todo)
        n_proc = max(1, min(workers, len(plan.todo)))
        if n_proc == 1 or "fork" not in mp.get_all_start_methods():
            for n in plan.todo:
                _mask_job(n)
                bar.update()
        else:
            with mp.get_context("fork").Pool(n_proc) as pool:
                for _ in pool.imap_unordered(_mask_job, plan.todo, chunksize=16):
                    bar.update()
        bar.close()
    finally:
        _STATE = None
    prov.finish()
    return len(plan.todo), len(plan.done)


def prepare(coco_root: os.PathLike | str, workers: int = 1, overwrite: bool = False, quiet: bool = True,
            val_part_size: int = VAL_PART_SIZE) -> dict:
    """Write the masks, lists and ``cls_labels.npy`` under ``coco_root``; return a summary per split
    (images, listed, no_annotation, only_crowd, written, reused, class_images) plus the paths."""
    root = require_dir(coco_root, "COCO root", COCO14.root_hint)
    paths = {s: annotation_path(root, s) for s in SPLITS}
    require_all([(p, "COCO annotation file", ANN_HINT) for p in paths.values()])
    summary: dict = {"root": str(root)}
    lists: dict[str, list[str]] = {}
    labels: dict[str, np.ndarray] = {}
    for s in SPLITS:  # one split in memory at a time (the train JSON alone takes a few GB once parsed)
        if not quiet:
            print(f"reading {paths[s]}", flush=True)
        data = load_split(paths[s], s)
        names = sorted(n for n in data.sizes if data.labelled(n))
        written, reused = make_masks(data, COCO14.gt_dir(root) / s, names, workers, overwrite, quiet)
        hist = Counter()
        for n in names:
            labels[n] = data.labels(n)
            hist.update(np.flatnonzero(labels[n]).tolist())
        crowd_only = sum(1 for n, a in data.anns.items() if a and not data.labelled(n))
        summary[s] = {"images": len(data.sizes), "listed": len(names), "only_crowd": crowd_only,
                      "no_annotation": sum(1 for a in data.anns.values() if not a),
                      "written": written, "reused": reused,
                      "class_images": {COCO_CLASSES[k]: hist.get(k, 0) for k in range(len(COCO_CLASSES))}}
        lists[s] = names
        del data
    files = {"train": lists["train2014"], "val": lists["val2014"], "val_part": lists["val2014"][:val_part_size]}
    for key, names in files.items():
        atomic_write_text(COCO14.list_path(key, root), "".join(f"{n}\n" for n in names))
    atomic_save_npy(COCO14.cls_labels_path(root), labels)
    summary["lists"] = {k: len(v) for k, v in files.items()}
    return summary


def _class_line(hist: dict[str, int], k: int = 5) -> str:
    ranked = sorted(hist.items(), key=lambda t: (-t[1], t[0]))
    fmt = lambda items: ", ".join(f"{n} {c:,}" for n, c in items)  # noqa: E731
    return f"most {fmt(ranked[:k])}; least {fmt(ranked[::-1][:k])}"


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description="Write the COCO 2014 class masks (SegmentationClass/), train.txt, "
                                             "val.txt, val_part.txt and cls_labels.npy under the COCO root.")
    ap.add_argument("--coco_root", default=COCO14.default_root,
                    help=f"COCO 2014 folder holding annotations/instances_*2014.json (default {COCO14.default_root})")
    ap.add_argument("--workers", type=cli.positive_int, default=min(8, os.cpu_count() or 1),
                    help="processes rasterising masks (default: CPU cores, at most 8)")
    ap.add_argument("--overwrite", action="store_true", help="recompute every mask, even unchanged ones")
    return ap


def _run(a: argparse.Namespace) -> None:
    s = prepare(a.coco_root, a.workers, a.overwrite, quiet=False)
    for split in SPLITS:
        d = s[split]
        print(f"{split}: {d['images']:,} images, {d['listed']:,} listed; skipped {d['no_annotation']:,} without "
              f"annotations and {d['only_crowd']:,} with only crowd ones; masks: {d['written']:,} written, "
              f"{d['reused']:,} reused")
        print(f"  images per class: {_class_line(d['class_images'])}")
    n = s["lists"]
    print(f"wrote {s['root']}: train.txt {n['train']:,}, val.txt {n['val']:,}, val_part.txt {n['val_part']:,}, "
          f"cls_labels.npy {n['train'] + n['val']:,} images")


def main(argv: list[str] | None = None) -> int:
    return run_cli(_run, build_parser().parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
