"""Segmentation metrics from one confusion matrix: per-class IoU, mIoU and the extra figures the
stage-one evaluation and BECO's SimSegMetrics print. Every stage scores through these functions."""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np

from tools.io import atomic_write_json
from voc12.dataset import VOC12

_EPS = 1e-10


def confusion_matrix(pred: np.ndarray, gt: np.ndarray, num_classes: int = VOC12.num_classes,
                     ignore_index: int = 255) -> np.ndarray:
    """Confusion matrix ``(n, n)`` int64, rows = ground truth, columns = prediction.

    Pixels whose gt is ``ignore_index`` (or outside ``[0, n)``) are skipped; predictions outside
    ``[0, n)`` are skipped too (never counted as a class).
    """
    pred = np.asarray(pred).reshape(-1).astype(np.int64)
    gt = np.asarray(gt).reshape(-1).astype(np.int64)
    if pred.shape != gt.shape:
        raise ValueError(f"prediction has {pred.size} pixels, ground truth {gt.size}")
    valid = (gt >= 0) & (gt < num_classes) & (gt != ignore_index) & (pred >= 0) & (pred < num_classes)
    idx = gt[valid] * num_classes + pred[valid]
    return np.bincount(idx, minlength=num_classes * num_classes).reshape(num_classes, num_classes)


def iou_from_confusion(hist: np.ndarray) -> np.ndarray:
    """Per-class IoU ``TP / (T + P - TP + 1e-10)`` (the stage-one reference formula), float64 ``(n,)``.

    A class absent from both gt and prediction gets IoU 0 (it still counts in the stage-one mIoU).
    """
    hist = np.asarray(hist, dtype=np.float64)
    tp = np.diag(hist)
    return tp / (hist.sum(1) + hist.sum(0) - tp + _EPS)


def scores(hist: np.ndarray) -> dict[str, object]:
    """All figures from a confusion matrix (rows gt, cols pred).

    Returns ``iou`` (n,), ``miou`` (mean over all n classes, stage-one definition), ``iou_present`` (n,)
    (``TP/(T+P-TP)``, NaN for a class in neither gt nor prediction), ``miou_present`` (its nanmean,
    chainercv's ``calc_semantic_segmentation_iou``),
    ``pixel_acc``, ``mean_acc`` (nanmean of per-class recall), ``fw_iou`` (frequency-weighted IoU),
    and per-class ``t_over_tp``, ``p_over_tp``, ``fp_share``, ``fn_share`` (the stage-one extras).
    """
    h = np.asarray(hist, dtype=np.float64)
    tp = np.diag(h)
    t = h.sum(1)
    p = h.sum(0)
    union = t + p - tp
    iou = tp / (union + _EPS)
    with np.errstate(divide="ignore", invalid="ignore"):
        iou_present = np.where(union > 0, tp / np.where(union > 0, union, 1), np.nan)
        recall = np.where(t > 0, tp / np.where(t > 0, t, 1), np.nan)
        freq = t / max(t.sum(), 1.0)
    total = h.sum()
    return {
        "iou": iou,
        "miou": float(iou.mean()),
        "iou_present": iou_present,
        "miou_present": float(np.nanmean(iou_present)) if np.any(union > 0) else 0.0,
        "pixel_acc": float(tp.sum() / total) if total else 0.0,
        "mean_acc": float(np.nanmean(recall)) if np.any(t > 0) else 0.0,
        "fw_iou": float((freq[freq > 0] * np.nan_to_num(iou_present)[freq > 0]).sum()),
        "t_over_tp": t / (tp + _EPS),
        "p_over_tp": p / (tp + _EPS),
        "fp_share": (p - tp) / (union + _EPS),
        "fn_share": (t - tp) / (union + _EPS),
    }


