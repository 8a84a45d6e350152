"""MXNet NDArray list reader (models/mxnet_params.py): every real file in
realdata/mxnet of the optional shared/ folder beside the clone, a synthetic ResNet-38 file written by a tiny writer below, and the
errors for missing, truncated and foreign files."""
from __future__ import annotations

import json
import struct
from pathlib import Path

import numpy as np
import pytest

from models.mxnet_params import (
    RESNET38_IMAGENET_FILE,
    RESNET38_IMAGENET_URL,
    MXNetFormatError,
    ResNet38ConversionError,
    convert_resnet38_names,
    load_params,
    load_resnet38_imagenet,
    read_ndarray_file,
    resnet38_backbone_shapes,
)
from tools.errors import MissingFileError
from conftest import shared_path

SHARED = Path(__file__).resolve().parents[2] / "shared"
MXDIR = SHARED / "realdata" / "mxnet"
REAL_FILES = sorted(p for p in MXDIR.glob("*/*") if p.suffix != ".json") if MXDIR.is_dir() else []

# ------------------------------------------------------------------------------------------
# a tiny writer of the format (MXNET_PARAMS_FORMAT.md), for synthetic files

_FLAG = {np.dtype("float32"): 0, np.dtype("float64"): 1, np.dtype("float16"): 2, np.dtype("uint8"): 3,
         np.dtype("int32"): 4, np.dtype("int8"): 5, np.dtype("int64"): 6}


def _shape(dims, legacy=False) -> bytes:
    if legacy:
        return struct.pack(f"<I{len(dims)}I", len(dims), *dims)
    return struct.pack(f"<i{len(dims)}q", len(dims), *dims)


def _record(arr: np.ndarray | None, kind: str = "V2", ctx=(1, 0)) -> bytes:
    """One dense record; ``arr=None`` writes a "none" array."""
    head = {"V2": struct.pack("<Ii", 0xF993FAC9, 0), "V3": struct.pack("<Ii", 0xF993FACA, 0),
            "V1": struct.pack("<I", 0xF993FAC8), "legacy": b""}[kind]
    if arr is None:
        return head + (struct.pack("<i", -1) if kind == "V3" else _shape((), kind == "legacy"))
    arr = np.asarray(arr, order="C")  # (ascontiguousarray would turn a 0-d array into 1-d)
    body = _shape(arr.shape, kind == "legacy") + struct.pack("<iii", *ctx, _FLAG[arr.dtype])
    return head + body + arr.astype(arr.dtype.newbyteorder("<")).tobytes()


def write_params(path: Path, arrays, names=None, kind="V2", records=None) -> Path:
    recs = records if records is not None else [_record(a, kind) for a in arrays]
    out = struct.pack("<QQQ", 0x112, 0, len(recs)) + b"".join(recs)
    names = names or []
    out += struct.pack("<Q", len(names))
    for n in names:
        b = n.encode("utf-8")
        out += struct.pack("<Q", len(b)) + b
    path.write_bytes(out)
    return path


def resnet38_mxnet_names() -> list[str]:
    """The ademxapp Model A1 names (util/symbol/resnet_v2.py conventions), written independently
    of the module under test: res<L><a|bN>_<branch>_weight, bn<...>_<branch>_{gamma,beta},
    aux moving_{mean,var}, conv1a_weight, bn7_*, linear1000_{weight,bias}."""
    blocks = [("2a", 1), ("2b1", 1), ("2b2", 1), ("3a", 1), ("3b1", 1), ("3b2", 1), ("4a", 1)]
    blocks += [(f"4b{i}", 1) for i in range(1, 6)] + [("5a", 1), ("5b1", 1), ("5b2", 1)]
    names = ["arg:conv1a_weight"]

    def bn(prefix):
        return [f"arg:{prefix}_gamma", f"arg:{prefix}_beta", f"aux:{prefix}_moving_mean", f"aux:{prefix}_moving_var"]

    for b, _ in blocks:
        names += bn(f"bn{b}_branch2a") + [f"arg:res{b}_branch2a_weight"]
        names += bn(f"bn{b}_branch2b1") + [f"arg:res{b}_branch2b1_weight"]
        if b.endswith("a"):
            names.append(f"arg:res{b}_branch1_weight")
    for b in ("6a", "7a"):
        for br in ("branch2a", "branch2b1", "branch2b2"):
            names += bn(f"bn{b}_{br}") + [f"arg:res{b}_{br}_weight"]
        names.append(f"arg:res{b}_branch1_weight")
    names += bn("bn7") + ["arg:linear1000_weight", "arg:linear1000_bias"]
    return names


