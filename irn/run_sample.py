"""IRN stage driver (seed command 7: ``cd irn && python run_sample.py``).

Default steps, in order: make_cam → cam_to_ir_label → train_irn → make_sem_seg_labels
(eval_cam and eval_sem_seg exist and are switched on with ``--eval_cam_pass true`` /
``--eval_sem_seg_pass true``).  Every reference flag keeps its reference default, typed
(booleans accept true/false, ``--beta 8`` is an int).  Default paths do not depend on the
working directory: the VOC tree is the repo's ``data/VOC2012``, the lists and
``cls_labels.npy`` are the repo's ``voc12/``, checkpoints live in ``irn/sess/``,
intermediate results in ``irn/result/`` and the outputs BECO reads go straight to
``segmentation/data/sem_seg`` (pseudo-labels; ``gen_mask.py`` writes
``segmentation/data/mask_irn``).  Paths given on the command line are relative to the
working directory.  Every step skips outputs that already exist (``--overwrite`` redoes).
"""
from __future__ import annotations

import argparse
import importlib
import os
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script from irn/ or elsewhere without `pip install -e .`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from irn import IRN_DIR, REPO_ROOT  # noqa: E402
from tools.misc import Timer, str2bool  # noqa: E402

SEM_SEG_DIR = REPO_ROOT / "segmentation" / "data" / "sem_seg"
MASK_DIR = REPO_ROOT / "segmentation" / "data" / "mask_irn"


#: The reference's execution order: (switch, step module under irn/steps/).
STEP_ORDER: tuple[tuple[str, str], ...] = (
    ("make_cam_pass", "make_cam"), ("eval_cam_pass", "eval_cam"), ("cam_to_ir_label_pass", "cam_to_ir_label"),
    ("train_irn_pass", "train_irn"), ("make_sem_seg_pass", "make_sem_seg_labels"), ("eval_sem_seg_pass", "eval_sem_seg"),
)


