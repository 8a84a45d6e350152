"""Build the stage-one lists and class labels from a VOC2012 (+ optional SBD) tree.

Writes into ``--out_dir`` (default ``voc12/``):
- ``train.txt``, ``val.txt``: VOC ``ImageSets/Segmentation`` train/val;
- ``train_aug.txt``: (SBD train ∪ SBD val ∪ VOC seg train) − VOC seg val (10,582 ids on the real data), or,
  without an SBD tree, every id with a ``SegmentationClassAug`` mask minus val (or VOC train when there is no
  Aug folder either);
- ``cls_labels.npy``: ``{id: float32 (20,)}`` for train_aug ∪ val, from the masks (SegmentationClassAug,
  else SegmentationClass, else SBD ``cls/<id>.mat``), and from ``Annotations/<id>.xml`` for ids without a mask.
List lines use the reference form ``/JPEGImages/<id>.jpg /SegmentationClassAug/<id>.png``.

Usage: ``python voc12/prepare.py --voc_root data/VOC2012 [--sbd_root data/benchmark_RELEASE] [--out_dir voc12]``
"""
from __future__ import annotations

import argparse
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the repo importable without installation
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np
from tqdm import tqdm

from tools.errors import DataError, require_dir, require_file, run_cli
from tools.imutils import read_gt_png
from tools.io import atomic_save_npy, atomic_write_text
from voc12.dataset import VOC12, VOC_CLASSES
from voc12.lists import read_id_list

VOC_HINT = ("Download VOCtrainval_11-May-2012.tar from http://host.robots.ox.ac.uk/pascal/VOC/voc2012/ "
            "(or make the toy set: python -m voc12.toy --out data/toy).")
SBD_HINT = ("Download benchmark.tgz (SBD) from "
            "http://www.eecs.berkeley.edu/Research/Projects/CS/vision/grouping/semantic_contours/benchmark.tgz "
            "and pass its benchmark_RELEASE/dataset folder (or the folder above it).")


def labels_from_mask(mask: np.ndarray, num_fg: int = VOC12.num_fg) -> np.ndarray:
    """``num_fg``-dim multi-hot of the classes 1..num_fg present in a label map (0 and 255 ignored)."""
    v = np.zeros(num_fg, dtype=np.float32)
    vals = np.unique(mask)
    vals = vals[(vals >= 1) & (vals <= num_fg)]
    v[vals.astype(np.int64) - 1] = 1.0
    return v


def labels_from_xml(path: Path) -> np.ndarray:
    """VOC multi-hot (one entry per VOC class) from every ``<object><name>`` of an annotation (part names ignored)."""
    try:
        root = ET.parse(path).getroot()
    except ET.ParseError as e:
        raise DataError(f"cannot parse annotation '{path}': {e}") from e
    v = np.zeros(VOC12.num_fg, dtype=np.float32)
    for obj in root.iter("object"):
        name = (obj.findtext("name") or "").strip()
        if name in VOC_CLASSES:
            v[VOC_CLASSES.index(name)] = 1.0
    return v


def _read_ids(path: Path) -> list[str]:
    """A VOC/SBD id list through the one list reader (byte-order mark, duplicates), after checking it exists."""
    return read_id_list(require_file(path, "VOC list", VOC_HINT))


def _sbd_dataset_dir(sbd_root: Path) -> Path:
    for cand in (sbd_root, sbd_root / "dataset", sbd_root / "benchmark_RELEASE" / "dataset"):
        if (cand / "cls").is_dir() and (cand / "train.txt").is_file():
            return cand
    raise DataError(f"'{sbd_root}' is not an SBD tree: expected cls/ and train.txt in it or in dataset/. {SBD_HINT}")


def _sbd_mask(path: Path) -> np.ndarray:
    from scipy.io import loadmat

    return np.asarray(loadmat(path, struct_as_record=False, squeeze_me=True)["GTcls"].Segmentation, dtype=np.uint8)


def prepare(voc_root: str | Path, out_dir: str | Path = "voc12", sbd_root: str | Path | None = None,
            quiet: bool = True) -> dict:
    """Write the lists and ``cls_labels.npy``; return a summary ``{list name: count}``."""
    voc_root = require_dir(voc_root, "VOC root", VOC_HINT)
    seg_dir = require_dir(voc_root / "ImageSets" / "Segmentation", "VOC ImageSets/Segmentation folder", VOC_HINT)
    train = _read_ids(seg_dir / "train.txt")
    val = _read_ids(seg_dir / "val.txt")
    val_set = set(val)
    aug_dir = voc_root / "SegmentationClassAug"
    sbd = _sbd_dataset_dir(Path(sbd_root)) if sbd_root else None
    if sbd is not None:
        sbd_ids = _read_ids(sbd / "train.txt") + _read_ids(sbd / "val.txt")
        pool = sbd_ids + train
    elif aug_dir.is_dir():
        pool = sorted(p.stem for p in aug_dir.glob("*.png")) + train
    else:
        pool = list(train)
    seen: set[str] = set()
    train_aug = []
    for i in pool:
        if i not in val_set and i not in seen:
            seen.add(i)
            train_aug.append(i)
    train_aug.sort()

    labels: dict[str, np.ndarray] = {}
    ids = train_aug + [i for i in val if i not in seen]
    it = ids if quiet else tqdm(ids, desc="class labels")
    for i in it:
        for cand in (aug_dir / f"{i}.png", voc_root / "SegmentationClass" / f"{i}.png"):
            if cand.is_file():
                labels[i] = labels_from_mask(read_gt_png(cand))
                break
        else:
            if sbd is not None and (sbd / "cls" / f"{i}.mat").is_file():
                labels[i] = labels_from_mask(_sbd_mask(sbd / "cls" / f"{i}.mat"))
            else:
                xml = voc_root / "Annotations" / f"{i}.xml"
                if not xml.is_file():
                    raise DataError(f"no mask and no annotation for id '{i}': looked for {aug_dir / (i + '.png')}, "
                                    f"{voc_root / 'SegmentationClass' / (i + '.png')} and '{xml}'. {VOC_HINT}")
                labels[i] = labels_from_xml(xml)

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)

    def lines(id_list: list[str]) -> str:
        return "".join(f"/JPEGImages/{i}.jpg /SegmentationClassAug/{i}.png\n" for i in id_list)

    atomic_write_text(out / "train.txt", lines(train))
    atomic_write_text(out / "val.txt", lines(val))
    atomic_write_text(out / "train_aug.txt", lines(train_aug))
    atomic_save_npy(out / "cls_labels.npy", labels)
    return {"train": len(train), "val": len(val), "train_aug": len(train_aug), "cls_labels": len(labels),
            "out_dir": str(out)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="Write voc12/{train,val,train_aug}.txt and voc12/cls_labels.npy.")
    ap.add_argument("--voc_root", required=True, help="VOC2012 folder (JPEGImages, ImageSets, Segmentation*)")
    ap.add_argument("--sbd_root", default=None, help="SBD benchmark_RELEASE (optional)")
    ap.add_argument("--out_dir", default=str(Path(__file__).resolve().parent),
                    help="where the lists and cls_labels.npy go (default: this voc12/ folder)")
    return run_cli(_run, ap.parse_args(argv))


def _run(a: argparse.Namespace) -> None:
    s = prepare(a.voc_root, a.out_dir, a.sbd_root, quiet=False)
    print(f"wrote {s['out_dir']}: train {s['train']}, val {s['val']}, train_aug {s['train_aug']}, "
          f"cls_labels {s['cls_labels']} ids")


if __name__ == "__main__":
    sys.exit(main())
