"""Foundation: metrics, palette, real VOC samples, prepare.py, atomic writes, toy generator, clear errors."""
from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import stat
import subprocess
import sys
import time
import types
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import ROOT, shared_path
from tools.errors import DataError, MissingFileError
from tools.imutils import CAT_NAMES_BG, read_label_png, read_rgb, voc_palette, write_label_png
from tools.io import atomic_save_npy, atomic_write_json
from tools.metrics import confusion_matrix, iou_from_confusion, scores
from voc12 import data, prepare, toy


# ---------------------------------------------------------------- metrics
def test_confusion_matrix_matches_brute_force() -> None:
    rng = np.random.default_rng(0)
    gt = rng.integers(0, 21, (37, 53))
    gt[rng.random(gt.shape) < 0.1] = 255
    pred = rng.integers(0, 21, gt.shape)
    hist = confusion_matrix(pred, gt, 21)
    brute = np.zeros((21, 21), np.int64)
    for g, p in zip(gt.ravel(), pred.ravel()):
        if g != 255:
            brute[g, p] += 1
    np.testing.assert_array_equal(hist, brute)
    iou = iou_from_confusion(hist)
    for c in range(21):
        tp = np.sum((gt == c) & (pred == c))
        t = np.sum(gt == c)
        p = np.sum((pred == c) & (gt != 255))
        assert iou[c] == pytest.approx(tp / (t + p - tp + 1e-10))
    s = scores(hist)
    assert s["miou"] == pytest.approx(iou.mean())
    assert s["pixel_acc"] == pytest.approx(np.sum((gt == pred) & (gt != 255)) / np.sum(gt != 255))


def test_miou_counts_absent_classes_as_zero() -> None:
    gt = np.zeros((4, 4), np.uint8)
    gt[:2] = 1
    s = scores(confusion_matrix(gt, gt, 21))
    assert s["miou"] == pytest.approx(2 / 21)          # stage-one definition: all 21 classes
    assert s["miou_present"] == pytest.approx(1.0)      # chainercv / BECO style


# ---------------------------------------------------------------- palette
def test_palette_known_entries() -> None:
    pal = voc_palette()
    assert tuple(pal[1]) == (128, 0, 0) and tuple(pal[2]) == (0, 128, 0)
    assert tuple(pal[15]) == (192, 128, 128) and tuple(pal[255]) == (224, 224, 192)


def test_palette_png_round_trip(tmp_path: Path) -> None:
    lab = np.random.default_rng(1).integers(0, 21, (23, 31)).astype(np.uint8)
    lab[0, :] = 255
    write_label_png(tmp_path / "x.png", lab)
    im = Image.open(tmp_path / "x.png")
    assert im.mode == "P"
    np.testing.assert_array_equal(np.asarray(im.getpalette()[:768], np.uint8).reshape(256, 3), voc_palette())
    np.testing.assert_array_equal(read_label_png(tmp_path / "x.png"), lab)
    write_label_png(tmp_path / "y.png", lab, palette=False)
    assert Image.open(tmp_path / "y.png").mode == "L"
    np.testing.assert_array_equal(read_label_png(tmp_path / "y.png"), lab)


# ---------------------------------------------------------------- real VOC samples
def _manifest() -> dict:
    return json.loads(shared_path("realdata", "voc_samples", "manifest.json").read_text())


def test_real_voc_samples_load_with_classes_and_borders() -> None:
    root = shared_path("realdata", "voc_samples")
    man = _manifest()
    pal = voc_palette()
    for item in man["items"]:
        img = read_rgb(root / "JPEGImages" / f"{item['id']}.jpg")
        assert img.shape == (item["height"], item["width"], 3) and img.dtype == np.uint8
        mask = data.load_gt(root, item["id"], folder="SegmentationClassAug")
        assert mask.shape == img.shape[:2]
        vals, counts = np.unique(mask, return_counts=True)
        assert {str(v): int(c) for v, c in zip(vals, counts)} == item["pixel_counts"]
        assert 255 in vals, "VOC-labelled masks carry the 255 border band"
        present = [CAT_NAMES_BG[v] for v in vals if 1 <= v <= 20]
        assert sorted(present) == sorted(item["classes"])
        assert np.array_equal(np.asarray(Image.open(root / "SegmentationClassAug" / f"{item['id']}.png")
                                         .getpalette()[:768], np.uint8).reshape(256, 3), pal)
    for p in sorted((root / "extra_sbd_only_masks").glob("*.png")):
        assert 255 not in np.unique(read_label_png(p)), "SBD-only masks have no void band"


