"""cam_to_ir_label: confident fg/bg seeds for IRN training via two dense CRFs.

Writes ``<ir_label_out_dir>/<id>.png``: uint8 single channel ("L"), values 0 (confident bg),
1..20 (confident class), 255 (unknown), and the folder's ``.provenance.json`` (tools.provenance):
an IR label is reused only while its CAM file, image, thresholds and CRF parameters are unchanged.
"""
from __future__ import annotations

import multiprocessing as mp
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from irn.steps.common import load_cam_dict, per_id
from irn.steps.common import mp_start_method as _mp_start
from tools.crf import dense_crf_labels
from tools.io import save_png
from tools.provenance import Provenance, folder_id, stat_key, upstream_id
from tools.dataset import dataset_of, get_dataset
from voc12.data import image_path, load_image, read_id_list

VERSION = 1  # output format of ir_label/<id>.png; bump when the code changes what it writes

#: reference crf_inference_label parameters (crf.json "irn_cam_to_ir_label")
IRN_CRF = dict(gt_prob=0.7, n_iter=10, gauss_sxy=3, gauss_compat=3, bil_sxy=50, bil_srgb=5, bil_compat=10)


def ir_label_from_cams(img: np.ndarray, high_res: np.ndarray, keys_fg: np.ndarray, fg_thres: float = 0.3,
                       bg_thres: float = 0.1, return_parts: bool = False):
    """img (H,W,3) uint8, high_res (C,H,W) normalised CAMs, keys_fg (C,) fg indices 0..19.

    Returns the seed map (H,W) uint8: class id where the fg-threshold CRF says fg, 0 where both
    the fg- and bg-threshold CRFs say bg, 255 elsewhere.  With ``return_parts`` also
    (fg_argmax, fg_crf, bg_argmax, bg_crf) label indices into [0] + keys_fg + 1.
    """
    keys = np.pad(np.asarray(keys_fg, dtype=np.int64) + 1, (1, 0), mode="constant")
    n = keys.shape[0]
    img = np.ascontiguousarray(img)
    parts = []
    for thres in (fg_thres, bg_thres):
        arg = np.argmax(np.pad(high_res, ((1, 0), (0, 0), (0, 0)), mode="constant", constant_values=thres), axis=0)
        crf = dense_crf_labels(img, arg, n_labels=n, **IRN_CRF)
        parts += [arg, crf]
    fg_conf, bg_conf = keys[parts[1]], keys[parts[3]]
    conf = fg_conf.copy()
    conf[fg_conf == 0] = 255
    conf[fg_conf + bg_conf == 0] = 0
    conf = conf.astype(np.uint8)
    return (conf, tuple(parts)) if return_parts else conf


def _one(job: tuple[str, str, str, str, float, float, str]) -> str:
    name, voc_root, cam_dir, out_dir, fg, bg, dataset = job
    ds = get_dataset(dataset)
    img = load_image(voc_root, name, ds)
    d = load_cam_dict(Path(cam_dir) / f"{name}.npy", ds.num_fg)
    conf = ir_label_from_cams(img, d["high_res"], d["keys"], fg, bg)
    save_png(Path(out_dir) / f"{name}.png", conf)
    return name


def provenance(args: Any) -> Provenance:
    """The ir_label folder's record: the CAM folder's record, VOC root, thresholds and CRF parameters."""
    return Provenance(args.ir_label_out_dir, "cam_to_ir_label", VERSION,
                      {"cams": upstream_id(args.cam_out_dir), "voc12_root": folder_id(args.voc12_root)},
                      {"conf_fg_thres": float(args.conf_fg_thres), "conf_bg_thres": float(args.conf_bg_thres),
                       "crf": IRN_CRF})


def run(args: Any) -> None:
    ids = read_id_list(args.train_list)
    prov = provenance(args)
    cam_dir = Path(args.cam_out_dir)
    plan = prov.start(ids, per_id(args.ir_label_out_dir, ".png"),
                      lambda i: stat_key(image_path(args.voc12_root, i, dataset_of(args)), cam_dir / f"{i}.npy"),
                      args.overwrite, "IR labels")
    todo = plan.todo
    print(f"cam_to_ir_label: {len(todo)} of {len(ids)} images to do -> {args.ir_label_out_dir}")
    if todo:
        _run_jobs(todo, args)
    prov.finish()


def _run_jobs(todo: list[str], args: Any) -> None:
    from tools.crf import require_crf

    require_crf()
    Path(args.ir_label_out_dir).mkdir(parents=True, exist_ok=True)
    jobs = [(n, str(args.voc12_root), str(args.cam_out_dir), str(args.ir_label_out_dir),
             float(args.conf_fg_thres), float(args.conf_bg_thres), dataset_of(args).name) for n in todo]
    workers = max(1, min(int(args.num_workers), len(jobs)))
    if workers == 1:
        for j in tqdm(jobs, desc="cam_to_ir_label", disable=args.quiet):
            _one(j)
        return
    # CRF is single-threaded C++: one process per CPU worker
    with mp.get_context(_mp_start()).Pool(workers) as pool:
        for _ in tqdm(pool.imap_unordered(_one, jobs, chunksize=1), total=len(jobs), desc="cam_to_ir_label",
                      disable=args.quiet):
            pass
