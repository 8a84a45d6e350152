"""Reading files must not run code: every pickle/torch reader refuses a crafted file (naming the file
and the refused object, without running it) and still reads this project's and the reference's files;
content checks at those readers name the file."""
from __future__ import annotations

import argparse
import io
import os
import random
from pathlib import Path

import numpy as np
import pytest

from conftest import cli_module
import torch

from models import ktse_train
from tools.layout import StageOneLayout
from tools.train_state import set_rng_state
from irn.steps.common import load_cam_dict, save_cam_dict
from irn.steps.gen_mask import load_score
from models.mxnet_params import read_ndarray_file
from tools.seed_eval import load_dict
from tools.checkpoint import load_torch_file
from tools.errors import DataError, WSSSError
from tools.io import atomic_save_npy, atomic_torch_save
from tools.safe_load import UnsafeFileError, load_npy
from voc12.lists import load_cls_labels


class Payload:
    """Pickles as ``fn(*args)``: what a crafted file would run on loading."""

    def __init__(self, fn, *args) -> None:
        self.fn, self.args = fn, args

    def __reduce__(self):
        return self.fn, self.args


def _payloads(marker: Path) -> dict[str, Payload]:
    """Three ways to create ``marker`` on unpickling, keyed by the global the file names."""
    return {"system": Payload(os.system, f"touch '{marker}'"),
            "exec": Payload(exec, f"open({str(marker)!r}, 'w').close()"),
            "open": Payload(open, str(marker), "w")}


@pytest.fixture(params=["system", "exec", "open"])
def payload(request, tmp_path):
    marker = tmp_path / "MARKER"
    return request.param, _payloads(marker)[request.param], marker


def test_payloads_run_when_unpickled_unsafely(tmp_path, payload):
    """The crafted files of these tests are real attacks: plain unpickling creates the marker."""
    _, evil, marker = payload
    p = tmp_path / "x.npy"
    np.save(p, {0: evil}, allow_pickle=True)
    np.load(p, allow_pickle=True)
    assert marker.exists()


def _refused(fn, path: Path, name: str, marker: Path) -> None:
    with pytest.raises(UnsafeFileError) as e:
        fn(path)
    msg = str(e.value)
    assert str(path) in msg and name in msg and "\n" not in msg
    assert not marker.exists(), "loading the file ran its code"


# ---------------------------------------------------------------------------------------- npy readers
def test_load_dict_refuses_code(tmp_path, payload):
    name, evil, marker = payload
    p = tmp_path / "2007_000032.npy"
    np.save(p, {0: np.zeros((2, 2), np.float32), 1: evil}, allow_pickle=True)
    _refused(load_dict, p, name, marker)


def test_load_cam_dict_refuses_code(tmp_path, payload):
    name, evil, marker = payload
    p = tmp_path / "a.npy"
    np.save(p, {"keys": evil, "cam": np.zeros((1, 1, 1)), "high_res": np.zeros((1, 2, 2))}, allow_pickle=True)
    _refused(load_cam_dict, p, name, marker)


def test_load_cls_labels_refuses_code(tmp_path, payload):
    name, evil, marker = payload
    p = tmp_path / "cls_labels.npy"
    np.save(p, {"2007_000032": evil}, allow_pickle=True)
    _refused(load_cls_labels, p, name, marker)


class Sub(np.ndarray):
    """An ndarray subclass: its own (here harmless) code would run on unpickling."""


def test_npy_refuses_ndarray_subclass_and_codecs(tmp_path):
    """Only ndarray itself is rebuilt, and _codecs.encode only as protocol-2 pickles use it."""
    p = tmp_path / "s.npy"
    np.save(p, {0: np.zeros(2).view(Sub)}, allow_pickle=True)
    with pytest.raises(UnsafeFileError, match="Sub"):
        load_npy(p, "CAM dictionary")
    import codecs

    np.save(p, {0: Payload(codecs.encode, "x", "rot13")}, allow_pickle=True)
    with pytest.raises(UnsafeFileError, match="rot13"):
        load_npy(p, "CAM dictionary")


