"""make_cam: multi-scale + flip CAMs of the stage-one network for IRN.

Writes ``<cam_out_dir>/<id>.npy`` = ``{"keys", "cam", "high_res"}`` (plain numpy; see
``irn.steps.common.save_cam_dict``) and the folder's ``.provenance.json`` (tools.provenance): a rerun
reuses a CAM only when the checkpoint, labels, scales and its image are unchanged.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from irn.steps.common import per_id, run_split, save_cam_dict
from tools.errors import require_file
from tools.misc import get_device
from tools.provenance import Provenance, file_id, folder_id, stat_key
from tools.dataset import dataset_of
from voc12.data import MSFDataset, image_path, load_cls_labels, read_id_list

VERSION = 1  # output format of cam/<id>.npy; bump when the code changes what it writes

CAM_WEIGHTS_HINT = ("train stage one (python train.py --name <name>) and pass --cam_weights_name "
                    "experiments/<name>/ckpt/NNNnet_main (without .pth), or put the KTSE+ release "
                    "031net_main.pth into irn/sess/")


def strided_size(size: Sequence[int], stride: int) -> tuple[int, int]:
    return (int(size[0]) - 1) // stride + 1, (int(size[1]) - 1) // stride + 1


def strided_up_size(size: Sequence[int], stride: int) -> tuple[int, int]:
    h, w = strided_size(size, stride)
    return h * stride, w * stride


def cams_from_outputs(outputs: Sequence[torch.Tensor], img_size: Sequence[int], label: np.ndarray
                      ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Combine per-scale network outputs into IRN's CAMs.

    outputs: per scale (C, h_s, w_s) flip-merged ReLU maps; img_size (H, W); label (C,).
    Returns keys (C,) int64 fg indices, cam (C, ceil(H/4), ceil(W/4)), high_res (C, H, W),
    each map divided by its own max + 1e-5.
    """
    H, W = int(img_size[0]), int(img_size[1])
    ss, su = strided_size((H, W), 4), strided_up_size((H, W), 16)
    cam = torch.sum(torch.stack([F.interpolate(o[None], ss, mode="bilinear", align_corners=False)[0]
                                 for o in outputs]), 0)
    high = torch.sum(torch.stack([F.interpolate(o[:, None], su, mode="bilinear", align_corners=False)
                                  for o in outputs], 0), 0)[:, 0, :H, :W]
    keys = torch.nonzero(torch.as_tensor(label))[:, 0]
    cam = cam[keys]
    cam = cam / (F.adaptive_max_pool2d(cam, (1, 1)) + 1e-5)
    high = high[keys]
    high = high / (F.adaptive_max_pool2d(high, (1, 1)) + 1e-5)
    return keys.cpu().numpy().astype(np.int64), cam.cpu().numpy(), high.cpu().numpy()


def build_cam_network(weights_name: str, width: float | None = None, model: str = "ktse") -> torch.nn.Module:
    """Stage-one network loaded strictly from ``<weights_name>.pth`` (a plain state_dict, or a training
    state holding one), in eval mode. ``width`` None: read from the checkpoint's shapes, so toy-width
    stage-one checkpoints load without extra flags. ``model``: ``--cam_network`` (models/registry.py)."""
    from models.resnet38d import load_stage_one

    return load_stage_one(cam_weights_path(weights_name), width=width, model=model,
                          what="stage-one checkpoint (Net_gpp state_dict)", hint=CAM_WEIGHTS_HINT)


def flip_merged_cam(net: torch.nn.Module, pair: torch.Tensor) -> torch.Tensor:
    """pair (2,3,h,w) = [image, flipped image] → ReLU(cam[0] + flip(cam[1])) (C, h/8, w/8)."""
    cam = net.forward_cam(pair)
    return F.relu(cam[0] + cam[1].flip(-1))


def _identity(x: Any) -> Any:
    return x


def _worker(ids: list[str], args: Any, device: torch.device, rank: int) -> None:
    if not ids:
        return
    from models.cam_infer import check_class_count

    info = dataset_of(args)
    net = build_cam_network(args.cam_weights_name, getattr(args, "cam_width", None),
                            getattr(args, "cam_network", "ktse")).to(device)
    check_class_count(net, info, cam_weights_path(args.cam_weights_name))
    ds = MSFDataset(ids, args.voc12_root, load_cls_labels(args.cls_labels, info), scales=tuple(args.cam_scales),
                    labels_source=str(args.cls_labels), dataset=info)
    loader = torch.utils.data.DataLoader(ds, batch_size=None, shuffle=False, num_workers=min(args.num_workers, 4),
                                         collate_fn=_identity)
    out_dir = Path(args.cam_out_dir)
    with torch.no_grad():
        for name, arrays, label in tqdm(loader, desc=f"make_cam[{rank}]", position=rank, disable=args.quiet):
            outputs = []
            for i in range(0, len(arrays), 2):
                pair = torch.from_numpy(np.stack([arrays[i], arrays[i + 1]])).to(device)
                outputs.append(flip_merged_cam(net, pair))
            keys, cam, high = cams_from_outputs(outputs, _orig_size(arrays, args.cam_scales), label)
            save_cam_dict(out_dir / f"{name}.npy", keys, cam, high)


def _orig_size(arrays: list[np.ndarray], scales: Sequence[float]) -> tuple[int, int]:
    """Original image size: the input of scale 1.0 (every reference scale list contains 1.0)."""
    for i, s in enumerate(scales):
        if float(s) == 1.0:
            return tuple(arrays[2 * i].shape[1:])  # type: ignore[return-value]
    raise ValueError(f"--cam_scales must contain 1.0 (got {list(scales)})")


def cam_weights_path(weights_name: str) -> str:
    return weights_name if str(weights_name).endswith(".pth") else f"{weights_name}.pth"


def provenance(args: Any) -> Provenance:
    """The CAM folder's record: stage-one checkpoint (sha256), class labels, VOC root, scales, width."""
    ckpt = cam_weights_path(args.cam_weights_name)
    require_file(ckpt, "stage-one checkpoint (Net_gpp state_dict)", CAM_WEIGHTS_HINT)
    return Provenance(args.cam_out_dir, "make_cam", VERSION,
                      {"stage-one checkpoint": file_id(ckpt, content=True),
                       "cls_labels": file_id(args.cls_labels, content=True), "voc12_root": folder_id(args.voc12_root)},
                      {"cam_scales": [float(s) for s in args.cam_scales],
                       "cam_width": getattr(args, "cam_width", None), "dataset": dataset_of(args).name})


def run(args: Any) -> None:
    ids = read_id_list(args.train_list)
    prov = provenance(args)
    outputs = per_id(args.cam_out_dir, ".npy")
    info = dataset_of(args)
    plan = prov.start(ids, outputs, lambda i: stat_key(image_path(args.voc12_root, i, info)), args.overwrite, "CAMs")
    print(f"make_cam: {len(plan.todo)} of {len(ids)} images to do -> {args.cam_out_dir}")
    if plan.todo:
        Path(args.cam_out_dir).mkdir(parents=True, exist_ok=True)
        run_split(_worker, plan.todo, args, get_device(args.device))
    prov.finish()
