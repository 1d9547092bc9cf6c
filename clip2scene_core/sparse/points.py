"""Point ↔ voxel transfers for point-voxel networks (SPVCNN), pure PyTorch on any device.

Point coordinates are continuous, in finest-voxel units (``Voxels.point_coords``), so the
point in voxel ``c`` satisfies ``floor(p) == c`` and, at tensor stride ``s``,
``floor(p / s)`` is its coarse voxel. Trilinear interpolation uses voxel **centres**
(``(c + 0.5)·s``); torchsparse's SPVCNN feeds integer coordinates and interpolates between
voxel corners, which is the same thing shifted by half a voxel.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch

from .kernel_map import table_for
from .tensor import SparseTensor


@dataclass(eq=False)
class PointTensor:
    """Per-point features ``feats`` (N, C) at ``coords`` (N, 4) float [b, x, y, z] (voxel units)."""

    feats: torch.Tensor
    coords: torch.Tensor

    def replace(self, feats: torch.Tensor) -> "PointTensor":
        return PointTensor(feats, self.coords)


def _voxel_of_points(x: SparseTensor, z: PointTensor) -> torch.Tensor:
    """Row of ``x`` holding each point (−1 if none), memoised per stride on the cache."""
    key = ("point_rows", x.stride, id(z.coords))
    rows = x.cache.extra.get(key)
    if rows is None:
        c = torch.floor(z.coords[:, 1:] / x.stride).to(torch.int64)
        q = torch.cat([z.coords[:, :1].to(torch.int64), c], dim=1)
        rows = table_for(x.cache, x.stride, x.coords).query(q)
        x.cache.extra[key] = rows
    return rows


def _csr(rows: torch.Tensor, cols: torch.Tensor, vals: torch.Tensor, shape: tuple[int, int]) -> torch.Tensor:
    """CSR matrix from (unique) COO triplets, built directly: one stable sort, no coalesce."""
    if rows.numel() > 1 and not bool((rows[1:] >= rows[:-1]).all()):
        order = torch.sort(rows, stable=True).indices
        rows, cols, vals = rows[order], cols[order], vals[order]
    crow = torch.zeros(shape[0] + 1, dtype=torch.int64, device=rows.device)
    crow[1:] = torch.cumsum(torch.bincount(rows, minlength=shape[0]), 0)
    with warnings.catch_warnings():   # "CSR support is in beta": we use only CSR @ dense
        warnings.simplefilter("ignore", UserWarning)
        return torch.sparse_csr_tensor(crow, cols, vals, shape, check_invariants=False)


@dataclass(eq=False)
class SpMat:
    """Constant sparse matrix S (float32) for point↔voxel transfers; Sᵀ is built only when a
    backward pass asks for it (never during inference)."""

    rows: torch.Tensor
    cols: torch.Tensor
    vals: torch.Tensor
    shape: tuple[int, int]
    _csr: torch.Tensor | None = None
    _csr_t: torch.Tensor | None = None

    @property
    def csr(self) -> torch.Tensor:
        if self._csr is None:
            self._csr = _csr(self.rows, self.cols, self.vals, self.shape)
        return self._csr

    @property
    def csr_t(self) -> torch.Tensor:
        if self._csr_t is None:
            self._csr_t = _csr(self.cols, self.rows, self.vals, (self.shape[1], self.shape[0]))
        return self._csr_t


def _csr_mm(csr: torch.Tensor, dense: torch.Tensor) -> torch.Tensor:
    """``csr @ dense`` as a weighted embedding-bag sum (one bag per CSR row): one pass that
    writes the output once, where ``torch.sparse.mm`` zero-fills and copies it around."""
    if csr.values().numel() == 0 or dense.shape[0] == 0:
        return dense.new_zeros((csr.shape[0], dense.shape[1]))
    return torch.nn.functional.embedding_bag(
        csr.col_indices(), dense, csr.crow_indices(), mode="sum",
        per_sample_weights=csr.values(), include_last_offset=True)


class _SparseMatmul(torch.autograd.Function):
    """``S @ feats`` for a constant sparse S, in float32 with autocast off (sparse kernels
    lack half types on CPU); the backward is ``Sᵀ @ grad``."""

    @staticmethod
    def forward(ctx, feats: torch.Tensor, mat: SpMat) -> torch.Tensor:  # type: ignore[override]
        ctx.mat = mat
        with torch.autocast(feats.device.type, enabled=False):
            return _csr_mm(mat.csr, feats)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        with torch.autocast(grad.device.type, enabled=False):
            return _csr_mm(ctx.mat.csr_t, grad.float().contiguous()), None


def _spmm(feats: torch.Tensor, mat: SpMat) -> torch.Tensor:
    return _SparseMatmul.apply(feats.float().contiguous(), mat).to(feats.dtype)


def point_to_voxel(x: SparseTensor, z: PointTensor) -> SparseTensor:
    """Voxel features of ``x`` replaced by the mean of the point features inside each voxel."""
    key = ("p2v", x.stride, id(z.coords))
    pair = x.cache.extra.get(key)
    if pair is None:
        rows = _voxel_of_points(x, z)
        ok = torch.nonzero(rows >= 0).squeeze(1)
        r = rows[ok]
        n = x.coords.shape[0]
        counts = torch.bincount(r, minlength=n).clamp_min(1).to(torch.float32)
        pair = SpMat(r, ok, (1.0 / counts[r]).float(), (n, z.coords.shape[0]))
        x.cache.extra[key] = pair
    return x.replace(_spmm(z.feats, pair))


def voxel_to_point(x: SparseTensor, z: PointTensor) -> PointTensor:
    """Point features trilinearly interpolated from the 8 nearest voxel centres of ``x``.

    Missing neighbours get weight 0 and the rest are renormalised (as torchsparse does).
    """
    key = ("v2p", x.stride, id(z.coords))
    pair = x.cache.extra.get(key)
    if pair is None:
        q = z.coords[:, 1:] / x.stride - 0.5
        base = torch.floor(q)
        frac = q - base
        base = base.to(torch.int64)
        b = z.coords[:, :1].to(torch.int64)
        table = table_for(x.cache, x.stride, x.coords)
        corner_base = torch.cat([b, base], dim=1)
        if table._additive_ok(corner_base, 1):
            # corners (bx, by, bz), index bx·4 + by·2 + bz: four (x, y) columns of two z cells
            cols = torch.tensor([[0, 0], [0, 1], [1, 0], [1, 1]], device=q.device)
            rows_t = table.query_columns_dense(corner_base, cols, 0, 2).t()
        else:
            rows_t = torch.stack([
                table.query(torch.cat([b, base + torch.tensor([(c >> 2) & 1, (c >> 1) & 1, c & 1],
                                                              device=q.device)], dim=1))
                for c in range(8)], 1)
        w1 = torch.stack([1 - frac, frac], dim=2)                  # (N, 3, 2): weight of bit 0 / 1
        w_t = (w1[:, 0, :, None, None] * w1[:, 1, None, :, None] * w1[:, 2, None, None, :]).reshape(-1, 8)
        w_t = w_t * (rows_t >= 0)
        w_t = w_t / (w_t.sum(dim=1, keepdim=True) + 1e-8)
        keep = (rows_t >= 0) & (w_t > 0)
        pts = torch.arange(rows_t.shape[0], device=q.device)[:, None].expand_as(rows_t)
        pair = SpMat(pts[keep], rows_t[keep], w_t[keep].float(), (rows_t.shape[0], x.coords.shape[0]))
        x.cache.extra[key] = pair
    return z.replace(_spmm(x.feats, pair))
