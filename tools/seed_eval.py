"""Scoring of stage-one seeds: the reference background-threshold sweep over CAM dictionaries and the
single-pass scoring of CRF/DeepLab dictionaries and label PNGs (used by evaluation.py and training's
in-loop validation; docs/internals.md, "Experiment layout, metrics and evaluation").

Everything here is numpy-only (no torch import), so evaluation worker processes start quickly.

The sweep is done in **one pass per image**: for the reference prediction at threshold t,
``argmax([t, cam_0 .. cam_19])`` (float32, first index wins, so ``cam == t`` is background), every
pixel has a fixed foreground winner ``f`` (argmax over the C class channels, ties to the lower class)
with score ``m``; it is predicted ``f`` for every threshold ``t < m`` and background otherwise. So one
``np.bincount`` over ``(k, gt, f)`` with ``k = #{t : t < m}`` holds the confusion matrices of all
thresholds; they are recovered by cumulative sums (:func:`sweep_confusions`). The counts add up over
images, so workers return a single small array each.

:func:`sweep_counts_plain` is that definition in a few lines (``np.searchsorted`` + ``np.bincount``);
:func:`sweep_counts`, used by default, gives the same counts about 5x faster per image (a bucket table on
the float32 bits, uint16 indices, reused buffers), with worker processes that keep their freed heap
(:mod:`tools.malloc`). The tests hold the two equal; ``bench/eval_speed.py`` times them.

Per-threshold confusion matrices follow :func:`tools.metrics.confusion_matrix` (rows gt, columns
prediction, 255 ignored); IoU/mIoU come from :func:`tools.metrics.iou_from_confusion` (reference
formula ``TP / (T + P - TP + 1e-10)``, mIoU = mean over all C + 1 classes; C from the dataset
descriptor, 20 for VOC).
"""
from __future__ import annotations

import functools
import logging
import multiprocessing as mp
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Sequence

import numpy as np

from tools.errors import DataError, require_file
from tools.dataset import DatasetInfo, get_dataset
from tools.imutils import read_gt_png, read_label_png
from tools.malloc import retain_freed_memory
from tools.metrics import confusion_matrix, iou_from_confusion, metrics_record, scores
from voc12.dataset import VOC12

IGNORE_INDEX = 255
#: The reference sweep: t = i/100 for i = 10 .. 29.
REFERENCE_THRESHOLDS: tuple[float, ...] = tuple(i / 100 for i in range(10, 30))
TASKS = ("cam", "crf", "dl", "png")


def threshold_range(start: float, stop: float, step: float) -> tuple[float, ...]:
    """Thresholds ``start, start + step, ...`` below ``stop`` (each rounded to 6 decimals, so
    ``threshold_range(0.10, 0.30, 0.01)`` equals :data:`REFERENCE_THRESHOLDS`). Raises ``ValueError``
    unless ``0 < start < stop <= 1`` and ``step > 0``: the CAMs are normalised to [0, 1]."""
    if not (0.0 < start < stop <= 1.0) or step <= 0:
        raise ValueError(f"threshold range start {start}, stop {stop}, step {step}: "
                         "expected 0 < start < stop <= 1 and step > 0")
    n = int(np.ceil(round((stop - start) / step, 6)))
    return tuple(round(start + i * step, 6) for i in range(n))


def sweep_edge(thresholds: Sequence[float], best_th: float | None) -> str | None:
    """``"top"`` / ``"bottom"`` when ``best_th`` is the last / first of the swept ``thresholds`` (the best
    may then lie outside the range: ``evaluation.py --thresholds`` sweeps further), else ``None`` (also
    for single-pass tasks and one-threshold sweeps)."""
    if best_th is None or len(thresholds) < 2:
        return None
    if best_th == thresholds[-1]:
        return "top"
    return "bottom" if best_th == thresholds[0] else None


# ----------------------------------------------------------------------------------------------
# Reading predictions
# ----------------------------------------------------------------------------------------------

