"""Where every stage writes: the one definition of the experiment layout.

Three small frozen dataclasses, each built from one root folder; every other module asks them for a
path instead of spelling the file name itself (docs/formats.md lists what each file holds).

* :class:`StageOneLayout` -- ``experiments/<name>/`` of train.py / infer.py / evaluation.py.
* :class:`IRNLayout` -- IRN's results, its weights and the pseudo-labels / confidence masks it
  hands to BECO (reference defaults: ``irn/result``, ``irn/sess``, ``segmentation/data/{sem_seg,mask_irn}``).
* :class:`BECOLayout` -- one BECO logging folder (``<logging_path_base>/<logging_tag><run_id>/``).

Paths stay relative when the roots are relative (the pipeline plans repo-relative commands).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar, Iterable

REPO_ROOT = Path(__file__).resolve().parents[1]

#: sub-folders the reference creates for a new stage-one experiment (its ``make_path``)
REFERENCE_SUBDIRS: tuple[str, ...] = ("ckpt", "train", "val", "infer", "dict", "crf")
#: what train.py creates: the reference tree plus tensorboard and validation dictionaries
TRAIN_SUBDIRS: tuple[str, ...] = REFERENCE_SUBDIRS + ("tb", "val_dict")


@dataclass(frozen=True)
class StageOneLayout:
    """``<exp_root>/<name>/``: checkpoints, overlays, CAM dictionaries, CRF dictionaries, logs."""

    root: Path

    @classmethod
    def of(cls, exp_root: str | Path, name: str) -> "StageOneLayout":
        return cls(Path(exp_root) / name)

    @property
    def ckpt(self) -> Path:
        return self.root / "ckpt"

    @property
    def last(self) -> Path:
        """The full training state train.py resumes from."""
        return self.ckpt / "last.pth"

    def checkpoint(self, epo: int) -> Path:
        """The reference's per-epoch network weights, ``ckpt/<epo:03d>net_main.pth``."""
        return self.ckpt / f"{epo:03d}net_main.pth"

    @property
    def train(self) -> Path:
        """Overlays (infer.py writes its ``--vis`` images here, as the reference)."""
        return self.root / "train"

    @property
    def val(self) -> Path:
        return self.root / "val"

    @property
    def infer(self) -> Path:
        return self.root / "infer"

    @property
    def dict(self) -> Path:
        """Multi-scale CAM dictionaries ``<id>.npy`` (infer.py ``--dict``)."""
        return self.root / "dict"

    @property
    def val_dict(self) -> Path:
        """CAM dictionaries of train.py's per-epoch validation."""
        return self.root / "val_dict"

    @property
    def crf_root(self) -> Path:
        return self.root / "crf"

    def crf(self, alpha: int) -> Path:
        """CRF dictionaries of one background exponent, ``crf/<alpha:02d>/``."""
        return self.crf_root / f"{alpha:02d}"

    @property
    def tb(self) -> Path:
        return self.root / "tb"

    @property
    def log(self) -> Path:
        return self.root / "log.txt"

    def eval_json(self, task: str) -> Path:
        """Where evaluation.py writes its metrics record for ``--task`` (``eval_<task>.json``)."""
        return self.root / f"eval_{task}.json"

    def make(self, alphas: Iterable[int] = (), subdirs: Iterable[str] = REFERENCE_SUBDIRS) -> bool:
        """Create ``subdirs`` and ``crf/<alpha>/`` for each alpha; returns whether the root existed before."""
        existed = self.root.exists()
        for sub in subdirs:
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        for a in alphas:
            self.crf(a).mkdir(parents=True, exist_ok=True)
        return existed


