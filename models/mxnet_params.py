"""Read MXNet NDArray list files (``.params``, ``.nd``) with numpy alone, and turn the ImageNet
ResNet-38 weights into this project's (= the reference's) torch state_dict keys.

The binary layout (MXNet's NDArray list serialisation, little-endian throughout)::

    u64 0x112 | u64 0 | u64 N | N array records | u64 K (0 or N) | K x (u64 length, UTF-8 name)

An array record is one of three kinds, told apart by its first u32:

* ``0xF993FAC9`` V2 / ``0xF993FACA`` V3: i32 storage type, [storage shape if sparse], shape,
  context, dtype flag, [aux dtype + aux shape per aux array], data, [aux data];
* ``0xF993FAC8`` V1: shape, context, dtype flag, data;
* anything else, legacy (before mid-2017): that u32 is already ``ndim``, the dims are u32.

A shape is a 4-byte ``ndim`` then ``ndim`` int64 dims (u32 dims in legacy records). A "none"
array (ndim 0; ndim -1 under V3) stops right after its shape. The reader checks every length
against the file size before touching it and requires the last name to end exactly at the end
of the file, so a truncated file, a wrong dim width or a misread sparse record all fail loudly
with the file's path in the message.

The reference reads the weights with ``mxnet.nd.load`` and renames them with a
token rule; :func:`convert_resnet38_names` applies the same rule and adds what the reference
lacks: it strips ``arg:``/``aux:`` prefixes, refuses name collisions and checks that exactly the
191 backbone tensors come out (the reference loads with ``strict=False``, so a miss was silent).

Command line: ``python -m models.mxnet_params FILE`` prints every key with format, shape and
dtype; ``--resnet38`` also runs the ResNet-38 conversion and its checks.
"""
from __future__ import annotations

import argparse
import os
import struct
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

from tools.errors import DataError, WSSSError, require_file

__all__ = [
    "MXNetFormatError",
    "ResNet38ConversionError",
    "NDArrayRecord",
    "NDArrayFile",
    "read_ndarray_file",
    "load_params",
    "resnet38_backbone_shapes",
    "convert_resnet38_names",
    "load_resnet38_imagenet",
    "RESNET38_IMAGENET_FILE",
    "RESNET38_IMAGENET_URL",
    "RESNET38_IMAGENET_HINT",
]

LIST_MAGIC = 0x112
V1_MAGIC = 0xF993FAC8
V2_MAGIC = 0xF993FAC9
V3_MAGIC = 0xF993FACA

# mshadow TypeFlag -> numpy little-endian dtype; 12 (bfloat16) is widened to float32 below.
_DTYPES: dict[int, str] = {
    0: "<f4", 1: "<f8", 2: "<f2", 3: "|u1", 4: "<i4", 5: "|i1", 6: "<i8",
    7: "|b1", 8: "<i2", 9: "<u2", 10: "<u4", 11: "<u8", 12: "<u2",
}
_BFLOAT16 = 12
# storage type -> number of aux arrays (0 dense, 1 row_sparse: row indices, 2 csr: indptr + indices)
_NUM_AUX = {0: 0, 1: 1, 2: 2}
_STYPE_NAMES = {0: "default", 1: "row_sparse", 2: "csr"}
_MAX_NDIM = 32  # MXNet's own limit; a larger value means we are not reading a shape

RESNET38_IMAGENET_FILE = "ilsvrc-cls_rna-a1_cls1000_ep-0001.params"
# Official release (itijyou/ademxapp README, "Model A1"; the CloudStor service was retired in 2023)
# and the Dropbox mirror most ResNet-38 WSSS repositories link to; md5 from ademxapp's checksum.md5.
RESNET38_IMAGENET_URL = "https://www.dropbox.com/s/n2eewzy7bn7lhk0/ilsvrc-cls_rna-a1_cls1000_ep-0001.params?dl=0"
RESNET38_IMAGENET_OFFICIAL_URL = "https://cloudstor.aarnet.edu.au/plus/index.php/s/NOPhJ247fhVDnZH"
RESNET38_IMAGENET_MD5 = "ff21f45d6bf03284100dcbec571edfad"
RESNET38_IMAGENET_HINT = (
    f"Download the ImageNet ResNet-38 (Model A1) weights '{RESNET38_IMAGENET_FILE}' from "
    f"{RESNET38_IMAGENET_URL} (mirror of the official release {RESNET38_IMAGENET_OFFICIAL_URL}, "
    f"listed at https://github.com/itijyou/ademxapp; md5 {RESNET38_IMAGENET_MD5}) and put it at "
    f"pretrained/{RESNET38_IMAGENET_FILE}, or pass '--init none' to train from scratch."
)


