"""The pipeline's steps for each preset: the exact commands a user would type, where each writes,
and how its figures are read back.

Presets:

* ``toy``: the synthetic VOC-format set (``python -m voc12.toy``) at ``data/toy`` (``--size tiny``:
  ``data/toy_tiny``), small networks trained on CPU (IRN's frozen backbone from the stand-in pretraining of
  ``models/pretrain.py``, the others from scratch; docs/toy.md), every output under
  ``experiments/<name>/`` so nothing lands in ``irn/`` or ``segmentation/``.
* ``voc``: the reference settings on ``data/VOC2012`` with the paths of the authors' README commands
  (``experiments/ktse1``, ``irn/result``, ``segmentation/data``), for GPU machines.
* ``coco``: MS COCO 2014 at ``data/COCO2014`` (``coco14/prepare.py`` makes the masks and lists), each stage
  with its COCO settings (the ``coco14`` descriptor's defaults, docs/deviations.md "COCO 2014"), every
  output under ``experiments/<name>/`` (default ``ktse_coco``).

``--dataset coco14`` with the toy preset uses the COCO-format toy set (``python -m coco14.toy``, at
``data/coco_toy``) with the toy sizes below; :data:`DATA_RECIPES` holds what differs per dataset.

Stages (for ``--from`` / ``--to``): data → stage1 → irn → beco → crf; every step name is accepted too.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable

from pipeline.report import present_miou, read_json
from pipeline.runner import REPO_ROOT, PerIdOutputs, Step
from tools.layout import BECOLayout, IRNLayout, StageOneLayout
from tools.dataset import get_dataset
from tools.metrics import read_metrics
from tools.seed_eval import sweep_edge
from voc12.dataset import VOC_CLASSES

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
    # IRN's stand-in pretraining (models/pretrain.py) and random walk; docs/toy.md says how each was chosen
    pretrain_epochs: int = 40
    irn_exp_times: int = 3  # the walk's reach scaled to the toy's grid (28 cells against VOC's 125)
    irn_bg_thres: float = 0.35


TOY_SIZES: dict[str, ToySize] = {
    # the README's demo: <= 10 minutes on 2 CPU cores. 6 of the 20 classes (voc12.toy --classes): with
    # all 20 the classifier saw ~10 images per class and its seeds stayed near the baselines (10.7 %).
    # --momentum_fix (real SGD momentum) is passed for these from-scratch runs; the reference's 5e-4
    # momentum barely moved a random-init network in this budget.
    "small": ToySize(n_train=160, n_val=40, max_size=112, classes=6, width=0.125, epochs=20, T=18, batch_size=16,
                     crop=96, resize=(96, 128), lr=0.01, irn_crop=128, irn_batch=8, irn_epochs=15, irn_width=16,
                     beco_args=[]),
    # the CI test: <= 3 minutes; one KTSE epoch (T = epochs - 1) so the KTSE+ losses run end to end
    "tiny": ToySize(n_train=48, n_val=12, max_size=80, classes=4, width=0.125, epochs=30, T=29, batch_size=8,
                    crop=64, resize=(64, 96), lr=0.01, irn_crop=96, irn_batch=8, irn_epochs=15, irn_width=16,
                    beco_args=["--backbone_width", "8", "--max_epoch", "4", "--batch_size", "4", "--crop_size", "64",
                               "--val_size", "80"]),
}
#: the same budgets on the COCO-format toy set, whose objects always come from its 6 categories
#: (coco14.toy.TOY_CATEGORY_IDS); its images hold 1-3 objects and crowd regions, and the few without a
#: non-crowd label are left out of the lists by coco14/prepare.py
COCO_TOY_SIZES: dict[str, ToySize] = {k: replace(v, classes=6) for k, v in TOY_SIZES.items()}


@dataclass(frozen=True)
class DataRecipe:
    """What the pipeline does differently per dataset: the toy set and its generator, the full-size
    preset, where ``prepare`` writes the lists and labels, and the training list's file name."""

    label: str  # the dataset's name in step titles
    toy_module: str  # ``python -m <toy_module> --out <root> ...`` writes the toy set
    toy_root: str  # data root of the small toy set (other sizes: ``<toy_root>_<size>``)
    toy_name: str  # experiment name of the small toy run (other sizes: ``<toy_name>_<size>``)
    toy_sizes: dict[str, ToySize]
    toy_class_flag: bool  # the generator takes --classes (VOC); COCO's toy categories are fixed
    preset: str  # the full-size preset
    name: str  # its experiment name
    lists_under_root: bool  # prepare writes lists + labels under the data root (COCO), else to lists_dir
    train_list_file: str  # the training list: train_aug.txt (VOC) / train.txt (COCO)
    prepare: Callable[["PipelineConfig", str], list[str]]  # (cfg, lists dir) -> the prepare command


