"""Inputs that would silently give wrong results (16-bit or out-of-range label maps, repeated ids,
byte-order marks, tiny images, truncated JPEGs) and the pipeline runner's process handling (the
step dies with the runner, killed attempts keep their time, failed steps leave no empty folders)."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tools.errors import DataError
from tools.imutils import read_gt_png, read_label_png, read_rgb, write_label_png

ROOT = Path(__file__).resolve().parents[1]


# ----------------------------------------------------------------------------------------------
# label maps


def _save_16bit(path: Path, a: np.ndarray) -> Path:
    Image.fromarray(a.astype(np.uint16)).save(path)
    assert Image.open(path).mode.startswith("I")
    return path


def test_16bit_label_above_255_is_refused(tmp_path: Path) -> None:
    p = _save_16bit(tmp_path / "wide.png", np.array([[0, 256], [257, 1]]))
    for read in (read_label_png, read_gt_png):
        with pytest.raises(DataError, match="wide.png.*256 to 257|wide.png.*0 to 257"):
            read(p)


def test_16bit_label_with_valid_values_reads_as_8bit(tmp_path: Path) -> None:
    a = np.array([[0, 20], [255, 7]])
    p = _save_16bit(tmp_path / "ok16.png", a)
    np.testing.assert_array_equal(read_gt_png(p), a.astype(np.uint8))
    assert read_gt_png(p).dtype == np.uint8


def test_gt_refuses_values_that_are_no_class(tmp_path: Path) -> None:
    lab = np.zeros((4, 5), np.uint8)
    lab[0, 0], lab[1, 1], lab[2, 2] = 21, 30, 255
    write_label_png(tmp_path / "g.png", lab)
    with pytest.raises(DataError, match=r"g\.png.*21, 30 in 2 pixel"):
        read_gt_png(tmp_path / "g.png")
    # a prediction is read as it is (the reference scores any prediction value)
    np.testing.assert_array_equal(read_label_png(tmp_path / "g.png"), lab)


@pytest.mark.parametrize("palette", [True, False])
def test_valid_gt_reads_exactly_as_before(tmp_path: Path, palette: bool) -> None:
    lab = np.random.default_rng(0).integers(0, 21, (17, 13)).astype(np.uint8)
    if palette:
        lab[0] = 255  # VOC void band
    write_label_png(tmp_path / "v.png", lab, palette=palette)
    assert Image.open(tmp_path / "v.png").mode == ("P" if palette else "L")
    got = read_gt_png(tmp_path / "v.png")
    assert got.dtype == np.uint8
    np.testing.assert_array_equal(got, lab)
    np.testing.assert_array_equal(got, np.asarray(Image.open(tmp_path / "v.png")))


def _bad_gt_tree(tmp_path: Path) -> Path:
    root = tmp_path / "voc"
    (root / "SegmentationClass").mkdir(parents=True)
    bad = np.zeros((6, 6), np.uint8)
    bad[2:4, 2:4] = 40
    write_label_png(root / "SegmentationClass" / "a.png", bad)
    return root


def test_every_gt_reader_refuses_bad_values(tmp_path: Path) -> None:
    """voc12.load_gt (IRN evaluation, BECO val/test), the seed evaluation and the pipeline baselines."""
    from tools import seed_eval
    from pipeline.report import trivial_baselines
    from voc12.data import load_gt

    root = _bad_gt_tree(tmp_path)
    gt_dir = root / "SegmentationClass"
    with pytest.raises(DataError, match="a.png"):
        load_gt(root, "a")
    assert load_gt(root, "a", num_classes=41).max() == 40  # a dataset with more classes (BECO --num_classes)
    write_label_png(tmp_path / "pred" / "a.png", np.zeros((6, 6), np.uint8))
    with pytest.raises(DataError, match="a.png"):
        seed_eval.evaluate("png", ["a"], tmp_path / "pred", gt_dir, workers=1, progress=False)
    with pytest.raises(DataError, match="a.png"):
        trivial_baselines(["a"], gt_dir, None)


def test_prepare_refuses_bad_masks(tmp_path: Path) -> None:
    from voc12.prepare import prepare

    root = _bad_gt_tree(tmp_path)
    seg = root / "ImageSets" / "Segmentation"
    seg.mkdir(parents=True)
    (seg / "train.txt").write_text("a\n")
    (seg / "val.txt").write_text("a\n")
    with pytest.raises(DataError, match="a.png"):
        prepare(root, tmp_path / "lists")


# ----------------------------------------------------------------------------------------------
# lists


def test_id_list_duplicates_are_dropped_with_one_warning(tmp_path: Path, capsys) -> None:
    from voc12.lists import read_id_list

    p = tmp_path / "dups.txt"
    p.write_text("b\na\n/JPEGImages/b.jpg /SegmentationClassAug/b.png\nc\na\n")
    assert read_id_list(p) == ["b", "a", "c"]
    err = capsys.readouterr().err
    assert "dups.txt" in err and "repeats 2 id(s)" in err and "'b'" in err
    assert read_id_list(p) == ["b", "a", "c"]
    assert capsys.readouterr().err == ""  # once per list file
    (tmp_path / "plain.txt").write_text("x\ny\n")
    read_id_list(tmp_path / "plain.txt")
    assert capsys.readouterr().err == ""


def test_id_list_bom_and_crlf(tmp_path: Path) -> None:
    from voc12.lists import read_id_list

    p = tmp_path / "win.txt"
    p.write_bytes("\ufeff2007_000032\r\n/JPEGImages/2007_000039.jpg /SegmentationClassAug/2007_000039.png\r\n\r\n"
                  .encode("utf-8"))
    assert read_id_list(p) == ["2007_000032", "2007_000039"]


# ----------------------------------------------------------------------------------------------
# images


def test_msf_inputs_tiny_image_and_faithful_sizes() -> None:
    from voc12.data import msf_inputs

    tiny = np.full((1, 1, 3), 128, np.uint8)
    sizes = [x.shape[1:] for x in msf_inputs(tiny)]
    assert sizes == [(1, 1), (1, 1), (1, 1), (1, 1), (2, 2), (2, 2), (2, 2), (2, 2)]
    # every input, the 1-pixel-wide flips included, becomes a tensor as infer.py does with --workers 0
    import torch

    assert all(torch.from_numpy(x).shape == x.shape for x in msf_inputs(tiny))
    # where the reference works the sizes are its Python-round sizes (ties to even)
    img = np.zeros((79, 101, 3), np.uint8)
    sizes = [x.shape[1:] for x in msf_inputs(img)[::2]]
    assert sizes == [(40, 50), (79, 101), (118, 152), (158, 202)]


def test_random_resize_long_thin_image() -> None:
    import random

    from voc12.data import random_resize_long

    out = random_resize_long(np.zeros((1, 900, 3), np.uint8), random.Random(0), 256, 256)
    assert out.shape == (1, 256, 3)
    out = random_resize_long(np.zeros((30, 70, 3), np.uint8), random.Random(0), 256, 256)
    assert out.shape == (round(30 * 256 / 70), 256, 3)


def test_truncated_jpeg_names_the_file(tmp_path: Path) -> None:
    from voc12.data import load_image

    (tmp_path / "JPEGImages").mkdir()
    good = tmp_path / "JPEGImages" / "full.jpg"
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(good, quality=95)
    data = good.read_bytes()
    (tmp_path / "JPEGImages" / "cut.jpg").write_bytes(data[: len(data) // 2])
    assert load_image(tmp_path, "full").shape == (64, 64, 3)
    with pytest.raises(DataError, match=r"cut\.jpg.*(corrupt|truncated)"):
        load_image(tmp_path, "cut")
    (tmp_path / "JPEGImages" / "junk.jpg").write_bytes(b"not a jpeg at all")
    with pytest.raises(DataError, match=r"junk\.jpg"):
        read_rgb(tmp_path / "JPEGImages" / "junk.jpg")


# ----------------------------------------------------------------------------------------------
# the pipeline runner: process handling

# a runner script: one step that writes "pids" (its own pid and its child's) and then sleeps
_RUNNER = """
import sys, pathlib
sys.path.insert(0, {repo!r})
import pipeline.runner as r
r.HEARTBEAT_S = 0.1
r.STOP_GRACE_S = (2.0, 2.0, 2.0)
root = pathlib.Path({root!r})
sleeper = ("import os, sys, time, subprocess, pathlib; "
           "g = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)']); "
           "pathlib.Path('pids.tmp').write_text(f'{{os.getpid()}} {{g.pid}}'); os.replace('pids.tmp', 'pids'); "
           "time.sleep(60)")