def load_dict(path: os.PathLike | str) -> dict[int, np.ndarray]:
    """Read a reference CAM/CRF dictionary (``np.save`` of a dict, a pickled 0-d object array).

    Returns ``{int key: float32 (H, W)}``. The pickle is read with the restricted unpickler of
    :mod:`tools.safe_load` (no code in the file runs). Errors name the file and say what was
    expected: a refused object, a non-integer key, a value that is not a 2-D numeric array, NaN/inf.
    """
    from tools.safe_load import load_npy, require_finite

    hint = "Run infer.py --dict (CAM dictionaries) or infer.py --crf first, or check --name/--dict_dir."
    what = "prediction dictionary"
    obj = load_npy(path, what, hint, holds="a dict {class index: HxW float array}")
    if not isinstance(obj, dict):
        raise DataError(f"'{path}' holds {type(obj).__name__}, expected a dict {{class index: HxW array}} "
                        "saved with np.save (the infer.py --dict format).")
    for k, v in obj.items():
        if isinstance(k, (bool, np.bool_)) or not isinstance(k, (int, np.integer)):
            raise DataError(f"{what} '{path}' has key {k!r} ({type(k).__name__}); keys must be integer class "
                            f"indices. {hint}")
        if not isinstance(v, np.ndarray) or v.ndim != 2 or v.dtype.kind not in "fiub":
            desc = f"a {v.ndim}-D {v.dtype} array" if isinstance(v, np.ndarray) else f"a {type(v).__name__}"
            raise DataError(f"{what} '{path}' entry {k!r} is {desc}; expected a 2-D (H, W) float array. {hint}")
        require_finite(v, path, what, f"entry {k}", hint)
    return obj


def _check_size(name: str, arr: np.ndarray, gt: np.ndarray, path: object) -> None:
    if arr.shape != gt.shape:
        raise DataError(f"prediction '{path}' entry {name} has size {arr.shape}, ground truth has {gt.shape}; "
                        "dictionaries must already have the ground-truth size (the reference does not resize).")


def cam_winner(cam_dict: dict[int, np.ndarray], gt_shape: tuple[int, int], path: object = "",
               need_zero_channels: bool = False, num_fg: int = VOC12.num_fg) -> tuple[np.ndarray, np.ndarray | int]:
    """Foreground winner of a CAM dict: ``(m, f)`` with ``m`` the max over the ``num_fg`` class channels
    (absent keys are zero channels) as float32 ``(H, W)`` and ``f`` the 1-based label of the first
    channel reaching it (ties to the lower class index, as ``argmax`` on the reference's C+1-channel
    tensor): a uint8 ``(H, W)`` array, or a plain int when one class wins everywhere.

    With only positive thresholds the zero channels of absent classes can never win (a pixel whose
    best score is <= 0 is background anyway), so only the present keys are scanned unless
    ``need_zero_channels``. A running max with a strict ``>`` keeps the first index on ties, which
    is argmax's rule, without stacking the maps.
    """
    h, w = gt_shape
    keys = sorted(int(k) for k in cam_dict)
    maps = []
    for k in keys:
        if not 0 <= k < num_fg:
            raise DataError(f"prediction '{path}' has key {k}; CAM dictionary keys are class indices "
                            f"0..{num_fg - 1}.")
        v = np.asarray(cam_dict[k])
        if v.shape != tuple(gt_shape):
            _check_size(f"key {k}", v, np.empty(gt_shape), path)
        maps.append((k, v.astype(np.float32, copy=False)))
    if need_zero_channels and len(keys) < num_fg:
        present = dict(maps)
        zero = np.zeros((h, w), np.float32)
        maps = [(k, present.get(k, zero)) for k in range(num_fg)]
    if not maps:
        return np.zeros((h, w), np.float32), 1
    k0, m = maps[0]
    if len(maps) == 1:
        return m, k0 + 1
    k1, v1 = maps[1]
    upd = v1 > m
    f = upd.view(np.uint8) * np.uint8(k1 - k0)
    f += np.uint8(k0 + 1)
    m = np.maximum(m, v1)
    for k, v in maps[2:]:
        upd = v > m
        np.copyto(f, np.uint8(k + 1), where=upd)
        np.maximum(m, v, out=m)
    return m, f


def label_from_dict(pred_dict: dict[int, np.ndarray], gt_shape: tuple[int, int], path: object = "",
                    num_classes: int = VOC12.num_classes) -> np.ndarray:
    """Tasks crf/dl: the dict's keys already include background (0); argmax over ``num_classes``
    channels where absent keys are zero channels (first index wins). Returns ``(H, W)`` int64."""
    stack = np.zeros((num_classes,) + tuple(gt_shape), np.float32)
    for k, v in pred_dict.items():
        k = int(k)
        if not 0 <= k < num_classes:
            raise DataError(f"prediction '{path}' has key {k}; CRF/DL dictionary keys are 0 (background).."
                            f"{num_classes - 1}.")
        v = np.asarray(v)
        _check_size(f"key {k}", v, np.empty(gt_shape), path)
        stack[k] = v
    return stack.argmax(0)


