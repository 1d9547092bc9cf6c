"""Kernel maps in pure PyTorch: which input voxel feeds which output voxel through which weight.

Voxel keys are packed into one int64 per coordinate (mixed radix over the bounding box of
the table, batch most significant, so sorted keys are lexicographically sorted coords); a
lookup is one ``torch.searchsorted`` over the sorted keys. Everything is vectorised over
points; only the kernel offsets (≤ 125) are looped over, in Python-free tensor form too.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import torch

from ..errors import InvalidPointCloudError
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


def _extent_ok(size: torch.Tensor) -> bool:
    total = 1
    for v in size.tolist():
        total *= int(v)
    return total < 2 ** 62


def _pack(rel: torch.Tensor, size: torch.Tensor) -> torch.Tensor:
    """Mixed-radix key of non-negative ``rel`` (..., 4) int64 [b, x, y, z] (b most significant)."""
    return ((rel[..., 0] * size[1] + rel[..., 1]) * size[2] + rel[..., 2]) * size[3] + rel[..., 3]


def unique_coords(c: torch.Tensor) -> torch.Tensor:
    """Sorted unique rows of int64 coords (N, 4) → int32, via one 1-D unique on packed keys."""
    if c.shape[0] == 0:
        return c.to(torch.int32)
    lo = c.min(dim=0).values
    size = c.max(dim=0).values - lo + 1
    if not _extent_ok(size):
        return torch.unique(c, dim=0).to(torch.int32)
    keys = torch.unique(_pack(c - lo, size))
    out = torch.empty(keys.shape[0], 4, dtype=torch.int64, device=c.device)
    for col in (3, 2, 1):
        out[:, col] = keys % size[col]
        keys = keys // size[col]
    out[:, 0] = keys
    return (out + lo).to(torch.int32)


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
        skeys, order = torch.sort(_pack(c - lo, size))
        if skeys.numel() > 1 and bool((skeys[1:] == skeys[:-1]).any()):
            raise InvalidPointCloudError("sparse tensor has duplicate coordinates")
        return cls(lo, size, skeys, order)

    def _lookup(self, keys: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        pos = torch.searchsorted(self.keys, keys).clamp_max_(self.keys.numel() - 1)
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

    def query_offsets(self, base: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
        """Rows of ``base[i] + offsets[k]`` as (M, K), −1 where absent.

        ``base`` (M, 4) must lie within MARGIN/2 of the stored box and |offsets| ≤ MARGIN/2
        for the fast additive path; anything else takes the bounds-checked path.
        """
        if base.shape[0] == 0 or self.keys.numel() == 0:
            return torch.full((base.shape[0], offsets.shape[0]), -1, dtype=torch.int64, device=base.device)
        rel = base - self.lo
        half = MARGIN // 2
        inner_lo = self.lo[1:] + MARGIN - half
        inner_hi = self.lo[1:] + self.size[1:] - 1 - MARGIN + half
        if (offsets.abs().max() > half or bool((base[:, 1:] < inner_lo).any())
                or bool((base[:, 1:] > inner_hi).any()) or bool((rel[:, 0] < 0).any())
                or bool((rel[:, 0] >= self.size[0]).any())):
            q = base[:, None, :].repeat(1, offsets.shape[0], 1)
            q[:, :, 1:] += offsets[None]
            return self.query(q)
        zero = torch.zeros(offsets.shape[0], 1, dtype=offsets.dtype, device=offsets.device)
        delta = _pack(torch.cat([zero, offsets], dim=1), self.size)     # linear in the offset
        keys = _pack(rel, self.size)[:, None] + delta[None, :]
        pos, hit = self._lookup(keys)
        return torch.where(hit, self.rows[pos], torch.full_like(pos, -1))


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


def build_kernel_map(coords: torch.Tensor, kernel_size: int, conv_stride: int, dilation: int,
                     table: LookupTable) -> KernelMap:
    """Kernel map of a (non-transposed) conv on ``coords`` whose lookup table is ``table``."""
    dev = coords.device
    offsets = kernel_offsets(kernel_size, dilation, dev)
    kvol = offsets.shape[0]
    if conv_stride == 1:
        out_coords = coords
    elif kernel_size == conv_stride and dilation == 1 or kernel_size == 1:
        c = coords.to(torch.int64)
        out_coords = unique_coords(torch.cat([c[:, :1], torch.div(c[:, 1:], conv_stride, rounding_mode="floor")], dim=1))
    else:
        out_coords = _downsample_coords(coords, offsets, conv_stride)
    oc = out_coords.to(torch.int64)
    m_out = oc.shape[0]
    symmetric = conv_stride == 1 and kernel_size % 2 == 1
    # Submanifold odd kernels are symmetric: offset K-1-k is -offset k with in/out swapped,
    # so only the first half is searched and the centre is the identity.
    n_search = kvol // 2 if symmetric else kvol
    base = torch.cat([oc[:, :1], oc[:, 1:] * conv_stride], dim=1)
    found = table.query_offsets(base, offsets[:n_search])      # (M_out, n_search)
    k_idx, o_idx = torch.nonzero(found.t() >= 0, as_tuple=True)  # sorted by k, then output row
    i_idx = found[o_idx, k_idx]
    counts = torch.bincount(k_idx, minlength=n_search).tolist()
    ins = list(torch.split(i_idx, counts))
    outs = list(torch.split(o_idx, counts))
    identity = None
    if symmetric:
        ar = torch.arange(m_out, device=dev)
        ins = ins + [ar] + [outs[kvol // 2 - 1 - j] for j in range(kvol // 2)]
        outs = outs + [ar] + [ins[kvol // 2 - 1 - j] for j in range(kvol // 2)]
        identity = kvol // 2
    return KernelMap(ins, outs, coords, out_coords, identity)
