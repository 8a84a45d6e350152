"""ResNet-38 (output stride 8) with the KTSE heads: ``Net_gpp``.

Attribute names are the reference checkpoint keys (``net_gpp_keys.json``: 241 tensors), so
released checkpoints (``experiments/<name>/ckpt/NNNnet_main.pth``, plain state_dicts) load
with ``strict=True``. The network is the reference's ResNet-38 backbone with its KTSE heads, layer for layer.

Conventions: B batch, H x W input, h x w = ceil(H/8) x ceil(W/8), C foreground classes (VOC 20, COCO 80: tools/dataset.py).

``width`` scales every trunk channel count (1.0 = reference). It exists only so CPU toy runs
and tests can train in minutes; a ``width != 1`` model cannot load reference weights.
"""
from __future__ import annotations

import math
import os
from typing import Any, Iterable, Mapping

import torch
import torch.nn as nn
import torch.nn.functional as F

from voc12.dataset import VOC12

__all__ = ["ResBlock", "ResBlockBot", "GatedFusion", "Net_gpp", "scaled_channels", "network_weights",
           "load_stage_one"]

#: Pyramid levels of the GPP head (adaptive pooling grid sides).
GPP_LEVELS = (2, 4, 8, 16)


def scaled_channels(c: int, width: float, minimum: int = 4) -> int:
    """Channel count ``c`` scaled by ``width`` (rounded, at least ``minimum``)."""
    if width == 1.0:
        return c
    return max(minimum, int(round(c * width)))


