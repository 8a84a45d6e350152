"""One error path for every command-line entry point (tools.errors.run_cli), range checks at parse time
(tools.cli) and the "check every input first, fail once" checks (tools.errors.require_all).

Exit statuses: 0 done, 2 a user-fixable error (one ``error: ...`` line) or a bad flag value (argparse),
130 Ctrl-C (one ``interrupted: ...`` line). No traceback for any of them.
"""
from __future__ import annotations

import argparse
import errno
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from conftest import ROOT, cli_module
from tools import cli
from tools.errors import INTERRUPTED_MESSAGE, MissingFileError, WSSSError, require_all, run_cli


def _lines(text: str) -> list[str]:
    return [x for x in text.splitlines() if x.strip()]


# ----------------------------------------------------------------------------------------------
# Each CLI: a command line whose inputs exist (so the early checks pass), the function to patch to
# inject a failure, and the folder it writes into (for the read-only test).
# ----------------------------------------------------------------------------------------------

def _voc(tmp: Path) -> Path:
    voc = tmp / "voc"
    (voc / "JPEGImages").mkdir(parents=True)
    return voc


def _lists(tmp: Path) -> tuple[Path, Path]:
    lst = tmp / "list.txt"
    lst.write_text("a\n")
    cls = tmp / "cls_labels.npy"
    np.save(cls, {"a": np.eye(20, dtype=np.float32)[0]})
    return lst, cls


def setup_train(tmp: Path):
    train = cli_module("train.py")

    voc = _voc(tmp)
    lst, cls = _lists(tmp)
    argv = ["--name", "n", "--exp_root", str(tmp / "out"), "--data_root", str(voc), "--train_list", str(lst),
            "--cls_labels", str(cls), "--init", "none", "--val_epochs", "none", "--device", "cpu", "--workers", "0"]
    return train.main, argv, (train, "train"), tmp / "out"


def setup_infer(tmp: Path):
    infer = cli_module("infer.py")

    voc = _voc(tmp)
    lst, cls = _lists(tmp)
    ckpt = tmp / "ckpt.pth"
    ckpt.write_bytes(b"")
    argv = ["--name", "n", "--load_epo", "0", "--dict", "--infer_list", str(lst), "--cls_labels", str(cls),
            "--data_root", str(voc), "--ckpt", str(ckpt), "--exp_root", str(tmp / "out"), "--device", "cpu",
            "--workers", "0", "--no_progress"]
    return infer.main, argv, (infer, "run"), tmp / "out"


def setup_evaluation(tmp: Path):
    evaluation = cli_module("evaluation.py")
    from tools.imutils import write_label_png

    lst, _ = _lists(tmp)
    gt, pred = tmp / "gt", tmp / "pred"
    lab = np.zeros((6, 7), np.uint8)
    lab[2:4, 2:5] = 1
    write_label_png(gt / "a.png", lab)
    write_label_png(pred / "a.png", lab)
    argv = ["--name", "n", "--task", "png", "--pred_dir", str(pred), "--gt_dir", str(gt), "--list", str(lst),
            "--out_json", str(tmp / "out" / "eval.json"), "--no_plot", "--no_progress", "--workers", "1"]
    (tmp / "out").mkdir()
    return evaluation.main, argv, (evaluation, "evaluate"), tmp / "out"


def _irn_outputs(tmp: Path) -> list[str]:
    out = tmp / "out"
    return ["--cam_out_dir", str(out / "cam"), "--ir_label_out_dir", str(out / "ir_label"),
            "--sem_seg_out_dir", str(out / "sem_seg"), "--score_dir", str(out / "score"),
            "--ins_seg_out_dir", str(out / "ins_seg"), "--irn_weights_name", str(out / "sess" / "irn.pth")]


def setup_run_sample(tmp: Path):
    run_sample = cli_module("irn/run_sample.py")

    argv = ["--log_name", str(tmp / "log"), "--make_cam_pass", "false", "--cam_to_ir_label_pass", "false",
            "--train_irn_pass", "false", "--make_sem_seg_pass", "false"] + _irn_outputs(tmp)
    return run_sample.main, argv, (run_sample, "check_inputs"), tmp / "out"


