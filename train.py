"""Stage one training: KTSE+ (seed command 3).

    python train.py --name ktse1 --model ktse

trains ``Net_gpp`` from the ImageNet ResNet-38 weights (``--init``, MXNet ``.params``) on
``--train_list`` with image-level labels, saving ``experiments/<name>/ckpt/<epo:03d>net_main.pth``
(plain state_dict, the reference format) every epoch plus a resumable ``ckpt/last.pth``
(``--resume``). KTSE+ activation leakage suppression is on by default (``--als_cross 0 --als_bg 0``
gives plain KTSE). ``torchrun --nproc_per_node N train.py ...`` trains with DDP; the global batch
size stays ``--batch_size`` (``8`` before epoch ``--T``).

Reference behaviour is kept by default (stage1.md section 4, docs/deviations.md): SGD momentum 5e-4
(``--momentum_fix`` for 0.9), poly max_step computed for batch 8, the logged ``loss_cls``/``loss_seg``
being the total / full seg loss.
"""
from __future__ import annotations

import argparse
import math
import os
import random
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from tools import cli
from tools.errors import DataError, WSSSError, require_all, run_cli

DEFAULT_INIT = "pretrained/ilsvrc-cls_rna-a1_cls1000_ep-0001.params"
#: epochs (0-based) after which the reference runs its CAM validation
REFERENCE_VAL_EPOCHS = (11, 21, 31, 38, 39)
#: the 8 loss names of the reference log line, then this implementation's extra terms
REF_LOG = ("loss_cls", "loss_kt", "loss_seg", "loss_inter", "loss_global_align", "loss_local_align",
           "loss_seg_fg", "loss_seg_two")
EXTRA_LOG = ("loss_bce", "loss_als_cross", "loss_als_bg")


def _bool(v: str) -> bool:
    from tools.misc import str2bool

    return str2bool(v)


