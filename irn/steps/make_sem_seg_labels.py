"""make_sem_seg_labels: random-walk pseudo-labels from CAMs and IRN boundaries (stage2.md §1.7).

Writes ``<sem_seg_out_dir>/<id>.png`` (uint8 "L", VOC ids 0..20, no palette) and
``<score_dir>/<id>.pt`` = ``torch.save({"pred": np.int64 (H,W), "score": CPU float32 tensor
(C+1,H,W), "keys": np.int64 (C+1,)})`` — the reference saved ``score`` as a CUDA tensor.
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
from irn.steps.common import load_cam_dict, pending, run_split
from tools.checkpoint import load_torch_file
from tools.io import atomic_torch_save, save_png
from tools.misc import get_device
from voc12.data import read_id_list


def _identity(x: Any) -> Any:
    return x


def rw_mode_for(mode: str, device: torch.device) -> str:
    """``auto`` → dense (reference) on CUDA, sparse on CPU."""
    if mode == "auto":
        return "dense" if device.type == "cuda" else "sparse"
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
    loader = torch.utils.data.DataLoader(ImageFlipDataset(ids, args.voc12_root), batch_size=None, shuffle=False,
                                         num_workers=min(args.num_workers, 2), collate_fn=_identity)
    sem_dir, score_dir = Path(args.sem_seg_out_dir), Path(args.score_dir)
    with torch.no_grad():
        for name, pair in tqdm(loader, desc=f"make_sem_seg[{rank}]", position=rank, disable=args.quiet):
            cam_dict = load_cam_dict(Path(args.cam_out_dir) / f"{name}.npy")
            pred, score, keys = sem_seg_for_image(model, torch.from_numpy(pair).to(device), cam_dict, args, mode)
            atomic_torch_save({"pred": pred, "score": score, "keys": keys}, score_dir / f"{name}.pt")
            save_png(sem_dir / f"{name}.png", pred.astype(np.uint8))


def run(args: Any) -> None:
    ids = read_id_list(args.train_list)
    todo = sorted(set(pending(ids, args.sem_seg_out_dir, ".png", args.overwrite))
                  | set(pending(ids, args.score_dir, ".pt", args.overwrite)), key=ids.index)
    print(f"make_sem_seg_labels: {len(todo)} of {len(ids)} images to do -> {args.sem_seg_out_dir}, {args.score_dir}")
    if not todo:
        return
    Path(args.sem_seg_out_dir).mkdir(parents=True, exist_ok=True)
    Path(args.score_dir).mkdir(parents=True, exist_ok=True)
    run_split(_worker, todo, args, get_device(args.device))
