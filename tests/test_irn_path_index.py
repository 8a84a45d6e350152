"""PathIndex, path affinities and affinity labels vs ``stage2/path_index.npz``."""
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from irn.path_index import PathIndex, affinity_labels
from conftest import REFERENCE

SHARED = Path(__file__).resolve().parents[2] / "shared"
FIX = REFERENCE / "stage2" / "path_index.npz"


@pytest.fixture(scope="module")
def ref():
    if not FIX.exists():
        pytest.skip(f"missing fixture {FIX}")
    return np.load(FIX)


@pytest.mark.parametrize("r", [10, 5])
def test_path_index_matches_reference(ref, r):
    size = tuple(ref[f"r{r}_default_size"])
    pi = PathIndex(radius=r, default_size=size)
    assert pi.radius_floor == int(ref[f"r{r}_radius_floor"])
    np.testing.assert_array_equal(pi.search_dst, ref[f"r{r}_search_dst"])
    n = int(ref[f"r{r}_n_path_lengths"])
    assert len(pi.search_paths) == n and len(pi.path_indices) == n
    for i in range(n):
        np.testing.assert_array_equal(pi.search_paths[i], ref[f"r{r}_search_paths_{i}"])
        np.testing.assert_array_equal(pi.path_indices[i], ref[f"r{r}_path_indices_{i}"])
    np.testing.assert_array_equal(pi.src_indices, ref[f"r{r}_src_indices"])
    np.testing.assert_array_equal(pi.dst_indices, ref[f"r{r}_dst_indices"])


def test_affinity_labels_match_reference(ref):
    full = ref["aff_label_full"]
    h, w = full.shape
    reduced = np.asarray(Image.fromarray(full).resize((w // 4, h // 4), Image.NEAREST))
    np.testing.assert_array_equal(reduced, ref["aff_label_reduced"])
    pi = PathIndex(radius=10, default_size=reduced.shape)
    bg, fg, neg = affinity_labels(reduced, pi.src_indices, pi.dst_indices)
    np.testing.assert_array_equal(bg, ref["aff_bg_pos"])
    np.testing.assert_array_equal(fg, ref["aff_fg_pos"])
    np.testing.assert_array_equal(neg, ref["aff_neg"])
