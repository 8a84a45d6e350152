"""End-to-end tiny run of irn/run_sample.py + irn/gen_mask.py on the toy VOC set with a
random-weight tiny-width stage-one checkpoint: every output exists with the documented format,
reruns skip finished outputs, and a 1-image list works."""
from pathlib import Path

import numpy as np
import pytest

from conftest import cli_module
import torch
from PIL import Image

gen_mask = cli_module("irn/gen_mask.py")
run_sample = cli_module("irn/run_sample.py")
from voc12.data import read_id_list


def _args(root: Path, out: Path, ckpt: Path, train_list: Path, *extra: str) -> list[str]:
    lists = root / "lists"
    return ["--voc12_root", str(root), "--train_list", str(train_list), "--infer_list", str(lists / "train.txt"),
            "--cls_labels", str(lists / "cls_labels.npy"), "--cam_weights_name", str(ckpt.with_suffix("")),
            "--irn_crop_size", "128", "--irn_batch_size", "4", "--irn_num_epoches", "1",
            "--irn_backbone_width", "8", "--irn_backbone_init", "none", "--num_workers", "1", "--device", "cpu",
            "--quiet", "true", "--cam_out_dir", str(out / "cam"), "--ir_label_out_dir", str(out / "ir_label"),
            "--sem_seg_out_dir", str(out / "sem_seg"), "--score_dir", str(out / "score"),
            "--irn_weights_name", str(out / "sess" / "res50_irn.pth"), "--log_name", str(out / "log"), *extra]


@pytest.fixture(autouse=True, scope="module")
def _one_thread_module():
    """Tiny convolutions: one thread is faster, and far faster on a shared, oversubscribed CI box
    (module-scoped twin of conftest's ``one_thread``, for the module-scoped fixtures here)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    from models.resnet38d import Net_gpp

    torch.manual_seed(0)
    p = tmp_path_factory.mktemp("stage1") / "001net_main.pth"
    torch.save(Net_gpp(width=0.0625).state_dict(), p)
    return p


def test_run_sample_and_gen_mask_toy(toy_voc, ckpt, tmp_path, capsys):
    pytest.importorskip("pydensecrf")
    out = tmp_path / "irn"
    train_list = toy_voc / "lists" / "train_aug.txt"
    assert run_sample.main(_args(toy_voc, out, ckpt, train_list, "--eval_cam_pass", "true",
                                 "--eval_sem_seg_pass", "true")) == 0
    printed = capsys.readouterr().out
    assert "eval_sem_seg: mIoU" in printed and "eval_cam: mIoU" in printed
    # both eval steps write the one metrics record, in percent, beside the cam folder
    from tools.metrics import MIOU_DEFINITIONS, read_metrics
    for step in ("eval_cam", "eval_sem_seg"):
        rec = read_metrics(out / f"{step}.json")
        assert rec is not None and rec["miou_definition"] == MIOU_DEFINITIONS["present"], step
        assert f"{step}: mIoU {rec['miou'] / 100:.4f}" in printed and rec["step"] == step
    assert (out / "log.log").exists()
    ids = read_id_list(train_list)
    for i in ids:
        d = np.load(out / "cam" / f"{i}.npy", allow_pickle=True).item()
        assert set(d) == {"keys", "cam", "high_res"}
        assert d["keys"].dtype == np.int64 and d["cam"].dtype == np.float32 and d["high_res"].dtype == np.float32
        img = Image.open(toy_voc / "JPEGImages" / f"{i}.jpg")
        h, w = img.size[1], img.size[0]
        assert d["high_res"].shape == (len(d["keys"]), h, w)
        assert d["cam"].shape == (len(d["keys"]), (h + 3) // 4, (w + 3) // 4)
        ir = Image.open(out / "ir_label" / f"{i}.png")
        assert ir.mode == "L" and ir.size == (w, h)
        assert set(np.unique(np.asarray(ir))) <= set([0, 255] + list(d["keys"] + 1))
        sem = Image.open(out / "sem_seg" / f"{i}.png")
        assert sem.mode == "L" and sem.size == (w, h)
        assert set(np.unique(np.asarray(sem))) <= set([0] + list(d["keys"] + 1))
        sc = torch.load(out / "score" / f"{i}.pt", weights_only=False)
        assert sc["score"].device.type == "cpu" and sc["score"].dtype == torch.float32
        assert sc["score"].shape == (len(d["keys"]) + 1, h, w) and sc["pred"].dtype == np.int64
        np.testing.assert_array_equal(sc["pred"], np.asarray(sem))
    sd = torch.load(out / "sess" / "res50_irn.pth", weights_only=False)
    assert "mean_shift.running_mean" in sd and "dp_layers.6.4.running_mean" in sd and "path_indices0" in sd

    masks = out / "mask_irn"
    assert gen_mask.main(["--score_dir", str(out / "score"), "--mask_out_dir", str(masks), "--num_workers", "1"]) == 0
    for i in ids:
        m = Image.open(masks / f"{i}.png")
        assert m.mode == "RGB"
        v = np.asarray(m)
        assert set(np.unique(v)) <= {0, 255} and (v[..., 0] == v[..., 2]).all()

    # a rerun skips everything that exists
    before = {p: p.stat().st_mtime_ns for p in (out / "sem_seg").iterdir()}
    run_sample.main(_args(toy_voc, out, ckpt, train_list))
    assert "0 of" in capsys.readouterr().out
    assert before == {p: p.stat().st_mtime_ns for p in (out / "sem_seg").iterdir()}


def test_run_sample_one_image(toy_voc, ckpt, tmp_path):
    pytest.importorskip("pydensecrf")
    one = tmp_path / "one.txt"
    one.write_text(read_id_list(toy_voc / "lists" / "train.txt")[0] + "\n")
    out = tmp_path / "irn1"
    assert run_sample.main(_args(toy_voc, out, ckpt, one, "--infer_list", str(one))) == 0
    assert len(list((out / "sem_seg").glob("*.png"))) == 1


def test_typed_flags():
    a = run_sample.build_parser().parse_args(["--make_cam_pass", "false", "--beta", "8", "--cam_scales", "1.0,0.5",
                                              "--eval_sem_seg_pass", "true"])
    assert a.make_cam_pass is False and a.eval_sem_seg_pass is True and a.beta == 8
    assert a.cam_scales == (1.0, 0.5)
    d = run_sample.build_parser().parse_args([])
    assert d.cam_weights_name.endswith("sess/031net_main") and d.voc12_root.endswith("data/VOC2012")
    assert Path(d.sem_seg_out_dir).parts[-3:] == ("segmentation", "data", "sem_seg")
