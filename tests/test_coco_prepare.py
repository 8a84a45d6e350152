"""coco14/prepare.py on the toy COCO-format set (coco14/toy.py): masks against an independent pycocotools
rasterisation, lists and image-level labels against the JSON, the val_part rule, resume, and the
one-line errors for a missing or malformed annotation file."""
from __future__ import annotations

import contextlib
import io
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("pycocotools")
from pycocotools.coco import COCO  # noqa: E402

from coco14 import toy  # noqa: E402
from coco14.prepare import VAL_PART_SIZE, prepare, rasterise  # noqa: E402
from conftest import cli_main  # noqa: E402

SPLITS = ("train2014", "val2014")


@pytest.fixture(scope="module")
def toy_src(tmp_path_factory) -> Path:
    """The toy COCO tree (annotations and images only; every test prepares its own copy)."""
    root = tmp_path_factory.mktemp("coco_toy")
    toy.generate(root, n_train=7, n_val=5, max_size=72, seed=3)
    return root


@pytest.fixture(scope="module")
def prepared(tmp_path_factory, toy_src) -> tuple[Path, dict]:
    root = tmp_path_factory.mktemp("coco_prep") / "coco"
    shutil.copytree(toy_src, root)
    return root, prepare(root, workers=2)


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst / "coco")
    return dst / "coco"


def _coco(root: Path, split: str) -> COCO:
    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints progress
        return COCO(str(root / "annotations" / f"instances_{split}.json"))


def _reference_masks(root: Path, split: str, order: str = "area") -> dict[str, np.ndarray]:
    """Per image with a non-crowd annotation: the documented rule applied in a plain loop over
    pycocotools' own ``annToMask`` (80 ids -> 1..80 ascending; largest area painted first, equal area
    smaller id first; crowd -> 255 where no non-crowd instance covers). ``order`` "later" / "earlier"
    paints by annotation id instead (the larger / the smaller id wins), the rules the toy must tell apart."""
    coco = _coco(root, split)
    index = {cid: k + 1 for k, cid in enumerate(sorted(coco.getCatIds()))}
    out = {}
    for img in coco.loadImgs(coco.getImgIds()):
        anns = coco.loadAnns(coco.getAnnIds(imgIds=img["id"], iscrowd=None))
        solid = [a for a in anns if not a["iscrowd"]]
        if not solid:
            continue
        mask = np.zeros((img["height"], img["width"]), np.uint8)
        key = {"area": lambda a: (-int(coco.annToMask(a).sum()), a["id"]), "later": lambda a: a["id"],
               "earlier": lambda a: -a["id"]}[order]
        for a in sorted(solid, key=key):
            mask[coco.annToMask(a) > 0] = index[a["category_id"]]
        for a in anns:
            if a["iscrowd"]:
                mask[(coco.annToMask(a) > 0) & (mask == 0)] = 255
        out[Path(img["file_name"]).stem] = mask
    return out


def test_masks_equal_an_independent_pycocotools_rasterisation(prepared):
    root, _ = prepared
    overlaps = crowd_cover = ignored = 0
    differs = {"later": 0, "earlier": 0}
    for split in SPLITS:
        ref = _reference_masks(root, split)
        for order in differs:
            other = _reference_masks(root, split, order)
            differs[order] += sum(int((ref[n] != other[n]).any()) for n in ref)
        written = sorted(p.stem for p in (root / "SegmentationClass" / split).glob("*.png"))
        assert written == sorted(ref)
        for name, want in ref.items():
            im = Image.open(root / "SegmentationClass" / split / f"{name}.png")
            assert im.mode == "P"
            np.testing.assert_array_equal(np.asarray(im), want, err_msg=name)
        coco = _coco(root, split)
        for iid in coco.getImgIds():
            anns = coco.loadAnns(coco.getAnnIds(imgIds=iid))
            solid = sum((coco.annToMask(a) > 0).astype(int) for a in anns if not a["iscrowd"])
            crowd = [coco.annToMask(a) > 0 for a in anns if a["iscrowd"]]
            overlaps += int(np.any(np.asarray(solid) >= 2))
            crowd_cover += sum(int(np.any(c & (np.asarray(solid) > 0))) for c in crowd)
        ignored += sum(int((m == 255).any()) for m in ref.values())
    # the toy exercises both rules: instances that overlap, and crowd regions partly covered by one
    assert overlaps >= 2 and crowd_cover >= 1 and ignored >= 1
    assert min(differs.values()) >= 1  # smaller-wins is not id order in either direction on this toy


