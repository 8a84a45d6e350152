"""Random-walk propagation of CAMs over the IRN boundary map.

Two formulations of the same result ``rw = (cams·(1−edge)) @ T^(2^exp_times)`` with
``T = A^β / colsum(A^β)`` (A: symmetric affinities within ``radius``, ones on the diagonal):

* ``dense`` — the reference statement sequence: build the dense (hw × hw) matrix and square
  it ``exp_times`` times (float32; O((hw)³) per squaring, the GPU path).
* ``sparse`` — A has ≤ 69 non-zeros per column (radius 5), so multiply the C row vectors by
  the sparse T ``2^exp_times`` times instead (float64 by default).  Same mathematics, ~10⁴×
  fewer operations at VOC size, and closer to the exact (float64) chain than the float32
  reference: the dense float32 chain itself is ≈2e-5 (relative) off the float64 one.
* ``chunked`` — the dense float32 computation with a bounded footprint: T is built in place in one
  (hw)² buffer (no padded matrix, no copies) and squared in row blocks into a second buffer, so the
  peak is 2·(hw)²·4 bytes instead of ≈4·(hw)²·4 (≈5.2 GB instead of ≈10.5 GB for a 640×640 image).
* ``auto`` — :func:`choose_rw_mode`: the first of dense / chunked / sparse whose estimated bytes
  (:func:`walk_bytes`) fit the free device memory; sparse on CPU.
"""
from __future__ import annotations

import numpy as np
import scipy.sparse as sp
import torch
import torch.nn.functional as F

from irn.path_index import PathIndex, affinity_sparse_to_dense, edge_to_affinity

__all__ = ["propagate_to_edge", "sem_seg_from_rw", "padded_affinity", "sparse_affinity", "walk_bytes",
           "choose_rw_mode", "free_device_bytes", "RW_MODES"]

RW_MODES = ("dense", "chunked", "sparse")
# Share of the free memory a walk may plan to use: the caching allocator fragments, and cuBLAS needs a workspace.
MEMORY_MARGIN = 0.85


def padded_affinity(edge: torch.Tensor, radius: int = 5) -> tuple[PathIndex, torch.Tensor, tuple[int, int]]:
    """Pad the edge map with 1.0 (r left/right, r bottom) and compute path affinities on it.

    edge: (1, h, w).  Returns the PathIndex of the padded (h+r, w+2r) grid, affinities
    (1, n_dirs, n_src) and the padded size.
    """
    h, w = edge.shape[-2:]
    hp, wp = h + radius, w + 2 * radius
    pi = PathIndex(radius=radius, default_size=(hp, wp))
    edge_padded = F.pad(edge.reshape(1, 1, h, w), (radius, radius, 0, radius), mode="constant", value=1.0)
    aff = edge_to_affinity(edge_padded, pi.path_indices)
    return pi, aff, (hp, wp)


def _dense_transition(edge: torch.Tensor, radius: int, beta: float, exp_times: int) -> torch.Tensor:
    h, w = edge.shape[-2:]
    pi, aff, (hp, wp) = padded_affinity(edge, radius)
    dense = affinity_sparse_to_dense(aff, pi.src_indices, pi.dst_indices, hp * wp)
    dense = dense.view(hp, wp, hp, wp)[:-radius, radius:-radius, :-radius, radius:-radius].reshape(h * w, h * w)
    scaled = torch.pow(dense, beta)
    trans = scaled / torch.sum(scaled, dim=0, keepdim=True)
    for _ in range(exp_times):
        trans = torch.matmul(trans, trans)
    return trans