DATA_RECIPES: dict[str, DataRecipe] = {
    "voc12": DataRecipe("VOC", "voc12.toy", "data/toy", "toy", TOY_SIZES, True, "voc", "ktse1", False, "train_aug.txt",
                        lambda cfg, lists: ["python", "voc12/prepare.py", "--voc_root", cfg.data_root,
                                            "--out_dir", lists]),
    "coco14": DataRecipe("COCO", "coco14.toy", "data/coco_toy", "coco_toy", COCO_TOY_SIZES, False, "coco", "ktse_coco", True,
                         "train.txt",
                         lambda cfg, lists: ["python", "coco14/prepare.py", "--coco_root", cfg.data_root,
                                             "--workers", str(cfg.workers)]),
}
#: the full-size presets and the dataset each runs on
PRESET_DATASETS: dict[str, str] = {r.preset: name for name, r in DATA_RECIPES.items()}


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
    dataset: str = "voc12"  # tools.dataset name, passed to every stage as --dataset (voc12: not written)

    @property
    def exp_dir(self) -> str:
        return f"{self.exp_root}/{self.name}"

    @property
    def recipe(self) -> DataRecipe:
        return DATA_RECIPES[self.dataset]

    @property
    def lists_dir(self) -> str:
        if self.recipe.lists_under_root:
            return self.data_root
        return f"{self.data_root}/lists" if self.preset == "toy" else "voc12"

    @property
    def toy(self) -> ToySize:
        return self.recipe.toy_sizes[self.size]


def default_config(preset: str, name: str | None = None, data_root: str | None = None, size: str = "small",
                   device: str = "auto", workers: int | None = None, exp_root: str = "experiments",
                   threads: int | None = None, dataset: str | None = None) -> PipelineConfig:
    """Settings of a preset. Toy runs use one thread per process by default: the toy networks are
    too small to gain from more, and on a busy 2-core machine torch's default thread pool spins and
    made infer.py 18x slower (measured: 0.16 vs 3.4 images/s). ``dataset``: default the preset's own
    (coco -> coco14), voc12 for toy."""
    dataset = dataset or PRESET_DATASETS.get(preset, "voc12")
    if preset == "toy":
        r = DATA_RECIPES[dataset]
        suffix = "" if size == "small" else f"_{size}"
        return PipelineConfig("toy", name or r.toy_name + suffix, data_root or r.toy_root + suffix, size, device,
                              workers if workers is not None else min(2, os.cpu_count() or 1), exp_root,
                              1 if threads is None else threads, dataset)
    if preset in PRESET_DATASETS:
        if dataset != PRESET_DATASETS[preset]:
            raise ValueError(f"--preset {preset} runs on {PRESET_DATASETS[preset]}, not --dataset {dataset} "
                             f"(the {dataset} preset is --preset {DATA_RECIPES[dataset].preset})")
        r = DATA_RECIPES[dataset]
        return PipelineConfig(preset, name or r.name, data_root or get_dataset(dataset).default_root, size, device,
                              workers if workers is not None else min(8, os.cpu_count() or 1), exp_root,
                              0 if threads is None else threads, dataset)
    raise ValueError(f"unknown preset {preset!r} (toy, {', '.join(PRESET_DATASETS)})")


def _rel(path: str, cwd: str) -> str:
    """``path`` (repo-relative) as seen from ``cwd`` (repo-relative)."""
    if cwd in ("", "."):
        return path
    return os.path.relpath(REPO_ROOT / path, REPO_ROOT / cwd)