def test_rasterise_overlap_tie_and_crowd_rules():
    def square(x0, y0, side):
        return [[x0, y0, x0 + side, y0, x0 + side, y0 + side, x0, y0 + side]]

    # ids deliberately out of area order: the smaller instance wins whatever its id
    anns = [(1, 5, 0, square(4, 4, 4)), (9, 3, 0, square(0, 0, 12))]
    lab = rasterise(16, 16, anns)
    assert lab[5, 5] == 5 and lab[1, 1] == 3
    # equal areas: the larger annotation id is painted later and wins
    tie = rasterise(16, 16, [(7, 2, 0, square(0, 0, 8)), (4, 6, 0, square(4, 4, 8))])
    assert tie[6, 6] == 2 and tie[1, 1] == 2 and tie[10, 10] == 6
    # crowd: 255 only where no non-crowd instance covers it
    crowd = rasterise(16, 16, [(2, 1, 0, square(0, 0, 8)), (3, 40, 1, square(4, 4, 10))])
    assert crowd[6, 6] == 1 and crowd[10, 10] == 255 and crowd[1, 1] == 1 and crowd[15, 0] == 0


def test_lists_and_labels_match_the_json(prepared):
    root, summary = prepared
    labels = np.load(root / "cls_labels.npy", allow_pickle=True).item()
    cat_ids = sorted(c["id"] for c in json.loads((root / "annotations" / "instances_val2014.json").read_text())
                     ["categories"])
    assert len(cat_ids) == 80 and cat_ids[-1] == 90
    skipped_crowd = skipped_empty = 0
    for split, list_name in zip(SPLITS, ("train", "val")):
        data = json.loads((root / "annotations" / f"instances_{split}.json").read_text())
        names = {im["id"]: Path(im["file_name"]).stem for im in data["images"]}
        want: dict[str, np.ndarray] = {}
        has_crowd = set()
        for a in data["annotations"]:
            if a["iscrowd"]:
                has_crowd.add(names[a["image_id"]])
                continue
            v = want.setdefault(names[a["image_id"]], np.zeros(80, np.float32))
            v[cat_ids.index(a["category_id"])] = 1
        listed = (root / f"{list_name}.txt").read_text().split()
        assert listed == sorted(want)
        for n in want:
            assert labels[n].dtype == np.float32 and labels[n].shape == (80,)
            np.testing.assert_array_equal(labels[n], want[n])
        only_crowd = has_crowd - set(want)
        empty = set(names.values()) - has_crowd - set(want)
        skipped_crowd += len(only_crowd)
        skipped_empty += len(empty)
        assert summary[split]["only_crowd"] == len(only_crowd) and summary[split]["no_annotation"] == len(empty)
        assert summary[split]["listed"] == len(want) and summary[split]["images"] == len(names)
    assert set(labels) == set((root / "train.txt").read_text().split()) | set((root / "val.txt").read_text().split())
    assert skipped_crowd >= 2 and skipped_empty >= 2  # the toy has both kinds in each split


def test_val_part_is_the_first_lines_of_the_sorted_val_list(prepared, toy_src, tmp_path):
    root, _ = prepared
    assert VAL_PART_SIZE == 5000
    val = (root / "val.txt").read_text().splitlines()
    assert val == sorted(val) and (root / "val_part.txt").read_text().splitlines() == val[:5000]
    small = _copy(toy_src, tmp_path)
    prepare(small, workers=1, val_part_size=2)
    assert (small / "val_part.txt").read_text().splitlines() == val[:2]