# ----------------------------------------------------------------------------------------------
# One-pass threshold sweep
# ----------------------------------------------------------------------------------------------

def thresholds_f32(thresholds: Sequence[float]) -> np.ndarray:
    """The thresholds as the reference compares them: stored in a float32 tensor."""
    th = np.asarray(thresholds, dtype=np.float32)
    if th.ndim != 1 or th.size == 0 or np.any(np.diff(th) <= 0):
        raise ValueError(f"thresholds must be a non-empty increasing sequence, got {list(thresholds)}")
    return th


def _k_stride(n: int) -> int:
    """Index stride of one threshold step: n + 1 gt rows (row 0 = dropped) x n labels (n = C + 1)."""
    return (n + 1) * n


@functools.lru_cache(maxsize=8)
def _gt_rows(n: int) -> np.ndarray:
    """gt -> row offset for maps holding values n..254 (row 0 = dropped; gt 0..n-1 -> rows 1..n), times n."""
    rows = np.zeros(256, np.int64)
    rows[:n] = np.arange(1, n + 1) * n
    return rows

_LUT_SIZE = 65536
_CHUNK = 1 << 18  # pixels per pass (a VOC image is one chunk; bounds the scratch memory for large images)


@functools.lru_cache(maxsize=16)
def _k_lut(th_bytes: bytes, n: int = VOC12.num_classes) -> tuple[np.int32, np.int32, np.ndarray] | None:
    """Bucket table for ``k = #{thresholds < m}`` on float32 bit patterns.

    For positive floats the int32 view is monotonic in the value. A pixel's bucket is
    ``(bits >> shift) - base``, clipped to ``[0, 65535]`` by ``np.take(mode='clip')`` (negative floats,
    zeros and tiny values land in bucket 0; large values, infinities and NaN in the last bucket). The
    uint16 table holds ``k * stride`` (stride = (n + 1) n, 462 for VOC) where every float of the bucket
    (and, for the end buckets, every clipped float) has the same k, and the spare slot ``(T + 1) * stride`` where a threshold lies inside the
    bucket. Pixels landing in the spare slot are re-decided exactly with a binary search on their true
    value, so the result is exact whatever the bucket layout. Returns ``(shift, base, table)``, or None
    (use the binary search everywhere) when a threshold is not a positive finite float or the joint
    index would not fit in uint16 (VOC: more than 139 thresholds; COCO's 81 classes: more than 7).
    """
    th = np.frombuffer(th_bytes, np.float32)
    if not (np.all(np.isfinite(th)) and th[0] > 0):
        return None
    stride = _k_stride(n)
    if (th.size + 2) * stride > 65535:  # the joint index would not fit in uint16
        return None
    bits = th.view(np.int32).astype(np.int64)
    span = int(bits[-1] - bits[0]) + 4
    # shift >= 1 keeps ``(bits >> shift) - base`` inside int32 for negative floats too
    shift = max(1, int(np.ceil(np.log2(span / (_LUT_SIZE - 8)))))
    base = (int(bits[0]) >> shift) - 2
    start = (base + np.arange(_LUT_SIZE, dtype=np.int64)) << shift
    if start[-1] + (1 << shift) > 2**31:  # thresholds near the top of the float32 range: no room
        return None
    ends = [start.astype(np.int32).view(np.float32), (start + (1 << shift) - 1).astype(np.int32).view(np.float32)]
    k_a, k_b = (np.searchsorted(th, e, side="left") for e in ends)
    k = np.where(k_a == k_b, k_a, th.size + 1)
    # end buckets also receive clipped values: negatives, zeros, tiny values (k = 0) and large values,
    # infinities, NaN (k = T, as the binary search ranks NaN last)
    k[0] = 0 if k_b[0] == 0 else th.size + 1
    k[-1] = th.size if k_a[-1] == th.size else th.size + 1
    return np.int32(shift), np.int32(base), (k * stride).astype(np.uint16)  # 128 KB: stays in cache