class MXNetFormatError(DataError):
    """The file is not a (complete) MXNet NDArray list file; the message names the path."""


class ResNet38ConversionError(WSSSError, KeyError):
    """The MXNet names do not map onto exactly the ResNet-38 backbone tensors (or shapes differ)."""

    def __str__(self) -> str:  # KeyError would repr() the message
        return self.args[0] if self.args else ""


@dataclass
class NDArrayRecord:
    """One array of the list.

    ``data`` is the dense array in C order with the logical shape (sparse arrays densified;
    an empty float32 (0,) array for a "none" record). ``stored`` and ``aux`` keep the raw
    sparse blocks (values, then row indices / indptr + column indices) for sparse records.
    """

    data: np.ndarray
    format: str  # "legacy" | "V1" | "V2" | "V3"
    type_flag: int  # mshadow dtype flag (-1 for a none record)
    stype: int = 0  # 0 dense, 1 row_sparse, 2 csr
    ctx: tuple[int, int] | None = None  # (dev_type, dev_id) as saved; ignored when loading
    byte_offset: int = 0
    is_none: bool = False
    stored: np.ndarray | None = None
    aux: list[np.ndarray] = field(default_factory=list)


@dataclass
class NDArrayFile:
    """A decoded list file: ``records[i]`` is named ``names[i]`` (``names`` is None for a list
    saved without names, which ``mx.nd.load`` returns as a Python list)."""

    path: Path
    records: list[NDArrayRecord]
    names: list[str] | None
    size_bytes: int


class _Cursor:
    """Bounds-checked little-endian reads over the file's bytes; every error names the path."""

    def __init__(self, buf: bytes, path: Path) -> None:
        self.buf = buf
        self.pos = 0
        self.path = path

    def fail(self, msg: str) -> MXNetFormatError:
        return MXNetFormatError(f"{self.path}: {msg} (expected an MXNet NDArray list file, "
                                f"as written by mx.nd.save / save_checkpoint / save_parameters)")

    def need(self, n: int, what: str) -> None:
        if n < 0 or self.pos + n > len(self.buf):
            raise self.fail(f"truncated: {what} needs {n} bytes at offset {self.pos}, but the file has "
                            f"{len(self.buf)} bytes (incomplete download?)")

    def unpack(self, fmt: str, what: str) -> tuple:
        n = struct.calcsize(fmt)
        self.need(n, what)
        out = struct.unpack_from(fmt, self.buf, self.pos)
        self.pos += n
        return out

    def u32(self, what: str) -> int:
        return self.unpack("<I", what)[0]

    def i32(self, what: str) -> int:
        return self.unpack("<i", what)[0]

    def u64(self, what: str) -> int:
        return self.unpack("<Q", what)[0]

    def array(self, dtype: str, shape: tuple[int, ...], what: str) -> np.ndarray:
        dt = np.dtype(dtype)
        count = int(np.prod(shape, dtype=np.int64)) if shape else 1
        nbytes = count * dt.itemsize
        self.need(nbytes, what)
        # copy: own, aligned, writable memory (torch.from_numpy warns on read-only buffers)
        arr = np.frombuffer(self.buf, dtype=dt, count=count, offset=self.pos).copy().reshape(shape)
        self.pos += nbytes
        return arr


