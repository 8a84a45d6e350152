"""Stage one training: KTSE+ (the authors' README command).

    python train.py --name ktse1 --model ktse

trains ``Net_gpp`` from the ImageNet ResNet-38 weights (``--init``, MXNet ``.params``) on
``--train_list`` with image-level labels, saving ``experiments/<name>/ckpt/<epo:03d>net_main.pth``
(plain state_dict, the reference format) every epoch plus a resumable ``ckpt/last.pth``
(``--resume``). KTSE+ activation leakage suppression is on by default (``--als_cross 0 --als_bg 0``
gives plain KTSE). ``torchrun --nproc_per_node N train.py ...`` trains with DDP; the global batch
size stays ``--batch_size`` (``8`` before epoch ``--T``).

Reference behaviour is kept by default (docs/deviations.md): the reference passes the weight decay into
SGD's momentum slot, so momentum is 5e-4 (``--momentum_fix`` for 0.9), poly max_step computed for batch 8, the logged ``loss_cls``/``loss_seg``
being the total / full seg loss.

This script holds the flags and the input check; the training itself is :func:`models.ktse_train.train`.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from models.ktse_train import DEFAULT_INIT, REFERENCE_VAL_EPOCHS, dataset_args, exp_paths, parse_val_epochs, train
from models.registry import model_name
from tools import cli
from tools.dataset import DatasetArgumentParser, add_dataset_arg
from tools.errors import require_all, run_cli
from tools.runtime import add_speed_args


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
    p = DatasetArgumentParser(description=__doc__.split("\n\n")[0],
                              formatter_class=argparse.ArgumentDefaultsHelpFormatter, fill=dataset_args,
                              stage="train")
    # ---- reference flags (the reference train.py's, same names and defaults)
    p.add_argument("--train_list", default=None, help="training image list (default: the dataset's, VOC "
                   "voc12/train_aug.txt)")
    p.add_argument("--val_list", default=None, help="images of the in-training CAM validation (default: the "
                   "dataset's seed list, VOC voc12/train.txt)")
    p.add_argument("--batch_size", type=cli.positive_int, default=16, help="global batch size from epoch --T on")
    p.add_argument("--resize", type=cli.positive_float, nargs=2, default=[256, 512], help="long-side range (inclusive)")
    p.add_argument("--crop", type=cli.positive_int, nargs="+", default=[320, 320], help="crop side (crop[0] used; multiple of 8)")
    p.add_argument("--TH", type=cli.fraction, nargs="+", default=[0.6, 0.2], help="TH[0]: foreground erasing threshold")
    p.add_argument("--T", type=cli.nonneg_int, default=10, help="epoch at which the KTSE terms start (and the batch switch)")
    p.add_argument("--W", type=cli.nonneg_float, nargs="+", default=[1.0, 1.0, 0.15], help="W[0] cls weight, W[1] global align weight + on/off")
    p.add_argument("--RCAM_T", type=cli.fraction, nargs="+", default=[0.3, 0.15], help="pseudo-label background levels (high, low)")
    p.add_argument("--lr", type=cli.positive_float, default=0.01, help="base learning rate")
    p.add_argument("--wt_dec", type=cli.nonneg_float, default=5e-4, help="weight decay (also the SGD momentum: reference quirk)")
    p.add_argument("--max_epochs", "--max_epoches", dest="max_epochs", type=cli.positive_int, default=40, help="epochs")
    p.add_argument("--model", type=model_name(), default="ktse", help="stage-one model (models/registry.py)")
    p.add_argument("--name", required=True, help="experiment name (experiments/<name>)")
    p.add_argument("--seed", type=cli.nonneg_int, default=5137, help="random seed")
    p.add_argument("--dict", action="store_false", help="store_false as the reference: passing it turns validation dicts off")
    p.add_argument("--crf", action="store_true", help="validation CRF dictionaries")
    p.add_argument("--print_freq", type=cli.positive_int, default=100, help="log running loss means every N iterations")
    p.add_argument("--alphas", type=cli.positive_int, nargs="+", default=[6, 10, 24], help="CRF alphas / crf/<alpha> folders")
    p.add_argument("--D", type=cli.positive_int, default=256, help="fc8 width")
    # reference flags that do nothing (the reference ignores them too; validation always saves overlays)
    cli.add_compat_flags(p, {
        "--num_workers": dict(type=cli.nonneg_int, default=8),
        "--cj": dict(type=float, nargs="+", default=[0.4, 0.4, 0.4, 0.1]),
        "--M": dict(type=float, default=0.5), "--CRF": dict(type=int, default=4), "--gpu": dict(type=int, default=-1),
        "--vis": dict(action="store_true"), "--out_num": dict(type=int, default=100)})
    # ---- this implementation
    add_dataset_arg(p)
    p.add_argument("--data_root", default=None, help="dataset folder (default: the dataset's, data/VOC2012)")
    p.add_argument("--cls_labels", default=None, help="image-level labels, reference format (default: the "
                   "dataset's, voc12/cls_labels.npy)")
    p.add_argument("--exp_root", default="experiments", help="folder holding experiments/<name>")
    p.add_argument("--device", type=cli.device, default="auto", help=cli.DEVICE_HELP)
    p.add_argument("--amp", action="store_true", help="mixed precision (fp16 on CUDA with loss scaling, bf16 on CPU)")
    p.add_argument("--workers", type=cli.nonneg_int, default=4, help="DataLoader workers (the reference hard-codes 4)")
    add_speed_args(p)  # --channels_last --compile --persistent_workers --cudnn_benchmark --amp_dtype (off)
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


def check_inputs(args: argparse.Namespace) -> None:
    """Raise ONE error naming every missing input of this run (VOC images, lists, labels, the ImageNet
    weights of a fresh run, ground truth for validation) before anything is built or written."""
    ds = dataset_args(args)
    resuming = args.resume and exp_paths(args).last.exists()
    init = None
    hint = ""
    if str(args.init).lower() != "none" and not resuming:
        from models.mxnet_params import RESNET38_IMAGENET_HINT as hint  # lazy: only needed here

        init = args.init
    validating = bool(parse_val_epochs(args.val_epochs, args.max_epochs))
    require_all([
        (Path(args.data_root) / ds.image_folder, f"{ds.name} image folder (--data_root)", ds.root_hint, "dir"),
        (args.train_list, "training list (--train_list)", ds.labels_hint),
        (args.cls_labels, "class-label file (--cls_labels)", ds.labels_hint),
        (args.val_list if validating else None, "validation list (--val_list)", ds.labels_hint),
        (ds.gt_dir(args.data_root) if validating and args.dict else None,
         f"{ds.name} ground-truth folder for validation", ds.root_hint + " (or pass --val_epochs none)", "dir"),
        (init, "ImageNet ResNet-38 weights (MXNet .params, --init)", hint),
    ], context="before training started")


def _checked_train(args: argparse.Namespace) -> dict[str, Any]:
    check_inputs(args)
    return train(args)


def main(argv: list[str] | None = None) -> int:
    return run_cli(_checked_train, build_parser().parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
