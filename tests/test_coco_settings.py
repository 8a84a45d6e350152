"""COCO's stage settings: they come from the coco14 descriptor (and BECO's COCO settings file) when a stage
runs with --dataset coco14, a flag on the command line still wins, and VOC's defaults stay the reference's;
the coco preset and the COCO toy preset of run_pipeline.py."""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

from conftest import cli_module

ROOT = Path(__file__).resolve().parents[1]


def test_stage_one_and_irn_take_the_coco_settings() -> None:
    train = cli_module("train.py").build_parser()
    c = train.parse_args(["--name", "x", "--dataset", "coco14"])
    assert (c.max_epochs, c.T, c.val_epochs) == (5, 1, "none")
    # a flag given wins; the same parser object then parses VOC with the reference values again
    c = train.parse_args(["--name", "x", "--dataset", "coco14", "--max_epochs", "7", "--T", "3"])
    assert (c.max_epochs, c.T) == (7, 3)
    v = train.parse_args(["--name", "x"])
    assert (v.max_epochs, v.T, v.val_epochs) == (40, 10, "11,21,31,38,39")

    run_sample = cli_module("irn/run_sample.py").build_parser()
    r = run_sample.parse_args(["--dataset", "coco14"])
    assert (r.conf_fg_thres, r.conf_bg_thres, r.sem_seg_bg_thres, r.beta, r.exp_times) == (0.35, 0.1, 0.25, 10, 8)
    assert tuple(r.cam_scales) == (1.0, 0.5, 1.5, 2.0)
    assert run_sample.parse_args([]).conf_fg_thres == 0.30
    assert run_sample.parse_args(["--dataset", "coco14", "--conf_fg_thres", "0.4"]).conf_fg_thres == 0.4


def test_beco_uses_the_coco_settings_file() -> None:
    from segmentation.beco.config import parse_args

    c = parse_args(["--dataset", "coco14"])
    assert (c.num_classes, c.msc_scales, c.max_epoch, c.warm_up) == (81, [0.5, 0.75, 1.0, 1.25, 1.5], 13, 1)
    assert Path(c.data_root).name == "COCO2014" and c.val_label_folder == "SegmentationClass"
    # the file alone selects COCO too, and an explicit --config replaces it
    f = parse_args(["--config", str(ROOT / "segmentation/configs/beco_deeplabv2_coco.json")])
    assert (f.dataset, f.num_classes, f.max_epoch) == ("coco14", 81, 13)
    toy = parse_args(["--dataset", "coco14", "--config", str(ROOT / "segmentation/configs/toy.json")])
    assert (toy.num_classes, toy.max_epoch, toy.msc_scales) == (81, 16, [0.75, 1.0, 1.25])
    v = parse_args([])
    assert (v.num_classes, v.msc_scales, v.max_epoch, v.warm_up) == (21, [0.75, 1.0, 1.25], 100, 2)
    # the COCO file has every key of the VOC one (a standalone settings file)
    keys = [json.loads((ROOT / f"segmentation/configs/beco_deeplabv2_{d}.json").read_text()) for d in ("voc", "coco")]
    assert [{s: set(v) for s, v in k.items() if s != "_about"} for k in keys][0] == \
        {s: set(v) for s, v in keys[1].items() if s != "_about"}


def test_a_descriptor_default_for_an_unknown_flag_is_a_bug(monkeypatch: pytest.MonkeyPatch) -> None:
    import coco14.dataset as coco

    bad = dataclasses.replace(coco.COCO14, defaults={"train": {"max_epoch": 5}})  # train.py's flag is max_epochs
    monkeypatch.setattr(coco, "COCO14", bad)
    with pytest.raises(ValueError, match="max_epoch"):
        cli_module("train.py").build_parser().parse_args(["--name", "x", "--dataset", "coco14"])


def test_coco_preset_plan() -> None:
    from pipeline.plan import build_steps, default_config, external_inputs

    cfg = default_config("coco")
    assert (cfg.dataset, cfg.name, cfg.data_root, cfg.lists_dir) == ("coco14", "ktse_coco", "data/COCO2014",
                                                                       "data/COCO2014")
    steps = build_steps(cfg)
    cmds = {s.name: s.display(s.argv) for s in steps}
    assert cmds["prepare"].startswith("python coco14/prepare.py --coco_root data/COCO2014")
    assert "--load_epo 4 " in cmds["infer"] and "--cam_weights_name ../experiments/ktse_coco/ckpt/004net_main" \
        in cmds["run_sample"]
    assert cmds["beco_train"].startswith("cd segmentation && python main.py -dist --amp")
    assert "--list ../data/COCO2014/val.txt" in cmds["beco_score"]  # all val images
    # the COCO settings come from the descriptor, not from the commands
    assert "--max_epochs" not in cmds["train"] and "--conf_fg_thres" not in cmds["run_sample"]
    assert all(s.argv[-2:] == ["--dataset", "coco14"] for s in steps if s.name != "prepare")
    for s in steps[1:]:
        for o in s.outputs:
            path = getattr(o, "folder", o)
            assert path.startswith((cfg.exp_dir, cfg.data_root)), (s.name, path)
    needs = external_inputs(cfg)
    assert any("instances_train2014.json" in str(r[0]) for r in needs["prepare"])
    assert not any("JPEGImages" in str(r[0]) for rs in needs.values() for r in rs)
    with pytest.raises(ValueError, match="--preset coco"):
        default_config("voc", dataset="coco14")


def test_coco_toy_preset_plan() -> None:
    from pipeline.plan import build_steps, default_config

    for size, root in (("small", "data/coco_toy"), ("tiny", "data/coco_toy_tiny")):
        cfg = default_config("toy", size=size, dataset="coco14")
        assert cfg.data_root == root and cfg.name == root[len("data/"):] and cfg.lists_dir == root
        steps = build_steps(cfg)
        assert steps[0].argv[:4] == ["python", "-m", "coco14.toy", "--out"] and "--classes" not in steps[0].argv
        assert steps[1].argv[:4] == ["python", "coco14/prepare.py", "--coco_root", root]
        assert f"{root}/SegmentationClass" in steps[1].outputs
        train = steps[2].argv
        assert train[train.index("--train_list") + 1] == f"{root}/train.txt"


def test_list_names_on_the_command_line(tmp_path: Path) -> None:
    """evaluation.py and segmentation/test.py take ``--list val`` / ``--list val_part`` (COCO) or a file."""
    from tools.dataset import get_dataset

    coco, voc = get_dataset("coco14"), get_dataset("voc12")
    assert coco.list_arg("val_part", "/r") == Path("/r/val_part.txt")
    assert coco.list_arg("val", "/r") == Path("/r/val.txt")
    assert voc.list_arg("train", "/v") == Path("/v/ImageSets/Segmentation/train.txt")
    assert coco.list_arg("lists/mine.txt", "/r") == Path("lists/mine.txt")
    # segmentation/test.py resolves the name under its --data_root
    (tmp_path / "val_part.txt").write_text("COCO_val2014_000000000042\n")
    args = cli_module("segmentation/test.py").build_parser().parse_args(
        ["--dataset", "coco14", "--data_root", str(tmp_path), "--list", "val_part", "--logits_dir",
         str(tmp_path / "no_logits")])
    from tools.errors import WSSSError

    with pytest.raises(WSSSError, match="logits"):  # got past the list: it was found by name
        cli_module("segmentation/test.py").run(args)
