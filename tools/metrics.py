"""Segmentation metrics from one confusion matrix: per-class IoU, mIoU and the extra figures the
stage-one evaluation and BECO's SimSegMetrics print. Every stage scores through these functions."""
from __future__ import annotations

import numpy as np

_EPS = 1e-10


def confusion_matrix(pred: np.ndarray, gt: np.ndarray, num_classes: int = 21,
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

    Returns ``iou`` (n,), ``miou`` (mean over all n classes, stage-one definition), ``miou_present``
    (nanmean over classes present in gt or prediction, the SimSegMetrics/chainercv style),
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