def _synthetic_resnet38(tmp_path: Path, drop=(), add=()) -> tuple[Path, dict[str, np.ndarray]]:
    names = [n for n in resnet38_mxnet_names() if n not in drop] + list(add)
    rng = np.random.default_rng(0)
    arrays = [rng.standard_normal((2, 3)).astype(np.float32) for _ in names]  # tiny, not real shapes
    return write_params(tmp_path / RESNET38_IMAGENET_FILE, arrays, names), dict(zip(names, arrays))


# ------------------------------------------------------------------------------------------
# the real files


@pytest.mark.skipif(not REAL_FILES, reason="real MXNet files (shared/realdata/mxnet beside the clone) not present")
@pytest.mark.parametrize("path", REAL_FILES, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_real_file_every_key(path: Path) -> None:
    ref = json.loads(path.with_name(path.name + ".json").read_text())
    f = read_ndarray_file(path)
    assert f.size_bytes == ref["size_bytes"] == ref["bytes_consumed_by_reader"]
    assert len(f.records) == ref["array_count"]
    assert (f.names is None) == (ref["name_count"] == 0)
    if f.names is not None:
        assert f.names == [a["key"] for a in ref["arrays"]]
    for rec, a in zip(f.records, ref["arrays"]):
        assert rec.format == a["format"] and rec.byte_offset == a["byte_offset"]
        assert rec.data.shape == tuple(a["shape"]) and str(rec.data.dtype) == a["dtype"]
        assert rec.type_flag == a["type_flag"] and list(rec.ctx) == a["ctx"]
        assert rec.stype == a.get("stype", 0)
        stored = rec.stored if rec.stored is not None else rec.data
        # first values exactly (json floats are the float32 values printed as doubles)
        np.testing.assert_array_equal(stored.reshape(-1)[:5], np.asarray(a["first5"], dtype=stored.dtype))
        if rec.stype:
            assert rec.stored.shape == tuple(a["storage_shape"])
            for aux, aref in zip(rec.aux, a["aux"]):
                assert aux.shape == tuple(aref["shape"]) and str(aux.dtype) == aref["dtype"]
                np.testing.assert_array_equal(aux[:5], aref["first5"])
        assert rec.data.flags.writeable and rec.data.flags.c_contiguous
    d = load_params(path)
    assert list(d) == (f.names or [str(i) for i in range(len(f.records))])


@pytest.mark.skipif(not REAL_FILES, reason="real MXNet files (shared/realdata/mxnet beside the clone) not present")
def test_row_sparse_densified() -> None:
    f = read_ndarray_file(MXDIR / "v2" / "jonggon_rowsparse_mod-10.params")
    sparse = [r for r in f.records if r.stype == 1]
    assert sparse
    for r in sparse:
        dense = np.zeros(r.data.shape, r.data.dtype)
        dense[r.aux[0]] = r.stored
        np.testing.assert_array_equal(r.data, dense)
    raw = read_ndarray_file(MXDIR / "v2" / "jonggon_rowsparse_mod-10.params", densify=False)
    assert raw.records[0].data.shape == tuple(sparse[0].stored.shape)


# ------------------------------------------------------------------------------------------
# synthetic files: every record kind, dtype and the ResNet-38 conversion


def test_roundtrip_record_kinds_and_dtypes(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    arrays = [rng.standard_normal((3, 4)).astype(np.float32), rng.standard_normal(5),
              rng.standard_normal((2, 2, 2)).astype(np.float16), np.arange(7, dtype=np.uint8),
              np.arange(6, dtype=np.int32).reshape(2, 3), np.arange(-3, 3, dtype=np.int8),
              np.arange(4, dtype=np.int64)]
    for kind in ("V1", "V2", "V3", "legacy"):
        p = write_params(tmp_path / f"{kind}.params", arrays, [f"a{i}" for i in range(len(arrays))], kind)
        d = load_params(p)
        assert list(d) == [f"a{i}" for i in range(len(arrays))]
        for a, b in zip(arrays, d.values()):
            assert a.dtype == b.dtype
            np.testing.assert_array_equal(a, b)
    # unnamed list -> keys "0", "1", ...; "none" records; a V3 0-d scalar
    recs = [_record(np.float32([1, 2])), _record(None, "V2"), _record(None, "V3"), _record(None, "legacy"),
            _record(np.array(3.5, np.float32), "V3")]
    f = read_ndarray_file(write_params(tmp_path / "mixed.nd", None, records=recs))
    assert f.names is None and [r.is_none for r in f.records] == [False, True, True, True, False]
    assert f.records[4].data.shape == () and float(f.records[4].data) == 3.5
    assert list(load_params(tmp_path / "mixed.nd")) == ["0", "1", "2", "3", "4"]


def test_bfloat16_and_csr(tmp_path: Path) -> None:
    vals = np.float32([1.5, -2.0, 3.25])
    bf = (vals.view(np.uint32) >> 16).astype("<u2")
    bf_rec = struct.pack("<Ii", 0xF993FAC9, 0) + _shape((3,)) + struct.pack("<iii", 1, 0, 12) + bf.tobytes()
    # csr 2x3: [[0, 7, 0], [8, 0, 9]]
    data, indptr, cols = np.float32([7, 8, 9]), np.int64([0, 1, 3]), np.int64([1, 0, 2])
    csr = (struct.pack("<Ii", 0xF993FAC9, 2) + _shape((3,)) + _shape((2, 3)) + struct.pack("<iii", 1, 0, 0)
           + struct.pack("<i", 6) + _shape((3,)) + struct.pack("<i", 6) + _shape((3,))
           + data.tobytes() + indptr.tobytes() + cols.tobytes())
    d = load_params(write_params(tmp_path / "x.params", None, ["bf", "csr"], records=[bf_rec, csr]))
    np.testing.assert_array_equal(d["bf"], vals)
    np.testing.assert_array_equal(d["csr"], np.float32([[0, 7, 0], [8, 0, 9]]))


def test_backbone_key_list_matches_reference_network() -> None:
    rows = json.loads(shared_path("reference", "stage1", "net_gpp_keys.json").read_text())
    head = ("fc8.", "bn8.", "fc9.", "gconv")
    ref = [(k, tuple(s)) for k, s, _ in rows if not k.startswith(head) and not k.endswith("num_batches_tracked")]
    shapes = resnet38_backbone_shapes()
    assert len(shapes) == 191
    assert list(shapes.items()) == ref


def test_synthetic_resnet38_conversion(tmp_path: Path) -> None:
    path, src = _synthetic_resnet38(tmp_path)
    conv = convert_resnet38_names(load_params(path))
    assert list(conv) == list(resnet38_backbone_shapes())
    # spot checks of the reference's renaming rule
    pairs = {"arg:res2a_branch1_weight": "b2.conv_branch1.weight",
             "aux:bn5b2_branch2b1_moving_var": "b5_2.bn_branch2b1.running_var",
             "arg:res6a_branch2b2_weight": "b6.conv_branch2b2.weight", "arg:bn7_gamma": "bn7.weight",
             "arg:conv1a_weight": "conv1a.weight", "arg:bn4b5_branch2a_beta": "b4_5.bn_branch2a.bias",
             "aux:bn3a_branch2a_moving_mean": "b3.bn_branch2a.running_mean"}
    for mx_name, key in pairs.items():
        np.testing.assert_array_equal(conv[key], src[mx_name])
    # no prefixes (Gluon-style export) gives the same result
    same = convert_resnet38_names({k.split(":", 1)[1]: v for k, v in src.items()})
    assert all(np.array_equal(same[k], conv[k]) for k in conv)
    # shapes: tiny synthetic tensors are refused at reference width, accepted without the check
    with pytest.raises(ResNet38ConversionError, match="wrong shape"):
        load_resnet38_imagenet(path)
    import torch
    t = load_resnet38_imagenet(path, check_shapes=False)
    assert len(t) == 191 and all(isinstance(v, torch.Tensor) and v.dtype == torch.float32 for v in t.values())


def test_conversion_coverage_errors(tmp_path: Path) -> None:
    path, _ = _synthetic_resnet38(tmp_path, drop=("aux:bn4b3_branch2b1_moving_var", "arg:res7a_branch1_weight"),
                                  add=("arg:fc_extra_weight", "arg:res8a_branch2a_weight"))
    with pytest.raises(ResNet38ConversionError) as e:
        convert_resnet38_names(load_params(path), source=str(path))
    msg = str(e.value)
    assert "b4_3.bn_branch2b1.running_var" in msg and "b7.conv_branch1.weight" in msg
    assert "arg:fc_extra_weight" in msg and "arg:res8a_branch2a_weight (-> b8.conv_branch2a.weight)" in msg
    assert str(path) in msg
    # a collision: two MXNet names -> one torch key
    _, src = _synthetic_resnet38(tmp_path)
    src["arg:conv1a_bias"] = np.zeros(1, np.float32)
    with pytest.raises(ResNet38ConversionError, match="collision"):
        convert_resnet38_names(src)


# ------------------------------------------------------------------------------------------
# errors


def test_missing_weights_name_path_and_url(tmp_path: Path) -> None:
    missing = tmp_path / "pretrained" / RESNET38_IMAGENET_FILE
    with pytest.raises(MissingFileError) as e:
        load_resnet38_imagenet(missing)
    assert str(missing) in str(e.value) and RESNET38_IMAGENET_URL in str(e.value)


@pytest.mark.skipif(not REAL_FILES, reason="real MXNet files (shared/realdata/mxnet beside the clone) not present")
def test_truncated_and_trailing_bytes(tmp_path: Path) -> None:
    src = MXDIR / "legacy" / "jonggon_cnn_bn_mod-100.params"
    data = src.read_bytes()
    for cut in (4, 12, 30, 100, len(data) // 2, len(data) - 40, len(data) - 1):
        p = tmp_path / f"cut{cut}.params"
        p.write_bytes(data[:cut])
        with pytest.raises(MXNetFormatError) as e:
            read_ndarray_file(p)
        assert str(p) in str(e.value)
        if cut >= 8:
            assert "truncated" in str(e.value)
    p = tmp_path / "trailing.params"
    p.write_bytes(data + b"\0\0\0\0")
    with pytest.raises(MXNetFormatError, match="unexpected bytes"):
        read_ndarray_file(p)


def test_foreign_files(tmp_path: Path) -> None:
    import torch
    pth = tmp_path / "model.pth"
    torch.save({"w": torch.zeros(2)}, pth)
    with pytest.raises(MXNetFormatError, match="zip") as e:
        load_params(pth)
    assert str(pth) in str(e.value)
    npy = tmp_path / "a.npy"
    np.save(npy, np.zeros(3))
    with pytest.raises(MXNetFormatError, match="npy"):
        load_params(npy)
    txt = tmp_path / "weights.params"
    txt.write_text("<html>404 Not Found</html>")  # what a failed download often leaves behind
    with pytest.raises(MXNetFormatError, match="magic"):
        load_resnet38_imagenet(txt)
    # right magic, garbage afterwards: an absurd array count or ndim is refused without allocating
    bad = tmp_path / "bad.params"
    bad.write_bytes(struct.pack("<QQQ", 0x112, 0, 10**12) + b"\0" * 16)
    with pytest.raises(MXNetFormatError, match="arrays"):
        load_params(bad)
    bad.write_bytes(struct.pack("<QQQ", 0x112, 0, 1) + struct.pack("<I", 0xF993FAC8) + struct.pack("<I", 999) + b"\0" * 32)
    with pytest.raises(MXNetFormatError, match="ndim"):
        load_params(bad)
    # duplicate names
    dup = write_params(tmp_path / "dup.params", [np.zeros(1, np.float32)] * 2, ["x", "x"])
    with pytest.raises(MXNetFormatError, match="twice"):
        load_params(dup)