def setup_gen_mask(tmp: Path):
    import torch

    gen_mask = cli_module("irn/gen_mask.py")
    from irn.steps import gen_mask as step

    score = tmp / "score"
    score.mkdir()
    torch.save({"pred": np.zeros((4, 5), np.int64), "score": torch.rand(2, 4, 5), "keys": np.array([0, 3])},
               score / "a.pt")
    argv = ["--score_dir", str(score), "--mask_out_dir", str(tmp / "out" / "mask"), "--num_workers", "1"]
    return gen_mask.main, argv, (step, "run"), tmp / "out"


def setup_seg_test(tmp: Path):
    seg_test = cli_module("segmentation/test.py")
    from tools.imutils import write_label_png

    voc = _voc(tmp)
    (voc / "ImageSets" / "Segmentation").mkdir(parents=True)
    (voc / "ImageSets" / "Segmentation" / "val.txt").write_text("a\n")
    from PIL import Image

    Image.fromarray(np.zeros((6, 7, 3), np.uint8)).save(voc / "JPEGImages" / "a.jpg")
    write_label_png(voc / "SegmentationClassAug" / "a.png", np.zeros((6, 7), np.uint8))
    logits = tmp / "out" / "logits"
    logits.mkdir(parents=True)
    np.save(logits / "a.npy", np.zeros((21, 3, 4), np.float32))
    argv = ["--data_root", str(voc), "--logits_dir", str(logits), "--n-jobs", "1"]
    return seg_test.main, argv, (seg_test, "run"), tmp / "out"


def setup_pipeline(tmp: Path):
    run_pipeline = cli_module("run_pipeline.py")

    argv = ["--preset", "toy", "--size", "tiny", "--name", "cli_errors_test", "--to", "data", "--quiet"]
    return run_pipeline.main, argv, (run_pipeline, "run_steps"), None


SETUPS = {"train": setup_train, "infer": setup_infer, "evaluation": setup_evaluation,
          "run_sample": setup_run_sample, "gen_mask": setup_gen_mask, "segmentation_test": setup_seg_test,
          "run_pipeline": setup_pipeline}