def threshold_index(m: np.ndarray, th32: np.ndarray) -> np.ndarray:
    """``k = #{i : th32[i] < m}`` per pixel (int64), with the reference's float32 comparison."""
    return np.searchsorted(th32, np.asarray(m, np.float32), side="left")


_BUFFERS: dict[tuple[str, object], np.ndarray] = {}


def _buffer(name: str, n: int, dtype: type = np.intp) -> np.ndarray:
    """A per-process scratch array (reused across chunks and images; not thread-safe)."""
    a = _BUFFERS.get((name, dtype))
    if a is None or a.size < n:
        a = _BUFFERS[(name, dtype)] = np.empty(max(n, _CHUNK), dtype)
    return a[:n]


def _add_gt_rows(idx: np.ndarray, gt: np.ndarray, n: int = VOC12.num_classes) -> None:
    """``idx += row(gt) * n`` in place: gt 0..n-1 -> rows 1..n, anything else (255) -> row 0.

    Ground-truth maps hold only 0..n-1 and 255, so ``gt + 1`` (uint8, 255 wraps to 0) is the row: two
    SIMD passes instead of a table gather. Maps with other values take the gather.
    """
    rows = _buffer("rows", gt.size, idx.dtype)
    g = _buffer("g", gt.size, np.uint8)
    np.add(gt, np.uint8(1), out=g)
    if int(g.max(initial=0)) > n:
        np.take(_gt_rows(n).astype(idx.dtype, copy=False), gt, out=rows)
    else:
        np.multiply(g, idx.dtype.type(n), out=rows, casting="unsafe")
    idx += rows


def sweep_counts_plain(m: np.ndarray, f: np.ndarray | int, gt: np.ndarray, th32: np.ndarray,
                       num_classes: int = VOC12.num_classes) -> np.ndarray:
    """Joint counts ``(T+1, n, n)`` int64 of ``(k, gt, f)``, ``k = #{thresholds < m}``: the definition.

    m: ``(H, W)`` float32 best foreground score; f: ``(H, W)`` 1-based foreground label (or an int);
    gt: ``(H, W)`` uint8 (only 0..n-1 is counted; 255 and other values are dropped; n = num_classes). The comparison is
    float32 against float32, strict: a score equal to a threshold is background at that threshold, as
    the reference's argmax (first index wins) decides. NaN ranks above every threshold (k = T).
    """
    n, t = num_classes, th32.size
    k = np.searchsorted(th32, np.asarray(m, np.float32).reshape(-1), side="left")
    g = np.minimum(np.asarray(gt, np.uint8).reshape(-1), np.uint8(n))  # 255 (and n..254): spare row n
    lab = np.broadcast_to(np.asarray(f), np.shape(m)).reshape(-1)
    idx = (k * (n + 1) + g) * n + lab
    return np.bincount(idx, minlength=(t + 1) * (n + 1) * n).reshape(t + 1, n + 1, n)[:, :n]


