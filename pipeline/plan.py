"""The pipeline's steps for each preset: the exact commands a user would type, where each writes,
and how its figures are read back.

Presets:

* ``toy``: the synthetic VOC-format set (``python -m voc12.toy``) at ``data/toy`` (``--size tiny``:
  ``data/toy_tiny``), small networks trained from scratch on CPU, every output under
  ``experiments/<name>/`` so nothing lands in ``irn/`` or ``segmentation/``.
* ``voc``: the reference settings on ``data/VOC2012`` with the seed commands' paths
  (``experiments/ktse1``, ``irn/result``, ``segmentation/data``), for GPU machines.

Stages (for ``--from`` / ``--to``): data → stage1 → irn → beco → crf; every step name is accepted too.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from pipeline.report import confusion_iou, eval_json_miou, parse_miou_line, read_json
from pipeline.runner import REPO_ROOT, PerIdOutputs, Step

STAGES = ("data", "stage1", "irn", "beco", "crf")
STAGE_TITLES = {"data": "data", "stage1": "stage one (KTSE+)", "irn": "IRN", "beco": "BECO", "crf": "BECO + CRF"}


@dataclass
class ToySize:
    """Everything that changes between the toy sizes (dataset and the small training budgets)."""

    n_train: int
    n_val: int
    max_size: int
    classes: int  # objects from the first N VOC classes (voc12.toy --classes)
    # stage one
    width: float
    epochs: int
    T: int
    batch_size: int
    crop: int
    resize: tuple[int, int]
    lr: float
    # IRN
    irn_crop: int  # >= 96: the affinity grid (crop/4) must exceed twice the PathIndex radius 10
    irn_batch: int
    irn_epochs: int
    irn_width: int
    # BECO
    beco_args: list  # flags on top of segmentation/configs/toy.json


TOY_SIZES: dict[str, ToySize] = {
    # the README's demo: <= 10 minutes on 2 CPU cores. 6 of the 20 classes (voc12.toy --classes): with
    # all 20 the classifier saw ~10 images per class and its seeds stayed near the baselines (10.7 %).
    # --momentum_fix (real SGD momentum) is passed for these from-scratch runs; the reference's 5e-4
    # momentum barely moved a random-init network in this budget.
    "small": ToySize(n_train=160, n_val=40, max_size=112, classes=6, width=0.125, epochs=20, T=18, batch_size=16,
                     crop=96, resize=(96, 128), lr=0.01, irn_crop=128, irn_batch=16, irn_epochs=3, irn_width=16,
                     beco_args=[]),
    # the CI test: <= 3 minutes; one KTSE epoch (T = epochs - 1) so the KTSE+ losses run end to end
    "tiny": ToySize(n_train=48, n_val=12, max_size=80, classes=4, width=0.125, epochs=30, T=29, batch_size=8,
                    crop=64, resize=(64, 96), lr=0.01, irn_crop=96, irn_batch=8, irn_epochs=3, irn_width=8,
                    beco_args=["--backbone_width", "8", "--max_epoch", "4", "--batch_size", "4", "--crop_size", "64",
                               "--val_size", "80"]),
}


@dataclass
class PipelineConfig:
    """Resolved settings of one run (paths relative to the repo root)."""

    preset: str
    name: str
    data_root: str
    size: str = "small"
    device: str = "auto"
    workers: int = 2
    exp_root: str = "experiments"
    threads: int = 0  # > 0: OMP_NUM_THREADS for every step (shown in front of each command)

    @property
    def exp_dir(self) -> str:
        return f"{self.exp_root}/{self.name}"

    @property
    def lists_dir(self) -> str:
        return f"{self.data_root}/lists" if self.preset == "toy" else "voc12"

    @property
    def toy(self) -> ToySize:
        return TOY_SIZES[self.size]


def default_config(preset: str, name: str | None = None, data_root: str | None = None, size: str = "small",
                   device: str = "auto", workers: int | None = None, exp_root: str = "experiments",
                   threads: int | None = None) -> PipelineConfig:
    """Settings of a preset. Toy runs use one thread per process by default: the toy networks are
    too small to gain from more, and on a busy 2-core machine torch's default thread pool spins and
    made infer.py 18x slower (measured: 0.16 vs 3.4 images/s)."""
    if preset == "toy":
        root = data_root or ("data/toy" if size == "small" else f"data/toy_{size}")
        return PipelineConfig("toy", name or ("toy" if size == "small" else f"toy_{size}"), root, size, device,
                              workers if workers is not None else min(2, os.cpu_count() or 1), exp_root,
                              1 if threads is None else threads)
    if preset == "voc":
        return PipelineConfig("voc", name or "ktse1", data_root or "data/VOC2012", size, device,
                              workers if workers is not None else min(8, os.cpu_count() or 1), exp_root,
                              0 if threads is None else threads)
    raise ValueError(f"unknown preset {preset!r} (toy or voc)")


def _rel(path: str, cwd: str) -> str:
    """``path`` (repo-relative) as seen from ``cwd`` (repo-relative)."""
    if cwd in ("", "."):
        return path
    return os.path.relpath(REPO_ROOT / path, REPO_ROOT / cwd)


def _eval_metrics(json_path: str):
    def read(_log: str) -> dict:
        obj = read_json(REPO_ROOT / json_path)
        if not obj:
            return {}
        out = {"miou": eval_json_miou(obj)}
        if obj.get("best_th") is not None:
            out["best_th"] = float(obj["best_th"])
        return out
    return read


def _toy_check(data_root: str, t: ToySize):
    """An existing toy set must have the requested size (else the figures would not be this preset's)."""
    def check(root: Path) -> str | None:
        meta = read_json(root / data_root / "toy_meta.json") or {}
        want = {"n_train": t.n_train, "n_val": t.n_val, "classes": t.classes}
        got = {"n_train": meta.get("n_train"), "n_val": meta.get("n_val"), "classes": meta.get("classes", 20)}
        if got != want or (meta.get("size") and meta["size"][1] != t.max_size):
            return (f"'{data_root}' holds a toy set made with other settings ({meta.get('n_train')} train, "
                    f"{meta.get('n_val')} val, {meta.get('classes', 20)} classes, sides {meta.get('size')}; wanted "
                    f"{t.n_train}, {t.n_val}, {t.classes} classes, max {t.max_size}). "
                    f"Delete it or pass another --data_root.")
        return None
    return check


def _json_miou(json_path: str, key: str):
    """Figures of a BECO step: ``key`` (a fraction) of its JSON, else its last printed mIoU line;
    plus the 21-class mean (stage-one definition) from the JSON's confusion matrix when present."""
    def read(log: str) -> dict:
        obj = read_json(REPO_ROOT / json_path) or {}
        m = obj.get(key)
        out = {"miou": float(m) * 100.0} if isinstance(m, (int, float)) else {}
        if not out:
            parsed = parse_miou_line(log)
            if parsed is not None:
                out["miou"] = parsed
        iou = confusion_iou(obj)
        if iou is not None:
            out["miou21"] = float(sum(iou) / len(iou))
        return out
    return read


# ----------------------------------------------------------------------------------------------


@dataclass
class Paths:
    """Where each stage writes (repo-relative)."""

    ckpt: str                # stage-one checkpoint of the epoch used downstream (…/NNNnet_main.pth)
    load_epo: int
    train_done: str          # the last epoch's checkpoint: training finished
    dict_dir: str            # stage-one CAM dictionaries
    cam_eval_json: str
    irn_root: str            # IRN result folder
    irn_sem_seg: str
    irn_score: str
    irn_mask: str
    irn_weights: str
    irn_eval_json: str
    beco_log_base: str       # BECO logging base (…/<tag>/ holds checkpoints, logits_msc, val_pred)
    beco_tag: str

    @property
    def beco_dir(self) -> str:
        return f"{self.beco_log_base}/{self.beco_tag}"


def paths_for(cfg: PipelineConfig) -> Paths:
    exp = cfg.exp_dir
    if cfg.preset == "toy":
        epo = cfg.toy.epochs - 1
        irn = f"{exp}/irn"
        return Paths(ckpt=f"{exp}/ckpt/{epo:03d}net_main.pth", load_epo=epo, train_done=f"{exp}/ckpt/{epo:03d}net_main.pth",
                     dict_dir=f"{exp}/dict",
                     cam_eval_json=f"{exp}/eval_cam.json", irn_root=irn, irn_sem_seg=f"{irn}/sem_seg",
                     irn_score=f"{irn}/score", irn_mask=f"{irn}/mask_irn", irn_weights=f"{irn}/res50_irn.pth",
                     irn_eval_json=f"{exp}/eval_irn.json", beco_log_base=f"{exp}/beco", beco_tag="seg")
    # the KTSE+ release is epoch 31 of 40 (seed command 1); training is done when epoch 39 is saved
    return Paths(ckpt=f"{exp}/ckpt/031net_main.pth", load_epo=31, train_done=f"{exp}/ckpt/039net_main.pth",
                 dict_dir=f"{exp}/dict",
                 cam_eval_json=f"{exp}/eval_cam.json", irn_root="irn/result", irn_sem_seg="segmentation/data/sem_seg",
                 irn_score="irn/result/score", irn_mask="segmentation/data/mask_irn",
                 irn_weights="irn/sess/res50_irn.pth", irn_eval_json=f"{exp}/eval_irn.json",
                 beco_log_base="segmentation/data/logging", beco_tag="seg_result")


#: which steps' outputs each step reads (pipeline.runner.Step.needs): redoing one redoes its readers,
#: transitively, and nothing before it (evaluation steps are read by nobody)
STEP_NEEDS: dict[str, tuple[str, ...]] = {
    "prepare": ("toy_data",), "train": ("prepare",), "infer": ("train",), "eval_cam": ("infer",),
    "run_sample": ("train",), "eval_irn": ("run_sample",), "gen_mask": ("run_sample",),
    "beco_train": ("run_sample", "gen_mask"), "beco_score": ("beco_train",), "beco_crf": ("beco_train",),
}


def build_steps(cfg: PipelineConfig) -> list[Step]:
    """Every step of the chain for ``cfg`` in order (selection by --from/--to happens later)."""
    p = paths_for(cfg)
    lists = cfg.lists_dir
    train_list, val_list, aug_list = f"{lists}/train.txt", f"{lists}/val.txt", f"{lists}/train_aug.txt"
    cls_labels = f"{lists}/cls_labels.npy"
    dev = ["--device", cfg.device] if cfg.device != "auto" else []
    steps: list[Step] = []
    toy = cfg.preset == "toy"
    t = cfg.toy if toy else None

    # ---- data
    if toy:
        steps.append(Step("toy_data", "data", ["python", "-m", "voc12.toy", "--out", cfg.data_root,
                                               "--n_train", str(t.n_train), "--n_val", str(t.n_val),
                                               "--max_size", str(t.max_size), "--classes", str(t.classes)],
                          outputs=[f"{cfg.data_root}/toy_meta.json"], check=_toy_check(cfg.data_root, t),
                          title="generate the toy VOC set"))
    steps.append(Step("prepare", "data", ["python", "voc12/prepare.py", "--voc_root", cfg.data_root,
                                          "--out_dir", lists],
                      outputs=[cls_labels, train_list, val_list, aug_list], title="lists and class labels"))

    # ---- stage one
    train = ["python", "train.py", "--name", cfg.name, "--model", "ktse"]
    if toy:
        train += ["--data_root", cfg.data_root, "--train_list", aug_list, "--val_list", train_list,
                  "--cls_labels", cls_labels, "--init", "none", "--width", str(t.width),
                  "--max_epochs", str(t.epochs), "--T", str(t.T), "--batch_size", str(t.batch_size),
                  "--crop", str(t.crop), str(t.crop), "--resize", str(t.resize[0]), str(t.resize[1]),
                  "--lr", str(t.lr), "--momentum_fix", "--workers", str(cfg.workers), "--val_epochs", "none"] + dev
    else:
        train += dev
    steps.append(Step("train", "stage1", train, outputs=[p.ckpt, p.train_done], resume_args=["--resume"],
                      resume_if=f"{cfg.exp_dir}/ckpt/last.pth", title="train the stage-one network"))
    infer = ["python", "infer.py", "--name", cfg.name, "--model", "ktse", "--load_epo", str(p.load_epo), "--dict",
             "--infer_list", aug_list]
    if toy:
        infer += ["--data_root", cfg.data_root, "--cls_labels", cls_labels, "--workers", str(cfg.workers)] + dev
    else:
        infer += dev
    steps.append(Step("infer", "stage1", infer, outputs=[PerIdOutputs(p.dict_dir, aug_list, ".npy")],
                      overwrite_args=["--overwrite"], title="multi-scale CAM dictionaries"))
    ev = ["python", "evaluation.py", "--name", cfg.name, "--task", "cam", "--dict_dir", "dict"]
    if toy:
        ev += ["--data_root", cfg.data_root, "--list", "train", "--workers", str(cfg.workers)]
    steps.append(Step("eval_cam", "stage1", ev, outputs=[p.cam_eval_json], metrics=_eval_metrics(p.cam_eval_json),
                      title="CAM-seed threshold sweep"))

    # ---- IRN (run from irn/)
    run_sample = ["python", "run_sample.py"]
    ckpt_noext = _rel(p.ckpt[:-len(".pth")], "irn")
    run_sample += ["--voc12_root", _rel(cfg.data_root, "irn"), "--train_list", _rel(aug_list, "irn"),
                   "--infer_list", _rel(train_list, "irn"), "--cls_labels", _rel(cls_labels, "irn"),
                   "--cam_weights_name", ckpt_noext]
    if toy:
        irn = _rel(p.irn_root, "irn")
        run_sample += ["--cam_out_dir", f"{irn}/cam", "--ir_label_out_dir", f"{irn}/ir_label",
                       "--sem_seg_out_dir", _rel(p.irn_sem_seg, "irn"), "--score_dir", _rel(p.irn_score, "irn"),
                       "--irn_weights_name", _rel(p.irn_weights, "irn"), "--irn_crop_size", str(t.irn_crop),
                       "--irn_batch_size", str(t.irn_batch), "--irn_num_epoches", str(t.irn_epochs),
                       "--irn_backbone_width", str(t.irn_width), "--irn_backbone_init", "none",
                       "--irn_fix_momentum", "true",
                       "--num_workers", str(cfg.workers), "--log_name", f"{irn}/sample_train_eval"] + dev
    else:
        run_sample += dev
    steps.append(Step("run_sample", "irn", run_sample, cwd="irn",
                      outputs=[PerIdOutputs(p.irn_sem_seg, aug_list, ".png")],
                      overwrite_args=["--overwrite"], title="IRN: CAMs, IR labels, IRN training, random walk"))
    steps.append(Step("eval_irn", "irn", ["python", "evaluation.py", "--name", cfg.name, "--task", "png",
                                          "--pred_dir", p.irn_sem_seg, "--data_root", cfg.data_root,
                                          "--list", "train", "--workers", str(cfg.workers),
                                          "--out_json", p.irn_eval_json],
                      outputs=[p.irn_eval_json], metrics=_eval_metrics(p.irn_eval_json),
                      title="score the IRN pseudo-labels"))
    gen_mask = ["python", "gen_mask.py"]
    gen_mask += ["--score_dir", _rel(p.irn_score, "irn"), "--mask_dir", _rel(p.irn_mask, "irn")]
    steps.append(Step("gen_mask", "irn", gen_mask, cwd="irn", outputs=[PerIdOutputs(p.irn_mask, aug_list, ".png")],
                      overwrite_args=["--overwrite"], title="confidence masks"))

    # ---- BECO (run from segmentation/). main.py trains, then (as the reference) tests the last-epoch
    # weights, writing logits_msc/ and test_metrics.json; test.py scores those logits without and
    # with the dense CRF and writes val_metrics[_crf].json (with the confusion matrix).
    seg = "segmentation"
    beco = ["python", "main.py"] + (["-dist", "--amp"] if not toy else []) + ["--logging_tag", p.beco_tag]
    if toy:
        # segmentation/configs/toy.json: the BECO helper's CPU toy settings (ResNet-18 width 16, lr 0.05,
        # crop 96, 8 epochs); the tiny size shrinks them further on the command line
        beco += ["--config", "configs/toy.json", "--logging_path_base", _rel(p.beco_log_base, seg),
                 "--data_root", _rel(cfg.data_root, seg), "--sem_seg_dir", _rel(p.irn_sem_seg, seg),
                 "--mask_dir", _rel(p.irn_mask, seg), "--train_list", _rel(aug_list, seg),
                 "--val_list", _rel(val_list, seg)] + t.beco_args + dev
    else:
        beco += dev
    logits = f"{p.beco_dir}/logits_msc"
    steps.append(Step("beco_train", "beco", beco, cwd=seg,
                      outputs=[f"{p.beco_dir}/test_metrics.json", PerIdOutputs(logits, val_list, ".npy")],
                      metrics=_json_miou(f"{p.beco_dir}/test_metrics.json", "miou"),
                      resume_args=["--resume"], resume_if=f"{p.beco_dir}/*ckpt*.pth", overwrite_args=["--overwrite"],
                      title="train DeepLabV2 with BECO, then test (multi-scale logits)"))
    test = ["python", "test.py", "--logits_dir", _rel(logits, seg), "--mode", "val"]
    if toy:
        test += ["--n-jobs", str(cfg.workers), "--data_root", _rel(cfg.data_root, seg), "--list", _rel(val_list, seg)]
    steps.append(Step("beco_score", "beco", test, cwd=seg, outputs=[f"{p.beco_dir}/val_metrics.json"],
                      metrics=_json_miou(f"{p.beco_dir}/val_metrics.json", "mIoU"), overwrite_args=["--overwrite"],
                      title="score the multi-scale logits (no CRF)"))
    steps.append(Step("beco_crf", "crf", test[:2] + ["--crf"] + test[2:], cwd=seg,
                      outputs=[f"{p.beco_dir}/val_metrics_crf.json"],
                      metrics=_json_miou(f"{p.beco_dir}/val_metrics_crf.json", "mIoU"), overwrite_args=["--overwrite"],
                      title="dense CRF on the logits, score"))
    needs = external_inputs(cfg)
    for s in steps:
        s.requires = needs.get(s.name, [])
    names = {s.name for s in steps}
    for s in steps:
        s.needs = [n for n in STEP_NEEDS.get(s.name, ()) if n in names]
    if cfg.threads > 0:
        for s in steps:
            s.env = {"OMP_NUM_THREADS": str(cfg.threads), **s.env}
    return steps


def external_inputs(cfg: PipelineConfig) -> dict[str, list[tuple]]:
    """Per step, what it reads that no step of the pipeline makes (see ``Step.requires``): for voc the
    VOC tree, the lists (when ``prepare`` is not run), the ImageNet weights of stage one, IRN and BECO;
    the toy preset makes its own data and trains from scratch. Both need pydensecrf."""
    from tools.crf import INSTALL_HINT

    crf = ("pydensecrf", "pydensecrf (dense CRF)", INSTALL_HINT, "module")
    out: dict[str, list[tuple]] = {"run_sample": [crf], "beco_crf": [crf]}
    if cfg.preset == "toy":
        return out
    # lazy: these modules import torch, which toy runs and --dry_run do not need here
    from infer import CKPT_HINT
    from irn.steps.train_irn import IMAGENET_HINT, default_imagenet_paths
    from models.mxnet_params import RESNET38_IMAGENET_HINT
    from segmentation.beco.deeplabv2 import IMAGENET_URLS
    from train import DEFAULT_INIT
    from voc12.lists import LABELS_HINT, VOC_HINT

    p = paths_for(cfg)
    root, lists = cfg.data_root, cfg.lists_dir
    jpeg = (f"{root}/JPEGImages", "VOC JPEGImages folder", VOC_HINT, "dir")
    gt = (f"{root}/SegmentationClass", "VOC SegmentationClass folder", VOC_HINT, "dir")
    seg_lists = [(f"{root}/ImageSets/Segmentation/{n}.txt", f"VOC {n} list", VOC_HINT) for n in ("train", "val")]
    made = [(f"{lists}/{n}", f"image list / labels {lists}/{n}", LABELS_HINT)
            for n in ("train_aug.txt", "train.txt", "cls_labels.npy")]
    ckpt = (p.ckpt, "stage-one checkpoint", CKPT_HINT)
    resnet50 = ([f"pretrained/{default_imagenet_paths(None)[0].name}"] + default_imagenet_paths(None),
                "ImageNet ResNet-50 weights of IRN", IMAGENET_HINT)
    aug = (["segmentation/data/VOC2012/SegmentationClassAug", f"{root}/SegmentationClassAug"],
           "VOC SegmentationClassAug folder (BECO's val ground truth)",
           "get the DeepLab/PSA 'SegmentationClassAug' release (SBD + VOC masks) into <VOC root>/SegmentationClassAug "
           "(see README.md, data table)", "dir")
    out.update({
        "prepare": seg_lists,
        "train": [jpeg, gt, (DEFAULT_INIT, "ImageNet ResNet-38 weights", RESNET38_IMAGENET_HINT)] + made,
        "infer": [jpeg, ckpt] + made,
        "eval_cam": [gt, seg_lists[0]],
        "run_sample": [jpeg, ckpt, resnet50, crf] + made,
        "eval_irn": [gt, seg_lists[0]],
        "beco_train": [("segmentation/data/model_zoo/resnet-101_v2.pth", "ImageNet ResNet-101 weights of BECO",
                        f"download {IMAGENET_URLS['resnet101']}")],
        "beco_score": [aug],
        "beco_crf": [aug, crf],
    })
    return out


def select_steps(steps: list[Step], start: str | None, stop: str | None) -> list[Step]:
    """Steps from ``start`` to ``stop`` inclusive; each may be a stage name or a step name."""
    names = [s.name for s in steps]

    def index(key: str, first: bool) -> int:
        if key in names:
            return names.index(key)
        idx = [i for i, s in enumerate(steps) if s.stage == key]
        if not idx:
            raise ValueError(f"unknown stage or step {key!r}; stages: {', '.join(STAGES)}; steps: {', '.join(names)}")
        return idx[0] if first else idx[-1]

    a = index(start, True) if start else 0
    b = index(stop, False) if stop else len(steps) - 1
    if a > b:
        raise ValueError(f"--from {start} comes after --to {stop}")
    return steps[a:b + 1]