def _scales(s: str) -> tuple[float, ...]:
    """``1.0,0.5,1.5,2.0`` or ``(1.0, 0.5, 1.5, 2.0)`` → tuple of floats."""
    vals = [v for v in s.replace("(", "").replace(")", "").replace(" ", ",").split(",") if v]
    try:
        return tuple(float(v) for v in vals)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated scales, got {s!r}") from None


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    a = p.add_argument
    # Environment
    a("--num_workers", type=int, default=max(1, (os.cpu_count() or 2) // 2))
    a("--voc12_root", default=str(REPO_ROOT / "data" / "VOC2012"), help="VOC2012 folder (JPEGImages, SegmentationClass)")
    a("--device", default="auto", help="auto | cpu | cuda | cuda:N (cuda without index: one process per GPU)")
    a("--seed", type=int, default=0)
    a("--quiet", type=str2bool, default=False, help="hide progress bars")
    # Dataset
    a("--train_list", default=str(REPO_ROOT / "voc12" / "train_aug.txt"))
    a("--val_list", default=str(REPO_ROOT / "voc12" / "val.txt"), help="unused (reference flag)")
    a("--infer_list", default=str(REPO_ROOT / "voc12" / "train.txt"), help="train_irn's displacement-mean pass")
    a("--cls_labels", default=str(REPO_ROOT / "voc12" / "cls_labels.npy"))
    a("--chainer_eval_set", default="train", help="ImageSets/Segmentation/<set>.txt scored by the eval steps")
    a("--eval_list", default=None, help="id list for the eval steps (overrides --chainer_eval_set)")
    # Class Activation Map
    a("--cam_network", default="net.resnet38d", help="kept for compatibility; always models.resnet38d.Net_gpp")
    a("--cam_width", type=float, default=None, help="Net_gpp width multiplier (default: read from the checkpoint)")
    a("--cam_crop_size", type=int, default=512)
    a("--cam_batch_size", type=int, default=16)
    a("--cam_num_epoches", type=int, default=5)
    a("--cam_learning_rate", type=float, default=0.1)
    a("--cam_weight_decay", type=float, default=1e-4)
    a("--cam_eval_thres", type=float, default=0.15)
    a("--cam_scales", type=_scales, default=(1.0, 0.5, 1.5, 2.0), help="comma-separated")
    # Mining Inter-pixel Relations
    a("--conf_fg_thres", type=float, default=0.30)
    a("--conf_bg_thres", type=float, default=0.1)
    # Inter-pixel Relation Network (IRNet)
    a("--irn_network", default="net.resnet50_irn", help="kept for compatibility; always irn.net.resnet50_irn")
    a("--irn_crop_size", type=int, default=512)
    a("--irn_batch_size", type=int, default=32)
    a("--irn_num_epoches", type=int, default=3)
    a("--irn_learning_rate", type=float, default=0.1)
    a("--irn_weight_decay", type=float, default=1e-4)
    a("--irn_fix_momentum", type=str2bool, default=False,
      help="use SGD momentum 0.9 (the reference passes weight_decay into the momentum slot: 1e-4)")
    a("--irn_backbone_width", type=int, default=64, help="ResNet-50 base width (64 = reference; smaller for toy runs)")
    a("--irn_backbone_init", default=str(REPO_ROOT / "pretrained" / "resnet50-19c8e357.pth"),
      help="torchvision ImageNet ResNet-50 file (https://download.pytorch.org/models/resnet50-19c8e357.pth), "
           "or 'none' for a random backbone (toy runs)")
    a("--resume", type=str2bool, default=False, help="continue train_irn from its last finished epoch")
    # Random Walk Params
    a("--beta", type=int, default=10)
    a("--exp_times", type=int, default=8, help="random walk = T^(2^exp_times)")
    a("--ins_seg_bg_thres", type=float, default=0.25)
    a("--sem_seg_bg_thres", type=float, default=0.25)
    a("--rw_mode", default="auto", choices=("auto", "dense", "sparse"),
      help="dense = reference matrix squaring (float32); sparse = same walk by sparse iteration (float64); "
           "auto = dense on CUDA, sparse on CPU")
    # Output Path
    a("--log_name", default="sample_train_eval", help="stdout is also written to <log_name>.log")
    a("--cam_weights_name", default=str(IRN_DIR / "sess" / "031net_main"), help="stage-one checkpoint, '.pth' appended")
    a("--irn_weights_name", default=str(IRN_DIR / "sess" / "res50_irn.pth"))
    a("--cam_out_dir", default=str(IRN_DIR / "result" / "cam"))
    a("--ir_label_out_dir", default=str(IRN_DIR / "result" / "ir_label"))
    a("--sem_seg_out_dir", default=str(SEM_SEG_DIR))
    a("--ins_seg_out_dir", default=str(IRN_DIR / "result" / "ins_seg"))
    a("--score_dir", default=str(IRN_DIR / "result" / "score"))
    a("--overwrite", type=str2bool, nargs="?", const=True, default=False, help="redo outputs that exist")
    # Step
    for name, default in (("train_cam_pass", False), ("make_cam_pass", True), ("eval_cam_pass", False),
                          ("cam_to_ir_label_pass", True), ("train_irn_pass", True), ("make_ins_seg_pass", False),
                          ("eval_ins_seg_pass", False), ("make_sem_seg_pass", True), ("eval_sem_seg_pass", False)):
        a(f"--{name}", type=str2bool, default=default)
    return p


class _Tee:
    """Write to the console and a log file (the reference's pyutils.Logger)."""

    def __init__(self, stream, path: Path) -> None:
        self.stream, self.file = stream, open(path, "a", buffering=1)

    def close(self) -> None:
        self.file.close()

    def write(self, s: str) -> int:
        self.file.write(s)
        return self.stream.write(s)

    def flush(self) -> None:
        self.stream.flush()
        self.file.flush()

    def isatty(self) -> bool:
        return self.stream.isatty()


def run(args: argparse.Namespace) -> None:
    """Execute the switched-on steps in the reference order."""
    for flag, step in (("train_cam_pass", "train_cam"), ("make_ins_seg_pass", "make_ins_seg"),
                       ("eval_ins_seg_pass", "eval_ins_seg")):
        if getattr(args, flag):
            raise SystemExit(f"--{flag} true: the {step} step is not part of KTSE+ (stage one is trained with "
                             f"train.py; instance segmentation is not used). Switch it off.")
    for d in (args.cam_out_dir, args.ir_label_out_dir, args.sem_seg_out_dir, args.score_dir):
        Path(d).mkdir(parents=True, exist_ok=True)
    Path(args.irn_weights_name).parent.mkdir(parents=True, exist_ok=True)
    for flag, step in STEP_ORDER:
        if getattr(args, flag):
            module = importlib.import_module(f"irn.steps.{step}")
            with Timer(step):
                module.run(args)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    log = Path(args.log_name + ".log")
    log.parent.mkdir(parents=True, exist_ok=True)
    old = sys.stdout
    sys.stdout = tee = _Tee(old, log)
    try:
        print(vars(args))
        run(args)
    finally:
        sys.stdout = old
        tee.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