def sweep_counts(m: np.ndarray, f: np.ndarray | int, gt: np.ndarray, th32: np.ndarray,
                 num_classes: int = VOC12.num_classes) -> np.ndarray:
    """Joint counts ``(T+1, n, n)`` int64 of ``(k, gt, f)`` where ``k = #{thresholds < m}``.

    m: ``(H, W)`` float32 best foreground score; f: ``(H, W)`` 1-based foreground label (or an int);
    gt: ``(H, W)`` uint8 with 255 = ignore (only gt 0..n-1 is counted; n = num_classes, background
    included). Feed to :func:`sweep_confusions`.

    Speed: k comes from a 64k-entry bucket table on the float32 bits (:func:`_k_lut`; exact, with a
    binary search for the rare pixels whose bucket holds a threshold). The joint uint16 index
    ``k * stride + row(gt) * n + f`` (VOC: ``k * 462 + row(gt) * 21 + f``) is assembled in reused
    scratch buffers and one ``np.bincount`` counts it: a handful of passes per image instead of the
    reference's 20 argmaxes and 1,260 masked sums. Not thread-safe (per-process scratch buffers); use processes for parallelism.
    """
    n, t = num_classes, th32.size
    stride = _k_stride(n)
    mf = np.ascontiguousarray(m, np.float32).reshape(-1)
    gt = np.ascontiguousarray(gt, np.uint8).reshape(-1)
    fa = None if isinstance(f, (int, np.integer)) else np.ascontiguousarray(f).reshape(-1)
    spec = _k_lut(th32.tobytes(), n)
    # uint16 joint index (a quarter of the memory traffic of intp) whenever the table applies
    dt = np.uint16 if spec is not None else np.intp
    slots = t + 2
    total = np.zeros(slots * stride, np.int64)
    amb_fixed = []
    for s in range(0, mf.size, _CHUNK):
        e = min(mf.size, s + _CHUNK)
        idx = _buffer("idx", e - s, dt)
        if spec is not None:
            shift, base, lut = spec
            b = _buffer("bucket", e - s, np.int32)
            np.right_shift(mf[s:e].view(np.int32), shift, out=b)  # shift first: no int32 overflow
            b -= base
            np.take(lut, b, mode="clip", out=idx)
        else:
            np.multiply(threshold_index(mf[s:e], th32), stride, out=idx)
        _add_gt_rows(idx, gt[s:e], n)
        if fa is not None:
            np.add(idx, fa[s:e], out=idx, casting="unsafe")
        else:
            idx += dt(int(f))
        c = np.bincount(idx, minlength=slots * stride)
        if spec is not None and c[(t + 1) * stride:].any():  # pixels whose bucket holds a threshold:
            amb = np.flatnonzero(idx >= (t + 1) * stride)  # decide them exactly
            fixed = idx[amb].astype(np.int64) - (t + 1) * stride
            fixed += threshold_index(mf[s:e][amb], th32) * stride
            amb_fixed.append(fixed)
        total += c
    total = total.reshape(slots, n + 1, n)[: t + 1]
    for fixed in amb_fixed:
        total += np.bincount(fixed, minlength=(t + 1) * stride).reshape(t + 1, n + 1, n)
    return total[:, 1:, :]


def sweep_confusions(counts: np.ndarray) -> np.ndarray:
    """Per-threshold confusion matrices ``(T, n, n)`` from :func:`sweep_counts` output.

    At threshold i a pixel with ``k > i`` keeps its foreground label; one with ``k <= i`` becomes
    background (column 0) — identical to ``confusion_matrix(argmax([t_i, cams]), gt)``.
    """
    counts = np.asarray(counts, np.int64)
    t = counts.shape[0] - 1
    # fg[i] = sum_{k > i} counts[k]; bg[i] = sum_{k <= i} counts[k] summed over predicted labels
    rev = np.cumsum(counts[::-1], axis=0)[::-1]  # rev[j] = sum_{k >= j}
    fg = rev[1:]  # (T, n, n): k > i
    cum = np.cumsum(counts, axis=0)[:t]  # k <= i
    hists = fg.copy()
    hists[:, :, 0] += cum.sum(axis=2)
    return hists


def cam_counts_for_image(cam_dict: dict[int, np.ndarray], gt: np.ndarray, th32: np.ndarray,
                         path: object = "", plain: bool = False, num_classes: int = VOC12.num_classes) -> np.ndarray:
    """Sweep counts of one image (:func:`sweep_counts`, or :func:`sweep_counts_plain` with ``plain``)."""
    m, f = cam_winner(cam_dict, gt.shape, path, need_zero_channels=bool(th32[0] <= 0), num_fg=num_classes - 1)
    return (sweep_counts_plain if plain else sweep_counts)(m, f, gt, th32, num_classes)


# ----------------------------------------------------------------------------------------------
# Results
# ----------------------------------------------------------------------------------------------

def reference_iou_miou(hist: np.ndarray) -> tuple[np.ndarray, float]:
    """Reference figures from one confusion matrix: per-class IoU (fraction) and mIoU in percent
    (``np.mean`` of the C+1 IoUs, times 100, as ``do_python_eval``)."""
    iou = iou_from_confusion(hist)
    return iou, float(np.mean(iou) * 100)


