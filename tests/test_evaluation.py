"""evaluation.py / tools.seed_eval: the reference CAM-seed sweep (eval_cam fixture through the CLI),
the one-pass sweep against a per-threshold brute force, the single-pass tasks and clear errors."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from conftest import cli_module, shared_path
from tools import seed_eval
from tools.seed_eval import (REFERENCE_THRESHOLDS, SweepResult, cam_counts_for_image, evaluate,
                              sweep_confusions, thresholds_f32)
from tools.imutils import write_label_png
from tools.metrics import MIOU_DEFINITIONS, confusion_matrix

evaluation = cli_module("evaluation.py")


def _eval_fixture():
    npz = np.load(shared_path("reference", "stage1", "eval_cam.npz"))
    js = json.loads(shared_path("reference", "stage1", "eval_cam.json").read_text())
    return npz, js


def _cam_dict(npz, n):
    return {int(k): npz[f"cam{n}_c{k}"] for k in npz[f"keys{n}"]}


def _write_fixture_tree(root: Path, npz) -> list[str]:
    names = [str(n) for n in npz["names"]]
    seg = root / "data" / "VOC2012" / "ImageSets" / "Segmentation"
    seg.mkdir(parents=True)
    (seg / "train.txt").write_text("\n".join(names) + "\n")
    (root / "experiments" / "fx" / "dict").mkdir(parents=True)
    for i, n in enumerate(names):
        write_label_png(root / "data" / "VOC2012" / "SegmentationClass" / f"{n}.png", npz[f"gt{i}"])
        np.save(root / "experiments" / "fx" / "dict" / f"{n}.npy", _cam_dict(npz, i))
    return names


def _brute_hist(cam_dict, gt, t):
    """The reference prediction: argmax over [float32 threshold, cam_0..cam_19] (first index wins)."""
    stack = np.zeros((21,) + gt.shape, np.float32)
    stack[0] = np.float32(t)
    for k, v in cam_dict.items():
        stack[k + 1] = v
    return confusion_matrix(stack.argmax(0), gt)


def test_eval_cam_cli_matches_reference(tmp_path, monkeypatch, capsys):
    npz, js = _eval_fixture()
    names = _write_fixture_tree(tmp_path, npz)
    monkeypatch.chdir(tmp_path)
    rc = evaluation.main(["--name", "fx", "--task", "cam", "--dict_dir", "dict", "--workers", "2", "--no_progress"])
    assert rc == 0
    out = capsys.readouterr().out
    ref = js["all_six"]["cli_stdout"]
    assert out.startswith(ref), out
    extra = out[len(ref):].splitlines()
    # the added lines: the best threshold, then the per-class table at it in the reference's table format
    best, iou, cats = js["all_six"]["best_th"], js["all_six"]["iou_at_best"], js["categories"]
    assert extra[0] == "best threshold: %.3f\tmIoU: %.3f%%" % (best, js["all_six"]["best_miou"])
    assert extra[1] == "%11s:%7.3f%%\t%11s:%7.3f%%" % (cats[0], iou[0], cats[1], iou[1])
    assert extra[-1] == "%11s:%7.3f%%" % ("mIoU", js["all_six"]["best_miou"])
    summary = json.loads((tmp_path / "experiments" / "fx" / "eval_cam.json").read_text())
    assert summary["best_th"] == pytest.approx(float(npz["best_th"]), abs=1e-12)
    # the one metrics record (tools.metrics.metrics_record): figures at the best threshold + the sweep
    assert summary["miou_definition"] == MIOU_DEFINITIONS["all"] and summary["n_images"] == len(names)
    assert abs(summary["miou"] - float(npz["best_miou"])) < 1e-9 and summary["miou_all"] == pytest.approx(summary["miou"])
    np.testing.assert_allclose(summary["miou_by_threshold"], npz["miou"], rtol=0, atol=1e-9)
    np.testing.assert_allclose(summary["iou_by_threshold"], npz["iou"], rtol=0, atol=1e-9)
    np.testing.assert_allclose(summary["iou"], js["all_six"]["iou_at_best"], rtol=0, atol=1e-9)
    assert (tmp_path / "experiments" / "fx" / "eval_cam.png").stat().st_size > 1000


@pytest.mark.parametrize("plain", [False, True])
def test_sweep_per_case_and_eval_in_script(plain):
    npz, js = _eval_fixture()
    th32 = thresholds_f32(REFERENCE_THRESHOLDS)
    total = 0
    for n in range(len(npz["names"])):
        counts = cam_counts_for_image(_cam_dict(npz, n), npz[f"gt{n}"], th32, plain=plain)
        other = cam_counts_for_image(_cam_dict(npz, n), npz[f"gt{n}"], th32, plain=not plain)
        np.testing.assert_array_equal(counts, other)  # the plain sweep and the bucket table agree
        total = total + counts
        res = SweepResult("cam", [str(n)], list(REFERENCE_THRESHOLDS), sweep_confusions(counts))
        np.testing.assert_allclose(res.miou, npz["case_miou"][n], rtol=0, atol=1e-9)
        np.testing.assert_allclose(res.iou, npz["case_iou"][n], rtol=0, atol=1e-9)
        assert res.best_th == pytest.approx(float(npz["case_best_th"][n]))
        assert abs(res.best_miou - float(npz["case_best_miou"][n])) < 1e-9
    res = SweepResult("cam", list(npz["names"]), list(REFERENCE_THRESHOLDS), sweep_confusions(total))
    assert res.sweep_lines() == js["all_six"]["logged_lines"]


def test_eval_in_script_logs_and_returns_best(tmp_path):
    npz, js = _eval_fixture()
    names = _write_fixture_tree(tmp_path, npz)
    lines = []
    best, th = seed_eval.eval_in_script(names, tmp_path / "experiments" / "fx" / "dict",
                                        tmp_path / "data" / "VOC2012" / "SegmentationClass", logger=lines.append,
                                        workers=1)
    assert lines == js["all_six"]["logged_lines"]
    assert abs(best - float(npz["best_miou"])) < 1e-9 and th == pytest.approx(0.22)


@pytest.mark.parametrize("plain", [False, True])
@pytest.mark.parametrize("thresholds", [REFERENCE_THRESHOLDS, (-0.05, 0.0, 0.3, 0.5)])
def test_one_pass_sweep_equals_per_threshold_argmax(thresholds, plain):
    rng = np.random.default_rng(0)
    h, w = 23, 31
    gt = rng.integers(0, 21, (h, w)).astype(np.uint8)
    gt[rng.random((h, w)) < 0.1] = 255
    # unordered keys, CAMs quantised to 0.01 (exact float32 ties with thresholds) and a cross-class tie
    cam = {12: np.round(rng.random((h, w)), 2).astype(np.float32),
           3: np.round(rng.random((h, w)), 2).astype(np.float32),
           7: (rng.random((h, w)) - 0.5).astype(np.float32)}
    cam[12][0, :5] = cam[3][0, :5] = 0.5
    th32 = thresholds_f32(thresholds)
    hists = sweep_confusions(cam_counts_for_image(cam, gt, th32, plain=plain))
    for i, t in enumerate(th32):
        np.testing.assert_array_equal(hists[i], _brute_hist(cam, gt, t))
    # an empty dict predicts background everywhere
    empty = sweep_confusions(cam_counts_for_image({}, gt, th32, plain=plain))
    for i, t in enumerate(th32):
        np.testing.assert_array_equal(empty[i], _brute_hist({}, gt, t))


@pytest.mark.parametrize("thresholds", [REFERENCE_THRESHOLDS, (0.001, 0.5, 0.9), (1e-30, 1.0), (0.2,),
                                        tuple(np.linspace(0.05, 0.95, 100))])
def test_sweep_counts_exact_on_adversarial_values(thresholds, monkeypatch):
    """The bucket table + binary-search fallback equals a plain float32 binary search everywhere:
    values on, just above and just below every threshold, 0.01-quantised values, negatives, 0, -0,
    denormals, inf, NaN, and every gt value including 255."""
    rng = np.random.default_rng(0)
    th32 = thresholds_f32(thresholds)
    m = np.concatenate([rng.random(100_000).astype(np.float32) * 1.4 - 0.2, th32,
                        np.nextafter(th32, np.float32(9)), np.nextafter(th32, np.float32(-9)),
                        np.round(rng.random(20_000), 2).astype(np.float32),
                        np.array([np.nan, np.inf, -np.inf, 0, -0.0, 1e-40, 3e38], np.float32)])
    gt = rng.integers(0, 22, m.size).astype(np.uint8)
    gt[gt == 21] = 255
    f = rng.integers(1, 21, m.size).astype(np.uint8)
    k = np.searchsorted(th32, m, side="left")
    valid = gt < 21
    ref = np.bincount(((k * 21 + gt.astype(np.int64)) * 21 + f)[valid],
                      minlength=(th32.size + 1) * 441).reshape(th32.size + 1, 21, 21)
    np.testing.assert_array_equal(seed_eval.sweep_counts(m, f, gt, th32), ref)
    np.testing.assert_array_equal(seed_eval.sweep_counts_plain(m, f, gt, th32), ref)
    # both k paths are exercised: the bucket table and the plain binary search
    assert seed_eval._k_lut(th32.tobytes()) is not None
    monkeypatch.setattr(seed_eval, "_k_lut", lambda *_a: None)
    np.testing.assert_array_equal(seed_eval.sweep_counts(m, f, gt, th32), ref)
    monkeypatch.undo()
    # maps with values 21..254 (not VOC, but possible) take the gather path; those pixels are dropped
    gt_odd = gt.copy()
    gt_odd[::7] = 77
    valid = gt_odd < 21
    ref_odd = np.bincount(((k * 21 + gt_odd.astype(np.int64)) * 21 + f)[valid],
                          minlength=(th32.size + 1) * 441).reshape(th32.size + 1, 21, 21)
    np.testing.assert_array_equal(seed_eval.sweep_counts(m, f, gt_odd, th32), ref_odd)
    np.testing.assert_array_equal(seed_eval.sweep_counts_plain(m, f, gt_odd, th32), ref_odd)
    monkeypatch.setattr(seed_eval, "_k_lut", lambda *_a: None)
    np.testing.assert_array_equal(seed_eval.sweep_counts(m, f, gt_odd, th32), ref_odd)


def test_single_pass_tasks_crf_and_png(tmp_path, capsys, monkeypatch):
    rng = np.random.default_rng(1)
    ids = [f"img_{i}" for i in range(5)]  # ids of any length
    gt_dir, crf_dir, png_dir = tmp_path / "gt", tmp_path / "experiments" / "e" / "crf", tmp_path / "sem_seg"
    hist_ref = np.zeros((21, 21), np.int64)
    for i in ids:
        h, w = rng.integers(10, 30, 2)
        gt = rng.integers(0, 21, (h, w)).astype(np.uint8)
        gt[0] = 255
        write_label_png(gt_dir / f"{i}.png", gt)
        d = {0: rng.random((h, w)).astype(np.float32), 5: rng.random((h, w)).astype(np.float32),
             15: rng.random((h, w)).astype(np.float32)}
        crf_dir.mkdir(parents=True, exist_ok=True)
        np.save(crf_dir / f"{i}.npy", d)
        stack = np.zeros((21, h, w), np.float32)
        for k, v in d.items():
            stack[k] = v
        pred = stack.argmax(0).astype(np.uint8)
        write_label_png(png_dir / f"{i}.png", pred)
        hist_ref += confusion_matrix(pred, gt)
    lst = tmp_path / "list.txt"
    lst.write_text("\n".join(ids) + "\n")
    monkeypatch.chdir(tmp_path)
    common = ["--name", "e", "--list", str(lst), "--gt_dir", str(gt_dir), "--workers", "2", "--no_progress"]
    assert evaluation.main(["--task", "crf", "--dict_dir", "crf"] + common) == 0
    out_crf = capsys.readouterr().out
    assert evaluation.main(["--task", "png", "--pred_dir", str(png_dir)] + common) == 0
    out_png = capsys.readouterr().out
    ref = SweepResult("png", ids, [], hist_ref[None])
    assert ref.table() in out_crf and ref.table() in out_png
    lines = out_png.splitlines()
    assert lines[0] == f"Evaluate {png_dir} with {lst}"
    assert lines[-2] == "=" * 54 and lines[-1].startswith("       mIoU:")
    summary = json.loads((tmp_path / "experiments" / "e" / "eval_png.json").read_text())
    assert summary["thresholds"] == [] and abs(summary["miou"] - ref.best_miou) < 1e-12
    assert summary["confusion_matrix"] == hist_ref.tolist()


def test_parallel_equals_serial(tmp_path):
    npz, _ = _eval_fixture()
    names = _write_fixture_tree(tmp_path, npz)
    d, g = tmp_path / "experiments" / "fx" / "dict", tmp_path / "data" / "VOC2012" / "SegmentationClass"
    a = evaluate("cam", names * 3, d, g, workers=1, progress=False)
    b = evaluate("cam", names * 3, d, g, workers=2, progress=False)
    np.testing.assert_array_equal(a.hists, b.hists)


def test_clear_errors(tmp_path, monkeypatch, capsys):
    npz, _ = _eval_fixture()
    names = _write_fixture_tree(tmp_path, npz)
    monkeypatch.chdir(tmp_path)
    missing = tmp_path / "experiments" / "fx" / "dict" / f"{names[2]}.npy"
    missing.unlink()
    assert evaluation.main(["--name", "fx", "--task", "cam", "--dict_dir", "dict", "--no_progress"]) == 2
    err = capsys.readouterr().err
    assert "prediction dictionary not found" in err and f"{names[2]}.npy" in err and "infer.py" in err
    # a dictionary of the wrong size names the file and both sizes
    np.save(missing, {3: np.zeros((5, 5), np.float32)})
    assert evaluation.main(["--name", "fx", "--task", "cam", "--dict_dir", "dict", "--workers", "1",
                            "--no_progress"]) == 2
    err = capsys.readouterr().err
    assert f"{names[2]}.npy" in err and "(5, 5)" in err
    # a missing list names the path it looked for
    assert evaluation.main(["--name", "fx", "--task", "cam", "--dict_dir", "dict", "--list", "val"]) == 2
    assert "ImageSets/Segmentation/val.txt" in capsys.readouterr().err
    # a missing prediction folder
    assert evaluation.main(["--name", "nope", "--task", "cam", "--dict_dir", "dict"]) == 2
    assert "experiments/nope/dict" in capsys.readouterr().err


def test_thresholds_flag_sweeps_another_range(tmp_path, monkeypatch, capsys):
    assert seed_eval.threshold_range(0.10, 0.30, 0.01) == REFERENCE_THRESHOLDS
    npz, _ = _eval_fixture()
    _write_fixture_tree(tmp_path, npz)
    monkeypatch.chdir(tmp_path)
    rc = evaluation.main(["--name", "fx", "--task", "cam", "--dict_dir", "dict", "--workers", "1", "--no_progress",
                          "--no_plot", "--thresholds", "0.20", "0.50", "0.05"])
    assert rc == 0
    out = capsys.readouterr().out
    summary = json.loads((tmp_path / "experiments" / "fx" / "eval_cam.json").read_text())
    assert summary["thresholds"] == pytest.approx([0.20, 0.25, 0.30, 0.35, 0.40, 0.45])
    # where the two ranges meet (0.20, 0.25) the figures are the reference sweep's
    np.testing.assert_allclose(summary["miou_by_threshold"][:2], npz["miou"][[10, 15]], rtol=0, atol=1e-9)
    assert "45/60 threshold: 0.450" in out
    for bad in (["0.5", "0.2", "0.1"], ["0", "0.3", "0.01"], ["0.1", "0.3", "0"], ["0.1", "1.5", "0.1"]):
        with pytest.raises(SystemExit) as e:
            evaluation.main(["--name", "fx", "--task", "cam", "--dict_dir", "dict", "--thresholds", *bad])
        assert e.value.code == 2 and "--thresholds" in capsys.readouterr().err


def test_best_threshold_at_an_end_of_the_sweep_is_reported(tmp_path, monkeypatch, capsys):
    hists = np.zeros((3, 21, 21), np.int64)
    for i, fg in enumerate((10, 30, 20)):  # threshold 0.2 predicts the most foreground correctly
        hists[i, 0, 0], hists[i, 1, 1], hists[i, 1, 0] = 50, fg, 40 - fg
    mid = SweepResult("cam", ["a"], [0.1, 0.2, 0.3], hists)
    assert mid.best_th == 0.2 and mid.best_at_edge is None
    assert SweepResult("cam", ["a"], [0.1, 0.2, 0.3], hists[[0, 2, 1]]).best_at_edge == "top"
    assert SweepResult("cam", ["a"], [0.1, 0.2, 0.3], hists[[1, 0, 2]]).best_at_edge == "bottom"
    assert SweepResult("png", ["a"], [], hists[:1]).best_at_edge is None
    # the CLI says so on stderr (stdout stays the reference's lines)
    npz, _ = _eval_fixture()
    _write_fixture_tree(tmp_path, npz)
    monkeypatch.chdir(tmp_path)
    common = ["--name", "fx", "--task", "cam", "--dict_dir", "dict", "--workers", "1", "--no_progress", "--no_plot"]
    best = float(npz["best_th"])  # 0.22, inside the reference range: no note
    assert evaluation.main(common) == 0
    assert "the best threshold" not in capsys.readouterr().err
    assert evaluation.main(common + ["--thresholds", str(best), "0.95", "0.05"]) == 0  # starts at the best
    out, err = capsys.readouterr()
    summary = json.loads((tmp_path / "experiments" / "fx" / "eval_cam.json").read_text())
    assert summary["best_th"] == pytest.approx(best) and summary["thresholds"][0] == pytest.approx(best)
    assert "is the bottom of the swept range 0.22 .. 0.92" in err and "--thresholds" in err
    assert "note:" not in out
