"""The pipeline's closing figures: the stage table (text and markdown), trivial baselines, and
``experiments/<name>/report.md`` with its PNGs (stage bars, CAM threshold curve, per-class IoU bars,
a grid of example images with CAM seeds, pseudo-labels and predictions).

Everything here reads files the stage CLIs wrote (their metrics records, :func:`tools.metrics.metrics_record`; CAM dictionaries,
label PNGs) and the runner's step records; nothing is recomputed except the trivial baselines, which
are scored with :mod:`tools.metrics` like every stage. Rerunning ``run_pipeline.py`` on a finished
run skips every step and rebuilds the table and the report.
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterable, Mapping, Sequence

import numpy as np

from tools.dataset import DatasetInfo, get_dataset
from tools.imutils import read_gt_png, read_label_png, read_rgb
from tools.io import atomic_path, atomic_write_text
from tools.metrics import confusion_matrix, iou_from_confusion, present_class_scores, read_metrics
from voc12.dataset import VOC12


# ----------------------------------------------------------------------------------------------
# reading the stages' outputs


def read_json(path: os.PathLike | str | None) -> dict | None:
    """The JSON object in ``path``, or None when the file is absent or unreadable (a report must
    still be written for a partial run)."""
    if path is None:
        return None
    p = Path(path)
    if not p.is_file():
        return None
    try:
        obj = json.loads(p.read_text())
    except (OSError, ValueError):
        return None
    return obj if isinstance(obj, dict) else None


def record_iou(rec: Mapping | None, num_classes: int = VOC12.num_classes) -> list[float] | None:
    """Per-class IoU (percent, ``num_classes`` values, the stage-one formula of
    :func:`tools.metrics.iou_from_confusion`) from a metrics record's confusion matrix, whatever its
    mIoU definition, so the per-class figures of every stage compare; None when absent."""
    if not rec or rec.get("confusion_matrix") is None:
        return None
    hist = np.asarray(rec["confusion_matrix"], dtype=np.int64)
    if hist.shape != (num_classes, num_classes):
        return None
    return [float(v) * 100 for v in iou_from_confusion(hist)]


# ----------------------------------------------------------------------------------------------
# trivial baselines


def centre_box_prediction(shape: tuple[int, int], classes: Sequence[int], area: float) -> np.ndarray:
    """A label map: background, with a centred box covering ``area`` of the image split into equal
    vertical stripes, one per labelled class (``classes`` are 1-based label values)."""
    h, w = shape
    pred = np.zeros((h, w), np.uint8)
    if not len(classes):
        return pred
    side = math.sqrt(area)
    bh, bw = max(1, round(h * side)), max(1, round(w * side))
    y0, x0 = (h - bh) // 2, (w - bw) // 2
    edges = np.linspace(x0, x0 + bw, len(classes) + 1).round().astype(int)
    for c, a, b in zip(classes, edges[:-1], edges[1:]):
        pred[y0:y0 + bh, a:b] = c
    return pred


def trivial_baselines(ids: Sequence[str], gt_dir: os.PathLike | str,
                      cls_labels: Mapping[str, np.ndarray] | None,
                      areas: Sequence[float] = (0.25, 0.5, 0.75),
                      dataset: DatasetInfo | str = VOC12) -> dict[str, float]:
    """mIoU (percent) of trivial predictions: ``all_background`` and ``centre_box`` (the image-level
    labels painted into a centred box; the best of ``areas`` is kept, so this baseline is even tuned on
    the ground truth), each as the mean over all C+1 classes (like the stage-one evaluation) and, with
    the suffix ``_present``, over the classes present in the ground truth (:func:`present_miou`, BECO's
    test.py definition; its best box area chosen for that mean).
    """
    ds = get_dataset(dataset)
    n = ds.num_classes
    hists = {"all_background": np.zeros((n, n), np.int64)}
    box_hists = {a: np.zeros((n, n), np.int64) for a in areas}
    for img_id in ids:
        gt = read_gt_png(ds.gt_path(gt_dir, img_id), n)
        hists["all_background"] += confusion_matrix(np.zeros_like(gt), gt, n)
        if cls_labels is not None and img_id in cls_labels:
            classes = [int(k) + 1 for k in np.nonzero(np.asarray(cls_labels[img_id]) > 1e-5)[0]]
        else:  # no image labels: take the classes of the gt (what the image labels are made from)
            classes = [int(c) for c in np.unique(gt) if 0 < c < n]
        for a in areas:
            box_hists[a] += confusion_matrix(centre_box_prediction(gt.shape, classes, a), gt, n)
    out = {"all_background": float(iou_from_confusion(hists["all_background"]).mean() * 100),
           "all_background_present": present_miou(hists["all_background"])}
    if areas:
        best = max(areas, key=lambda a: iou_from_confusion(box_hists[a]).mean())
        out["centre_box"] = float(iou_from_confusion(box_hists[best]).mean() * 100)
        out["centre_box_area"] = float(best)
        best_p = max(areas, key=lambda a: present_miou(box_hists[a]))
        out["centre_box_present"] = present_miou(box_hists[best_p])
        out["centre_box_present_area"] = float(best_p)
    return out


def present_miou(hist: np.ndarray | Sequence) -> float:
    """Percent mIoU over the classes present in the ground truth of the ``(n, n)`` confusion matrix
    (rows gt): BECO's test.py figure (``scores()``, no epsilon), used as the pipeline's headline so that
    a toy set with a few of the classes is not averaged with classes it never has."""
    return float(present_class_scores(np.asarray(hist, np.int64), eps=0.0)["miou"] * 100)


# ----------------------------------------------------------------------------------------------
# the stage table


@dataclass
class StageRow:
    """One line of the final table. ``miou`` / ``baseline`` in percent; None = not (yet) available."""

    stage: str
    metric: str = ""
    split: str = ""
    miou: float | None = None
    baseline: float | None = None
    seconds: float | None = None
    note: str = ""
    cpu_seconds: float | None = None  # CPU time of the stage's processes (its cost on a quiet machine)
    miou_all: float | None = None  # the mean over all classes (``miou``: over the classes present)


def _fmt_pct(v: float | None) -> str:
    return "—" if v is None else f"{v:.2f}%"


def _fmt_time(s: float | None) -> str:
    if s is None:
        return "—"
    if s < 60:
        return f"{s:.1f} s"
    return f"{int(s // 60)} min {s % 60:04.1f} s"


def total_seconds(rows: Iterable[StageRow], attr: str = "seconds") -> float | None:
    vals = [getattr(r, attr) for r in rows if getattr(r, attr) is not None]
    return float(sum(vals)) if vals else None


def format_table(rows: Sequence[StageRow], title: str = "") -> str:
    """Fixed-width text table (what run_pipeline prints at the end)."""
    head = ("stage", "metric", "split", "mIoU", "all-class", "baseline", "wall time", "CPU time")
    body = [(r.stage, r.metric + (f" ({r.note})" if r.note else ""), r.split, _fmt_pct(r.miou), _fmt_pct(r.miou_all),
             _fmt_pct(r.baseline), _fmt_time(r.seconds), _fmt_time(r.cpu_seconds)) for r in rows]
    body.append(("total", "", "", "", "", "", _fmt_time(total_seconds(rows)),
                 _fmt_time(total_seconds(rows, "cpu_seconds"))))
    widths = [max(len(str(x[i])) for x in [head] + body) for i in range(len(head))]
    line = "  ".join("-" * w for w in widths)

    def fmt(cells: Sequence[str]) -> str:
        return "  ".join(str(c).ljust(w) if i < 3 else str(c).rjust(w)
                         for i, (c, w) in enumerate(zip(cells, widths))).rstrip()

    out = ([title] if title else []) + [fmt(head), line] + [fmt(b) for b in body[:-1]] + [line, fmt(body[-1])]
    return "\n".join(out) + "\n"


def markdown_table(rows: Sequence[StageRow]) -> str:
    out = ["| stage | metric | split | mIoU (classes present) | mIoU (all classes) | trivial baseline | wall time "
           "| CPU time |", "|---|---|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        metric = r.metric + (f" ({r.note})" if r.note else "")
        out.append(f"| {r.stage} | {metric} | {r.split} | {_fmt_pct(r.miou)} | {_fmt_pct(r.miou_all)} | "
                   f"{_fmt_pct(r.baseline)} | "
                   f"{_fmt_time(r.seconds)} | {_fmt_time(r.cpu_seconds)} |")
    out.append(f"| **total** | | | | | | {_fmt_time(total_seconds(rows))} | "
               f"{_fmt_time(total_seconds(rows, 'cpu_seconds'))} |")
    return "\n".join(out) + "\n"


# ----------------------------------------------------------------------------------------------
# plots (matplotlib, imported lazily; the report is still written without it)


def _pyplot():
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    return plt


def _save_fig(fig, path: Path) -> None:
    with atomic_path(path) as tmp:  # hidden .tmp name; the format is named explicitly
        fig.savefig(tmp, dpi=100, bbox_inches="tight", format="png")


def plot_stage_bars(rows: Sequence[StageRow], path: os.PathLike | str) -> bool:
    """Bar per stage (mIoU) with its trivial baseline as a marker, and wall time in the labels."""
    plt = _pyplot()
    scored = [r for r in rows if r.miou is not None]
    if plt is None or not scored:
        return False
    fig, ax = plt.subplots(figsize=(1.6 + 1.6 * len(scored), 3.6))
    x = np.arange(len(scored))
    ax.bar(x, [r.miou for r in scored], color="#4c72b0", width=0.6, label="mIoU")
    for i, r in enumerate(scored):
        ax.text(i, r.miou + 1, f"{r.miou:.1f}", ha="center", va="bottom", fontsize=9)
        if r.baseline is not None:
            ax.plot([i - 0.3, i + 0.3], [r.baseline] * 2, color="#c44e52", lw=2,
                    label="trivial baseline" if i == 0 else None)
    ax.set_xticks(x, [f"{r.stage}\n{r.split}, {_fmt_time(r.seconds)}" for r in scored], fontsize=8)
    ax.set_ylabel("mIoU (%)")
    ax.set_ylim(0, max(100.0, max(r.miou for r in scored) + 8))
    ax.legend(loc="upper left", fontsize=8)
    ax.set_title("mIoU per stage")
    _save_fig(fig, Path(path))
    plt.close(fig)
    return True


def plot_threshold_curve(cam_eval: Mapping | None, path: os.PathLike | str) -> bool:
    """CAM-seed mIoU vs background threshold (evaluation.py --task cam metrics record)."""
    plt = _pyplot()
    if plt is None or not cam_eval or not cam_eval.get("thresholds") or not cam_eval.get("miou_by_threshold"):
        return False
    th, miou = cam_eval["thresholds"], cam_eval["miou_by_threshold"]
    fig, ax = plt.subplots(figsize=(5, 3.4))
    ax.plot(th, miou, marker="o", ms=3)
    if cam_eval.get("best_th") is not None:
        ax.axvline(cam_eval["best_th"], color="#c44e52", ls="--", lw=1)
        ax.annotate(f"best {cam_eval['miou']:.2f}% at {cam_eval['best_th']:.2f}",
                    (cam_eval["best_th"], cam_eval["miou"]), textcoords="offset points",
                    xytext=(5, -12), fontsize=8)
    ax.set_xlabel("background threshold")
    ax.set_ylabel("mIoU (%)")
    ax.set_title("CAM seeds: mIoU vs threshold")
    ax.grid(alpha=0.3)
    _save_fig(fig, Path(path))
    plt.close(fig)
    return True


def plot_per_class(series: Mapping[str, Sequence[float]], path: os.PathLike | str,
                   names: Sequence[str] = VOC12.names_bg) -> bool:
    """Grouped bars: per-class IoU (percent) of each named series (one value per class of ``names``,
    background first)."""
    plt = _pyplot()
    series = {k: v for k, v in series.items() if v is not None and len(v) == len(names)}
    if plt is None or not series:
        return False
    fig, ax = plt.subplots(figsize=(12, 3.8))
    n = len(series)
    width = 0.8 / n
    x = np.arange(len(names))
    for i, (name, vals) in enumerate(series.items()):
        ax.bar(x - 0.4 + width * (i + 0.5), vals, width=width, label=name)
    ax.set_xticks(x, names, rotation=60, ha="right", fontsize=8 if len(names) <= 32 else 5)
    ax.set_ylabel("IoU (%)")
    ax.set_ylim(0, 100)
    ax.legend(fontsize=8, ncol=n)
    ax.set_title("per-class IoU")
    _save_fig(fig, Path(path))
    plt.close(fig)
    return True


def colorize(label: np.ndarray, dataset: DatasetInfo | str = VOC12) -> np.ndarray:
    """Label map (H,W) -> RGB with the dataset's palette (VOC's; 255 = the light void colour)."""
    return get_dataset(dataset).palette()[np.asarray(label, dtype=np.uint8)]


def blend(img: np.ndarray, label: np.ndarray, alpha: float = 0.65, dataset: DatasetInfo | str = VOC12) -> np.ndarray:
    """Palette colours over the image; background (0) pixels keep the image."""
    col = colorize(label, dataset).astype(np.float32)
    out = img.astype(np.float32).copy()
    fg = (label > 0)
    out[fg] = (1 - alpha) * out[fg] + alpha * col[fg]
    return out.clip(0, 255).astype(np.uint8)


def cam_seed_label(cam_dict_path: os.PathLike | str, shape: tuple[int, int], threshold: float,
                   num_fg: int = VOC12.num_fg) -> np.ndarray:
    """The CAM seed at ``threshold`` (evaluation.py's rule: a class wins where its CAM exceeds the
    threshold and every other class)."""
    from tools.seed_eval import cam_winner, load_dict

    m, f = cam_winner(load_dict(cam_dict_path), shape, cam_dict_path, num_fg=num_fg)
    return np.where(m > np.float32(threshold), f, 0).astype(np.uint8)


@dataclass
class GridColumn:
    """One column of the example grid. ``kind``: 'image'; 'gt'; 'heat' (the CAM dictionary's strongest
    class score as a heat map); 'cam' (the seed: that dictionary at the threshold); 'label' (a label PNG
    over the image); 'mask' (a confidence mask); 'label_mask' (a label PNG over the image with the pixels
    outside ``mask_folder``'s confidence mask darkened); 'logits' / 'logits_crf' (BECO's saved logits,
    argmax, without / with the dense CRF)."""

    title: str
    kind: str
    folder: Path | None = None
    suffix: str = ".png"
    mask_folder: Path | None = None


def heat(img: np.ndarray, score: np.ndarray) -> np.ndarray:
    """(H,W) score in [0,1] as a blue-to-red heat map over a dimmed (H,W,3) uint8 image."""
    s = np.clip(np.asarray(score, np.float32), 0, 1)[..., None]
    col = np.concatenate([s, 1 - np.abs(2 * s - 1), 1 - s], axis=-1) * 255  # blue -> green -> red
    return (img.astype(np.float32) * 0.35 + col * 0.65).astype(np.uint8)


def _confident(mask_png: Path) -> np.ndarray:
    """(H, W) bool: the confident pixels of a gen_mask PNG (255 confident, 0 not)."""
    return np.asarray(read_rgb(mask_png))[..., 0] > 127


def _cell(col: GridColumn, img_id: str, img: np.ndarray, cam_threshold: float | None,
          ds: DatasetInfo = VOC12) -> np.ndarray | None:
    try:
        if col.kind == "image":
            return img
        if col.folder is None:
            return None
        # ground truth follows the dataset's layout (COCO: a split subfolder); stage outputs are flat
        p = ds.gt_path(col.folder, img_id) if col.kind == "gt" else Path(col.folder) / f"{img_id}{col.suffix}"
        if not p.is_file():
            return None
        if col.kind == "heat":
            from tools.seed_eval import cam_winner, load_dict

            m, _ = cam_winner(load_dict(p), img.shape[:2], p, num_fg=ds.num_fg)
            return heat(img, m)
        if col.kind == "cam":
            return blend(img, cam_seed_label(p, img.shape[:2], cam_threshold if cam_threshold is not None else 0.15,
                                             ds.num_fg), dataset=ds)
        if col.kind in ("logits", "logits_crf"):
            from segmentation.beco.postprocess import load_logits, predict_one

            return blend(img, predict_one(load_logits(p, ds.num_classes), img, crf=col.kind == "logits_crf"),
                         dataset=ds)
        if col.kind == "mask":
            m = _confident(p)
            return np.where(m[..., None], img, (img * 0.25).astype(np.uint8))
        lab = read_gt_png(p, ds.num_classes) if col.kind == "gt" else read_label_png(p)
        if lab.shape != img.shape[:2]:
            return None
        if col.kind == "label_mask" and col.mask_folder is not None:
            m = _confident(Path(col.mask_folder) / f"{img_id}.png")
            out = blend(img, lab, dataset=ds)
            return np.where(m[..., None], out, (out * 0.3).astype(np.uint8))
        return colorize(lab, ds) if col.kind == "gt" else blend(img, lab, dataset=ds)
    except Exception:  # a broken file must not stop the report; the cell stays empty
        return None


def plot_examples(rows: Sequence[tuple[str, str]], image_dir: os.PathLike | str,
                  columns: Sequence[GridColumn], path: os.PathLike | str,
                  cam_threshold: float | None = None, dataset: DatasetInfo | str = VOC12) -> bool:
    """A grid: one row per ``(split, id)``, one column per :class:`GridColumn` ("—" where a stage did
    not produce that image, e.g. no BECO prediction for a training image). ``image_dir``: the
    dataset's image folder (VOC ``<root>/JPEGImages``)."""
    ds = get_dataset(dataset)
    plt = _pyplot()
    if plt is None or not rows:
        return False
    fig, axes = plt.subplots(len(rows), len(columns), figsize=(2.1 * len(columns), 2.0 * len(rows)), squeeze=False)
    for i, (split, img_id) in enumerate(rows):
        try:
            img = read_rgb(Path(image_dir) / ds.subfolder(img_id) / f"{img_id}{ds.image_ext}")
        except Exception:
            img = None
        for j, col in enumerate(columns):
            ax = axes[i][j]
            ax.set_xticks([])
            ax.set_yticks([])
            cell = None if img is None else _cell(col, img_id, img, cam_threshold, ds)
            if cell is None:
                ax.text(0.5, 0.5, "—", ha="center", va="center", fontsize=14, color="#888888")
            else:
                ax.imshow(cell)
            if i == 0:
                ax.set_title(col.title, fontsize=9)
            if j == 0:
                ax.set_ylabel(f"{split}\n{img_id}", fontsize=8)
    fig.tight_layout()
    _save_fig(fig, Path(path))
    plt.close(fig)
    return True