def _read_shape(cur: _Cursor, legacy_ndim: int | None, signed: bool, what: str) -> tuple[int, ...] | None:
    """Read a shape; ``legacy_ndim`` given = legacy record (u32 dims, ndim already read).

    Returns None for an "unknown" shape (V3 ndim -1)."""
    if legacy_ndim is not None:
        ndim = legacy_ndim
        dim_fmt = "I"
    else:
        ndim = cur.i32(f"{what} ndim") if signed else cur.u32(f"{what} ndim")
        dim_fmt = "q"
    if ndim == -1 and signed:
        return None
    if ndim < 0 or ndim > _MAX_NDIM:
        raise cur.fail(f"{what} at offset {cur.pos - 4} has ndim {ndim}, which no NDArray has "
                       f"(corrupt file or not an NDArray list)")
    dims = cur.unpack(f"<{ndim}{dim_fmt}", f"{what} dims") if ndim else ()
    if any(d < 0 for d in dims):
        raise cur.fail(f"{what} has a negative dimension {dims}")
    return tuple(int(d) for d in dims)


def _dtype_for(cur: _Cursor, flag: int, what: str) -> str:
    if flag not in _DTYPES:
        raise cur.fail(f"{what} has dtype flag {flag}, which MXNet does not define (known: 0-12)")
    return _DTYPES[flag]


def _read_data(cur: _Cursor, flag: int, shape: tuple[int, ...], what: str) -> np.ndarray:
    arr = cur.array(_dtype_for(cur, flag, what), shape, what)
    if flag == _BFLOAT16:  # numpy has no bfloat16: its 16 bits are the top half of a float32
        arr = (arr.astype(np.uint32) << 16).view(np.float32)
    return arr


def _densify(cur: _Cursor, stype: int, shape: tuple[int, ...], stored: np.ndarray,
             aux: list[np.ndarray], what: str) -> np.ndarray:
    dense = np.zeros(shape, dtype=stored.dtype)
    if stype == 1:  # row_sparse: stored rows go to the rows named by aux[0]
        rows = aux[0].astype(np.int64)
        if rows.shape[0] != stored.shape[0] or (rows.size and (rows.min() < 0 or rows.max() >= shape[0])):
            raise cur.fail(f"{what}: row_sparse indices do not fit shape {shape}")
        dense[rows] = stored
    else:  # csr: aux[0] = indptr (rows+1), aux[1] = column indices
        indptr, cols = aux[0].astype(np.int64), aux[1].astype(np.int64)
        if len(shape) != 2 or indptr.shape[0] != shape[0] + 1 or cols.shape[0] != stored.reshape(-1).shape[0]:
            raise cur.fail(f"{what}: csr index arrays do not fit shape {shape}")
        row_of = np.repeat(np.arange(shape[0]), np.diff(indptr))
        dense[row_of, cols] = stored.reshape(-1)
    return dense


def _read_record(cur: _Cursor, index: int, densify: bool) -> NDArrayRecord:
    what = f"array #{index}"
    offset = cur.pos
    head = cur.u32(f"{what} header")
    if head in (V2_MAGIC, V3_MAGIC):
        fmt = "V2" if head == V2_MAGIC else "V3"
        stype = cur.i32(f"{what} storage type")
        if stype not in _NUM_AUX:
            raise cur.fail(f"{what} ({fmt}) at offset {offset} has storage type {stype} "
                           f"(known: 0 dense, 1 row_sparse, 2 csr)")
        nad = _NUM_AUX[stype]
        storage_shape = _read_shape(cur, None, True, f"{what} storage shape") if nad else None
        shape = _read_shape(cur, None, True, f"{what} shape")
        if shape is None and fmt == "V2":
            raise cur.fail(f"{what} (V2) at offset {offset} has ndim -1, which only V3 records may have")
        is_none = shape is None if fmt == "V3" else shape == ()
    elif head == V1_MAGIC:
        fmt, stype, nad, storage_shape = "V1", 0, 0, None
        shape = _read_shape(cur, None, False, f"{what} shape")
        is_none = shape == ()
    else:
        fmt, stype, nad, storage_shape = "legacy", 0, 0, None
        shape = _read_shape(cur, head, False, f"{what} shape")
        is_none = shape == ()
    if is_none:
        return NDArrayRecord(data=np.zeros((0,), np.float32), format=fmt, type_flag=-1, stype=stype,
                             byte_offset=offset, is_none=True)
    dev_type, dev_id = cur.unpack("<ii", f"{what} context")
    flag = cur.i32(f"{what} dtype flag")
    aux_specs = []
    for j in range(nad):
        aux_flag = cur.i32(f"{what} aux #{j} dtype flag")
        aux_shape = _read_shape(cur, None, True, f"{what} aux #{j} shape")
        aux_specs.append((aux_flag, aux_shape or ()))
    if nad:
        stored = _read_data(cur, flag, storage_shape or (), f"{what} stored values")
        aux = [_read_data(cur, f, s, f"{what} aux #{j} data") for j, (f, s) in enumerate(aux_specs)]
        data = _densify(cur, stype, shape, stored, aux, what) if densify else stored
        return NDArrayRecord(data=data, format=fmt, type_flag=flag, stype=stype, ctx=(dev_type, dev_id),
                             byte_offset=offset, stored=stored, aux=aux)
    data = _read_data(cur, flag, shape, f"{what} data")
    return NDArrayRecord(data=data, format=fmt, type_flag=flag, stype=stype, ctx=(dev_type, dev_id),
                         byte_offset=offset)


