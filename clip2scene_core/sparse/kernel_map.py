"""Kernel maps in pure PyTorch: which input voxel feeds which output voxel through which weight.

Voxel keys are packed into one int64 per coordinate (mixed radix over the bounding box of
the table, batch most significant, so sorted keys are lexicographically sorted coords); a
lookup is one ``torch.searchsorted`` over the sorted keys. Everything is vectorised over
points; only the kernel offsets (≤ 125) are looped over, in Python-free tensor form too.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from functools import lru_cache

import numpy as np
import torch

from ..errors import InvalidPointCloudError
from .sorting import nonzero_1d, sort_keys, unique_keys
from .tensor import SparseCache


@lru_cache(maxsize=None)
def _offsets_cpu(kernel_size: int, dilation: int) -> torch.Tensor:
    r = torch.arange(kernel_size, dtype=torch.int64) - (kernel_size - 1) // 2
    r = r * dilation
    if kernel_size % 2 == 1:   # x fastest (torchsparse / MinkowskiEngine layout for odd kernels)
        z, y, x = torch.meshgrid(r, r, r, indexing="ij")
    else:                      # z fastest (torchsparse layout for even kernels)
        x, y, z = torch.meshgrid(r, r, r, indexing="ij")
    return torch.stack([x.reshape(-1), y.reshape(-1), z.reshape(-1)], dim=1)


def kernel_offsets(kernel_size: int, dilation: int = 1, device: torch.device | str = "cpu") -> torch.Tensor:
    """(K³, 3) int64 offsets in the order of the ``kernel`` parameter's first axis.

    Same order as torchsparse's ``get_kernel_offsets``: odd kernels enumerate x fastest
    (offsets −(k−1)/2 … (k−1)/2), even kernels z fastest (offsets 0 … k−1), so trained
    torchsparse state_dicts map weight-for-weight.
    """
    return _offsets_cpu(int(kernel_size), int(dilation)).to(device)


MARGIN = 8   # grid cells added around a table's bounding box so offset queries never wrap


def _volume(size: torch.Tensor) -> int:
    total = 1
    for v in size.tolist():
        total *= int(v)
    return total


def _extent_ok(size: torch.Tensor) -> bool:
    return _volume(size) < 2 ** 62


def _pack(rel: torch.Tensor, size: torch.Tensor) -> torch.Tensor:
    """Mixed-radix key of non-negative ``rel`` (..., 4) int64 [b, x, y, z] (b most significant)."""
    return ((rel[..., 0] * size[1] + rel[..., 1]) * size[2] + rel[..., 2]) * size[3] + rel[..., 3]


def unique_coords(c: torch.Tensor, return_inverse: bool = False):
    """Sorted unique rows of int64 coords (N, 4) → int32, via one 1-D unique on packed keys.

    With ``return_inverse`` also the (N,) int64 row of every input row in the result.
    """
    if c.shape[0] == 0:
        out = c.to(torch.int32)
        return (out, c.new_zeros(0)) if return_inverse else out
    lo = c.min(dim=0).values
    size = c.max(dim=0).values - lo + 1
    if not _extent_ok(size):
        res = torch.unique(c, dim=0, return_inverse=return_inverse)
        return (res[0].to(torch.int32), res[1]) if return_inverse else res.to(torch.int32)
    keys, inverse = unique_keys(_pack(c - lo, size), _volume(size))
    out = torch.empty(keys.shape[0], 4, dtype=torch.int64, device=c.device)
    for col in (3, 2, 1):
        out[:, col] = keys % size[col]
        keys = keys // size[col]
    out[:, 0] = keys
    out = (out + lo).to(torch.int32)
    return (out, inverse) if return_inverse else out


def _searchsorted(keys: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """``torch.searchsorted(keys, q)``; on CPU through NumPy, whose binary search is ~1.5× faster."""
    if keys.device.type == "cpu" and keys.dtype == torch.int64 and q.dtype == torch.int64:
        pos = np.searchsorted(keys.contiguous().numpy(), q.contiguous().numpy())
        return torch.from_numpy(pos.astype(np.int64, copy=False))
    return torch.searchsorted(keys, q)


@dataclass(eq=False)
class LookupTable:
    """Sorted packed keys of one coordinate set, for vectorised coordinate → row queries.

    The packing box is the bounding box grown by ``MARGIN`` cells per spatial axis, so a
    query ``c + offset`` with |offset| ≤ MARGIN around a stored coordinate is a plain key
    addition (``key(c) + key_delta(offset)``) that cannot alias another cell.
    """

    lo: torch.Tensor      # (4,) int64 origin of the packing box
    size: torch.Tensor    # (4,) int64 extent of the packing box
    keys: torch.Tensor    # (M,) int64 sorted
    rows: torch.Tensor    # (M,) int64 row of each sorted key

    @classmethod
    def build(cls, coords: torch.Tensor) -> "LookupTable":
        c = coords.to(torch.int64)
        if c.shape[0] == 0:
            z = torch.zeros(4, dtype=torch.int64, device=c.device)
            return cls(z, z + 1, c.new_zeros(0), c.new_zeros(0))
        pad = torch.tensor([0, MARGIN, MARGIN, MARGIN], device=c.device)
        lo = c.min(dim=0).values - pad
        size = c.max(dim=0).values + pad - lo + 1
        if not _extent_ok(size):
            raise InvalidPointCloudError(
                f"voxel grid extent {size.tolist()} too large to index; crop the point range")
        skeys, order = sort_keys(_pack(c - lo, size), _volume(size))
        if skeys.numel() > 1 and bool((skeys[1:] == skeys[:-1]).any()):
            raise InvalidPointCloudError("sparse tensor has duplicate coordinates")
        return cls(lo, size, skeys, order)

    def _lookup(self, keys: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        pos = _searchsorted(self.keys, keys).clamp_max_(self.keys.numel() - 1)
        return pos, self.keys[pos] == keys

    def query(self, coords: torch.Tensor) -> torch.Tensor:
        """Rows of ``coords`` (..., 4) int64 in the table, −1 where absent."""
        rel = coords - self.lo
        inside = ((rel >= 0) & (rel < self.size)).all(dim=-1)
        keys = _pack(rel.clamp_min(0), self.size)
        if self.keys.numel() == 0:
            return torch.full(keys.shape, -1, dtype=torch.int64, device=keys.device)
        pos, hit = self._lookup(keys)
        return torch.where(inside & hit, self.rows[pos], torch.full_like(pos, -1))

    def _additive_ok(self, base: torch.Tensor, reach: int) -> bool:
        """Whether ``base + offset`` (|offset| ≤ ``reach``) can be looked up by key addition:
        ``base`` within MARGIN/2 of the stored box and ``reach`` ≤ MARGIN/2."""
        half = MARGIN // 2
        if reach > half:
            return False
        if base.shape[0] == 0:
            return True
        lo, hi = base.min(dim=0).values, base.max(dim=0).values
        inner_lo = self.lo[1:] + MARGIN - half
        inner_hi = self.lo[1:] + self.size[1:] - 1 - MARGIN + half
        return not (bool((lo[1:] < inner_lo).any()) or bool((hi[1:] > inner_hi).any())
                    or bool(lo[0] < self.lo[0]) or bool(hi[0] >= self.lo[0] + self.size[0]))

    def query_offsets(self, base: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
        """Rows of ``base[i] + offsets[k]`` as (M, K), −1 where absent.

        ``base`` (M, 4) must lie within MARGIN/2 of the stored box and |offsets| ≤ MARGIN/2
        for the fast additive path; anything else takes the bounds-checked path.
        """
        if base.shape[0] == 0 or self.keys.numel() == 0:
            return torch.full((base.shape[0], offsets.shape[0]), -1, dtype=torch.int64, device=base.device)
        if not self._additive_ok(base, int(offsets.abs().max())):
            q = base[:, None, :].repeat(1, offsets.shape[0], 1)
            q[:, :, 1:] += offsets[None]
            return self.query(q)
        zero = torch.zeros(offsets.shape[0], 1, dtype=offsets.dtype, device=offsets.device)
        delta = _pack(torch.cat([zero, offsets], dim=1), self.size)     # linear in the offset
        keys = _pack(base - self.lo, self.size)[:, None] + delta[None, :]
        pos, hit = self._lookup(keys)
        return torch.where(hit, self.rows[pos], torch.full_like(pos, -1))

    def _column_hits(self, base: torch.Tensor, columns: torch.Tensor, z0: int, n_z: int,
                     dilation: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(slot, row) of every stored cell ``base[m] + (dx_c, dy_c, z0 + t·dilation)``, with
        slot = (c·n_z + t)·M + m, unordered.

        z is the fastest packing axis, so the cells of one column window are consecutive
        keys: one binary search per (column, m) finds the window, whose (at most span) stored
        keys are then read in order. Needs ``_additive_ok(base, reach)``.
        """
        dev = base.device
        n, m_base, n_col = self.keys.numel(), base.shape[0], columns.shape[0]
        if n == 0 or m_base == 0 or n_col == 0:
            empty = torch.zeros(0, dtype=torch.int64, device=dev)
            return empty, empty
        span = (n_z - 1) * dilation + 1
        # keys padded with span sentinels above any query: window reads need no bounds checks
        padded = torch.cat([self.keys, self.keys.new_full((span,), 2 ** 62)])
        zeros = torch.zeros(n_col, 1, dtype=torch.int64, device=dev)
        delta = _pack(torch.cat([zeros, columns.to(torch.int64), zeros + z0], dim=1), self.size)
        q = (delta[:, None] + _pack(base - self.lo, self.size)[None, :]).view(-1)    # (C·M,)
        pos = _searchsorted(self.keys, q)
        d = padded.index_select(0, pos) - q
        sel = nonzero_1d(d < span)                    # windows holding a key
        q, pos, d = q.index_select(0, sel), pos.index_select(0, sel), d.index_select(0, sel)
        col = torch.div(sel, m_base, rounding_mode="floor")
        slot = sel + col * ((n_z - 1) * m_base)                     # (c·n_z)·M + m
        slots, rows = [], []
        for j in range(span):
            if j:
                pos = pos + 1
                d = padded.index_select(0, pos) - q
                keep = nonzero_1d(d < span)            # keys ascend: the rest are done
                if keep.numel() == 0:
                    break
                if keep.numel() < d.numel():
                    q, pos, d, slot = (q.index_select(0, keep), pos.index_select(0, keep),
                                       d.index_select(0, keep), slot.index_select(0, keep))
            if dilation == 1:
                slots.append(slot + d * m_base)
                rows.append(self.rows.index_select(0, pos))
            else:
                on = nonzero_1d(d % dilation == 0)
                t = torch.div(d.index_select(0, on), dilation, rounding_mode="floor")
                slots.append(slot.index_select(0, on) + t * m_base)
                rows.append(self.rows.index_select(0, pos.index_select(0, on)))
        return torch.cat(slots), torch.cat(rows)

    def query_columns(self, base: torch.Tensor, columns: torch.Tensor, z0: int, n_z: int,
                      dilation: int = 1) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """All hits of ``base[m] + (dx_c, dy_c, z0 + t·dilation)`` for columns c, t < ``n_z``
        as (group, m, row), sorted by (group, m), with group = c·n_z + t."""
        slot, rows = self._column_hits(base, columns, z0, n_z, dilation)
        m_base = max(base.shape[0], 1)
        slot, order = sort_keys(slot, columns.shape[0] * n_z * m_base)
        g = torch.div(slot, m_base, rounding_mode="floor")
        return g, slot - g * m_base, rows.index_select(0, order)

    def query_columns_dense(self, base: torch.Tensor, columns: torch.Tensor, z0: int, n_z: int,
                            dilation: int = 1) -> torch.Tensor:
        """(C·n_z, M) rows of ``base[m] + (dx_c, dy_c, z0 + t·dilation)`` at [c·n_z + t, m], −1 where absent."""
        slot, rows = self._column_hits(base, columns, z0, n_z, dilation)
        found = torch.full((columns.shape[0] * n_z * base.shape[0],), -1, dtype=torch.int64, device=base.device)
        found.index_copy_(0, slot, rows)
        return found.view(columns.shape[0] * n_z, base.shape[0])