@pytest.fixture
def in_tmp(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # run_pipeline changes directory; this restores it afterwards
    return tmp_path


def _raiser(exc: BaseException):
    def fn(*a, **k):
        raise exc
    return fn


@pytest.mark.parametrize("name", list(SETUPS))
def test_user_error_is_one_line_and_exit_2(name, in_tmp, monkeypatch, capsys):
    main, argv, (mod, attr), _ = SETUPS[name](in_tmp)
    monkeypatch.setattr(mod, attr, _raiser(MissingFileError("thing not found: '/x/y.pth'. Get it there.")))
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert _lines(err) == ["error: thing not found: '/x/y.pth'. Get it there."], err


@pytest.mark.parametrize("name", list(SETUPS))
def test_ctrl_c_is_one_line_and_exit_130(name, in_tmp, monkeypatch, capsys):
    main, argv, (mod, attr), _ = SETUPS[name](in_tmp)
    monkeypatch.setattr(mod, attr, _raiser(KeyboardInterrupt()))
    assert main(argv) == 130
    err = capsys.readouterr().err
    assert _lines(err) == [INTERRUPTED_MESSAGE], err
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # run_cli put the handler back


@pytest.mark.parametrize("name", list(SETUPS))
def test_permission_and_disk_errors_name_the_folder(name, in_tmp, monkeypatch, capsys):
    main, argv, (mod, attr), _ = SETUPS[name](in_tmp)
    ro = in_tmp / "ro"
    # the temporary file of an atomic write: the message names its folder
    exc = PermissionError(errno.EACCES, "Permission denied", str(ro / ".a.npy.k2j3.tmp"))
    monkeypatch.setattr(mod, attr, _raiser(exc))
    assert main(argv) == 2
    lines = _lines(capsys.readouterr().err)
    assert len(lines) == 1 and lines[0].startswith("error: permission denied") and f"'{ro}'" in lines[0]
    monkeypatch.setattr(mod, attr, _raiser(OSError(errno.ENOSPC, "No space left on device", str(ro / "a.png"))))
    assert main(argv) == 2
    lines = _lines(capsys.readouterr().err)
    assert len(lines) == 1 and "no space left" in lines[0] and str(ro / "a.png") in lines[0]


def test_other_os_errors_keep_their_traceback():
    with pytest.raises(OSError):
        run_cli(_raiser(OSError(errno.EIO, "I/O error", "/dev/x")), None)
    with pytest.raises(ValueError):  # a bug is not turned into a one-liner
        run_cli(_raiser(ValueError("bug")), None)


@pytest.mark.parametrize("name", [n for n in SETUPS if n != "run_pipeline"])
def test_read_only_output_folder(name, in_tmp, capsys):
    """The real write into a read-only output folder (no patching): one line naming the folder."""
    main, argv, _, out = SETUPS[name](in_tmp)
    out.mkdir(exist_ok=True)
    for p in sorted(out.rglob("*"), reverse=True) + [out]:
        if p.is_dir():
            p.chmod(0o555)
    try:
        if os.access(out, os.W_OK):
            pytest.skip("running as root: chmod does not make a folder read-only")
        assert main(argv) == 2
        err = capsys.readouterr().err
        lines = _lines(err)
        assert len(lines) == 1 and lines[0].startswith("error: ") and "permission denied" in lines[0], err
        assert str(out) in lines[0], err
    finally:
        for p in [out] + list(out.rglob("*")):
            if p.is_dir():
                p.chmod(0o755)


SCRIPTS = {"train": "train.py", "infer": "infer.py", "evaluation": "evaluation.py", "run_sample": "irn/run_sample.py",
           "gen_mask": "irn/gen_mask.py", "segmentation_test": "segmentation/test.py"}


@pytest.mark.parametrize("name", list(SCRIPTS))
def test_read_only_file_system_as_root(name, in_tmp):
    """Where chmod cannot help (root), a read-only bind mount in a private mount namespace gives the
    real EROFS write failure: the CLI, run as a process, prints one line naming the folder."""
    import shutil

    if os.geteuid() != 0 or shutil.which("unshare") is None:
        pytest.skip("needs root and unshare (the chmod test covers other users)")
    _, argv, _, out = SETUPS[name](in_tmp)
    out.mkdir(exist_ok=True)
    cmd = (f"mount --bind -o ro '{out}' '{out}' && exec '{sys.executable}' '{ROOT / SCRIPTS[name]}' "
           + " ".join(f"'{a}'" for a in argv))
    p = subprocess.run(["unshare", "-m", "sh", "-c", cmd], capture_output=True, text=True, timeout=120,
                       env=dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1"))
    if "mount" in p.stderr and p.returncode != 2:
        pytest.skip(f"no private read-only mount here: {p.stderr.strip()[:200]}")
    lines = [x for x in _lines(p.stderr) if not x.startswith("warning:")]
    assert p.returncode == 2 and len(lines) == 1 and "Traceback" not in p.stderr, p.stderr
    assert lines[0].startswith("error: ") and "read-only file system" in lines[0] and str(out) in lines[0]


def test_ctrl_c_reaches_forked_workers_but_only_the_parent_reports(tmp_path):
    """A real SIGINT to the whole process group (what Ctrl-C does): pool workers stay silent, the
    parent prints the one line and exits 130."""
    script = tmp_path / "pool_cli.py"
    script.write_text(
        "import multiprocessing as mp, sys, time\n"
        "from tools.errors import run_cli\n"
        "def work(i):\n    time.sleep(60)\n"
        "def fn(_):\n"
        "    with mp.get_context('fork').Pool(2) as pool:\n"
        "        res = pool.map_async(work, range(4))\n"
        "        time.sleep(0.5)\n"
        "        print('ready', flush=True)\n"
        "        res.get()\n"
        "sys.exit(run_cli(fn, None))\n")
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=env, start_new_session=True)
    try:
        assert proc.stdout.readline().strip() == "ready"
        os.killpg(proc.pid, signal.SIGINT)
        out, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 130
    assert _lines(err) == [INTERRUPTED_MESSAGE], err


def test_ctrl_c_that_lands_in_a_finaliser_still_stops_the_program(tmp_path):
    """A KeyboardInterrupt raised inside ``__del__`` (or a weakref callback, as logging's handler clean-up)
    is dropped by Python ("Exception ignored"); the BECO Ctrl-C test once trained on after such a drop.
    run_cli takes the dropped interrupt and raises it again: one line, exit 130, well before the job ends.
    Other unraisable exceptions keep the default report."""
    script = tmp_path / "finaliser_cli.py"
    script.write_text(
        "import os, signal, sys, time\n"
        "from tools.errors import run_cli\n"
        "class Other:\n    def __del__(self):\n        raise ValueError('ordinary unraisable')\n"
        "class D:\n    def __del__(self):\n        os.kill(os.getpid(), signal.SIGINT)\n        time.sleep(0.2)\n"
        "def fn(_):\n"
        "    Other()\n"
        "    D()\n"
        "    t = time.time()\n"
        "    while time.time() - t < 20:\n        time.sleep(0.01)\n"
        "    print('not interrupted', flush=True)\n"
        "sys.exit(run_cli(fn, None))\n")
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    t0 = time.time()
    p = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, env=env, timeout=60)
    assert p.returncode == 130 and "not interrupted" not in p.stdout, (p.stdout, p.stderr)
    assert time.time() - t0 < 15
    lines = _lines(p.stderr)
    assert lines[-1] == INTERRUPTED_MESSAGE and "KeyboardInterrupt" not in p.stderr, p.stderr
    assert "ordinary unraisable" in p.stderr  # the default hook still reports everything else


