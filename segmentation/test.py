"""Score saved BECO logits, optionally after dense CRF (stage2.md §2.8, seed command 6)::

    python test.py --crf --logits_dir ./data/logging/seg_result/logits_msc --mode "val"

Per image: logits ``<logits_dir>/<id>.npy`` (C,h,w) -> bilinear to the image size (align_corners
False) -> softmax -> optional dense CRF (10 iterations, Gaussian sxy 1 compat 3, bilateral sxy 67
srgb 3 compat 4, unary -log(clip(p, 1e-5))) -> argmax -> ``<logits_dir>/../<mode>_pred/<id>.png``
(class indices; a VOC-palette PNG, which reads back as the same indices as the reference's mode-L file). Val mode prints ``mIoU: <fraction>`` (mean over classes present in the ground truth)
and writes ``<logits_dir>/../<mode>_metrics[_crf].json``. A rerun reuses a prediction only when the
folder's record (``<mode>_pred/.provenance.json``, docs/formats.md) says it was made from the same
logits file, image and CRF settings; ``--overwrite`` redoes all.

CRF image: the reference passes ``(RGB - [122.675, 116.669, 104.008]).astype(uint8)``, whose negative
values wrap modulo 256 (stage2.md §4 item 15). That stays the default (``--crf_image wrapped``,
it shapes the published number); ``--crf_image clean`` gives the CRF the real image.
"""
from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import sys
from pathlib import Path
from typing import Any

SEG_DIR = Path(__file__).resolve().parent
REPO = SEG_DIR.parent
if str(REPO) not in sys.path:  # the seed command runs `python test.py` from segmentation/
    sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402

from tools.errors import DataError, MissingFileError, require_dir, require_file, run_cli  # noqa: E402
from tools.imutils import read_label_png, write_label_png  # noqa: E402
from tools.io import atomic_write_json  # noqa: E402
from tools.metrics import confusion_matrix, present_class_scores, scores  # noqa: E402
from tools.provenance import Provenance, folder_id, stat_key, upstream_id  # noqa: E402
from voc12.data import image_path, load_gt, load_image, read_id_list  # noqa: E402

VERSION = 1  # output format of <mode>_pred/<id>.png; bump when the code changes what it writes

MEANSUB_RGB = (122.675, 116.669, 104.008)
# segmentation/utils/crf.py DenseCRF defaults (crf.json "beco_test_py").
CRF_PARAMS = dict(n_iter=10, gauss_sxy=1, gauss_compat=3, bil_sxy=67, bil_srgb=3, bil_compat=4)


def wrapped_meansub_uint8(img: np.ndarray) -> np.ndarray:
    """The image the reference's CRF sees: ``(float32 RGB - MEANSUB_RGB).astype(uint8)``, i.e. truncated
    toward zero and wrapped modulo 256 (written out explicitly: numpy leaves negative float -> uint8
    casts platform-defined). img: (H,W,3) uint8 -> (H,W,3) uint8."""
    x = np.asarray(img, dtype=np.float32) - np.asarray(MEANSUB_RGB, dtype=np.float32)
    return (np.trunc(x).astype(np.int64) & 255).astype(np.uint8)


def load_logits(path: str | os.PathLike) -> np.ndarray:
    """One saved logits file as a float (C,h,w) array; a truncated, unreadable or misshapen file
    raises :class:`DataError` naming it (one line) instead of numpy's traceback."""
    try:
        a = np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError) as e:
        why = " ".join(str(e).split())
        raise DataError(f"logits file '{path}' is truncated or unreadable ({type(e).__name__}: {why}); "
                        "rerun `python main.py --test --ckpt <file>` to write it again") from None
    if a.ndim != 3 or not np.issubdtype(a.dtype, np.floating):
        raise DataError(f"logits file '{path}' holds a {a.dtype} array of shape {a.shape}, expected float "
                        "(classes, h, w) as main.py --test writes")
    return a


