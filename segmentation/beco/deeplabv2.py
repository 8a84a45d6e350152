"""DeepLabV2 as BECO builds it: a dilated ResNet ("resnet-B") + the DeepLab-v2 ASPP sum.

Attribute names equal the reference state_dict keys (``backbone.stem_layer.conv1.weight``,
``backbone.layer3.22.bn3.running_var``, ``aspp.c0.weight`` ...; full list in
``tests/fixtures/reference/stage2/deeplabv2_keys.json``), so a released ``best_ckpt_752.pth`` loads strictly.

The default is the reference ResNet-101 at output stride 8. Smaller depths (18/34/50) and a narrower
base width exist only so the stage trains in minutes on a CPU (toy runs, tests); they keep the same
key pattern.
"""
from __future__ import annotations

import math
import os
import re
import sys
from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from tools import dist as tdist
from tools.checkpoint import load_state_dict_checked, load_torch_file
from tools.provenance import sha256_file
from voc12.dataset import VOC12

__all__ = ["DeepLabV2", "ResNetBackbone", "build_deeplabv2", "imagenet_to_backbone_keys",
           "load_imagenet_backbone", "check_imagenet_file", "expected_sha256_prefix", "BACKBONES", "IMAGENET_URLS"]

# depth -> (block kind, blocks per layer)
BACKBONES: dict[str, tuple[str, tuple[int, int, int, int]]] = {
    "resnet18": ("basic", (2, 2, 2, 2)),
    "resnet34": ("basic", (3, 4, 6, 3)),
    "resnet50": ("bottleneck", (3, 4, 6, 3)),
    "resnet101": ("bottleneck", (3, 4, 23, 3)),
}

# Where the ImageNet weights the reference expects come from (named in the missing-file error).
IMAGENET_URLS: dict[str, str] = {
    "resnet101": "https://download.pytorch.org/models/resnet101-cd907fc2.pth (IMAGENET1K_V2; rename to resnet-101_v2.pth)",
    "resnet50": "https://download.pytorch.org/models/resnet50-11ad3fa6.pth",
    "resnet34": "https://download.pytorch.org/models/resnet34-b627a593.pth",
    "resnet18": "https://download.pytorch.org/models/resnet18-f37072fd.pth",
}


def _conv3x3(cin: int, cout: int, stride: int = 1, dilation: int = 1) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, 3, stride=stride, padding=dilation, dilation=dilation, bias=False)


class Bottleneck(nn.Module):
    """ResNet-B bottleneck: the stride sits on the 3x3 conv (torchvision v1.5 layout)."""

    expansion = 4

    def __init__(self, cin: int, planes: int, stride: int = 1, dilation: int = 1,
                 downsample: nn.Module | None = None) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = _conv3x3(planes, planes, stride, dilation)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, planes * 4, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * 4)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def last_bn(self) -> nn.BatchNorm2d:
        return self.bn3

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        idt = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + idt)


class BasicBlock(nn.Module):
    """Two 3x3 convs (small CPU backbones only); the first carries stride and dilation."""

    expansion = 1

    def __init__(self, cin: int, planes: int, stride: int = 1, dilation: int = 1,
                 downsample: nn.Module | None = None) -> None:
        super().__init__()
        self.conv1 = _conv3x3(cin, planes, stride, dilation)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = _conv3x3(planes, planes, 1, dilation)
        self.bn2 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def last_bn(self) -> nn.BatchNorm2d:
        return self.bn2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        idt = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + idt)