def test_prepare_on_real_samples_agrees_with_masks(tmp_path: Path) -> None:
    src = shared_path("realdata", "voc_samples")
    root = tmp_path / "VOC2012"
    for sub in ("JPEGImages", "SegmentationClassAug", "ImageSets"):
        shutil.copytree(src / sub, root / sub)
    s = prepare.prepare(root, out_dir=tmp_path / "lists")
    train = data.read_id_list(tmp_path / "lists" / "train.txt")
    val = data.read_id_list(tmp_path / "lists" / "val.txt")
    aug = data.read_id_list(tmp_path / "lists" / "train_aug.txt")
    assert set(aug).isdisjoint(val) and set(train) <= set(aug)
    assert s["train_aug"] == len(set(p.stem for p in (root / "SegmentationClassAug").glob("*.png")) - set(val))
    labels = data.load_cls_labels(tmp_path / "lists" / "cls_labels.npy")
    man = {it["id"]: it for it in _manifest()["items"]}
    assert set(labels) == set(aug) | set(val)
    for i, v in labels.items():
        assert v.dtype == np.float32 and v.shape == (20,)
        names = sorted(CAT_NAMES_BG[k + 1] for k in np.flatnonzero(v))
        assert names == sorted(man[i]["classes"])


def test_labels_from_xml(tmp_path: Path) -> None:
    p = tmp_path / "a.xml"
    p.write_text("<annotation><object><name>dog</name><part><name>head</name></part></object>"
                 "<object><name>person</name></object></annotation>")
    v = prepare.labels_from_xml(p)
    assert np.flatnonzero(v).tolist() == [11, 14]


# ---------------------------------------------------------------- lists
def test_read_id_list_formats(tmp_path: Path) -> None:
    p = tmp_path / "l.txt"
    p.write_text("/JPEGImages/2007_000032.jpg /SegmentationClassAug/2007_000032.png\nabc\n\n/JPEGImages/x_1234567890.jpg\n")
    assert data.read_id_list(p) == ["2007_000032", "abc", "x_1234567890"]


# ---------------------------------------------------------------- atomic writes
_WRITER = r"""
import sys, numpy as np
sys.path.insert(0, {root!r})
from tools import io
class Slow:
    def __reduce__(self):
        sys.stdout.write("writing\n"); sys.stdout.flush()
        import time; time.sleep(60)
        return (dict, ())
io.atomic_save_npy({path!r}, {{"a": np.zeros(10), "b": Slow()}})
"""


