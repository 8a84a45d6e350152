"""Stage one training (KTSE+): the setup, the epoch loop and its pieces; ``train.py`` holds the flags.

:func:`train` builds the data, ``Net_gpp`` (ImageNet init), the optimizer and the KTSE step, resumes from
``ckpt/last.pth`` when asked, and runs :func:`train_one_epoch` per epoch, with the reference's in-training
CAM validation (:func:`validate`) and a checkpoint per epoch (:func:`save_epoch`: the reference
``<epo:03d>net_main.pth`` plain state_dict plus the resumable ``last.pth``). Device/DDP, AMP, the training
state with its RNG and keep-last-N come from :mod:`tools.runtime` and :mod:`tools.train_state`.
"""
from __future__ import annotations

import argparse
import math
import time
from pathlib import Path
from typing import Any

from tools.errors import DataError, WSSSError
from tools.layout import TRAIN_SUBDIRS, StageOneLayout

#: the MXNet ImageNet ResNet-38 weights a fresh run starts from (``--init``)
DEFAULT_INIT = "pretrained/ilsvrc-cls_rna-a1_cls1000_ep-0001.params"
#: epochs (0-based) after which the reference runs its CAM validation
REFERENCE_VAL_EPOCHS = (11, 21, 31, 38, 39)
#: the per-epoch weights ``<epo:03d>net_main.pth`` (group: the epoch)
EPOCH_CKPT_RE = r"(\d+)net_main\.pth"


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


def exp_paths(args: argparse.Namespace) -> StageOneLayout:
    return StageOneLayout.of(args.exp_root, args.name)


def dataset_args(args: argparse.Namespace):
    """Fill ``--data_root``, ``--cls_labels``, ``--train_list`` and ``--val_list`` left unset from the
    ``--dataset`` descriptor (VOC: the reference defaults); returns the descriptor."""
    from tools.dataset import fill_dataset_defaults

    return fill_dataset_defaults(args, "data_root", cls_labels="cls_labels", train_list="train_list",
                                 val_list="seed_list")


def make_exp_dirs(paths: StageOneLayout, alphas: list[int], log) -> None:
    """Reference tree (ckpt/ train/ val/ infer/ dict/ crf/<alpha>) plus tb/ and val_dict/."""
    log(f"{paths.root} already exsits." if paths.root.exists() else f"{paths.root} is built.")
    paths.make(alphas, TRAIN_SUBDIRS)


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


def load_resume_state(path: Path) -> dict:
    """The ``ckpt/last.pth`` written by :func:`save_epoch` (model, optimizer, scaler, epoch, RNG states,
    args, ...), read with ``weights_only`` plus numpy arrays/scalars (numpy's RNG state is an array):
    no code in the file runs."""
    from tools.train_state import load_training_state

    return load_training_state(path, "training state (last.pth)", "pass --overwrite to start over",
                               required=("model", "optimizer", "epoch", "global_step", "rng"),
                               written_by="train.py")


def epoch_batch_size(args: argparse.Namespace, epo: int) -> int:
    return args.early_batch_size if epo < args.T else args.batch_size


class RunningMeans:
    """Sums of the logged loss values since the last print (reset at prints, not at epochs). The names are
    those the step returns, in its order (a term seen for the first time joins with its sum so far)."""

    def __init__(self, names: tuple[str, ...] = ()) -> None:
        self.sums = {n: 0.0 for n in names}
        self.reset()

    def reset(self) -> None:
        self.sums = {n: 0.0 for n in self.sums}
        self.count = 0

    def add(self, values: dict[str, float]) -> None:
        for n, v in values.items():
            self.sums[n] = self.sums.get(n, 0.0) + float(v)
        self.count += 1

    def means(self) -> dict[str, float]:
        return {n: s / max(self.count, 1) for n, s in self.sums.items()}

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
    from tools.seed_eval import eval_in_script
    from tools import dist
    from tools.io import atomic_save_npy
    from voc12.data import MSFDataset, load_cls_labels, load_image, read_id_list

    info = dataset_args(args)
    ids = read_id_list(args.val_list)
    if args.val_limit > 0:
        ids = ids[: args.val_limit]
    labels = load_cls_labels(args.cls_labels, info)
    mine = dist.split_for_rank(list(enumerate(ids)))
    ds = MSFDataset([i for _, i in mine], args.data_root, labels, labels_source=args.cls_labels, dataset=info)
    net.eval()
    dict_dir = paths.val_dict
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
            img = load_image(args.data_root, img_id, info)
            if order < 50:
                save_overlays(img, cams, paths.val, tag, img_id, class_names=info.class_names)
            if args.crf:
                for a in args.alphas:
                    atomic_save_npy(paths.crf(a) / f"{img_id}.npy", crf_dict(img, cams, a))
    dist.barrier()
    net.train()
    if not args.dict or not dist.is_main_process():
        return None
    return eval_in_script(ids, dict_dir, info.gt_dir(args.data_root), logger, workers=1, dataset=info)