@dataclass(frozen=True)
class IRNLayout:
    """IRN's outputs. ``result`` holds cam/, ir_label/, ins_seg/, score/ (and, in experiment-local
    layouts, sem_seg/); ``sess`` the weights; ``sem_seg`` and ``mask`` are what BECO reads."""

    result: Path
    sess: Path
    sem_seg: Path
    mask: Path

    @classmethod
    def reference(cls, repo_root: str | Path = REPO_ROOT) -> "IRNLayout":
        """The reference's defaults: ``irn/result``, ``irn/sess``, ``segmentation/data/{sem_seg,mask_irn}``."""
        r = Path(repo_root)
        return cls(r / "irn" / "result", r / "irn" / "sess", r / "segmentation" / "data" / "sem_seg",
                   r / "segmentation" / "data" / "mask_irn")

    @classmethod
    def under(cls, root: str | Path) -> "IRNLayout":
        """Everything in one folder (the toy pipeline's ``experiments/<name>/irn``)."""
        r = Path(root)
        return cls(r, r, r / "sem_seg", r / "mask_irn")

    @property
    def cam(self) -> Path:
        return self.result / "cam"

    @property
    def ir_label(self) -> Path:
        return self.result / "ir_label"

    @property
    def ins_seg(self) -> Path:
        return self.result / "ins_seg"

    @property
    def score(self) -> Path:
        return self.result / "score"

    @property
    def weights(self) -> Path:
        """The trained IRN (``res50_irn.pth``)."""
        return self.sess / "res50_irn.pth"

    def eval_json(self, step: str) -> Path:
        """The metrics record of IRN's ``eval_cam`` / ``eval_sem_seg`` step, in the result folder."""
        return self.eval_json_beside(self.cam, step)

    @staticmethod
    def eval_json_beside(cam_dir: str | Path, step: str) -> Path:
        """:meth:`eval_json` of the layout whose CAM folder is ``cam_dir`` (the IRN steps know their
        folders from flags, not the layout)."""
        return Path(cam_dir).parent / f"{step}.json"

    def cam_weights(self, epo: int) -> Path:
        """The stage-one checkpoint IRN's make_cam reads by default, without ``.pth`` (reference flag form)."""
        return self.sess / f"{epo:03d}net_main"


@dataclass(frozen=True)
class BECOLayout:
    """One BECO logging folder: checkpoints, metrics, multi-scale logits and predictions."""

    logdir: Path

    #: ``ckpt_epoch_<E>.pth`` (E = epochs done); only the newest is kept
    CKPT_EPOCH_RE: ClassVar[str] = r"ckpt_epoch_(\d+)\.pth"
    #: files whose presence means "a training run is in this folder"
    RUN_MARKERS: ClassVar[tuple[str, ...]] = ("ckpt_epoch_*.pth", "best_ckpt.pth", "metrics.json")
    #: everything a training run (and its test) writes here, as glob patterns (``--overwrite`` deletes them)
    RUN_OUTPUTS: ClassVar[tuple[str, ...]] = RUN_MARKERS + (
        "best=*", "test_metrics.json", "config.json", "events.out.tfevents.*", "logits_msc", "logits",
        "val_pred", "test_pred", "val_metrics*.json")

    @classmethod
    def of(cls, logging_path_base: str | Path, tag: str) -> "BECOLayout":
        return cls(Path(logging_path_base) / tag)

    @classmethod
    def reference(cls, tag: str = "seg_result", repo_root: str | Path = REPO_ROOT) -> "BECOLayout":
        """The reference's logging folder ``segmentation/data/logging/<tag>``."""
        return cls.of(Path(repo_root) / "segmentation" / "data" / "logging", tag)

    @property
    def best_ckpt(self) -> Path:
        return self.logdir / "best_ckpt.pth"

    def ckpt_epoch(self, epoch: int) -> Path:
        """Training state after ``epoch`` epochs (1-based, as the reference names it)."""
        return self.logdir / f"ckpt_epoch_{epoch}.pth"

    @property
    def log(self) -> Path:
        return self.logdir / "log.txt"

    @property
    def config(self) -> Path:
        return self.logdir / "config.json"

    @property
    def metrics(self) -> Path:
        """Per-epoch validation history of training."""
        return self.logdir / "metrics.json"

    @property
    def test_metrics(self) -> Path:
        """The final multi-scale test of main.py."""
        return self.logdir / "test_metrics.json"

    def best_marker(self, best_pct: float) -> Path:
        """The empty ``best=XX.XX`` file naming the best validation mIoU (percent) so far."""
        return self.logdir / f"best={best_pct:.2f}"

    @property
    def best_markers(self) -> list[Path]:
        return sorted(self.logdir.glob("best=*"))

    def logits(self, msc: bool = True) -> Path:
        return self.logdir / ("logits_msc" if msc else "logits")

    @property
    def logits_msc(self) -> Path:
        return self.logits(True)

    def pred(self, mode: str = "val") -> Path:
        """segmentation/test.py's label PNGs of one split (``val_pred/``, ``test_pred/``)."""
        return self.logdir / f"{mode}_pred"

    @property
    def val_pred(self) -> Path:
        return self.pred("val")

    def val_metrics(self, crf: bool = False, mode: str = "val") -> Path:
        """segmentation/test.py's metrics record, without or with the dense CRF."""
        return self.logdir / f"{mode}_metrics{'_crf' if crf else ''}.json"
