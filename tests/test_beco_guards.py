"""BECO guards and fixes: boundary weights per term, training-batch checks (a channels-last batch at crop 256
crashed the CPU backward), fp32 evaluation under --amp, the ImageNet file check, parse-time validation,
the logging-folder guard (--resume / --overwrite) with the pipeline's flags, truncated logits in test.py,
Ctrl-C = one line and exit 130. Tiny networks and the toy VOC set; few processes (each pays the torch import)."""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from segmentation.beco.deeplabv2 import ResNetBackbone, build_deeplabv2, check_imagenet_file, load_imagenet_backbone
from segmentation.beco.model import BECO, BECOSettings, beco_losses, check_batch
from tools.errors import DataError
from conftest import cli_module
from test_segmentation_cli import _flags

ROOT = Path(__file__).resolve().parents[1]
SEG = ROOT / "segmentation"
PY = sys.executable
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}
def _lines(err: str) -> list[str]:
    """stderr without tqdm's progress bars (they go to stderr too)."""
    bar = re.compile(r"\d+/\d+ \[[^\]]*(it/s|s/it)")  # "1/3 [00:00<00:00,  2.25it/s, loss=4.93]"
    return [ln for ln in err.replace("\r", "\n").splitlines() if ln.strip() and not bar.search(ln)]


TERMS = {"bdry_whb": "loss_ce1", "bdry_whi": "loss_ce2", "bdry_wlb": "loss_cot1", "bdry_wli": "loss_cot2"}


# ----------------------------------------------------------------------------------------- model pieces
def test_each_boundary_weight_scales_its_own_term():
    g = torch.Generator().manual_seed(0)
    l1, l2 = torch.randn(2, 21, 6, 7, generator=g), torch.randn(2, 21, 6, 7, generator=g)
    y = torch.randint(0, 21, (2, 6, 7), generator=g)
    m = torch.randint(0, 2, (2, 6, 7), generator=g)
    bd = torch.randint(0, 2, (2, 6, 7), generator=g).float()
    zero = dict.fromkeys(TERMS, 0.0)
    base = beco_losses(l1, l2, y, m, bd, BECOSettings(**zero))
    ce = torch.nn.functional.cross_entropy
    target = {"loss_ce1": (l1, y, m), "loss_ce2": (l2, y, m), "loss_cot1": (l1, l2.argmax(1), 1 - m),
              "loss_cot2": (l2, l1.argmax(1), 1 - m)}
    for flag, term in TERMS.items():
        out = beco_losses(l1, l2, y, m, bd, BECOSettings(**{**zero, flag: 0.7}))
        changed = {k for k in TERMS.values() if not torch.equal(out[k], base[k])}
        assert changed == {term}, flag
        lg, t, w = target[term]
        want = (ce(lg, t, ignore_index=255, reduction="none") * w * (1 + 0.7 * bd)).mean()
        assert torch.allclose(out[term], want), flag
    # reference defaults: whb = whi = 0.2 (both confident terms), wlb = wli = 0
    d = beco_losses(l1, l2, y, m, bd, BECOSettings())
    assert not torch.equal(d["loss_ce2"], base["loss_ce2"]) and torch.equal(d["loss_cot2"], base["loss_cot2"])


def test_check_batch_dtypes_and_layout():
    img = torch.randn(2, 3, 8, 8).to(memory_format=torch.channels_last)
    lab = torch.zeros(2, 8, 8, dtype=torch.long)
    msk = torch.ones(2, 8, 8, dtype=torch.long)
    assert not img.is_contiguous()
    x, y, m = check_batch(img, lab, msk)
    assert x.is_contiguous() and torch.equal(x, img)
    for bad, what in (((img.double(), lab, msk), "images must be float32"),
                      ((img, lab.int(), msk), "labels must be int64"),
                      ((img, lab, msk.float()), "masks must be int64"),
                      ((img, lab[:, :4], msk), "labels must be int64 (B,H,W) matching")):
        with pytest.raises(DataError, match=r"BECO training batch: .*" + what.replace("(", r"\(").replace(")", r"\)")):
            check_batch(*bad)


