"""Pixel-adaptive refinement (PAR) of probability maps with image affinities.

Each pixel is repeatedly replaced by an affinity-weighted sum of its 8 neighbours at each
dilation (48 neighbours for the default dilations). Affinities combine a colour term
(softmax of -(|I_n - I| / std_n(I) / w1)^2, averaged over channels) and a fixed position term.
Unlike the reference (which calls ``.cuda()``), the kernel buffer follows the module's device and
the input's device, so PAR runs on CPU as well.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ["PAR", "neighbour_kernel"]

#: neighbour order (dy, dx) used by the reference kernel and position vector
_OFFSETS = ((-1, -1), (-1, 0), (-1, 1), (0, -1), (0, 1), (1, -1), (1, 0), (1, 1))


def neighbour_kernel() -> torch.Tensor:
    """(8,1,3,3) one-hot kernels selecting the 8 neighbours in the reference order."""
    k = torch.zeros(8, 1, 3, 3)
    for i, (dy, dx) in enumerate(_OFFSETS):
        k[i, 0, dy + 1, dx + 1] = 1.0
    return k


class PAR(nn.Module):
    """PAR(num_iter=10, dilations=[1,2,4,8,12,24]); ``forward(imgs, masks) -> refined masks``.

    Args (forward):
        imgs: (B,3,h,w) float image (any scale; KTSE passes [0,1] BGR, which is irrelevant here).
        masks: (B,K,h',w') maps, resized to (h,w) with bilinear ``align_corners=True``.
    Returns (B,K,h,w).
    """

    w1 = 0.3
    w2 = 0.01

    def __init__(self, num_iter: int = 10, dilations: Sequence[int] = (1, 2, 4, 8, 12, 24)) -> None:
        super().__init__()
        self.num_iter = int(num_iter)
        self.dilations = [int(d) for d in dilations]
        # Buffers are not persistent: PAR has no checkpoint and the reference module has none.
        self.register_buffer("kernel", neighbour_kernel(), persistent=False)
        self.register_buffer("pos", self._pos(), persistent=False)
        self._index_cache: dict[tuple, torch.Tensor] = {}

    def _pos(self) -> torch.Tensor:
        base = torch.tensor([math.sqrt(2) if dy and dx else 1.0 for dy, dx in _OFFSETS], dtype=torch.float32)
        return torch.cat([base * d for d in self.dilations]).reshape(1, 1, -1, 1, 1)

    def _gather_index(self, h: int, w: int, device: torch.device) -> torch.Tensor:
        """Flat source index (8*len(dilations)*h*w,) of every neighbour, edges clamped (= replicate padding)."""
        key = (h, w, str(device))
        idx = self._index_cache.get(key)
        if idx is None:
            rows = torch.arange(h, device=device)
            cols = torch.arange(w, device=device)
            parts = []
            for d in self.dilations:
                for dy, dx in _OFFSETS:
                    r = (rows + dy * d).clamp(0, h - 1)
                    c = (cols + dx * d).clamp(0, w - 1)
                    parts.append((r[:, None] * w + c[None, :]).reshape(-1))
            idx = torch.cat(parts)
            self._index_cache[key] = idx
        return idx

    def neighbours(self, x: torch.Tensor) -> torch.Tensor:
        """(B,c,h,w) -> (B,c,8*len(dilations),h,w): dilated neighbours, replicate padding.

        The reference convolves with the one-hot ``kernel`` per dilation on a replicate-padded copy;
        gathering the same pixels with edge-clamped indices gives bit-identical values
        (x*1 + sum of 0*x) in one indexing op, much faster on CPU.
        """
        b, c, h, w = x.shape
        idx = self._gather_index(h, w, x.device)
        flat = x.reshape(b * c, h * w)
        # gather (not index_select/advanced indexing): several times faster on CPU for this pattern
        return torch.gather(flat, 1, idx.expand(b * c, -1)).reshape(b, c, -1, h, w)

    def forward(self, imgs: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
        masks = F.interpolate(masks, size=imgs.shape[-2:], mode="bilinear", align_corners=True)
        b, c, h, w = imgs.shape
        nb = self.neighbours(imgs)
        pos = self.pos.to(device=imgs.device, dtype=imgs.dtype).repeat(b, 1, 1, h, w)
        diff = (nb - imgs.unsqueeze(2)).abs()
        std = torch.std(nb, dim=2, keepdim=True)
        aff = -(diff / (std + 1e-8) / self.w1) ** 2
        aff = aff.mean(dim=1, keepdim=True)
        pos_std = torch.std(pos, dim=2, keepdim=True)
        pos_aff = -(pos / (pos_std + 1e-8) / self.w1) ** 2
        aff = F.softmax(aff, dim=2) + self.w2 * F.softmax(pos_aff, dim=2)
        for _ in range(self.num_iter):
            masks = (self.neighbours(masks) * aff).sum(dim=2)
        return masks