def _metrics(json_path: str | Path):
    """A step's figures from the metrics record it wrote (tools.metrics.metrics_record; the JSON
    only, never its log): ``miou`` (percent, the scorer's own definition), ``miou21`` (the mean over
    all classes, the stage-one formula), ``miou_present`` (over the classes present in the ground
    truth, BECO test.py's definition, from the record's confusion matrix) and ``best_th`` of a
    threshold sweep, with ``best_th_edge`` (``top`` / ``bottom``) when it is the last / first threshold swept."""
    def read(_log: str) -> dict:
        rec = read_metrics(REPO_ROOT / json_path)
        if not rec:
            return {}
        out = {"miou": float(rec["miou"]), "miou21": float(rec["miou_all"])}
        if rec.get("confusion_matrix") is not None:  # the headline mean (report.present_miou)
            out["miou_present"] = present_miou(rec["confusion_matrix"])
        if rec.get("best_th") is not None:
            out["best_th"] = float(rec["best_th"])
            edge = sweep_edge(rec.get("thresholds") or [], out["best_th"])
            if edge:
                out["best_th_edge"] = edge
        return out
    return read


def _toy_check(data_root: str, t: ToySize, classes: bool = True):
    """An existing toy set must have the requested size (else the figures would not be this preset's);
    ``classes``: its generator takes --classes (the COCO toy's categories are fixed)."""
    def check(root: Path) -> str | None:
        meta = read_json(root / data_root / "toy_meta.json") or {}
        every = len(VOC_CLASSES)  # a toy set made before --classes existed holds every VOC class
        want = {"n_train": t.n_train, "n_val": t.n_val, "classes": t.classes if classes else None}
        got = {"n_train": meta.get("n_train"), "n_val": meta.get("n_val"),
               "classes": meta.get("classes", every) if classes else None}
        if got != want or (meta.get("size") and meta["size"][1] != t.max_size):
            return (f"'{data_root}' holds a toy set made with other settings ({meta.get('n_train')} train, "
                    f"{meta.get('n_val')} val, {meta.get('classes', every)} classes, sides {meta.get('size')}; wanted "
                    f"{t.n_train}, {t.n_val}, {t.classes} classes, max {t.max_size}). "
                    f"Delete it or pass another --data_root.")
        return None
    return check


# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Paths:
    """Where each stage writes (repo-relative): the three layouts of :mod:`tools.layout` plus the
    stage-one epochs used downstream, as the strings the commands take."""

    stage1: StageOneLayout
    irn: IRNLayout
    beco: BECOLayout
    load_epo: int            # the stage-one checkpoint used downstream
    last_epo: int            # its last epoch: training is done when this checkpoint exists

    @property
    def ckpt(self) -> str:
        return str(self.stage1.checkpoint(self.load_epo))

    @property
    def train_done(self) -> str:
        return str(self.stage1.checkpoint(self.last_epo))

    @property
    def dict_dir(self) -> str:
        return str(self.stage1.dict)

    @property
    def cam_eval_json(self) -> str:
        return str(self.stage1.eval_json("cam"))

    @property
    def irn_eval_json(self) -> str:
        return str(self.stage1.eval_json("irn"))

    @property
    def irn_root(self) -> str:
        return str(self.irn.result)

    @property
    def irn_sem_seg(self) -> str:
        return str(self.irn.sem_seg)

    @property
    def irn_score(self) -> str:
        return str(self.irn.score)

    @property
    def irn_mask(self) -> str:
        return str(self.irn.mask)

    @property
    def irn_weights(self) -> str:
        return str(self.irn.weights)

    @property
    def beco_log_base(self) -> str:
        """BECO's logging base (``<base>/<tag>/`` holds checkpoints, logits_msc, val_pred)."""
        return str(self.beco.logdir.parent)

    @property
    def beco_tag(self) -> str:
        return self.beco.logdir.name

    @property
    def beco_dir(self) -> str:
        return str(self.beco.logdir)


def beco_epochs(t: ToySize) -> int:
    """BECO's epochs in a toy run: segmentation/configs/toy.json's, or the size's --max_epoch."""
    if "--max_epoch" in t.beco_args:
        return int(t.beco_args[t.beco_args.index("--max_epoch") + 1])
    cfg = read_json(REPO_ROOT / "segmentation" / "configs" / "toy.json") or {}
    return int(cfg.get("runner", {}).get("max_epoch", 8))


def train_pred_layout(cfg: PipelineConfig) -> BECOLayout:
    """Where a toy run's BECO predictions of the training images go (``<exp>/beco/seg_train``)."""
    p = paths_for(cfg)
    return BECOLayout.of(p.beco_log_base, p.beco_tag + "_train")


