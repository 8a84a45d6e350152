"""Score stage-one predictions against VOC ground truth (the authors' README command, below).

    python evaluation.py --name ktse1 --task cam --dict_dir dict

task ``cam``: the reference background-threshold sweep (t = 0.10 .. 0.29; ``--thresholds`` for another range) over the CAM dictionaries
``experiments/<name>/<dict_dir>/<id>.npy``, printing exactly the reference's 20 sweep lines,
then (added) the best threshold with its mIoU and the per-class IoU table at that threshold.
tasks ``crf`` / ``dl``: dictionaries whose keys include background (0); ``png``: label PNGs (e.g. IRN
pseudo-labels, ``--pred_dir <folder>``). All tasks also write ``experiments/<name>/eval_<task>.json``
and ``experiments/<name>/eval_<task>.png`` (mIoU vs threshold, per-class IoU bars).
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

from tools.seed_eval import REFERENCE_THRESHOLDS, TASKS, evaluate, plot_result, threshold_range
from tools import cli
from tools.errors import require_all, run_cli
from tools.layout import StageOneLayout
from tools.dataset import DatasetInfo, add_dataset_arg, get_dataset
from tools.metrics import write_metrics
from voc12.lists import read_id_list


def display_path(p: os.PathLike | str) -> str:
    """Paths as the reference prints them: relative ones with a leading './'."""
    s = str(p)
    if os.path.isabs(s) or s.startswith("."):
        return s
    return "./" + s


def resolve_list(value: str, data_root: os.PathLike | str, dataset: DatasetInfo | str = "voc12") -> Path:
    """``--list``: a list name, or a path to a list file (plain ids or ``/JPEGImages/<id>.jpg ...`` lines).
    VOC names lie under ``<data_root>/ImageSets/Segmentation/`` (the reference: ``train`` -> ``train.txt``);
    a dataset without such a folder (COCO) names the lists of its descriptor (``val``, ``val_part``)."""
    return get_dataset(dataset).list_arg(value, data_root)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--list", default=None,
                   help="list name (VOC: under <data_root>/ImageSets/Segmentation/, as the reference; COCO: "
                        "train, val, val_part) or a path to a list file (default: the dataset's seed list, "
                        "VOC 'train')")
    p.add_argument("--task", required=True, choices=TASKS, help="cam: threshold sweep over CAM dicts; "
                   "crf/dl: dicts with background key 0; png: label PNGs")
    p.add_argument("--name", required=True, help="experiment name: predictions in experiments/<name>/<dict_dir>/")
    p.add_argument("--dict_dir", default=None,
                   help="prediction folder under experiments/<name>/ (required unless --pred_dir is given)")
    p.add_argument("--pred_dir", default=None,
                   help="added: any prediction folder (overrides experiments/<name>/<dict_dir>; e.g. IRN sem_seg PNGs)")
    p.add_argument("--gt_dir", default=None, help="ground-truth PNG folder (default <data_root>/SegmentationClass)")
    p.add_argument("--data_root", default=None, help="dataset folder (default: the dataset's, data/VOC2012)")
    add_dataset_arg(p)
    p.add_argument("--thresholds", type=float, nargs=3, metavar=("START", "STOP", "STEP"), default=None,
                   help="added: task cam's background thresholds START, START+STEP, ... below STOP (default: the "
                        "reference's 0.10 0.30 0.01, i.e. 0.10 .. 0.29); a best threshold at the top of the "
                        "range means the sweep should go further")
    p.add_argument("--exp_root", default="experiments", help="added: folder holding experiments/<name>")
    p.add_argument("--workers", type=cli.positive_int, default=min(8, os.cpu_count() or 1),
                   help="added: worker processes (images in parallel); the reference uses 8")
    p.add_argument("--out_json", default=None, help="added: summary JSON (default experiments/<name>/eval_<task>.json)")
    p.add_argument("--no_plot", action="store_true", help="added: do not write the PNG plot")
    p.add_argument("--no_progress", action="store_true", help="added: no progress bar (it goes to stderr)")
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.pred_dir is None and args.dict_dir is None:
        parser.error("give --dict_dir (a folder under experiments/<name>/) or --pred_dir")
    if args.thresholds is not None:
        try:
            threshold_range(*args.thresholds)
        except ValueError as e:
            parser.error(f"--thresholds: {e}")
    return run_cli(run, args)


def run(args: argparse.Namespace) -> None:
    """Score the predictions named by ``args``; print the tables, write the JSON (and plot)."""
    ds = get_dataset(getattr(args, "dataset", "voc12"))
    data_root = args.data_root or ds.default_root
    exp = StageOneLayout.of(args.exp_root, args.name)
    pred_dir = Path(args.pred_dir) if args.pred_dir else exp.root / args.dict_dir
    list_path = resolve_list(args.list or ds.seed_list, data_root, ds)
    gt_dir = Path(args.gt_dir) if args.gt_dir else ds.gt_dir(data_root)
    preds = "<id>.png label maps" if args.task == "png" else "<id>.npy dictionaries"
    require_all([
        (list_path, "image list (--list)", ds.labels_hint),
        (gt_dir, "ground-truth folder (--gt_dir / --data_root)", ds.root_hint, "dir"),
        (pred_dir, f"prediction folder of {preds}",
         "Run infer.py --dict for CAM dictionaries, or check --name/--dict_dir/--pred_dir.", "dir"),
    ], context="before evaluation started")
    ids = read_id_list(list_path)
    print("Evaluate %s with %s" % (display_path(pred_dir), display_path(list_path)), flush=True)
    t0 = time.perf_counter()
    thresholds = threshold_range(*args.thresholds) if args.thresholds else REFERENCE_THRESHOLDS
    res = evaluate(args.task, ids, pred_dir, gt_dir, thresholds, args.workers,
                   progress=not args.no_progress, retain_memory=True, dataset=ds)
    seconds = time.perf_counter() - t0
    if args.task == "cam":
        for line in res.sweep_lines():
            print(line)
        print(res.best_line())
        if res.best_at_edge:  # stderr: stdout stays the reference's lines
            lo, hi = res.thresholds[0], res.thresholds[-1]
            print(f"note: the best threshold {res.best_th:.2f} is the {res.best_at_edge} of the swept range "
                  f"{lo:.2f} .. {hi:.2f}; the best may lie outside it (--thresholds START STOP STEP sweeps "
                  "another range)", file=sys.stderr, flush=True)
    sys.stdout.write(res.table())
    sys.stdout.flush()

    summary = res.to_json()
    summary.update(name=args.name, dataset=ds.name, pred_dir=str(pred_dir), list=str(list_path), gt_dir=str(gt_dir),
                   seconds=round(seconds, 3))
    out_json = Path(args.out_json) if args.out_json else exp.eval_json(args.task)
    write_metrics(out_json, summary)
    if not args.no_plot:
        title = f"{args.name}: {args.task} on {list_path.name} ({len(ids)} images)"
        if not plot_result(res, out_json.with_suffix(".png"), title):
            print("note: matplotlib is not installed, no plot written", file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