# ----------------------------------------------------------------------------------------------
# Parse-time range checks
# ----------------------------------------------------------------------------------------------

def _parsers():
    evaluation = cli_module("evaluation.py")
    infer = cli_module("infer.py")
    run_pipeline = cli_module("run_pipeline.py")
    train = cli_module("train.py")
    gen_mask = cli_module("irn/gen_mask.py")
    run_sample = cli_module("irn/run_sample.py")

    return {"train": (train.build_parser(), ["--name", "n"]),
            "infer": (infer.build_parser(), ["--name", "n", "--load_epo", "31"]),
            "evaluation": (evaluation.build_parser(), ["--name", "n", "--task", "cam", "--dict_dir", "dict"]),
            "run_sample": (run_sample.build_parser(), []), "gen_mask": (gen_mask.build_parser(), []),
            "run_pipeline": (run_pipeline.build_parser(), [])}


BAD_FLAGS = [
    ("infer", ["--threads", "-1"]), ("infer", ["--scales", "0"]), ("infer", ["--scales", "1", "-0.5"]),
    ("infer", ["--device", "tpu"]), ("infer", ["--alphas", "-3"]), ("infer", ["--workers", "-1"]),
    ("infer", ["--load_epo", "-1"]), ("infer", ["--width", "0"]), ("infer", ["--D", "0"]),
    ("evaluation", ["--workers", "0"]), ("evaluation", ["--workers", "-2"]),
    ("train", ["--batch_size", "0"]), ("train", ["--early_batch_size", "0"]), ("train", ["--max_epochs", "0"]),
    ("train", ["--lr", "0"]), ("train", ["--lr", "-0.01"]), ("train", ["--lr", "nan"]), ("train", ["--wt_dec", "-1"]),
    ("train", ["--device", "gpu"]), ("train", ["--device", "cuda:x"]), ("train", ["--threads", "-1"]),
    ("train", ["--workers", "-1"]), ("train", ["--TH", "1.5"]), ("train", ["--RCAM_T", "0.3", "-0.1"]),
    ("train", ["--crop", "0", "0"]), ("train", ["--resize", "0", "512"]), ("train", ["--print_freq", "0"]),
    ("train", ["--val_epochs", "3,x"]), ("train", ["--val_epochs", "-1"]), ("train", ["--seed", "-5"]),
    ("train", ["--width", "0"]), ("train", ["--als_cross", "-1"]), ("train", ["--alphas", "0"]),
    ("run_sample", ["--sem_seg_bg_thres", "5"]), ("run_sample", ["--ins_seg_bg_thres", "-0.1"]),
    ("run_sample", ["--conf_fg_thres", "-1"]), ("run_sample", ["--conf_bg_thres", "1.5"]),
    ("run_sample", ["--cam_eval_thres", "2"]), ("run_sample", ["--device", "tpu"]),
    ("run_sample", ["--cam_scales", "0,1.0"]), ("run_sample", ["--cam_scales", "0.5,1.5"]),
    ("run_sample", ["--beta", "0"]), ("run_sample", ["--exp_times", "-1"]), ("run_sample", ["--irn_batch_size", "0"]),
    ("run_sample", ["--irn_crop_size", "0"]), ("run_sample", ["--irn_crop_size", "64"]),
    ("run_sample", ["--irn_learning_rate", "0"]),
    ("run_sample", ["--num_workers", "-1"]), ("run_sample", ["--irn_num_epoches", "0"]),
    ("gen_mask", ["--thd", "1.5"]), ("gen_mask", ["--thd", "-0.1"]), ("gen_mask", ["--num_workers", "-1"]),
    ("run_pipeline", ["--workers", "0"]), ("run_pipeline", ["--threads", "-1"]), ("run_pipeline", ["--device", "tpu"]),
]


