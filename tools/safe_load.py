"""Reading pickled files without running the code a crafted file may carry.

Two kinds of files this project reads are pickles:

* ``.npy`` files holding a dict (CAM / CRF dictionaries, ``cls_labels.npy``, IRN ``cam/<id>.npy``):
  ``np.save`` of a dict writes a 0-d object array whose payload is a pickle, and
  ``np.load(allow_pickle=True)`` would call whatever function that pickle names. :func:`load_npy`
  parses the header with numpy's own format functions and unpickles the payload with
  :class:`RestrictedUnpickler`, which builds only containers, numbers, strings, numpy
  arrays/scalars/dtypes and, where asked, torch tensors.
* torch files (checkpoints, IRN score files) are read with ``torch.load(weights_only=True)`` by
  :func:`tools.checkpoint.load_torch_file`; :func:`torch_numpy_globals` lists the numpy functions and
  dtypes that some of those files legitimately hold, and :func:`torch_refused_global` pulls the
  refused name out of torch's error.

A refused object stops with :class:`UnsafeFileError` naming the file and the object.
"""
from __future__ import annotations

import codecs
import collections
import io
import os
import pickle
import re
from typing import Any, Callable

import numpy as np

from tools.errors import DataError, require_file


class UnsafeFileError(DataError):
    """A pickled file names a Python object its reader does not admit (it may be crafted to run code)."""


def refusal_message(path: os.PathLike | str, what: str, name: str, holds: str) -> str:
    """The one-line message of an :class:`UnsafeFileError`."""
    return (f"refusing to read {what} '{path}': it asks to load the Python object '{name}', which is not "
            f"among what such a file holds ({holds}). Loading it could run code; re-create the file with "
            f"this project's tools or get it again from its original source.")


class _Refused(pickle.UnpicklingError):
    def __init__(self, name: str) -> None:
        super().__init__(f"refused global {name}")
        self.name = name


# ---------------------------------------------------------------------------------------------- numpy
def _numpy_functions() -> dict[str, Callable]:
    # Taken from numpy's own reduce tuples, so the real functions are found whichever of
    # numpy.core (1.x) / numpy._core (2.x) holds them.
    return {"_reconstruct": np.zeros(0).__reduce__()[0],
            "scalar": np.float64(0).__reduce__()[0],
            "_frombuffer": np.zeros(1).__reduce_ex__(5)[0]}


def _checked_reconstruct(real: Callable) -> Callable:
    def _reconstruct(subtype: Any, shape: Any, dtype: Any) -> np.ndarray:
        if subtype is not np.ndarray:  # an ndarray subclass would run its own code on unpickling
            raise _Refused(f"numpy._core.multiarray._reconstruct of {subtype!r}")
        return real(subtype, shape, dtype)
    return _reconstruct


def _latin1_encode(text: str, encoding: str = "utf-8") -> bytes:
    # Protocol-2 pickles write bytes as _codecs.encode(str, 'latin1'); no other codec is needed.
    if encoding not in ("latin1", "latin-1") or not isinstance(text, str):
        raise _Refused(f"_codecs.encode with encoding {encoding!r}")
    return codecs.encode(text, "latin1")


def _numpy_allowed() -> dict[tuple[str, str], Any]:
    fns = _numpy_functions()
    allowed: dict[tuple[str, str], Any] = {("numpy", "ndarray"): np.ndarray, ("numpy", "dtype"): np.dtype,
                                           ("_codecs", "encode"): _latin1_encode}
    for pkg in ("numpy.core", "numpy._core"):
        allowed[(f"{pkg}.multiarray", "_reconstruct")] = _checked_reconstruct(fns["_reconstruct"])
        allowed[(f"{pkg}.multiarray", "scalar")] = fns["scalar"]
        allowed[(f"{pkg}.numeric", "_frombuffer")] = fns["_frombuffer"]
    return allowed