def test_atomic_write_leaves_no_partial_file_when_killed(tmp_path: Path) -> None:
    target = tmp_path / "out" / "x.npy"
    proc = subprocess.Popen([sys.executable, "-c", _WRITER.format(root=str(ROOT), path=str(target))],
                            stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "writing"   # the writer is mid-way through the file
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    assert not target.exists()
    leftovers = list(target.parent.iterdir())
    assert all(p.name.startswith(".") and p.name.endswith(".tmp") for p in leftovers)
    assert list(target.parent.glob("*.npy")) == []       # a reader globbing outputs never sees the temp file
    atomic_save_npy(target, {"a": 1})
    assert np.load(target, allow_pickle=True).item() == {"a": 1}


def test_atomic_json_replaces(tmp_path: Path) -> None:
    atomic_write_json(tmp_path / "a.json", {"x": np.float32(1.5), "y": np.arange(2)})
    assert json.loads((tmp_path / "a.json").read_text()) == {"x": 1.5, "y": [0, 1]}


@pytest.mark.parametrize("umask, mode", [(0o022, 0o644), (0o002, 0o664), (0o077, 0o600)])
def test_atomic_writes_get_the_mode_a_plain_open_gives(tmp_path: Path, umask: int, mode: int) -> None:
    """Not mkstemp's 0600: outputs on shared storage stay readable for colleagues."""
    import torch

    from tools.io import atomic_torch_save, save_png

    old = os.umask(umask)
    try:
        atomic_save_npy(tmp_path / "a.npy", {0: np.zeros(2)})
        atomic_write_json(tmp_path / "a.json", {"a": 1})
        save_png(tmp_path / "a.png", np.zeros((2, 2), np.uint8))
        atomic_torch_save({"w": torch.zeros(1)}, tmp_path / "a.pth")
    finally:
        os.umask(old)
    for p in tmp_path.iterdir():
        assert stat.S_IMODE(p.stat().st_mode) == mode, p.name


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_stale_temp_rules(tmp_path: Path) -> None:
    from tools import io

    host = io._HOST
    dead = _dead_pid()
    names = {f".x.npy.{os.getpid()}@{host}.ab12.tmp": False,    # a live writer (this process)
             f".x.npy.1@{host}.ab12.tmp": False,                 # pid 1 exists (alive, maybe not ours)
             f".x.npy.{dead}@{host}.ab12.tmp": True,             # its writer is gone
             f".x.npy.{dead}@otherhost.ab12.tmp": False,         # another host: only by age
             ".x.npy.k3j_9a2b.tmp": False,                       # old style, fresh: maybe still written
             "x.npy": False, ".x.npy": False}                    # not temporary files
    for name in names:
        (tmp_path / name).touch()
    for name, stale in names.items():
        assert io.is_stale_temp(tmp_path / name) is stale, name
    assert io.temp_final_name(tmp_path / f".2007_000032.npy.{dead}@{host}.ab12.tmp") == "2007_000032.npy"
    assert io.temp_final_name(tmp_path / ".003_2007_000032_cam_4.png.k3j_9a2b.tmp") == "003_2007_000032_cam_4.png"
    assert io.temp_final_name(tmp_path / "x.npy") is None
    old = time.time() - io.STALE_TEMP_AGE_S - 60
    for name in (".x.npy.k3j_9a2b.tmp", f".x.npy.{dead}@otherhost.ab12.tmp"):
        os.utime(tmp_path / name, (old, old))
        assert io.is_stale_temp(tmp_path / name), name


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="needs /proc")
def test_a_zombie_writer_counts_as_gone(tmp_path: Path) -> None:
    """A killed writer not yet reaped still answers kill(pid, 0); it writes nothing any more."""
    from tools import io

    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    try:
        for _ in range(400):  # until it has exited (unreaped: a zombie)
            if Path(f"/proc/{proc.pid}/stat").read_text().rpartition(")")[2].split()[0] == "Z":
                break
            time.sleep(0.025)
        tmp = tmp_path / f".x.npy.{proc.pid}@{io._HOST}.ab12.tmp"
        tmp.touch()
        assert io.is_stale_temp(tmp)
    finally:
        proc.wait()


def test_temp_names_carry_the_writer_pid(tmp_path: Path) -> None:
    from tools import io

    with io.atomic_path(tmp_path / "a.b.npy") as tmp:
        assert tmp.name.startswith(f".a.b.npy.{os.getpid()}@{io._HOST}.") and tmp.name.endswith(".tmp")
        assert io.temp_final_name(tmp) == "a.b.npy" and not io.is_stale_temp(tmp)
        tmp.write_bytes(b"x")
    assert (tmp_path / "a.b.npy").read_bytes() == b"x"


