"""train.py end to end on the tiny toy set: checkpoints, validation, clear errors, resume after a kill."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import ROOT, cli_module

train = cli_module("train.py")


def _args(toy_voc: Path, exp: Path, name: str, *extra: str) -> list[str]:
    lists = toy_voc / "lists"
    return ["--name", name, "--exp_root", str(exp), "--data_root", str(toy_voc),
            "--train_list", str(lists / "train_aug.txt"), "--val_list", str(lists / "train.txt"),
            "--cls_labels", str(lists / "cls_labels.npy"), "--init", "none", "--width", "0.0625",
            "--T", "1", "--batch_size", "4", "--early_batch_size", "4", "--crop", "32", "32",
            "--resize", "32", "48", "--workers", "0", "--print_freq", "1", "--epoch_iters", "2",
            "--safe_ce", "true", *extra]


def test_train_saves_reference_checkpoints_and_validates(toy_voc: Path, tmp_path: Path, one_thread) -> None:
    rc = train.main(_args(toy_voc, tmp_path, "run", "--max_epochs", "2", "--val_epochs", "last",
                          "--val_limit", "2"))
    assert rc == 0
    ckpt = tmp_path / "run" / "ckpt"
    sd = torch.load(ckpt / "001net_main.pth", map_location="cpu", weights_only=True)
    assert len(sd) == 241 and not any(k.startswith("module.") for k in sd)
    st = torch.load(ckpt / "last.pth", map_location="cpu", weights_only=False)
    assert st["epoch"] == 1 and st["global_step"] == 4
    assert st["optimizer"]["poly"]["global_step"] == 4
    assert {"model", "optimizer", "rng", "args"} <= set(st)
    log = (tmp_path / "run" / "log.txt").read_text()
    assert "Epoch 001 max miou" in log and "loss_als_cross" in log and "Epoch 001 model is saved!" in log
    assert len(list((tmp_path / "run" / "val_dict").glob("*.npy"))) == 2
    assert (tmp_path / "run" / "tb").is_dir()
    # every loss term finite and the KTSE terms active after T
    line = [x for x in log.splitlines() if "Epoch 001 means" in x][0]
    vals = {kv.split(" : ")[0].strip(): float(kv.split(" : ")[1].split(" |")[0])
            for kv in line.split("means: ")[1].split(", ")}
    assert all(v == v and abs(v) < 1e6 for v in vals.values())
    assert vals["loss_seg_two"] > 0 and vals["loss_seg"] > 0
    # a plain rerun refuses to clobber the run
    assert train.main(_args(toy_voc, tmp_path, "run", "--max_epochs", "2", "--val_epochs", "none")) == 2


def test_clear_errors(toy_voc: Path, tmp_path: Path, capsys) -> None:
    a = _args(toy_voc, tmp_path, "e1", "--max_epochs", "1")
    a[a.index("--init") + 1] = str(tmp_path / "missing.params")
    a[a.index("--width") + 1] = "1"
    a += ["--val_epochs", "none"]
    # the full-width net is only built, never run: the init file check fails first
    assert train.main(a) == 2
    err = capsys.readouterr().err
    assert "missing.params" in err and "http" in err
    b = _args(toy_voc, tmp_path, "e2", "--max_epochs", "1", "--val_epochs", "none")
    b[b.index("--crop") + 1] = "30"
    assert train.main(b) == 2
    assert "multiple of 8" in capsys.readouterr().err


def test_resume_after_kill_matches_uninterrupted_run(toy_voc: Path, tmp_path: Path, one_thread) -> None:
    common = ["--max_epochs", "4", "--val_epochs", "none"]
    assert train.main(_args(toy_voc, tmp_path, "full", *common)) == 0

    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    proc = subprocess.Popen([sys.executable, str(ROOT / "train.py"), *_args(toy_voc, tmp_path, "killed", *common)],
                            cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    last = tmp_path / "killed" / "ckpt" / "last.pth"
    t0 = time.time()
    while not last.exists() and proc.poll() is None and time.time() - t0 < 120:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    st = torch.load(last, map_location="cpu", weights_only=False)
    saved_epoch = st["epoch"]
    assert saved_epoch < 3, "the run finished before it could be killed"

    assert train.main(_args(toy_voc, tmp_path, "killed", *common, "--resume")) == 0
    log = (tmp_path / "killed" / "log.txt").read_text()
    assert f"Resumed from {last}: epoch {saved_epoch + 1:03d}" in log
    full = torch.load(tmp_path / "full" / "ckpt" / "last.pth", map_location="cpu", weights_only=False)
    resumed = torch.load(last, map_location="cpu", weights_only=False)
    assert resumed["epoch"] == full["epoch"] == 3
    assert resumed["global_step"] == full["global_step"]
    for k, v in full["model"].items():
        assert torch.allclose(resumed["model"][k], v, rtol=1e-5, atol=1e-7), k
    so, fo = resumed["optimizer"], full["optimizer"]
    assert so["poly"] == fo["poly"]
    for i, s in fo["state"].items():
        assert torch.allclose(so["state"][i]["momentum_buffer"], s["momentum_buffer"], rtol=1e-5, atol=1e-7)


def test_resume_with_another_width_is_one_error(toy_voc: Path, tmp_path: Path, capsys, one_thread) -> None:
    """--resume with settings that change the network's shapes: one error naming last.pth (it used to be
    torch's size-mismatch traceback)."""
    assert train.main(_args(toy_voc, tmp_path, "w", "--max_epochs", "1", "--val_epochs", "none")) == 0
    capsys.readouterr()
    a = _args(toy_voc, tmp_path, "w", "--max_epochs", "2", "--val_epochs", "none", "--resume")
    a[a.index("--width") + 1] = "0.125"
    assert train.main(a) == 2
    err = [x for x in capsys.readouterr().err.splitlines() if x.strip()]
    assert err[-1].startswith("error: training state") and "last.pth" in err[-1] and "does not fit" in err[-1]