def _cropped_pairs(pi: PathIndex, h: int, w: int, radius: int, wp: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The affinity pairs of the padded grid that fall inside the (h, w) image: (keep mask over the
    flattened (n_dirs·n_src) affinities, source index, destination index) in cropped row-major numbering."""
    src = np.broadcast_to(pi.src_indices[None, :], pi.dst_indices.shape).reshape(-1)
    dst = pi.dst_indices.reshape(-1)
    sy, sx = np.divmod(src, wp)
    dy, dx = np.divmod(dst, wp)
    sx, dx = sx - radius, dx - radius
    keep = (sy < h) & (dy < h) & (sx >= 0) & (sx < w) & (dx >= 0) & (dx < w)
    return keep, sy[keep] * w + sx[keep], dy[keep] * w + dx[keep]


def sparse_affinity(edge: torch.Tensor, radius: int = 5, dtype: np.dtype = np.float64) -> sp.csr_matrix:
    """The cropped (hw × hw) symmetric affinity matrix A (diagonal 1) as scipy CSR."""
    h, w = edge.shape[-2:]
    pi, aff, (hp, wp) = padded_affinity(edge.to(torch.float64) if dtype == np.float64 else edge, radius)
    aff = aff.reshape(-1).cpu().numpy().astype(dtype, copy=False)
    keep, s, d = _cropped_pairs(pi, h, w, radius, wp)
    a = aff[keep]
    n = h * w
    diag = np.arange(n)
    rows = np.concatenate([s, d, diag])
    cols = np.concatenate([d, s, diag])
    vals = np.concatenate([a, a, np.ones(n, dtype=dtype)])
    return sp.csr_matrix((vals, (rows, cols)), shape=(n, n))


def _chunked_transition(edge: torch.Tensor, radius: int, beta: float, exp_times: int,
                        chunk_rows: int | None = None) -> torch.Tensor:
    """The dense float32 T^(2^exp_times) of :func:`_dense_transition` in two (hw)² buffers.

    The cropped affinities are scattered straight into one (hw)² matrix (the values the dense path
    crops out of the padded matrix), raised to ``beta`` and column-normalised in place; each squaring
    writes row blocks of ``chunk_rows`` rows (default: all) into the second buffer, then the two swap.
    """
    h, w = edge.shape[-2:]
    n = h * w
    pi, aff, (hp, wp) = padded_affinity(edge, radius)
    keep, s, d = _cropped_pairs(pi, h, w, radius, wp)
    vals = aff.reshape(-1)[torch.as_tensor(np.flatnonzero(keep), device=aff.device)]
    s_t, d_t = torch.as_tensor(s, device=aff.device), torch.as_tensor(d, device=aff.device)
    trans = torch.zeros((n, n), dtype=aff.dtype, device=aff.device)
    trans[s_t, d_t] = vals
    trans[d_t, s_t] = vals
    idx = torch.arange(n, device=aff.device)
    trans[idx, idx] = 1
    del vals, s_t, d_t, idx, aff
    trans.pow_(beta)
    trans.div_(torch.sum(trans, dim=0, keepdim=True))
    rows = n if not chunk_rows else max(1, int(chunk_rows))
    other = torch.empty_like(trans)
    for _ in range(exp_times):
        for i in range(0, n, rows):
            torch.matmul(trans[i:i + rows], trans, out=other[i:i + rows])
        trans, other = other, trans
    del other
    return trans


def walk_bytes(h: int, w: int, n_classes: int, mode: str, radius: int = 5) -> int:
    """Estimated peak device bytes of one :func:`propagate_to_edge` call on an (h, w) stride-4 grid.

    dense: the padded (hp·wp)² matrix plus its cropped copy while cropping, then four (hw)² float32
    matrices alive at once while squaring (affinity, A^β, T and the product); chunked: two (hw)²
    matrices; sparse: nothing but the CAMs (the walk runs on the CPU). Each adds the path-affinity
    tensors (float32 affinities and two int64 index arrays per direction and padded pixel).
    """
    n = h * w
    p = (h + radius) * (w + 2 * radius)
    n_dirs = len(PathIndex(radius=radius, default_size=(radius + 2, 2 * radius + 2)).search_dst)
    small = n_dirs * p * (4 + 8 + 8) + 3 * n_classes * n * 4
    if mode == "dense":
        return 4 * max(p * p + n * n, 4 * n * n) + small
    if mode == "chunked":
        return 4 * 2 * n * n + small
    if mode == "sparse":
        return 3 * n_classes * n * 4
    raise ValueError(f"random walk mode must be one of {RW_MODES}, got {mode!r}")


def free_device_bytes(device: torch.device) -> int | None:
    """Bytes a new allocation can use on ``device``: the driver's free memory plus what PyTorch's caching
    allocator holds but does not use. None on CPU (no budget: host memory is not planned)."""
    if device.type != "cuda":
        return None
    free, _ = torch.cuda.mem_get_info(device)
    return int(free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device))


def choose_rw_mode(h: int, w: int, n_classes: int, device: torch.device, mem_budget: int | None = None,
                   radius: int = 5) -> str:
    """The walk ``auto`` runs: the first of dense (reference) / chunked / sparse whose :func:`walk_bytes`
    fits ``mem_budget`` (default: :data:`MEMORY_MARGIN` of the free CUDA memory). On CPU without an
    explicit budget: sparse (the dense forms cost ~10⁴× more arithmetic)."""
    budget = mem_budget
    if budget is None:
        free = free_device_bytes(device)
        if free is None:
            return "sparse"
        budget = int(MEMORY_MARGIN * free)
    for mode in ("dense", "chunked"):
        if walk_bytes(h, w, n_classes, mode, radius) <= budget:
            return mode
    return "sparse"


def propagate_to_edge(cams: torch.Tensor, edge: torch.Tensor, radius: int = 5, beta: float = 10,
                      exp_times: int = 8, mode: str = "dense", mem_budget: int | None = None,
                      chunk_rows: int | None = None) -> torch.Tensor:
    """Random walk of CAMs bounded by the edge map.

    cams: (C, h, w) stride-4 CAMs; edge: (1, h, w) boundary probabilities (same device).
    mode: ``dense`` (reference float32 matrix squaring), ``chunked`` (the same float32 squaring in two
    (hw)² buffers, ``chunk_rows`` rows per product block), ``sparse`` (float64 sparse iteration, CPU)
    or ``auto`` (:func:`choose_rw_mode` with ``mem_budget`` bytes, default the free CUDA memory).
    Returns rw (C, 1, h, w) on the device of ``cams``, dtype of ``cams`` for dense/chunked and
    float64 for sparse.
    """
    c = cams.shape[0]
    h, w = cams.shape[-2:]
    if mode == "auto":
        mode = choose_rw_mode(h, w, c, cams.device, mem_budget, radius)
    if mode in ("dense", "chunked"):
        x = cams.reshape(-1, h, w) * (1 - edge.reshape(1, h, w))
        trans = (_dense_transition(edge, radius, beta, exp_times) if mode == "dense"
                 else _chunked_transition(edge, radius, beta, exp_times, chunk_rows))
        rw = torch.matmul(x.reshape(c, h * w), trans)
        return rw.view(c, 1, h, w)
    if mode != "sparse":
        raise ValueError(f"random walk mode must be one of {RW_MODES} or 'auto', got {mode!r}")
    a = sparse_affinity(edge.detach().cpu(), radius)
    a.data **= beta
    inv_colsum = 1.0 / np.asarray(a.sum(axis=0)).reshape(-1)
    # A^β is symmetric, so x @ T = (Tᵀ xᵀ)ᵀ with Tᵀ = diag(1/colsum) · A^β: iterate v ← Tᵀ v, v = xᵀ (hw, C)
    t_t = (sp.diags(inv_colsum) @ a).tocsr()
    cams64 = cams.detach().cpu().to(torch.float64).reshape(c, h * w)
    edge64 = edge.detach().cpu().to(torch.float64).reshape(1, h * w)
    v = np.ascontiguousarray((cams64 * (1 - edge64)).numpy().T)
    for _ in range(2 ** int(exp_times)):
        v = t_t @ v
    return torch.from_numpy(np.ascontiguousarray(v.T)).view(c, 1, h, w).to(cams.device)


def sem_seg_from_rw(rw: torch.Tensor, keys: np.ndarray, orig_size: tuple[int, int], bg_thres: float = 0.25
                    ) -> tuple[np.ndarray, torch.Tensor]:
    """rw (C,1,h,w) → (pred (H,W) int64 VOC ids = keys[argmax], score (C+1,H,W) float32 CPU).

    ×4 bilinear (align_corners=False), crop to the image, divide by the global max, prepend a
    constant background plane ``bg_thres``.
    """
    rw = rw.to(torch.float32)
    up = F.interpolate(rw, scale_factor=4, mode="bilinear", align_corners=False)[..., 0, :orig_size[0], :orig_size[1]]
    up = up / torch.max(up)
    score = F.pad(up, (0, 0, 0, 0, 1, 0), value=float(bg_thres))
    pred = np.asarray(keys, dtype=np.int64)[torch.argmax(score, dim=0).cpu().numpy()]
    return pred, score.cpu()