@pytest.mark.parametrize("name,bad", BAD_FLAGS, ids=[f"{n}{''.join(b)}" for n, b in BAD_FLAGS])
def test_bad_flag_value_is_a_usage_error(name, bad, capsys):
    parser, base = _parsers()[name]
    with pytest.raises(SystemExit) as e:
        parser.parse_args(base + bad)
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert f"error: argument {bad[0]}" in _lines(err)[-1] and "Traceback" not in err


def test_reference_commands_and_defaults_still_parse():
    p = _parsers()
    a = p["infer"][0].parse_args("--name ktse1 --model ktse --load_epo 31 --dict --infer_list voc12/train_aug.txt".split())
    assert a.scales == [0.5, 1.0, 1.5, 2.0] and a.alphas == [5, 7, 9] and a.device == "auto" and a.threads is None
    a = p["evaluation"][0].parse_args("--name ktse1 --task cam --dict_dir dict".split())
    assert a.workers >= 1
    a = p["train"][0].parse_args("--name ktse1 --model ktse".split())
    assert (a.batch_size, a.lr, a.max_epochs, a.TH, a.RCAM_T, a.threads) == (16, 0.01, 40, [0.6, 0.2], [0.3, 0.15], 0)
    assert a.val_epochs == "11,21,31,38,39"
    a = p["run_sample"][0].parse_args([])
    assert (a.conf_fg_thres, a.conf_bg_thres, a.sem_seg_bg_thres, a.beta, a.exp_times) == (0.30, 0.1, 0.25, 10, 8)
    assert a.cam_scales == (1.0, 0.5, 1.5, 2.0)
    assert p["run_sample"][0].parse_args(["--cam_scales", "(1.0, 0.5)"]).cam_scales == (1.0, 0.5)
    assert p["gen_mask"][0].parse_args([]).thd == 0.5
    # accepted device spellings (normalised to lower case) and boundary values
    for d in ("auto", "cpu", "cuda", "cuda:1", "CUDA:0"):
        assert p["infer"][0].parse_args(p["infer"][1] + ["--device", d]).device == d.lower()
    assert p["gen_mask"][0].parse_args(["--thd", "1"]).thd == 1.0
    assert p["infer"][0].parse_args(p["infer"][1] + ["--threads", "0"]).threads == 0
    assert p["train"][0].parse_args(["--name", "n", "--val_epochs", "none"]).val_epochs == "none"
    assert p["train"][0].parse_args(["--name", "n", "--val_epochs", "0,last"]).val_epochs == "0,last"


