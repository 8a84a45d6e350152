"""IRN edge / displacement network (reference ``net/resnet50_irn.py``).

Module attribute names equal the reference ones, including the aliasing ModuleLists
(``backbone``, ``edge_layers``, ``dp_layers``) and ``stage1..5`` views of the ResNet, so a
reference ``res50_irn.pth`` (1035 keys, 358 distinct tensors) loads strictly and our own
checkpoints load into the reference code.  ``load_irn_weights`` also accepts the 358
canonical keys alone (aliases are filled in from the module's own sharing structure).
"""
from __future__ import annotations

from pathlib import Path
from typing import Mapping

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from irn.net.resnet50 import ResNet, load_imagenet_resnet50
from irn.path_index import PathIndex

LOSS_BUFFER_PREFIXES = ("path_indices", "disp_target")


class MeanShift(nn.Module):
    """Subtracts the mean training displacement, in eval mode only."""

    def __init__(self, num_features: int) -> None:
        super().__init__()
        self.register_buffer("running_mean", torch.zeros(num_features))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training:
            return x
        return x - self.running_mean.view(1, -1, 1, 1)


def _head(cin: int, cout: int, groups: int, up: int = 1) -> nn.Sequential:
    layers: list[nn.Module] = [nn.Conv2d(cin, cout, 1, bias=False), nn.GroupNorm(groups, cout)]
    if up > 1:
        layers.append(nn.Upsample(scale_factor=up, mode="bilinear", align_corners=False))
    layers.append(nn.ReLU(inplace=True))
    return nn.Sequential(*layers)


class Net(nn.Module):
    """Returns raw ``edge_out`` (B,1,H/4,W/4) logits and ``dp_out`` (B,2,H/4,W/4) displacements.

    The backbone is frozen (features detached, BN fixed, kept in eval mode by ``train``).
    """

    def __init__(self, backbone_width: int = 64) -> None:
        super().__init__()
        self.resnet50 = ResNet(strides=(2, 2, 2, 1), base_width=backbone_width)
        r = self.resnet50
        self.stage1 = nn.Sequential(r.conv1, r.bn1, r.relu, r.maxpool)
        self.stage2 = nn.Sequential(r.layer1)
        self.stage3 = nn.Sequential(r.layer2)
        self.stage4 = nn.Sequential(r.layer3)
        self.stage5 = nn.Sequential(r.layer4)
        self.mean_shift = MeanShift(2)
        c1, c2, c3, c4, c5 = r.channels
        self.fc_edge1 = _head(c1, 32, 4)
        self.fc_edge2 = _head(c2, 32, 4)
        self.fc_edge3 = _head(c3, 32, 4, up=2)
        self.fc_edge4 = _head(c4, 32, 4, up=4)
        self.fc_edge5 = _head(c5, 32, 4, up=4)
        self.fc_edge6 = nn.Conv2d(160, 1, 1, bias=True)
        self.fc_dp1 = _head(c1, 64, 8)
        self.fc_dp2 = _head(c2, 128, 16)
        self.fc_dp3 = _head(c3, 256, 16)
        self.fc_dp4 = _head(c4, 256, 16, up=2)
        self.fc_dp5 = _head(c5, 256, 16, up=2)
        self.fc_dp6 = _head(768, 256, 16, up=2)
        self.fc_dp7 = nn.Sequential(nn.Conv2d(448, 256, 1, bias=False), nn.GroupNorm(16, 256), nn.ReLU(inplace=True),
                                    nn.Conv2d(256, 2, 1, bias=False), self.mean_shift)
        self.backbone = nn.ModuleList([self.stage1, self.stage2, self.stage3, self.stage4, self.stage5])
        self.edge_layers = nn.ModuleList([self.fc_edge1, self.fc_edge2, self.fc_edge3, self.fc_edge4,
                                          self.fc_edge5, self.fc_edge6])
        self.dp_layers = nn.ModuleList([self.fc_dp1, self.fc_dp2, self.fc_dp3, self.fc_dp4, self.fc_dp5,
                                        self.fc_dp6, self.fc_dp7])

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x1 = self.stage1(x).detach()
        x2 = self.stage2(x1).detach()
        x3 = self.stage3(x2).detach()
        x4 = self.stage4(x3).detach()
        x5 = self.stage5(x4).detach()
        e1 = self.fc_edge1(x1)
        e2 = self.fc_edge2(x2)
        h2, w2 = e2.shape[2:]
        e3 = self.fc_edge3(x3)[..., :h2, :w2]
        e4 = self.fc_edge4(x4)[..., :h2, :w2]
        e5 = self.fc_edge5(x5)[..., :h2, :w2]
        edge_out = self.fc_edge6(torch.cat([e1, e2, e3, e4, e5], dim=1))
        dp1 = self.fc_dp1(x1)
        dp2 = self.fc_dp2(x2)
        dp3 = self.fc_dp3(x3)
        h3, w3 = dp3.shape[2:]
        dp4 = self.fc_dp4(x4)[..., :h3, :w3]
        dp5 = self.fc_dp5(x5)[..., :h3, :w3]
        dp_up3 = self.fc_dp6(torch.cat([dp3, dp4, dp5], dim=1))[..., :dp2.shape[2], :dp2.shape[3]]
        dp_out = self.fc_dp7(torch.cat([dp1, dp2, dp_up3], dim=1))
        return edge_out, dp_out

    def trainable_parameters(self) -> tuple[tuple[nn.Parameter, ...], tuple[nn.Parameter, ...]]:
        """(edge head params, displacement head params) — the two optimiser groups."""
        return tuple(self.edge_layers.parameters()), tuple(self.dp_layers.parameters())

    def train(self, mode: bool = True) -> "Net":
        super().train(mode)
        self.backbone.eval()
        return self

    def load_imagenet(self, path: str | Path) -> None:
        load_imagenet_resnet50(self.resnet50, path)


