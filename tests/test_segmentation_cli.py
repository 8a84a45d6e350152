"""BECO CLIs end to end on a tiny toy VOC set (GT as pseudo-labels, all-ones masks, tiny ResNet-18):
``main.py`` trains; a run killed mid-training and rerun with ``--resume`` ends with the very same
weights as an uninterrupted one; ``main.py --test --ckpt -dist --nproc 2`` (2 CPU processes, gloo)
writes logits_msc and the reference metric line; ``test.py --crf`` writes predictions and mIoU.
Few processes on purpose: each one pays the torch import."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from tools.metrics import MIOU_DEFINITIONS, metrics_record

ROOT = Path(__file__).resolve().parents[1]
SEG = ROOT / "segmentation"
PY = sys.executable
# Tiny models: one thread per process is fastest, and on a busy 2-core runner OpenMP spinning of two
# threads per process costs 10x.
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


@pytest.fixture(scope="module")
def toy(tmp_path_factory) -> Path:
    from voc12 import toy as toy_mod

    root = tmp_path_factory.mktemp("beco_toy") / "VOC2012"
    toy_mod.generate(root, n_train=8, n_val=4, max_size=48, seed=0)
    return root


def _flags(root: Path, logs: Path, tag: str) -> list[str]:
    return ["--data_root", str(root), "--train_list", str(root / "ImageSets/Segmentation/train.txt"),
            "--sem_seg_dir", str(root / "SegmentationClassAug"), "--mask_dir", "none",
            "--backbone", "resnet18", "--backbone_width", "8", "--pretrained", "none",
            "--crop_size", "32", "--val_size", "32", "--batch_size", "4", "--num_workers", "0",
            "--max_epoch", "3", "--warm_up", "1", "--log_every", "0",
            "--logging_path_base", str(logs), "--logging_tag", tag, "--device", "cpu"]


def _run(args: list[str], cwd: Path = SEG) -> subprocess.CompletedProcess:
    p = subprocess.run([PY, *args], cwd=cwd, capture_output=True, text=True, timeout=600, env=ENV)
    assert p.returncode == 0, f"{args[0]} failed:\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}"
    return p


def _nets(path: Path) -> dict[str, torch.Tensor]:
    ck = torch.load(path, map_location="cpu", weights_only=False)
    return {f"{n}.{k}": v for n, sd in ck["net_state_dict"].items() for k, v in sd.items()}


@pytest.fixture(scope="module")
def trained(toy, tmp_path_factory) -> Path:
    logs = tmp_path_factory.mktemp("beco_logs")
    _run(["main.py", *_flags(toy, logs, "full")])
    return logs


def test_train_outputs(trained):
    d = trained / "full"
    assert (d / "ckpt_epoch_3.pth").is_file() and not list(d.glob("ckpt_epoch_[12].pth"))
    best = torch.load(d / "best_ckpt.pth", weights_only=False)
    assert set(best) == {"net_state_dict"} and set(best["net_state_dict"]) == {"network1", "network2"}
    assert not any(k.startswith("module.") for k in best["net_state_dict"]["network1"])
    assert len(list(d.glob("best=*"))) == 1
    m = json.loads((d / "metrics.json").read_text())
    assert [h["epoch"] for h in m["val"]] == [1, 2, 3]
    ck = torch.load(d / "ckpt_epoch_3.pth", weights_only=False)
    assert ck["model_state_dict"]["epoch"] == 3 and ck["runner_state_dict"]["iter"] == 3 * 2
    t = json.loads((d / "test_metrics.json").read_text())  # the test that follows training
    assert 0.0 <= t["miou"] <= 100.0 and len(list((d / "logits_msc").glob("*.npy"))) == 4
    # one metrics record: percent, the definition named, the confusion matrix kept
    assert t["miou_definition"] == MIOU_DEFINITIONS["gt"] and t["n_images"] == 4
    assert t["miou"] == pytest.approx(metrics_record(t["confusion_matrix"], "gt", eps=1e-5)["miou"])
    assert m["miou_definition"] == MIOU_DEFINITIONS["gt"] and m["best_miou"] >= m["val"][-1]["miou"] - 1e-9


def test_kill_mid_training_then_resume_matches_uninterrupted(toy, trained):
    flags = _flags(toy, trained, "killed")
    d = trained / "killed"
    proc = subprocess.Popen([PY, "main.py", *flags], cwd=SEG, start_new_session=True, env=ENV,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 400
        while not (d / "ckpt_epoch_1.pth").is_file():
            assert proc.poll() is None, "training ended before its first checkpoint"
            assert time.time() < deadline
            time.sleep(0.05)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # the run and anything it started
        proc.wait()
    assert not (d / "ckpt_epoch_3.pth").exists()
    p = _run(["main.py", *flags, "--resume"])
    assert "resumed from" in p.stdout
    a, b = _nets(trained / "full" / "ckpt_epoch_3.pth"), _nets(d / "ckpt_epoch_3.pth")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), f"resumed run differs at {k}"


def test_test_then_crf(toy, trained):
    ckpt = trained / "full" / "ckpt_epoch_3.pth"  # last epoch: what the training run's own test scored
    # --test needs only the val images/labels and the checkpoint: no train list, pseudo-labels, masks, ImageNet
    p = _run(["main.py", "--test", "-dist", "--nproc", "2", "--ckpt", str(ckpt), "--data_root", str(toy),
              "--backbone", "resnet18", "--backbone_width", "8", "--val_size", "32", "--num_workers", "0", "--device", "cpu",
              "--logging_path_base", str(trained), "--logging_tag", "seg_result",
              "--sem_seg_dir", str(trained / "absent"), "--mask_dir", str(trained / "absent"),
              "--pretrained", str(trained / "absent.pth")])
    line = [ln for ln in p.stdout.splitlines() if "Final test results:" in ln][0]
    assert " INFO Final test results: Overall_Acc:" in line and "mIoU:" in line
    out = trained / "seg_result" / "logits_msc"
    files = sorted(out.glob("*.npy"))
    assert len(files) == 4 and np.load(files[0]).shape == (21, 4, 4) and np.load(files[0]).dtype == np.float32
    # two ranks score disjoint halves (no padded duplicates): same confusion as the 1-process test
    dist_hist = json.loads((trained / "seg_result" / "test_metrics.json").read_text())["confusion_matrix"]
    one_hist = json.loads((trained / "full" / "test_metrics.json").read_text())["confusion_matrix"]
    assert dist_hist == one_hist and np.sum(dist_hist) > 0
    pytest.importorskip("pydensecrf.densecrf")
    p = _run(["test.py", "--crf", "--logits_dir", str(out), "--mode", "val", "--data_root", str(toy),
              "--n-jobs", "2"])
    miou = float([ln for ln in p.stdout.splitlines() if ln.startswith("mIoU: ")][0].split()[1])
    assert 0.0 <= miou <= 1.0
    preds = sorted((trained / "seg_result" / "val_pred").glob("*.png"))
    assert len(preds) == 4
    with Image.open(preds[0]) as im:
        assert im.mode == "P"  # palette PNG of class indices
        assert im.size == Image.open(toy / "JPEGImages" / (preds[0].stem + ".jpg")).size
    res = json.loads((trained / "seg_result" / "val_metrics_crf.json").read_text())
    assert abs(res["miou"] - 100 * miou) < 1e-9 and res["crf_image"] == "wrapped"