def pretrained_path(cfg: PipelineConfig) -> str:
    """The toy set's stand-in IRN backbone (models/pretrain.py), kept beside the data like a download."""
    return f"{cfg.data_root}/pretrained/resnet50_w{cfg.toy.irn_width}.pth"


def paths_for(cfg: PipelineConfig) -> Paths:
    stage1 = StageOneLayout(Path(cfg.exp_dir))
    if cfg.preset != "voc":
        # toy: its own epochs; coco: the last epoch of the descriptor's schedule (no checkpoint selection)
        epochs = cfg.toy.epochs if cfg.preset == "toy" else get_dataset(cfg.dataset).stage_defaults("train")["max_epochs"]
        epo = epochs - 1
        return Paths(stage1, IRNLayout.under(stage1.root / "irn"), BECOLayout.of(stage1.root / "beco", "seg"), epo, epo)
    # the KTSE+ release is epoch 31 of 40; training is done when epoch 39 is saved
    return Paths(stage1, IRNLayout.reference(Path(".")), BECOLayout.reference("seg_result", Path(".")), 31, 39)


#: which steps' outputs each step reads (pipeline.runner.Step.needs): redoing one redoes its readers,
#: transitively, and nothing before it (evaluation steps are read by nobody)
STEP_NEEDS: dict[str, tuple[str, ...]] = {
    "prepare": ("toy_data",), "pretrain": ("prepare",), "train": ("prepare",), "infer": ("train",),
    "eval_cam": ("infer",), "run_sample": ("train", "pretrain"), "eval_irn": ("run_sample",), "gen_mask": ("run_sample",),
    "beco_train": ("run_sample", "gen_mask"), "beco_train_pred": ("beco_train",), "beco_score": ("beco_train",),
    "beco_crf": ("beco_train",),
}


#: the steps whose command takes --dataset (every stage CLI; the data steps are per dataset)
DATASET_STEPS = ("pretrain", "train", "infer", "eval_cam", "run_sample", "eval_irn", "gen_mask", "beco_train",
                 "beco_train_pred", "beco_score", "beco_crf")