def test_infer_cleanup_keeps_a_live_writers_temp(tmp_path: Path) -> None:
    """A second infer.py over an overlapping list must not delete the first one's temporaries (the
    first would die in os.replace); those of a killed writer are removed."""
    from models.cam_infer import remove_stale_temps

    target = tmp_path / "dict" / "x.npy"
    proc = subprocess.Popen([sys.executable, "-c", _WRITER.format(root=str(ROOT), path=str(target))],
                            stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "writing"
        temps = list(target.parent.glob(".*.tmp"))
        assert len(temps) == 1 and f".{proc.pid}@" in temps[0].name
        remove_stale_temps(target.parent, {"x"})
        assert temps[0].exists()
    finally:
        proc.kill()
        proc.wait(timeout=30)
    remove_stale_temps(target.parent, {"y"})  # not our id: left alone
    assert temps[0].exists()
    remove_stale_temps(target.parent, {"x"})
    assert not temps[0].exists()


@pytest.mark.parametrize("err, cause", [
    (OSError(errno.ENOSPC, "No space left on device"), "no space left on device"),
    (OSError(errno.EDQUOT, "Disk quota exceeded"), "disk quota exceeded"),
    (OSError(errno.EROFS, "Read-only file system"), "read-only file system"),
    (PermissionError(errno.EACCES, "Permission denied"), "permission denied")])
def test_failed_write_names_the_destination(tmp_path: Path, monkeypatch, err: OSError, cause: str) -> None:
    from tools.io import OutputWriteError

    target = tmp_path / "out" / "x.npy"
    atomic_save_npy(target, {0: 1})

    def failing_save(f, *a, **k):
        f.write(b"partial")
        raise err

    monkeypatch.setattr(np, "save", failing_save)
    with pytest.raises(OutputWriteError) as e:
        atomic_save_npy(target, {0: 2})
    msg = str(e.value)
    assert str(target) in msg and cause in msg and isinstance(e.value, OSError)
    assert sorted(p.name for p in target.parent.iterdir()) == ["x.npy"]  # temp removed, old file intact
    assert np.load(target, allow_pickle=True).item() == {0: 1}


def test_torch_save_on_a_full_disk(tmp_path: Path, monkeypatch) -> None:
    """torch.save reports a full disk as ``RuntimeError: basic_ios::clear: iostream error``."""
    import torch

    from tools.io import OutputWriteError, atomic_torch_save

    def failing_save(obj, f, *a, **k):
        Path(f).write_bytes(b"partial")
        raise RuntimeError("[enforce fail at inline_container.cc:603] . unexpected pos 64 vs 0: "
                           "basic_ios::clear: iostream error")

    monkeypatch.setattr(torch, "save", failing_save)
    monkeypatch.setattr(os, "statvfs", lambda p: types.SimpleNamespace(f_bavail=0))
    with pytest.raises(OutputWriteError, match="no space left on device") as e:
        atomic_torch_save({"w": 1}, tmp_path / "res50_irn.pth")
    assert str(tmp_path / "res50_irn.pth") in str(e.value)
    assert list(tmp_path.iterdir()) == []
    monkeypatch.setattr(torch, "save", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("CUDA error: out of memory")))
    with pytest.raises(RuntimeError, match="CUDA error") as e:  # not a write failure: passed on unchanged
        atomic_torch_save({"w": 1}, tmp_path / "res50_irn.pth")
    assert not isinstance(e.value, OutputWriteError) and list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------- toy generator
def test_toy_is_deterministic_and_consistent(tmp_path: Path) -> None:
    toy.generate(tmp_path / "a", n_train=4, n_val=2, max_size=80, seed=3)
    toy.generate(tmp_path / "b", n_train=4, n_val=2, max_size=80, seed=3)
    toy.generate(tmp_path / "c", n_train=4, n_val=2, max_size=80, seed=4)
    fa = sorted(p.relative_to(tmp_path / "a") for p in (tmp_path / "a").rglob("*") if p.is_file())
    assert fa == sorted(p.relative_to(tmp_path / "b") for p in (tmp_path / "b").rglob("*") if p.is_file())
    for rel in fa:
        assert (tmp_path / "a" / rel).read_bytes() == (tmp_path / "b" / rel).read_bytes(), rel
    assert any((tmp_path / "a" / r).read_bytes() != (tmp_path / "c" / r).read_bytes() for r in fa)
    s = prepare.prepare(tmp_path / "a", out_dir=tmp_path / "a" / "lists")
    assert (s["train"], s["val"], s["train_aug"]) == (4, 2, 4)
    labels = data.load_cls_labels(tmp_path / "a" / "lists" / "cls_labels.npy")
    for i, v in labels.items():
        mask = data.load_gt(tmp_path / "a", i)
        assert 255 in mask and 1 <= v.sum() <= 3
        np.testing.assert_array_equal(v, prepare.labels_from_mask(mask))
        np.testing.assert_array_equal(v, prepare.labels_from_xml(tmp_path / "a" / "Annotations" / f"{i}.xml"))
        img = data.load_image(tmp_path / "a", i)
        assert img.shape[:2] == mask.shape and max(mask.shape) <= 80