def test_torch_tensor_in_npy_storage_is_read_weights_only(tmp_path, monkeypatch):
    """The pickle of a tensor carries a torch.save of its storage; a crafted one is refused too."""
    marker = tmp_path / "MARKER"
    buf = io.BytesIO()
    torch.save(Payload(os.system, f"touch '{marker}'"), buf, _use_new_zipfile_serialization=False)
    crafted = Payload(torch.storage._load_from_bytes, buf.getvalue())
    p = tmp_path / "c.npy"
    np.save(p, {"keys": crafted}, allow_pickle=True)
    _refused(lambda q: load_npy(q, "IRN CAM file", torch_tensors=True), p, "system", marker)


# ---------------------------------------------------------------------------------------- torch readers
def _torch_readers():
    return {"load_torch_file": lambda p: load_torch_file(p, "stage-one checkpoint"),
            "load_torch_file numpy": lambda p: load_torch_file(p, "checkpoint", numpy=True),
            "gen_mask score": load_score,
            "train.py resume": ktse_train.load_resume_state}


@pytest.mark.parametrize("reader", list(_torch_readers()))
@pytest.mark.parametrize("legacy", [False, True])
def test_torch_readers_refuse_code(tmp_path, payload, reader, legacy):
    name, evil, marker = payload
    p = tmp_path / "x.pth"
    torch.save({"model": {"w": torch.zeros(2)}, "pred": evil}, p, _use_new_zipfile_serialization=not legacy)
    _refused(_torch_readers()[reader], p, name, marker)


def test_checkpoint_reader_refuses_numpy_where_not_expected(tmp_path):
    """A stage-one checkpoint holds tensors only: even numpy arrays are refused there."""
    p = tmp_path / "c.pth"
    torch.save({"w": np.zeros(2)}, p)
    with pytest.raises(UnsafeFileError, match="_reconstruct"):
        load_torch_file(p, "stage-one checkpoint")


def test_mxnet_reader_does_not_unpickle(tmp_path):
    marker = tmp_path / "MARKER"
    p = tmp_path / "ilsvrc-cls_rna-a1_cls1000_ep-0001.params"
    import pickle

    p.write_bytes(pickle.dumps(Payload(os.system, f"touch '{marker}'")))
    with pytest.raises(WSSSError, match="pickle"):
        read_ndarray_file(p)
    assert not marker.exists()


# ---------------------------------------------------------------------------------------- legitimate files
def _as_numpy1(data: bytes) -> bytes:
    """numpy 2's module names rewritten to numpy 1.x's, in an unframed (protocol <= 3) pickle."""
    assert b"numpy._core.multiarray" in data
    return data.replace(b"numpy._core.multiarray", b"numpy.core.multiarray")


def _save_like_numpy1(path: Path, obj: object) -> None:
    """``np.save`` of a dict as numpy 1.x (the reference) wrote it: a protocol-3 pickle naming
    ``numpy.core.multiarray``."""
    import pickle

    arr = np.empty((), dtype=object)
    arr[()] = obj
    with open(path, "wb") as f:
        np.lib.format.write_array_header_1_0(f, np.lib.format.header_data_from_array_1_0(arr))
        f.write(_as_numpy1(pickle.dumps(arr, protocol=3)))


@pytest.fixture
def cuda_tagged(monkeypatch):
    """torch.save records storages as living on cuda:0 (as the reference's files), without a GPU."""
    monkeypatch.setattr(torch.serialization, "location_tag", lambda storage: "cuda:0")


