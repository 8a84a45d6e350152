"""The dataset descriptors (tools/dataset.py, voc12/dataset.py, coco14/dataset.py) and how they drive
every stage: one place holds each class count, and a COCO descriptor gives 80-class heads, labels and
81-class scoring everywhere (tiny random inputs, no real data)."""
from __future__ import annotations

import io
import json
import subprocess
import tokenize
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import cli_module
from tools.dataset import DATASET_NAMES, DatasetInfo, get_dataset
from tools.errors import DataError
from tools.io import save_png

ROOT = Path(__file__).resolve().parents[1]
VOC = get_dataset("voc12")
COCO = get_dataset("coco14")


# ----------------------------------------------------------------------------------------------
# the descriptors


def test_descriptors_hold_classes_palette_and_layout() -> None:
    from tools.imutils import voc_palette

    assert DATASET_NAMES == ("voc12", "coco14")
    assert (VOC.num_fg, VOC.num_classes, COCO.num_fg, COCO.num_classes) == (20, 21, 80, 81)
    assert VOC.names_bg[:2] == ("background", "aeroplane") and VOC.class_names[-1] == "tvmonitor"
    assert COCO.class_names[:3] == ("person", "bicycle", "car") and COCO.class_names[-1] == "toothbrush"
    assert len(set(COCO.class_names)) == 80
    from coco14.dataset import COCO_CATEGORY_IDS

    assert len(COCO_CATEGORY_IDS) == 80 and list(COCO_CATEGORY_IDS) == sorted(COCO_CATEGORY_IDS)
    assert COCO_CATEGORY_IDS[0] == 1 and COCO_CATEGORY_IDS[-1] == 90 and 12 not in COCO_CATEGORY_IDS
    for ds in (VOC, COCO):
        assert ds.ignore_index == 255 and ds.palette().shape == (256, 3)
        np.testing.assert_array_equal(ds.palette(), voc_palette())
    assert tuple(VOC.palette()[1]) == (128, 0, 0) and tuple(VOC.palette()[255]) == (224, 224, 192)

    assert VOC.image_path("r", "2007_000032") == Path("r/JPEGImages/2007_000032.jpg")
    assert VOC.gt_path(VOC.gt_dir("r"), "2007_000032") == Path("r/SegmentationClass/2007_000032.png")
    assert VOC.gt_dir("r", aug=True) == Path("r/SegmentationClassAug")
    assert [str(VOC.list_path(n)) for n in ("train_aug", "train", "val")] == [
        "voc12/train_aug.txt", "voc12/train.txt", "voc12/val.txt"]
    assert str(VOC.cls_labels_path()) == "voc12/cls_labels.npy" and VOC.default_root == "data/VOC2012"
    assert VOC.named_list("val", "r") == Path("r/ImageSets/Segmentation/val.txt")

    tid, vid = "COCO_train2014_000000000009", "COCO_val2014_000000000042"
    assert COCO.image_path("c", tid) == Path("c/train2014") / f"{tid}.jpg"
    assert COCO.gt_path(COCO.gt_dir("c"), vid) == Path("c/SegmentationClass/val2014") / f"{vid}.png"
    assert [str(COCO.list_path(n, "c")) for n in ("train", "val", "val_part")] == [
        "c/train.txt", "c/val.txt", "c/val_part.txt"]
    assert COCO.named_list("val_part", "c") == Path("c/val_part.txt")
    assert str(COCO.cls_labels_path("c")) == "c/cls_labels.npy" and COCO.default_root == "data/COCO2014"
    with pytest.raises(DataError, match="COCO 2014 name"):
        COCO.image_path("c", "2007_000032")
    with pytest.raises(DataError, match="unknown dataset 'ade'"):
        get_dataset("ade")
    with pytest.raises(DataError, match="no list called 'train_aug'"):
        COCO.list_path("train_aug")
    assert get_dataset(COCO) is COCO and isinstance(COCO, DatasetInfo)


# ----------------------------------------------------------------------------------------------
# no class count written outside the VOC descriptor