def test_toy_class_subset(tmp_path: Path) -> None:
    """``--classes N``: objects only from the first N classes, in masks and XML; recorded in the meta."""
    s = toy.generate(tmp_path / "t", n_train=12, n_val=2, max_size=64, seed=1, n_classes=3)
    assert s["classes"] == 3 and toy.existing_toy(tmp_path / "t")["classes"] == 3
    seen = set()
    for i in toy.toy_ids(12, 2)[0]:
        mask = data.load_gt(tmp_path / "t", i)
        fg = set(np.unique(mask).tolist()) - {0, 255}
        assert fg and fg <= {1, 2, 3}
        np.testing.assert_array_equal(prepare.labels_from_mask(mask),
                                      prepare.labels_from_xml(tmp_path / "t" / "Annotations" / f"{i}.xml"))
        seen |= fg
    assert seen == {1, 2, 3}
    with pytest.raises(ValueError, match="n_classes"):
        toy.generate(tmp_path / "u", n_train=1, n_val=1, max_size=64, n_classes=0)


def test_toy_cli_and_prepare_cli(tmp_path: Path) -> None:
    out = tmp_path / "toy"
    r = subprocess.run([sys.executable, "-m", "voc12.toy", "--out", str(out), "--n_train", "3", "--n_val", "2",
                        "--max_size", "64"], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert "3 train + 2 val" in r.stdout
    r = subprocess.run([sys.executable, "voc12/prepare.py", "--voc_root", str(out), "--out_dir", str(out / "l")],
                       cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert len(data.read_id_list(out / "l" / "train_aug.txt")) == 3


def test_class_signatures_unique() -> None:
    assert len({toy.class_signature(c) for c in range(20)}) == 20


# ---------------------------------------------------------------- clear errors
def test_missing_voc_folder_error(tmp_path: Path) -> None:
    with pytest.raises(MissingFileError, match=r"nowhere.*voc2012|nowhere.*VOC"):
        data.check_voc_root(tmp_path / "nowhere")
    with pytest.raises(MissingFileError, match="nowhere"):
        prepare.prepare(tmp_path / "nowhere", out_dir=tmp_path / "o")


def test_list_id_without_image(toy_voc: Path) -> None:
    labels = data.load_cls_labels(toy_voc / "lists" / "cls_labels.npy")
    labels["2999_000000"] = labels[next(iter(labels))]
    ds = data.MSFDataset(["2999_000000"], toy_voc, labels)
    with pytest.raises(MissingFileError, match=r"2999_000000.*JPEGImages"):
        ds[0]
    with pytest.raises(DataError, match="no class label.*nolabel_id"):
        data.MSFDataset(["nolabel_id"], toy_voc, labels)


def test_truncated_jpeg_names_the_file(tmp_path: Path, toy_voc: Path) -> None:
    src = next((toy_voc / "JPEGImages").glob("*.jpg")).read_bytes()
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(src[: len(src) // 2])
    with pytest.raises(DataError, match="bad.jpg"):
        read_rgb(bad)
    with pytest.raises(MissingFileError, match="missing.jpg"):
        read_rgb(tmp_path / "missing.jpg")


# ---------------------------------------------------------------- stage-one datasets
def test_cls_pair_dataset_shares_a_class_and_is_reproducible(toy_voc: Path) -> None:
    ids = data.read_id_list(toy_voc / "lists" / "train_aug.txt")
    labels = data.load_cls_labels(toy_voc / "lists" / "cls_labels.npy")
    ds = data.ClsPairDataset(ids, toy_voc, labels, resize=(40, 80), crop=64, seed=1)
    a, b = ds[3], ds[3]
    for k in ("img_a", "img_a2", "label", "label2"):
        assert np.array_equal(a[k].numpy(), b[k].numpy())
    assert a["img_a"].shape == (3, 64, 64) and a["img_p"].shape == (3, 64, 64)
    assert float((a["label"] * a["label2"]).sum()) >= 1
    ds.set_epoch(1)
    assert any(not np.array_equal(ds[i]["img_a"].numpy(), data.ClsPairDataset(ids, toy_voc, labels, (40, 80), 64, 1)[i]
                                  ["img_a"].numpy()) for i in range(len(ids)))


def test_msf_inputs_sizes_round_half_even() -> None:
    img = np.zeros((79, 101, 3), np.uint8)
    shapes = [x.shape[1:] for x in data.msf_inputs(img)]
    assert shapes == [(40, 50), (40, 50), (79, 101), (79, 101), (118, 152), (118, 152), (158, 202), (158, 202)]
    xs = data.msf_inputs(np.random.default_rng(0).integers(0, 255, (10, 12, 3)).astype(np.uint8), (1.0,))
    np.testing.assert_array_equal(xs[1], xs[0][:, :, ::-1])
