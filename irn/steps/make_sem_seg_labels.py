"""make_sem_seg_labels: random-walk pseudo-labels from CAMs and IRN boundaries.

Writes ``<sem_seg_out_dir>/<id>.png`` (uint8 "L", class indices 0..C, no palette) and
``<score_dir>/<id>.pt`` = ``torch.save({"pred": np.int64 (H,W), "score": CPU float32 tensor
(C+1,H,W), "keys": np.int64 (C+1,)})`` — the reference saved ``score`` as a CUDA tensor — and a
``.provenance.json`` in both folders (tools.provenance): an image is reused only while the IRN weights,
its CAM file, its image and the random-walk settings are unchanged.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from irn.data import ImageFlipDataset
from irn.net.resnet50_irn import EdgeDisplacement, load_irn_weights
from irn.random_walk import propagate_to_edge, sem_seg_from_rw
from irn.steps.common import load_cam_dict, per_id, run_split
from tools.checkpoint import load_torch_file
from tools.errors import require_file
from tools.io import atomic_torch_save, save_png
from tools.misc import get_device
from tools.provenance import Provenance, file_id, folder_id, report, stat_key, upstream_id
from tools.dataset import dataset_of
from voc12.data import image_path, read_id_list

VERSION = 1  # output format of sem_seg/<id>.png and score/<id>.pt; bump when the code changes them


def _identity(x: Any) -> Any:
    return x


def rw_mode_for(mode: str, device: torch.device) -> str:
    """``auto`` stays ``auto`` on CUDA (per image: dense, else chunked, else sparse, whichever fits the free
    memory: :func:`irn.random_walk.choose_rw_mode`) and is sparse on CPU."""
    if mode == "auto":
        return "auto" if device.type == "cuda" else "sparse"
    return mode


def load_edge_model(args: Any, device: torch.device) -> EdgeDisplacement:
    model = EdgeDisplacement(crop_size=args.irn_crop_size, stride=4, backbone_width=args.irn_backbone_width)
    sd = load_torch_file(args.irn_weights_name, what="IRN weights (res50_irn.pth)",
                         hint="run the train_irn step first (python run_sample.py --train_irn_pass true)")
    load_irn_weights(model, sd, what=f"IRN weights {args.irn_weights_name}")
    return model.eval().to(device)


def sem_seg_for_image(model: EdgeDisplacement, pair: torch.Tensor, cam_dict: dict, args: Any, mode: str
                      ) -> tuple[np.ndarray, torch.Tensor, np.ndarray]:
    """pair (2,3,H,W) → (pred (H,W) int64 VOC ids, score (C+1,H,W) CPU float32, keys (C+1,) int64)."""
    edge, _ = model(pair)
    keys = np.pad(cam_dict["keys"] + 1, (1, 0), mode="constant")
    cams = torch.from_numpy(cam_dict["cam"]).to(edge.device)
    orig = tuple(pair.shape[2:])
    if cams.shape[0] == 0:  # no class in the label: everything background
        score = torch.full((1,) + orig, float(args.sem_seg_bg_thres))
        return np.zeros(orig, np.int64), score, keys
    rw = propagate_to_edge(cams, edge, radius=5, beta=args.beta, exp_times=args.exp_times, mode=mode)
    pred, score = sem_seg_from_rw(rw, keys, orig, args.sem_seg_bg_thres)
    return pred, score, keys


def _worker(ids: list[str], args: Any, device: torch.device, rank: int) -> None:
    if not ids:
        return
    model = load_edge_model(args, device)
    mode = rw_mode_for(args.rw_mode, device)
    info = dataset_of(args)
    loader = torch.utils.data.DataLoader(ImageFlipDataset(ids, args.voc12_root, info), batch_size=None, shuffle=False,
                                         num_workers=min(args.num_workers, 2), collate_fn=_identity)
    sem_dir, score_dir = Path(args.sem_seg_out_dir), Path(args.score_dir)
    with torch.no_grad():
        for name, pair in tqdm(loader, desc=f"make_sem_seg[{rank}]", position=rank, disable=args.quiet):
            cam_dict = load_cam_dict(Path(args.cam_out_dir) / f"{name}.npy", info.num_fg)
            pred, score, keys = sem_seg_for_image(model, torch.from_numpy(pair).to(device), cam_dict, args, mode)
            atomic_torch_save({"pred": pred, "score": score, "keys": keys}, score_dir / f"{name}.pt")
            save_png(sem_dir / f"{name}.png", pred.astype(np.uint8))


def provenance(args: Any, out_dir: str) -> Provenance:
    """The record of the pseudo-label and score folders (same content in both): IRN weights (sha256),
    the CAM folder's record, VOC root and the random-walk settings."""
    require_file(args.irn_weights_name, "IRN weights (res50_irn.pth)",
                 "run the train_irn step first (python run_sample.py --train_irn_pass true)")
    mode = rw_mode_for(args.rw_mode, get_device(args.device))
    return Provenance(out_dir, "make_sem_seg_labels", VERSION,
                      {"IRN weights": file_id(args.irn_weights_name, content=True),
                       "cams": upstream_id(args.cam_out_dir), "voc12_root": folder_id(args.voc12_root)},
                      {"beta": args.beta, "exp_times": args.exp_times, "sem_seg_bg_thres": args.sem_seg_bg_thres,
                       "rw_mode": mode, "irn_crop_size": args.irn_crop_size,
                       "irn_backbone_width": args.irn_backbone_width})


def run(args: Any) -> None:
    ids = read_id_list(args.train_list)
    cam_dir = Path(args.cam_out_dir)

    def item(i: str) -> list | None:
        return stat_key(image_path(args.voc12_root, i, dataset_of(args)), cam_dir / f"{i}.npy")

    sem = provenance(args, args.sem_seg_out_dir)
    score = provenance(args, args.score_dir)
    sem_out, score_out = per_id(args.sem_seg_out_dir, ".png"), per_id(args.score_dir, ".pt")
    p1, p2 = sem.plan(ids, sem_out, item, args.overwrite), score.plan(ids, score_out, item, args.overwrite)
    todo = sorted(set(p1.todo) | set(p2.todo), key=ids.index)
    p1.todo = p2.todo = todo  # an image is redone in both folders: a .png and its .pt always agree
    line = report("make_sem_seg_labels", p1 if p1.change else p2, "pseudo-labels")
    if line:
        print(line, flush=True)
    print(f"make_sem_seg_labels: {len(todo)} of {len(ids)} images to do -> {args.sem_seg_out_dir}, {args.score_dir}")
    for prov, plan, outs in ((sem, p1, sem_out), (score, p2, score_out)):
        if todo or not prov.complete:
            prov.begin(plan, outs)
    if todo:
        run_split(_worker, todo, args, get_device(args.device))
    sem.finish()
    score.finish()
