"""infer.py / models.cam: the msf_cam fixture through the CLI (reference width, generated weights),
resume after a killed run, Ctrl-C safety, overlays, CRF dictionaries and clear errors."""
from __future__ import annotations

import io
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import ROOT, cli_module, shared_path

infer = cli_module("infer.py")
from models.cam import crf_dict, msf_cam, overlay_path, save_overlays

SMALL_WIDTH = 0.0625


def _load(path: Path) -> dict:
    obj = np.load(path, allow_pickle=True)
    assert obj.dtype == object and obj.shape == ()  # the reference format: np.save of a dict
    return obj.item()


# ----------------------------------------------------------------------------------------------
# msf_cam fixture through the CLI
# ----------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def msf_tree(tmp_path_factory):
    """A VOC-format folder with the two fixture JPEGs, their labels and a checkpoint of the generated
    weights (reference width), laid out as the reference README describes."""
    sys.path.insert(0, str(shared_path("reference")))
    import weights  # noqa: PLC0415 - lives in tests/fixtures/reference

    from tools.io import atomic_torch_save

    npz = np.load(shared_path("reference", "stage1", "msf_cam.npz"))
    root = tmp_path_factory.mktemp("msf")
    jpg = root / "data" / "VOC2012" / "JPEGImages"
    jpg.mkdir(parents=True)
    labels, lines = {}, []
    for n in range(sum(f.startswith("name") for f in npz.files)):  # the fixture's images
        name = str(npz[f"name{n}"])
        (jpg / f"{name}.jpg").write_bytes(npz[f"jpeg{n}"].tobytes())
        labels[name] = npz[f"label{n}"].astype(np.float32)
        lines.append(f"/JPEGImages/{name}.jpg /SegmentationClassAug/{name}.png")
    (root / "voc12").mkdir()
    (root / "voc12" / "fx_list.txt").write_text("\n".join(lines) + "\n")
    np.save(root / "voc12" / "cls_labels.npy", labels)
    sd = weights.make_state_dict(weights.load_keys(str(shared_path("reference", "stage1", "net_gpp_keys.json"))),
                                 int(npz["weights_seed"]))
    atomic_torch_save({k: torch.from_numpy(v) for k, v in sd.items()},
                      root / "experiments" / "fx" / "ckpt" / "000net_main.pth")
    return root, npz


def test_msf_cam_fixture_through_cli(msf_tree, monkeypatch, capsys):
    root, npz = msf_tree
    monkeypatch.chdir(root)
    rc = infer.main(["--name", "fx", "--model", "ktse", "--load_epo", "0", "--dict", "--infer_list",
                     "voc12/fx_list.txt", "--device", "cpu", "--workers", "0", "--no_progress"])
    assert rc == 0, capsys.readouterr().err
    for n in range(sum(f.startswith("name") for f in npz.files)):  # the fixture's images
        d = _load(root / "experiments" / "fx" / "dict" / f"{npz[f'name{n}']}.npy")
        assert list(d.keys()) == [int(k) for k in npz[f"keys{n}"]]
        for k in d:
            ref = npz[f"cam{n}_c{k}"]
            assert type(k) is int and d[k].dtype == np.float32 and d[k].shape == ref.shape
            assert np.abs(d[k] - ref).max() / np.abs(ref).max() < 1e-4
    # a rerun skips finished ids
    rc = infer.main(["--name", "fx", "--load_epo", "0", "--dict", "--infer_list", "voc12/fx_list.txt",
                     "--device", "cpu", "--workers", "0", "--no_progress"])
    assert rc == 0 and "0 to infer" in capsys.readouterr().out


# ----------------------------------------------------------------------------------------------
# Small-width runs on the toy set
# ----------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def small_run(toy_voc, tmp_path_factory):
    """Toy VOC tree, a 6-image list and a small-width checkpoint (width read back from its shapes)."""
    from models.resnet38d import Net_gpp
    from tools.io import atomic_torch_save

    work = tmp_path_factory.mktemp("infer_small")
    from voc12.data import read_id_list

    ids = read_id_list(toy_voc / "lists" / "train.txt")[:6]
    (work / "six.txt").write_text("\n".join(f"/JPEGImages/{i}.jpg" for i in ids) + "\n")
    torch.manual_seed(0)
    ckpt = work / "small.pth"
    atomic_torch_save(Net_gpp(width=SMALL_WIDTH).state_dict(), ckpt)
    return work, toy_voc, ids, ckpt


def _cmd(work: Path, voc: Path, ckpt: Path, exp_root: str, *extra: str) -> list[str]:
    return [sys.executable, str(ROOT / "infer.py"), "--name", "t", "--model", "ktse", "--load_epo", "0", "--dict",
            "--infer_list", str(work / "six.txt"), "--data_root", str(voc), "--cls_labels",
            str(voc / "lists" / "cls_labels.npy"), "--ckpt", str(ckpt), "--exp_root", exp_root, "--device", "cpu",
            "--workers", "0", "--threads", "1", "--no_progress", *extra]


def _env() -> dict:
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    env.setdefault("OMP_NUM_THREADS", "2")
    return env