def read_ndarray_file(path: os.PathLike | str, densify: bool = True) -> NDArrayFile:
    """Decode every array and name of an MXNet NDArray list file.

    Args:
        path: the ``.params`` / ``.nd`` file.
        densify: turn row_sparse / csr records into dense arrays (else ``data`` = stored values).
    Raises:
        MissingFileError: no such file.
        MXNetFormatError: not an NDArray list, truncated, trailing bytes, unknown dtype/storage.
    """
    p = require_file(path, "MXNet NDArray file")
    buf = p.read_bytes()
    cur = _Cursor(buf, p)
    if len(buf) < 8:
        raise cur.fail(f"file has only {len(buf)} bytes; an NDArray list starts with the 8-byte magic 0x112")
    magic = struct.unpack_from("<Q", buf, 0)[0]
    if magic != LIST_MAGIC:
        kind = ""
        if buf[:2] == b"PK":
            kind = " It looks like a zip archive (a torch.save checkpoint?)."
        elif buf[:1] == b"\x80":
            kind = " It looks like a Python pickle (a torch / numpy checkpoint?)."
        elif buf[:6] == b"\x93NUMPY":
            kind = " It looks like a .npy file."
        raise cur.fail(f"first 8 bytes are {buf[:8].hex(' ')}, not the NDArray list magic "
                       f"12 01 00 00 00 00 00 00 (0x112).{kind}")
    cur.pos = 8
    cur.u64("reserved field")
    n = cur.u64("array count")
    # every record takes at least 4 bytes (a legacy "none" record); reject absurd counts early
    if n * 4 > len(buf):
        raise cur.fail(f"header claims {n} arrays, more than a {len(buf)}-byte file can hold (corrupt or truncated)")
    records = [_read_record(cur, i, densify) for i in range(n)]
    k = cur.u64("name count")
    if k not in (0, n):
        raise cur.fail(f"name count {k} at offset {cur.pos - 8} is neither 0 nor the array count {n}")
    names: list[str] | None = None
    if k:
        names = []
        for i in range(k):
            length = cur.u64(f"name #{i} length")
            cur.need(length, f"name #{i}")
            raw = buf[cur.pos:cur.pos + length]
            cur.pos += length
            try:
                names.append(raw.decode("utf-8"))
            except UnicodeDecodeError as e:
                raise cur.fail(f"name #{i} is not UTF-8 ({e})") from None
    if cur.pos != len(buf):
        raise cur.fail(f"{len(buf) - cur.pos} unexpected bytes after the last name at offset {cur.pos} "
                       f"(wrong dim width or sparse layout, or extra data appended)")
    return NDArrayFile(path=p, records=records, names=names, size_bytes=len(buf))


def load_params(path: os.PathLike | str) -> dict[str, np.ndarray]:
    """``{name: dense ndarray}`` of an MXNet NDArray list file, in file order.

    Names are kept as stored (``arg:``/``aux:`` prefixes included). A file saved without names
    (``mx.nd.save(f, [a, b])``) gets the keys ``"0"``, ``"1"``, ... Duplicate names are an error.
    """
    f = read_ndarray_file(path)
    names = f.names if f.names is not None else [str(i) for i in range(len(f.records))]
    out: dict[str, np.ndarray] = {}
    for name, rec in zip(names, f.records):
        if name in out:
            raise MXNetFormatError(f"{f.path}: the name '{name}' occurs twice")
        out[name] = rec.data
    return out