step = r.Step('sleep', 'x', ['python', '-c', sleeper], outputs=['never.txt'])
r.run_steps([step], root / 'exp' / 'pipeline', root=root, echo=False)
"""


def _alive(pid: int) -> bool:
    """True for a running process (a zombie waiting to be reaped counts as gone)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def _gone_within(pids: list[int], seconds: float) -> bool:
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        if not any(_alive(p) for p in pids):
            return True
        time.sleep(0.05)
    return False


def _start_runner(tmp_path: Path, patch: str = "") -> tuple[subprocess.Popen, list[int]]:
    text = _RUNNER.format(repo=str(ROOT), root=str(tmp_path)).replace("root = ", patch + "\nroot = ", 1)
    return _launch_runner(tmp_path, text)


def _launch_runner(tmp_path: Path, text: str) -> tuple[subprocess.Popen, list[int]]:
    """Run the runner script ``text``; return it and the pids its fake step wrote to ``pids``."""
    script = tmp_path / "runner.py"
    script.write_text(text)
    proc = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    for _ in range(400):
        if (tmp_path / "pids").exists():
            break
        time.sleep(0.05)
    else:
        proc.kill()
        pytest.fail("the fake step did not start: " + proc.stderr.read().decode())
    return proc, [int(x) for x in (tmp_path / "pids").read_text().split()]


