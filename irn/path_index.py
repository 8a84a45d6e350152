"""Pixel-pair indexing for IRN (reference ``misc/indexing.py``).

A ``PathIndex`` of radius r enumerates the pair directions (dy, dx) of the upper half
disc, the integer pixels on the straight path between a source pixel and each
destination, and the flat indices of those pixels on a fixed feature grid.  The same
object serves training (radius 10 on the 1/4-scale crop) and the random walk (radius 5).
"""
from __future__ import annotations

import math
from typing import Sequence

import numpy as np
import torch

from voc12.dataset import VOC12

__all__ = ["PathIndex", "search_directions", "edge_to_affinity", "affinity_labels", "affinity_sparse_to_dense"]


def search_directions(radius: int) -> list[tuple[int, int]]:
    """Directions (dy, dx) in reference order: (0, 1..r-1), then rows y = 1..r-1 with
    x = -(r-1)..(r-1) and x² + y² < r²."""
    dirs = [(0, x) for x in range(1, radius)]
    for y in range(1, radius):
        for x in range(-radius + 1, radius):
            if x * x + y * y < radius * radius:
                dirs.append((y, x))
    return dirs


def _path_for(dy: int, dx: int) -> list[tuple[int, int]]:
    """Integer points of the (0,0)-(dy,dx) box whose distance to the segment's line is < 1,
    stably ordered by decreasing |y| + |x| (destination first, origin last)."""
    length_sq = dy * dy + dx * dx
    y0, y1 = sorted((0, dy))
    x0, x1 = sorted((0, dx))
    pts = []
    for y in range(y0, y1 + 1):
        for x in range(x0, x1 + 1):
            if (dy * x - dx * y) ** 2 / length_sq < 1:
                pts.append((y, x))
    pts.sort(key=lambda p: -abs(p[0]) - abs(p[1]))  # list.sort is stable, as the reference relies on
    return pts


class PathIndex:
    """Paths and flat pixel indices for pairs within ``radius`` on a ``default_size`` grid.

    Attributes (shapes for n_dirs directions, n_src = (Hg - rf) * (Wg - 2 rf) sources):
      ``search_paths``: list over path-length groups (increasing length) of int64 arrays
      (n_paths, len, 2); ``search_dst`` (n_dirs, 2) destinations in group order (not plain
      direction order); ``path_indices``: list of (n_paths, len, n_src) int64;
      ``src_indices`` (n_src,); ``dst_indices`` (n_dirs, n_src).
    """

    def __init__(self, radius: int = 10, default_size: Sequence[int] = (128, 128)) -> None:
        self.radius = int(radius)
        self.radius_floor = int(math.ceil(radius) - 1)
        self.search_paths, self.search_dst = self._search_paths_dst(self.radius)
        self.default_size = (int(default_size[0]), int(default_size[1]))
        self.path_indices, self.src_indices, self.dst_indices = self.get_path_indices(self.default_size)

    # the reference attribute names, kept for readers of the original code
    @property
    def default_path_indices(self) -> list[np.ndarray]:
        return self.path_indices

    @property
    def default_src_indices(self) -> np.ndarray:
        return self.src_indices

    @property
    def default_dst_indices(self) -> np.ndarray:
        return self.dst_indices

    @staticmethod
    def _search_paths_dst(radius: int) -> tuple[list[np.ndarray], np.ndarray]:
        by_length: dict[int, list[list[tuple[int, int]]]] = {}
        for dy, dx in search_directions(radius):
            path = _path_for(dy, dx)
            by_length.setdefault(len(path), []).append(path)
        groups = [np.asarray(by_length[k], dtype=np.int64) for k in sorted(by_length)]
        dst = np.concatenate([g[:, 0] for g in groups], axis=0)
        return groups, dst

    def get_path_indices(self, size: Sequence[int]) -> tuple[list[np.ndarray], np.ndarray, np.ndarray]:
        """Flat indices of every path point for every source pixel of a (H, W) grid."""
        h, w = int(size[0]), int(size[1])
        rf = self.radius_floor
        full = np.arange(h * w, dtype=np.int64).reshape(h, w)
        ch, cw = h - rf, w - 2 * rf
        if ch <= 0 or cw <= 0:
            raise ValueError(f"grid {h}x{w} too small for PathIndex radius {self.radius}")
        path_indices = []
        for group in self.search_paths:
            arr = np.empty((group.shape[0], group.shape[1], ch * cw), dtype=np.int64)
            for i, path in enumerate(group):
                for j, (dy, dx) in enumerate(path):
                    arr[i, j] = full[dy:dy + ch, rf + dx:rf + dx + cw].reshape(-1)
            path_indices.append(arr)
        src = full[:ch, rf:rf + cw].reshape(-1)
        dst = np.concatenate([p[:, 0] for p in path_indices], axis=0)
        return path_indices, src, dst


def edge_to_affinity(edge: torch.Tensor, path_indices: Sequence[np.ndarray | torch.Tensor]) -> torch.Tensor:
    """Affinity = 1 − max of the boundary map along each path.

    edge: (B, 1, Hg, Wg) or (B, Hg, Wg) probabilities on the PathIndex grid.
    Returns (B, n_dirs, n_src) in ``search_dst`` order.
    """
    edge = edge.reshape(edge.shape[0], -1)
    out = []
    for ind in path_indices:
        ind_t = torch.as_tensor(ind, device=edge.device)
        vals = edge.index_select(1, ind_t.reshape(-1)).view(edge.shape[0], *ind_t.shape)
        out.append(1 - vals.max(dim=2).values)
    return torch.cat(out, dim=1)


def affinity_labels(label: np.ndarray, src_indices: np.ndarray, dst_indices: np.ndarray,
                    num_classes: int = VOC12.num_classes) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Pair labels from a reduced seed map (``GetAffinityLabelFromIndices``).

    label: (Hg, Wg) uint8, 0 = bg, 1..C classes, ≥ num_classes = C + 1 (255) = unknown.
    Returns float32 (n_dirs, n_src) ``bg_pos``, ``fg_pos``, ``neg``.
    """
    flat = np.asarray(label).reshape(-1)
    src = flat[src_indices][None, :]
    dst = flat[dst_indices]
    valid = (src < num_classes) & (dst < num_classes)
    equal = src == dst
    pos = equal & valid
    bg_pos = (pos & (src == 0)).astype(np.float32)
    fg_pos = (pos & (src > 0)).astype(np.float32)
    neg = (~equal & valid).astype(np.float32)
    return bg_pos, fg_pos, neg


def affinity_sparse_to_dense(aff: torch.Tensor, src_indices: np.ndarray, dst_indices: np.ndarray,
                             n_vertices: int) -> torch.Tensor:
    """Dense symmetric (N, N) affinity with ones on the diagonal (``affinity_sparse2dense``).

    aff: (n_dirs, n_src) or (1, n_dirs, n_src).  Pairs are unique (directions cover half a
    disc), so plain assignment equals the reference's sparse-to-dense summation.
    """
    aff = aff.reshape(-1)
    src = torch.as_tensor(np.broadcast_to(src_indices[None, :], dst_indices.shape).reshape(-1), device=aff.device)
    dst = torch.as_tensor(dst_indices.reshape(-1), device=aff.device)
    dense = torch.zeros((n_vertices, n_vertices), dtype=aff.dtype, device=aff.device)
    dense[src, dst] = aff
    dense[dst, src] = aff
    idx = torch.arange(n_vertices, device=aff.device)
    dense[idx, idx] = 1
    return dense
