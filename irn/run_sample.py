"""IRN stage driver (the authors' README command: ``cd irn && python run_sample.py``).

Default steps, in order: make_cam → cam_to_ir_label → train_irn → make_sem_seg_labels
(eval_cam and eval_sem_seg exist and are switched on with ``--eval_cam_pass true`` /
``--eval_sem_seg_pass true``).  Every reference flag keeps its reference default, typed
(booleans accept true/false, ``--beta 8`` is an int).  Default paths do not depend on the
working directory: the VOC tree is the repo's ``data/VOC2012``, the lists and
``cls_labels.npy`` are the repo's ``voc12/``, checkpoints live in ``irn/sess/``,
intermediate results in ``irn/result/`` and the outputs BECO reads go straight to
``segmentation/data/sem_seg`` (pseudo-labels; ``gen_mask.py`` writes
``segmentation/data/mask_irn``).  Paths given on the command line are relative to the
working directory.  Every step keeps a record of what made its outputs (``.provenance.json``, see
docs/formats.md) and reuses them only when it matches; derived outputs made from other inputs are
recomputed (one line says what changed), trained IRN weights are not: train_irn then stops and
asks for ``--overwrite``.  ``--overwrite`` redoes everything.
"""
from __future__ import annotations

import argparse
import importlib
import os
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script from irn/ or elsewhere without `pip install -e .`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from irn import REPO_ROOT  # noqa: E402
from models.registry import model_name  # noqa: E402
from tools import cli  # noqa: E402
from tools.dataset import DatasetArgumentParser, add_dataset_arg  # noqa: E402
from tools.layout import IRNLayout  # noqa: E402
from tools.errors import WSSSError, require_all, run_cli  # noqa: E402
from tools.misc import Timer, str2bool  # noqa: E402

#: the reference's output folders (irn/result, irn/sess, segmentation/data/{sem_seg,mask_irn})
LAYOUT = IRNLayout.reference(REPO_ROOT)


#: The reference's execution order: (switch, step module under irn/steps/).
STEP_ORDER: tuple[tuple[str, str], ...] = (
    ("make_cam_pass", "make_cam"), ("eval_cam_pass", "eval_cam"), ("cam_to_ir_label_pass", "cam_to_ir_label"),
    ("train_irn_pass", "train_irn"), ("make_sem_seg_pass", "make_sem_seg_labels"), ("eval_sem_seg_pass", "eval_sem_seg"),
)


def _scales(s: str) -> tuple[float, ...]:
    """``1.0,0.5,1.5,2.0`` or ``(1.0, 0.5, 1.5, 2.0)`` → tuple of floats."""
    vals = [v for v in s.replace("(", "").replace(")", "").replace(" ", ",").split(",") if v]
    out = tuple(cli.positive_float(v) for v in vals)  # each one > 0, else argparse's usage error
    if 1.0 not in out:  # make_cam takes the original image size from the scale-1 input
        raise argparse.ArgumentTypeError(f"the scales must include 1.0, got {s!r}")
    return out


