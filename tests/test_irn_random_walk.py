"""Random walk (make_sem_seg_labels) vs ``stage2/random_walk.npz``: dense (reference float32)
and sparse (float64) formulations."""
from pathlib import Path

import numpy as np
import pytest
import torch

from irn.path_index import affinity_sparse_to_dense
from irn.random_walk import padded_affinity, propagate_to_edge, sem_seg_from_rw, sparse_affinity
from conftest import REFERENCE

FIX = REFERENCE / "stage2" / "random_walk.npz"


@pytest.fixture(scope="module")
def ref():
    if not FIX.exists():
        pytest.skip(f"missing fixture {FIX}")
    return np.load(FIX)


def _relmax(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return np.abs(a - b).max() / np.abs(b).max()


def test_affinity_intermediates(ref):
    edge = torch.from_numpy(ref["edge"])
    r = int(ref["radius"])
    pi, aff, (hp, wp) = padded_affinity(edge, r)
    np.testing.assert_array_equal(pi.search_dst, ref["search_dst"])
    np.testing.assert_array_equal(pi.src_indices, ref["src_indices"])
    np.testing.assert_array_equal(pi.dst_indices, ref["dst_indices"])
    np.testing.assert_array_equal(aff.numpy(), ref["aff_sparse"])
    h, w = edge.shape[-2:]
    dense = affinity_sparse_to_dense(aff, pi.src_indices, pi.dst_indices, hp * wp)
    dense = dense.view(hp, wp, hp, wp)[:-r, r:-r, :-r, r:-r].reshape(h * w, h * w)
    np.testing.assert_array_equal(dense.numpy(), ref["aff_dense"])
    np.testing.assert_array_equal(sparse_affinity(edge, r, np.float32).toarray(), ref["aff_dense"])


@pytest.mark.parametrize("mode", ["dense", "sparse"])
def test_random_walk_matches_reference(ref, mode):
    cams, edge = torch.from_numpy(ref["cams"]), torch.from_numpy(ref["edge"])
    rw = propagate_to_edge(cams, edge, radius=int(ref["radius"]), beta=int(ref["beta"]),
                           exp_times=int(ref["exp_times"]), mode=mode)
    assert rw.shape == ref["rw"].shape
    if mode == "dense":
        assert _relmax(rw, ref["rw"]) < 1e-4
    else:
        assert _relmax(rw, ref["rw_f64"]) < 1e-10
    pred, score = sem_seg_from_rw(rw, ref["keys"], tuple(ref["orig_size"]), float(ref["sem_seg_bg_thres"]))
    assert score.dtype == torch.float32 and score.device.type == "cpu"
    assert _relmax(score, ref["score"]) < 1e-4
    np.testing.assert_array_equal(pred, ref["pred"].astype(np.int64))