@dataclass
class SweepResult:
    """Outcome of scoring a list. ``thresholds`` empty for single-pass tasks (crf/dl/png)."""

    task: str
    ids: list[str]
    thresholds: list[float]
    hists: np.ndarray  # (T, n, n) int64 (T = 1 for single-pass tasks; n = C + 1)
    miou: list[float] = field(default_factory=list)  # percent, per threshold
    iou: np.ndarray | None = None  # (T, n) percent
    best_index: int = 0
    categories: tuple[str, ...] = VOC12.names_bg  # names of the n classes, background first

    def __post_init__(self) -> None:
        ious, mious = [], []
        for h in self.hists:
            iou, miou = reference_iou_miou(h)
            ious.append(iou * 100)
            mious.append(miou)
        self.iou = np.asarray(ious)
        self.miou = mious
        # eval_in_script: strict '>' starting from 0, so the first best threshold wins
        best, best_i = 0.0, 0
        for i, v in enumerate(mious):
            if v > best:
                best, best_i = v, i
        self.best_index = best_i

    @property
    def best_miou(self) -> float:
        return self.miou[self.best_index]

    @property
    def best_th(self) -> float | None:
        return self.thresholds[self.best_index] if self.thresholds else None

    @property
    def best_at_edge(self) -> str | None:
        """:func:`sweep_edge` of this sweep's best threshold."""
        return sweep_edge(self.thresholds, self.best_th)

    def sweep_lines(self) -> list[str]:
        """The reference per-threshold lines ``%d/60 threshold: %.3f\\tmIoU: %.3f%%`` (the '/60' is the
        reference's leftover; i is round(100 t))."""
        return ["%d/60 threshold: %.3f\tmIoU: %.3f%%" % (int(round(t * 100)), t, v)
                for t, v in zip(self.thresholds, self.miou)]

    def best_line(self) -> str:
        """Added (not printed by the reference CLI): the best threshold and its mIoU."""
        if self.thresholds:
            return "best threshold: %.3f\tmIoU: %.3f%%" % (self.best_th, self.best_miou)
        return "mIoU: %.3f%%" % self.best_miou

    def table(self, index: int | None = None) -> str:
        """The reference per-class table (``%11s:%7.3f%%``, two per line, then 54 '=' and the mIoU)."""
        i_row = self.best_index if index is None else index
        iou = self.iou[i_row]
        out = []
        for i, name in enumerate(self.categories):
            out.append("%11s:%7.3f%%" % (name, iou[i]) + ("\t" if i % 2 != 1 else "\n"))
        out.append("\n" + "=" * 54 + "\n")
        out.append("%11s:%7.3f%%\n" % ("mIoU", self.miou[i_row]))
        return "".join(out)

    def to_json(self) -> dict:
        """The metrics record (:func:`tools.metrics.metrics_record`, mean over all C+1 classes) at the
        best threshold, plus the sweep: ``thresholds``, ``best_th``, ``miou_by_threshold`` and
        ``iou_by_threshold`` (percent) and the stage-one per-class extras at the best threshold."""
        h = self.hists[self.best_index]
        extra = scores(h)
        return metrics_record(
            h, "all", n_images=len(self.ids), task=self.task, categories=list(self.categories),
            thresholds=list(self.thresholds), best_th=self.best_th, miou_by_threshold=list(self.miou),
            iou_by_threshold=self.iou.tolist(), miou_present=extra["miou_present"] * 100,
            t_over_tp=extra["t_over_tp"].tolist(), p_over_tp=extra["p_over_tp"].tolist(),
            fp_share=extra["fp_share"].tolist(), fn_share=extra["fn_share"].tolist())


# ----------------------------------------------------------------------------------------------
# Workers
# ----------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class _Job:
    task: str
    pred_dir: str
    gt_dir: str
    th32: np.ndarray | None
    plain: bool = False
    dataset: str = VOC12.name  # a registry name: the job is pickled to the workers


def _read_gt(gt_dir: str, img_id: str, dataset: DatasetInfo | str = VOC12) -> np.ndarray:
    ds = get_dataset(dataset)
    p = ds.gt_path(gt_dir, img_id)
    require_file(p, "ground-truth label map",
                 f"Evaluation reads the mask of each listed id under <gt_dir> (default <data_root>/{ds.gt_folder}); "
                 "check --gt_dir/--list/--dataset.")
    return read_gt_png(p, ds.num_classes)


def pred_path(task: str, pred_dir: os.PathLike | str, img_id: str) -> Path:
    """Where the prediction of ``img_id`` is read from for ``task``."""
    return Path(pred_dir) / (f"{img_id}.png" if task == "png" else f"{img_id}.npy")