def save_epoch(net, opt, scaler, args, paths, epo: int, global_step: int, extra: dict) -> None:
    """``ckpt/<epo:03d>net_main.pth`` (plain state_dict, the reference format) and the resumable
    ``ckpt/last.pth`` (model, optimizer, scaler, epoch, step, RNG states, args, ``extra``); with
    ``--keep_ckpt N`` only the newest N epoch files stay."""
    from tools.io import atomic_torch_save
    from tools.train_state import keep_last, numbered_files, save_training_state

    state = {k: v.detach().cpu() for k, v in net.state_dict().items()}
    atomic_torch_save(state, paths.checkpoint(epo))
    save_training_state(paths.last, {"model": state, "optimizer": opt.state_dict(),
                                     "scaler": scaler.state_dict() if scaler is not None else None,
                                     "epoch": epo, "global_step": global_step, "args": vars(args), **extra})
    keep_last(numbered_files(paths.checkpoint(epo).parent, EPOCH_CKPT_RE), epo, args.keep_ckpt)


def train_one_epoch(model, opt, scaler, autocast, loader, n_iter: int, epo: int, global_step: int,
                    means: "RunningMeans", args: argparse.Namespace, device, log, tb, main: bool
                    ) -> tuple[int, dict[str, float]]:
    """One epoch of stage-one training: ``n_iter`` batches of ``loader`` through the KTSE step ``model``
    (under ``autocast()``), backward and optimizer step (through ``scaler`` when given), the running-mean
    log line every ``--print_freq`` global steps. Returns the new global step and the epoch's mean of
    each logged loss term."""
    import torch
    from tqdm import tqdm

    from models.ktse import logged_terms, loss_log_line
    from tools.misc import backward_step
    from tools.runtime import to_device

    bar = tqdm(total=n_iter, desc=f"epoch {epo:03d}", disable=not main, dynamic_ncols=True, leave=False)
    epoch_sums: dict[str, float] = {}
    for i, batch in enumerate(loader):
        if i >= n_iter:
            break
        cl = getattr(args, "channels_last", False)
        img = to_device(batch["img_a"], device, cl)
        img2 = to_device(batch["img_a2"], device, cl)
        y = to_device(batch["label"], device)
        y2 = to_device(batch["label2"], device)
        opt.zero_grad(set_to_none=True)
        with autocast():
            out = model(img, img2, y, y2, epo)
        loss = out["loss"]
        if not torch.isfinite(loss.detach()):
            bad = [k for k, v in logged_terms(out).items() if not math.isfinite(v)]
            raise WSSSError(f"non-finite loss at epoch {epo}, step {global_step} (terms: {', '.join(bad)}). "
                            "A batch whose pseudo labels hold no background pixel gives a NaN cross-entropy "
                            "(reference behaviour); rerun with --safe_ce true to count it as 0.")
        backward_step(loss, opt, scaler)
        global_step += 1
        vals = logged_terms(out)  # whatever terms the step returns
        means.add(vals)
        for k, v in vals.items():
            epoch_sums[k] = epoch_sums.get(k, 0.0) + v
        bar.update(1)
        bar.set_postfix(loss=f"{float(loss.detach()):.4f}", lr=f"{opt.param_groups[0]['lr']:.2e}")
        if global_step % args.print_freq == 0:
            m = means.means()
            log(loss_log_line(m))
            tb.scalars(m, global_step, prefix="train/")
            tb.scalar("train/lr", opt.param_groups[0]["lr"], global_step)
            means.reset()
    bar.close()
    return global_step, {k: v / n_iter for k, v in epoch_sums.items()}


