"""Stage one inference: multi-scale + flip CAM dictionaries.

    python infer.py --name ktse1 --model ktse --load_epo 31 --dict --infer_list voc12/train_aug.txt

loads ``experiments/<name>/ckpt/<load_epo:03d>net_main.pth`` (a plain ``Net_gpp`` state_dict) and, for
every listed image, writes ``experiments/<name>/dict/<id>.npy`` = ``{class index: float32 HxW CAM in
[0,1)}`` (the reference format, docs/formats.md). ``--crf`` adds ``crf/<alpha:02d>/<id>.npy`` and
``--vis`` CAM overlays in ``train/``.

Speed without changing the numbers: a scale and its flip run as one batch, inference_mode, DataLoader
workers decode and resize ahead, a background thread writes outputs (and runs CRF/overlays).
``torchrun --nproc_per_node N infer.py ...`` splits the list over ranks. Every file is written
atomically. Each output folder keeps a record of what made it (``.provenance.json``, docs/formats.md):
a rerun reuses an image's outputs only when the checkpoint (sha256), labels, scales, amp, width and
the image are unchanged, and recomputes the rest, printing one line that names what changed
(``--overwrite`` redoes everything). This script holds the flags; the work is
:func:`models.cam_infer.run`.
"""
from __future__ import annotations

import argparse
import sys

from models.cam_infer import InferSettings, check_inputs, dataset_args, run
from tools import cli
from tools.dataset import DatasetArgumentParser, add_dataset_arg
from tools.errors import run_cli

#: defaults of the flags :func:`models.cam_infer.run` reads
DEFAULTS = InferSettings()


# ----------------------------------------------------------------------------------------------
# Flags
# ----------------------------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    p = DatasetArgumentParser(description=__doc__.split("\n\n")[0],
                              formatter_class=argparse.ArgumentDefaultsHelpFormatter, fill=dataset_args)
    d = DEFAULTS
    # reference flags
    p.add_argument("--infer_list", default=d.infer_list, help="image list (plain ids or /JPEGImages/<id>.jpg lines; "
                   "default: the dataset's seed list, VOC voc12/train.txt)")
    p.add_argument("--model", default=d.model, help="stage-one model (models/registry.py; the reference default "
                   "'aeft_gpp' was never shipped)")
    p.add_argument("--name", required=True, help="experiment name (folder experiments/<name>)")
    p.add_argument("--load_epo", type=cli.nonneg_int, required=True, help="checkpoint epoch: ckpt/<load_epo:03d>net_main.pth")
    p.add_argument("--D", type=cli.positive_int, default=d.D, help="fc8 width (read from the checkpoint when it differs)")
    p.add_argument("--vis", action="store_true", help="CAM overlay PNGs in experiments/<name>/train/")
    p.add_argument("--dict", action="store_true", help="save the CAM dictionaries (without it nothing is saved, "
                   "as the reference)")
    p.add_argument("--crf", action="store_true", help="CRF dictionaries in experiments/<name>/crf/<alpha:02d>/")
    p.add_argument("--alphas", type=cli.positive_int, nargs="+", default=d.alphas, help="CRF background exponents")
    # reference flags that do nothing here (accepted, hidden from --help)
    cli.add_compat_flags(p, {
        "--num_workers": dict(type=int, default=8), "--batch_size": dict(type=int, default=8),
        "--resize": dict(type=float, nargs="+", default=[256, 512]),
        "--crop": dict(type=int, nargs="+", default=[320, 320]),
        "--cj": dict(type=float, nargs="+", default=[0.4, 0.4, 0.4, 0.1]), "--lr": dict(type=float, default=0.01),
        "--wt_dec": dict(type=float, default=5e-4), "--max_epoches": dict(type=int, default=8),
        "--gpu": dict(type=int, default=-1), "--RCAM_T": dict(type=float, nargs="+", default=[0.3, 0.15]),
        "--M": dict(type=float, default=0.996), "--TH": dict(type=float, nargs="+", default=[0.3]),
        "--T": dict(type=float, default=2.0), "--W": dict(type=float, nargs="+", default=[1, 1, 1]),
        "--CRF": dict(type=int, default=4), "--MEM": dict(type=int, default=4),
        "--print_freq": dict(type=int, default=100), "--out_num": dict(type=int, default=100)})
    # added
    add_dataset_arg(p, d.dataset)
    p.add_argument("--data_root", default=d.data_root, help="dataset folder (default: the dataset's, data/VOC2012)")
    p.add_argument("--cls_labels", default=d.cls_labels, help="image-level labels {id: (C,)} (default: the "
                   "dataset's, voc12/cls_labels.npy)")
    p.add_argument("--exp_root", default=d.exp_root, help="folder holding experiments/<name>")
    p.add_argument("--ckpt", default=d.ckpt, help="explicit checkpoint path (overrides --name/--load_epo lookup)")
    p.add_argument("--width", type=cli.positive_float, default=d.width,
                   help="trunk width multiplier of the checkpoint (default: read from its tensor shapes)")
    p.add_argument("--device", type=cli.device, default=d.device, help="auto (cuda if available), cpu, cuda, cuda:1, ...")
    p.add_argument("--amp", action="store_true", help="mixed-precision forward (fp16 on CUDA, bf16 on CPU); "
                   "changes the numbers slightly")
    p.add_argument("--workers", type=cli.nonneg_int, default=d.workers,
                   help="DataLoader worker processes decoding and resizing ahead (0 = main process)")
    p.add_argument("--threads", type=cli.nonneg_int, default=d.threads, help="torch CPU threads (default and 0: torch's choice)")
    p.add_argument("--overwrite", action="store_true", help="recompute outputs that already exist")
    p.add_argument("--scales", type=cli.positive_float, nargs="+", default=d.scales, help="inference scales")
    p.add_argument("--no_progress", action="store_true", help="no progress bar")
    return p


def _checked_run(args: argparse.Namespace) -> None:
    check_inputs(args)
    run(args)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    import torch

    threads = torch.get_num_threads()
    try:
        return run_cli(_checked_run, args)
    finally:
        torch.set_num_threads(threads)  # --threads must not leak when main() is called in-process


if __name__ == "__main__":
    sys.exit(main())