def _val_epochs_spec(s: str) -> str:
    """``--val_epochs``: 'none'/'off'/'' or comma-separated epochs >= 0 and 'last' (kept as text)."""
    try:
        if any(e < 0 for e in parse_val_epochs(s, 1)):
            raise ValueError(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected 'none' or comma-separated epochs (integers >= 0, 'last'), "
                                         f"got {s!r}") from None
    return s


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    # ---- reference flags (stage1.md section 8)
    p.add_argument("--train_list", default="voc12/train_aug.txt", help="training image list")
    p.add_argument("--val_list", default="voc12/train.txt", help="images of the in-training CAM validation")
    p.add_argument("--num_workers", type=cli.nonneg_int, default=8, help="reference flag, ignored there too; see --workers")
    p.add_argument("--batch_size", type=cli.positive_int, default=16, help="global batch size from epoch --T on")
    p.add_argument("--resize", type=cli.positive_float, nargs=2, default=[256, 512], help="long-side range (inclusive)")
    p.add_argument("--crop", type=cli.positive_int, nargs="+", default=[320, 320], help="crop side (crop[0] used; multiple of 8)")
    p.add_argument("--cj", type=float, nargs="+", default=[0.4, 0.4, 0.4, 0.1], help="unused (jitter disabled in the reference)")
    p.add_argument("--M", type=float, default=0.5, help="unused (reference compatibility)")
    p.add_argument("--TH", type=cli.fraction, nargs="+", default=[0.6, 0.2], help="TH[0]: foreground erasing threshold")
    p.add_argument("--T", type=cli.nonneg_int, default=10, help="epoch at which the KTSE terms start (and the batch switch)")
    p.add_argument("--W", type=cli.nonneg_float, nargs="+", default=[1.0, 1.0, 0.15], help="W[0] cls weight, W[1] global align weight + on/off")
    p.add_argument("--CRF", type=int, default=4, help="unused (reference compatibility)")
    p.add_argument("--RCAM_T", type=cli.fraction, nargs="+", default=[0.3, 0.15], help="pseudo-label background levels (high, low)")
    p.add_argument("--lr", type=cli.positive_float, default=0.01, help="base learning rate")
    p.add_argument("--wt_dec", type=cli.nonneg_float, default=5e-4, help="weight decay (also the SGD momentum: reference quirk)")
    p.add_argument("--max_epochs", "--max_epoches", dest="max_epochs", type=cli.positive_int, default=40, help="epochs")
    p.add_argument("--model", default="ktse", choices=["ktse"], help="stage-one model")
    p.add_argument("--name", required=True, help="experiment name (experiments/<name>)")
    p.add_argument("--gpu", type=int, default=-1, help="unused (reference compatibility); see --device")
    p.add_argument("--seed", type=cli.nonneg_int, default=5137, help="random seed")
    p.add_argument("--vis", action="store_true", help="unused in training (validation always saves overlays)")
    p.add_argument("--dict", action="store_false", help="store_false as the reference: passing it turns validation dicts off")
    p.add_argument("--crf", action="store_true", help="validation CRF dictionaries")
    p.add_argument("--print_freq", type=cli.positive_int, default=100, help="log running loss means every N iterations")
    p.add_argument("--out_num", type=int, default=100, help="unused (reference compatibility)")
    p.add_argument("--alphas", type=cli.positive_int, nargs="+", default=[6, 10, 24], help="CRF alphas / crf/<alpha> folders")
    p.add_argument("--D", type=cli.positive_int, default=256, help="fc8 width")
    # ---- this implementation
    p.add_argument("--data_root", default="data/VOC2012", help="VOC tree (JPEGImages/, SegmentationClass/)")
    p.add_argument("--cls_labels", default="voc12/cls_labels.npy", help="image-level labels (reference format)")
    p.add_argument("--exp_root", default="experiments", help="folder holding experiments/<name>")
    p.add_argument("--device", type=cli.device, default="auto", help=cli.DEVICE_HELP)
    p.add_argument("--amp", action="store_true", help="mixed precision (fp16 on CUDA with loss scaling, bf16 on CPU)")
    p.add_argument("--workers", type=cli.nonneg_int, default=4, help="DataLoader workers (the reference hard-codes 4)")
    p.add_argument("--threads", type=cli.nonneg_int, default=0,
                   help="torch CPU threads (0 = torch default; 1 is much faster on a busy machine)")
    p.add_argument("--resume", action="store_true", help="continue from ckpt/last.pth when it exists")
    p.add_argument("--init", default=DEFAULT_INIT,
                   help="ImageNet ResNet-38 weights (MXNet .params); 'none' trains from scratch")
    p.add_argument("--width", type=cli.positive_float, default=1.0, help="trunk channel multiplier (1 = reference; <1 for CPU toy runs)")
    p.add_argument("--als_cross", type=cli.nonneg_float, default=1.0, help="KTSE+ cross-image leakage weight (0 = off)")
    p.add_argument("--als_bg", type=cli.nonneg_float, default=0.1, help="KTSE+ background leakage weight (0 = off)")
    p.add_argument("--momentum_fix", action="store_true", help="fix: real SGD momentum 0.9 (reference: 5e-4)")
    p.add_argument("--safe_ce", type=_bool, default=None,
                   help="fix: an all-ignored pseudo-label cross-entropy gives 0 instead of NaN "
                        "(default: true with --init none, else false = reference)")
    p.add_argument("--train_bn", type=_bool, default=None,
                   help="not the reference: BatchNorm in train mode with trainable affine "
                        "(default: true with --init none, else false = reference)")
    p.add_argument("--train_stem", type=_bool, default=None,
                   help="not the reference: also train conv1a and b2* (default: true with --init none, else false)")
    p.add_argument("--early_batch_size", type=cli.positive_int, default=8, help="global batch size before epoch --T (reference 8)")
    p.add_argument("--val_epochs", type=_val_epochs_spec, default=",".join(map(str, REFERENCE_VAL_EPOCHS)),
                   help="comma-separated 0-based epochs with CAM validation; 'none' disables; 'last' = final epoch")
    p.add_argument("--val_limit", type=cli.nonneg_int, default=0, help="validate on the first N images only (0 = all)")
    p.add_argument("--epoch_iters", type=cli.nonneg_int, default=0, help="cap iterations per epoch (0 = full epoch; tests/benchmarks)")
    p.add_argument("--keep_ckpt", type=cli.nonneg_int, default=0, help="keep only the newest N epoch checkpoints (0 = all, as the reference)")
    p.add_argument("--overwrite", action="store_true", help="start over even if ckpt/last.pth exists (without --resume)")
    return p