def logits_to_prob(logits: np.ndarray, size_hw: tuple[int, int]) -> np.ndarray:
    """(C,h,w) logits -> (C,H,W) float32 softmax after bilinear upsampling (align_corners False)."""
    import torch
    import torch.nn.functional as F

    t = torch.from_numpy(np.ascontiguousarray(logits, dtype=np.float32))[None]
    if tuple(t.shape[-2:]) != tuple(size_hw):
        t = F.interpolate(t, size=tuple(size_hw), mode="bilinear", align_corners=False)
    return torch.softmax(t[0], dim=0).numpy()


def predict_one(logits: np.ndarray, img: np.ndarray, crf: bool, crf_image: str = "wrapped") -> np.ndarray:
    """One image's label map (H,W) uint8 from its saved logits (and the CRF when asked)."""
    prob = logits_to_prob(logits, img.shape[:2])
    if crf:
        from tools.crf import dense_crf_softmax

        cimg = wrapped_meansub_uint8(img) if crf_image == "wrapped" else np.ascontiguousarray(img)
        prob = dense_crf_softmax(cimg, prob, **CRF_PARAMS)
    return np.argmax(prob, axis=0).astype(np.uint8)


def _init_worker() -> None:
    import torch

    torch.set_num_threads(1)  # one image per process: threads would only oversubscribe


def _task(t: dict[str, Any]) -> np.ndarray | None:
    """Process one id: returns its confusion matrix (None in test mode)."""
    out = Path(t["out"])
    if t["reuse"] and out.is_file():
        pred = read_label_png(out)
    else:
        img = load_image(t["root"], t["id"])
        logits = load_logits(t["logits"])
        pred = predict_one(logits, img, t["crf"], t["crf_image"])
        write_label_png(out, pred, palette=True)
    if t["label_folder"] is None:
        return None
    gt = load_gt(t["root"], t["id"], folder=t["label_folder"], num_classes=t["num_classes"])
    return confusion_matrix(pred, gt, t["num_classes"], 255)


def default_root(mode: str) -> str:
    name = "VOC2012_test" if mode == "test" else "VOC2012"
    local = SEG_DIR / "data" / name
    if local.is_dir() or mode == "test":
        return str(local)
    fallback = REPO / "data" / name
    return str(fallback if fallback.is_dir() else local)


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description="Upsample saved BECO logits, optional dense CRF, argmax, score.",
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--logits_dir", default="./data/logging/logits", help="folder of <id>.npy logits (C,h,w)")
    ap.add_argument("--n-jobs", "--n_jobs", dest="n_jobs", type=int, default=os.cpu_count(),
                    help="parallel processes")
    ap.add_argument("--crf", action="store_true", help="dense CRF post-processing (needs pydensecrf)")
    ap.add_argument("--crf_image", default="wrapped", choices=["wrapped", "clean"],
                    help="image given to the CRF: the reference's wrapped mean-subtracted uint8, or the real image")
    ap.add_argument("--mode", default="val", choices=["val", "test"], help="val scores; test only predicts")
    ap.add_argument("--data_root", default=None,
                    help="VOC root (default segmentation/data/VOC2012, else the repo's data/VOC2012; "
                         "test mode: segmentation/data/VOC2012_test)")
    ap.add_argument("--list", default=None, help="id list (default <data_root>/ImageSets/Segmentation/<mode>.txt)")
    ap.add_argument("--label_folder", default="SegmentationClassAug", help="ground-truth folder (val mode)")
    ap.add_argument("--num_classes", type=int, default=21)
    ap.add_argument("--overwrite", action="store_true", help="recompute predictions that already exist")
    return ap


