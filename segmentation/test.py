"""Score saved BECO logits, optionally after dense CRF (the authors' README command)::

    python test.py --crf --logits_dir ./data/logging/seg_result/logits_msc --mode "val"

Per image: logits ``<logits_dir>/<id>.npy`` (C,h,w) -> bilinear to the image size (align_corners
False) -> softmax -> optional dense CRF (10 iterations, Gaussian sxy 1 compat 3, bilateral sxy 67
srgb 3 compat 4, unary -log(clip(p, 1e-5))) -> argmax -> ``<logits_dir>/../<mode>_pred/<id>.png``
(class indices; a VOC-palette PNG, which reads back as the same indices as the reference's mode-L file). Val mode prints ``mIoU: <fraction>`` (mean over classes present in the ground truth)
and writes ``<logits_dir>/../<mode>_metrics[_crf].json``. A rerun reuses a prediction only when the
folder's record (``<mode>_pred/.provenance.json``, docs/formats.md) says it was made from the same
logits file, image and CRF settings; ``--overwrite`` redoes all.

CRF image: the reference passes ``(RGB - [122.675, 116.669, 104.008]).astype(uint8)``, whose negative
values wrap modulo 256 (docs/deviations.md, "BECO stage"). That stays the default (``--crf_image wrapped``,
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
if str(REPO) not in sys.path:  # the authors' README command runs `python test.py` from segmentation/
    sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402

from tools.dataset import DatasetArgumentParser, add_dataset_arg, dataset_of, get_dataset  # noqa: E402
from tools.errors import MissingFileError, require_dir, require_file, run_cli  # noqa: E402
from tools.imutils import read_label_png, write_label_png  # noqa: E402
from tools.layout import BECOLayout  # noqa: E402
from tools.metrics import confusion_matrix, metrics_record, present_class_scores, write_metrics  # noqa: E402
from tools.provenance import Provenance, folder_id, stat_key, upstream_id  # noqa: E402
from voc12.data import image_path, load_gt, load_image, read_id_list  # noqa: E402
from segmentation.beco.postprocess import CRF_PARAMS, load_logits, predict_one  # noqa: E402

VERSION = 1  # output format of <mode>_pred/<id>.png; bump when the code changes what it writes


def _init_worker() -> None:
    import torch

    torch.set_num_threads(1)  # one image per process: threads would only oversubscribe


def _task(t: dict[str, Any]) -> np.ndarray | None:
    """Process one id: returns its confusion matrix (None in test mode)."""
    out = Path(t["out"])
    if t["reuse"] and out.is_file():
        pred = read_label_png(out)
    else:
        img = load_image(t["root"], t["id"], t["dataset"])
        logits = load_logits(t["logits"], t["num_classes"])
        pred = predict_one(logits, img, t["crf"], t["crf_image"])
        write_label_png(out, pred, palette=True)
    if t["label_folder"] is None:
        return None
    gt = load_gt(t["root"], t["id"], folder=t["label_folder"], num_classes=t["num_classes"], dataset=t["dataset"])
    return confusion_matrix(pred, gt, t["num_classes"], 255)


def default_root(mode: str, dataset: str = "voc12") -> str:
    """``segmentation/data/<root name>[_test]`` (VOC: VOC2012, VOC2012_test), else the repository's
    copy (the dataset descriptor's default root, data/VOC2012)."""
    rel = Path(get_dataset(dataset).default_root)
    name = rel.name + ("_test" if mode == "test" else "")
    local = SEG_DIR / "data" / name
    if local.is_dir() or mode == "test":
        return str(local)
    fallback = REPO / rel.parent / name
    return str(fallback if fallback.is_dir() else local)


def _dataset_defaults(args: argparse.Namespace) -> None:
    ds = dataset_of(args)
    if args.label_folder is None:
        args.label_folder = ds.aug_gt_folder
    if args.num_classes is None:
        args.num_classes = ds.num_classes


def build_parser() -> argparse.ArgumentParser:
    from tools import cli

    ap = DatasetArgumentParser(description="Upsample saved BECO logits, optional dense CRF, argmax, score.",
                               formatter_class=argparse.ArgumentDefaultsHelpFormatter, fill=_dataset_defaults)
    ap.add_argument("--logits_dir", default="./data/logging/logits", help="folder of <id>.npy logits (C,h,w)")
    ap.add_argument("--n-jobs", "--n_jobs", dest="n_jobs", type=cli.positive_int, default=os.cpu_count(),
                    help="parallel processes")
    ap.add_argument("--crf", action="store_true", help="dense CRF post-processing (needs pydensecrf)")
    ap.add_argument("--crf_image", default="wrapped", choices=["wrapped", "clean"],
                    help="image given to the CRF: the reference's wrapped mean-subtracted uint8, or the real image")
    ap.add_argument("--mode", default="val", choices=["val", "test"], help="val scores; test only predicts")
    ap.add_argument("--data_root", default=None,
                    help="VOC root (default segmentation/data/VOC2012, else the repo's data/VOC2012; "
                         "test mode: segmentation/data/VOC2012_test)")
    ap.add_argument("--list", default=None, help="id list file, or a list name (COCO: val, val_part) "
                    "(default: the dataset's list named <mode>; VOC <data_root>/ImageSets/Segmentation/<mode>.txt)")
    add_dataset_arg(ap)
    ap.add_argument("--label_folder", default=None, help="ground-truth folder, val mode (default: the dataset's, "
                    "VOC SegmentationClassAug)")
    ap.add_argument("--num_classes", type=cli.int_at_least(2, "background and at least one class"), default=None,
                    help="classes with background (default: the dataset's, 21 for voc12)")
    ap.add_argument("--overwrite", action="store_true", help="recompute predictions that already exist")
    return ap


def run(args: argparse.Namespace) -> dict[str, Any] | None:
    from tqdm import tqdm

    ds = dataset_of(args)
    _dataset_defaults(args)
    root = Path(args.data_root or default_root(args.mode, ds.name))
    require_dir(root, f"{ds.name} root", "pass --data_root <dataset folder>")
    lst = ds.list_arg(args.list, root) if args.list else ds.named_list(args.mode, root)
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
    pred_dir = BECOLayout(logits_dir.parent).pred(args.mode)
    pred_dir.mkdir(parents=True, exist_ok=True)
    # A finished prediction is reused only when its record matches: the same logits folder (and the
    # same logits file and image per id), the same CRF settings.
    prov = Provenance(pred_dir, "test.py", VERSION,
                      {"logits": upstream_id(logits_dir), "data_root": folder_id(root)},
                      {"crf": bool(args.crf), "crf_image": args.crf_image if args.crf else None,
                       "crf_params": CRF_PARAMS if args.crf else None})
    plan = prov.start(ids, lambda i: [pred_dir / f"{i}.png"],
                      lambda i: stat_key(logits_dir / f"{i}.npy", image_path(root, i, ds)), args.overwrite, "predictions")
    done = set(plan.done)
    label_folder = args.label_folder if args.mode == "val" else None
    tasks = [{"id": i, "root": str(root), "logits": str(logits_dir / f"{i}.npy"), "out": str(pred_dir / f"{i}.png"),
              "crf": bool(args.crf), "crf_image": args.crf_image, "reuse": i in done, "label_folder": label_folder,
              "num_classes": args.num_classes, "dataset": ds.name} for i in ids]
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
    miou = present_class_scores(hist, eps=0.0)["miou"]  # test.py: IoU without EPS, mean over gt classes
    result = metrics_record(hist, "gt", eps=0.0, n_images=len(ids), crf=bool(args.crf),
                            crf_image=args.crf_image if args.crf else None, logits_dir=str(logits_dir),
                            pred_dir=str(pred_dir), dataset=ds.name)
    write_metrics(BECOLayout(logits_dir.parent).val_metrics(args.crf, args.mode), result)
    print(f"mIoU: {miou}")
    return result


def main(argv: list[str] | None = None) -> int:
    return run_cli(run, build_parser().parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