def table_for(cache: SparseCache, stride: int, coords: torch.Tensor) -> LookupTable:
    table = cache.tables.get(stride)
    if table is None:
        table = LookupTable.build(coords)
        cache.tables[stride] = table
    return table


@dataclass(eq=False)
class KernelMap:
    """Pairs (in_rows[k], out_rows[k]) per kernel offset k, plus the output coordinates.

    ``identity`` marks a submanifold centre offset (in_rows == out_rows == arange), which the
    convolution computes as a plain GEMM without gather/scatter.
    """

    in_rows: list[torch.Tensor]
    out_rows: list[torch.Tensor]
    in_coords: torch.Tensor
    out_coords: torch.Tensor
    identity: int | None = None
    derived: dict = field(default_factory=dict)   # indices derived from the pairs, built on first use

    @property
    def num_pairs(self) -> int:
        return sum(int(r.numel()) for r in self.in_rows)


def _downsample_coords(coords: torch.Tensor, offsets: torch.Tensor, conv_stride: int) -> torch.Tensor:
    """Output voxels of a strided conv: every o with some input i = o·s + offset.

    Kernel == stride (the usual 2/2) reduces to ``unique(floor(i / s))``. Sorted, unique.
    """
    c = coords.to(torch.int64)
    k = offsets.shape[0]
    xyz = c[:, None, 1:] - offsets[None]                       # (M, K, 3) candidates o·s
    ok = (torch.remainder(xyz, conv_stride) == 0).all(dim=-1)
    b = c[:, None, :1].expand(-1, k, 1)
    cand = torch.cat([b, torch.div(xyz, conv_stride, rounding_mode="floor")], dim=-1)[ok]
    return unique_coords(cand)


