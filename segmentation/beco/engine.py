"""BECO's training and evaluation engine: model building, the training loop body, evaluation, test.

``segmentation/main.py`` calls :func:`cli_main`, which parses the flags (:mod:`segmentation.beco.config`) and runs :func:`launch`.
Device, DDP, AMP, the launcher and the poly learning rate come from :mod:`tools.runtime`; the
per-epoch reseeding (the RNG policy that makes a resumed run repeat the same epochs) from
:mod:`tools.train_state`. The checkpoint files keep the reference layout: ``best_ckpt.pth`` =
``{'net_state_dict': {network1, network2}}`` and ``ckpt_epoch_<E>.pth`` (newest only).
"""
from __future__ import annotations

import argparse
import contextlib
import os
import random
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, Subset

from segmentation.beco.config import dataset_defaults, resolve_lists
from tools.dataset import dataset_of
from segmentation.beco.datasets import PseudoMaskTrainSet, ResizedValSet
from segmentation.beco.deeplabv2 import build_deeplabv2
from segmentation.beco.model import BECO, BECOSettings, unwrap
from tools import dist as tdist
from tools.checkpoint import load_state_dict_checked, load_torch_file
from tools.errors import WSSSError, run_cli
from tools.io import atomic_save_npy, atomic_torch_save, atomic_write_json
from tools.logging_utils import TBWriter, setup_logger
from tools.layout import BECOLayout
from tools.metrics import confusion_matrix, metrics_record, present_class_scores, write_metrics
from tools.misc import backward_step
from tools.runtime import (PolySchedule, amp_setup, loader_kwargs, poly_sgd, prepare_module, select_device,
                           set_backends, spawn_per_gpu, to_device)
from tools.train_state import keep_last, numbered_files, reseed_epoch, save_training_state
from voc12.data import read_id_list

#: the logger name the reference prints in its final test line
LOGGER_NAME = "segmentation.main"
# the logging folder's file names (tools.layout.BECOLayout)
CKPT_EPOCH_RE, RUN_MARKERS, RUN_OUTPUTS = BECOLayout.CKPT_EPOCH_RE, BECOLayout.RUN_MARKERS, BECOLayout.RUN_OUTPUTS



# ----------------------------------------------------------------------------------------------- helpers
def logging_dir(args: argparse.Namespace) -> Path:
    name = args.logging_tag + args.run_id
    return BECOLayout.of(args.logging_path_base, name if name else time.strftime("%y%m%d_%H%M%S")).logdir


def metrics_of(sc: dict[str, Any], n_images: int, **extra: Any) -> dict[str, Any]:
    """The metrics record (tools.metrics) of one :func:`evaluate` result: SimSegMetrics' mIoU over the
    classes present in the ground truth, in percent, with its class and prediction accuracies."""
    return metrics_record(sc["confusion_matrix"], "gt", eps=1e-5, n_images=n_images,
                          mclass_acc=sc["mclass_acc"] * 100, mpred_acc=sc["mpred_acc"] * 100, **extra)


def existing_run(logdir: Path) -> list[Path]:
    """The files in ``logdir`` that show a training run was there (checkpoints, best_ckpt, metrics)."""
    return sorted(f for pat in RUN_MARKERS for f in logdir.glob(pat))


def guard_logging_dir(args: argparse.Namespace) -> None:
    """Before training: refuse a logging folder that already holds a run unless ``--resume`` (continue
    it) or ``--overwrite`` (start again: that run's checkpoints, markers, metrics, logits and
    predictions are deleted first, by the main process only). ``--test`` is not concerned."""
    if args.test or not (args.logging_tag + args.run_id):
        return  # a timestamped folder is new
    logdir = logging_dir(args)
    found = existing_run(logdir)
    if not found:
        return
    if args.resume is None and not args.overwrite:
        raise WSSSError(f"logging folder '{logdir}' already holds a BECO run ({', '.join(f.name for f in found)}); "
                        "pass --resume to continue it, or --overwrite to train again from scratch "
                        "(deletes its checkpoints, metrics and logits)")
    if args.overwrite and os.environ.get("RANK", "0") == "0":
        for pat in RUN_OUTPUTS:
            for f in logdir.glob(pat):
                shutil.rmtree(f) if f.is_dir() else f.unlink()


def settings_from(args: argparse.Namespace) -> BECOSettings:
    return BECOSettings.from_mapping(vars(args))