# ----------------------------------------------------------------------------------------------
def parse_val_epochs(spec: str, max_epochs: int) -> set[int]:
    s = str(spec).strip().lower()
    if s in ("", "none", "off"):
        return set()
    out = set()
    for tok in s.split(","):
        tok = tok.strip()
        if tok == "last":
            out.add(max_epochs - 1)
        elif tok:
            out.add(int(tok))
    return out


def exp_paths(args: argparse.Namespace) -> dict[str, Path]:
    root = Path(args.exp_root) / args.name
    return {"root": root, "ckpt": root / "ckpt", "val": root / "val", "val_dict": root / "val_dict",
            "crf": root / "crf", "tb": root / "tb", "log": root / "log.txt", "last": root / "ckpt" / "last.pth"}


def make_exp_dirs(paths: dict[str, Path], alphas: list[int], log) -> None:
    """Reference tree (ckpt/ train/ val/ infer/ dict/ crf/<alpha>) plus tb/ and val_dict/."""
    root = paths["root"]
    if root.exists():
        log(f"{root} already exsits.")
    else:
        log(f"{root} is built.")
    for sub in ("ckpt", "train", "val", "infer", "dict", "crf", "tb", "val_dict"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    for a in alphas:
        (root / "crf" / f"{a:02d}").mkdir(parents=True, exist_ok=True)


def load_imagenet_init(net, path: str, log) -> None:
    """Load the MXNet ImageNet weights into the 191 backbone tensors (strict coverage check)."""
    if net.width != 1.0:
        raise DataError(f"--init {path} needs the reference width (--width 1); got --width {net.width:g}. "
                        "Use --init none for small-width toy runs.")
    from models.mxnet_params import load_resnet38_imagenet  # lazy: only needed here
    from tools.checkpoint import load_state_dict_checked

    sd = load_resnet38_imagenet(path)
    missing, unexpected = load_state_dict_checked(net, sd, strict=False, what=f"ImageNet weights '{path}'")
    backbone = set(net.backbone_keys())
    uncovered = sorted(backbone & set(missing))
    if uncovered or unexpected:
        raise DataError(f"ImageNet weights '{path}' do not cover the ResNet-38 backbone: missing {uncovered[:8]}, "
                        f"unexpected {list(unexpected)[:8]}")
    log(f"Loaded ImageNet weights: {len(sd)} tensors from {path}")


def rng_state() -> dict:
    import torch

    st = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        st["cuda"] = torch.cuda.get_rng_state_all()
    return st


def set_rng_state(st: dict) -> None:
    import torch

    random.setstate(st["python"])
    np.random.set_state(st["numpy"])
    torch.set_rng_state(st["torch"])
    if "cuda" in st and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(st["cuda"])


def load_resume_state(path: Path) -> dict:
    """The ``ckpt/last.pth`` written by :func:`save_epoch` (model, optimizer, scaler, epoch, RNG states,
    args, ...), read with ``weights_only`` plus numpy arrays/scalars (numpy's RNG state is an array):
    no code in the file runs."""
    from tools.checkpoint import load_torch_file

    st = load_torch_file(path, "training state (last.pth)", "pass --overwrite to start over", numpy=True)
    if not isinstance(st, dict) or not {"model", "optimizer", "epoch", "global_step", "rng"} <= set(st):
        raise DataError(f"training state '{path}' lacks model/optimizer/epoch/rng entries; it was not written "
                        f"by train.py. Pass --overwrite to start over.")
    return st


def epoch_batch_size(args: argparse.Namespace, epo: int) -> int:
    return args.early_batch_size if epo < args.T else args.batch_size


class RunningMeans:
    """Sums of the logged loss values since the last print (reset at prints, not at epochs)."""

    def __init__(self, names: tuple[str, ...]) -> None:
        self.names = names
        self.reset()

    def reset(self) -> None:
        self.sums = {n: 0.0 for n in self.names}
        self.count = 0

    def add(self, values: dict[str, float]) -> None:
        for n in self.names:
            self.sums[n] += float(values[n])
        self.count += 1

    def means(self) -> dict[str, float]:
        return {n: self.sums[n] / max(self.count, 1) for n in self.names}

    def state(self) -> dict:
        return {"sums": dict(self.sums), "count": self.count}

    def load(self, st: dict) -> None:
        self.sums.update(st["sums"])
        self.count = int(st["count"])


# ----------------------------------------------------------------------------------------------
def validate(net, args, paths, epo: int, logger, device) -> tuple[float, float] | None:
    """Reference in-training validation: MSF CAMs of the val list, overlays of the first 50, optional
    CRF dicts, then the threshold sweep (rank 0). Returns (best mIoU %, threshold) or None."""
    import torch

    from models.cam import crf_dict, msf_cam, save_overlays
    from models.seed_eval import eval_in_script
    from tools import dist
    from tools.io import atomic_save_npy
    from voc12.data import MSFDataset, load_cls_labels, load_image, read_id_list

    ids = read_id_list(args.val_list)
    if args.val_limit > 0:
        ids = ids[: args.val_limit]
    labels = load_cls_labels(args.cls_labels)
    mine = dist.split_for_rank(list(enumerate(ids)))
    ds = MSFDataset([i for _, i in mine], args.data_root, labels, labels_source=args.cls_labels)
    net.eval()
    dict_dir = paths["val_dict"]
    tag = epo + 1
    it = range(len(ds))
    if dist.is_main_process():
        from tqdm import tqdm

        it = tqdm(it, desc=f"val {epo:03d}", leave=False, dynamic_ncols=True)
    for j in it:
        img_id, inputs, label = ds[j]
        inputs = [torch.from_numpy(x) for x in inputs]
        cams = msf_cam(net, inputs, label, amp=args.amp)
        if args.dict:
            atomic_save_npy(dict_dir / f"{img_id}.npy", cams)
        order = mine[j][0]
        if order < 50 or args.crf:
            img = load_image(args.data_root, img_id)
            if order < 50:
                save_overlays(img, cams, paths["val"], tag, img_id)
            if args.crf:
                for a in args.alphas:
                    atomic_save_npy(paths["crf"] / f"{a:02d}" / f"{img_id}.npy", crf_dict(img, cams, a))
    dist.barrier()
    net.train()
    if not args.dict or not dist.is_main_process():
        return None
    gt_dir = Path(args.data_root) / "SegmentationClass"
    return eval_in_script(ids, dict_dir, gt_dir, logger, workers=1)


def save_epoch(net, opt, scaler, args, paths, epo: int, global_step: int, extra: dict) -> None:
    from tools.io import atomic_torch_save

    state = {k: v.detach().cpu() for k, v in net.state_dict().items()}
    atomic_torch_save(state, paths["ckpt"] / f"{epo:03d}net_main.pth")
    atomic_torch_save({"model": state, "optimizer": opt.state_dict(),
                       "scaler": scaler.state_dict() if scaler is not None else None,
                       "epoch": epo, "global_step": global_step, "rng": rng_state(),
                       "args": vars(args), **extra}, paths["last"])
    if args.keep_ckpt > 0:
        old = paths["ckpt"] / f"{epo - args.keep_ckpt:03d}net_main.pth"
        if epo - args.keep_ckpt >= 0 and old.exists():
            old.unlink()


def train(args: argparse.Namespace) -> dict[str, Any]:
    import torch
    from torch.utils.data import DataLoader
    from torch.utils.data.distributed import DistributedSampler
    from tqdm import tqdm

    from models.ktse import KTSEConfig, KTSEStep, build_optimizer, build_par
    from models.resnet38d import Net_gpp
    from tools import dist
    from tools.logging_utils import TBWriter, setup_logger
    from tools.misc import backward_step, get_device, seed_everything
    from voc12.data import ClsPairDataset, check_voc_root, load_cls_labels, read_id_list

    # From-scratch runs (--init none) are outside what the reference does (it always starts from
    # ImageNet weights with frozen BatchNorm); there the scratch-friendly settings are the default.
    scratch = str(args.init).lower() == "none"
    for flag in ("train_bn", "train_stem", "safe_ce"):
        if getattr(args, flag) is None:
            setattr(args, flag, scratch)
    dist.init_distributed_mode(args)
    main = dist.is_main_process()
    world = dist.get_world_size()
    device = get_device(args.device)
    if device.type == "cuda" and args.distributed:
        device = torch.device("cuda", args.gpu)
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    seed_everything(args.seed)

    crop = int(args.crop[0])
    if crop % 8:
        raise DataError(f"--crop {crop}: must be a multiple of 8 (two crops are stacked and compared at stride 8)")
    resize = (int(args.resize[0]), int(args.resize[1]))
    for b in (args.batch_size, args.early_batch_size):
        if b % world:
            raise DataError(f"batch size {b} is not divisible by the {world} processes (global batch is kept)")

    paths = exp_paths(args)
    resuming = args.resume and paths["last"].exists()
    if str(args.init).lower() != "none" and not resuming:
        # fail before building the 106M-parameter network
        from models.mxnet_params import RESNET38_IMAGENET_HINT  # lazy: only needed here
        from tools.errors import require_file

        if args.width != 1.0:
            raise DataError(f"--init {args.init} needs the reference width (--width 1); got --width {args.width:g}. "
                            "Use --init none for small-width toy runs.")
        require_file(args.init, "ImageNet ResNet-38 weights (MXNet .params)", RESNET38_IMAGENET_HINT)
    if main:
        paths["root"].mkdir(parents=True, exist_ok=True)
        if paths["log"].exists() and not resuming:
            paths["log"].unlink()  # reference: a fresh log per run
    dist.barrier()
    logger = setup_logger(paths["log"] if main else None, name=f"train.{args.name}")
    if not main:
        logger.setLevel(100)
    log = logger.info
    if main:
        make_exp_dirs(paths, args.alphas, log)
    if (not args.resume and not args.overwrite and paths["last"].exists()):
        raise WSSSError(f"{paths['last']} exists: pass --resume to continue that run or --overwrite to start over.")

    log("-" * 52 + " SETUP " + "-" * 52)
    for k, v in vars(args).items():
        log(f"{k} : {v}")
    log("-" * 111)
    log(f"Start experiment {args.name}!")

    # ---- data
    check_voc_root(args.data_root)
    labels = load_cls_labels(args.cls_labels)
    train_ids = read_id_list(args.train_list)
    train_set = ClsPairDataset(train_ids, args.data_root, labels, resize=resize, crop=crop, seed=args.seed,
                               labels_source=args.cls_labels)
    val_epochs = parse_val_epochs(args.val_epochs, args.max_epochs)
    if val_epochs:
        read_id_list(args.val_list)  # fail early on a missing list
    max_step = max(1, len(train_set) // 8 * args.max_epochs)  # reference formula (batch 8 throughout)

    # ---- model and optimizer (groups built before the first .train(), as the reference)
    net = Net_gpp(D=args.D, C=20, width=args.width, train_bn=args.train_bn, train_stem=args.train_stem)
    if str(args.init).lower() != "none" and not resuming:
        load_imagenet_init(net, args.init, log)
    elif str(args.init).lower() == "none":
        log("No ImageNet initialisation (--init none): training from scratch.")
    opt = build_optimizer(net, args.lr, args.wt_dec, max_step, momentum_fix=args.momentum_fix)
    log("Poly-optimizer for net_main is defined.")
    log(f"* Base learning rate : {args.lr}, 2x : {2 * args.lr}, 10x : {10 * args.lr}, 20x : {20 * args.lr}")
    log(f"Weight decaying : {args.wt_dec}, max step : {max_step}")
    net.to(device)
    net.train()
    cfg = KTSEConfig(T=args.T, TH=tuple(args.TH), W=tuple(args.W), RCAM_T=tuple(args.RCAM_T),
                     als_cross=args.als_cross, als_bg=args.als_bg, safe_ce=args.safe_ce)
    step_module = KTSEStep(net, build_par(), cfg).to(device)
    use_scaler = args.amp and device.type == "cuda"
    scaler = torch.amp.GradScaler("cuda") if use_scaler else None
    amp_dtype = torch.float16 if device.type == "cuda" else torch.bfloat16

    start_epoch, global_step = 0, 0
    history: list[str] = []
    best = -1.0
    means = RunningMeans(REF_LOG + EXTRA_LOG)
    if resuming:
        st = load_resume_state(paths["last"])
        net.load_state_dict(st["model"], strict=True)
        opt.load_state_dict(st["optimizer"])
        if scaler is not None and st.get("scaler"):
            scaler.load_state_dict(st["scaler"])
        start_epoch = int(st["epoch"]) + 1
        global_step = int(st["global_step"])
        history = list(st.get("val_history", []))
        best = float(st.get("best_miou", -1.0))
        if st.get("running"):
            means.load(st["running"])
        set_rng_state(st["rng"])
        log(f"Resumed from {paths['last']}: epoch {start_epoch:03d}, global step {global_step}")
    if args.distributed:
        from torch.nn.parallel import DistributedDataParallel as DDP

        model = DDP(step_module, device_ids=[device.index] if device.type == "cuda" else None,
                    broadcast_buffers=False)
        log("Networks are uploaded on multi-gpu.")
    else:
        model = step_module
    tb = TBWriter(paths["tb"], enabled=main)

    log("-" * 49 + " Start Train " + "-" * 49)
    t_start = time.time()
    last_logs: dict[str, float] = {}
    for epo in range(start_epoch, args.max_epochs):
        log(f"Epoch {epo:03d} train")
        log("Phase : train")
        net.train()
        gbatch = epoch_batch_size(args, epo)
        train_set.set_epoch(epo)
        # Seeded per-epoch shuffle (also in single-process runs) so a resumed run sees the same order.
        sampler = DistributedSampler(train_set, num_replicas=world, rank=dist.get_rank(), shuffle=True,
                                     seed=args.seed, drop_last=True)
        sampler.set_epoch(epo)
        loader = DataLoader(train_set, batch_size=gbatch // world, sampler=sampler, drop_last=True,
                            num_workers=args.workers, pin_memory=device.type == "cuda",
                            persistent_workers=False)
        n_iter = len(loader) if args.epoch_iters <= 0 else min(len(loader), args.epoch_iters)
        if n_iter == 0:
            raise DataError(f"{len(train_set)} training images give no full batch of {gbatch}: "
                            "lower --batch_size/--early_batch_size or add images.")
        bar = tqdm(total=n_iter, desc=f"epoch {epo:03d}", disable=not main, dynamic_ncols=True, leave=False)
        epoch_sums: dict[str, float] = {}
        for i, batch in enumerate(loader):
            if i >= n_iter:
                break
            img = batch["img_a"].to(device, non_blocking=True)
            img2 = batch["img_a2"].to(device, non_blocking=True)
            y = batch["label"].to(device, non_blocking=True)
            y2 = batch["label2"].to(device, non_blocking=True)
            opt.zero_grad(set_to_none=True)
            with torch.autocast(device_type=device.type, dtype=amp_dtype, enabled=args.amp):
                out = model(img, img2, y, y2, epo)
            loss = out["loss"]
            if not torch.isfinite(loss.detach()):
                bad = [k for k in REF_LOG + EXTRA_LOG if not math.isfinite(float(out[k]))]
                raise WSSSError(f"non-finite loss at epoch {epo}, step {global_step} (terms: {', '.join(bad)}). "
                                "A batch whose pseudo labels hold no background pixel gives a NaN cross-entropy "
                                "(reference behaviour); rerun with --safe_ce true to count it as 0.")
            backward_step(loss, opt, scaler)
            global_step += 1
            vals = {k: float(out[k]) for k in REF_LOG + EXTRA_LOG}
            means.add(vals)
            for k, v in vals.items():
                epoch_sums[k] = epoch_sums.get(k, 0.0) + v
            bar.update(1)
            bar.set_postfix(loss=f"{vals['loss_cls']:.4f}", lr=f"{opt.param_groups[0]['lr']:.2e}")
            if global_step % args.print_freq == 0:
                m = means.means()
                log(", ".join(f"{k} : {round(m[k], 5)}" for k in REF_LOG) + " | "
                    + ", ".join(f"{k} : {round(m[k], 5)}" for k in EXTRA_LOG))
                tb.scalars(m, global_step, prefix="train/")
                tb.scalar("train/lr", opt.param_groups[0]["lr"], global_step)
                means.reset()
        bar.close()
        last_logs = {k: v / n_iter for k, v in epoch_sums.items()}
        log(f"Epoch {epo:03d} means: " + ", ".join(f"{k} : {round(v, 5)}" for k, v in last_logs.items())
            + f" | lr {opt.param_groups[0]['lr']:.6g} | {time.time() - t_start:.0f}s")
        tb.scalars(last_logs, epo, prefix="epoch/")

        if epo in val_epochs:
            res = validate(net, args, paths, epo, logger, device)
            if res is not None:
                miou, th = res
                history.append(f"{miou:.3f}")
                log(f"Epoch {epo:03d} max miou : {round(miou, 3)} at {round(th, 3)}")
                log(str(history))
                tb.scalar("val/cam_miou", miou, epo)
                if miou > best:
                    best = miou
                    log("New record!")
        if main:
            save_epoch(net, opt, scaler, args, paths, epo, global_step,
                       {"val_history": history, "best_miou": best, "running": means.state()})
            log(f"Epoch {epo:03d} model is saved!")
        dist.barrier()
    tb.close()
    return {"epochs": args.max_epochs, "global_step": global_step, "last": last_logs, "val_history": history,
            "best_miou": best, "seconds": time.time() - t_start}


def check_inputs(args: argparse.Namespace) -> None:
    """Raise ONE error naming every missing input of this run (VOC images, lists, labels, the ImageNet
    weights of a fresh run, ground truth for validation) before anything is built or written."""
    from voc12.data import LABELS_HINT, VOC_HINT

    resuming = args.resume and exp_paths(args)["last"].exists()
    init = None
    hint = ""
    if str(args.init).lower() != "none" and not resuming:
        from models.mxnet_params import RESNET38_IMAGENET_HINT as hint  # lazy: only needed here

        init = args.init
    validating = bool(parse_val_epochs(args.val_epochs, args.max_epochs))
    require_all([
        (Path(args.data_root) / "JPEGImages", "VOC JPEGImages folder (--data_root)", VOC_HINT, "dir"),
        (args.train_list, "training list (--train_list)", LABELS_HINT),
        (args.cls_labels, "class-label file (--cls_labels)", LABELS_HINT),
        (args.val_list if validating else None, "validation list (--val_list)", LABELS_HINT),
        (Path(args.data_root) / "SegmentationClass" if validating and args.dict else None,
         "VOC ground-truth folder for validation", VOC_HINT + " (or pass --val_epochs none)", "dir"),
        (init, "ImageNet ResNet-38 weights (MXNet .params, --init)", hint),
    ], context="before training started")


def _checked_train(args: argparse.Namespace) -> dict[str, Any]:
    check_inputs(args)
    return train(args)


def main(argv: list[str] | None = None) -> int:
    return run_cli(_checked_train, build_parser().parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
