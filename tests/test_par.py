"""PAR parity with the reference fixture (CPU)."""
from __future__ import annotations

import numpy as np
import torch

from conftest import shared_path
from models.par import PAR


def test_par_matches_fixture() -> None:
    f = np.load(shared_path("reference", "stage1", "par.npz"))
    par = PAR(int(f["num_iter"]), f["dilations"].tolist())
    assert np.array_equal(par.kernel.numpy(), f["kernel"])
    assert np.allclose(par.pos.numpy(), f["pos"], rtol=0, atol=1e-6)
    for img, masks, out in (("img", "masks", "out"), ("img_b2", "masks_b2", "out_b2")):
        got = par(torch.from_numpy(f[img]), torch.from_numpy(f[masks])).numpy()
        ref = f[out]
        assert got.shape == ref.shape
        assert np.abs(got - ref).max() / np.abs(ref).max() < 1e-4, out


def test_par_constant_mask_grows_by_1_01_per_iter() -> None:
    par = PAR(num_iter=3, dilations=[1, 2])
    img = torch.rand(1, 3, 10, 12)
    out = par(img, torch.ones(1, 2, 5, 6))
    assert out.shape == (1, 2, 10, 12)
    assert torch.allclose(out, torch.full_like(out, 1.01 ** 3), atol=1e-5)
    assert "kernel" not in par.state_dict()