def build_model(args: argparse.Namespace, load_imagenet: bool = True) -> BECO:
    pre = args.pretrained if load_imagenet else None
    nets = [build_deeplabv2(args.num_classes, args.backbone, args.output_stride, args.aspp_rates,
                            args.backbone_width, pre) for _ in range(2)]
    return BECO(nets[0], nets[1], settings_from(args))


def eval_autocast(args: argparse.Namespace, train_autocast):
    """The autocast factory for validation/test: fp32 (a null context) as the reference, which wraps
    only its training step in autocast; the training one with ``--amp_eval``."""
    return train_autocast if getattr(args, "amp_eval", False) else contextlib.nullcontext


def _worker_init(worker_id: int) -> None:
    s = torch.initial_seed() % (2 ** 32)
    np.random.seed(s)
    random.seed(s)


def all_reduce_sum(arr: np.ndarray) -> np.ndarray:
    if not tdist.is_dist():
        return arr
    t = torch.from_numpy(np.ascontiguousarray(arr))
    if dist.get_backend() == "nccl":
        t = t.cuda()
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t.cpu().numpy()


def metric_line(s: dict[str, Any]) -> str:
    """The reference's metric string (fractions rounded to 5 digits)."""
    return (f"Overall_Acc:{round(s['overall_acc'], 5)}, mClass_Acc:{round(s['mclass_acc'], 5)}, "
            f"mPred_Acc:{round(s['mpred_acc'], 5)}, mIoU:{round(s['miou'], 5)}, ")


def eval_loader(args: argparse.Namespace, device: torch.device) -> DataLoader:
    ids = read_id_list(args.val_list)
    ds = ResizedValSet(args.data_root, ids, args.val_size, args.val_label_folder, dataset=dataset_of(args))
    # Interleaved share per rank without padding: no duplicated images bias the metric.
    idx = tdist.split_for_rank(list(range(len(ds))))
    return DataLoader(Subset(ds, idx), batch_size=1, shuffle=False, **loader_kwargs(device, min(args.num_workers, 2)))


@torch.no_grad()
def evaluate(model: BECO, loader: DataLoader, device: torch.device, num_classes: int, autocast,
             logits_dir: Path | None = None, desc: str = "val") -> dict[str, Any]:
    """Score the two-net prediction (single-scale logits); with ``logits_dir`` also write each image's
    ``test_forward`` pre-logits (MSC max when enabled) as ``<id>.npy`` float32 (C,h,w)."""
    from tqdm import tqdm

    model.eval()
    hist = np.zeros((num_classes, num_classes), dtype=np.int64)
    for img, lab, names in tqdm(loader, desc=desc, disable=not tdist.is_main_process(), leave=False,
                                dynamic_ncols=True):
        img = img.to(device, non_blocking=True)
        with autocast():
            if logits_dir is None:
                logits = model.predict(img)
            else:
                logits, pre = model.test_forward(img)
        if logits_dir is not None:
            for b, name in enumerate(names):
                atomic_save_npy(logits_dir / f"{name}.npy", pre[b].float().cpu().numpy().astype(np.float32),
                                allow_pickle=False)
        pred = logits.float().argmax(1).cpu().numpy()
        hist += confusion_matrix(pred, lab.numpy(), num_classes, 255)
    hist = all_reduce_sum(hist)
    out = present_class_scores(hist)
    out["confusion_matrix"] = hist
    return out


def wrap_ddp(model: BECO, device: torch.device, sync_bn: bool = False) -> BECO:
    """Wrap each network in DDP in place (as the reference: two DDP modules, one optimizer).
    ``sync_bn`` converts BatchNorm to SyncBatchNorm first (GPU only; the reference leaves it off)."""
    ids = [device.index] if device.type == "cuda" else None
    for k in ("network1", "network2"):
        net = getattr(model, k)
        if sync_bn:
            net = torch.nn.SyncBatchNorm.convert_sync_batchnorm(net)
        setattr(model, k, torch.nn.parallel.DistributedDataParallel(net, device_ids=ids))
    return model


def build_optimizer(model: BECO, lr: float, momentum: float, weight_decay: float) -> torch.optim.SGD:
    """SGD with two parameter groups (network1, network2), same settings for all. BECO's reference uses
    real momentum (no weight-decay-as-momentum quirk)."""
    return poly_sgd([{"params": unwrap(model.network1).parameters()},
                     {"params": unwrap(model.network2).parameters()}],
                    lr=lr, weight_decay=weight_decay, momentum=momentum, momentum_quirk=False)