def image_counts(job: _Job, img_id: str) -> np.ndarray:
    """Counts of one image: ``(T+1, n, n)`` sweep counts for cam, a ``(n, n)`` confusion otherwise."""
    n = get_dataset(job.dataset).num_classes
    gt = _read_gt(job.gt_dir, img_id, job.dataset)
    p = pred_path(job.task, job.pred_dir, img_id)
    if job.task == "cam":
        return cam_counts_for_image(load_dict(p), gt, job.th32, p, job.plain, n)
    if job.task in ("crf", "dl"):
        pred = label_from_dict(load_dict(p), gt.shape, p, n)
    elif job.task == "png":
        require_file(p, "pseudo-label PNG", "Point --pred_dir (or --name/--dict_dir) at the folder of <id>.png labels.")
        pred = read_label_png(p)
        if pred.shape != gt.shape:
            raise DataError(f"prediction '{p}' has size {pred.shape}, ground truth has {gt.shape}.")
    else:
        raise ValueError(f"unknown task {job.task!r}; expected one of {TASKS}")
    # the reference counts predictions of any value (a value >= n simply never matches a class)
    return confusion_matrix(pred, gt, n, IGNORE_INDEX)


def _work(args: tuple[_Job, list[str]]) -> np.ndarray:
    job, ids = args
    total = None
    for img_id in ids:
        c = image_counts(job, img_id)
        total = c if total is None else total + c
    return total