def _start_and_signal(cmd, cwd, dict_dir: Path, sig: int) -> tuple[int, str, str]:
    """Run ``cmd`` and send ``sig`` to its process group once a new dictionary appears."""
    before = len(list(dict_dir.glob("*.npy"))) if dict_dir.is_dir() else 0
    proc = subprocess.Popen(cmd, cwd=cwd, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            start_new_session=True, text=True)
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        if dict_dir.is_dir() and len(list(dict_dir.glob("*.npy"))) > before:
            break
        time.sleep(0.05)
    if proc.poll() is None:
        os.killpg(proc.pid, sig)
    out, err = proc.communicate(timeout=240)
    return proc.returncode, out, err


def test_interrupt_then_kill_then_resume_gives_the_same_files(small_run, monkeypatch):
    """Ctrl-C leaves only complete files; after a SIGKILL the rerun finishes the rest, and the files equal
    those of an uninterrupted run."""
    work, voc, ids, ckpt = small_run
    monkeypatch.chdir(work)
    assert infer.main(_cmd(work, voc, ckpt, "full")[2:]) == 0
    d = work / "resumed" / "t" / "dict"
    rc, _, err = _start_and_signal(_cmd(work, voc, ckpt, "resumed"), work, d, signal.SIGINT)
    assert rc in (0, 130), err
    if rc == 130:
        assert "interrupted" in err and "Traceback" not in err
    assert not list(d.glob(".*.tmp"))
    rc, _, err = _start_and_signal(_cmd(work, voc, ckpt, "resumed"), work, d, signal.SIGKILL)
    n_before = len(list(d.glob("*.npy")))
    assert 1 <= n_before <= len(ids)
    for p in d.glob("*.npy"):
        _load(p)  # every file present is complete
    again = subprocess.run(_cmd(work, voc, ckpt, "resumed"), cwd=work, env=_env(), capture_output=True, text=True)
    assert again.returncode == 0, again.stderr
    assert f"{len(ids) - n_before} to infer" in again.stdout and f"{n_before} already done" in again.stdout
    assert not list(d.glob(".*.tmp"))  # a SIGKILLed write's temporary file is cleaned up
    for i in ids:
        a, b = _load(work / "full" / "t" / "dict" / f"{i}.npy"), _load(d / f"{i}.npy")
        assert list(a) == list(b)
        for k in a:
            np.testing.assert_array_equal(a[k], b[k])


def test_overlays_and_post_processing_from_saved_dicts(small_run, monkeypatch, capsys):
    work, voc, ids, ckpt = small_run
    pytest.importorskip("matplotlib")
    monkeypatch.chdir(work)
    args = ["--name", "v", "--load_epo", "0", "--infer_list", str(work / "six.txt"), "--data_root", str(voc),
            "--cls_labels", str(voc / "lists" / "cls_labels.npy"), "--ckpt", str(ckpt), "--device", "cpu",
            "--workers", "0", "--threads", "1", "--no_progress"]
    assert infer.main(args + ["--dict"]) == 0
    capsys.readouterr()
    # overlays for saved dicts need no network pass
    assert infer.main(args + ["--dict", "--vis"]) == 0
    out = capsys.readouterr().out
    assert "0 to infer" in out and f"{len(ids)} to post-process" in out
    labels = np.load(voc / "lists" / "cls_labels.npy", allow_pickle=True).item()
    for i in ids:
        for k in np.flatnonzero(labels[i]):
            p = overlay_path(work / "experiments" / "v" / "train", 42, i, int(k))
            assert p.is_file() and p.name.startswith(f"042_{i}_cam_"), p
            from PIL import Image
            assert Image.open(p).size == (640, 480)




def test_library_run_without_the_command_line(small_run, tmp_path, capsys, one_thread):
    """models.cam_infer.run takes InferSettings (what benches use) and writes what the CLI writes."""
    from models.cam_infer import InferSettings, run

    work, voc, ids, ckpt = small_run
    common = dict(name="lib", load_epo=0, dict=True, infer_list=str(work / "six.txt"), data_root=str(voc),
                  cls_labels=str(voc / "lists" / "cls_labels.npy"), ckpt=str(ckpt), device="cpu", workers=0,
                  threads=1, no_progress=True, scales=[1.0])
    stats = run(InferSettings(exp_root=str(tmp_path / "lib"), **common))
    assert stats["inferred"] == len(ids) and stats["width"] == SMALL_WIDTH
    argv = ["--name", "lib", "--load_epo", "0", "--dict", "--infer_list", common["infer_list"], "--data_root",
            str(voc), "--cls_labels", common["cls_labels"], "--ckpt", str(ckpt), "--exp_root", str(tmp_path / "cli"),
            "--device", "cpu", "--workers", "0", "--threads", "1", "--no_progress", "--scales", "1.0"]
    assert infer.main(argv) == 0
    for i in ids:
        a, b = _load(tmp_path / "lib" / "lib" / "dict" / f"{i}.npy"), _load(tmp_path / "cli" / "lib" / "dict" / f"{i}.npy")
        assert list(a) == list(b) and all(np.array_equal(a[k], b[k]) for k in a)


