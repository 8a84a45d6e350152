"""Dense CRF (Krähenbühl & Koltun) over pydensecrf, the one wrapper every stage uses.

pydensecrf is optional (``pip install -r requirements-crf.txt``, package ``pydensecrf2``); it is
imported lazily and its absence gives :class:`CRFUnavailableError` with the install command.
Each stage passes its reference parameters explicitly (stage one: sxy 3/3 + 80/13/10; IRN: label
unary gt_prob 0.7 with 3/3 + 50/5/10; BECO: 1/3 + 67/3/4).
"""
from __future__ import annotations

import numpy as np

from tools.errors import WSSSError

INSTALL_HINT = ("install it with `pip install -r requirements-crf.txt` (package pydensecrf2==1.1, import name "
                "pydensecrf; on Python 3.13: pip install 'cython>=3' setuptools wheel && "
                "pip install --no-build-isolation pydensecrf2==1.1)")


class CRFUnavailableError(WSSSError, ImportError):
    """pydensecrf is not installed."""


def crf_available() -> bool:
    """True when pydensecrf imports."""
    try:
        import pydensecrf.densecrf  # noqa: F401
        return True
    except ImportError:
        return False


def require_crf() -> None:
    """Raise :class:`CRFUnavailableError` (with the install command) unless pydensecrf imports.
    Call it before starting a long CRF job so it fails at once, not in a worker."""
    _modules()


def _modules():
    try:
        import pydensecrf.densecrf as dcrf
        from pydensecrf.utils import unary_from_labels, unary_from_softmax
    except ImportError as e:
        raise CRFUnavailableError(f"dense CRF requested but pydensecrf is not installed: {INSTALL_HINT}") from e
    return dcrf, unary_from_softmax, unary_from_labels


def _run(img: np.ndarray, unary: np.ndarray, n_labels: int, n_iter: int, gauss_sxy: float, gauss_compat: float,
         bil_sxy: float, bil_srgb: float, bil_compat: float) -> np.ndarray:
    dcrf, _, _ = _modules()
    h, w = img.shape[:2]
    d = dcrf.DenseCRF2D(w, h, n_labels)
    d.setUnaryEnergy(np.ascontiguousarray(unary, dtype=np.float32))
    d.addPairwiseGaussian(sxy=gauss_sxy, compat=gauss_compat)
    d.addPairwiseBilateral(sxy=bil_sxy, srgb=bil_srgb, rgbim=np.ascontiguousarray(img, dtype=np.uint8),
                           compat=bil_compat)
    q = d.inference(n_iter)
    return np.asarray(q, dtype=np.float32).reshape(n_labels, h, w)


def dense_crf_softmax(img: np.ndarray, probs: np.ndarray, n_iter: int = 10, gauss_sxy: float = 3,
                      gauss_compat: float = 3, bil_sxy: float = 80, bil_srgb: float = 13,
                      bil_compat: float = 10) -> np.ndarray:
    """CRF with the unary ``-log(clip(probs, 1e-5, 1))`` (``unary_from_softmax``).

    img: ``(H, W, 3)`` uint8 RGB; probs: ``(n, H, W)`` float (not renormalised, as the reference).
    Returns the mean-field marginals ``(n, H, W)`` float32.
    """
    _, unary_from_softmax, _ = _modules()
    probs = np.asarray(probs, dtype=np.float32)
    n = probs.shape[0]
    unary = unary_from_softmax(probs)
    return _run(img, unary, n, n_iter, gauss_sxy, gauss_compat, bil_sxy, bil_srgb, bil_compat)


def dense_crf_labels(img: np.ndarray, labels: np.ndarray, n_labels: int, gt_prob: float = 0.7, n_iter: int = 10,
                     gauss_sxy: float = 3, gauss_compat: float = 3, bil_sxy: float = 50, bil_srgb: float = 5,
                     bil_compat: float = 10) -> np.ndarray:
    """CRF with the hard-label unary ``unary_from_labels(labels, n_labels, gt_prob, zero_unsure=False)``.

    img: ``(H, W, 3)`` uint8 RGB; labels: ``(H, W)`` ints in ``[0, n_labels)``.
    Returns the argmax label map ``(H, W)`` int64 (IRN's ``crf_inference_label``).
    """
    _, _, unary_from_labels = _modules()
    unary = unary_from_labels(np.asarray(labels), n_labels, gt_prob=gt_prob, zero_unsure=False)
    q = _run(img, unary, n_labels, n_iter, gauss_sxy, gauss_compat, bil_sxy, bil_srgb, bil_compat)
    return np.argmax(q, axis=0)