def split_work(ids: Sequence[str], workers: int | None, chunk: int = 16) -> tuple[int, list[list[str]]]:
    """``(workers, chunks)``: the worker count actually used (at least 4 images each; None = up to 8
    CPUs) and ``ids`` cut into chunks of at most ``chunk`` ids, at least one chunk per worker."""
    if workers is None:
        workers = min(8, os.cpu_count() or 1)
    workers = max(1, min(int(workers), max(1, len(ids) // 4)))
    n = max(1, min(chunk, -(-len(ids) // workers)))
    return workers, [list(ids[i:i + n]) for i in range(0, len(ids), n)]


def _pool_context() -> mp.context.BaseContext:
    # fork keeps worker start-up to milliseconds (no re-import); it is safe here because the
    # workers only run numpy/PIL code. Elsewhere fall back to the platform default.
    return mp.get_context("fork") if "fork" in mp.get_all_start_methods() else mp.get_context()


def accumulate(task: str, ids: Sequence[str], pred_dir: os.PathLike | str, gt_dir: os.PathLike | str,
               thresholds: Sequence[float] = REFERENCE_THRESHOLDS, workers: int | None = None,
               progress: bool = True, chunk: int = 16, retain_memory: bool = False,
               plain: bool = False, dataset: DatasetInfo | str = VOC12) -> np.ndarray:
    """Sum of the per-image counts over ``ids`` (parallel over images when ``workers > 1``).

    Worker processes keep their freed heap (:func:`tools.malloc.retain_freed_memory`: no page faults
    on every image's fresh arrays); ``retain_memory`` does the same for this process when it scores
    in-process (``workers == 1``), for single-purpose CLIs such as ``evaluation.py``.

    ``plain``: the sweep with :func:`sweep_counts_plain` and no heap retention anywhere (the
    definition, for the benchmark and the tests).

    ``dataset``: the descriptor (or name) giving the class count and the ground-truth path rule.

    Returns ``(T+1, n, n)`` sweep counts for ``task='cam'``, else a ``(n, n)`` confusion matrix
    (n = the dataset's classes with background).
    """
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; expected one of {TASKS}")
    ds = get_dataset(dataset)
    job = _Job(task, str(pred_dir), str(gt_dir), thresholds_f32(thresholds) if task == "cam" else None, plain,
               ds.name)
    retain = None if plain else retain_freed_memory
    n = ds.num_classes
    total = np.zeros((len(job.th32) + 1, n, n) if task == "cam" else (n, n), np.int64)
    ids = list(ids)
    workers, chunks = split_work(ids, workers, chunk)
    bar = None
    if progress:
        from tqdm import tqdm
        bar = tqdm(total=len(ids), desc=f"eval {task}", unit="img", leave=False, dynamic_ncols=True)
    try:
        if workers == 1:
            if retain_memory and retain is not None:
                retain()
            for c in chunks:
                total += _work((job, c))
                if bar is not None:
                    bar.update(len(c))
        else:
            with _pool_context().Pool(workers, initializer=retain) as pool:
                for c, res in zip(chunks, pool.imap(_work, [(job, c) for c in chunks])):
                    total += res
                    if bar is not None:
                        bar.update(len(c))
    finally:
        if bar is not None:
            bar.close()
    return total


def evaluate(task: str, ids: Sequence[str], pred_dir: os.PathLike | str, gt_dir: os.PathLike | str,
             thresholds: Sequence[float] = REFERENCE_THRESHOLDS, workers: int | None = None,
             progress: bool = True, retain_memory: bool = False, plain: bool = False,
             dataset: DatasetInfo | str = VOC12) -> SweepResult:
    """Score ``ids``: the threshold sweep for ``task='cam'``, a single pass for crf/dl/png
    (``retain_memory``, ``plain``, ``dataset``: see :func:`accumulate`)."""
    ds = get_dataset(dataset)
    counts = accumulate(task, ids, pred_dir, gt_dir, thresholds, workers, progress, retain_memory=retain_memory,
                        plain=plain, dataset=ds)
    if task == "cam":
        return SweepResult(task, list(ids), [float(t) for t in thresholds], sweep_confusions(counts),
                           categories=ds.names_bg)
    return SweepResult(task, list(ids), [], counts[None], categories=ds.names_bg)


def sweep(ids: Sequence[str], dict_dir: os.PathLike | str, gt_dir: os.PathLike | str,
          thresholds: Sequence[float] = REFERENCE_THRESHOLDS, workers: int | None = None,
          progress: bool = True, dataset: DatasetInfo | str = VOC12) -> SweepResult:
    """The CAM-seed threshold sweep over ``<dict_dir>/<id>.npy`` against the masks in ``gt_dir``."""
    return evaluate("cam", ids, dict_dir, gt_dir, thresholds, workers, progress, dataset=dataset)


def eval_in_script(ids: Sequence[str], dict_dir: os.PathLike | str, gt_dir: os.PathLike | str,
                   logger: logging.Logger | Callable[[str], None] | None = None,
                   workers: int | None = None, dataset: DatasetInfo | str = VOC12) -> tuple[float, float]:
    """Training's in-loop validation (reference ``eval_in_script``): logs the 20 sweep lines and
    returns ``(best mIoU in percent, its threshold)`` (strict '>', first best wins)."""
    res = sweep(ids, dict_dir, gt_dir, workers=workers, progress=False, dataset=dataset)
    emit = logger.info if isinstance(logger, logging.Logger) else (logger or print)
    for line in res.sweep_lines():
        emit(line)
    return res.best_miou, float(res.best_th)



# ----------------------------------------------------------------------------------------------
# Plot
# ----------------------------------------------------------------------------------------------

def plot_result(res: SweepResult, path: os.PathLike | str, title: str = "") -> bool:
    """PNG with mIoU vs threshold (cam task) and the per-class IoU bars at the best threshold.

    Uses matplotlib's object API (no pyplot state, safe off the main thread). Returns False (and
    writes nothing) when matplotlib is not installed.
    """
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        return False
    from tools.io import atomic_path

    sweep_plot = bool(res.thresholds)
    fig = Figure(figsize=(13 if sweep_plot else 9, 4.2), dpi=100)
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, 2, gridspec_kw={"width_ratios": [1, 2.2]}) if sweep_plot else [fig.subplots(1, 1)]
    if sweep_plot:
        ax = axes[0]
        ax.plot(res.thresholds, res.miou, "o-", ms=3)
        ax.plot([res.best_th], [res.best_miou], "r*", ms=12)
        ax.set_xlabel("background threshold")
        ax.set_ylabel("mIoU (%)")
        ax.set_title("best %.3f%% at %.2f" % (res.best_miou, res.best_th))
        ax.grid(alpha=0.3)
    ax = axes[-1]
    iou = res.iou[res.best_index]
    n = len(res.categories)
    ax.bar(range(n), iou, color=["0.4"] + ["C0"] * (n - 1))
    ax.set_xticks(range(n))
    ax.set_xticklabels(res.categories, rotation=60, ha="right", fontsize=8 if n <= 32 else 5)
    ax.set_ylabel("IoU (%)")
    ax.set_ylim(0, 100)
    ax.axhline(res.best_miou, color="r", lw=1, ls="--")
    ax.set_title("per-class IoU" + (" at threshold %.2f" % res.best_th if sweep_plot else ""))
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    return True
