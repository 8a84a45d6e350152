"""Random walk (make_sem_seg_labels) vs ``stage2/random_walk.npz``: dense (reference float32),
chunked (the same float32 squaring in two buffers) and sparse (float64) formulations, and the choice
between them from a memory budget."""
from pathlib import Path

import numpy as np
import pytest
import torch

from irn.path_index import affinity_sparse_to_dense
from irn.random_walk import (choose_rw_mode, padded_affinity, propagate_to_edge, sem_seg_from_rw, sparse_affinity,
                             walk_bytes)
from irn.steps.make_sem_seg_labels import rw_mode_for
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


# memory-bounded walk: chunked mode and the automatic choice from a byte budget
def _walk(ref, **kw):
    cams, edge = torch.from_numpy(ref["cams"]), torch.from_numpy(ref["edge"])
    return propagate_to_edge(cams, edge, radius=int(ref["radius"]), beta=int(ref["beta"]),
                             exp_times=int(ref["exp_times"]), **kw)


def test_auto_with_a_small_budget_runs_chunked_and_matches_the_fixture(ref):
    c, h, w = ref["cams"].shape
    budget = walk_bytes(h, w, c, "chunked") + 1  # below dense, above chunked
    assert walk_bytes(h, w, c, "dense") > budget
    assert choose_rw_mode(h, w, c, torch.device("cpu"), budget) == "chunked"
    for kw in ({"mode": "auto", "mem_budget": budget, "chunk_rows": 17}, {"mode": "chunked"}):
        rw = _walk(ref, **kw)
        assert rw.dtype == torch.float32 and rw.shape == ref["rw"].shape
        assert _relmax(rw, ref["rw"]) < 1e-4
        pred, score = sem_seg_from_rw(rw, ref["keys"], tuple(ref["orig_size"]), float(ref["sem_seg_bg_thres"]))
        assert _relmax(score, ref["score"]) < 1e-4
        np.testing.assert_array_equal(pred, ref["pred"].astype(np.int64))


def test_chunked_equals_dense_on_a_larger_grid():
    g = torch.Generator().manual_seed(3)
    edge = torch.rand(1, 23, 31, generator=g) ** 3
    cams = torch.rand(2, 23, 31, generator=g)
    dense = propagate_to_edge(cams, edge, exp_times=5, mode="dense")
    chunked = propagate_to_edge(cams, edge, exp_times=5, mode="chunked", chunk_rows=100)
    assert _relmax(chunked, dense) < 1e-5
    assert torch.equal(dense.argmax(0), chunked.argmax(0))


def test_choice_follows_the_budget():
    cpu = torch.device("cpu")
    h, w = 94, 125  # a 500x375 VOC image at stride 4
    dense, chunked = walk_bytes(h, w, 3, "dense"), walk_bytes(h, w, 3, "chunked")
    assert chunked < dense and walk_bytes(h, w, 3, "sparse") < chunked
    assert choose_rw_mode(h, w, 3, cpu, dense) == "dense"
    assert choose_rw_mode(h, w, 3, cpu, dense - 1) == "chunked"
    assert choose_rw_mode(h, w, 3, cpu, chunked - 1) == "sparse"
    assert choose_rw_mode(h, w, 3, cpu) == "sparse"  # CPU without a budget: the sparse walk
    # a 640x640 COCO image needs the chunked walk to fit an 11 GB card (with 1.5 GB for the model and context)
    card = int(0.85 * (11 - 1.5) * 2 ** 30)
    assert walk_bytes(160, 160, 3, "dense") > card >= walk_bytes(160, 160, 3, "chunked")
    assert rw_mode_for("auto", torch.device("cuda")) == "auto" and rw_mode_for("auto", cpu) == "sparse"
    with pytest.raises(ValueError, match="random walk mode"):
        walk_bytes(h, w, 3, "fast")
