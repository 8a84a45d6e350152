"""train_irn: train the IRN boundary + displacement heads on the ir_label seeds.

Faithful schedule: SGD with two groups (edge heads lr, displacement heads 10× lr), weight
decay 1e-4, poly decay ``lr0·(1 − step/max_step)^0.9`` before every step, and — the
reference's ``PolyOptimizer`` bug — SGD momentum 1e-4 (weight_decay passed into SGD's
momentum slot).  ``--irn_fix_momentum true`` uses momentum 0.9 (docs/deviations.md).
After training, ``mean_shift.running_mean`` = mean displacement over ``infer_list``
(top-left crops); the AffinityDisplacementLoss state_dict (all reference alias keys plus the
loss buffers) is saved to ``irn_weights_name``, with its record ``.res50_irn.pth.provenance.json``
beside it (tools.provenance). A rerun skips training when the record matches; when the IR labels or a
setting changed it stops with an error naming the change (``--overwrite`` retrains): finished weights
are never replaced silently. An interrupted training leaves ``<irn_weights_name>.resume`` after each
epoch (model, optimizer, step, RNG states and the loader's shuffling generator: a ``--resume true``
run sees the same batches as an uninterrupted one). SGD, poly LR and the training state come from
tools.runtime / tools.train_state.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from irn.data import AffinityDataset, TopLeftCropDataset
from irn.net.resnet50_irn import AffinityDisplacementLoss
from irn.path_index import PathIndex
from tools.errors import WSSSError, require_dir
from tools.io import atomic_torch_save
from tools.misc import seed_everything
from tools.runtime import PolySchedule, poly_sgd, select_device
from tools.train_state import load_training_state, save_training_state, set_rng_state
from tools.provenance import Provenance, file_id, folder_id, ids_id, upstream_id
from tools.dataset import dataset_of
from voc12.data import read_id_list

VERSION = 1  # format of res50_irn.pth; bump when the code changes what training produces

IMAGENET_HINT = ("download https://download.pytorch.org/models/resnet50-19c8e357.pth (torchvision ResNet-50 "
                 "ImageNet weights) and pass its path with --irn_backbone_init, or --irn_backbone_init none "
                 "for a random backbone (toy runs only)")


def irn_total_loss(pos_aff_loss: torch.Tensor, neg_aff_loss: torch.Tensor, dp_fg_loss: torch.Tensor,
                   dp_bg_loss: torch.Tensor, bg_pos: torch.Tensor, fg_pos: torch.Tensor, neg: torch.Tensor
                   ) -> dict[str, torch.Tensor]:
    """train_irn's loss from the per-pair maps and affinity labels (B, n_dirs, n_src).

    Returns ``loss_bg_pos``, ``loss_fg_pos``, ``loss_pos``, ``loss_neg``, ``loss_dp_fg``,
    ``loss_dp_bg`` and ``loss_total`` = (pos + neg)/2 + (dp_fg + dp_bg)/2.
    """
    bg_pos_l = torch.sum(bg_pos * pos_aff_loss) / (torch.sum(bg_pos) + 1e-5)
    fg_pos_l = torch.sum(fg_pos * pos_aff_loss) / (torch.sum(fg_pos) + 1e-5)
    pos_l = bg_pos_l / 2 + fg_pos_l / 2
    neg_l = torch.sum(neg * neg_aff_loss) / (torch.sum(neg) + 1e-5)
    dp_fg = torch.sum(dp_fg_loss * fg_pos.unsqueeze(1)) / (2 * torch.sum(fg_pos) + 1e-5)
    dp_bg = torch.sum(dp_bg_loss * bg_pos.unsqueeze(1)) / (2 * torch.sum(bg_pos) + 1e-5)
    total = (pos_l + neg_l) / 2 + (dp_fg + dp_bg) / 2
    return {"loss_bg_pos": bg_pos_l, "loss_fg_pos": fg_pos_l, "loss_pos": pos_l, "loss_neg": neg_l,
            "loss_dp_fg": dp_fg, "loss_dp_bg": dp_bg, "loss_total": total}


def default_imagenet_paths(explicit: str | None) -> list[Path]:
    """Where the torchvision ResNet-50 file is looked for (explicit flag first, then the torch hub cache)."""
    paths = [Path(explicit)] if explicit else []
    hub = Path(os.environ.get("TORCH_HOME", Path.home() / ".cache" / "torch")) / "hub" / "checkpoints"
    paths.append(hub / "resnet50-19c8e357.pth")
    return paths


def build_model(args: Any) -> AffinityDisplacementLoss:
    """AffinityDisplacementLoss for radius-10 paths on the (crop/4)² grid, backbone initialised per flags."""
    g = args.irn_crop_size // 4
    model = AffinityDisplacementLoss(PathIndex(radius=10, default_size=(g, g)), backbone_width=args.irn_backbone_width)
    init = str(args.irn_backbone_init)
    if init.lower() == "none":
        print("train_irn: --irn_backbone_init none: random backbone (toy runs only)")
        return model
    # another width loads only a file of that width (the toy presets' stand-in pretraining): the strict
    # load names every tensor whose shape differs
    candidates = default_imagenet_paths(init)
    found = next((p for p in candidates if p.is_file()), None)
    model.load_imagenet(found if found is not None else candidates[0])  # missing → error naming path + URL
    return model


def _optimizer(model: AffinityDisplacementLoss, args: Any) -> torch.optim.SGD:
    edge_params, dp_params = model.trainable_parameters()
    # reference: the weight decay lands in SGD's momentum slot (--irn_fix_momentum: real momentum 0.9)
    return poly_sgd([
        {"params": edge_params, "lr": args.irn_learning_rate, "weight_decay": args.irn_weight_decay},
        {"params": dp_params, "lr": 10 * args.irn_learning_rate, "weight_decay": args.irn_weight_decay},
    ], lr=args.irn_learning_rate, weight_decay=args.irn_weight_decay, momentum=0.9,
        momentum_quirk=not args.irn_fix_momentum)


def backbone_init_file(args: Any) -> Path | None:
    """The ImageNet file build_model will load (None for a random backbone or when none is found)."""
    init = str(args.irn_backbone_init)
    if init.lower() == "none":
        return None
    return next((p for p in default_imagenet_paths(init) if p.is_file()), None)


def provenance(args: Any) -> Provenance:
    """The record of ``irn_weights_name``: the IR labels (their record and every training id's item),
    the lists, VOC root, backbone init file (sha256), every irn_* setting and the seed."""
    ids = read_id_list(args.train_list)
    init = backbone_init_file(args)
    return Provenance(args.irn_weights_name, "train_irn", VERSION,
                      {"ir_labels": upstream_id(args.ir_label_out_dir, ids=ids), "train_list": ids_id(ids),
                       "infer_list": ids_id(read_id_list(args.infer_list)), "voc12_root": folder_id(args.voc12_root),
                       "backbone init": file_id(init, content=True) if init else str(args.irn_backbone_init)},
                      {k: getattr(args, k) for k in ("irn_crop_size", "irn_batch_size", "irn_num_epoches",
                                                     "irn_learning_rate", "irn_weight_decay", "irn_fix_momentum",
                                                     "irn_backbone_width", "seed")}, is_dir=False)


def run(args: Any) -> None:
    out = Path(args.irn_weights_name)
    resume_path = out.with_name(out.name + ".resume")
    prov = provenance(args)
    change = prov.change()
    if out.exists() and not args.overwrite:
        if prov.matches():  # (a 'running' record here: killed between saving the weights and the record)
            print(f"train_irn: {out} was trained from the same inputs and settings, skipping (--overwrite to retrain)")
            if not prov.complete:
                prov.start_single()
                prov.finish()
            return
        raise WSSSError(f"train_irn: {out} exists but does not match the current inputs and settings: {change}. "
                        f"Pass --overwrite true to retrain it (add --make_cam_pass false --cam_to_ir_label_pass false "
                        f"to keep the CAMs and IR labels).")
    resume = bool(args.resume) and resume_path.exists()
    if resume and not prov.matches():
        raise WSSSError(f"train_irn: the interrupted training {resume_path} was made from other inputs: {change}. "
                        f"Pass --resume false to train from scratch.")
    if not resume and resume_path.exists():
        print(f"train_irn: ignoring {resume_path} (pass --resume true to continue it"
              f"{'' if prov.matches() else '; it was made from other inputs: ' + str(change)})")
    elif out.exists() and change:
        print(f"train_irn: --overwrite: retraining {out} ({change})")
    prov.start_single()
    # weights of other inputs go before training starts: with a 'running' record, an existing weights
    # file then always means "saved by this training, killed before the record was completed"
    out.unlink(missing_ok=True)
    seed_everything(args.seed)
    device = select_device(args.device)
    require_dir(args.ir_label_out_dir, "ir_label folder", "run cam_to_ir_label first")
    ids = read_id_list(args.train_list)
    model = build_model(args)
    ds = AffinityDataset(ids, args.voc12_root, args.ir_label_out_dir, model.path_index,
                         crop_size=args.irn_crop_size, rescale=(0.5, 1.5), hor_flip=True, seed=args.seed,
                         dataset=dataset_of(args))
    batch = args.irn_batch_size
    if len(ds) < batch:
        # the reference (drop_last) would train zero steps on such a set
        print(f"train_irn: only {len(ds)} training images < batch {batch}; using batch {len(ds)}")
        batch = len(ds)
    gen = torch.Generator().manual_seed(args.seed)  # the shuffling order; saved in the resume state
    loader = torch.utils.data.DataLoader(ds, batch_size=batch, shuffle=True, num_workers=args.num_workers,
                                         pin_memory=device.type == "cuda", drop_last=True, generator=gen)
    max_step = (len(ds) // batch) * args.irn_num_epoches
    model = model.to(device)
    opt = _optimizer(model, args)
    schedule = PolySchedule.for_optimizer(opt, max_step, 0.9)
    step, start_ep = 0, 0
    if resume:
        st = load_training_state(resume_path, "IRN training state", "run without --resume to start over",
                                 required=("model", "optimizer", "step", "epoch"), written_by="train_irn")
        model.load_state_dict(st["model"])
        opt.load_state_dict(st["optimizer"])
        step, start_ep = st["step"], st["epoch"] + 1
        if "rng" in st:  # states written before the RNG was saved resume with fresh random numbers
            set_rng_state(st["rng"], {"loader": gen})
        print(f"train_irn: resumed from {resume_path} at epoch {start_ep}, step {step}")
    gpus = torch.cuda.device_count() if device.type == "cuda" and device.index is None else 1
    net = torch.nn.DataParallel(model) if gpus > 1 else model
    model.train()
    for ep in range(start_ep, args.irn_num_epoches):
        ds.set_epoch(ep)
        bar = tqdm(loader, desc=f"train_irn ep {ep + 1}/{args.irn_num_epoches}", disable=args.quiet)
        for pack in bar:
            img = pack["img"].to(device, non_blocking=True)
            bg = pack["aff_bg_pos_label"].to(device, non_blocking=True)
            fg = pack["aff_fg_pos_label"].to(device, non_blocking=True)
            neg = pack["aff_neg_label"].to(device, non_blocking=True)
            parts = irn_total_loss(*net(img, True), bg, fg, neg)
            schedule.apply(opt, step)
            opt.zero_grad()
            parts["loss_total"].backward()
            opt.step()
            if step % 50 == 0:
                bar.write(f"step {step + 1}/{max_step} " + " ".join(
                    f"{k[5:]}:{v.item():.4f}" for k, v in parts.items()) + f" lr:{opt.param_groups[0]['lr']:.4g}")
            step += 1
        save_training_state(resume_path, {"model": model.state_dict(), "optimizer": opt.state_dict(), "step": step,
                                           "epoch": ep}, generators={"loader": gen})
    set_mean_shift(model, args, device)
    atomic_torch_save(model.state_dict(), out)
    prov.finish()
    resume_path.unlink(missing_ok=True)
    print(f"train_irn: saved {out}")


def set_mean_shift(model: AffinityDisplacementLoss, args: Any, device: torch.device) -> None:
    """``mean_shift.running_mean`` := mean over batches of the per-batch mean displacement on infer_list."""
    ids = read_id_list(args.infer_list)
    ds = TopLeftCropDataset(ids, args.voc12_root, crop_size=args.irn_crop_size, dataset=dataset_of(args))
    batch = min(args.irn_batch_size, len(ds))  # reference drop_last would give no batch on tiny sets
    loader = torch.utils.data.DataLoader(ds, batch_size=batch, shuffle=False, num_workers=args.num_workers,
                                         drop_last=True)
    model.eval()
    means = []
    with torch.no_grad():
        for pack in tqdm(loader, desc="train_irn mean shift", disable=args.quiet):
            _, dp = model(pack["img"].to(device), False)
            means.append(torch.mean(dp, dim=(0, 2, 3)).cpu())
    model.mean_shift.running_mean = torch.mean(torch.stack(means), dim=0).to(device)
