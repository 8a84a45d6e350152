"""BECO's settings: the JSON config system and the command-line parser built from it.

``configs/beco_deeplabv2_voc.json`` holds the values the reference runs; ``--config F`` overlays a
(partial) JSON of the same keys, and every key is a flag of the same name that overrides both.
Relative paths in a config file under ``configs/`` are relative to ``segmentation/``.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

from segmentation.beco.deeplabv2 import BACKBONES
from tools.cli import (DEVICE_HELP, device as device_arg, fraction, nonneg_float, nonneg_int,
                       positive_float, positive_int)
from tools.dataset import DATASET_NAMES, dataset_of
from tools.errors import MissingFileError, WSSSError
from tools.runtime import add_speed_args
from tools.misc import str2bool

SEG_DIR = Path(__file__).resolve().parent.parent
REPO = SEG_DIR.parent
DEFAULT_CONFIG = SEG_DIR / "configs" / "beco_deeplabv2_voc.json"
# Config keys holding paths: resolved against segmentation/ when they come from a config file.
PATH_KEYS = ("data_root", "train_list", "val_list", "sem_seg_dir", "mask_dir", "pretrained", "logging_path_base")
NONE_WORDS = ("none", "None", "")

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
KEY_CHOICES = {"backbone": sorted(BACKBONES), "output_stride": [8, 16], "dataset": list(DATASET_NAMES)}


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
        try:
            loaded = json.loads(p.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise WSSSError(f"config file '{p}' is not valid JSON ({e}); expected a JSON object like {base_p}") from None
        over = _flatten(loaded, p.resolve())
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
    # --channels_last --compile --persistent_workers (off); cudnn.benchmark follows --determ, --amp_dtype is above
    add_speed_args(ap, cudnn_benchmark=False, amp_dtype=False)
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
        if v is None:  # left to the dataset descriptor (num_classes)
            continue
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
    pre.add_argument("--dataset", default=None)
    known, _ = pre.parse_known_args(argv)
    if known.config is None and known.dataset in DATASET_NAMES:
        # a dataset with its own settings file (COCO: configs/beco_deeplabv2_coco.json) starts from it
        own = dataset_of(known).stage_defaults("beco").get("config")
        known.config = str(SEG_DIR / own) if own else None
    cfg = load_config(known.config)
    ap = build_parser(cfg)
    args = ap.parse_args(argv)
    args.cli_keys = {a.split("=")[0].lstrip("-") for a in (argv if argv is not None else sys.argv[1:])
                     if a.startswith("--")}
    _check_config_values(ap, args, known.config or str(DEFAULT_CONFIG))
    for k in PATH_KEYS:
        if getattr(args, k, None) in NONE_WORDS:
            setattr(args, k, None)
    dataset_defaults(args)
    return args


def dataset_defaults(args: argparse.Namespace) -> None:
    """Fill what the config leaves to the ``dataset`` descriptor: ``num_classes`` (C + 1),
    ``val_label_folder`` (the segmenter's ground truth) and, when ``data_root`` was not given and
    does not exist, the repository's copy of the dataset (one copy for every stage)."""
    ds = dataset_of(args)
    if getattr(args, "num_classes", None) is None:
        args.num_classes = ds.num_classes
    if getattr(args, "val_label_folder", None) is None:
        args.val_label_folder = ds.aug_gt_folder
    if "data_root" not in getattr(args, "cli_keys", ()) and args.data_root and not Path(args.data_root).is_dir():
        fallback = REPO / ds.default_root
        if fallback.is_dir():
            args.data_root = str(fallback)


def resolve_lists(args: argparse.Namespace) -> None:
    """Fill ``train_list``/``val_list`` defaults from the dataset descriptor (VOC:
    ``<data_root>/ImageSets/Segmentation/val.txt``; training: ``trainaug.txt`` or ``train_aug.txt`` there,
    then the repository's ``voc12/train_aug.txt``); the error names every place looked at."""
    ds = dataset_of(args)
    if args.val_list is None:
        args.val_list = str(ds.named_list(ds.val_list, args.data_root))
    if args.train_list is None and not args.test:
        # the reference's spelling without the underscore ('trainaug') first
        names = dict.fromkeys([ds.train_list.replace("_", ""), ds.train_list])
        cands = [ds.named_list(n, args.data_root) for n in names if n in ds.lists or ds.named_list_folder]
        cands = list(dict.fromkeys(cands + [REPO / ds.list_path(ds.train_list, args.data_root)]))
        found = [c for c in cands if c.is_file()]
        if not found:
            raise MissingFileError(
                "training list not found; looked for " + ", ".join(f"'{c}'" for c in cands) +
                f". {ds.labels_hint} Or pass --train_list.")
        args.train_list = str(found[0])

