"""ResNet-50 with frozen BatchNorm, torchvision key names (reference ``net/resnet50.py``).

Stride on the 3x3 conv of each bottleneck (torchvision v1.5 layout), no dilation, no ``fc``.
``base_width`` (default 64 = ResNet-50) scales every channel count; small widths exist only
for CPU toy runs and tests, the reference width is what ImageNet weights fit.
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

RESNET50_URL = "https://download.pytorch.org/models/resnet50-19c8e357.pth"
RESNET50_FILENAME = "resnet50-19c8e357.pth"


class FixedBatchNorm(nn.BatchNorm2d):
    """BatchNorm2d that always normalises with its running statistics (eps 1e-5)."""

    def forward(self, input: torch.Tensor) -> torch.Tensor:  # noqa: A002 - torch signature
        return F.batch_norm(input, self.running_mean, self.running_var, self.weight, self.bias,
                            training=False, eps=self.eps)


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample: nn.Module | None = None) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, kernel_size=1, bias=False)
        self.bn1 = FixedBatchNorm(planes)
        self.conv2 = nn.Conv2d(planes, planes, kernel_size=3, stride=stride, padding=1, bias=False)
        self.bn2 = FixedBatchNorm(planes)
        self.conv3 = nn.Conv2d(planes, planes * 4, kernel_size=1, bias=False)
        self.bn3 = FixedBatchNorm(planes * 4)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        residual = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + residual)


class ResNet(nn.Module):
    """ResNet trunk without classifier. ``channels`` = output widths of stem, layer1..4."""

    def __init__(self, layers: Sequence[int] = (3, 4, 6, 3), strides: Sequence[int] = (2, 2, 2, 1),
                 base_width: int = 64) -> None:
        super().__init__()
        w = int(base_width)
        self.inplanes = w
        self.conv1 = nn.Conv2d(3, w, kernel_size=7, stride=strides[0], padding=3, bias=False)
        self.bn1 = FixedBatchNorm(w)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        self.layer1 = self._make_layer(w, layers[0], 1)
        self.layer2 = self._make_layer(2 * w, layers[1], strides[1])
        self.layer3 = self._make_layer(4 * w, layers[2], strides[2])
        self.layer4 = self._make_layer(8 * w, layers[3], strides[3])
        self.channels = (w, 4 * w, 8 * w, 16 * w, 32 * w)

    def _make_layer(self, planes: int, blocks: int, stride: int) -> nn.Sequential:
        downsample = None
        if stride != 1 or self.inplanes != planes * Bottleneck.expansion:
            downsample = nn.Sequential(
                nn.Conv2d(self.inplanes, planes * Bottleneck.expansion, kernel_size=1, stride=stride, bias=False),
                FixedBatchNorm(planes * Bottleneck.expansion))
        layers = [Bottleneck(self.inplanes, planes, stride, downsample)]
        self.inplanes = planes * Bottleneck.expansion
        layers += [Bottleneck(self.inplanes, planes) for _ in range(1, blocks)]
        return nn.Sequential(*layers)


def load_imagenet_resnet50(model: ResNet, path: str | Path) -> None:
    """Load torchvision's ImageNet ResNet-50 file (``fc.*`` dropped) strictly into ``model``."""
    from tools.checkpoint import load_state_dict_checked, load_torch_file

    sd = load_torch_file(path, what="torchvision ImageNet ResNet-50 weights",
                         hint=f"download {RESNET50_URL} and pass its path with --irn_backbone_init")
    if isinstance(sd, dict) and "state_dict" in sd and not any(k.startswith("conv1") for k in sd):
        sd = sd["state_dict"]
    sd = {k: v for k, v in sd.items() if not k.startswith("fc.")}
    load_state_dict_checked(model, sd, strict=True, what=f"ImageNet ResNet-50 ({path})")