def _cleanup(pids: list[int]) -> None:
    for p in pids:
        try:
            os.kill(p, signal.SIGKILL)
        except ProcessLookupError:
            pass


needs_proc = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc; PR_SET_PDEATHSIG is Linux")


@needs_proc
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGHUP, signal.SIGINT])
def test_signalled_runner_stops_the_whole_step(tmp_path: Path, sig: int) -> None:
    proc, pids = _start_runner(tmp_path)
    try:
        proc.send_signal(sig)
        proc.wait(15)
        assert proc.returncode != 0
        assert _gone_within(pids, 5), "the step (or its child) outlived the runner"
    finally:
        _cleanup(pids)
    part = json.loads((tmp_path / "exp" / "pipeline" / "sleep.partial.json").read_text())
    assert part["running"] is False and part["seconds"] > 0


@needs_proc
def test_stopping_a_step_also_ends_a_child_that_outlives_it(tmp_path: Path) -> None:
    """The step dies on the forwarded SIGINT but its child ignores SIGINT: the runner goes on to SIGTERM
    the group instead of returning as soon as the step itself has exited."""
    child = ("import os, signal, time; signal.signal(signal.SIGINT, signal.SIG_IGN); "
             "open('ready.tmp', 'w').close(); os.replace('ready.tmp', 'ready'); time.sleep(60)")
    step_code = ("import os, sys, time, subprocess, pathlib; "
                 f"g = subprocess.Popen([sys.executable, '-c', {child!r}]); "
                 "end = time.time() + 20\n"
                 "while not os.path.exists('ready') and time.time() < end: time.sleep(0.02)\n"
                 "pathlib.Path('pids.tmp').write_text(f'{os.getpid()} {g.pid}'); os.replace('pids.tmp', 'pids'); "
                 "time.sleep(60)")
    proc, pids = _launch_runner(tmp_path, (
        f"import sys, pathlib\nsys.path.insert(0, {str(ROOT)!r})\nimport pipeline.runner as r\n"
        "r.STOP_GRACE_S = (1.0, 2.0, 2.0)\n"
        f"root = pathlib.Path({str(tmp_path)!r})\n"
        f"step = r.Step('sleep', 'x', ['python', '-c', {step_code!r}], outputs=['never.txt'])\n"
        "r.run_steps([step], root / 'exp' / 'pipeline', root=root, echo=False)\n"))
    try:
        proc.send_signal(signal.SIGTERM)
        proc.wait(15)
        assert _gone_within(pids, 3), "the step's SIGINT-proof child outlived the runner"
    finally:
        proc.kill()
        _cleanup(pids)