def present_class_scores(hist: np.ndarray, eps: float = 1e-5) -> dict[str, object]:
    """Per-class figures averaged over the classes that occur (BECO's ``SimSegMetrics``; with
    ``eps=0`` the ``mIoU`` of BECO's test.py ``scores()``).

    hist: ``(n, n)`` confusion matrix (rows gt, cols pred). With T = row sums, P = column sums,
    TP = diagonal: ``class_acc = TP/(T+eps)``, ``pred_acc = TP/(P+eps)``, ``iou = TP/(T+P-TP+eps)``
    (0 where the denominator is 0), all ``(n,)`` float64; ``overall_acc = ΣTP/Σhist``;
    ``mclass_acc`` and ``miou`` average over classes with T ≥ 1 (present in gt), ``mpred_acc`` over
    classes with P ≥ 1 (present in the prediction).
    """
    h = np.asarray(hist, dtype=np.float64)
    tp = np.diag(h)
    t = h.sum(1)
    p = h.sum(0)

    def _div(a: np.ndarray, b: np.ndarray) -> np.ndarray:
        return np.divide(a, b, out=np.zeros_like(a), where=b > 0)

    class_acc = _div(tp, t + eps)
    pred_acc = _div(tp, p + eps)
    iou = _div(tp, t + p - tp + eps)
    in_gt, in_pred = t >= 1, p >= 1
    total = h.sum()
    return {
        "overall_acc": float(tp.sum() / total) if total else 0.0,
        "class_acc": class_acc,
        "pred_acc": pred_acc,
        "iou": iou,
        "mclass_acc": float(class_acc[in_gt].mean()) if in_gt.any() else 0.0,
        "mpred_acc": float(pred_acc[in_pred].mean()) if in_pred.any() else 0.0,
        "miou": float(iou[in_gt].mean()) if in_gt.any() else 0.0,
    }


# ----------------------------------------------------------------------------------------------
# The one metrics record every scorer writes (docs/formats.md, "Metrics record")

#: the three mIoU definitions the stages use, by name
MIOU_DEFINITIONS: dict[str, str] = {
    "all": "mean over all classes",                                       # stage-one evaluation.py
    "present": "mean over classes present in ground truth or prediction",  # IRN eval (chainercv)
    "gt": "mean over classes present in ground truth",                     # BECO (SimSegMetrics, test.py)
}


def metrics_record(hist: np.ndarray, definition: str = "all", eps: float = 0.0, n_images: int | None = None,
                   **extra: Any) -> dict[str, Any]:
    """The metrics record of one scored prediction set, every figure in percent.

    hist: ``(n, n)`` confusion matrix (rows gt, cols pred). ``definition`` picks what ``miou`` means
    (a key of :data:`MIOU_DEFINITIONS`; ``eps`` is the IoU denominator's epsilon of the ``gt``
    definition: 1e-5 for BECO's SimSegMetrics, 0 for its test.py). Returns ``miou``,
    ``miou_definition`` (the sentence), ``iou`` (n,) under that definition (None for a class the
    definition leaves out), ``miou_all`` (the all-class mean of the stage-one formula, whatever the
    definition, so stages compare), ``pixel_acc``, ``mean_acc``, ``fw_iou``, ``n_images``,
    ``num_classes``, ``confusion_matrix`` and ``extra`` (stage-specific fields, added last).
    """
    if definition not in MIOU_DEFINITIONS:
        raise ValueError(f"unknown mIoU definition {definition!r} (one of {sorted(MIOU_DEFINITIONS)})")
    h = np.asarray(hist, dtype=np.int64)
    sc = scores(h)
    iou_all = [float(v) * 100 for v in iou_from_confusion(h)]
    if definition == "all":
        iou: list[float | None] = iou_all
        miou = float(sc["miou"]) * 100
    elif definition == "present":
        iou = [None if np.isnan(v) else float(v) * 100 for v in sc["iou_present"]]
        miou = float(sc["miou_present"]) * 100
    else:
        pc = present_class_scores(h, eps=eps)
        in_gt = h.sum(1) >= 1
        iou = [float(v) * 100 if g else None for v, g in zip(pc["iou"], in_gt)]
        miou = float(pc["miou"]) * 100
    record: dict[str, Any] = {
        "miou": miou,
        "miou_definition": MIOU_DEFINITIONS[definition],
        "iou": iou,
        # the stage-one formula's mean over all classes (how the pipeline compares stages)
        "miou_all": float(sum(iou_all) / len(iou_all)),
        "pixel_acc": float(sc["pixel_acc"]) * 100,
        "mean_acc": float(sc["mean_acc"]) * 100,
        "fw_iou": float(sc["fw_iou"]) * 100,
        "n_images": n_images,
        "num_classes": int(h.shape[0]),
        "confusion_matrix": h.tolist(),
    }
    record.update(extra)
    return record


def write_metrics(path: os.PathLike | str, record: dict[str, Any]) -> None:
    """Write a :func:`metrics_record` atomically as JSON (refuses a dict that is not one)."""
    missing = [k for k in ("miou", "miou_definition", "iou", "miou_all", "n_images") if k not in record]
    if missing:
        raise ValueError(f"not a metrics record (missing {missing}); build it with tools.metrics.metrics_record")
    atomic_write_json(path, record)


def read_metrics(path: os.PathLike | str) -> dict[str, Any] | None:
    """A metrics record written by :func:`write_metrics`, or None when the file is missing or is not one."""
    try:
        obj = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None
    return obj if isinstance(obj, dict) and "miou" in obj and "miou_definition" in obj else None