#: Literal 20 / 21 that are not a class count: (path, text on the line) -> why it is allowed.
ALLOWED = {
    ("models/ktse_train.py", "REFERENCE_VAL_EPOCHS = (11, 21, 31, 38, 39)"): "epoch numbers of the reference",
    ("models/ktse.py", '"lr": 20 * lr'): "the 20x learning rate of the scratch biases",
    ("pipeline/plan.py", "epochs=20"): "toy preset epochs",
    ("segmentation/beco/model.py", "HUE_LIMIT, SAT_LIMIT, VAL_LIMIT = 20.0, 30.0, 20.0"): "colour jitter limits",
    ("tools/malloc.py", "64 << 20"): "a byte count (64 MiB)",
    ("tools/provenance.py", "_CHUNK = 1 << 20"): "a byte count (1 MiB)",
}
#: Not scanned: the descriptor itself; tests check VOC numbers on purpose; benchmarks time the
#: reference VOC configuration with VOC-shaped inputs.
SKIP_PREFIXES = ("voc12/dataset.py", "tests/", "bench/")


def _python_files() -> list[str]:
    try:  # the files git would commit (generated and ignored ones left out)
        out = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard", "*.py"], cwd=ROOT,
                             capture_output=True, text=True, check=True).stdout.split()
    except (OSError, subprocess.CalledProcessError):  # an unpacked archive without .git: walk the tree
        skip = {".git", "build", "dist", "experiments", "data", "__pycache__"}
        out = [p.relative_to(ROOT).as_posix() for p in ROOT.rglob("*.py")
               if not skip & set(p.relative_to(ROOT).parts) and not any(x.endswith(".egg-info") for x in p.parts)]
    return sorted(f for f in set(out) if (ROOT / f).is_file() and not f.startswith(SKIP_PREFIXES))


def class_count_literals(path: str, src: str) -> list[str]:
    """``path:line: text`` of every number token 20 or 21 (int or float) in ``src`` that is not in
    :data:`ALLOWED`; strings and comments are not code, so they are not scanned."""
    lines = src.splitlines()
    found = []
    for tok in tokenize.generate_tokens(io.StringIO(src).readline):
        if tok.type != tokenize.NUMBER:
            continue
        try:
            value = float(tok.string)
        except ValueError:
            continue
        if value not in (20.0, 21.0):
            continue
        line = lines[tok.start[0] - 1]
        if any(p == path and text in line for p, text in ALLOWED):
            continue
        found.append(f"{path}:{tok.start[0]}: {line.strip()}")
    return found


def test_the_scan_finds_class_count_literals() -> None:
    """The scanner itself: the forms the issue names are found, strings and comments are not."""
    src = ("NUM_CLASSES = 21\nfor c in range(20): pass\nx = np.zeros((20,))\nf(num_classes=21)\n"
           "def g(C: int = 20): pass\ns = 'range(20)'  # 21 classes\n")
    assert [h.split(":")[1] for h in class_count_literals("m.py", src)] == ["1", "2", "3", "4", "5"]


def test_no_class_count_literal_outside_the_voc_descriptor() -> None:
    hits = [h for f in _python_files() for h in class_count_literals(f, (ROOT / f).read_text(encoding="utf-8"))]
    assert not hits, ("class counts must come from the dataset descriptor (tools/dataset.py); found:\n"
                      + "\n".join(hits))
    for cfg in sorted((ROOT / "segmentation" / "configs").glob("*.json")):
        net = json.loads(cfg.read_text()).get("network", {})
        assert net.get("num_classes") in (None,) or cfg.name.endswith("_coco.json"), (
            f"{cfg.name}: leave num_classes null (the dataset descriptor's C + 1)")


# ----------------------------------------------------------------------------------------------
# stage one