def build_steps(cfg: PipelineConfig) -> list[Step]:
    """Every step of the chain for ``cfg`` in order (selection by --from/--to happens later)."""
    p = paths_for(cfg)
    lists = cfg.lists_dir
    r = cfg.recipe
    train_list, val_list, aug_list = f"{lists}/train.txt", f"{lists}/val.txt", f"{lists}/{r.train_list_file}"
    cls_labels = f"{lists}/cls_labels.npy"
    dev = ["--device", cfg.device] if cfg.device != "auto" else []
    steps: list[Step] = []
    toy = cfg.preset == "toy"
    t = cfg.toy if toy else None
    # the commands name their data, lists and output folders (every preset but voc, whose commands are
    # the authors' README ones); the per-stage COCO settings come from the descriptor through --dataset
    explicit = cfg.preset != "voc"

    # ---- data
    if toy:
        steps.append(Step("toy_data", "data", ["python", "-m", r.toy_module, "--out", cfg.data_root,
                                               "--n_train", str(t.n_train), "--n_val", str(t.n_val),
                                               "--max_size", str(t.max_size)]
                          + (["--classes", str(t.classes)] if r.toy_class_flag else []),
                          outputs=[f"{cfg.data_root}/toy_meta.json"],
                          check=_toy_check(cfg.data_root, t, r.toy_class_flag),
                          title=f"generate the toy {r.label} set"))
    made = [cls_labels] + list(dict.fromkeys([train_list, val_list, aug_list]))
    if r.lists_under_root:  # COCO: prepare also makes the ground-truth masks
        made.append(str(get_dataset(cfg.dataset).gt_dir(cfg.data_root)))
    steps.append(Step("prepare", "data", r.prepare(cfg, lists), outputs=made,
                      title="lists and class labels" + (" (and the masks)" if r.lists_under_root else "")))

    # ---- stage one
    train = ["python", "train.py", "--name", cfg.name, "--model", "ktse"]
    if explicit:
        train += ["--data_root", cfg.data_root, "--train_list", aug_list, "--val_list", train_list,
                  "--cls_labels", cls_labels]
    if toy:
        train += ["--init", "none", "--width", str(t.width),
                  "--max_epochs", str(t.epochs), "--T", str(t.T), "--batch_size", str(t.batch_size),
                  "--crop", str(t.crop), str(t.crop), "--resize", str(t.resize[0]), str(t.resize[1]),
                  "--lr", str(t.lr), "--momentum_fix", "--workers", str(cfg.workers), "--val_epochs", "none"]
    train += dev
    steps.append(Step("train", "stage1", train, outputs=[p.ckpt, p.train_done], resume_args=["--resume"],
                      resume_if=str(p.stage1.last), title="train the stage-one network"))
    infer = ["python", "infer.py", "--name", cfg.name, "--model", "ktse", "--load_epo", str(p.load_epo), "--dict",
             "--infer_list", aug_list]
    if explicit:
        infer += ["--data_root", cfg.data_root, "--cls_labels", cls_labels]
    if toy:
        infer += ["--workers", str(cfg.workers)]
    infer += dev
    steps.append(Step("infer", "stage1", infer, outputs=[PerIdOutputs(p.dict_dir, aug_list, ".npy")],
                      overwrite_args=["--overwrite"], title="multi-scale CAM dictionaries"))
    ev = ["python", "evaluation.py", "--name", cfg.name, "--task", "cam", "--dict_dir", p.stage1.dict.name]
    if explicit:
        ev += ["--data_root", cfg.data_root, "--list", "train"]
    if toy:
        ev += ["--workers", str(cfg.workers)]
    steps.append(Step("eval_cam", "stage1", ev, outputs=[p.cam_eval_json], metrics=_metrics(p.cam_eval_json),
                      title="CAM-seed threshold sweep"))

    # ---- IRN (run from irn/)
    if toy:  # IRN's backbone: a stand-in for the ImageNet file, made once per toy set (docs/toy.md)
        steps.append(Step("pretrain", "irn", ["python", "-m", "models.pretrain", "--data_root", cfg.data_root,
                                              "--train_list", aug_list, "--cls_labels", cls_labels,
                                              "--width", str(t.irn_width), "--epochs", str(t.pretrain_epochs),
                                              "--out", pretrained_path(cfg)],
                          outputs=[pretrained_path(cfg)],
                          title="stand-in pretraining of IRN's backbone (image-level labels only)"))
    run_sample = ["python", "run_sample.py"]
    ckpt_noext = _rel(p.ckpt[:-len(".pth")], "irn")
    run_sample += ["--voc12_root", _rel(cfg.data_root, "irn"), "--train_list", _rel(aug_list, "irn"),
                   "--infer_list", _rel(train_list, "irn"), "--cls_labels", _rel(cls_labels, "irn"),
                   "--cam_weights_name", ckpt_noext]
    irn = _rel(p.irn_root, "irn")
    if explicit:
        run_sample += ["--cam_out_dir", _rel(str(p.irn.cam), "irn"), "--ir_label_out_dir", _rel(str(p.irn.ir_label), "irn"),
                       "--sem_seg_out_dir", _rel(p.irn_sem_seg, "irn"), "--score_dir", _rel(p.irn_score, "irn"),
                       "--irn_weights_name", _rel(p.irn_weights, "irn")]
    if toy:
        run_sample += ["--irn_crop_size", str(t.irn_crop),
                       "--irn_batch_size", str(t.irn_batch), "--irn_num_epoches", str(t.irn_epochs),
                       "--irn_backbone_width", str(t.irn_width),
                       "--irn_backbone_init", _rel(pretrained_path(cfg), "irn"),
                       "--exp_times", str(t.irn_exp_times), "--sem_seg_bg_thres", str(t.irn_bg_thres),
                       "--irn_fix_momentum", "true", "--num_workers", str(cfg.workers)]
    if explicit:
        run_sample += ["--log_name", f"{irn}/sample_train_eval"]
    run_sample += dev
    steps.append(Step("run_sample", "irn", run_sample, cwd="irn",
                      outputs=[PerIdOutputs(p.irn_sem_seg, aug_list, ".png")],
                      overwrite_args=["--overwrite"], title="IRN: CAMs, IR labels, IRN training, random walk",
                      # an interrupted IRN training leaves <weights>.resume after each epoch: continue it
                      resume_args=["--resume", "true"], resume_if=p.irn_weights + ".resume"))
    steps.append(Step("eval_irn", "irn", ["python", "evaluation.py", "--name", cfg.name, "--task", "png",
                                          "--pred_dir", p.irn_sem_seg, "--data_root", cfg.data_root,
                                          "--list", "train", "--workers", str(cfg.workers),
                                          "--out_json", p.irn_eval_json],
                      outputs=[p.irn_eval_json], metrics=_metrics(p.irn_eval_json),
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
        # crop 96, 16 epochs); the tiny size shrinks them further on the command line
        beco += ["--config", "configs/toy.json"]
    if explicit:  # (coco: the settings file is the descriptor's, configs/beco_deeplabv2_coco.json)
        beco += ["--logging_path_base", _rel(p.beco_log_base, seg),
                 "--data_root", _rel(cfg.data_root, seg), "--sem_seg_dir", _rel(p.irn_sem_seg, seg),
                 "--mask_dir", _rel(p.irn_mask, seg), "--train_list", _rel(aug_list, seg),
                 "--val_list", _rel(val_list, seg)]
    if toy:
        beco += t.beco_args
    beco += dev
    logits = str(p.beco.logits_msc)
    steps.append(Step("beco_train", "beco", beco, cwd=seg,
                      outputs=[str(p.beco.test_metrics), PerIdOutputs(logits, val_list, ".npy")],
                      metrics=_metrics(p.beco.test_metrics),
                      resume_args=["--resume"], resume_if=str(p.beco.logdir / "*ckpt*.pth"), overwrite_args=["--overwrite"],
                      title="train DeepLabV2 with BECO, then test (multi-scale logits)"))
    if toy:
        # the trained segmenter on the training images as well (the same images as the seeds and
        # pseudo-labels): BECO's figure on train and the report's example pictures
        tp = train_pred_layout(cfg)
        pred = ["python", "main.py", "--test", "--ckpt", _rel(str(p.beco.ckpt_epoch(beco_epochs(t))), seg),
                "--logging_tag", tp.logdir.name, "--config", "configs/toy.json",
                "--logging_path_base", _rel(p.beco_log_base, seg), "--data_root", _rel(cfg.data_root, seg),
                "--val_list", _rel(train_list, seg)] + t.beco_args + dev
        steps.append(Step("beco_train_pred", "beco", pred, cwd=seg,
                          outputs=[str(tp.test_metrics), PerIdOutputs(str(tp.logits_msc), train_list, ".npy")],
                          metrics=_metrics(tp.test_metrics),
                          title="BECO's predictions on the training images (figure on train, report pictures)"))
    test = ["python", "test.py", "--logits_dir", _rel(logits, seg), "--mode", "val"]
    if toy:
        test += ["--n-jobs", str(cfg.workers)]
    if explicit:
        test += ["--data_root", _rel(cfg.data_root, seg), "--list", _rel(val_list, seg)]
    steps.append(Step("beco_score", "beco", test, cwd=seg, outputs=[str(p.beco.val_metrics())],
                      metrics=_metrics(p.beco.val_metrics()), overwrite_args=["--overwrite"],
                      title="score the multi-scale logits (no CRF)"))
    steps.append(Step("beco_crf", "crf", test[:2] + ["--crf"] + test[2:], cwd=seg,
                      outputs=[str(p.beco.val_metrics(crf=True))],
                      metrics=_metrics(p.beco.val_metrics(crf=True)), overwrite_args=["--overwrite"],
                      title="dense CRF on the logits, score"))
    if cfg.dataset != "voc12":  # VOC commands stay the authors' (voc12 is every stage's default)
        for s in steps:
            if s.name in DATASET_STEPS:
                s.argv += ["--dataset", cfg.dataset]
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
    for coco the COCO images and annotation files and the same weights; the toy preset makes its own
    data and trains from scratch. All need pydensecrf."""
    from tools.crf import INSTALL_HINT

    crf = ("pydensecrf", "pydensecrf (dense CRF)", INSTALL_HINT, "module")
    out: dict[str, list[tuple]] = {"run_sample": [crf], "beco_crf": [crf]}
    if cfg.preset == "toy":
        return out
    # lazy: these modules import torch, which toy runs and --dry_run do not need here
    from models.cam_infer import CKPT_HINT
    from irn.steps.train_irn import IMAGENET_HINT, default_imagenet_paths
    from models.mxnet_params import RESNET38_IMAGENET_HINT
    from segmentation.beco.deeplabv2 import IMAGENET_URLS
    from models.ktse_train import DEFAULT_INIT
    from voc12.lists import LABELS_HINT, VOC_HINT

    p = paths_for(cfg)
    root, lists = cfg.data_root, cfg.lists_dir
    ckpt = (p.ckpt, "stage-one checkpoint", CKPT_HINT)
    resnet50 = ([f"pretrained/{default_imagenet_paths(None)[0].name}"] + default_imagenet_paths(None),
                "ImageNet ResNet-50 weights of IRN", IMAGENET_HINT)
    init38 = (DEFAULT_INIT, "ImageNet ResNet-38 weights", RESNET38_IMAGENET_HINT)
    resnet101 = ("segmentation/data/model_zoo/resnet-101_v2.pth", "ImageNet ResNet-101 weights of BECO",
                 f"download {IMAGENET_URLS['resnet101']}")
    if cfg.dataset == "coco14":
        out.update(_coco_inputs(cfg, ckpt, resnet50, init38, resnet101, crf))
        return out
    jpeg = (f"{root}/JPEGImages", "VOC JPEGImages folder", VOC_HINT, "dir")
    gt = (f"{root}/SegmentationClass", "VOC SegmentationClass folder", VOC_HINT, "dir")
    seg_lists = [(f"{root}/ImageSets/Segmentation/{n}.txt", f"VOC {n} list", VOC_HINT) for n in ("train", "val")]
    made = [(f"{lists}/{n}", f"image list / labels {lists}/{n}", LABELS_HINT)
            for n in ("train_aug.txt", "train.txt", "cls_labels.npy")]
    aug = (["segmentation/data/VOC2012/SegmentationClassAug", f"{root}/SegmentationClassAug"],
           "VOC SegmentationClassAug folder (BECO's val ground truth)",
           "get the DeepLab/PSA 'SegmentationClassAug' release (SBD + VOC masks) into <VOC root>/SegmentationClassAug "
           "(see README.md, data table)", "dir")
    out.update({
        "prepare": seg_lists,
        "train": [jpeg, gt, init38] + made,
        "infer": [jpeg, ckpt] + made,
        "eval_cam": [gt, seg_lists[0]],
        "run_sample": [jpeg, ckpt, resnet50, crf] + made,
        "eval_irn": [gt, seg_lists[0]],
        "beco_train": [resnet101],
        "beco_score": [aug],
        "beco_crf": [aug, crf],
    })
    return out


def _coco_inputs(cfg: PipelineConfig, ckpt: tuple, resnet50: tuple, init38: tuple, resnet101: tuple,
                 crf: tuple) -> dict[str, list[tuple]]:
    """:func:`external_inputs` of the coco preset: the COCO images and annotation files, the lists,
    labels and masks ``coco14/prepare.py`` makes (needed when it is not run), and the weights."""
    from coco14.dataset import COCO14, SPLITS
    from coco14.prepare import ANN_HINT, annotation_path

    root = cfg.data_root
    images = [(f"{root}/{s}", f"COCO {s} images", COCO14.root_hint, "dir") for s in SPLITS]
    anns = [(str(annotation_path(root, s)), f"COCO {s} instance annotations", ANN_HINT) for s in SPLITS]
    gt = (str(COCO14.gt_dir(root)), "COCO masks (coco14/prepare.py)", COCO14.labels_hint, "dir")
    made = [(f"{root}/{n}", f"image list / labels {root}/{n}", COCO14.labels_hint)
            for n in ("train.txt", "cls_labels.npy")]
    val = (f"{root}/val.txt", f"image list {root}/val.txt", COCO14.labels_hint)
    return {
        "prepare": anns,
        "train": [images[0], init38] + made,
        "infer": [images[0], ckpt] + made,
        "eval_cam": [gt, made[0]],
        "run_sample": [images[0], ckpt, resnet50, crf] + made,
        "eval_irn": [gt, made[0]],
        "beco_train": [resnet101, images[0], images[1], gt, val],
        "beco_score": [gt, val],
        "beco_crf": [gt, val, images[1], crf],
    }


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
