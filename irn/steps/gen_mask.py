"""Confidence masks for BECO from the random-walk scores (reference ``gen_mask.py``).

Per image: margin = top score − second score (second = max after zeroing every entry equal
to the per-pixel max, as the reference); for each class value k of the prediction, the
floor(n_k · thd) pixels with the largest margin get mask 1.  Ties at the cut are broken by a
stable rule (documented deviation): among equal margins, the pixel earlier in raster order
wins (the reference's unstable ``torch.sort`` leaves this implementation-defined).
Output: ``<mask_out_dir>/<id>.png`` as an RGB PNG with 0/255 in every channel, exactly what
the reference's ``torchvision.utils.save_image`` wrote (BECO reads it with ``.convert('1')``),
and the folder's ``.provenance.json`` (tools.provenance): a mask is reused only while its score file,
the score folder's record and ``thd`` are unchanged.
"""
from __future__ import annotations

import multiprocessing as mp
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from irn.steps.common import mp_start_method as _mp_start
from irn.steps.common import per_id
from tools.checkpoint import load_torch_file
from tools.dataset import dataset_of
from tools.io import save_png
from tools.provenance import Provenance, read_record, record_path_for, stat_key, upstream_id

VERSION = 1  # output format of mask_irn/<id>.png; bump when the code changes what it writes


def confidence_mask(score: np.ndarray | torch.Tensor, pred: np.ndarray, thd: float = 0.5) -> np.ndarray:
    """score (C+1,H,W) float32, pred (H,W) int → mask (H,W) uint8 in {0,1}."""
    s = score.detach().cpu().numpy() if isinstance(score, torch.Tensor) else np.asarray(score)
    s = s.astype(np.float32, copy=False)
    top = s.max(axis=0)
    second = np.where(s == top[None], np.float32(0), s).max(axis=0)
    margin = (top - second).reshape(-1)
    pred = np.asarray(pred).reshape(-1)
    mask = np.zeros(pred.shape, np.uint8)
    for k in np.unique(pred):
        idx = np.flatnonzero(pred == k)  # raster order
        n_keep = int(idx.size * thd)
        if n_keep == 0:
            continue
        order = np.argsort(-margin[idx], kind="stable")  # descending margin, ties → earlier pixel
        mask[idx[order[:n_keep]]] = 1
    return mask.reshape(s.shape[1:])


def mask_png(mask: np.ndarray) -> np.ndarray:
    """(H,W) {0,1} → (H,W,3) uint8 0/255 (torchvision ``save_image`` of a single-channel mask)."""
    v = (mask.astype(np.uint8) * 255)
    return np.repeat(v[:, :, None], 3, axis=2)


def load_score(path: Path) -> dict:
    """Read ``score/<id>.pt`` (ours, or a reference CUDA-pickled one, mapped to CPU): a dict with
    ``pred`` int64 (H, W), ``score`` float tensor (C+1, H, W) and ``keys``. Read with
    ``weights_only`` plus numpy arrays (no code in the file runs)."""
    hint = "run make_sem_seg_labels (run_sample.py) first"
    d = load_torch_file(path, what="random-walk score file", hint=hint, numpy=True)
    if not isinstance(d, dict) or not {"pred", "score"} <= set(d):
        from tools.errors import DataError

        raise DataError(f"random-walk score file '{path}' is not a dict with 'pred' and 'score'; {hint}")
    return d


def check_pred_classes(pred: np.ndarray, num_classes: int, path: object) -> None:
    """A pseudo-label value must be a class index of the dataset (``< num_classes``, background
    included): scores made for another dataset (COCO scores with ``--dataset voc12``) are refused."""
    if pred.size and (int(pred.min()) < 0 or int(pred.max()) >= num_classes):
        from tools.errors import DataError

        raise DataError(f"random-walk score file '{path}' predicts class {int(pred.max())}; the dataset has "
                        f"classes 0..{num_classes - 1}. Pass the --dataset the scores were made for.")


def _one(job: tuple[str, str, float, int]) -> str:
    score_path, out_dir, thd, num_classes = job
    d = load_score(Path(score_path))
    pred = np.asarray(d["pred"])
    check_pred_classes(pred, num_classes, score_path)
    mask = confidence_mask(d["score"], pred, thd)
    save_png(Path(out_dir) / (Path(score_path).stem + ".png"), mask_png(mask))
    return score_path


def run(args: Any) -> None:
    score_dir, out_dir = Path(args.score_dir), Path(args.mask_out_dir)
    files = sorted(score_dir.glob("*.pt")) if score_dir.is_dir() else []
    if not files:
        from tools.errors import MissingFileError

        raise MissingFileError(f"no score files (*.pt) in '{score_dir}'; run `python run_sample.py` first "
                               f"(make_sem_seg_labels writes them) or pass --score_dir")
    upstream = read_record(record_path_for(score_dir))
    if upstream is not None and upstream.get("items") is not None:
        # score files the score folder's record does not list were made from other inputs (an older list)
        files = [f for f in files if f.stem in upstream["items"]]
    ids = [f.stem for f in files]
    prov = Provenance(out_dir, "gen_mask", VERSION, {"scores": upstream_id(score_dir)}, {"thd": float(args.thd)})
    plan = prov.start(ids, per_id(out_dir, ".png"), lambda i: stat_key(score_dir / f"{i}.pt"), args.overwrite,
                      "masks")
    todo = [score_dir / f"{i}.pt" for i in plan.todo]
    print(f"gen_mask: {len(todo)} of {len(files)} masks to do -> {out_dir}")
    out_dir.mkdir(parents=True, exist_ok=True)
    n = dataset_of(args).num_classes
    jobs = [(str(f), str(out_dir), float(args.thd), n) for f in todo]
    workers = max(1, min(int(args.num_workers), len(jobs)))
    if workers == 1:
        for j in tqdm(jobs, desc="gen_mask"):
            _one(j)
    else:
        with mp.get_context(_mp_start()).Pool(workers) as pool:
            for _ in tqdm(pool.imap_unordered(_one, jobs, chunksize=4), total=len(jobs), desc="gen_mask"):
                pass
    prov.finish()