def _strided_map(coords: torch.Tensor, kernel_size: int, conv_stride: int) -> KernelMap:
    """Kernel map of a kernel-2 stride-2 conv (offsets 0 … 1): every input voxel c feeds
    exactly one output, floor(c / 2), through the offset c − 2·floor(c / 2). No search."""
    c = coords.to(torch.int64)
    coarse = torch.div(c[:, 1:], conv_stride, rounding_mode="floor")
    out_coords, inverse = unique_coords(torch.cat([c[:, :1], coarse], dim=1), return_inverse=True)
    rem = c[:, 1:] - coarse * conv_stride                  # offsets 0 … k−1, z fastest
    k_idx = (rem[:, 0] * kernel_size + rem[:, 1]) * kernel_size + rem[:, 2]
    kvol = kernel_size ** 3
    n_out = max(out_coords.shape[0], 1)
    order = sort_keys(k_idx * n_out + inverse, kvol * n_out)[1]    # by offset, then output row
    counts = torch.bincount(k_idx, minlength=kvol).tolist()
    ins = list(torch.split(order, counts))
    outs = list(torch.split(inverse[order], counts))
    return KernelMap(ins, outs, coords, out_coords, None)


def _column_map(table: LookupTable, base: torch.Tensor, offsets: torch.Tensor, dilation: int,
                symmetric: bool) -> tuple[list[torch.Tensor], list[torch.Tensor]] | None:
    """(ins, outs) per offset from column-window searches, or None where the additive
    lookup does not apply. ``symmetric``: submanifold odd kernel, where offset K−1−k is
    −offset k with rows swapped, so only the first half of the (dx, dy) columns is searched."""
    kvol = offsets.shape[0]
    if kvol == 1 or not table._additive_ok(base, int(offsets.abs().max())):
        return None
    xy = [tuple(o) for o in offsets[:, :2].tolist()]
    columns = list(dict.fromkeys(xy))                      # first-seen order
    zs = offsets[:, 2]
    z0 = int(zs.min())
    n_z = (int(zs.max()) - z0) // dilation + 1
    if len(columns) * n_z != kvol:
        return None
    if symmetric:
        columns = columns[:len(columns) // 2 + 1]          # (dy, dx) ≤ (0, 0): mirrors of the rest
    index = {tuple(o): k for k, o in enumerate(offsets.tolist())}
    cols = torch.tensor(columns, dtype=torch.int64, device=base.device).view(-1, 2)
    g, o_idx, i_idx = table.query_columns(base, cols, z0, n_z, dilation)
    counts = torch.bincount(g, minlength=len(columns) * n_z).tolist()
    in_split, out_split = torch.split(i_idx, counts), torch.split(o_idx, counts)
    ins: list[torch.Tensor | None] = [None] * kvol
    outs: list[torch.Tensor | None] = [None] * kvol
    for c, (dx, dy) in enumerate(columns):
        for t in range(n_z):
            k = index[(dx, dy, z0 + t * dilation)]
            ins[k], outs[k] = in_split[c * n_z + t], out_split[c * n_z + t]
    if symmetric:
        for k in range(kvol):
            if ins[k] is None:
                ins[k], outs[k] = outs[kvol - 1 - k], ins[kvol - 1 - k]
    if any(i is None for i in ins):
        return None
    return ins, outs  # type: ignore[return-value]


def build_kernel_map(coords: torch.Tensor, kernel_size: int, conv_stride: int, dilation: int,
                     table: LookupTable) -> KernelMap:
    """Kernel map of a (non-transposed) conv on ``coords`` whose lookup table is ``table``."""
    dev = coords.device
    if kernel_size == conv_stride == 2 and dilation == 1 and coords.shape[0] > 0:
        return _strided_map(coords, kernel_size, conv_stride)
    offsets = kernel_offsets(kernel_size, dilation, dev)
    kvol = offsets.shape[0]
    if conv_stride == 1:
        out_coords = coords
    elif kernel_size == conv_stride and dilation == 1 or kernel_size == 1:
        c = coords.to(torch.int64)
        down = torch.div(c[:, 1:], conv_stride, rounding_mode="floor")
        out_coords = unique_coords(torch.cat([c[:, :1], down], dim=1))
    else:
        out_coords = _downsample_coords(coords, offsets, conv_stride)
    oc = out_coords.to(torch.int64)
    m_out = oc.shape[0]
    symmetric = conv_stride == 1 and kernel_size % 2 == 1
    base = torch.cat([oc[:, :1], oc[:, 1:] * conv_stride], dim=1)
    identity = kvol // 2 if symmetric else None
    fast = _column_map(table, base, offsets, dilation, symmetric) if m_out else None
    if fast is not None:
        ins, outs = fast
        if symmetric:
            ar = torch.arange(m_out, device=dev)
            ins[identity], outs[identity] = ar, ar
        return KernelMap(ins, outs, coords, out_coords, identity)
    # Submanifold odd kernels are symmetric: offset K-1-k is -offset k with in/out swapped,
    # so only the first half is searched and the centre is the identity.
    n_search = kvol // 2 if symmetric else kvol
    found = table.query_offsets(base, offsets[:n_search])      # (M_out, n_search)
    k_idx, o_idx = torch.nonzero(found.t() >= 0, as_tuple=True)  # sorted by k, then output row
    i_idx = found[o_idx, k_idx]
    counts = torch.bincount(k_idx, minlength=n_search).tolist()
    ins = list(torch.split(i_idx, counts))
    outs = list(torch.split(o_idx, counts))
    if symmetric:
        ar = torch.arange(m_out, device=dev)
        ins = ins + [ar] + [outs[kvol // 2 - 1 - j] for j in range(kvol // 2)]
        outs = outs + [ar] + [ins[kvol // 2 - 1 - j] for j in range(kvol // 2)]
    return KernelMap(ins, outs, coords, out_coords, identity)