def test_resume_recomputes_nothing_then_only_the_changed_image(toy_src, tmp_path):
    root = _copy(toy_src, tmp_path)
    first = prepare(root, workers=1)
    pngs = sorted((root / "SegmentationClass").rglob("*.png"))
    stamps = {p: p.stat().st_mtime_ns for p in pngs}
    again = prepare(root, workers=1)
    for split in SPLITS:
        assert again[split]["written"] == 0 and again[split]["reused"] == first[split]["listed"] > 0
    assert {p: p.stat().st_mtime_ns for p in pngs} == stamps

    # edit the category of one non-crowd annotation and drop every annotation of another image
    path = root / "annotations" / "instances_train2014.json"
    data = json.loads(path.read_text())
    names = {im["id"]: Path(im["file_name"]).stem for im in data["images"]}
    solid = sorted((a for a in data["annotations"] if not a["iscrowd"]), key=lambda a: a["id"])
    edited, dropped = solid[0], solid[-1]
    assert edited["image_id"] != dropped["image_id"]
    edited["category_id"] = 90 if edited["category_id"] != 90 else 1
    data["annotations"] = [a for a in data["annotations"] if a["image_id"] != dropped["image_id"]]
    path.write_text(json.dumps(data))
    third = prepare(root, workers=1)
    assert third["train2014"]["written"] == 1 and third["train2014"]["reused"] == first["train2014"]["listed"] - 2
    assert third["val2014"]["written"] == 0
    assert not (root / "SegmentationClass" / "train2014" / f"{names[dropped['image_id']]}.png").exists()
    assert names[dropped["image_id"]] not in (root / "train.txt").read_text().split()
    np.testing.assert_array_equal(
        np.asarray(Image.open(root / "SegmentationClass" / "train2014" / f"{names[edited['image_id']]}.png")),
        _reference_masks(root, "train2014")[names[edited["image_id"]]])


@pytest.mark.parametrize("content, phrase", [
    ('{"images": [', "not valid JSON"),
    ('{"images": [], "annotations": []}', "'categories'"),
])
def test_malformed_annotation_file_is_one_line_exit_2(toy_src, tmp_path, capsys, content, phrase):
    root = _copy(toy_src, tmp_path)
    bad = root / "annotations" / "instances_val2014.json"
    bad.write_text(content)
    assert cli_main("coco14/prepare.py", ["--coco_root", str(root), "--workers", "1"]) == 2
    # the train split (valid) is done first: its progress bar precedes the one error line
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip() and "masks:" not in line]
    assert len(err) == 1 and err[0].startswith("error: ") and str(bad) in err[0] and phrase in err[0]


def test_missing_annotation_file_is_one_line_exit_2(toy_src, tmp_path, capsys):
    root = _copy(toy_src, tmp_path)
    gone = root / "annotations" / "instances_train2014.json"
    gone.unlink()
    assert cli_main("coco14/prepare.py", ["--coco_root", str(root)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and str(gone) in err[0] and "annotations_trainval2014.zip" in err[0]
    assert not (root / "SegmentationClass").exists()  # nothing written before the check


def test_toy_set_contents_and_determinism(toy_src, tmp_path):
    again = tmp_path / "again"
    assert cli_main("coco14/toy.py", ["--out", str(again), "--n_train", "7", "--n_val", "5", "--max_size", "72",
                                      "--seed", "3"]) == 0
    encodings, crowd_kinds, used = set(), set(), set()
    for split in SPLITS:
        a = (toy_src / "annotations" / f"instances_{split}.json").read_bytes()
        assert a == (again / "annotations" / f"instances_{split}.json").read_bytes()
        data = json.loads(a)
        for im in data["images"]:
            assert im["file_name"] == f"COCO_{split}_{im['id']:012d}.jpg"
            assert (toy_src / split / im["file_name"]).is_file()
        for ann in data["annotations"]:
            s = ann["segmentation"]
            kind = "polygon" if isinstance(s, list) else "rle" if isinstance(s["counts"], list) else "compressed"
            (crowd_kinds if ann["iscrowd"] else encodings).add(kind)
            used.add(ann["category_id"])
    assert encodings == {"polygon", "rle", "compressed"} and crowd_kinds == {"rle"}
    assert used == set(toy.TOY_CATEGORY_IDS) and max(np.diff(sorted(used))) > 1


@pytest.mark.parametrize("segm", ["abc", {"counts": [64], "size": [4, 16]}, [[1.0, 2.0]]])
def test_unreadable_segmentation_names_the_annotation(segm):
    from tools.errors import DataError

    with pytest.raises(DataError, match=r"annotation 5 of image 'x'.*cannot read"):
        rasterise(8, 8, [(5, 1, 0, segm)], " of image 'x'")