class AffinityDisplacementLoss(Net):
    """Net plus the per-pair loss maps of train_irn (radius-10 paths on the crop's feature grid).

    ``forward(x, True)`` → ``pos_aff_loss``, ``neg_aff_loss`` (B, n_dirs, n_src) and
    ``dp_fg_loss``, ``dp_bg_loss`` (B, 2, n_dirs, n_src); ``forward(x, False)`` → Net outputs.
    """

    path_indices_prefix = "path_indices"

    def __init__(self, path_index: PathIndex, backbone_width: int = 64) -> None:
        super().__init__(backbone_width=backbone_width)
        self.path_index = path_index
        self.n_path_lengths = len(path_index.path_indices)
        for i, pi in enumerate(path_index.path_indices):
            self.register_buffer(self.path_indices_prefix + str(i), torch.from_numpy(np.ascontiguousarray(pi)))
        self.register_buffer("disp_target", torch.from_numpy(path_index.search_dst).t()[None, :, :, None].float())

    def to_affinity(self, edge: torch.Tensor) -> torch.Tensor:
        """edge: (B,1,Hg,Wg) probabilities → (B, n_dirs, n_src) = 1 − max along each path."""
        edge = edge.reshape(edge.shape[0], -1)
        out = []
        for i in range(self.n_path_lengths):
            ind = getattr(self, self.path_indices_prefix + str(i))
            vals = edge.index_select(1, ind.reshape(-1)).view(edge.shape[0], *ind.shape)
            out.append(1 - vals.max(dim=2).values)
        return torch.cat(out, dim=1)

    def to_pair_displacement(self, disp: torch.Tensor) -> torch.Tensor:
        """disp (B,2,Hg,Wg) → dp(src) − dp(dst) (B, 2, n_dirs, n_src)."""
        h, w = disp.shape[2:]
        rf = self.path_index.radius_floor
        ch, cw = h - rf, w - 2 * rf
        src = disp[:, :, :ch, rf:rf + cw]
        dst = torch.stack([disp[:, :, dy:dy + ch, rf + dx:rf + dx + cw] for dy, dx in self.path_index.search_dst], 2)
        pair = src.unsqueeze(2) - dst
        return pair.reshape(pair.shape[0], pair.shape[1], pair.shape[2], -1)

    def forward(self, x: torch.Tensor, return_loss: bool = True):  # type: ignore[override]
        edge_out, dp_out = super().forward(x)
        if not return_loss:
            return edge_out, dp_out
        aff = self.to_affinity(torch.sigmoid(edge_out))
        pos_aff_loss = -torch.log(aff + 1e-5)
        neg_aff_loss = -torch.log(1.0 + 1e-5 - aff)
        pair_disp = self.to_pair_displacement(dp_out)
        dp_fg_loss = torch.abs(pair_disp - self.disp_target)
        dp_bg_loss = torch.abs(pair_disp)
        return pos_aff_loss, neg_aff_loss, dp_fg_loss, dp_bg_loss


