"""make_cam post-processing vs ``stage2/make_cam.npz`` and the on-disk CAM format."""
from pathlib import Path

import numpy as np
import pytest
import torch

from irn.steps.common import load_cam_dict, save_cam_dict
from irn.steps.make_cam import cams_from_outputs, strided_size, strided_up_size
from conftest import REFERENCE

FIX = REFERENCE / "stage2" / "make_cam.npz"


def test_make_cam_matches_reference(tmp_path):
    if not FIX.exists():
        pytest.skip(f"missing fixture {FIX}")
    ref = np.load(FIX)
    size = tuple(int(v) for v in ref["img_size"])
    assert strided_size(size, 4) == tuple(ref["strided_size"])
    assert strided_up_size(size, 16) == tuple(ref["strided_up_size"])
    outs = [torch.from_numpy(ref[f"out_{i}"]) for i in range(len(ref["scales"]))]  # one output per scale
    keys, cam, high = cams_from_outputs(outs, size, ref["label"])
    np.testing.assert_array_equal(keys, ref["keys"])
    for a, b in ((cam, ref["cam"]), (high, ref["high_res"])):
        assert a.shape == b.shape and a.dtype == np.float32
        assert np.abs(a - b).max() / np.abs(b).max() < 1e-6
    save_cam_dict(tmp_path / "x.npy", keys, cam, high)
    raw = np.load(tmp_path / "x.npy", allow_pickle=True).item()
    assert raw["keys"].dtype == np.int64 and raw["cam"].dtype == np.float32 and raw["high_res"].dtype == np.float32
    assert all(isinstance(v, np.ndarray) for v in raw.values())
    back = load_cam_dict(tmp_path / "x.npy")
    np.testing.assert_array_equal(back["high_res"], high)
