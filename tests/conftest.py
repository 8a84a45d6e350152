"""Shared test fixtures: paths to ../shared and a tiny generated toy VOC tree."""
from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
# Parity fixtures ship with the repository (tests/fixtures/reference); real data (VOC samples, MXNet
# .params files) is only read from ../shared and its tests skip where that folder is absent.
REFERENCE = ROOT / "tests" / "fixtures" / "reference"
REALDATA = SHARED / "realdata"

if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

# Tests are small; more threads only thrash the 2-core CI machine.
os.environ.setdefault("OMP_NUM_THREADS", "2")


def shared_path(*parts: str) -> Path:
    """A path under ../shared, or for ``("reference", ...)`` under the shipped tests/fixtures/reference;
    skips the test when it is absent."""
    p = REFERENCE.joinpath(*parts[1:]) if parts and parts[0] == "reference" else SHARED.joinpath(*parts)
    if not p.exists():
        pytest.skip(f"shared material not found: {p}")
    return p


@pytest.fixture(scope="session")
def toy_voc(tmp_path_factory) -> Path:
    """A small deterministic toy VOC tree (12 train + 6 val images, <= 96 px), with prepared lists.

    Returns the VOC root; lists and cls_labels.npy are in ``<root>/lists``.
    """
    from voc12 import toy, prepare

    root = tmp_path_factory.mktemp("toy") / "VOC2012"
    toy.generate(root, n_train=12, n_val=6, max_size=96, seed=0)
    prepare.prepare(root, out_dir=root / "lists")
    return root


@pytest.fixture
def one_thread():
    """Tiny models run fastest, and steadiest on a shared machine, on one torch thread."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