# ----------------------------------------------------------------------------------------------
# report.md


@dataclass
class ReportInputs:
    """Where a run's outputs are. Paths may be missing (partial runs): their parts are left out."""

    name: str
    exp_dir: Path
    data_root: Path
    rows: list[StageRow]
    cam_eval_json: Path | None = None
    per_class_jsons: dict[str, Path] = field(default_factory=dict)  # series name -> evaluation.py json
    example_ids: list[tuple[str, str]] = field(default_factory=list)  # (split, id)
    columns: list[GridColumn] = field(default_factory=list)
    commands: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    preset: str = ""
    dataset: str = VOC12.name


def write_report(inp: ReportInputs) -> Path:
    """Write ``<exp_dir>/report.md`` and its PNGs under ``<exp_dir>/report/``; returns the .md path."""
    exp = Path(inp.exp_dir)
    fig_dir = exp / "report"
    fig_dir.mkdir(parents=True, exist_ok=True)
    ds = get_dataset(inp.dataset)
    md = [f"# Pipeline report: `{inp.name}`" + (f" (preset `{inp.preset}`)" if inp.preset else ""), ""]
    md += ["## Stages", "", markdown_table(inp.rows)]
    md += ["mIoU: the mean over the classes present in the ground truth (BECO test.py's definition), for every "
           "stage from its confusion matrix; the mean over all "
           f"{ds.num_classes} classes (evaluation.py's definition) is in the next column. Trivial baseline: the better of "
           "all-background and the image labels painted into a centred box (its area tuned on the ground truth), "
           "under the same mean and on the same split.", ""]
    if plot_stage_bars(inp.rows, fig_dir / "stages.png"):
        md += ["![mIoU per stage](report/stages.png)", ""]
    cam = read_metrics(inp.cam_eval_json) if inp.cam_eval_json else None
    if plot_threshold_curve(cam, fig_dir / "threshold_curve.png"):
        md += ["## CAM seeds: threshold sweep", "", "![threshold curve](report/threshold_curve.png)", ""]
    series = {k: record_iou(read_metrics(p), ds.num_classes) for k, p in inp.per_class_jsons.items()}
    if plot_per_class(series, fig_dir / "per_class_iou.png", ds.names_bg):
        md += ["## Per-class IoU", "", "![per-class IoU](report/per_class_iou.png)", ""]
        present = {k: v for k, v in series.items() if v}
        md += ["| class | " + " | ".join(present) + " |", "|---|" + "---:|" * len(present)]
        for c, cname in enumerate(ds.names_bg):
            md.append(f"| {cname} | " + " | ".join(f"{v[c]:.1f}" for v in present.values()) + " |")
        md.append("")
    th = cam.get("best_th") if cam else None
    if inp.example_ids and plot_examples(inp.example_ids, Path(inp.data_root) / ds.image_folder, inp.columns,
                                         fig_dir / "examples.png", th, ds):
        md += ["## Examples", "", "Columns: " + ", ".join(c.title for c in inp.columns) +
               (f" (CAM seeds at the best threshold {th:.2f})" if th is not None else "") + ".", "",
               "![examples](report/examples.png)", ""]
    if inp.commands:
        md += ["## Commands (the whole chain, as typed; run_pipeline.py skips finished steps)", "", "```"] + inp.commands + ["```", ""]
    if inp.notes:
        md += ["## Notes", ""] + [f"- {n}" for n in inp.notes] + [""]
    out = exp / "report.md"
    atomic_write_text(out, "\n".join(md))
    return out


def rows_to_json(rows: Sequence[StageRow]) -> list[dict]:
    return [asdict(r) for r in rows]


def rows_from_json(items: Sequence[Mapping]) -> list[StageRow]:
    return [StageRow(**{k: v for k, v in it.items() if k in StageRow.__dataclass_fields__}) for it in items]
