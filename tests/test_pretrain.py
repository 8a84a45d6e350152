"""The toy presets' stand-in pretraining (models/pretrain.py): what it writes loads where ImageNet files go."""
from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import pytest
import torch

from irn.net.resnet50 import FixedBatchNorm
from models.pretrain import Classifier, pretrain, trainable_resnet50
from tools.errors import WSSSError


def _images(n: int = 4) -> tuple[list[np.ndarray], np.ndarray]:
    rng = np.random.default_rng(0)
    imgs = [rng.integers(0, 255, (40 + 4 * i, 48, 3), dtype=np.uint8) for i in range(n)]
    labels = np.eye(20, dtype=np.float32)[[i % 3 for i in range(n)]]
    return imgs, labels


def test_trainable_trunk_has_torchvision_keys_and_learnable_bn() -> None:
    net = trainable_resnet50(4)
    assert not any(isinstance(m, FixedBatchNorm) for m in net.modules())
    keys = set(net.state_dict())
    assert {"conv1.weight", "bn1.running_mean", "layer4.2.bn3.weight", "layer1.0.downsample.1.weight"} <= keys


def test_pretrain_changes_weights_and_is_deterministic() -> None:
    imgs, labels = _images()
    a, hist = pretrain(imgs, labels, width=4, epochs=2, batch_size=2, crop=32, seed=3)
    b, _ = pretrain(imgs, labels, width=4, epochs=2, batch_size=2, crop=32, seed=3)
    fresh = Classifier(4, 20)
    sa, sb = a.torchvision_state_dict(), b.torchvision_state_dict()
    assert len(hist) == 2 and all(np.isfinite(h["loss"]) for h in hist)
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not torch.equal(sa["conv1.weight"], fresh.trunk.conv1.weight)  # it trained
    assert not torch.equal(sa["bn1.running_mean"], torch.zeros_like(sa["bn1.running_mean"]))
    assert "fc.weight" in sa


def _written(tmp_path: Path, width: int) -> Path:
    imgs, labels = _images(2)
    model, _ = pretrain(imgs, labels, width=width, epochs=1, batch_size=2, crop=32)
    out = tmp_path / f"resnet50_w{width}.pth"
    torch.save(model.torchvision_state_dict(), out)
    return out


def test_irn_loads_the_stand_in_backbone(tmp_path: Path) -> None:
    from irn.steps.train_irn import build_model

    path = _written(tmp_path, 4)
    args = argparse.Namespace(irn_crop_size=96, irn_backbone_width=4, irn_backbone_init=str(path))
    model = build_model(args)
    sd = torch.load(path, weights_only=True)
    assert torch.equal(model.resnet50.conv1.weight, sd["conv1.weight"])
    assert torch.equal(model.resnet50.layer3[0].bn2.running_var, sd["layer3.0.bn2.running_var"])
    # a file of another width is refused by the strict load, naming the file
    args.irn_backbone_width = 8
    with pytest.raises(WSSSError, match=str(path.name)):
        build_model(args)


def test_beco_loads_a_narrow_torchvision_file_without_the_hash_warning(tmp_path: Path, capsys) -> None:
    from segmentation.beco.deeplabv2 import build_deeplabv2

    path = _written(tmp_path, 4)
    net = build_deeplabv2(num_classes=21, backbone="resnet50", width=4, pretrained=str(path))
    sd = torch.load(path, weights_only=True)
    assert torch.equal(net.backbone.stem_layer.conv1.weight, sd["conv1.weight"])
    assert "warning" not in capsys.readouterr().err