def test_stage_one_network_with_80_classes_and_checkpoint_check(tmp_path: Path) -> None:
    from models.cam_infer import check_class_count
    from models.resnet38d import Net_gpp

    torch.manual_seed(0)
    net = Net_gpp(C=COCO.num_fg, width=0.0625).eval()
    with torch.no_grad():
        cam, out, gpp, cam_seg = net(torch.randn(1, 3, 32, 40))
    assert cam.shape == (1, 80, 4, 5) and out.shape == (1, 80) and gpp.shape == (1, 80, 4, 5)
    assert cam_seg.shape == (1, 81, 4, 5) and net.fc9.weight.shape[0] == 81 and net.fc8.weight.shape[0] == 256
    back = Net_gpp.from_state_dict(net.state_dict())  # the class count comes from fc9's shape
    assert back.C == 80
    check_class_count(back, COCO, tmp_path / "c.pth")
    with pytest.raises(DataError, match="80 foreground classes; dataset voc12 has 20"):
        check_class_count(back, VOC, tmp_path / "c.pth")


def test_cls_labels_width_follows_the_dataset(tmp_path: Path) -> None:
    from voc12.lists import labels_for, load_cls_labels

    coco = tmp_path / "coco.npy"
    np.save(coco, {"COCO_train2014_000000000009": np.eye(80, dtype=np.float32)[3]})
    voc = tmp_path / "voc.npy"
    np.save(voc, {"2007_000032": np.eye(20, dtype=np.float32)[3]})
    labels = load_cls_labels(coco, "coco14")
    assert labels["COCO_train2014_000000000009"].shape == (80,)
    assert labels_for([], labels, dataset=COCO).shape == (0, 80)
    assert load_cls_labels(voc)["2007_000032"].shape == (20,)  # VOC stays the default
    with pytest.raises(DataError, match=r"expected a finite \(20,\)"):
        load_cls_labels(coco)
    with pytest.raises(DataError, match=r"expected a finite \(80,\) multi-hot vector of coco14"):
        load_cls_labels(voc, COCO)


def _coco_tree(root: Path, ids: list[str], rng: np.random.Generator, shape=(12, 16)) -> dict[str, np.ndarray]:
    """A COCO-layout root with random 81-class masks under SegmentationClass/<split>/ and images."""
    gts = {}
    for i in ids:
        gt = rng.integers(0, 81, shape).astype(np.uint8)
        gt[0, :3] = 255
        gt[1, 0] = 80
        gts[i] = gt
        save_png(COCO.gt_path(COCO.gt_dir(root), i), gt, palette=COCO.palette())
        save_png(COCO.image_path(root, i), rng.integers(0, 255, shape + (3,)).astype(np.uint8))
    return gts


def test_seed_evaluation_with_81_classes(tmp_path: Path) -> None:
    """The one-pass sweep on COCO's 81 classes equals the reference definition (argmax over
    [threshold, 80 CAMs] per threshold), and so do the crf and png tasks."""
    from tools.metrics import confusion_matrix
    from tools.seed_eval import REFERENCE_THRESHOLDS, _k_lut, evaluate, thresholds_f32

    rng = np.random.default_rng(0)
    ids = ["COCO_train2014_000000000009", "COCO_val2014_000000000042"]
    gts = _coco_tree(tmp_path, ids, rng)
    cams, preds = tmp_path / "dict", tmp_path / "png"
    expect = np.zeros((len(REFERENCE_THRESHOLDS), 81, 81), np.int64)
    for i in ids:
        keys = [0, 37, 79]
        d = {k: rng.random(gts[i].shape).astype(np.float32) * 0.4 for k in keys}
        cams.mkdir(exist_ok=True)
        np.save(cams / f"{i}.npy", d)
        for j, t in enumerate(REFERENCE_THRESHOLDS):
            stack = np.zeros((81,) + gts[i].shape, np.float32)
            stack[0] = np.float32(t)
            for k in keys:
                stack[k + 1] = d[k]
            expect[j] += confusion_matrix(stack.argmax(0), gts[i], 81)
        save_png(preds / f"{i}.png", gts[i])
    assert _k_lut(thresholds_f32(REFERENCE_THRESHOLDS).tobytes(), 81) is None  # no uint16 room: exact search
    res = evaluate("cam", ids, cams, COCO.gt_dir(tmp_path), workers=1, progress=False, dataset="coco14")
    assert res.hists.shape == (20, 81, 81)
    np.testing.assert_array_equal(res.hists, expect)
    assert res.categories == COCO.names_bg and "toothbrush" in res.table()
    rec = res.to_json()
    assert rec["num_classes"] == 81 and rec["categories"][-1] == "toothbrush"
    png = evaluate("png", ids, preds, COCO.gt_dir(tmp_path), workers=1, progress=False, dataset=COCO)
    assert png.hists.shape == (1, 81, 81) and png.to_json()["miou_present"] == pytest.approx(100.0)
    from tools.errors import WSSSError
    from tools.seed_eval import cam_winner

    with pytest.raises(WSSSError, match="--dataset"):  # VOC's flat layout: the masks are not found
        evaluate("cam", ids, cams, COCO.gt_dir(tmp_path), workers=1, progress=False)
    with pytest.raises(DataError, match="0..19"):  # a COCO CAM key is refused under VOC's class count
        cam_winner({79: np.zeros((2, 2), np.float32)}, (2, 2))
    assert cam_winner({79: np.ones((2, 2), np.float32)}, (2, 2), num_fg=80)[1] == 80


