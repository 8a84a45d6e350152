"""tools.layout: the one definition of where every stage writes, and its users' defaults."""
from __future__ import annotations

import re
from pathlib import Path

from tools.layout import REFERENCE_SUBDIRS, TRAIN_SUBDIRS, BECOLayout, IRNLayout, StageOneLayout

ROOT = Path(__file__).resolve().parents[1]


def test_stage_one_layout_names_and_make(tmp_path: Path) -> None:
    lay = StageOneLayout.of(tmp_path, "run")
    assert lay.root == tmp_path / "run"
    assert lay.checkpoint(7) == tmp_path / "run" / "ckpt" / "007net_main.pth"
    assert lay.last == tmp_path / "run" / "ckpt" / "last.pth"
    assert lay.crf(4) == tmp_path / "run" / "crf" / "04" and lay.train.name == "train"
    assert lay.eval_json("cam").name == "eval_cam.json" and lay.log.name == "log.txt"
    assert lay.make([4, 24]) is False  # did not exist before
    assert sorted(p.name for p in lay.root.iterdir()) == sorted(REFERENCE_SUBDIRS)
    assert sorted(p.name for p in lay.crf_root.iterdir()) == ["04", "24"]
    assert lay.make([], TRAIN_SUBDIRS) is True
    assert {"tb", "val_dict"} <= {p.name for p in lay.root.iterdir()}


def test_irn_layouts() -> None:
    ref = IRNLayout.reference(ROOT)  # the reference's defaults (irn/run_sample.py, irn/gen_mask.py)
    assert ref.cam == ROOT / "irn" / "result" / "cam" and ref.score == ROOT / "irn" / "result" / "score"
    assert ref.sem_seg == ROOT / "segmentation" / "data" / "sem_seg"
    assert ref.mask == ROOT / "segmentation" / "data" / "mask_irn"
    assert ref.weights == ROOT / "irn" / "sess" / "res50_irn.pth"
    assert ref.cam_weights(31) == ROOT / "irn" / "sess" / "031net_main"
    toy = IRNLayout.under("exp/irn")
    assert (toy.cam, toy.sem_seg, toy.mask, toy.weights) == (
        Path("exp/irn/cam"), Path("exp/irn/sem_seg"), Path("exp/irn/mask_irn"), Path("exp/irn/res50_irn.pth"))
    assert toy.eval_json("eval_cam") == IRNLayout.eval_json_beside(toy.cam, "eval_cam") == Path("exp/irn/eval_cam.json")


def test_beco_layout_names() -> None:
    lay = BECOLayout.of("base", "seg")
    assert lay.logdir == Path("base/seg")
    assert lay.ckpt_epoch(3).name == "ckpt_epoch_3.pth"
    assert re.fullmatch(BECOLayout.CKPT_EPOCH_RE, lay.ckpt_epoch(12).name).group(1) == "12"
    assert lay.best_ckpt.name == "best_ckpt.pth" and lay.best_marker(75.234).name == "best=75.23"
    assert lay.logits_msc.name == "logits_msc" and lay.logits(False).name == "logits"
    assert lay.val_pred.name == "val_pred" and lay.pred("test").name == "test_pred"
    assert lay.val_metrics().name == "val_metrics.json" and lay.val_metrics(crf=True).name == "val_metrics_crf.json"
    assert (lay.metrics.name, lay.test_metrics.name, lay.config.name) == ("metrics.json", "test_metrics.json",
                                                                           "config.json")
    assert BECOLayout.reference().logdir == ROOT / "segmentation" / "data" / "logging" / "seg_result"