def test_validators_messages():
    with pytest.raises(argparse.ArgumentTypeError, match=r"integer >= 0, got '-1'"):
        cli.nonneg_int("-1")
    with pytest.raises(argparse.ArgumentTypeError, match=r"in \[0, 1\], got '5'"):
        cli.fraction("5")
    with pytest.raises(argparse.ArgumentTypeError, match="expected an integer"):
        cli.positive_int("2.5")
    with pytest.raises(argparse.ArgumentTypeError, match=r"> 0"):
        cli.positive_float("0")
    assert cli.fraction("0") == 0.0 and cli.positive_int("3") == 3 and cli.device(" Cuda ") == "cuda"


# ----------------------------------------------------------------------------------------------
# Fail early: every missing input in one message, before anything runs
# ----------------------------------------------------------------------------------------------

def test_require_all_lists_every_missing_input_once(tmp_path):
    (tmp_path / "d").mkdir()
    (tmp_path / "f").write_text("x")
    require_all([(tmp_path / "f", "file", "h"), (tmp_path / "d", "dir", "h", "dir"), (None, "unused", "h"),
                 ([tmp_path / "nope", tmp_path / "f"], "one of two", "h")])
    with pytest.raises(MissingFileError) as e:
        require_all([(tmp_path / "a.pth", "weights A", "get A at http://a"),
                     (tmp_path / "b", "folder B", "get B", "dir"),
                     (tmp_path / "a.pth", "weights A", "get A at http://a"),
                     (tmp_path / "d", "a file", "h"),
                     ("no_such_module_xyz", "module X", "pip install x", "module")], context="before step 1")
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith("4 required inputs are missing (checked before step 1)")
    assert msg.count("a.pth") == 1 and "http://a" in msg and "folder B" in msg and "it is a folder" in msg
    assert "no_such_module_xyz" in msg and "pip install x" in msg


def _irn_inputs(tmp: Path, monkeypatch) -> list[str]:
    voc = _voc(tmp)
    lst, cls = _lists(tmp)
    monkeypatch.setenv("TORCH_HOME", str(tmp / "torch_home"))  # no hub-cache copy of the ImageNet file
    return ["--voc12_root", str(voc), "--train_list", str(lst), "--infer_list", str(lst), "--cls_labels", str(cls),
            "--log_name", str(tmp / "log"), "--cam_weights_name", str(tmp / "sess" / "031net_main"),
            "--irn_backbone_init", str(tmp / "pretrained" / "resnet50-19c8e357.pth")] + _irn_outputs(tmp)


def test_run_sample_lists_all_missing_files_before_any_step(tmp_path, monkeypatch, capsys):
    pytest.importorskip("pydensecrf")
    run_sample = cli_module("irn/run_sample.py")
    from irn.steps import make_cam

    ran = []
    monkeypatch.setattr(make_cam, "run", lambda args: ran.append("make_cam"))
    assert run_sample.main(_irn_inputs(tmp_path, monkeypatch)) == 2
    err = capsys.readouterr().err
    lines = _lines(err)
    assert len(lines) == 1 and "Traceback" not in err, err
    assert "2 required inputs are missing" in lines[0]
    assert str(tmp_path / "sess" / "031net_main.pth") in lines[0]  # stage-one checkpoint
    assert str(tmp_path / "pretrained" / "resnet50-19c8e357.pth") in lines[0]  # ImageNet ResNet-50
    assert "https://download.pytorch.org/models/resnet50-19c8e357.pth" in lines[0]
    assert not ran and not (tmp_path / "out").exists()  # no step ran, no output folder made


def test_run_sample_checks_only_what_no_earlier_step_makes(tmp_path, monkeypatch, capsys):
    run_sample = cli_module("irn/run_sample.py")

    argv = _irn_inputs(tmp_path, monkeypatch) + ["--make_cam_pass", "false", "--cam_to_ir_label_pass", "false",
                                                 "--train_irn_pass", "false"]
    assert run_sample.main(argv) == 2
    msg = _lines(capsys.readouterr().err)[0]
    # make_sem_seg_labels alone needs the CAMs and the IRN weights; the stage-one checkpoint and the
    # ImageNet file belong to switched-off steps
    assert "CAM folder" in msg and "IRN weights" in msg
    assert "031net_main" not in msg and "resnet50" not in msg