def test_evaluation_cli_with_coco_lists(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    evaluation = cli_module("evaluation.py")

    rng = np.random.default_rng(1)
    ids = ["COCO_val2014_000000000042", "COCO_val2014_000000000073"]
    gts = _coco_tree(tmp_path, ids, rng)
    (tmp_path / "val_part.txt").write_text("\n".join(ids) + "\n")
    pred = tmp_path / "pred"
    for i in ids:
        save_png(pred / f"{i}.png", gts[i])
    out = tmp_path / "e.json"
    assert evaluation.main(["--dataset", "coco14", "--data_root", str(tmp_path), "--list", "val_part", "--task", "png",
                            "--name", "x", "--pred_dir", str(pred), "--exp_root", str(tmp_path / "exp"),
                            "--out_json", str(out), "--workers", "1", "--no_plot", "--no_progress"]) == 0
    rec = json.loads(out.read_text())
    assert rec["num_classes"] == 81 and rec["dataset"] == "coco14" and rec["miou_present"] == pytest.approx(100.0)
    assert "toothbrush" in capsys.readouterr().out


# ----------------------------------------------------------------------------------------------
# IRN and gen_mask


def test_irn_pieces_take_the_class_count(tmp_path: Path) -> None:
    from irn.path_index import affinity_labels
    from irn.steps.common import load_cam_dict, save_cam_dict
    from irn.steps.evaluate import evaluate
    from irn.steps.gen_mask import check_pred_classes

    # a COCO class index 50 is a class (an affinity pair), not "unknown" as it would be for VOC
    label = np.array([[50, 50]], np.uint8)
    src, dst = np.array([0]), np.array([[1]])
    assert affinity_labels(label, src, dst, COCO.num_classes)[1].sum() == 1
    assert affinity_labels(label, src, dst)[1].sum() == 0

    keys = np.array([3, 79])
    save_cam_dict(tmp_path / "c.npy", keys, np.zeros((2, 2, 2), np.float32), np.zeros((2, 8, 8), np.float32))
    assert load_cam_dict(tmp_path / "c.npy", COCO.num_fg)["keys"].tolist() == [3, 79]
    with pytest.raises(DataError, match="0..19"):
        load_cam_dict(tmp_path / "c.npy")

    rng = np.random.default_rng(2)
    ids = ["COCO_val2014_000000000042"]
    gts = _coco_tree(tmp_path / "root", ids, rng)
    s = evaluate(ids, lambda i: gts[i], str(tmp_path / "root"), "eval", quiet=True, dataset=COCO)
    assert s["confusion"].shape == (81, 81) and s["record"]["num_classes"] == 81
    assert s["record"]["dataset"] == "coco14" and s["miou"] == pytest.approx(1.0)

    check_pred_classes(np.array([0, 80]), COCO.num_classes, "s.pt")
    with pytest.raises(DataError, match="classes 0..20"):
        check_pred_classes(np.array([0, 80]), VOC.num_classes, "s.pt")


# ----------------------------------------------------------------------------------------------
# BECO


def test_beco_model_and_config_follow_the_dataset() -> None:
    from segmentation.beco.config import parse_args
    from segmentation.beco.deeplabv2 import build_deeplabv2

    net = build_deeplabv2(COCO.num_classes, backbone="resnet18", width=8).eval()
    with torch.no_grad():
        y = net(torch.randn(1, 3, 33, 33))
    assert y["logits"].shape == (1, 81, 33, 33) and net.aspp.c0.out_channels == 81

    voc, coco = parse_args([]), parse_args(["--dataset", "coco14"])
    assert (voc.num_classes, voc.val_label_folder, voc.dataset) == (21, "SegmentationClassAug", "voc12")
    assert (coco.num_classes, coco.val_label_folder) == (81, "SegmentationClass")
    assert parse_args(["--dataset", "coco14", "--num_classes", "5"]).num_classes == 5  # a given value wins


# ----------------------------------------------------------------------------------------------
# the stage CLIs and the pipeline


def test_every_stage_takes_dataset_defaults() -> None:
    from irn import REPO_ROOT

    infer = cli_module("infer.py")
    train = cli_module("train.py")
    run_sample = cli_module("irn/run_sample.py")
    seg_test = cli_module("segmentation/test.py")

    v = train.build_parser().parse_args(["--name", "x"])
    assert (v.train_list, v.val_list, v.cls_labels, v.data_root) == (
        "voc12/train_aug.txt", "voc12/train.txt", "voc12/cls_labels.npy", "data/VOC2012")
    c = train.build_parser().parse_args(["--name", "x", "--dataset", "coco14"])
    assert (c.train_list, c.val_list, c.cls_labels, c.data_root) == (
        "data/COCO2014/train.txt", "data/COCO2014/train.txt", "data/COCO2014/cls_labels.npy", "data/COCO2014")
    c = train.build_parser().parse_args(["--name", "x", "--dataset", "coco14", "--data_root", "/d/coco"])
    assert c.cls_labels == "/d/coco/cls_labels.npy" and c.train_list == "/d/coco/train.txt"

    i = infer.build_parser().parse_args(["--name", "x", "--load_epo", "1"])
    assert (i.infer_list, i.cls_labels, i.data_root) == ("voc12/train.txt", "voc12/cls_labels.npy", "data/VOC2012")
    i = infer.build_parser().parse_args(["--name", "x", "--load_epo", "1", "--dataset", "coco14"])
    assert i.infer_list == "data/COCO2014/train.txt"

    r = run_sample.build_parser().parse_args([])
    assert r.train_list == str(REPO_ROOT / "voc12" / "train_aug.txt")
    assert r.voc12_root == str(REPO_ROOT / "data" / "VOC2012")
    r = run_sample.build_parser().parse_args(["--dataset", "coco14"])
    assert r.cls_labels == str(REPO_ROOT / "data" / "COCO2014" / "cls_labels.npy")

    t = seg_test.build_parser().parse_args(["--dataset", "coco14"])
    assert (t.num_classes, t.label_folder) == (81, "SegmentationClass")


def test_pipeline_passes_the_dataset_to_every_stage() -> None:
    from pipeline.plan import DATASET_STEPS, build_steps, default_config

    voc = build_steps(default_config("voc"))
    assert not any("--dataset" in s.argv for s in voc)  # the authors' commands unchanged
    coco = build_steps(default_config("coco", dataset="coco14"))
    with_flag = {s.name for s in coco if s.argv[-2:] == ["--dataset", "coco14"]}
    assert with_flag == set(DATASET_STEPS) - {"pretrain", "beco_train_pred"}  # (toy-only steps)
    toy = build_steps(default_config("toy", dataset="coco14"))
    assert {s.name for s in toy if s.argv[-2:] == ["--dataset", "coco14"]} == set(DATASET_STEPS)


def test_all_stages_run_on_a_tiny_coco_tree(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """infer + evaluation, the IRN chain, gen_mask, BECO main.py and test.py with --dataset coco14 on two
    COCO-named images (an 80-class toy-width checkpoint): every output has COCO's class count."""
    pytest.importorskip("pydensecrf")
    from conftest import cli_main
    from models.resnet38d import Net_gpp

    monkeypatch.chdir(tmp_path)
    rng = np.random.default_rng(3)
    ids = ["COCO_train2014_000000000009", "COCO_train2014_000000000025"]
    _coco_tree(Path("coco"), ids, rng, shape=(40, 48))
    Path("coco/train.txt").write_text("\n".join(ids) + "\n")
    np.save("coco/cls_labels.npy", {i: np.eye(80, dtype=np.float32)[[0, 79]].sum(0) for i in ids})
    torch.manual_seed(0)
    Path("experiments/c/ckpt").mkdir(parents=True)
    torch.save(Net_gpp(C=80, width=0.0625).state_dict(), "experiments/c/ckpt/000net_main.pth")
    coco = ["--dataset", "coco14"]

    infer = ["--name", "c", "--load_epo", "0", "--dict", "--vis", "--data_root", "coco", "--workers", "0",
             "--device", "cpu", "--no_progress"]
    assert cli_main("infer.py", infer + coco) == 0
    assert (Path("experiments/c/train") / f"042_{ids[0]}_cam_toothbrush.png").is_file()
    ev = ["--name", "c", "--task", "cam", "--dict_dir", "dict", "--data_root", "coco", "--workers", "1",
          "--no_plot", "--no_progress"]
    assert cli_main("evaluation.py", ev + coco) == 0
    assert json.loads(Path("experiments/c/eval_cam.json").read_text())["num_classes"] == 81

    irn = ["--voc12_root", "coco", "--cam_weights_name", "experiments/c/ckpt/000net_main", "--cam_out_dir", "irn/cam",
           "--ir_label_out_dir", "irn/ir", "--sem_seg_out_dir", "irn/sem", "--score_dir", "irn/score",
           "--irn_weights_name", "irn/w.pth", "--eval_cam_pass", "true", "--eval_sem_seg_pass", "true",
           "--irn_backbone_init", "none", "--irn_backbone_width", "8", "--irn_crop_size", "96", "--irn_batch_size", "2",
           "--irn_num_epoches", "1", "--num_workers", "1", "--device", "cpu", "--quiet", "true",
           "--log_name", "irn/log"]
    assert cli_main("irn/run_sample.py", irn + coco) == 0  # lists and labels: the descriptor's under --voc12_root
    assert json.loads(Path("irn/eval_sem_seg.json").read_text())["num_classes"] == 81
    mask = ["--score_dir", "irn/score", "--mask_dir", "irn/mask", "--num_workers", "1"]
    assert cli_main("irn/gen_mask.py", mask + coco) == 0

    beco = ["--config", str(ROOT / "segmentation/configs/toy.json"), "--data_root", "coco", "--sem_seg_dir", "irn/sem",
            "--mask_dir", "irn/mask", "--train_list", "coco/train.txt", "--val_list", "coco/train.txt",
            "--max_epoch", "1", "--batch_size", "2", "--crop_size", "32", "--val_size", "40", "--backbone_width", "8",
            "--logging_path_base", "beco", "--logging_tag", "t", "--device", "cpu", "--threads", "1",
            "--num_workers", "0"]
    assert cli_main("segmentation/main.py", beco + coco) == 0
    rec = json.loads(Path("beco/t/test_metrics.json").read_text())
    assert rec["num_classes"] == 81 and rec["dataset"] == "coco14"
    assert np.load(Path("beco/t/logits_msc") / f"{ids[0]}.npy").shape[0] == 81
    test = ["--logits_dir", "beco/t/logits_msc", "--data_root", "coco", "--list", "coco/train.txt", "--n_jobs", "1"]
    assert cli_main("segmentation/test.py", test + coco) == 0
    assert len(json.loads(next(Path("beco/t").glob("val_metrics*.json")).read_text())["confusion_matrix"]) == 81