class EdgeDisplacement(Net):
    """Inference wrapper: input (2,3,H,W) = [image, W-flipped image], zero-padded to
    ``crop_size`` (the training crop, so GroupNorm sees the same padded extent).

    Returns ``edge`` (1, ceil(H/s), ceil(W/s)) = sigmoid of the flip-averaged logits and
    ``dp`` (2, ceil(H/s), ceil(W/s)) of the unflipped image.  Deviation: an image larger
    than ``crop_size`` is padded to its own size instead of being cropped by a negative pad.
    """

    def __init__(self, crop_size: int = 512, stride: int = 4, backbone_width: int = 64) -> None:
        super().__init__(backbone_width=backbone_width)
        self.crop_size = int(crop_size)
        self.stride = int(stride)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:  # type: ignore[override]
        h, w = x.shape[2:]
        fh, fw = (h - 1) // self.stride + 1, (w - 1) // self.stride + 1
        x = F.pad(x, [0, max(self.crop_size, w) - w, 0, max(self.crop_size, h) - h])
        edge_out, dp_out = super().forward(x)
        edge_out = edge_out[..., :fh, :fw]
        dp_out = dp_out[..., :fh, :fw]
        edge = torch.sigmoid(edge_out[0] / 2 + edge_out[1].flip(-1) / 2)
        return edge, dp_out[0]


def alias_groups(module: nn.Module) -> list[list[str]]:
    """State-dict names grouped by the tensor they refer to (first name = canonical)."""
    groups: dict[int, list[str]] = {}
    for name, t in module.state_dict(keep_vars=True).items():
        groups.setdefault(id(t), []).append(name)
    return list(groups.values())


def canonical_state_dict(module: nn.Module) -> dict[str, torch.Tensor]:
    """One entry per distinct tensor (358 for the IRN Net), named by its first key."""
    sd = module.state_dict()
    return {g[0]: sd[g[0]] for g in alias_groups(module)}


def load_irn_weights(module: nn.Module, state_dict: Mapping[str, torch.Tensor], what: str = "IRN weights") -> None:
    """Strictly load a reference ``res50_irn.pth`` (all alias keys) or canonical-keys-only dict.

    The train-time loss buffers (``path_indices*``, ``disp_target``) in a reference file
    are dropped unless ``module`` has them (the reference used ``strict=False`` for this).
    A ``module.`` prefix (DataParallel) is stripped.
    """
    from tools.checkpoint import load_state_dict_checked

    sd = {(k[7:] if k.startswith("module.") else k): v for k, v in state_dict.items()}
    own = module.state_dict(keep_vars=True)
    sd = {k: v for k, v in sd.items() if k in own or not k.startswith(LOSS_BUFFER_PREFIXES)}
    for k, v in own.items():  # loss buffers are derived from the PathIndex, not learnt
        if k.startswith(LOSS_BUFFER_PREFIXES) and k not in sd:
            sd[k] = v.detach()
    for group in alias_groups(module):
        present = [k for k in group if k in sd]
        if present:
            for k in group:
                sd.setdefault(k, sd[present[0]])
    load_state_dict_checked(module, sd, strict=True, what=what)