def test_msf_cam_batched_equals_loop_and_label_masking(one_thread):
    from models.resnet38d import Net_gpp
    from voc12.data import msf_inputs

    torch.manual_seed(1)
    net = Net_gpp(width=SMALL_WIDTH).eval()
    img = np.random.default_rng(0).integers(0, 256, (37, 53, 3), dtype=np.uint8)
    inputs = msf_inputs(img)
    label = np.zeros(20, np.float32)
    label[[2, 17]] = 1
    a = msf_cam(net, inputs, label, img.shape[:2])
    b = msf_cam(net, inputs, label, img.shape[:2], batch_same_shape=False)
    assert list(a) == [2, 17]
    for k in a:
        assert a[k].shape == (37, 53) and a[k].dtype == np.float32
        assert 0 <= a[k].min() and a[k].max() < 1
        np.testing.assert_allclose(a[k], b[k], rtol=0, atol=1e-5)
    assert msf_cam(net, inputs, np.zeros(20, np.float32), img.shape[:2]) == {}


def test_crf_dict_reference_layout():
    pytest.importorskip("pydensecrf")
    rng = np.random.default_rng(0)
    img = rng.integers(0, 256, (20, 30, 3), dtype=np.uint8)
    cams = {4: rng.random((20, 30)).astype(np.float32), 11: rng.random((20, 30)).astype(np.float32)}
    out = crf_dict(img, cams, 5)
    assert list(out) == [0, 5, 12] and all(v.shape == (20, 30) for v in out.values())


def test_clear_errors(small_run, monkeypatch, capsys, tmp_path):
    work, voc, ids, ckpt = small_run
    monkeypatch.chdir(tmp_path)
    base = ["--name", "e", "--load_epo", "7", "--dict", "--data_root", str(voc), "--cls_labels",
            str(voc / "lists" / "cls_labels.npy"), "--device", "cpu", "--workers", "0", "--no_progress"]
    # missing checkpoint: names the path and where to get one
    assert infer.main(base + ["--infer_list", str(work / "six.txt")]) == 2
    err = capsys.readouterr().err
    assert "experiments/e/ckpt/007net_main.pth" in err and "train.py" in err
    # a list id without a class label
    bad = tmp_path / "bad.txt"
    bad.write_text("/JPEGImages/no_such_image_17.jpg\n")
    assert infer.main(base + ["--infer_list", str(bad), "--ckpt", str(ckpt)]) == 2
    assert "no_such_image_17" in capsys.readouterr().err
    # a labelled id whose image is missing
    labels = np.load(voc / "lists" / "cls_labels.npy", allow_pickle=True).item()
    labels["no_such_image_17"] = np.eye(20, dtype=np.float32)[3]
    np.save(tmp_path / "cls.npy", labels)
    assert infer.main(base + ["--infer_list", str(bad), "--cls_labels", str(tmp_path / "cls.npy"),
                              "--ckpt", str(ckpt)]) == 2
    err = capsys.readouterr().err
    assert "JPEGImages/no_such_image_17.jpg" in err and "not found" in err
    # a checkpoint that does not fit the requested width names the mismatching keys
    assert infer.main(base + ["--infer_list", str(work / "six.txt"), "--ckpt", str(ckpt), "--width", "0.25"]) == 2
    assert "conv1a.weight" in capsys.readouterr().err
    # the reference's non-existent default model is refused with the fix
    assert infer.main(base + ["--infer_list", str(work / "six.txt"), "--model", "aeft_gpp", "--ckpt", str(ckpt)]) == 2
    assert "--model ktse" in capsys.readouterr().err


def test_missing_or_unreadable_checkpoint_leaves_saved_dicts(small_run, monkeypatch, capsys, tmp_path):
    """The dictionaries of a finished run survive a rerun whose checkpoint is missing or unreadable (the
    records used to begin, deleting every dict to redo, before the checkpoint was loaded)."""
    work, voc, ids, ckpt = small_run
    monkeypatch.chdir(tmp_path)
    args = ["--name", "keep", "--load_epo", "0", "--dict", "--infer_list", str(work / "six.txt"), "--data_root",
            str(voc), "--cls_labels", str(voc / "lists" / "cls_labels.npy"), "--device", "cpu", "--workers", "0",
            "--threads", "1", "--no_progress"]
    assert infer.main(args + ["--ckpt", str(ckpt)]) == 0
    dict_dir = tmp_path / "experiments" / "keep" / "dict"
    before = {p.name: p.stat().st_mtime_ns for p in dict_dir.glob("*.npy")}
    assert len(before) == len(ids)
    bad = tmp_path / "bad.pth"
    bad.write_bytes(b"\x00not a checkpoint" * 64)
    for ck in (tmp_path / "missing.pth", bad):
        capsys.readouterr()
        assert infer.main(args + ["--ckpt", str(ck)]) == 2
        assert str(ck) in capsys.readouterr().err
        assert {p.name: p.stat().st_mtime_ns for p in dict_dir.glob("*.npy")} == before, ck
