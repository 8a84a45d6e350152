"""eval_cam / eval_sem_seg (off by default; stage2.md §1.8) with IRN's metric semantics:
GT 255 ignored, prediction 255 → 0, IoU_c = tp / (gt + pred − tp), mIoU = nanmean over
classes with gt + pred > 0 (chainercv's ``calc_semantic_segmentation_iou``)."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
from tqdm import tqdm

from irn.steps.common import load_cam_dict
from tools.imutils import read_label_png
from tools.metrics import confusion_matrix
from voc12.data import load_gt, read_id_list


def eval_ids(args: Any) -> list[str]:
    """``--eval_list`` if given, else ``<voc12_root>/ImageSets/Segmentation/<chainer_eval_set>.txt``."""
    if getattr(args, "eval_list", None):
        return read_id_list(args.eval_list)
    return read_id_list(Path(args.voc12_root) / "ImageSets" / "Segmentation" / f"{args.chainer_eval_set}.txt")


def irn_scores(hist: np.ndarray) -> dict[str, Any]:
    """IoU, mIoU and the printed fp/fn shares from a (21,21) confusion (rows gt, cols pred)."""
    hist = np.asarray(hist, dtype=np.float64)
    gtj, resj, tp = hist.sum(1), hist.sum(0), np.diag(hist)
    den = gtj + resj - tp
    with np.errstate(divide="ignore", invalid="ignore"):
        iou = tp / den
        fp = 1.0 - gtj / den
        fn = 1.0 - resj / den
    return {"iou": iou, "miou": float(np.nanmean(iou)), "fp": fp, "fn": fn}


def evaluate(ids: Sequence[str], predict: Callable[[str], np.ndarray], voc_root: str, desc: str,
             quiet: bool = False) -> dict[str, Any]:
    hist = np.zeros((21, 21), np.int64)
    for i in tqdm(ids, desc=desc, disable=quiet):
        pred = np.asarray(predict(i)).astype(np.int64)
        pred[pred == 255] = 0
        hist += confusion_matrix(pred, load_gt(voc_root, i), num_classes=21, ignore_index=255)
    s = irn_scores(hist)
    with np.errstate(invalid="ignore"):
        print(f"bg fp {s['fp'][0]:.4f} fn {s['fn'][0]:.4f}; mean fg fp {np.nanmean(s['fp'][1:]):.4f} "
              f"fn {np.nanmean(s['fn'][1:]):.4f}")
    print({"iou": s["iou"], "miou": s["miou"]})
    s["confusion"] = hist
    return s


def run_eval_sem_seg(args: Any) -> dict[str, Any]:
    ids = eval_ids(args)
    s = evaluate(ids, lambda i: read_label_png(Path(args.sem_seg_out_dir) / f"{i}.png"), args.voc12_root,
                 "eval_sem_seg", args.quiet)
    print(f"eval_sem_seg: mIoU {s['miou']:.4f} over {len(ids)} images")
    return s


def cam_prediction(cam_dict: dict, thres: float) -> np.ndarray:
    """argmax over [thres plane; high_res] → VOC ids."""
    keys = np.pad(cam_dict["keys"] + 1, (1, 0), mode="constant")
    cams = np.pad(cam_dict["high_res"], ((1, 0), (0, 0), (0, 0)), mode="constant", constant_values=thres)
    return keys[np.argmax(cams, axis=0)]


def run_eval_cam(args: Any) -> dict[str, Any]:
    ids = eval_ids(args)
    s = evaluate(ids, lambda i: cam_prediction(load_cam_dict(Path(args.cam_out_dir) / f"{i}.npy"),
                                               args.cam_eval_thres), args.voc12_root, "eval_cam", args.quiet)
    print(f"eval_cam: mIoU {s['miou']:.4f} at threshold {args.cam_eval_thres} over {len(ids)} images")
    return s