def test_cam_dicts_ours_and_reference_load(tmp_path):
    cam = {0: np.random.rand(5, 7).astype(np.float32), 14: np.zeros((5, 7), np.float32)}
    atomic_save_npy(tmp_path / "ours.npy", cam)
    _save_like_numpy1(tmp_path / "ref.npy", {int(k): v for k, v in cam.items()})
    np.save(tmp_path / "npint.npy", {np.int64(k): v for k, v in cam.items()}, allow_pickle=True)
    for name in ("ours.npy", "ref.npy", "npint.npy"):
        d = load_dict(tmp_path / name)
        assert sorted(d) == [0, 14]
        np.testing.assert_array_equal(d[0], cam[0])


def test_irn_cam_files_ours_and_reference_load(tmp_path, cuda_tagged):
    h, w = 9, 14
    keys, camv, high = np.array([2, 7]), np.random.rand(2, 3, 4).astype(np.float32), np.random.rand(2, h, w).astype(np.float32)
    save_cam_dict(tmp_path / "ours.npy", keys, camv, high)
    # the reference: keys/cam are torch tensors (pickled while on the GPU), high_res a numpy array
    _save_like_numpy1(tmp_path / "ref.npy", {"keys": torch.from_numpy(keys), "cam": torch.from_numpy(camv),
                                             "high_res": high})
    assert b"cuda" in (tmp_path / "ref.npy").read_bytes()
    for name in ("ours.npy", "ref.npy"):
        d = load_cam_dict(tmp_path / name)
        assert d["keys"].dtype == np.int64 and d["keys"].tolist() == [2, 7]
        np.testing.assert_array_equal(d["cam"], camv)
        np.testing.assert_array_equal(d["high_res"], high)


def test_cls_labels_load(tmp_path):
    lab = np.zeros(20, np.float32)
    lab[[3, 14]] = 1
    atomic_save_npy(tmp_path / "cls_labels.npy", {"2007_000032": lab, "2007_000039": np.ones(20, np.float32)})
    d = load_cls_labels(tmp_path / "cls_labels.npy")
    assert sorted(d) == ["2007_000032", "2007_000039"] and d["2007_000032"].dtype == np.float32
    np.testing.assert_array_equal(d["2007_000032"], lab)


def test_gen_mask_score_files_ours_and_reference_load(tmp_path, cuda_tagged):
    pred = np.random.randint(0, 3, (6, 5)).astype(np.int64)
    score = torch.rand(3, 6, 5)
    keys = np.array([0, 4, 9], np.int64)
    atomic_torch_save({"pred": pred, "score": score, "keys": keys}, tmp_path / "ours.pt")
    buf = io.BytesIO()
    torch.save({"pred": pred, "score": score, "keys": keys}, buf, _use_new_zipfile_serialization=False)
    assert b"cuda" in buf.getvalue()
    (tmp_path / "ref.pt").write_bytes(_as_numpy1(buf.getvalue()))
    for name in ("ours.pt", "ref.pt"):
        d = load_score(tmp_path / name)
        np.testing.assert_array_equal(d["pred"], pred)
        assert d["score"].device.type == "cpu" and torch.equal(d["score"], score)


def _tiny_training(steps: int = 1):
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 1), torch.nn.BatchNorm2d(4))
    opt = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)
    for _ in range(steps):
        opt.zero_grad()
        net(torch.rand(2, 3, 4, 4)).sum().backward()
        opt.step()
    return net, opt


def test_train_resume_state_round_trip(tmp_path):
    """train.py's own last.pth (optimizer, python/numpy/torch RNG states, args, numpy scalars) loads."""
    net, opt = _tiny_training()
    args = argparse.Namespace(keep_ckpt=0, name="x", lr=0.01, scales=[1.0, 0.5], init=None)
    paths = StageOneLayout.of(tmp_path, "x")
    paths.ckpt.mkdir(parents=True)
    random.seed(3)
    np.random.seed(4)
    expect = (random.random(), np.random.rand())
    random.seed(3)
    np.random.seed(4)
    ktse_train.save_epoch(net, opt, None, args, paths, 0, 7,
                     {"val_history": ["ep 1"], "best_miou": np.float64(0.5), "running": {"sums": {"loss": 1.0}, "count": 2}})
    random.seed(0)
    np.random.seed(0)
    st = ktse_train.load_resume_state(paths.last)
    assert st["global_step"] == 7 and st["best_miou"] == 0.5 and st["args"]["scales"] == [1.0, 0.5]
    net2, opt2 = _tiny_training(0)
    net2.load_state_dict(st["model"])
    opt2.load_state_dict(st["optimizer"])
    set_rng_state(st["rng"])
    assert (random.random(), np.random.rand()) == expect