def train_step(model: BECO, optimizer: torch.optim.Optimizer, img: torch.Tensor, label: torch.Tensor,
               mask: torch.Tensor, autocast=contextlib.nullcontext, scaler=None) -> dict[str, torch.Tensor]:
    """One optimisation step on a batch (one backward through both nets, one optimizer step)."""
    losses = model.train_step(img, label, mask, autocast())
    optimizer.zero_grad(set_to_none=True)
    backward_step(losses["loss"], optimizer, scaler)
    return losses


def load_nets(model: BECO, ckpt: dict, path: str) -> None:
    nets = ckpt.get("net_state_dict") if isinstance(ckpt, dict) else None
    if not isinstance(nets, dict) or not any(k in nets for k in ("network1", "network2")):
        raise WSSSError(f"checkpoint '{path}' has no net_state_dict with network1/network2 "
                        "(expected the BECO layout {'net_state_dict': {'network1': sd, 'network2': sd}})")
    for k in ("network1", "network2"):
        if k in nets:
            load_state_dict_checked(unwrap(getattr(model, k)), nets[k], strict=True, what=f"{path} [{k}]")


def find_resume(args: argparse.Namespace, logdir: Path) -> Path | None:
    if args.resume not in (None, "auto"):
        return Path(args.resume)
    cks = numbered_files(logdir, CKPT_EPOCH_RE)
    return cks[-1][1] if cks else None


