"""BECO segmentation stage: train two DeepLabV2 networks on IRN pseudo-labels + confidence masks, or test.

Seed commands (run from ``segmentation/``)::

    python main.py -dist --logging_tag seg_result --amp                          # train (all GPUs)
    python main.py --test --logging_tag seg_result --ckpt best_ckpt_752.pth      # test, writes logits_msc/

Also ``torchrun --nproc_per_node N main.py -dist ...`` (single or multi node). Settings come from
``configs/beco_deeplabv2_voc.json`` (the values the reference runs); ``--config F`` overlays a
(partial) JSON of the same keys, and every key is a flag of the same name that overrides both.
Outputs go to ``<logging_path_base>/<logging_tag><run_id>/``: ``log.txt``, tensorboard events,
``ckpt_epoch_<E>.pth`` (newest only), ``best_ckpt.pth``, ``best=XX.XX`` marker, ``metrics.json``,
``logits_msc/<id>.npy`` and ``test_metrics.json`` (see stage2.md §2.7-2.8). Training into a folder that
already holds a run needs ``--resume`` (continue) or ``--overwrite`` (start again); validation and test
run in fp32 unless ``--amp_eval``.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import shutil
import socket
import sys
import time
from pathlib import Path
from typing import Any

SEG_DIR = Path(__file__).resolve().parent
REPO = SEG_DIR.parent
if str(REPO) not in sys.path:  # the seed commands run `python main.py` from segmentation/
    sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from torch.utils.data import DataLoader, Subset  # noqa: E402

from segmentation.beco.datasets import PseudoMaskTrainSet, ResizedValSet  # noqa: E402
from segmentation.beco.deeplabv2 import BACKBONES, build_deeplabv2  # noqa: E402
from segmentation.beco.model import BECO, BECOSettings, unwrap  # noqa: E402
from tools import dist as tdist  # noqa: E402
from tools.checkpoint import load_state_dict_checked, load_torch_file  # noqa: E402
from tools.cli import (DEVICE_HELP, device as device_arg, fraction, nonneg_float, nonneg_int,  # noqa: E402
                       positive_float, positive_int)
from tools.errors import MissingFileError, WSSSError, run_cli  # noqa: E402
from tools.io import atomic_save_npy, atomic_torch_save, atomic_write_json  # noqa: E402
from tools.logging_utils import TBWriter, setup_logger  # noqa: E402
from tools.metrics import confusion_matrix, present_class_scores  # noqa: E402
from tools.misc import backward_step, get_device, poly_lr, str2bool  # noqa: E402
from voc12.data import read_id_list  # noqa: E402

DEFAULT_CONFIG = SEG_DIR / "configs" / "beco_deeplabv2_voc.json"
# Config keys holding paths: resolved against segmentation/ when they come from a config file.
PATH_KEYS = ("data_root", "train_list", "val_list", "sem_seg_dir", "mask_dir", "pretrained", "logging_path_base")
NONE_WORDS = ("none", "None", "")
LOGGER_NAME = "segmentation.main"

HELP = {
    "backbone": "resnet101 (reference) | resnet50 | resnet34 | resnet18 (small CPU runs)",
    "backbone_width": "base width of the ResNet (64 = standard; smaller only for CPU toy runs, no ImageNet init)",
    "pretrained": "torchvision ImageNet weights for the backbone, or 'none' for random init",
    "sem_seg_dir": "pseudo-label PNG folder (IRN sem_seg); point it at SegmentationClassAug to train on GT",
    "mask_dir": "confidence-mask PNG folder (gen_mask mask_irn), or 'none' for all-ones masks",
    "train_list": "training id list (default: <data_root>/ImageSets/Segmentation/trainaug.txt, then train_aug.txt)",
    "val_list": "val/test id list (default: <data_root>/ImageSets/Segmentation/val.txt)",
    "val_size": "val/test images and labels are resized to this square size (reference 512)",
    "batch_size": "training batch per process (reference 16 per process)",
    "max_epoch": "training epochs",
}
# Range checks of config keys (argparse ``type=``): a bad value stops at parse time with one line.
KEY_TYPES = {
    "batch_size": positive_int, "max_epoch": positive_int, "crop_size": positive_int, "val_size": positive_int,
    "backbone_width": positive_int, "num_classes": positive_int, "num_workers": nonneg_int,
    "warm_up": nonneg_int, "bdry_size": nonneg_int, "log_every": nonneg_int, "seed": nonneg_int,
    "highres_t": fraction, "mix_prob": fraction,
    "bdry_whb": nonneg_float, "bdry_whi": nonneg_float, "bdry_wlb": nonneg_float, "bdry_wli": nonneg_float,
    "lr": positive_float, "momentum": nonneg_float, "weight_decay": nonneg_float, "lr_power": positive_float,
    "min_lr": nonneg_float,
}
KEY_CHOICES = {"backbone": sorted(BACKBONES), "output_stride": [8, 16]}
# What a training run leaves in its logging folder; any of the first three means "a run is here".
RUN_MARKERS = ("ckpt_epoch_*.pth", "best_ckpt.pth", "metrics.json")
RUN_OUTPUTS = RUN_MARKERS + ("best=*", "test_metrics.json", "config.json", "events.out.tfevents.*",
                             "logits_msc", "logits", "val_pred", "test_pred", "val_metrics*.json")


# ----------------------------------------------------------------------------------------------- config
def _flatten(cfg: dict, origin: Path) -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for sec, vals in cfg.items():
        if sec.startswith("_"):
            continue
        if not isinstance(vals, dict):
            raise WSSSError(f"config {origin}: section '{sec}' must be an object of key: value")
        for k, v in vals.items():
            if k in flat:
                raise WSSSError(f"config {origin}: key '{k}' appears twice")
            if k in PATH_KEYS and isinstance(v, str) and v not in NONE_WORDS and not os.path.isabs(v):
                v = str(origin.parent.parent / v) if origin.parent.name == "configs" else str(origin.parent / v)
            flat[k] = v
    return flat


def load_config(path: os.PathLike | str | None) -> dict[str, Any]:
    """The defaults (``configs/beco_deeplabv2_voc.json``) overlaid with ``path`` (may be partial).
    Relative paths in a file under ``configs/`` are relative to ``segmentation/``."""
    base_p = DEFAULT_CONFIG
    flat = _flatten(json.loads(base_p.read_text()), base_p)
    if path is not None and Path(path).resolve() != base_p:
        p = Path(path)
        if not p.is_file():
            raise MissingFileError(f"config file not found: '{p}' (expected a JSON file like {base_p})")
        over = _flatten(json.loads(p.read_text()), p.resolve())
        unknown = sorted(set(over) - set(flat))
        if unknown:
            raise WSSSError(f"config {p}: unknown key(s) {unknown}; known keys are those of {base_p}")
        flat.update(over)
    return flat


def _arg_type(k: str, v: Any):
    if k in KEY_CHOICES:
        return dict(type=type(v), choices=KEY_CHOICES[k])
    if k in KEY_TYPES and not isinstance(v, (bool, list)):
        return dict(type=KEY_TYPES[k])
    if isinstance(v, bool):
        return dict(type=str2bool)
    if isinstance(v, int):
        return dict(type=int)
    if isinstance(v, float):
        return dict(type=float)
    if isinstance(v, list):
        return dict(type=type(v[0]) if v and not isinstance(v[0], bool) else str, nargs="+")
    return dict(type=str)


def build_parser(cfg: dict[str, Any]) -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description="BECO segmentation: train (default) or --test.",
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--config", default=str(DEFAULT_CONFIG), help="JSON config overlaid on the defaults")
    ap.add_argument("--amp", action="store_true", help="mixed precision (fp16 + GradScaler on CUDA, bf16 on CPU)")
    ap.add_argument("--amp_dtype", default="auto", choices=["auto", "fp16", "bf16"])
    ap.add_argument("--amp_eval", action="store_true",
                    help="also run validation and test under autocast (the reference evaluates in fp32 "
                         "even with --amp)")
    ap.add_argument("-dist", "--distributed", action="store_true",
                    help="DDP: one process per visible GPU (or under torchrun); 1 CPU process without GPUs")
    ap.add_argument("--nproc", type=positive_int, default=None,
                    help="processes to spawn with -dist outside torchrun (default: visible GPUs, or 1)")
    ap.add_argument("--determ", action="store_true", help="cudnn deterministic (else cudnn.benchmark)")
    ap.add_argument("--gpu_id", default=None, help="sets CUDA_VISIBLE_DEVICES")
    ap.add_argument("--device", type=device_arg, default="auto", help=DEVICE_HELP)
    ap.add_argument("--threads", type=nonneg_int, default=0,
                    help="torch CPU threads per process (0 = torch default); 1 is fastest for tiny CPU models "
                         "and on a busy machine")
    ap.add_argument("--run_id", default="")
    ap.add_argument("--logging_tag", default="")
    ap.add_argument("--ckpt", default=None, help="checkpoint to test, or to start training from")
    ap.add_argument("--test", action="store_true", help="only test --ckpt on the val list")
    again = ap.add_mutually_exclusive_group()
    again.add_argument("--resume", nargs="?", const="auto", default=None,
                       help="continue training from the newest ckpt_epoch_*.pth of the logging dir (or this file)")
    again.add_argument("--overwrite", action="store_true",
                       help="train again from scratch in a logging dir that holds a run (its checkpoints, "
                            "metrics and logits are deleted first)")
    ap.add_argument("--pseudo_label_dir", dest="sem_seg_dir", default=argparse.SUPPRESS,
                    help="alias of --sem_seg_dir")
    for k, v in cfg.items():
        ap.add_argument(f"--{k}", default=v, help=HELP.get(k, "config key"), **_arg_type(k, v))
    return ap


def _check_config_values(ap: argparse.ArgumentParser, args: argparse.Namespace, origin: str) -> None:
    """Apply the flag checks to values that came from the config file (argparse checks only what
    was typed); a bad one ends like a bad flag: usage + one error line, exit 2."""
    for k in sorted(set(KEY_TYPES) | set(KEY_CHOICES)):
        if k in args.cli_keys or not hasattr(args, k):
            continue
        v = getattr(args, k)
        if k in KEY_CHOICES:
            if v not in KEY_CHOICES[k]:
                ap.error(f"config {origin}: {k} = {v!r}: invalid choice (choose from {KEY_CHOICES[k]})")
            continue
        try:
            KEY_TYPES[k](str(v))
        except argparse.ArgumentTypeError as e:
            ap.error(f"config {origin}: {k} = {v!r}: {e}")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--config", default=None)
    known, _ = pre.parse_known_args(argv)
    cfg = load_config(known.config)
    ap = build_parser(cfg)
    args = ap.parse_args(argv)
    args.cli_keys = {a.split("=")[0].lstrip("-") for a in (argv if argv is not None else sys.argv[1:])
                     if a.startswith("--")}
    _check_config_values(ap, args, known.config or str(DEFAULT_CONFIG))
    for k in PATH_KEYS:
        if getattr(args, k, None) in NONE_WORDS:
            setattr(args, k, None)
    if "data_root" not in args.cli_keys and args.data_root and not Path(args.data_root).is_dir():
        fallback = REPO / "data" / "VOC2012"
        if fallback.is_dir():  # one VOC copy for every stage
            args.data_root = str(fallback)
    return args


def resolve_lists(args: argparse.Namespace) -> None:
    """Fill ``train_list``/``val_list`` defaults; the error names every place looked at."""
    seg = Path(args.data_root) / "ImageSets" / "Segmentation"
    if args.val_list is None:
        args.val_list = str(seg / "val.txt")
    if args.train_list is None and not args.test:
        cands = [seg / "trainaug.txt", seg / "train_aug.txt", REPO / "voc12" / "train_aug.txt"]
        found = [c for c in cands if c.is_file()]
        if not found:
            raise MissingFileError(
                "training list not found; looked for " + ", ".join(f"'{c}'" for c in cands) +
                " (10,582 ids of VOC train + SBD; build it with `python voc12/prepare.py --voc_root <VOC2012>` "
                "or pass --train_list)")
        args.train_list = str(found[0])


# ----------------------------------------------------------------------------------------------- helpers
def logging_dir(args: argparse.Namespace) -> Path:
    name = args.logging_tag + args.run_id
    return Path(args.logging_path_base) / (name if name else time.strftime("%y%m%d_%H%M%S"))


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


def autocast_factory(args: argparse.Namespace, device: torch.device):
    """A zero-argument callable returning the autocast context for this run (or a null context)."""
    if not args.amp:
        return contextlib.nullcontext, None
    dt = args.amp_dtype
    if dt == "auto":
        dt = "fp16" if device.type == "cuda" else "bf16"
    dtype = torch.float16 if dt == "fp16" else torch.bfloat16
    scaler = torch.amp.GradScaler(device.type) if (dtype == torch.float16 and device.type == "cuda") else None
    return (lambda: torch.autocast(device_type=device.type, dtype=dtype)), scaler


def eval_autocast(args: argparse.Namespace, train_autocast):
    """The autocast factory for validation/test: fp32 (a null context) as the reference, which wraps
    only its training step in autocast; the training one with ``--amp_eval``."""
    return train_autocast if getattr(args, "amp_eval", False) else contextlib.nullcontext


def seed_epoch(seed: int, epoch: int, rank: int) -> int:
    """Seed python/numpy/torch for one epoch of one rank; returns the seed (augmentation uses it too).
    Per-epoch seeding makes a resumed run repeat exactly the epochs an uninterrupted run would do."""
    s = (int(seed) * 1000003 + epoch * 1009 + rank * 17) % (2 ** 31)
    random.seed(s)
    np.random.seed(s)
    torch.manual_seed(s)
    return s


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


def json_scores(s: dict[str, Any]) -> dict[str, Any]:
    return {k: (v.tolist() if isinstance(v, np.ndarray) else v) for k, v in s.items()}


def eval_loader(args: argparse.Namespace, device: torch.device) -> DataLoader:
    ids = read_id_list(args.val_list)
    ds = ResizedValSet(args.data_root, ids, args.val_size, args.val_label_folder)
    # Interleaved share per rank without padding: no duplicated images bias the metric (§4 item 18).
    idx = tdist.split_for_rank(list(range(len(ds))))
    return DataLoader(Subset(ds, idx), batch_size=1, shuffle=False, num_workers=min(args.num_workers, 2),
                      pin_memory=device.type == "cuda")


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
    """SGD with two parameter groups (network1, network2), same settings for all (§2.6)."""
    return torch.optim.SGD([{"params": unwrap(model.network1).parameters()},
                            {"params": unwrap(model.network2).parameters()}],
                           lr=lr, momentum=momentum, weight_decay=weight_decay)


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
    cks = sorted(logdir.glob("ckpt_epoch_*.pth"), key=lambda p: int(p.stem.rsplit("_", 1)[1]))
    return cks[-1] if cks else None


# ----------------------------------------------------------------------------------------------- run
def run(args: argparse.Namespace) -> dict[str, Any]:
    """Everything one process does (rank from tools.dist); returns the final test scores."""
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    rank = tdist.get_rank()
    main_proc = tdist.is_main_process()
    if tdist.is_dist() and torch.cuda.is_available() and args.device != "cpu":
        device = torch.device("cuda", args.gpu)
    else:
        device = get_device(args.device)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True  # as the reference
        torch.backends.cudnn.allow_tf32 = True
        torch.backends.cudnn.deterministic = bool(args.determ)
        torch.backends.cudnn.benchmark = not args.determ
    resolve_lists(args)
    logdir = logging_dir(args)
    if main_proc:
        logdir.mkdir(parents=True, exist_ok=True)
    tdist.barrier()
    logger = setup_logger(logdir / "log.txt" if main_proc else None, LOGGER_NAME)
    if not main_proc:
        logger.disabled = True
    tb = TBWriter(logdir, enabled=main_proc)
    seed_epoch(args.seed, -1, rank)
    autocast, scaler = autocast_factory(args, device)
    eval_ac = eval_autocast(args, autocast)

    ckpt_path = args.ckpt
    resume_path = None
    if not args.test and args.resume is not None:
        resume_path = find_resume(args, logdir)
        if resume_path is None:
            logger.info(f"--resume: no ckpt_epoch_*.pth in {logdir}; starting from scratch")
        else:
            ckpt_path = str(resume_path)
    # ImageNet init only for a fresh training run (testing needs only the val data and --ckpt, §4 item 19).
    model = build_model(args, load_imagenet=not args.test and ckpt_path is None)
    model.to(device)
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
                                   args.crop_scale, args.crop_ratio)
    gen = torch.Generator()
    if tdist.is_dist():
        sampler = torch.utils.data.distributed.DistributedSampler(train_set, shuffle=True, seed=args.seed,
                                                                  drop_last=True)
    else:
        sampler = torch.utils.data.RandomSampler(train_set, generator=gen)
    loader = DataLoader(train_set, batch_size=args.batch_size, sampler=sampler, drop_last=True,
                        num_workers=args.num_workers, pin_memory=device.type == "cuda",
                        worker_init_fn=_worker_init, generator=gen)
    if len(loader) == 0:
        raise WSSSError(f"training list {args.train_list} has {len(train_set)} ids: fewer than one batch of "
                        f"{args.batch_size} per process x {tdist.get_world_size()} process(es)")
    val_loader = eval_loader(args, device)
    max_iters = args.max_epoch * len(loader)
    optimizer = build_optimizer(model, args.lr, args.momentum, args.weight_decay)

    def set_lr(it: int) -> None:
        for g in optimizer.param_groups:
            g["lr"] = max(poly_lr(args.lr, it, max_iters, args.lr_power), args.min_lr)

    start_epoch, global_iter, best, history = 0, 0, -1.0, []
    if ckpt is not None and "optim_state_dict" in ckpt:
        optimizer.load_state_dict(ckpt["optim_state_dict"])
        run_state = ckpt.get("runner_state_dict", {})
        start_epoch = int(run_state.get("epoch", 0))
        global_iter = int(run_state.get("iter", 0))
        best = float(run_state.get("best_miou", -1.0))
        history = list(run_state.get("history", []))
        model.epoch = int(ckpt.get("model_state_dict", {}).get("epoch", start_epoch))  # §4 item 17 fixed
        if scaler is not None and ckpt.get("scaler_state_dict"):
            scaler.load_state_dict(ckpt["scaler_state_dict"])
        logger.info(f"resumed from {ckpt_path}: epoch {start_epoch}, iteration {global_iter}, "
                    f"warm-up counter {model.epoch}")
    if main_proc:
        atomic_write_json(logdir / "config.json", {k: v for k, v in vars(args).items() if k != "cli_keys"})
        logger.info(f"BECO training: {len(train_set)} images, {len(loader)} iterations/epoch x {args.max_epoch} "
                    f"epochs, world size {tdist.get_world_size()}, device {device}, logging to {logdir}")

    from tqdm import tqdm

    for epoch in range(start_epoch, args.max_epoch):
        s = seed_epoch(args.seed, epoch, rank)
        model.reseed_aug(s)
        gen.manual_seed(s)
        if isinstance(sampler, torch.utils.data.distributed.DistributedSampler):
            sampler.set_epoch(epoch)
        model.train()
        bar = tqdm(loader, desc=f"epoch {epoch + 1}/{args.max_epoch}", disable=not main_proc, leave=False,
                   dynamic_ncols=True)
        for inner, (img, lab, msk, _) in enumerate(bar):
            set_lr(global_iter)
            img, lab, msk = img.to(device), lab.to(device), msk.to(device)
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
                atomic_torch_save({"net_state_dict": model.nets_state_dict()}, logdir / "best_ckpt.pth")
                for old in logdir.glob("best=*"):
                    old.unlink()
                (logdir / f"best={best * 100:.2f}").touch()
            state = {
                "net_state_dict": model.nets_state_dict(),
                "optim_state_dict": optimizer.state_dict(),
                "sched_state_dict": {"last_epoch": global_iter, "max_iters": max_iters},
                "scaler_state_dict": scaler.state_dict() if scaler is not None else None,
                "model_state_dict": {"epoch": model.epoch},
                "runner_state_dict": {"epoch": epoch + 1, "iter": global_iter, "inner_iter": 0, "buffer": {},
                                      "best_miou": best, "history": history},
            }
            path = logdir / f"ckpt_epoch_{epoch + 1}.pth"
            atomic_torch_save(state, path)
            for old in logdir.glob("ckpt_epoch_*.pth"):
                if old != path:
                    old.unlink()
            atomic_write_json(logdir / "metrics.json", {"val": history, "best_miou": best})
        tdist.barrier()
    tb.close()
    # As the reference: the final test uses the last-epoch weights (not best_ckpt.pth).
    return run_test(args, model, device, logdir, eval_ac, logger)


def run_test(args: argparse.Namespace, model: BECO, device: torch.device, logdir: Path, autocast,
             logger) -> dict[str, Any]:
    loader = eval_loader(args, device)
    out_dir = logdir / ("logits_msc" if args.test_msc else "logits")
    sc = evaluate(model, loader, device, args.num_classes, autocast,
                  logits_dir=out_dir if args.save_logits else None, desc="test")
    if tdist.is_main_process():
        line = metric_line(sc)
        logger.info(f"{time.strftime('%H:%M:%S')} {LOGGER_NAME} INFO Final test results: {line}")
        atomic_write_json(logdir / "test_metrics.json",
                          {"ckpt": args.ckpt, "val_list": args.val_list, "n_images": len(loader.dataset.dataset),
                           "logits_dir": str(out_dir) if args.save_logits else None,
                           **json_scores(sc)})
    tdist.barrier()
    return sc


# ----------------------------------------------------------------------------------------------- launch
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def _spawned(local_rank: int, args: argparse.Namespace, nprocs: int) -> None:
    os.environ.update(RANK=str(local_rank), LOCAL_RANK=str(local_rank), WORLD_SIZE=str(nprocs))
    _worker(args)


def _worker(args: argparse.Namespace) -> None:
    tdist.init_distributed_mode(args)
    try:
        run(args)
    finally:
        if tdist.is_dist():
            dist.destroy_process_group()


def launch(argv: list[str] | None = None) -> None:
    """Parse the command line, check the logging folder, then run here, under torchrun, or spawned
    over the visible GPUs (``-dist``)."""
    args = parse_args(argv)
    guard_logging_dir(args)
    if args.gpu_id is not None:
        os.environ["CUDA_VISIBLE_DEVICES"] = str(args.gpu_id)
    if args.distributed and "RANK" not in os.environ:
        use_cuda = torch.cuda.is_available() and args.device != "cpu"
        nprocs = args.nproc or (torch.cuda.device_count() if use_cuda else 1)
        if nprocs > 1:
            os.environ.setdefault("MASTER_ADDR", "localhost")
            os.environ.setdefault("MASTER_PORT", str(_free_port()))
            torch.multiprocessing.spawn(_spawned, args=(args, nprocs), nprocs=nprocs, join=True)
            return
    if args.distributed:
        _worker(args)  # under torchrun (or a single process)
    else:
        args.gpu = 0
        run(args)


def main(argv: list[str] | None = None) -> int:
    """Entry point: a user-fixable error is one ``error:`` line (exit 2), Ctrl-C one line (exit 130)."""
    return run_cli(launch, argv)


if __name__ == "__main__":
    sys.exit(main())