def test_train_resume_state_not_ours(tmp_path):
    torch.save({"model": {}}, tmp_path / "last.pth")
    with pytest.raises(DataError, match="last.pth"):
        ktse_train.load_resume_state(tmp_path / "last.pth")


def test_irn_resume_and_beco_checkpoints_load_weights_only(tmp_path):
    """The IRN resume file and BECO's ckpt_epoch/best_ckpt layouts need nothing beyond weights_only."""
    net, opt = _tiny_training()
    atomic_torch_save({"model": net.state_dict(), "optimizer": opt.state_dict(), "step": 3, "epoch": 0},
                      tmp_path / "irn.resume")
    scaler = torch.amp.GradScaler("cpu", enabled=True)
    beco = {"net_state_dict": {"network1": net.state_dict(), "network2": net.state_dict()},
            "optim_state_dict": opt.state_dict(), "sched_state_dict": {"last_epoch": 5, "max_iters": 10},
            "scaler_state_dict": scaler.state_dict(), "model_state_dict": {"epoch": 1},
            "runner_state_dict": {"epoch": 1, "iter": 5, "inner_iter": 0, "buffer": {}, "best_miou": 0.25,
                                  "history": [{"epoch": 1, "miou": 0.25}]}}
    atomic_torch_save(beco, tmp_path / "ckpt_epoch_1.pth")
    st = load_torch_file(tmp_path / "irn.resume", "IRN training state")
    assert st["step"] == 3 and torch.equal(st["model"]["0.weight"], net.state_dict()["0.weight"])
    b = load_torch_file(tmp_path / "ckpt_epoch_1.pth", "BECO checkpoint")
    assert b["runner_state_dict"]["history"][0]["miou"] == 0.25


# ---------------------------------------------------------------------------------------- content checks
def _each_is_a_data_error(tmp_path, reader, cases: dict) -> None:
    """``cases``: name -> (object saved with np.save, text the one-line error must contain)."""
    for name, (obj, text) in cases.items():
        p = tmp_path / f"{name}.npy"
        np.save(p, obj, allow_pickle=True)
        with pytest.raises(DataError) as e:
            reader(p)
        msg = str(e.value)
        assert str(p) in msg and text in msg and "\n" not in msg, (name, msg)


def test_load_dict_content_errors(tmp_path):
    ok = np.zeros((4, 4), np.float32)
    _each_is_a_data_error(tmp_path, load_dict, {
        "strkey": ({"0": ok}, "key '0'"),
        "nan": ({0: np.full((4, 4), np.nan, np.float32)}, "NaN/inf"),
        "inf": ({3: np.where(np.eye(4) > 0, np.inf, 0).astype(np.float32)}, "4 NaN/inf"),
        "3d": ({0: np.zeros((1, 4, 4), np.float32)}, "2-D"),
        "notdict": (np.zeros((4, 4), np.float32), "expected a dict")})
    big = np.full((4, 4), 3e38, np.float32)  # finite, though its sum overflows
    np.save(tmp_path / "big.npy", {0: big}, allow_pickle=True)
    assert load_dict(tmp_path / "big.npy")[0].max() == big.max()