# ---------------------------------------------------------------------------------------------- torch
def _safe_storage_from_bytes(data: bytes) -> Any:
    """Stand-in for ``torch.storage._load_from_bytes`` (which calls ``torch.load`` without
    ``weights_only``): the same bytes, read with ``weights_only=True`` onto the CPU (the reference
    pickled some tensors while they were on the GPU)."""
    import torch

    if not isinstance(data, (bytes, bytearray)):
        raise _Refused("torch.storage._load_from_bytes of a non-bytes argument")
    try:
        return torch.load(io.BytesIO(bytes(data)), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise _Refused(f"{torch_refused_global(e) or 'an unreadable object'} inside a pickled torch storage") from e


def _safe_rebuild_tensor(storage: Any, offset: Any, size: Any, stride: Any, requires_grad: Any = False,
                         backward_hooks: Any = None, metadata: Any = None) -> Any:
    """Stand-in for ``torch._utils._rebuild_tensor_v2`` that accepts only a real storage and plain
    integers, and drops any backward hooks a file might carry."""
    import torch
    from torch._utils import _rebuild_tensor_v2

    if not isinstance(storage, (torch.storage.TypedStorage, torch.UntypedStorage)):
        raise _Refused(f"torch._utils._rebuild_tensor_v2 of a {type(storage).__name__}")
    ints = [offset, *size, *stride]
    if not all(isinstance(i, int) and not isinstance(i, bool) for i in ints):
        raise _Refused("torch._utils._rebuild_tensor_v2 with non-integer sizes")
    return _rebuild_tensor_v2(storage, offset, tuple(size), tuple(stride), bool(requires_grad),
                              collections.OrderedDict())


def _torch_allowed() -> dict[tuple[str, str], Any]:
    return {("torch._utils", "_rebuild_tensor_v2"): _safe_rebuild_tensor,
            ("torch.storage", "_load_from_bytes"): _safe_storage_from_bytes,
            ("collections", "OrderedDict"): collections.OrderedDict}


class RestrictedUnpickler(pickle.Unpickler):
    """An unpickler that builds dict/list/tuple/str/bytes/int/float/bool/None, numpy arrays, scalars
    and dtypes, and with ``torch_tensors`` CPU torch tensors (storages read with
    ``weights_only=True``). Any other global raises ``pickle.UnpicklingError`` (a ``_Refused``
    carrying the dotted name)."""

    def __init__(self, file: Any, torch_tensors: bool = False) -> None:
        super().__init__(file, encoding="latin1")
        self._allowed = _numpy_allowed()
        if torch_tensors:
            self._allowed.update(_torch_allowed())

    def find_class(self, module: str, name: str) -> Any:
        try:
            return self._allowed[(module, name)]
        except KeyError:
            raise _Refused(f"{module}.{name}") from None

    def persistent_load(self, pid: Any) -> Any:
        raise _Refused(f"persistent id {pid!r}")


def _read_header(f: Any) -> np.dtype | None:
    """The dtype in a ``.npy`` header (``None`` for format 3.0, which numpy writes only for
    structured dtypes with non-latin-1 field names, never for pickled payloads)."""
    version = np.lib.format.read_magic(f)
    if version == (1, 0):
        return np.lib.format.read_array_header_1_0(f)[2]
    if version == (2, 0):
        return np.lib.format.read_array_header_2_0(f)[2]
    return None


def load_npy(path: os.PathLike | str, what: str, hint: str = "", holds: str = "numbers and numpy arrays",
             torch_tensors: bool = False) -> Any:
    """Read a ``.npy`` file without running code.

    A numeric array is returned as read by ``numpy.lib.format.read_array(allow_pickle=False)``; an
    object array (``np.save`` of a dict, as the reference writes) is unpickled with
    :class:`RestrictedUnpickler` and a 0-d one is unwrapped (``.item()``), so a saved dict comes back
    as the dict. ``what``/``hint`` name the file and say where to get it; ``holds`` says what the file
    should contain (used in the refusal message). Raises :class:`UnsafeFileError` for a refused
    global, :class:`tools.errors.DataError` for a file that is not a readable ``.npy``.
    """
    p = require_file(path, what, hint)
    tail = f" {hint}" if hint else ""
    try:
        with open(p, "rb") as f:
            dtype = _read_header(f)
            if dtype is None or not dtype.hasobject:
                f.seek(0)
                return np.lib.format.read_array(f, allow_pickle=False)
            obj = RestrictedUnpickler(f, torch_tensors=torch_tensors).load()
    except _Refused as e:
        raise UnsafeFileError(refusal_message(p, what, e.name, holds)) from None
    except Exception as e:  # truncated, not an .npy, corrupt pickle
        raise DataError(f"cannot read {what} '{p}': {type(e).__name__}: {e}. Expected an .npy file "
                        f"holding {holds}.{tail}") from e
    if not isinstance(obj, np.ndarray) or obj.dtype != dtype:
        raise DataError(f"cannot read {what} '{p}': its payload is a {type(obj).__name__}, not the object "
                        f"array its header announces.{tail}")
    return obj.item() if obj.shape == () else obj


# ---------------------------------------------------------------------------------------------- torch.load
def torch_numpy_globals() -> list[Any]:
    """What ``torch.load(weights_only=True)`` must admit for files holding numpy arrays or scalars
    of plain numeric dtypes (RNG states, IRN score files): numpy's reconstruct functions under both
    the numpy 1.x and 2.x module names, ``ndarray``, ``dtype`` and the numeric dtype classes."""
    fns = _numpy_functions()
    out: list[Any] = [np.ndarray, np.dtype, fns["_reconstruct"], fns["scalar"]]
    for pkg in ("numpy.core", "numpy._core"):
        out += [(fns["_reconstruct"], f"{pkg}.multiarray._reconstruct"), (fns["scalar"], f"{pkg}.multiarray.scalar")]
    numeric = (np.bool_, np.int8, np.int16, np.int32, np.int64, np.uint8, np.uint16, np.uint32, np.uint64,
               np.float16, np.float32, np.float64)
    out += [type(np.dtype(t)) for t in numeric]
    return out


_REFUSED = (re.compile(r"GLOBAL ([\w.]+)"), re.compile(r"but got <class '([\w.]+)'>"))


def torch_refused_global(err: BaseException) -> str | None:
    """The object a ``weights_only`` unpickling error refused (``None`` when the error is of another
    kind, e.g. a truncated file)."""
    for pattern in _REFUSED:
        m = pattern.search(str(err))
        if m:
            return m.group(1)
    return None


# ---------------------------------------------------------------------------------------------- content
def require_finite(arr: np.ndarray, path: os.PathLike | str, what: str, entry: str, hint: str = "") -> None:
    """Raise :class:`tools.errors.DataError` naming ``path`` and ``entry`` if the float array ``arr``
    holds NaN or inf (a NaN score would otherwise silently count as background)."""
    if arr.dtype.kind not in "fc":
        return
    # One reduction first: any NaN/inf makes the sum non-finite; only then count (the sum of huge
    # finite values may overflow, which the count tells apart).
    with np.errstate(over="ignore", invalid="ignore"):
        if np.isfinite(np.add.reduce(arr, axis=None)):
            return
    bad = int(arr.size - np.count_nonzero(np.isfinite(arr)))
    if bad:
        raise DataError(f"{what} '{path}' {entry} has {bad} NaN/inf value(s) of {arr.size}; expected finite "
                        f"scores.{' ' + hint if hint else ''}")