def run(args: argparse.Namespace) -> dict[str, Any] | None:
    from tqdm import tqdm

    root = Path(args.data_root or default_root(args.mode))
    require_dir(root, "VOC root", "pass --data_root <VOC2012 folder>")
    lst = Path(args.list) if args.list else root / "ImageSets" / "Segmentation" / f"{args.mode}.txt"
    ids = read_id_list(require_file(lst, f"{args.mode} id list", "pass --list"))
    logits_dir = require_dir(args.logits_dir, "logits folder",
                             "run `python main.py --test --ckpt <file> --logging_tag <tag>` first; it writes "
                             "data/logging/<tag>/logits_msc")
    missing = [i for i in ids if not (logits_dir / f"{i}.npy").is_file()]
    if missing:
        raise MissingFileError(f"{len(missing)} of {len(ids)} logits missing in '{logits_dir}' "
                               f"(first: {missing[0]}.npy); run main.py --test on the same list first")
    if args.crf:
        from tools.crf import crf_available, CRFUnavailableError, INSTALL_HINT

        if not crf_available():
            raise CRFUnavailableError(f"--crf needs pydensecrf: {INSTALL_HINT}")
    pred_dir = logits_dir.parent / f"{args.mode}_pred"
    pred_dir.mkdir(parents=True, exist_ok=True)
    # A finished prediction is reused only when its record matches: the same logits folder (and the
    # same logits file and image per id), the same CRF settings.
    prov = Provenance(pred_dir, "test.py", VERSION,
                      {"logits": upstream_id(logits_dir), "data_root": folder_id(root)},
                      {"crf": bool(args.crf), "crf_image": args.crf_image if args.crf else None,
                       "crf_params": CRF_PARAMS if args.crf else None})
    plan = prov.start(ids, lambda i: [pred_dir / f"{i}.png"],
                      lambda i: stat_key(logits_dir / f"{i}.npy", image_path(root, i)), args.overwrite, "predictions")
    done = set(plan.done)
    label_folder = args.label_folder if args.mode == "val" else None
    tasks = [{"id": i, "root": str(root), "logits": str(logits_dir / f"{i}.npy"), "out": str(pred_dir / f"{i}.png"),
              "crf": bool(args.crf), "crf_image": args.crf_image, "reuse": i in done, "label_folder": label_folder,
              "num_classes": args.num_classes} for i in ids]
    n_jobs = max(1, min(int(args.n_jobs or 1), len(tasks)))
    hist = np.zeros((args.num_classes, args.num_classes), dtype=np.int64)
    desc = "crf" if args.crf else "predict"
    if n_jobs == 1:
        results = (_task(t) for t in tasks)
        for h in tqdm(results, total=len(tasks), desc=desc, dynamic_ncols=True):
            if h is not None:
                hist += h
    else:
        # fork: workers start without re-importing torch (the parent has run no torch op yet)
        ctx = mp.get_context("fork" if "fork" in mp.get_all_start_methods() else "spawn")
        with ctx.Pool(n_jobs, initializer=_init_worker) as pool:
            for h in tqdm(pool.imap_unordered(_task, tasks, chunksize=1), total=len(tasks), desc=desc,
                          dynamic_ncols=True):
                if h is not None:
                    hist += h
    prov.finish()
    if args.mode != "val":
        print(f"wrote {len(tasks)} predictions to {pred_dir}")
        return None
    sc = scores(hist)
    miou = present_class_scores(hist, eps=0.0)["miou"]  # test.py: IoU without EPS, mean over gt classes
    result = {"mIoU": miou, "pixel_acc": sc["pixel_acc"], "mean_acc": sc["mean_acc"], "fw_iou": sc["fw_iou"],
              "iou": present_class_scores(hist, eps=0.0)["iou"].tolist(), "crf": bool(args.crf),
              "crf_image": args.crf_image if args.crf else None, "n_images": len(ids),
              "logits_dir": str(logits_dir), "pred_dir": str(pred_dir), "confusion_matrix": hist.tolist()}
    atomic_write_json(logits_dir.parent / f"{args.mode}_metrics{'_crf' if args.crf else ''}.json", result)
    print(f"mIoU: {miou}")
    return result


def main(argv: list[str] | None = None) -> int:
    return run_cli(run, build_parser().parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