@needs_proc
def test_sigkilled_runner_takes_the_step_with_it(tmp_path: Path) -> None:
    proc, pids = _start_runner(tmp_path)
    try:
        time.sleep(0.5)  # a few heartbeats
        proc.kill()
        proc.wait(5)
        assert _gone_within(pids[:1], 5), "the step survived its SIGKILLed runner"
        assert _gone_within(pids[1:], 8), "the step's own child survived the SIGKILLed runner"
    finally:
        _cleanup(pids)
    # the attempt's time is in the record up to its last heartbeat
    part = json.loads((tmp_path / "exp" / "pipeline" / "sleep.partial.json").read_text())
    assert part["running"] is True and part["attempts"] == 1 and part["seconds"] >= 0.3
    # the rerun adds it to the step's time
    from pipeline.runner import Step, run_steps

    lines: list[str] = []
    step = Step("sleep", "x", ["python", "-c", "open('never.txt', 'w')"], outputs=["never.txt"])
    res = run_steps([step], tmp_path / "exp" / "pipeline", root=tmp_path, echo=False, printer=lines.append)
    assert res[0].seconds >= part["seconds"]
    rec = json.loads((tmp_path / "exp" / "pipeline" / "sleep.json").read_text())
    assert rec["seconds"] >= part["seconds"]
    assert any("killed" in s for s in lines)
    assert not (tmp_path / "exp" / "pipeline" / "sleep.partial.json").exists()


def test_partial_record_of_an_older_runner_still_counts(tmp_path: Path) -> None:
    from pipeline.runner import Step, run_steps

    rec = tmp_path / "rec"
    rec.mkdir()
    (rec / "s.partial.json").write_text(json.dumps({"seconds": 12.5}))
    step = Step("s", "x", ["python", "-c", "open('o.txt', 'w')"], outputs=["o.txt"])
    res = run_steps([step], rec, root=tmp_path, echo=False, printer=lambda s: None)
    assert 12.5 <= res[0].seconds < 40


def test_failed_step_removes_only_the_empty_folders_it_created(tmp_path: Path) -> None:
    from pipeline.runner import Step, StepFailed, run_steps

    exp = tmp_path / "experiments" / "e"
    (exp / "old_empty").mkdir(parents=True)
    (exp / "kept").mkdir()
    code = ("import os, sys; os.makedirs('experiments/e/ckpt'); os.makedirs('experiments/e/crf/05'); "
            "os.makedirs('experiments/e/kept/new'); os.makedirs('experiments/e/full'); "
            "open('experiments/e/full/x.npy', 'w'); os.makedirs('out/sem_seg/deep'); sys.exit(1)")
    step = Step("bad", "x", ["python", "-c", code], outputs=["out/sem_seg/a.png", "experiments/e/ckpt/1.pth"])
    lines: list[str] = []
    with pytest.raises(StepFailed):
        run_steps([step], exp / "pipeline", root=tmp_path, echo=False, printer=lines.append)
    left = sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*") if p.is_dir())
    assert left == ["experiments", "experiments/e", "experiments/e/full", "experiments/e/kept",
                    "experiments/e/old_empty", "experiments/e/pipeline"]
    assert any("removed 7 empty folder" in s for s in lines)


@needs_proc
@pytest.mark.parametrize("only", ["deathsig", "watcher"])
def test_each_guard_alone_ends_the_step(tmp_path: Path, only: str) -> None:
    """PR_SET_PDEATHSIG ends the step itself; the group watcher ends the step and its children."""
    patch = "r._start_watcher = lambda g: None" if only == "deathsig" else "r._die_with_runner = lambda: None"
    proc, pids = _start_runner(tmp_path, patch)
    try:
        proc.kill()
        proc.wait(5)
        assert _gone_within(pids if only == "watcher" else pids[:1], 8)
    finally:
        _cleanup(pids)