def test_run_sample_unsupported_step_is_a_one_line_error(tmp_path, capsys):
    run_sample = cli_module("irn/run_sample.py")

    assert run_sample.main(["--train_cam_pass", "true", "--log_name", str(tmp_path / "log")]) == 2
    lines = _lines(capsys.readouterr().err)
    assert len(lines) == 1 and "--train_cam_pass true" in lines[0]


def test_run_sample_script_missing_inputs_no_traceback(tmp_path, monkeypatch):
    """The authors' README command as a process: one stderr line, exit 2."""
    argv = _irn_inputs(tmp_path, monkeypatch)
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    p = subprocess.run([sys.executable, "run_sample.py", *argv], cwd=ROOT / "irn", env=env, capture_output=True,
                       text=True, timeout=120)
    assert p.returncode == 2 and len(_lines(p.stderr)) == 1 and "Traceback" not in p.stderr, p.stderr
    assert "031net_main.pth" in p.stderr


def test_gen_mask_missing_score_dir_is_one_line(tmp_path, capsys):
    gen_mask = cli_module("irn/gen_mask.py")

    assert gen_mask.main(["--score_dir", str(tmp_path / "nope"), "--mask_out_dir", str(tmp_path / "m")]) == 2
    lines = _lines(capsys.readouterr().err)
    assert len(lines) == 1 and str(tmp_path / "nope") in lines[0] and "run_sample.py" in lines[0]
    assert not (tmp_path / "m").exists()


def test_train_infer_evaluation_list_all_missing_inputs(tmp_path, capsys):
    evaluation = cli_module("evaluation.py")
    infer = cli_module("infer.py")
    train = cli_module("train.py")

    t = tmp_path
    assert train.main(["--name", "n", "--exp_root", str(t / "exp"), "--data_root", str(t / "voc"),
                       "--train_list", str(t / "l.txt"), "--cls_labels", str(t / "c.npy"),
                       "--init", str(t / "w.params")]) == 2
    msg = _lines(capsys.readouterr().err)
    assert len(msg) == 1 and all(s in msg[0] for s in ("JPEGImages", "l.txt", "c.npy", "w.params", "SegmentationClass"))
    assert not (t / "exp").exists()
    assert infer.main(["--name", "n", "--load_epo", "3", "--exp_root", str(t / "exp"), "--data_root", str(t / "voc"),
                       "--infer_list", str(t / "l.txt"), "--cls_labels", str(t / "c.npy"), "--dict"]) == 2
    msg = _lines(capsys.readouterr().err)
    assert len(msg) == 1 and all(s in msg[0] for s in ("JPEGImages", "l.txt", "c.npy", "003net_main.pth"))
    assert not (t / "exp").exists()
    assert evaluation.main(["--name", "n", "--task", "cam", "--pred_dir", str(t / "p"), "--gt_dir", str(t / "g"),
                            "--list", str(t / "l.txt")]) == 2
    msg = _lines(capsys.readouterr().err)
    assert len(msg) == 1 and all(s in msg[0] for s in (str(t / "p"), str(t / "g"), "l.txt"))