class Stem(nn.Module):
    """conv1 7x7/2 -> bn1 -> ReLU -> maxpool 3x3/2 (module name ``stem_layer`` in the reference)."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, width, 7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.maxpool(self.relu(self.bn1(self.conv1(x))))


class ResNetBackbone(nn.Module):
    """Dilated ResNet returning ``{4: layer4 feature}`` (``out_indices [4]``).

    output_stride 8: strides (1, 2, 1, 1), dilations (1, 1, 2, 4); 16: (1, 2, 2, 1), (1, 1, 1, 2).
    Every block of a dilated layer uses the full dilation (no contraction, no multi-grid).
    """

    def __init__(self, depth: str = "resnet101", output_stride: int = 8, width: int = 64) -> None:
        super().__init__()
        if depth not in BACKBONES:
            raise ValueError(f"unknown backbone {depth!r}; choose one of {sorted(BACKBONES)}")
        kind, layers = BACKBONES[depth]
        block = Bottleneck if kind == "bottleneck" else BasicBlock
        if output_stride == 8:
            strides, dilations = (1, 2, 1, 1), (1, 1, 2, 4)
        elif output_stride == 16:
            strides, dilations = (1, 2, 2, 1), (1, 1, 1, 2)
        else:
            raise ValueError(f"output_stride must be 8 or 16, got {output_stride}")
        self.stem_layer = Stem(width)
        cin = width
        for i, (n, s, d) in enumerate(zip(layers, strides, dilations)):
            planes = width * 2 ** i
            down = None
            if s != 1 or cin != planes * block.expansion:
                down = nn.Sequential(nn.Conv2d(cin, planes * block.expansion, 1, stride=s, bias=False),
                                     nn.BatchNorm2d(planes * block.expansion))
            blocks = [block(cin, planes, s, d, down)]
            cin = planes * block.expansion
            blocks += [block(cin, planes, 1, d) for _ in range(1, n)]
            setattr(self, f"layer{i + 1}", nn.Sequential(*blocks))
        self.out_channels = cin
        self._init_weights()

    def _init_weights(self) -> None:
        # Reference init (overwritten by ImageNet weights when they are loaded): kaiming fan_in/relu
        # convs, BN 1/0, and the last BN of every residual block at 0 (zero-init residual).
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_in", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        for m in self.modules():
            if isinstance(m, (Bottleneck, BasicBlock)):
                nn.init.zeros_(m.last_bn().weight)

    def forward(self, x: torch.Tensor) -> dict[int, torch.Tensor]:
        x = self.stem_layer(x)
        x = self.layer1(x)
        x = self.layer2(x)
        x = self.layer3(x)
        return {4: self.layer4(x)}


class ASPP(nn.Module):
    """DeepLab-v2 classifier: four dilated 3x3 convs ``c0..c3`` straight to the classes, summed."""

    def __init__(self, in_channels: int, num_classes: int, rates: Sequence[int] = (6, 12, 18, 24)) -> None:
        super().__init__()
        for i, r in enumerate(rates):
            conv = nn.Conv2d(in_channels, num_classes, 3, padding=r, dilation=r, bias=True)
            nn.init.normal_(conv.weight, mean=0.0, std=0.01)
            nn.init.zeros_(conv.bias)
            setattr(self, f"c{i}", conv)
        self.n = len(rates)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = getattr(self, "c0")(x)
        for i in range(1, self.n):
            out = out + getattr(self, f"c{i}")(x)
        return out


class DeepLabV2(nn.Module):
    """``backbone`` + ``aspp``. forward(x (B,3,H,W)) -> dict with the backbone features (key 4),
    ``pre_logits`` (B,C,h,w) at stride 8 (conv arithmetic: 97x129 -> 13x17, 512 -> 64) and
    ``logits`` = bilinear(pre_logits -> (H, W), align_corners=False)."""

    def __init__(self, num_classes: int = VOC12.num_classes, backbone: str = "resnet101", output_stride: int = 8,
                 rates: Sequence[int] = (6, 12, 18, 24), width: int = 64) -> None:
        super().__init__()
        self.backbone = ResNetBackbone(backbone, output_stride, width)
        self.aspp = ASPP(self.backbone.out_channels, num_classes, rates)

    def forward(self, x: torch.Tensor) -> dict:
        out: dict = dict(self.backbone(x))
        pre = self.aspp(out[4])
        out["pre_logits"] = pre
        out["logits"] = F.interpolate(pre, size=x.shape[-2:], mode="bilinear", align_corners=False)
        return out


def imagenet_to_backbone_keys(sd: dict) -> dict:
    """torchvision ImageNet ResNet keys -> BECO backbone keys, the reference's renaming: drop ``*num_batches_tracked``
    and ``fc.*``; keys naming neither a ``layer`` nor ``fc`` get the ``stem_layer.`` prefix."""
    out = {}
    for k, v in sd.items():
        if k.endswith("num_batches_tracked") or k.startswith("fc."):
            continue
        out[k if "layer" in k else "stem_layer." + k] = v
    return out


_WARNED: set[str] = set()  # file:depth pairs already warned about


def expected_sha256_prefix(depth: str) -> str | None:
    """The sha256 prefix torchvision writes into the file name of the weights the reference uses
    (``resnet101-cd907fc2.pth``: ``cd907fc2``), or None for an unknown depth."""
    m = re.search(r"-([0-9a-f]{8,})\.pth", IMAGENET_URLS.get(depth, ""))
    return m.group(1) if m else None


def check_imagenet_file(path: str | os.PathLike, depth: str = "resnet101") -> bool:
    """Whether ``path`` holds the torchvision weights the reference initialises from (its sha256,
    read in chunks, starts with the prefix of the torchvision file name). If not, print one warning
    line naming the file (once per file and process, main process only) and return False: another
    file (e.g. the IMAGENET1K_V1 ``resnet101-5d3b4d8f.pth``) loads without error but changes results."""
    want = expected_sha256_prefix(depth)
    if want is None:
        return True
    got = sha256_file(path)
    if got.startswith(want):
        return True
    key = f"{os.path.realpath(path)}:{depth}"
    if key not in _WARNED and tdist.is_main_process():
        _WARNED.add(key)
        print(f"warning: ImageNet weights '{path}' are not torchvision's {depth}-{want}.pth (sha256 starts "
              f"with {got[:8]}); the reference initialises from {IMAGENET_URLS[depth].split()[0]}", file=sys.stderr,
              flush=True)
    return False


def load_imagenet_backbone(backbone: ResNetBackbone, path: str | os.PathLike, depth: str = "resnet101",
                           check_hash: bool = True) -> None:
    """Load torchvision-format weights into ``backbone`` strictly (num_batches_tracked excepted, which
    the reference leaves at 0 as well); ``check_hash``: warn when the file is not the torchvision
    release the reference uses (:func:`check_imagenet_file`)."""
    sd = load_torch_file(path, f"ImageNet {depth} weights",
                         f"download {IMAGENET_URLS.get(depth, 'the torchvision weights')} to this path, "
                         "or pass --pretrained none to start from random init")
    if check_hash:
        check_imagenet_file(path, depth)
    if isinstance(sd, dict) and "state_dict" in sd and isinstance(sd["state_dict"], dict):
        sd = sd["state_dict"]
    mapped = imagenet_to_backbone_keys(sd)
    # The reference's mapped dict has no num_batches_tracked; its BN modules end up with 0 there.
    for k, v in backbone.state_dict().items():
        if k.endswith("num_batches_tracked"):
            mapped[k] = torch.zeros_like(v)
    load_state_dict_checked(backbone, mapped, strict=True, what=f"ImageNet weights {path}")


def build_deeplabv2(num_classes: int = VOC12.num_classes, backbone: str = "resnet101", output_stride: int = 8,
                    rates: Sequence[int] = (6, 12, 18, 24), width: int = 64,
                    pretrained: str | os.PathLike | None = None) -> DeepLabV2:
    """A DeepLabV2, optionally initialised from torchvision ImageNet weights at ``pretrained``."""
    net = DeepLabV2(num_classes, backbone, output_stride, rates, width)
    if pretrained not in (None, "", "none", "None"):
        # a narrower backbone loads a file of its own width (the toy presets' stand-in pretraining); no
        # torchvision release exists at that width, so there is no file hash to check
        load_imagenet_backbone(net.backbone, pretrained, backbone, check_hash=width == 64)
    return net
