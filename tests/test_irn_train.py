"""train_irn options: reference momentum-slot default vs --irn_fix_momentum, the ImageNet-weights
error, EdgeDisplacement on images larger than the crop, and the seed-crop helper."""
import random
from argparse import Namespace

import numpy as np
import pytest
import torch

from irn.data import crop_image_and_label
from irn.net.resnet50_irn import EdgeDisplacement
from irn.steps.train_irn import _optimizer, build_model
from tools.errors import MissingFileError


def _args(**kw):
    base = dict(irn_crop_size=96, irn_backbone_width=8, irn_backbone_init="none", irn_learning_rate=0.1,
                irn_weight_decay=1e-4, irn_fix_momentum=False)
    base.update(kw)
    return Namespace(**base)


def test_optimizer_reference_momentum_slot_and_fix():
    model = build_model(_args())
    opt = _optimizer(model, _args())
    assert [g["lr"] for g in opt.param_groups] == [0.1, 1.0]
    assert all(g["momentum"] == 1e-4 and g["weight_decay"] == 1e-4 for g in opt.param_groups)
    opt = _optimizer(model, _args(irn_fix_momentum=True))
    assert all(g["momentum"] == 0.9 for g in opt.param_groups)
    edge, dp = model.trainable_parameters()
    assert len(edge) == 17 and len(dp) == 22  # heads only; the backbone is not optimised


def test_missing_imagenet_weights_names_path_and_url(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "hub"))
    with pytest.raises(MissingFileError) as e:
        build_model(_args(irn_backbone_width=64, irn_backbone_init=str(tmp_path / "resnet50-19c8e357.pth")))
    assert "resnet50-19c8e357.pth" in str(e.value) and "https://download.pytorch.org/models/" in str(e.value)


def test_edge_displacement_larger_than_crop():
    torch.manual_seed(0)
    ed = EdgeDisplacement(crop_size=32, backbone_width=8).eval()
    with torch.no_grad():
        edge, dp = ed(torch.randn(2, 3, 45, 50))
    assert edge.shape == (1, 12, 13) and dp.shape == (2, 12, 13)
    assert torch.all((edge > 0) & (edge < 1))


def test_crop_image_and_label_pads_255():
    img = np.ones((10, 12, 3), np.float32)
    lab = np.full((10, 12), 3, np.uint8)
    lab[0, 0] = 0
    ci, cl = crop_image_and_label(img, lab, 16, random.Random(0))
    assert ci.shape == (16, 16, 3) and cl.shape == (16, 16) and cl.dtype == np.uint8
    inside = ci[..., 0] == 1
    assert inside.sum() == 120 and (cl[~inside] == 255).all()
    assert set(np.unique(cl[inside])) == {0, 3}