def test_pipeline_checks_external_inputs_first(tmp_path, monkeypatch):
    from pipeline.plan import build_steps, default_config
    from pipeline.runner import PerIdOutputs, Step, check_requirements

    # a step's input made by an earlier selected step is not checked; a finished step needs nothing
    (tmp_path / "done.txt").write_text("x")
    steps = [Step("a", "s", ["true"], outputs=["made/x.pth", PerIdOutputs("made/dir", "l.txt", ".npy")]),
             Step("b", "s", ["true"], outputs=["b.out"],
                  requires=[("made/x.pth", "x", "h"), ("made/dir/1.npy", "y", "h"), ("ext/y.pth", "Y weights", "hy")]),
             Step("c", "s", ["true"], outputs=["done.txt"], requires=[("ext/z.pth", "Z weights", "hz")], needs=[])]
    rec = tmp_path / "rec"
    rec.mkdir()
    (rec / "c.json").write_text(json.dumps({"command": "true", "upstream": {}}))  # c finished, same command
    with pytest.raises(MissingFileError) as e:
        check_requirements(steps, tmp_path, record_dir=rec)
    assert "Y weights" in str(e.value) and "made/" not in str(e.value) and "Z weights" not in str(e.value)
    with pytest.raises(MissingFileError, match="Z weights"):
        check_requirements(steps[2:], tmp_path, overwrite=True, record_dir=rec)

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    voc = build_steps(default_config("voc", data_root="no_voc_here"))
    with pytest.raises(MissingFileError) as e:
        check_requirements(voc, tmp_path, record_dir=tmp_path / "rec")
    msg = str(e.value)
    for s in ("no_voc_here/JPEGImages", "ilsvrc-cls_rna-a1_cls1000_ep-0001.params", "resnet50-19c8e357.pth",
              "resnet-101_v2.pth"):
        assert s in msg
    assert "voc12/train_aug.txt" not in msg  # made by the prepare step
    if "pydensecrf" in sys.modules or _has_crf():
        check_requirements(build_steps(default_config("toy")), tmp_path, record_dir=tmp_path / "rec")  # toy: nothing external


def _has_crf() -> bool:
    import importlib.util

    return importlib.util.find_spec("pydensecrf") is not None


def test_run_pipeline_voc_missing_data_is_one_line_before_any_step(in_tmp, monkeypatch, capsys):
    run_pipeline = cli_module("run_pipeline.py")

    ran = []
    monkeypatch.setattr(run_pipeline, "run_steps", lambda *a, **k: ran.append(1))
    monkeypatch.setenv("TORCH_HOME", str(in_tmp / "torch_home"))
    assert run_pipeline.main(["--preset", "voc", "--data_root", str(in_tmp / "novoc"), "--name", "cli_err"]) == 2
    lines = _lines(capsys.readouterr().err)
    assert len(lines) == 1 and "JPEGImages" in lines[0] and not ran


def test_device_unavailable_is_a_user_error(monkeypatch):
    import torch

    from tools.errors import DeviceError
    from tools.misc import get_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(DeviceError, match="CUDA is not available"):
        get_device("cuda:0")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(DeviceError, match="1 CUDA device"):
        get_device("cuda:3")


@pytest.mark.parametrize("exc", [KeyboardInterrupt(), MissingFileError("x not found")])
def test_message_starts_its_own_line_after_an_open_progress_bar(exc, capsys):
    """A step stopped mid-bar: the bar (which ends without a newline) is closed before the message, so
    ``interrupted:`` / ``error:`` is not glued to the end of the bar's line."""
    from tqdm import tqdm

    def step(_):
        bar = tqdm(total=10, desc="epoch 001", leave=False)
        bar.update(3)
        raise exc

    run_cli(step, None)
    err = capsys.readouterr().err
    head = INTERRUPTED_MESSAGE if isinstance(exc, KeyboardInterrupt) else "error: x not found"
    at = err.index(head)
    assert at == 0 or err[at - 1] in "\r\n", repr(err[max(0, at - 40):at + 20])


def test_run_sample_unwritable_log_is_one_line(in_tmp, monkeypatch, capsys):
    """The <log_name>.log of run_sample.py is opened inside the CLI's error path: a read-only log folder is
    one error line, not a traceback (it used to be opened before run_cli)."""
    main, argv, _, _ = setup_run_sample(in_tmp)
    run_sample = cli_module("irn/run_sample.py")
    log = in_tmp / "ro" / "log.log"

    def refuse(stream, path):
        raise OSError(errno.EROFS, "Read-only file system", str(log))
    monkeypatch.setattr(run_sample, "_Tee", refuse)
    assert main(argv) == 2
    lines = _lines(capsys.readouterr().err)
    assert len(lines) == 1 and lines[0].startswith("error: read-only file system") and str(log) in lines[0]
