"""eval_cam / eval_sem_seg (off by default, as in the reference) with IRN's metric semantics:
GT 255 ignored, prediction 255 → 0, IoU_c = tp / (gt + pred − tp), mIoU = nanmean over
classes with gt + pred > 0 (chainercv's ``calc_semantic_segmentation_iou``; ``tools.metrics.scores``'s
``miou_present``). Each step prints the reference lines and writes its metrics record
(``tools.metrics.metrics_record``) to ``eval_cam.json`` / ``eval_sem_seg.json`` beside ``--cam_out_dir``."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
from tqdm import tqdm

from irn.steps.common import load_cam_dict
from tools.imutils import read_label_png
from tools.layout import IRNLayout
from tools.metrics import confusion_matrix, metrics_record, scores, write_metrics
from tools.dataset import DatasetInfo, dataset_of, get_dataset
from voc12.data import load_gt, read_id_list
from voc12.dataset import VOC12


def eval_ids(args: Any) -> list[str]:
    """``--eval_list`` if given, else the list named ``--chainer_eval_set`` (VOC:
    ``<voc12_root>/ImageSets/Segmentation/<set>.txt``; COCO: the descriptor's list of that name)."""
    if getattr(args, "eval_list", None):
        return read_id_list(args.eval_list)
    return read_id_list(dataset_of(args).named_list(args.chainer_eval_set, args.voc12_root))


def irn_scores(hist: np.ndarray) -> dict[str, Any]:
    """IoU (fraction, NaN for a class in neither gt nor prediction), mIoU (their nanmean; both from
    :func:`tools.metrics.scores`) and the printed fp/fn shares from a (C+1, C+1) confusion (rows gt, cols pred)."""
    sc = scores(hist)
    hist = np.asarray(hist, dtype=np.float64)
    gtj, resj, tp = hist.sum(1), hist.sum(0), np.diag(hist)
    den = gtj + resj - tp
    with np.errstate(divide="ignore", invalid="ignore"):
        fp = 1.0 - gtj / den
        fn = 1.0 - resj / den
    return {"iou": sc["iou_present"], "miou": sc["miou_present"], "fp": fp, "fn": fn}


def evaluate(ids: Sequence[str], predict: Callable[[str], np.ndarray], voc_root: str, desc: str,
             quiet: bool = False, dataset: DatasetInfo | str = VOC12) -> dict[str, Any]:
    """Score ``predict(id)`` label maps against the dataset's ground truth under ``voc_root``:
    a ``(C+1, C+1)`` confusion (C from ``dataset``), its IoU/fp/fn and the metrics record."""
    ds = get_dataset(dataset)
    n = ds.num_classes
    hist = np.zeros((n, n), np.int64)
    for i in tqdm(ids, desc=desc, disable=quiet):
        pred = np.asarray(predict(i)).astype(np.int64)
        pred[pred == ds.ignore_index] = 0
        hist += confusion_matrix(pred, load_gt(voc_root, i, dataset=ds), num_classes=n, ignore_index=ds.ignore_index)
    s = irn_scores(hist)
    with np.errstate(invalid="ignore"):
        print(f"bg fp {s['fp'][0]:.4f} fn {s['fn'][0]:.4f}; mean fg fp {np.nanmean(s['fp'][1:]):.4f} "
              f"fn {np.nanmean(s['fn'][1:]):.4f}")
    print({"iou": s["iou"], "miou": s["miou"]})
    s["confusion"] = hist
    s["record"] = metrics_record(hist, "present", n_images=len(ids), step=desc, dataset=ds.name)
    return s


def run_eval_sem_seg(args: Any) -> dict[str, Any]:
    ids = eval_ids(args)
    s = evaluate(ids, lambda i: read_label_png(Path(args.sem_seg_out_dir) / f"{i}.png"), args.voc12_root,
                 "eval_sem_seg", args.quiet, dataset_of(args))
    print(f"eval_sem_seg: mIoU {s['miou']:.4f} over {len(ids)} images")
    write_metrics(IRNLayout.eval_json_beside(args.cam_out_dir, "eval_sem_seg"), s["record"])
    return s


def cam_prediction(cam_dict: dict, thres: float) -> np.ndarray:
    """argmax over [thres plane; high_res] → class indices (0 background, keys + 1)."""
    keys = np.pad(cam_dict["keys"] + 1, (1, 0), mode="constant")
    cams = np.pad(cam_dict["high_res"], ((1, 0), (0, 0), (0, 0)), mode="constant", constant_values=thres)
    return keys[np.argmax(cams, axis=0)]


def run_eval_cam(args: Any) -> dict[str, Any]:
    ids = eval_ids(args)
    ds = dataset_of(args)
    s = evaluate(ids, lambda i: cam_prediction(load_cam_dict(Path(args.cam_out_dir) / f"{i}.npy", ds.num_fg),
                                               args.cam_eval_thres), args.voc12_root, "eval_cam", args.quiet, ds)
    print(f"eval_cam: mIoU {s['miou']:.4f} at threshold {args.cam_eval_thres} over {len(ids)} images")
    s["record"]["threshold"] = args.cam_eval_thres
    write_metrics(IRNLayout.eval_json_beside(args.cam_out_dir, "eval_cam"), s["record"])
    return s