def test_train_step_at_crop_256_in_a_subprocess():
    """One BECO step (strong augmentation, class-mix, online labels, backward, SGD) at crop 256: the
    channels-last batch the augmentation used to return crashed natively here (segfault, torch 2.14)."""
    code = """
import torch
from segmentation.beco.deeplabv2 import build_deeplabv2
from segmentation.beco.model import BECO, BECOSettings
from segmentation.beco.engine import build_optimizer, train_step
torch.manual_seed(0)
nets = [build_deeplabv2(backbone="resnet18", width=8) for _ in range(2)]
model = BECO(nets[0], nets[1], BECOSettings(warm_up=0, mix_prob=1.0))
g = torch.Generator().manual_seed(1)
img = torch.randn(2, 3, 256, 256, generator=g)
lab = torch.randint(0, 21, (2, 256, 256), generator=g)
msk = torch.randint(0, 2, (2, 256, 256), generator=g)
out = train_step(model, build_optimizer(model, 0.01, 0.9, 1e-4), img, lab, msk)
print("loss", float(out["loss"].detach()))
"""
    p = subprocess.run([PY, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300, env=ENV)
    assert p.returncode == 0, f"rc {p.returncode}\n{p.stdout[-2000:]}\n{p.stderr[-2000:]}"
    assert np.isfinite(float(p.stdout.split("loss")[-1]))


# ----------------------------------------------------------------------------------------- ImageNet file
def test_imagenet_file_sha256_check_warns_once(tmp_path, capsys, monkeypatch):
    bb = ResNetBackbone("resnet18", 8, width=8)
    sd = {k.replace("stem_layer.", ""): v for k, v in bb.state_dict().items()}  # torchvision key layout
    fake = tmp_path / "resnet18-fake.pth"
    torch.save(sd, fake)
    load_imagenet_backbone(bb, fake, "resnet18")
    load_imagenet_backbone(bb, fake, "resnet18")  # same file again: no second line
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("warning: ") and str(fake) in err[0] and "resnet18-f37072fd" in err[0]
    assert check_imagenet_file(fake, "resnet101") is False  # the reference's V2 file has prefix cd907fc2
    assert "resnet101-cd907fc2" in capsys.readouterr().err
    # the right file (here: a name whose prefix matches the bytes) passes silently
    from tools.provenance import sha256_file
    import segmentation.beco.deeplabv2 as dl

    good = tmp_path / "other.pth"
    good.write_bytes(b"x" * 3_000_000)  # > 1 chunk
    monkeypatch.setitem(dl.IMAGENET_URLS, "resnet18", f"https://x/resnet18-{sha256_file(good)[:8]}.pth")
    assert check_imagenet_file(good, "resnet18") is True and capsys.readouterr().err == ""


# ----------------------------------------------------------------------------------------- parse time
@pytest.mark.parametrize("argv, msg", [
    (["--batch_size", "0"], "argument --batch_size: must be an integer >= 1"),
    (["--backbone", "vgg16"], "argument --backbone: invalid choice: 'vgg16'"),
    (["--crop_size", "0"], "argument --crop_size: must be an integer >= 1"),
    (["--max_epoch", "0"], "argument --max_epoch: must be an integer >= 1"),
    (["--highres_t", "1.5"], "argument --highres_t: must be a number in [0, 1]"),
    (["--mix_prob", "-0.1"], "argument --mix_prob: must be a number in [0, 1]"),
    (["--num_workers", "-1"], "argument --num_workers: must be an integer >= 0"),
    (["--resume", "--overwrite"], "argument --overwrite: not allowed with argument --resume"),
])
def test_bad_values_fail_at_parse_time(argv, msg, capsys):
    from segmentation.beco.config import parse_args

    with pytest.raises(SystemExit) as e:
        parse_args(argv)
    assert e.value.code == 2
    assert f": error: {msg}" in capsys.readouterr().err.strip().splitlines()[-1]


def test_bad_config_file_value_fails_like_a_flag(tmp_path, capsys):
    from segmentation.beco.config import parse_args

    cfg = tmp_path / "c.json"
    cfg.write_text(json.dumps({"loader": {"batch_size": 0}, "model": {"highres_t": 0.9}}))
    with pytest.raises(SystemExit) as e:
        parse_args(["--config", str(cfg)])
    assert e.value.code == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert "batch_size = 0" in last and "must be an integer >= 1" in last and str(cfg) in last
    ok = parse_args(["--config", str(cfg), "--batch_size", "2", "--backbone", "resnet18", "--highres_t", "1"])
    assert (ok.batch_size, ok.highres_t, ok.backbone) == (2, 1.0, "resnet18")


# ----------------------------------------------------------------------------------------- runs on the toy set
def _toy_flags(root: Path, logs: Path, tag: str) -> list[str]:
    return _flags(root, logs, tag) + ["--max_epoch", "1", "--threads", "1"]


def _main(argv: list[str], capsys) -> tuple[int, str]:
    from segmentation.beco.engine import cli_main

    rc = cli_main(argv)
    return rc, capsys.readouterr().err


def _save_tiny_ckpt(path: Path) -> None:
    torch.manual_seed(0)
    nets = [build_deeplabv2(backbone="resnet18", width=8) for _ in range(2)]
    torch.save({"net_state_dict": BECO(nets[0], nets[1], BECOSettings()).nets_state_dict()}, path)


def test_evaluation_is_fp32_under_amp_unless_amp_eval(toy_voc, tmp_path, capsys, one_thread):
    ckpt = tmp_path / "ck.pth"
    _save_tiny_ckpt(ckpt)
    base = ["--test", "--ckpt", str(ckpt), "--data_root", str(toy_voc), "--backbone", "resnet18",
            "--backbone_width", "8", "--val_size", "32", "--num_workers", "0", "--device", "cpu",
            "--logging_path_base", str(tmp_path)]
    outs = {}
    for tag, extra in (("fp32", []), ("amp", ["--amp"]), ("amp_eval", ["--amp", "--amp_eval"])):
        rc, err = _main(base + ["--logging_tag", tag] + extra, capsys)
        assert rc == 0, err
        files = sorted((tmp_path / tag / "logits_msc").glob("*.npy"))
        assert len(files) == 6
        outs[tag] = np.stack([np.load(f) for f in files])
        outs[tag + "_cm"] = json.loads((tmp_path / tag / "test_metrics.json").read_text())["confusion_matrix"]
    assert np.array_equal(outs["amp"], outs["fp32"]) and outs["amp_cm"] == outs["fp32_cm"]
    assert not np.array_equal(outs["amp_eval"], outs["fp32"])  # bf16 autocast on CPU changes the values
    assert np.abs(outs["amp_eval"] - outs["fp32"]).max() < 0.1 * np.abs(outs["fp32"]).max()


def test_logging_folder_guard_resume_overwrite(toy_voc, tmp_path, capsys, one_thread):
    flags = _toy_flags(toy_voc, tmp_path, "run")
    d = tmp_path / "run"
    d.mkdir()
    (d / "metrics.json").write_text("{}")
    (d / "logits_msc").mkdir()
    (d / "logits_msc" / "stale.npy").write_bytes(b"")
    rc, err = _main(flags, capsys)
    lines = _lines(err)
    assert rc == 2 and len(lines) == 1, err
    assert str(d) in lines[0] and "--resume" in lines[0] and "--overwrite" in lines[0] and "metrics.json" in lines[0]
    assert (d / "metrics.json").read_text() == "{}" and not (d / "log.txt").exists()
    # --overwrite: the old run's files go, a new run is trained and tested
    rc, err = _main(flags + ["--overwrite"], capsys)
    assert rc == 0, err
    assert not (d / "logits_msc" / "stale.npy").exists() and len(list((d / "logits_msc").glob("*.npy"))) == 6
    assert [h["epoch"] for h in json.loads((d / "metrics.json").read_text())["val"]] == [1]
    best = (d / "best_ckpt.pth").read_bytes()
    # the same command again is refused; --resume continues (nothing left to train: re-tests only)
    rc, err = _main(flags, capsys)
    assert rc == 2 and "already holds a BECO run" in err
    rc, err = _main(flags + ["--resume"], capsys)
    assert rc == 0, err
    assert (d / "best_ckpt.pth").read_bytes() == best and (d / "ckpt_epoch_1.pth").is_file()
    # --test is not concerned by the guard
    rc, err = _main(["--test", "--ckpt", str(d / "best_ckpt.pth")] + flags, capsys)
    assert rc == 0, err


def test_pipeline_passes_resume_and_overwrite(tmp_path):
    from pipeline.plan import build_steps, default_config, paths_for

    cfg = default_config("voc")
    step = {s.name: s for s in build_steps(cfg)}["beco_train"]
    assert "--overwrite" in step.command(overwrite=True, root=tmp_path)
    assert not {"--resume", "--overwrite"} & set(step.command(root=tmp_path))
    d = tmp_path / paths_for(cfg).beco_dir
    d.mkdir(parents=True)
    (d / "best_ckpt.pth").write_bytes(b"")  # killed between best_ckpt and the first ckpt_epoch: resumable
    assert step.command(root=tmp_path)[-1] == "--resume"


def _zero_logits(toy_voc: Path, tmp_path: Path) -> tuple[list[str], Path]:
    """(val ids of the toy set, a logits_msc folder with a zero (21, 4, 4) file for each)."""
    ids = (toy_voc / "ImageSets/Segmentation/val.txt").read_text().split()
    logits = tmp_path / "logits_msc"
    logits.mkdir()
    for i in ids:
        np.save(logits / f"{i}.npy", np.zeros((21, 4, 4), np.float32))
    return ids, logits


def test_test_py_names_a_truncated_logits_file(toy_voc, tmp_path, capsys):
    test_py = cli_module("segmentation/test.py")
    ids, logits = _zero_logits(toy_voc, tmp_path)
    bad = logits / f"{ids[2]}.npy"
    bad.write_bytes(bad.read_bytes()[:-20])
    rc = test_py.main(["--logits_dir", str(logits), "--data_root", str(toy_voc), "--n-jobs", "1"])
    err = _lines(capsys.readouterr().err)
    assert rc == 2 and len(err) == 1 and err[0].startswith("error: logits file") and str(bad) in err[0]
    # the same through the worker pool, as users run it
    p = subprocess.run([PY, "test.py", "--logits_dir", str(logits), "--data_root", str(toy_voc), "--n-jobs", "2",
                        "--overwrite"], cwd=SEG, capture_output=True, text=True, timeout=300, env=ENV)
    lines = _lines(p.stderr)
    assert p.returncode == 2 and len(lines) == 1 and str(bad) in lines[0], p.stderr


def test_ctrl_c_prints_one_line_and_exits_130(toy_voc, tmp_path):
    flags = _flags(toy_voc, tmp_path, "sigint") + ["--max_epoch", "500", "--num_workers", "1"]
    log = tmp_path / "sigint" / "log.txt"
    proc = subprocess.Popen([PY, "main.py", *flags], cwd=SEG, start_new_session=True, env=ENV,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 300
        while not (log.is_file() and "BECO training:" in log.read_text()):
            assert proc.poll() is None, proc.stderr.read()
            assert time.time() < deadline
            time.sleep(0.05)
        time.sleep(0.5)  # inside the training loop
        os.killpg(proc.pid, signal.SIGINT)  # what Ctrl-C in a terminal does: the whole process group
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    from tools.errors import INTERRUPTED_MESSAGE

    assert proc.returncode == 130, err
    assert _lines(err) == [INTERRUPTED_MESSAGE], err


@pytest.mark.parametrize("bad", ["channels", "nan"])
def test_test_py_refuses_logits_of_another_class_count_or_with_nan(bad, toy_voc, tmp_path, capsys):
    """Logits with 20 channels (another dataset) or NaN were scored silently; now one line naming the file."""
    test_py = cli_module("segmentation/test.py")
    ids, logits = _zero_logits(toy_voc, tmp_path)
    wrong = logits / f"{ids[1]}.npy"
    np.save(wrong, np.zeros((20, 4, 4), np.float32) if bad == "channels" else np.full((21, 4, 4), np.nan, np.float32))
    rc = test_py.main(["--logits_dir", str(logits), "--data_root", str(toy_voc), "--n-jobs", "1"])
    err = _lines(capsys.readouterr().err)
    assert rc == 2 and len(err) == 1 and str(wrong) in err[0], err
    assert ("20 classes, expected 21" if bad == "channels" else "NaN") in err[0]


def test_config_file_that_is_not_json_is_one_error(tmp_path):
    from segmentation.beco.config import load_config
    from tools.errors import WSSSError

    cfg = tmp_path / "c.json"
    cfg.write_text("{not json")
    with pytest.raises(WSSSError, match="is not valid JSON") as e:
        load_config(cfg)
    assert str(cfg) in str(e.value)


def test_weights_at_another_width_are_a_user_error(tmp_path):
    """A narrow backbone loads a file of its own width (the toy presets' stand-in pretraining); a missing
    file, or one of another width, is one error naming the file."""
    import torch

    from tools.errors import WSSSError

    with pytest.raises(WSSSError, match="r18.pth"):
        build_deeplabv2(backbone="resnet18", width=8, pretrained=tmp_path / "r18.pth")
    wide = tmp_path / "r18_w16.pth"
    torch.save({k: v for k, v in build_deeplabv2(backbone="resnet18", width=16).backbone.state_dict().items()}, wide)
    with pytest.raises(WSSSError, match="r18_w16.pth"):
        build_deeplabv2(backbone="resnet18", width=8, pretrained=wide)