# ----------------------------------------------------------------------------------------------- run
def run(args: argparse.Namespace) -> dict[str, Any]:
    """Everything one process does (rank from tools.dist); returns the final test scores."""
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    rank = tdist.get_rank()
    main_proc = tdist.is_main_process()
    device = select_device(args.device, args.gpu if tdist.is_dist() else None)
    # as the reference: TF32 on, cudnn.benchmark unless --determ
    set_backends(device, benchmark=not args.determ, deterministic=bool(args.determ), tf32=True)
    dataset_defaults(args)
    resolve_lists(args)
    logdir = logging_dir(args)
    if main_proc:
        logdir.mkdir(parents=True, exist_ok=True)
    tdist.barrier()
    logger = setup_logger(BECOLayout(logdir).log if main_proc else None, LOGGER_NAME)
    if not main_proc:
        logger.disabled = True
    tb = TBWriter(logdir, enabled=main_proc)
    reseed_epoch(args.seed, -1, rank)
    autocast, scaler = amp_setup(device, args.amp, getattr(args, "amp_dtype", "auto"))
    eval_ac = eval_autocast(args, autocast)

    ckpt_path = args.ckpt
    resume_path = None
    if not args.test and args.resume is not None:
        resume_path = find_resume(args, logdir)
        if resume_path is None:
            logger.info(f"--resume: no ckpt_epoch_*.pth in {logdir}; starting from scratch")
        else:
            ckpt_path = str(resume_path)
    # ImageNet init only for a fresh training run (testing needs only the val data and --ckpt).
    model = build_model(args, load_imagenet=not args.test and ckpt_path is None)
    model.to(device)
    for k in ("network1", "network2"):  # in place, before DDP; checkpoint keys are unchanged
        prepare_module(getattr(model, k), device, getattr(args, "channels_last", False),
                       compile=getattr(args, "compile", False) and not args.test)
    ckpt = None
    if ckpt_path is not None:
        ckpt = load_torch_file(ckpt_path, "BECO checkpoint",
                               "a best_ckpt.pth / ckpt_epoch_<E>.pth written by main.py, or the released best_ckpt_752.pth")
        load_nets(model, ckpt, ckpt_path)
        logger.info(f"loaded networks from {ckpt_path}")
    if args.test:
        if ckpt_path is None:
            raise WSSSError("--test needs --ckpt <file> (e.g. best_ckpt_752.pth or <logdir>/best_ckpt.pth)")
        return run_test(args, model, device, logdir, eval_ac, logger)

    if tdist.is_dist():
        if args.sync_bn and device.type == "cpu":
            logger.info("--sync_bn: SyncBatchNorm needs GPUs; BatchNorm stays per process on CPU")
        wrap_ddp(model, device, sync_bn=args.sync_bn and device.type != "cpu")

    train_ids = read_id_list(args.train_list)
    train_set = PseudoMaskTrainSet(args.data_root, train_ids, args.sem_seg_dir, args.mask_dir, args.crop_size,
                                   args.crop_scale, args.crop_ratio, dataset=dataset_of(args))
    gen = torch.Generator()
    if tdist.is_dist():
        sampler = torch.utils.data.distributed.DistributedSampler(train_set, shuffle=True, seed=args.seed,
                                                                  drop_last=True)
    else:
        sampler = torch.utils.data.RandomSampler(train_set, generator=gen)
    loader = DataLoader(train_set, batch_size=args.batch_size, sampler=sampler, drop_last=True,
                        worker_init_fn=_worker_init, generator=gen,
                        **loader_kwargs(device, args.num_workers, getattr(args, "persistent_workers", False)))
    if len(loader) == 0:
        raise WSSSError(f"training list {args.train_list} has {len(train_set)} ids: fewer than one batch of "
                        f"{args.batch_size} per process x {tdist.get_world_size()} process(es)")
    val_loader = eval_loader(args, device)
    max_iters = args.max_epoch * len(loader)
    optimizer = build_optimizer(model, args.lr, args.momentum, args.weight_decay)

    schedule = PolySchedule([args.lr] * len(optimizer.param_groups), max_iters, args.lr_power, args.min_lr)

    start_epoch, global_iter, best, history = 0, 0, -1.0, []
    if ckpt is not None and "optim_state_dict" in ckpt:
        optimizer.load_state_dict(ckpt["optim_state_dict"])
        run_state = ckpt.get("runner_state_dict", {})
        start_epoch = int(run_state.get("epoch", 0))
        global_iter = int(run_state.get("iter", 0))
        best = float(run_state.get("best_miou", -1.0))
        history = list(run_state.get("history", []))
        model.epoch = int(ckpt.get("model_state_dict", {}).get("epoch", start_epoch))  # the warm-up counter resumes too (the reference restarts it)
        if scaler is not None and ckpt.get("scaler_state_dict"):
            scaler.load_state_dict(ckpt["scaler_state_dict"])
        logger.info(f"resumed from {ckpt_path}: epoch {start_epoch}, iteration {global_iter}, "
                    f"warm-up counter {model.epoch}")
    if main_proc:
        atomic_write_json(BECOLayout(logdir).config, {k: v for k, v in vars(args).items() if k != "cli_keys"})
        logger.info(f"BECO training: {len(train_set)} images, {len(loader)} iterations/epoch x {args.max_epoch} "
                    f"epochs, world size {tdist.get_world_size()}, device {device}, logging to {logdir}")

    from tqdm import tqdm

    for epoch in range(start_epoch, args.max_epoch):
        s = reseed_epoch(args.seed, epoch, rank)
        model.reseed_aug(s)
        gen.manual_seed(s)
        if isinstance(sampler, torch.utils.data.distributed.DistributedSampler):
            sampler.set_epoch(epoch)
        model.train()
        bar = tqdm(loader, desc=f"epoch {epoch + 1}/{args.max_epoch}", disable=not main_proc, leave=False,
                   dynamic_ncols=True)
        for inner, (img, lab, msk, _) in enumerate(bar):
            schedule.apply(optimizer, global_iter)
            img = to_device(img, device, getattr(args, "channels_last", False))
            lab, msk = to_device(lab, device), to_device(msk, device)
            losses = train_step(model, optimizer, img, lab, msk, autocast, scaler)
            global_iter += 1
            if main_proc:
                vals = {k: float(v.detach()) for k, v in losses.items()}
                bar.set_postfix(loss=f"{vals['loss']:.4f}")
                tb.scalars(vals, global_iter, "train/")
                tb.scalar("train/lr", optimizer.param_groups[0]["lr"], global_iter)
                if args.log_every and global_iter % args.log_every == 0:
                    logger.info(f"epoch {epoch + 1} iter {global_iter}/{max_iters} lr "
                                f"{optimizer.param_groups[0]['lr']:.6f} " +
                                " ".join(f"{k} {v:.4f}" for k, v in vals.items()))
        model.epoch += 1
        sc = evaluate(model, val_loader, device, args.num_classes, eval_ac, desc="val")
        history.append({"epoch": epoch + 1, "iter": global_iter,
                        **{k: sc[k] for k in ("overall_acc", "mclass_acc", "mpred_acc", "miou")}})
        if main_proc:
            logger.info(f"epoch {epoch + 1} val: {metric_line(sc)}")
            tb.scalars({k: sc[k] for k in ("overall_acc", "mclass_acc", "mpred_acc", "miou")}, epoch + 1, "val/")
            improved = sc["miou"] > best
            if improved:
                best = sc["miou"]
                atomic_torch_save({"net_state_dict": model.nets_state_dict()}, BECOLayout(logdir).best_ckpt)
                for old in BECOLayout(logdir).best_markers:
                    old.unlink()
                BECOLayout(logdir).best_marker(best * 100).touch()
            state = {
                "net_state_dict": model.nets_state_dict(),
                "optim_state_dict": optimizer.state_dict(),
                "sched_state_dict": {"last_epoch": global_iter, "max_iters": max_iters},
                "scaler_state_dict": scaler.state_dict() if scaler is not None else None,
                "model_state_dict": {"epoch": model.epoch},
                "runner_state_dict": {"epoch": epoch + 1, "iter": global_iter, "inner_iter": 0, "buffer": {},
                                      "best_miou": best, "history": history},
            }
            # reference layout (no RNG entry: this trainer reseeds every epoch), newest only
            save_training_state(BECOLayout(logdir).ckpt_epoch(epoch + 1), state, rng=False)
            keep_last(numbered_files(logdir, CKPT_EPOCH_RE), epoch + 1, 1)
            pct = ("overall_acc", "mclass_acc", "mpred_acc", "miou")
            write_metrics(BECOLayout(logdir).metrics, metrics_of(
                sc, len(val_loader.dataset.dataset), epoch=epoch + 1, best_miou=best * 100,
                val=[{**h, **{k: h[k] * 100 for k in pct}} for h in history]))
        tdist.barrier()
    tb.close()
    # As the reference: the final test uses the last-epoch weights (not best_ckpt.pth).
    return run_test(args, model, device, logdir, eval_ac, logger)