class ResBlock(nn.Module):
    """Pre-activation basic block ("ResBlock" of the reference).

    The BN-ReLU pre-activation of the input feeds both the projection shortcut (when
    present) and the residual branch; the identity shortcut uses the raw input.
    """

    def __init__(self, in_channels: int, mid_channels: int, out_channels: int, stride: int = 1,
                 first_dilation: int | None = None, dilation: int = 1) -> None:
        super().__init__()
        if first_dilation is None:
            first_dilation = dilation
        self.same_shape = in_channels == out_channels and stride == 1
        self.bn_branch2a = nn.BatchNorm2d(in_channels)
        self.conv_branch2a = nn.Conv2d(in_channels, mid_channels, 3, stride,
                                       padding=first_dilation, dilation=first_dilation, bias=False)
        self.bn_branch2b1 = nn.BatchNorm2d(mid_channels)
        self.conv_branch2b1 = nn.Conv2d(mid_channels, out_channels, 3, padding=dilation,
                                        dilation=dilation, bias=False)
        if not self.same_shape:
            self.conv_branch1 = nn.Conv2d(in_channels, out_channels, 1, stride, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = F.relu(self.bn_branch2a(x))
        shortcut = x if self.same_shape else self.conv_branch1(a)
        b = self.conv_branch2a(a)
        b = F.relu(self.bn_branch2b1(b))
        b = self.conv_branch2b1(b)
        return shortcut + b


class ResBlockBot(nn.Module):
    """Pre-activation bottleneck block ("ResBlock_bot"), always with a projection shortcut."""

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1, dilation: int = 1,
                 dropout: float = 0.0) -> None:
        super().__init__()
        # Reference inner widths: cout/4 (1x1) and cout/2 (3x3).
        c4 = out_channels // 4
        c2 = out_channels // 2
        self.bn_branch2a = nn.BatchNorm2d(in_channels)
        self.conv_branch2a = nn.Conv2d(in_channels, c4, 1, stride, bias=False)
        self.bn_branch2b1 = nn.BatchNorm2d(c4)
        self.dropout_2b1 = nn.Dropout2d(dropout)
        self.conv_branch2b1 = nn.Conv2d(c4, c2, 3, padding=dilation, dilation=dilation, bias=False)
        self.bn_branch2b2 = nn.BatchNorm2d(c2)
        self.dropout_2b2 = nn.Dropout2d(dropout)
        self.conv_branch2b2 = nn.Conv2d(c2, out_channels, 1, bias=False)
        self.conv_branch1 = nn.Conv2d(in_channels, out_channels, 1, stride, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = F.relu(self.bn_branch2a(x))
        shortcut = self.conv_branch1(a)
        b = self.conv_branch2a(a)
        b = self.dropout_2b1(F.relu(self.bn_branch2b1(b)))
        b = self.conv_branch2b1(b)
        b = self.dropout_2b2(F.relu(self.bn_branch2b2(b)))
        b = self.conv_branch2b2(b)
        return shortcut + b


class GatedFusion(nn.Module):
    """GPP gated fusion of two (B,C,h,w) maps (``gconvK`` in the checkpoint).

    Positive parts are fused with ``att_p`` gates, negative parts with ``att_n`` gates; each
    gate is a 3x3 conv 2C -> 2 followed by a sigmoid, one map per input, broadcast over C.
    """

    def __init__(self, num_classes: int = VOC12.num_fg) -> None:
        super().__init__()
        self.att_p = nn.Sequential(nn.Conv2d(2 * num_classes, 2, 3, padding=1, bias=False))
        self.att_n = nn.Sequential(nn.Conv2d(2 * num_classes, 2, 3, padding=1, bias=False))

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        xp, yp = F.relu(x), F.relu(y)
        xn, yn = F.relu(-x), F.relu(-y)
        ap = torch.sigmoid(self.att_p(torch.cat([xp, yp], dim=1)))
        an = torch.sigmoid(self.att_n(torch.cat([xn, yn], dim=1)))
        pos = 0.5 * (xp * ap[:, 0:1] + yp * ap[:, 1:2])
        neg = 0.5 * (xn * an[:, 0:1] + yn * an[:, 1:2])
        return pos - neg


class Net_gpp(nn.Module):  # noqa: N801 - reference class name
    """ResNet-38 trunk + fc8/fc9 CAM head + GPP classification head.

    Args:
        D: feature width of fc8 (256 in the reference).
        C: number of foreground classes (the dataset descriptor's; VOC 20, COCO 80); fc9 has C+1 outputs
            (background first).
        width: trunk channel multiplier (1.0 = reference; smaller only for toy/CPU runs).

    ``forward(x)`` with x (B,3,H,W) returns ``(cam, out, gpp, cam_seg)``:
    cam (B,C,h,w) raw class maps = fc9 channels 1..C; out (B,C) GPP logits;
    gpp (B,C,h,w) gated pyramid map; cam_seg (B,C+1,h,w) fc9 scores (background first).
    """

    def __init__(self, D: int = 256, C: int = VOC12.num_fg, width: float = 1.0, train_bn: bool = False,
                 train_stem: bool = False) -> None:
        super().__init__()
        self.width = float(width)
        # Reference: BatchNorm frozen in eval mode and conv1a/b2* frozen (ImageNet features). For
        # from-scratch toy runs these can be switched off; they change no key or shape.
        self.train_bn = bool(train_bn)
        self.train_stem = bool(train_stem)
        self.D = D
        self.C = C
        w = lambda c: scaled_channels(c, self.width)  # noqa: E731

        self.conv1a = nn.Conv2d(3, w(64), 3, padding=1, bias=False)

        self.b2 = ResBlock(w(64), w(128), w(128), stride=2)
        self.b2_1 = ResBlock(w(128), w(128), w(128))
        self.b2_2 = ResBlock(w(128), w(128), w(128))

        self.b3 = ResBlock(w(128), w(256), w(256), stride=2)
        self.b3_1 = ResBlock(w(256), w(256), w(256))
        self.b3_2 = ResBlock(w(256), w(256), w(256))

        self.b4 = ResBlock(w(256), w(512), w(512), stride=2)
        self.b4_1 = ResBlock(w(512), w(512), w(512))
        self.b4_2 = ResBlock(w(512), w(512), w(512))
        self.b4_3 = ResBlock(w(512), w(512), w(512))
        self.b4_4 = ResBlock(w(512), w(512), w(512))
        self.b4_5 = ResBlock(w(512), w(512), w(512))

        self.b5 = ResBlock(w(512), w(512), w(1024), stride=1, first_dilation=1, dilation=2)
        self.b5_1 = ResBlock(w(1024), w(512), w(1024), dilation=2)
        self.b5_2 = ResBlock(w(1024), w(512), w(1024), dilation=2)

        self.b6 = ResBlockBot(w(1024), w(2048), stride=1, dilation=4, dropout=0.2)
        self.b7 = ResBlockBot(w(2048), w(4096), dilation=4, dropout=0.2)
        self.bn7 = nn.BatchNorm2d(w(4096))

        # Head. bn8 is dead in the reference but lives in the checkpoint format.
        self.fc8 = nn.Conv2d(w(4096), D, 1, bias=False)
        self.bn8 = nn.BatchNorm2d(D)
        self.fc9 = nn.Conv2d(D, C + 1, 1, bias=False)
        self.gconv1 = GatedFusion(C)
        self.gconv2 = GatedFusion(C)
        self.gconv3 = GatedFusion(C)
        # Weightless reference attributes (unused).
        self.dropout = nn.Dropout2d(0.3)
        self.avgpool = nn.AdaptiveAvgPool2d(1)

        nn.init.xavier_uniform_(self.fc8.weight)
        nn.init.xavier_uniform_(self.fc9.weight)

        self.not_training = [self.conv1a, self.b2, self.b2_1, self.b2_2]
        self.from_scratch_layers: list[nn.Module] = []

    # ------------------------------------------------------------------ forward parts
    def forward_trunk(self, x: torch.Tensor) -> torch.Tensor:
        """Backbone features ReLU(bn7(.)): (B,3,H,W) -> (B,4096*width,h,w)."""
        x = self.conv1a(x)
        x = self.b2(x)
        x = self.b2_1(x)
        x = self.b2_2(x)
        x = self.b3(x)
        x = self.b3_1(x)
        x = self.b3_2(x)
        x = self.b4(x)
        x = self.b4_1(x)
        x = self.b4_2(x)
        x = self.b4_3(x)
        x = self.b4_4(x)
        x = self.b4_5(x)
        x = self.b5(x)
        x = self.b5_1(x)
        x = self.b5_2(x)
        x = self.b6(x)
        x = self.b7(x)
        return F.relu(self.bn7(x))

    def cam_head(self, feat: torch.Tensor) -> torch.Tensor:
        """fc9(ReLU(fc8(feat))): trunk features -> cam_seg (B,C+1,h,w), background first."""
        return self.fc9(F.relu(self.fc8(feat)))

    def forward_cam(self, x: torch.Tensor) -> torch.Tensor:
        """Raw CAM (B,C,h,w) = fc9 channels 1..C, skipping the GPP head (IRN make_cam)."""
        return self.cam_head(self.forward_trunk(x))[:, 1:]

    def gpp_head(self, cam: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """GPP gate and logits from raw cam (B,C,h,w) -> (gpp (B,C,h,w), out (B,C))."""
        size = cam.shape[2:]
        pyr = [F.interpolate(F.adaptive_avg_pool2d(cam, s), size=size, mode="bilinear",
                             align_corners=False) for s in GPP_LEVELS]
        att = self.gconv1(pyr[0], pyr[1])
        att = self.gconv2(att, pyr[2])
        gpp = self.gconv3(att, pyr[3])
        out = (F.relu(cam) * F.relu(gpp)).mean(dim=(2, 3)) - (F.relu(-cam) * F.relu(-gpp)).mean(dim=(2, 3))
        return gpp, out

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        cam_seg = self.cam_head(self.forward_trunk(x))
        cam = cam_seg[:, 1:]
        gpp, out = self.gpp_head(cam)
        return cam, out, gpp, cam_seg

    # ------------------------------------------------------------------ from a checkpoint
    @classmethod
    def from_state_dict(cls, state_dict: Mapping[str, Any], width: float | None = None, D: int | None = None,
                        what: str = "checkpoint") -> "Net_gpp":
        """A network whose shapes fit ``state_dict``, loaded strictly, in eval mode (on CPU).

        ``state_dict``: a plain ``Net_gpp`` state dict, or a training-state file holding one under
        ``'model'`` / ``'state_dict'`` (see :func:`network_weights`); a ``module.`` prefix on every key
        (DataParallel/DDP) is dropped. ``width`` None: read from the tensor shapes (the first of
        ``bn7``/``b7.conv_branch1`` rows / 4096 and ``conv1a`` rows / 64 whose whole architecture has
        the checkpoint's shapes); given, it is used as is. ``D`` and ``C`` come from ``fc8``/``fc9``; ``D``
        is only the fallback for a file without ``fc8.weight``. A mismatch raises
        :class:`tools.checkpoint.CheckpointKeyError` naming the keys and ``what``.
        """
        from tools.checkpoint import load_state_dict_checked

        sd = network_weights(state_dict, what)
        d = int(sd["fc8.weight"].shape[0]) if "fc8.weight" in sd else int(D or 256)
        c = int(sd["fc9.weight"].shape[0]) - 1 if "fc9.weight" in sd else VOC12.num_fg
        w = float(width) if width is not None else _fitting_width(cls, sd, d, c)
        net = cls(D=d, C=c, width=w)
        load_state_dict_checked(net, sd, strict=True, what=f"{what} (width {w:g})")
        return net.eval()

    # ------------------------------------------------------------------ training setup
    def train(self, mode: bool = True) -> "Net_gpp":
        """Reference override: conv1a/b2* frozen, every BatchNorm in eval mode and frozen.

        ``eval()`` goes through here too, so requires_grad flags are identical in both modes;
        the only train/eval difference left is Dropout2d in b6/b7.
        """
        super().train(mode)
        if not self.train_stem:
            for layer in self.not_training:
                for p in layer.parameters():
                    p.requires_grad = False
        if not self.train_bn:
            for m in self.modules():
                if isinstance(m, nn.BatchNorm2d):
                    m.eval()
                    m.weight.requires_grad = False
                    m.bias.requires_grad = False
        return self

    def get_parameter_groups(self) -> tuple[list, list, list, list]:
        """Four lists as the reference: (weights, biases, scratch weights, scratch biases).

        Only Conv2d/GroupNorm modules are considered (BatchNorm is never optimised), visited in
        registration order. Called before the first ``.train()`` (as train.py does) group 0
        holds all 51 conv weights, the other three are empty.
        With ``train_bn`` (not the reference) BatchNorm affine parameters join group 1 (no weight decay).
        """
        groups: tuple[list, list, list, list] = ([], [], [], [])
        for m in self.modules():
            if self.train_bn and isinstance(m, nn.BatchNorm2d) and m is not self.bn8:
                groups[1].extend([m.weight, m.bias])
            if isinstance(m, (nn.Conv2d, nn.GroupNorm)):
                scratch = m in self.from_scratch_layers
                if m.weight is not None and m.weight.requires_grad:
                    groups[2 if scratch else 0].append(m.weight)
                if m.bias is not None and m.bias.requires_grad:
                    groups[3 if scratch else 1].append(m.bias)
        return groups

    def backbone_keys(self) -> list[str]:
        """State-dict keys covered by the ImageNet initialisation (191 tensors at width 1)."""
        head = ("fc8.", "bn8.", "fc9.", "gconv")
        return [k for k in self.state_dict() if not k.startswith(head) and not k.endswith("num_batches_tracked")]

    def trainable_named_parameters(self) -> Iterable[tuple[str, nn.Parameter]]:
        """(name, param) pairs that currently require grad."""
        return ((n, p) for n, p in self.named_parameters() if p.requires_grad)


def feature_size(n: int) -> int:
    """Feature-map side for an input side n (three stride-2 convs with padding): ceil(n/8)."""
    return math.ceil(n / 8)


# ----------------------------------------------------------------------------------------------
# Checkpoint -> network
# ----------------------------------------------------------------------------------------------

#: keys whose rows give the trunk width, with their channel count at width 1
_WIDTH_KEYS = (("bn7.weight", 4096), ("b7.conv_branch1.weight", 4096), ("conv1a.weight", 64))


def network_weights(obj: Any, what: str = "checkpoint") -> dict[str, Any]:
    """The network's state dict inside a loaded checkpoint file.

    ``obj``: a plain state dict, or a training-state dict holding it under ``'model'`` (train.py's
    ``last.pth``) or ``'state_dict'``. A ``module.`` prefix on every key is removed.
    Raises :class:`tools.errors.DataError` naming ``what`` when no state dict is found.
    """
    from tools.errors import DataError

    sd = obj
    for key in ("model", "state_dict"):
        if isinstance(sd, Mapping) and isinstance(sd.get(key), Mapping) and "fc9.weight" not in sd:
            sd = sd[key]
            break
    if not isinstance(sd, Mapping):
        raise DataError(f"{what} holds {type(sd).__name__}; expected a Net_gpp state_dict.")
    sd = dict(sd)
    if sd and all(isinstance(k, str) and k.startswith("module.") for k in sd):
        sd = {k[len("module."):]: v for k, v in sd.items()}
    return sd


def _fitting_width(cls: type, sd: Mapping[str, Any], D: int, C: int) -> float:
    """The first candidate width whose model has exactly the tensor shapes of ``sd`` (built on the meta
    device: no memory). None fits: the first candidate, so the strict load names the mismatching keys."""
    cands = [float(sd[k].shape[0]) / c for k, c in _WIDTH_KEYS if k in sd and hasattr(sd[k], "shape")]
    cands = list(dict.fromkeys(cands + [1.0]))
    for w in cands:
        with torch.device("meta"):
            own = cls(D=D, C=C, width=w).state_dict()
        if all(k in sd and tuple(getattr(sd[k], "shape", ())) == tuple(v.shape) for k, v in own.items()):
            return w
    return cands[0]


def load_stage_one(path: os.PathLike | str, width: float | None = None, D: int | None = None,
                   model: str = "ktse", what: str = "stage-one checkpoint", hint: str = "") -> nn.Module:
    """Read a stage-one checkpoint file safely (``weights_only``) and build its network, in eval mode on CPU.

    ``model``: a stage-one model name of :mod:`models.registry` (aliases accepted); its network class's
    ``from_state_dict`` infers width/D and loads strictly. Errors name ``path``; a missing or unreadable
    file also gets ``hint`` (where to get a checkpoint).
    """
    from models.registry import get_model
    from tools.checkpoint import load_torch_file

    obj = load_torch_file(path, what, hint)
    return get_model(model).network_class().from_state_dict(obj, width=width, D=D, what=f"{what} '{path}'")