# ---------------------------------------------------------------------------------------------
# ResNet-38 (Wu et al. "Model A1") -> the stage-one network's keys


def resnet38_backbone_shapes() -> dict[str, tuple[int, ...]]:
    """The 191 backbone tensors the ImageNet file must provide, in state_dict order.

    43 conv weights (conv1a; b2 ... b5_2 incl. 4 projections; b6, b7) and 37 BatchNorms x
    (weight, bias, running_mean, running_var). Shapes at reference width.
    """
    out: dict[str, tuple[int, ...]] = {"conv1a.weight": (64, 3, 3, 3)}

    def bn(prefix: str, c: int) -> None:
        for p in ("weight", "bias", "running_mean", "running_var"):
            out[f"{prefix}.{p}"] = (c,)

    basic = [("b2", 64, 128, 128, True), ("b2_1", 128, 128, 128, False), ("b2_2", 128, 128, 128, False),
             ("b3", 128, 256, 256, True), ("b3_1", 256, 256, 256, False), ("b3_2", 256, 256, 256, False),
             ("b4", 256, 512, 512, True)] + [(f"b4_{i}", 512, 512, 512, False) for i in range(1, 6)] + \
            [("b5", 512, 512, 1024, True), ("b5_1", 1024, 512, 1024, False), ("b5_2", 1024, 512, 1024, False)]
    for name, cin, cmid, cout, proj in basic:
        bn(f"{name}.bn_branch2a", cin)
        out[f"{name}.conv_branch2a.weight"] = (cmid, cin, 3, 3)
        bn(f"{name}.bn_branch2b1", cmid)
        out[f"{name}.conv_branch2b1.weight"] = (cout, cmid, 3, 3)
        if proj:
            out[f"{name}.conv_branch1.weight"] = (cout, cin, 1, 1)
    for name, cin, cout in (("b6", 1024, 2048), ("b7", 2048, 4096)):
        bn(f"{name}.bn_branch2a", cin)
        out[f"{name}.conv_branch2a.weight"] = (cout // 4, cin, 1, 1)
        bn(f"{name}.bn_branch2b1", cout // 4)
        out[f"{name}.conv_branch2b1.weight"] = (cout // 2, cout // 4, 3, 3)
        bn(f"{name}.bn_branch2b2", cout // 2)
        out[f"{name}.conv_branch2b2.weight"] = (cout, cout // 2, 1, 1)
        out[f"{name}.conv_branch1.weight"] = (cout, cin, 1, 1)
    bn("bn7", 4096)
    return out


_BN_PARAM = {"gamma": "weight", "beta": "bias", "mean": "running_mean", "var": "running_var"}


def _strip_prefix(name: str) -> str:
    # "arg:res2a_branch1_weight" / "aux:bn7_moving_var" -> without prefix (split at the first ':')
    head, sep, rest = name.partition(":")
    return rest if sep and head in ("arg", "aux") else name


def _resnet38_torch_key(name: str) -> str | None:
    """The reference's token rule for MXNet names; None = dropped or not mappable."""
    t = name.split("_")
    t0, last = t[0], t[-1]
    if "conv1a" in t0:
        return "conv1a.weight"
    if "linear1000" in t0:
        return None
    if len(t) > 1 and "branch" in t[1]:
        block = f"b{t0[-2]}" if t0.endswith("a") else f"b{t0[-3]}_{t0[-1]}"
        if "res" in t0:
            return f"{block}.conv_{t[1]}.weight"
        return f"{block}.bn_{t[1]}.{_BN_PARAM[last]}" if last in _BN_PARAM else None
    return f"bn7.{_BN_PARAM[last]}" if last in _BN_PARAM else None


def _listing(keys: Sequence[str], limit: int = 40) -> str:
    keys = list(keys)
    shown = ", ".join(keys[:limit])
    return shown + (f", ... (+{len(keys) - limit} more)" if len(keys) > limit else "")


def convert_resnet38_names(params: Mapping[str, np.ndarray], source: str = "MXNet params") -> dict[str, np.ndarray]:
    """Rename MXNet ResNet-38 arrays to the stage-one torch keys.

    ``arg:``/``aux:`` prefixes are stripped; ``linear1000_*`` (the ImageNet classifier) is dropped.
    The result must hold exactly the 191 keys of :func:`resnet38_backbone_shapes` (returned in that
    order); otherwise :class:`ResNet38ConversionError` lists the missing torch keys and the MXNet
    names that mapped to nothing (or to a key outside the backbone). Two MXNet names landing on one
    torch key are an error too (the reference would silently keep the last one).
    Shapes are not checked here (see :func:`load_resnet38_imagenet`).
    """
    expected = resnet38_backbone_shapes()
    mapped: dict[str, np.ndarray] = {}
    origin: dict[str, str] = {}
    extra: list[str] = []
    clashes: list[str] = []
    for name, arr in params.items():
        if "linear1000" in _strip_prefix(name).split("_")[0]:
            continue
        key = _resnet38_torch_key(_strip_prefix(name))
        if key is None or key not in expected:
            extra.append(name if key is None else f"{name} (-> {key})")
            continue
        if key in mapped:
            clashes.append(f"{origin[key]} and {name} -> {key}")
            continue
        mapped[key], origin[key] = arr, name
    missing = [k for k in expected if k not in mapped]
    if missing or extra or clashes:
        parts = [f"{source}: the MXNet names do not map onto exactly the {len(expected)} ResNet-38 "
                 f"backbone tensors ({len(mapped)} mapped)."]
        if missing:
            parts.append(f"Missing {len(missing)} torch keys: {_listing(missing)}.")
        if extra:
            parts.append(f"{len(extra)} MXNet names map to no backbone key: {_listing(extra)}.")
        if clashes:
            parts.append(f"Name collisions: {_listing(clashes)}.")
        parts.append(f"Expected the ImageNet ResNet-38 Model A1 file '{RESNET38_IMAGENET_FILE}'.")
        raise ResNet38ConversionError(" ".join(parts))
    return {k: mapped[k] for k in expected}


def load_resnet38_imagenet(path: os.PathLike | str, check_shapes: bool = True) -> "dict[str, torch.Tensor]":
    """Read ``ilsvrc-cls_rna-a1_cls1000_ep-0001.params`` into ``{torch key: float32 tensor}``
    for the 191 backbone tensors (load into the stage-one network with ``strict=False``, the
    head — fc8, bn8, fc9, gconv* — keeps its fresh init, as in the reference).

    Raises MissingFileError (with the download URL) when absent, MXNetFormatError for a
    foreign/truncated file, ResNet38ConversionError for wrong names or (``check_shapes``) shapes.
    """
    import torch

    p = require_file(path, "ImageNet ResNet-38 weights (MXNet .params)", RESNET38_IMAGENET_HINT)
    converted = convert_resnet38_names(load_params(p), source=str(p))
    if check_shapes:
        expected = resnet38_backbone_shapes()
        bad = [f"{k}: file {tuple(v.shape)} vs network {expected[k]}" for k, v in converted.items()
               if tuple(v.shape) != expected[k]]
        if bad:
            raise ResNet38ConversionError(f"{p}: {len(bad)} tensors have the wrong shape for the reference-width "
                                          f"ResNet-38: {_listing(bad, 10)}")
    return {k: torch.from_numpy(np.ascontiguousarray(v, dtype=np.float32)) for k, v in converted.items()}


def _main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="List (and optionally convert-check) an MXNet NDArray list file.")
    ap.add_argument("path")
    ap.add_argument("--resnet38", action="store_true", help="also map the names to the ResNet-38 torch keys")
    args = ap.parse_args(argv)
    try:
        return _list(args.path, args.resnet38)
    except WSSSError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


def _list(path: str, resnet38: bool) -> int:
    f = read_ndarray_file(path)
    names = f.names or [f"#{i}" for i in range(len(f.records))]
    for name, r in zip(names, f.records):
        stype = "" if r.stype == 0 else f" {_STYPE_NAMES[r.stype]}"
        print(f"{name:50s} {r.format:6s} {str(tuple(r.data.shape)):22s} {r.data.dtype}{stype}")
    print(f"{len(f.records)} arrays, {f.size_bytes} bytes, all consumed")
    if resnet38:
        conv = load_resnet38_imagenet(path)
        print(f"ResNet-38 conversion OK: {len(conv)} backbone tensors")
    return 0


if __name__ == "__main__":
    raise SystemExit(_main())
