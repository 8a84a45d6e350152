"""tools.metrics.metrics_record / write_metrics / read_metrics: the one schema every scorer writes."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from tools.metrics import (MIOU_DEFINITIONS, metrics_record, present_class_scores, read_metrics, scores,
                           write_metrics)


def _hist() -> np.ndarray:
    """gt 0: 50 right, 10 called 1, 10 called 2; gt 1: 30 right; class 2 never in gt; 18 classes absent."""
    h = np.zeros((21, 21), np.int64)
    h[0, 0], h[0, 1], h[0, 2], h[1, 1] = 50, 10, 10, 30
    return h


def test_three_definitions_in_percent() -> None:
    h = _hist()
    tp, t, p = np.diag(h).astype(float), h.sum(1).astype(float), h.sum(0).astype(float)
    iou = tp / (t + p - tp + 1e-10)
    everything = metrics_record(h, "all", n_images=3)
    assert everything["miou"] == pytest.approx(iou.mean() * 100)
    assert everything["miou_definition"] == MIOU_DEFINITIONS["all"] == "mean over all classes"
    present = metrics_record(h, "present")
    # classes 0, 1 (in gt) and 2 (only predicted): IoU 50/70, 30/40, 0
    assert present["miou"] == pytest.approx((50 / 70 + 30 / 40 + 0) / 3 * 100)
    assert present["iou"][2] == 0.0 and present["iou"][3] is None
    assert present["miou"] == pytest.approx(scores(h)["miou_present"] * 100)
    gt = metrics_record(h, "gt", eps=1e-5)
    assert gt["miou"] == pytest.approx(present_class_scores(h, eps=1e-5)["miou"] * 100)
    assert gt["miou"] == pytest.approx((50 / 70 + 30 / 40) / 2 * 100, rel=1e-6) and gt["iou"][2] is None
    for rec in (everything, present, gt):  # what every record shares
        assert rec["miou_all"] == pytest.approx(everything["miou"])
        assert rec["pixel_acc"] == pytest.approx(80 / 100 * 100) and rec["num_classes"] == 21
        assert rec["confusion_matrix"] == h.tolist()
    with pytest.raises(ValueError, match="unknown mIoU definition"):
        metrics_record(h, "mean")


def test_write_read_round_trip_and_refusals(tmp_path: Path) -> None:
    rec = metrics_record(_hist(), "gt", n_images=2, crf=True)
    write_metrics(tmp_path / "m.json", rec)
    back = read_metrics(tmp_path / "m.json")
    assert back["crf"] is True and back["miou"] == pytest.approx(rec["miou"]) and back["n_images"] == 2
    with pytest.raises(ValueError, match="not a metrics record"):
        write_metrics(tmp_path / "x.json", {"mIoU": 0.5})
    (tmp_path / "old.json").write_text('{"mIoU": 0.5}')
    assert read_metrics(tmp_path / "old.json") is None and read_metrics(tmp_path / "missing.json") is None