def build_parser() -> argparse.ArgumentParser:
    p = DatasetArgumentParser(description=__doc__.split("\n\n")[0],
                              formatter_class=argparse.ArgumentDefaultsHelpFormatter, fill=dataset_args,
                              stage="run_sample")
    a = p.add_argument
    # Environment
    a("--num_workers", type=cli.nonneg_int, default=max(1, (os.cpu_count() or 2) // 2))
    add_dataset_arg(p)
    a("--voc12_root", default=None, help="dataset folder (default: the dataset's under the repository, "
      "data/VOC2012 for voc12)")
    a("--device", type=cli.device, default="auto",
      help=f"{cli.DEVICE_HELP} (cuda without index: one process per GPU)")
    a("--seed", type=cli.nonneg_int, default=0)
    a("--quiet", type=str2bool, default=False, help="hide progress bars")
    # Dataset
    a("--train_list", default=None, help="default: the dataset's training list (VOC voc12/train_aug.txt)")
    a("--infer_list", default=None, help="train_irn's displacement-mean pass (default: the dataset's seed "
      "list, VOC voc12/train.txt)")
    a("--cls_labels", default=None, help="default: the dataset's (VOC voc12/cls_labels.npy)")
    a("--chainer_eval_set", default="train", help="list scored by the eval steps (VOC: "
      "ImageSets/Segmentation/<set>.txt; COCO: train, val or val_part)")
    a("--eval_list", default=None, help="id list for the eval steps (overrides --chainer_eval_set)")
    # Class Activation Map
    a("--cam_network", type=model_name("--cam_network"), default="net.resnet38d",
      help="stage-one model of the checkpoint (models/registry.py; net.resnet38d = ktse's Net_gpp)")
    a("--cam_width", type=cli.positive_float, default=None, help="Net_gpp width multiplier (default: read from the checkpoint)")
    a("--cam_eval_thres", type=cli.fraction, default=0.15)
    a("--cam_scales", type=_scales, default=(1.0, 0.5, 1.5, 2.0), help="comma-separated")
    # Mining Inter-pixel Relations
    a("--conf_fg_thres", type=cli.fraction, default=0.30)
    a("--conf_bg_thres", type=cli.fraction, default=0.1)
    # Inter-pixel Relation Network (IRNet)
    # the radius-10 paths need a feature grid (crop/4) of at least 19 cells a side
    a("--irn_crop_size", type=cli.int_at_least(76, "radius-10 paths need a 19-cell grid"), default=512)
    a("--irn_batch_size", type=cli.positive_int, default=32)
    a("--irn_num_epoches", type=cli.positive_int, default=3)
    a("--irn_learning_rate", type=cli.positive_float, default=0.1)
    a("--irn_weight_decay", type=cli.nonneg_float, default=1e-4)
    a("--irn_fix_momentum", type=str2bool, default=False,
      help="use SGD momentum 0.9 (the reference passes weight_decay into the momentum slot: 1e-4)")
    a("--irn_backbone_width", type=cli.positive_int, default=64, help="ResNet-50 base width (64 = reference; smaller for toy runs)")
    a("--irn_backbone_init", default=str(REPO_ROOT / "pretrained" / "resnet50-19c8e357.pth"),
      help="torchvision ImageNet ResNet-50 file (https://download.pytorch.org/models/resnet50-19c8e357.pth), "
           "or 'none' for a random backbone (toy runs)")
    a("--resume", type=str2bool, default=False, help="continue train_irn from its last finished epoch")
    # Random Walk Params
    a("--beta", type=cli.positive_int, default=10)
    a("--exp_times", type=cli.nonneg_int, default=8, help="random walk = T^(2^exp_times)")
    a("--ins_seg_bg_thres", type=cli.fraction, default=0.25)
    a("--sem_seg_bg_thres", type=cli.fraction, default=0.25)
    a("--rw_mode", default="auto", choices=("auto", "dense", "chunked", "sparse"),
      help="dense = reference matrix squaring (float32); chunked = the same squaring in two (hw)^2 buffers; "
           "sparse = same walk by sparse iteration (float64); auto = per image on CUDA the first of dense, "
           "chunked, sparse that fits the free GPU memory, sparse on CPU")
    # Output Path
    a("--log_name", default="sample_train_eval", help="stdout is also written to <log_name>.log")
    a("--cam_weights_name", default=str(LAYOUT.cam_weights(31)), help="stage-one checkpoint, '.pth' appended")
    a("--irn_weights_name", default=str(LAYOUT.weights))
    a("--cam_out_dir", default=str(LAYOUT.cam))
    a("--ir_label_out_dir", default=str(LAYOUT.ir_label))
    a("--sem_seg_out_dir", default=str(LAYOUT.sem_seg))
    a("--ins_seg_out_dir", default=str(LAYOUT.ins_seg))
    a("--score_dir", default=str(LAYOUT.score))
    a("--overwrite", type=str2bool, nargs="?", const=True, default=False, help="redo outputs that exist")
    # Step
    # reference flags that do nothing here: stage one is trained by train.py, the IRN network is fixed
    cli.add_compat_flags(p, {
        "--val_list": dict(default=str(REPO_ROOT / "voc12" / "val.txt")),
        "--cam_crop_size": dict(type=cli.positive_int, default=512),
        "--cam_batch_size": dict(type=cli.positive_int, default=16),
        "--cam_num_epoches": dict(type=cli.positive_int, default=5),
        "--cam_learning_rate": dict(type=cli.positive_float, default=0.1),
        "--cam_weight_decay": dict(type=cli.nonneg_float, default=1e-4),
        "--irn_network": dict(default="net.resnet50_irn")})
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


def dataset_args(args: argparse.Namespace):
    """Fill ``--voc12_root``, ``--train_list``, ``--infer_list`` and ``--cls_labels`` left unset from the
    ``--dataset`` descriptor, as absolute paths under the repository (the reference's defaults do not
    depend on the working directory); returns the descriptor."""
    from tools.dataset import dataset_of, fill_dataset_defaults

    unset = [k for k in ("voc12_root", "train_list", "infer_list", "cls_labels") if getattr(args, k, None) is None]
    if "voc12_root" in unset:
        args.voc12_root = str(REPO_ROOT / dataset_of(args).default_root)
    ds = fill_dataset_defaults(args, "voc12_root", train_list="train_list", infer_list="seed_list",
                               cls_labels="cls_labels")
    root = Path(args.voc12_root).parts
    for k in unset:
        v = Path(getattr(args, k))
        if v.parts[:len(root)] != root:  # a repository file (voc12/train_aug.txt), not one under the data root
            setattr(args, k, str(REPO_ROOT / v))
    return ds


def enabled_steps(args: argparse.Namespace) -> list[str]:
    """The step modules ``run`` will execute, in order."""
    return [step for flag, step in STEP_ORDER if getattr(args, flag)]


def check_inputs(args: argparse.Namespace) -> None:
    """Raise ONE error naming every file the enabled steps need that is missing and that no enabled
    earlier step produces (each with where to get it), before any step runs or any folder is made:
    otherwise a missing ImageNet file would only be found after make_cam and the CRF pass."""
    from irn.steps.common import CAM_HINT
    from irn.steps.make_cam import CAM_WEIGHTS_HINT, cam_weights_path
    from irn.steps.train_irn import IMAGENET_HINT, default_imagenet_paths
    from tools.crf import INSTALL_HINT
    from tools.misc import get_device

    ds = dataset_args(args)
    LABELS_HINT, VOC_HINT = ds.labels_hint, ds.root_hint
    get_device(args.device)  # a CUDA device that is not there: say so now, not when the first step starts
    steps = enabled_steps(args)
    on = set(steps)
    root = Path(args.voc12_root)
    init = str(args.irn_backbone_init)
    train_irn = "train_irn" in on and (args.overwrite or not Path(args.irn_weights_name).exists())
    per_image = on & {"make_cam", "cam_to_ir_label", "train_irn", "make_sem_seg_labels"}
    evals = on & {"eval_cam", "eval_sem_seg"}
    eval_list = args.eval_list or ds.named_list(args.chainer_eval_set, root)
    cams = "make_cam" not in on and on & {"eval_cam", "cam_to_ir_label", "make_sem_seg_labels"}
    require_all([
        (args.train_list if per_image else None, "IRN image list (--train_list)", LABELS_HINT),
        (root / ds.image_folder if per_image else None, f"{ds.name} image folder (--voc12_root)", VOC_HINT, "dir"),
        (cam_weights_path(args.cam_weights_name) if "make_cam" in on else None,
         "stage-one checkpoint (--cam_weights_name + .pth)", CAM_WEIGHTS_HINT),
        (args.cls_labels if "make_cam" in on else None, "class-label file (--cls_labels)", LABELS_HINT),
        (args.cam_out_dir if cams else None, "CAM folder (--cam_out_dir)", CAM_HINT, "dir"),
        ("pydensecrf" if "cam_to_ir_label" in on else None, "pydensecrf (dense CRF for cam_to_ir_label)",
         INSTALL_HINT, "module"),
        (args.ir_label_out_dir if train_irn and "cam_to_ir_label" not in on else None,
         "IR-label folder (--ir_label_out_dir)", "run the cam_to_ir_label step (--cam_to_ir_label_pass true)", "dir"),
        (args.infer_list if train_irn else None, "list of train_irn's displacement pass (--infer_list)", LABELS_HINT),
        (default_imagenet_paths(init) if train_irn and init.lower() != "none" else None,
         "ImageNet ResNet-50 weights (--irn_backbone_init)", IMAGENET_HINT),
        (args.irn_weights_name if "make_sem_seg_labels" in on and "train_irn" not in on else None,
         "IRN weights (--irn_weights_name)", "run the train_irn step first (--train_irn_pass true)"),
        (eval_list if evals else None, "evaluation list (--eval_list / --chainer_eval_set)", VOC_HINT),
        (ds.gt_dir(root) if evals else None, f"{ds.name} ground-truth folder (--voc12_root)", VOC_HINT, "dir"),
        (args.sem_seg_out_dir if "eval_sem_seg" in on and "make_sem_seg_labels" not in on else None,
         "pseudo-label folder (--sem_seg_out_dir)", "run make_sem_seg_labels (--make_sem_seg_pass true)", "dir"),
    ], context=f"before any IRN step ran; enabled: {', '.join(steps) or 'none'}")


def run(args: argparse.Namespace) -> None:
    """Execute the switched-on steps in the reference order."""
    for flag, step in (("train_cam_pass", "train_cam"), ("make_ins_seg_pass", "make_ins_seg"),
                       ("eval_ins_seg_pass", "eval_ins_seg")):
        if getattr(args, flag):
            raise WSSSError(f"--{flag} true: the {step} step is not part of KTSE+ (stage one is trained with "
                            f"train.py; instance segmentation is not used). Switch it off.")
    check_inputs(args)
    for d in (args.cam_out_dir, args.ir_label_out_dir, args.sem_seg_out_dir, args.score_dir):
        Path(d).mkdir(parents=True, exist_ok=True)
    Path(args.irn_weights_name).parent.mkdir(parents=True, exist_ok=True)
    for flag, step in STEP_ORDER:
        if getattr(args, flag):
            module = importlib.import_module(f"irn.steps.{step}")
            with Timer(step):
                module.run(args)


def _run_logged(args: argparse.Namespace) -> None:
    """:func:`run` with stdout also written to ``<log_name>.log``; opening the log is inside the CLI's
    error path, so a read-only or full log folder is one error line."""
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


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return run_cli(_run_logged, args)


if __name__ == "__main__":
    sys.exit(main())
