"""The whole KTSE+ pipeline in one command: stage one (train → infer → evaluate), IRN (run_sample →
score → gen_mask), BECO (train → test → test.py, with and without CRF), then one table and a report.

    python run_pipeline.py --preset toy            # synthetic data, CPU, about 10 minutes
    python run_pipeline.py --preset voc            # reference settings on data/VOC2012 (GPUs)
    python run_pipeline.py --preset toy --from irn --to beco
    python run_pipeline.py --preset voc --dry_run  # only print the commands
    python run_pipeline.py --preset toy --dataset coco14   # the COCO-format toy set
    python run_pipeline.py --preset coco           # COCO 2014 settings on data/COCO2014 (GPUs)

Every step is the same command a user would type (printed before it runs). Steps whose outputs
exist are skipped, so an interrupted run is finished by running the same command again; the final
table is rebuilt from the recorded figures. Outputs: ``experiments/<name>/report.md`` (+ PNGs in
``experiments/<name>/report/``) and ``experiments/<name>/pipeline/`` (per-step logs and records,
``summary.json``).
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a script from anywhere: make the repo importable
    sys.path.insert(0, str(Path(__file__).resolve().parent))

from pipeline.plan import (PRESET_DATASETS, STAGE_TITLES, STAGES, TOY_SIZES, build_steps, default_config, paths_for,
                           select_steps, train_pred_layout)
from pipeline.report import (GridColumn, ReportInputs, StageRow, format_table, read_json, rows_from_json,
                             rows_to_json, trivial_baselines, write_report)
from pipeline.runner import (REPO_ROOT, StepInterrupted, StepResult, check_requirements, collect_results,
                             run_steps)
from tools import cli
from tools.dataset import add_dataset_arg, get_dataset
from tools.errors import EXIT_INTERRUPTED, WSSSError, run_cli
from tools.io import atomic_write_json


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--preset", choices=("toy",) + tuple(PRESET_DATASETS), default="toy",
                   help="toy: synthetic data, small CPU models; voc: reference settings on data/VOC2012; "
                        "coco: the COCO settings on data/COCO2014 (implies --dataset coco14)")
    p.add_argument("--size", choices=tuple(TOY_SIZES), default="small",
                   help="toy preset only: 'small' (the demo, <= 10 min on 2 cores) or 'tiny' (CI, <= 3 min)")
    p.add_argument("--name", default=None, help="experiment name (default: toy / toy_tiny / ktse1; COCO: "
                   "coco_toy / coco_toy_tiny / ktse_coco)")
    p.add_argument("--data_root", default=None, help="dataset root (default data/toy or data/VOC2012; COCO: "
                   "data/coco_toy or data/COCO2014)")
    add_dataset_arg(p, default=None)
    p.add_argument("--from", dest="start", default=None, metavar="STAGE",
                   help=f"first stage or step to run ({', '.join(STAGES)}, or a step name)")
    p.add_argument("--to", dest="stop", default=None, metavar="STAGE", help="last stage or step to run")
    p.add_argument("--device", type=cli.device, default="auto", help="device for every stage (auto, cpu, cuda, cuda:1)")
    p.add_argument("--workers", type=cli.positive_int, default=None, help="worker processes per step (default 2 toy / 8 voc)")
    p.add_argument("--threads", type=cli.nonneg_int, default=None,
                   help="OMP_NUM_THREADS for every step (default 1 for toy: tiny models, no spinning thread pools; "
                        "unset for voc); 0 = leave it to torch")
    p.add_argument("--overwrite", action="store_true",
                   help="redo the selected steps even if their outputs exist (passes --overwrite where a CLI has it)")
    p.add_argument("--dry_run", action="store_true", help="print the commands and exit")
    p.add_argument("--quiet", action="store_true", help="do not echo the steps' output (it is still logged)")
    p.add_argument("--no_report", action="store_true", help="print the table only, no report.md / PNGs")
    return p


def _stage_seconds(results: list[StepResult], stage: str, attr: str = "seconds") -> float | None:
    secs = [getattr(r, attr) for r in results if r.stage == stage and getattr(r, attr) is not None]
    return round(sum(secs), 3) if secs else None


def _threshold_note(cam: dict) -> str:
    """The seed row's note: the best threshold, and whether it is an end of the swept range (the reference
    sweeps 0.10 .. 0.29; a best at an end may lie outside it)."""
    if cam.get("best_th") is None:
        return ""
    edge = cam.get("best_th_edge")
    return f"t={cam['best_th']:.2f}" + (f", {edge} of the sweep" if edge else "")


def build_rows(results: list[StepResult], baselines: dict[str, dict], toy: bool) -> list[StageRow]:
    """The final table from the step results (figures recorded by each step's metrics reader). The
    headline mIoU is the mean over the classes present in the ground truth (BECO test.py's definition,
    also for the seeds and pseudo-labels, from their confusion matrices); the all-class mean is kept in
    ``miou_all``. Baseline: the better trivial one under the same mean."""
    by = {r.name: r.metrics for r in results}

    def base(split: str) -> float | None:
        b = baselines.get(split) or {}
        vals = [v for k, v in b.items() if k in ("all_background_present", "centre_box_present")]
        return max(vals) if vals else None

    def row(stage: str, metric: str, split: str, m: dict, extra: str = "") -> StageRow:
        head = m.get("miou_present", m.get("miou"))
        return StageRow(STAGE_TITLES[stage], metric, split, head, base(split), _stage_seconds(results, stage),
                        extra, miou_all=m.get("miou21"))

    rows = [StageRow(STAGE_TITLES["data"], "toy set + lists" if toy else "lists + class labels", "",
                     seconds=_stage_seconds(results, "data"))]
    cam = by.get("eval_cam", {})
    rows.append(row("stage1", "CAM seeds, best threshold", "train", cam,
                    _threshold_note(cam)))
    rows.append(row("irn", "pseudo-labels (random walk)", "train", by.get("eval_irn", {})))
    on_train = by.get("beco_train_pred", {}).get("miou_present")
    rows.append(row("beco", "val mIoU (test.py)", "val", by.get("beco_score", {}),
                    f"on train {on_train:.2f}%" if on_train is not None else ""))
    rows.append(row("crf", "val mIoU (test.py --crf)", "val", by.get("beco_crf", {})))
    for r, stage in zip(rows, ("data", "stage1", "irn", "beco", "crf")):
        r.cpu_seconds = _stage_seconds(results, stage, "cpu_seconds")
    return rows


#: summary.json's stage keys and the table stages they come from
SUMMARY_STAGES = {"seeds": "stage1", "pseudo_labels": "irn", "beco": "beco", "beco_crf": "crf"}


def stage_summary(rows: list[StageRow], baselines: dict[str, dict], results: list[StepResult]) -> dict:
    """``experiments/<name>/summary.json``: per stage (seeds, pseudo_labels, beco, beco_crf) the
    headline mIoU (``miou_present``), the all-class mean, both trivial baselines on the stage's split
    under the headline mean, and the stage's wall and CPU seconds; ``total_wall_s`` sums every step's
    recorded wall time (percent values; None where a figure is not there yet)."""
    by_title = {r.stage: r for r in rows}
    stages = {}
    for key, stage in SUMMARY_STAGES.items():
        r = by_title[STAGE_TITLES[stage]]
        b = baselines.get(r.split) or {}
        stages[key] = {"miou_present": r.miou, "miou_all_classes": r.miou_all,
                       "baseline_centre_box": b.get("centre_box_present"),
                       "baseline_all_bg": b.get("all_background_present"),
                       "wall_s": r.seconds, "cpu_s": r.cpu_seconds}
    total = sum(x.seconds for x in results if x.seconds is not None)
    return {"stages": stages, "total_wall_s": round(float(total), 3)}


def compute_baselines(cfg, lists: Path) -> dict[str, dict]:
    """Trivial baselines on the train and val lists (empty when the data is not there yet)."""
    from voc12.data import load_cls_labels, read_id_list

    out: dict[str, dict] = {}
    ds = get_dataset(cfg.dataset)
    gt_dir = ds.gt_dir(REPO_ROOT / cfg.data_root)
    cls_path = lists / "cls_labels.npy"
    if not gt_dir.is_dir() or not cls_path.is_file():
        return out
    cls = load_cls_labels(cls_path, ds)
    for split in ("train", "val"):
        lst = lists / f"{split}.txt"
        if lst.is_file():
            try:
                out[split] = trivial_baselines(read_id_list(lst), gt_dir, cls, dataset=ds)
            except WSSSError:
                continue
    return out


class _Stopped(BaseException):
    """The pipeline stopped during a step and has said so: exit as interrupted, without another line."""


def main(argv: list[str] | None = None) -> int:
    try:
        return run_cli(run, build_parser().parse_args(argv))
    except _Stopped:
        return EXIT_INTERRUPTED


def run(args: argparse.Namespace) -> None:
    """Run the selected steps (a failed step raises StepFailed), then print the table and write the
    report; every external input the selected steps need is checked before the first one runs."""
    try:  # without --dataset, a full-size preset runs on its own dataset (coco -> coco14), toy on voc12
        cfg = default_config(args.preset, args.name, args.data_root, args.size, args.device, args.workers,
                             threads=args.threads, dataset=getattr(args, "dataset", None))
    except ValueError as e:
        raise WSSSError(str(e)) from None
    os.chdir(REPO_ROOT)  # every path in the plan is relative to the repo root
    try:
        steps = select_steps(build_steps(cfg), args.start, args.stop)
    except ValueError as e:
        raise WSSSError(str(e)) from None
    exp = REPO_ROOT / cfg.exp_dir
    record_dir = exp / "pipeline"
    if not args.dry_run:
        check_requirements(steps, REPO_ROOT, overwrite=args.overwrite, record_dir=record_dir)
    print(f"KTSE+ pipeline, preset '{cfg.preset}'" + (f" ({cfg.size})" if cfg.preset == "toy" else "") +
          f", experiment '{cfg.name}', data '{cfg.data_root}', steps: {', '.join(s.name for s in steps)}")
    t0 = time.perf_counter()
    try:
        run_steps(steps, record_dir, REPO_ROOT, overwrite=args.overwrite, dry_run=args.dry_run, echo=not args.quiet)
    except StepInterrupted as e:
        # one line: the step's own "interrupted: ..." (when it was echoed) is not repeated, and this
        # one says which command to rerun
        lead = "" if e.step_said else "interrupted: "
        print(f"{lead}pipeline stopped during step '{e.step}'; rerun the same run_pipeline.py command to "
              "continue (finished steps are skipped)", file=sys.stderr, flush=True)
        raise _Stopped from None
    if args.dry_run:
        return
    # The table covers the whole chain, also when only part of it ran now: records of the other
    # steps are read back without running anything.
    all_results = collect_results(build_steps(cfg), record_dir, REPO_ROOT)
    baselines = compute_baselines(cfg, REPO_ROOT / cfg.lists_dir)
    rows = build_rows(all_results, baselines, cfg.preset == "toy")
    title = f"\nKTSE+ pipeline '{cfg.name}' ({cfg.preset}), this run {time.perf_counter() - t0:.1f} s"
    print(format_table(rows, title))
    for split, b in baselines.items():
        print(f"trivial baselines on {split} (classes present): all background {b['all_background_present']:.2f}%, "
              f"centre box {b.get('centre_box_present', float('nan')):.2f}% "
              f"(area {b.get('centre_box_present_area', float('nan')):.2f}); all-class means "
              f"{b['all_background']:.2f}% and {b.get('centre_box', float('nan')):.2f}%")
    summary = {"preset": cfg.preset, "size": cfg.size if cfg.preset == "toy" else None, "name": cfg.name,
               "data_root": cfg.data_root, "rows": rows_to_json(rows), "baselines": baselines,
               "steps": [{"name": r.name, "stage": r.stage, "command": r.command, "seconds": r.seconds,
                          "cpu_seconds": r.cpu_seconds, "metrics": r.metrics} for r in all_results]}
    atomic_write_json(record_dir / "summary.json", summary)
    atomic_write_json(exp / "summary.json", stage_summary(rows, baselines, all_results))
    if not args.no_report:
        md = write_report(report_inputs(cfg, rows, all_results))
        print(f"report: {md.relative_to(REPO_ROOT)}")


def auto_notes(rows: list[StageRow], cam: dict | None = None) -> list[str]:
    """Plain statements about the table: a seed threshold at an end of its sweep (``cam``: the eval_cam
    step's figures), stages at or below the trivial baseline, stages that do not improve on the one
    before (seeds -> pseudo-labels -> BECO -> BECO + CRF)."""
    notes = []
    if cam and cam.get("best_th_edge"):
        notes.append(f"{STAGE_TITLES['stage1']}: the best seed threshold ({_threshold_note(cam)}) is an end of the "
                     "swept range, so the seeds may be better outside it (evaluation.py --thresholds sweeps "
                     "another range).")
    scored = [r for r in rows if r.miou is not None]
    for r in scored:
        if r.baseline is not None and r.miou <= r.baseline:
            notes.append(f"{r.stage}: {r.miou:.2f}% is not above the trivial baseline ({r.baseline:.2f}%) on {r.split}.")
    for a, b in zip(scored, scored[1:]):
        if b.miou <= a.miou:
            notes.append(f"{b.stage} ({b.miou:.2f}%) does not improve on {a.stage} ({a.miou:.2f}%)"
                         + (" (different splits: train vs val)." if a.split != b.split else "."))
    return notes


def report_inputs(cfg, rows: list[StageRow], results: list[StepResult]) -> ReportInputs:
    from voc12.data import read_id_list

    p = paths_for(cfg)
    lists = REPO_ROOT / cfg.lists_dir
    # the same six training images in every column: they have CAMs, seeds, pseudo-labels and masks, and
    # (toy runs) BECO's predictions of the training images
    examples: list[tuple[str, str]] = []
    lst = lists / "train.txt"
    if lst.is_file():
        examples = [("train", i) for i in read_id_list(lst)[:6]]
    gt = get_dataset(cfg.dataset).gt_dir(REPO_ROOT / cfg.data_root)
    cols = [GridColumn("image", "image"), GridColumn("ground truth", "gt", gt),
            GridColumn("CAM", "heat", REPO_ROOT / p.dict_dir, ".npy"),
            GridColumn("seed", "cam", REPO_ROOT / p.dict_dir, ".npy"),
            GridColumn("pseudo-label + mask", "label_mask", REPO_ROOT / p.irn_sem_seg,
                       mask_folder=REPO_ROOT / p.irn_mask)]
    if cfg.preset == "toy":
        logits = REPO_ROOT / train_pred_layout(cfg).logits_msc
        cols += [GridColumn("BECO", "logits", logits, ".npy"), GridColumn("BECO + CRF", "logits_crf", logits, ".npy")]
    series = {"CAM seeds (train)": REPO_ROOT / p.cam_eval_json, "IRN pseudo-labels (train)": REPO_ROOT / p.irn_eval_json,
              "BECO (val)": REPO_ROOT / p.beco.val_metrics(),
              "BECO + CRF (val)": REPO_ROOT / p.beco.val_metrics(crf=True)}
    notes = auto_notes(rows, next((r.metrics for r in results if r.name == "eval_cam"), None))
    if cfg.preset == "toy":
        notes.append("Toy preset: synthetic images, networks trained from scratch at small width; the figures "
                     "show the chain works and each stage's effect, not the paper's accuracy.")
    return ReportInputs(name=cfg.name, exp_dir=REPO_ROOT / cfg.exp_dir, data_root=REPO_ROOT / cfg.data_root, rows=rows,
                        cam_eval_json=REPO_ROOT / p.cam_eval_json, per_class_jsons=series, example_ids=examples,
                        columns=cols, commands=[f"$ {r.command}" for r in results], notes=notes, preset=cfg.preset,
                        dataset=cfg.dataset)


if __name__ == "__main__":
    sys.exit(main())