def train(args: argparse.Namespace) -> dict[str, Any]:
    """Stage-one training as ``train.py`` runs it (``args``: its parsed flags). Returns the final
    global step, the last epoch's loss means, the validation history and the best CAM mIoU."""
    import torch
    from torch.utils.data import DataLoader
    from torch.utils.data.distributed import DistributedSampler

    from models.ktse import build_optimizer
    from models.registry import get_model
    from tools import dist
    from tools.logging_utils import TBWriter, setup_logger
    from tools.misc import seed_everything
    from tools.runtime import amp_setup, loader_kwargs, prepare_module, set_backends, setup_runtime
    from tools.train_state import set_rng_state
    from voc12.data import ClsPairDataset, check_voc_root, load_cls_labels, read_id_list

    # From-scratch runs (--init none) are outside what the reference does (it always starts from
    # ImageNet weights with frozen BatchNorm); there the scratch-friendly settings are the default.
    info = dataset_args(args)
    scratch = str(args.init).lower() == "none"
    for flag in ("train_bn", "train_stem", "safe_ce"):
        if getattr(args, flag) is None:
            setattr(args, flag, scratch)
    rt = setup_runtime(args)
    main, world, device = rt.is_main, rt.world_size, rt.device
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    set_backends(device, benchmark=getattr(args, "cudnn_benchmark", False))
    seed_everything(args.seed)

    crop = int(args.crop[0])
    if crop % 8:
        raise DataError(f"--crop {crop}: must be a multiple of 8 (two crops are stacked and compared at stride 8)")
    resize = (int(args.resize[0]), int(args.resize[1]))
    for b in (args.batch_size, args.early_batch_size):
        if b % world:
            raise DataError(f"batch size {b} is not divisible by the {world} processes (global batch is kept)")

    paths = exp_paths(args)
    resuming = args.resume and paths.last.exists()
    if str(args.init).lower() != "none" and not resuming:
        # fail before building the 106M-parameter network
        from models.mxnet_params import RESNET38_IMAGENET_HINT  # lazy: only needed here
        from tools.errors import require_file

        if args.width != 1.0:
            raise DataError(f"--init {args.init} needs the reference width (--width 1); got --width {args.width:g}. "
                            "Use --init none for small-width toy runs.")
        require_file(args.init, "ImageNet ResNet-38 weights (MXNet .params)", RESNET38_IMAGENET_HINT)
    if main:
        paths.root.mkdir(parents=True, exist_ok=True)
        if paths.log.exists() and not resuming:
            paths.log.unlink()  # reference: a fresh log per run
    dist.barrier()
    logger = setup_logger(paths.log if main else None, name=f"train.{args.name}")
    if not main:
        logger.setLevel(100)
    log = logger.info
    if main:
        make_exp_dirs(paths, args.alphas, log)
    if (not args.resume and not args.overwrite and paths.last.exists()):
        raise WSSSError(f"{paths.last} exists: pass --resume to continue that run or --overwrite to start over.")

    log("-" * 52 + " SETUP " + "-" * 52)
    for k, v in vars(args).items():
        log(f"{k} : {v}")
    log("-" * 111)
    log(f"Start experiment {args.name}!")

    # ---- data
    check_voc_root(args.data_root, info)
    labels = load_cls_labels(args.cls_labels, info)
    train_ids = read_id_list(args.train_list)
    train_set = ClsPairDataset(train_ids, args.data_root, labels, resize=resize, crop=crop, seed=args.seed,
                               labels_source=args.cls_labels, dataset=info)
    val_epochs = parse_val_epochs(args.val_epochs, args.max_epochs)
    if val_epochs:
        read_id_list(args.val_list)  # fail early on a missing list
    max_step = max(1, len(train_set) // 8 * args.max_epochs)  # reference formula (batch 8 throughout)

    # ---- model and optimizer (groups built before the first .train(), as the reference)
    method = get_model(args.model)
    net = method.build_network(D=args.D, C=info.num_fg, width=args.width, train_bn=args.train_bn, train_stem=args.train_stem)
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
    step_module = method.build_step(net, args).to(device)  # its loss settings from the flags (KTSEConfig.from_flags)
    autocast, scaler = amp_setup(device, args.amp, getattr(args, "amp_dtype", "auto"))

    start_epoch, global_step = 0, 0
    history: list[str] = []
    best = -1.0
    means = RunningMeans()
    if resuming:
        st = load_resume_state(paths.last)
        from tools.checkpoint import load_state_dict_checked

        # a run resumed with another --width/--D/--model: one error naming the file and the keys
        load_state_dict_checked(net, st["model"], what=f"training state '{paths.last}' (made with other "
                                                       "--width/--D/--model settings? --overwrite starts over)")
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
        log(f"Resumed from {paths.last}: epoch {start_epoch:03d}, global step {global_step}")
    # channels_last before DDP (its gradient buckets follow the parameters' layout), compile after
    cl, compiled = getattr(args, "channels_last", False), getattr(args, "compile", False)
    prepare_module(step_module, device, channels_last=cl)
    if args.distributed:
        from torch.nn.parallel import DistributedDataParallel as DDP

        model = DDP(step_module, device_ids=[device.index] if device.type == "cuda" else None,
                    broadcast_buffers=False)
        log("Networks are uploaded on multi-gpu.")
    else:
        model = step_module
    model = prepare_module(model, device, compile=compiled)  # checkpoints keep using ``net``
    tb = TBWriter(paths.tb, enabled=main)

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
                            **loader_kwargs(device, args.workers, getattr(args, "persistent_workers", False)))
        n_iter = len(loader) if args.epoch_iters <= 0 else min(len(loader), args.epoch_iters)
        if n_iter == 0:
            raise DataError(f"{len(train_set)} training images give no full batch of {gbatch}: "
                            "lower --batch_size/--early_batch_size or add images.")
        global_step, last_logs = train_one_epoch(model, opt, scaler, autocast, loader, n_iter, epo, global_step,
                                                 means, args, device, log, tb, main)
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