def run_test(args: argparse.Namespace, model: BECO, device: torch.device, logdir: Path, autocast,
             logger) -> dict[str, Any]:
    loader = eval_loader(args, device)
    out_dir = BECOLayout(logdir).logits(args.test_msc)
    sc = evaluate(model, loader, device, args.num_classes, autocast,
                  logits_dir=out_dir if args.save_logits else None, desc="test")
    if tdist.is_main_process():
        line = metric_line(sc)
        logger.info(f"{time.strftime('%H:%M:%S')} {LOGGER_NAME} INFO Final test results: {line}")
        write_metrics(BECOLayout(logdir).test_metrics,
                      metrics_of(sc, len(loader.dataset.dataset), ckpt=args.ckpt, val_list=args.val_list,
                                 dataset=dataset_of(args).name,
                                 logits_dir=str(out_dir) if args.save_logits else None))
    tdist.barrier()
    return sc


# ----------------------------------------------------------------------------------------------- launch
def _worker(args: argparse.Namespace) -> None:
    tdist.init_distributed_mode(args)
    try:
        run(args)
    finally:
        if tdist.is_dist():
            dist.destroy_process_group()


def _spawned(local_rank: int, args: argparse.Namespace) -> None:
    _worker(args)


def launch(args: argparse.Namespace) -> None:
    """Check the logging folder, then run here, under torchrun, or (``-dist`` outside torchrun) in one
    spawned process per visible GPU (``--nproc`` overrides the count) with torchrun's environment."""
    guard_logging_dir(args)
    if args.gpu_id is not None:
        os.environ["CUDA_VISIBLE_DEVICES"] = str(args.gpu_id)
    if args.distributed and "RANK" not in os.environ:
        use_cuda = torch.cuda.is_available() and args.device != "cpu"
        nprocs = args.nproc or (torch.cuda.device_count() if use_cuda else 1)
        if nprocs > 1:
            spawn_per_gpu(_spawned, nprocs, (args,), torchrun_env=True)
            return
    if args.distributed:
        _worker(args)  # under torchrun (or a single process)
    else:
        args.gpu = 0
        run(args)


def _parse_and_launch(argv: list[str] | None) -> None:
    from segmentation.beco.config import parse_args

    launch(parse_args(argv))


def cli_main(argv: list[str] | None = None) -> int:
    """``segmentation/main.py``: parse ``argv`` and :func:`launch`; a :class:`WSSSError` is one line, exit 2."""
    return run_cli(_parse_and_launch, argv)
