"""gen_mask confidence masks vs ``stage2/gen_mask.npz``, the PNG as written and as BECO reads it,
plus the documented stable tie rule and the IRN eval metric semantics (seg_metric.json)."""
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from irn.steps.evaluate import irn_scores
from irn.steps.gen_mask import confidence_mask, mask_png
from tools.io import save_png
from tools.metrics import confusion_matrix
from conftest import REFERENCE

ST2 = REFERENCE / "stage2"


def test_gen_mask_matches_reference(tmp_path):
    f = ST2 / "gen_mask.npz"
    if not f.exists():
        pytest.skip(f"missing fixture {f}")
    ref = np.load(f)
    for i in range(int(ref["n_cases"])):
        score = torch.from_numpy(ref[f"score_{i}"])
        mask = confidence_mask(score, ref[f"pred_{i}"], float(ref["thd"]))
        np.testing.assert_array_equal(mask, ref[f"mask_{i}"])
        png = mask_png(mask)
        np.testing.assert_array_equal(png, ref[f"mask_png_{i}"])
        path = tmp_path / f"{ref[f'name_{i}']}.png"
        save_png(path, png)
        im = Image.open(path)
        assert im.mode == "RGB"
        np.testing.assert_array_equal(np.asarray(im), ref[f"mask_png_{i}"])
        np.testing.assert_array_equal(np.asarray(im.convert("1"), dtype=np.uint8), ref[f"mask_beco_{i}"])


def test_gen_mask_stable_ties():
    # 6 pixels of class 1 with equal margins: the first 3 in raster order are kept
    score = np.zeros((2, 2, 3), np.float32)
    score[0] = 0.25
    score[1] = 0.75
    mask = confidence_mask(score, np.ones((2, 3), np.int64), 0.5)
    np.testing.assert_array_equal(mask, [[1, 1, 1], [0, 0, 0]])


def test_irn_eval_metric_matches_replica():
    f = ST2 / "seg_metric.json"
    if not f.exists():
        pytest.skip(f"missing fixture {f}")
    d = json.loads(f.read_text())
    hist = np.zeros((21, 21), np.int64)
    for pair in d["pairs"]:
        pred = np.asarray(pair["pred"]).copy()
        pred[pred == 255] = 0
        hist += confusion_matrix(pred, np.asarray(pair["gt"]), 21, 255)
    rep = d["irn_eval_sem_seg_replica"]
    np.testing.assert_array_equal(hist, np.asarray(rep["confusion_matrix"]))
    s = irn_scores(hist)
    ref_iou = np.array([np.nan if v is None else v for v in rep["iou"]])
    np.testing.assert_allclose(s["iou"], ref_iou, atol=1e-7, equal_nan=True)
    assert abs(s["miou"] - rep["miou"]) < 1e-7