def test_load_cam_dict_content_errors(tmp_path):
    h, w = 9, 14
    good = {"keys": np.array([1, 2]), "cam": np.zeros((2, 3, 4), np.float32), "high_res": np.zeros((2, h, w), np.float32)}
    np.save(tmp_path / "good.npy", good, allow_pickle=True)
    load_cam_dict(tmp_path / "good.npy")
    shapes = "inconsistent shapes"
    _each_is_a_data_error(tmp_path, load_cam_dict, {
        "c_vs_keys": (dict(good, keys=np.array([1])), shapes),
        "high_2d": (dict(good, high_res=np.zeros((h, w), np.float32)), shapes),
        "cam_size": (dict(good, cam=np.zeros((2, 9, 14), np.float32)), shapes),
        "high_c": (dict(good, high_res=np.zeros((3, h, w), np.float32)), shapes),
        "key_range": (dict(good, keys=np.array([1, 20])), "0..19"),
        "nan": (dict(good, cam=np.full((2, 3, 4), np.nan, np.float32)), "NaN/inf"),
        "missing": ({"keys": good["keys"], "cam": good["cam"]}, "no 'high_res'")})


def test_cls_labels_content_errors(tmp_path):
    _each_is_a_data_error(tmp_path, load_cls_labels, {
        "array": (np.zeros((3, 20), np.float32), "expected a dict"),
        "short": ({"a": np.zeros(19, np.float32)}, "(20,)"),
        "tuplekey": ({("a",): np.zeros(20, np.float32)}, "expected image ids"),
        "list": ({"a": [0.0] * 20}, "(20,)"),
        "nan": ({"a": np.full(20, np.nan, np.float32)}, "finite")})


def test_truncated_npy_is_a_data_error(tmp_path):
    p = tmp_path / "t.npy"
    np.save(p, {0: np.zeros((50, 50), np.float32)}, allow_pickle=True)
    p.write_bytes(p.read_bytes()[:400])
    with pytest.raises(DataError, match="t.npy"):
        load_dict(p)


@pytest.mark.parametrize("workers", ["1", "2"])
def test_evaluation_cli_refuses_a_crafted_dict_in_one_line(tmp_path, monkeypatch, capsys, workers):
    """evaluation.py over a dict folder holding a crafted file (or a NaN CAM): one error line naming
    the file, no traceback, nothing run."""
    evaluation = cli_module("evaluation.py")
    from test_evaluation import _eval_fixture, _write_fixture_tree

    npz, _ = _eval_fixture()
    names = _write_fixture_tree(tmp_path, npz)
    monkeypatch.chdir(tmp_path)
    marker = tmp_path / "MARKER"
    victim = tmp_path / "experiments" / "fx" / "dict" / f"{names[1]}.npy"
    argv = ["--name", "fx", "--task", "cam", "--dict_dir", "dict", "--workers", workers, "--no_progress"]
    for obj, text in (({0: Payload(os.system, f"touch '{marker}'")}, "posix.system"),
                      ({0: np.full(npz["gt1"].shape, np.nan, np.float32)}, "NaN/inf")):
        np.save(victim, obj, allow_pickle=True)
        assert evaluation.main(argv) == 2
        err = capsys.readouterr().err
        lines = [ln for ln in err.splitlines() if ln.strip()]
        assert len(lines) == 1 and lines[0].startswith("error:") and str(victim.name) in err and text in err, err
        assert not marker.exists()


def test_not_a_checkpoint_message_drops_torchs_weights_only_advice(tmp_path):
    """A file that is no checkpoint at all: the one-line error keeps the unpickler's reason and not
    torch's suggestion to load it with weights_only=False."""
    from tools.checkpoint import load_torch_file
    from tools.errors import WSSSError

    bad = tmp_path / "x.pth"
    bad.write_bytes(b"garbage" * 100)
    with pytest.raises(WSSSError) as e:
        load_torch_file(bad, "stage-one checkpoint")
    msg = str(e.value)
    assert str(bad) in msg and "\n" not in msg
    assert "weights_only" not in msg and "Unsupported operand" in msg
