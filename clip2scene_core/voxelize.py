"""Points → sparse voxels: the one quantisation every model, loss and node shares.

Grid convention (kept consistent everywhere): voxel ``(x, y, z)`` holds the points with
``floor(p / voxel_size) == (x, y, z)``. Coordinates are **signed** integers; nothing is
shifted by ``point_range``, so the same point gets the same voxel whatever the range is,
and ``point_coords`` (``p / voxel_size`` as float32) satisfies
``floor(point_coords) == coords`` exactly (the grid is computed from those float32 values).

Features (``VoxelConfig.features``), concatenated in the order given:

* any field of the ``Scan`` (``"intensity"``, ``"ring"``, ``"x"`` …): the raw column, 1 channel;
  raw ``"x", "y", "z"`` give absolute coordinates in metres;
* ``"xyz"``: the point **relative to the centre of its voxel**, in metres (3 channels; the
  voxel mean is the centroid offset). Relative, so whole-voxel translations leave it unchanged;
* ``"rgb"``: colour in [0, 1] (3 channels) from fields ``r, g, b`` / ``red, green, blue``
  (0–255 values, divided by 255) or a PCL-packed float32 ``rgb``/``rgba`` field;
* ``"ones"``: a constant 1 (1 channel).

Points whose xyz or used feature columns are NaN/inf, or that fall outside
``point_range`` (``min <= p < max``), are dropped and reported through ``point_mask``.

Cost (it runs on every sweep): the range test compares float32 columns against float32
bounds chosen to decide exactly as the float64 comparison; ``p / voxel_size`` is divided in
float64 and rounded once to float32, as before, without an (N, 3) float64 copy; unique
voxels come from one value sort of packed int64 keys (`_sorted_voxels`). The result is
bitwise the plain float64 / ``np.unique`` computation's (test/test_fast_paths_io.py).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

from .errors import ConfigError, EmptyPointCloudError, InvalidPointCloudError
from .types import Scan

SPECIAL_FEATURES = ("xyz", "rgb", "ones")
_AXIS_BITS = 21                      # 3 × 21 bits packed into one int64 key per scan
_AXIS_LIMIT = 1 << (_AXIS_BITS - 1)  # |voxel coordinate| must stay below this


@dataclass
class VoxelConfig:
    """How a scan is quantised; ``voxel_size`` in metres (one value or per axis x, y, z)."""

    voxel_size: float | tuple[float, float, float] = 0.1
    point_range: tuple[float, float, float, float, float, float] | None = None  # xmin ymin zmin xmax ymax zmax
    features: tuple[str, ...] = ("intensity",)

    def __post_init__(self) -> None:
        try:
            vs = np.broadcast_to(np.asarray(self.voxel_size, dtype=np.float64), (3,))
        except (TypeError, ValueError):
            raise ConfigError(f"voxel.voxel_size must be a number or 3 numbers, got {self.voxel_size!r}") from None
        if not np.all(np.isfinite(vs)) or np.any(vs <= 0):
            raise ConfigError(f"voxel.voxel_size must be positive, got {self.voxel_size}")
        if self.point_range is not None:
            pr = np.asarray(self.point_range, dtype=np.float64)
            if pr.shape != (6,) or not np.all(pr[:3] < pr[3:]):
                raise ConfigError(
                    f"voxel.point_range must be (xmin, ymin, zmin, xmax, ymax, zmax) with min < max, "
                    f"got {self.point_range}")
            self.point_range = tuple(float(v) for v in pr)
        self.features = tuple(self.features)
        if not self.features:
            raise ConfigError("voxel.features must name at least one feature")
        if len(set(self.features)) != len(self.features):
            raise ConfigError(f"voxel.features has duplicates: {self.features}")

    @property
    def voxel_size_xyz(self) -> np.ndarray:
        """(3,) float64 voxel edge lengths."""
        return np.broadcast_to(np.asarray(self.voxel_size, dtype=np.float64), (3,)).copy()

    @property
    def num_channels(self) -> int:
        """Feature channels ``voxelize`` produces (the model's ``in_channels``)."""
        return sum(3 if f in ("xyz", "rgb") else 1 for f in self.features)


@dataclass
class Voxels:
    """Voxelised batch of scans (numpy). Rows of per-point arrays follow the kept points,
    scan after scan in list order; ``point_mask`` covers all input points concatenated."""

    coords: np.ndarray        # (M, 4) int32 [batch, x, y, z], sorted, unique, deterministic
    features: np.ndarray      # (M, C) float32 mean of the points in each voxel
    inverse: np.ndarray       # (N_kept,) int64 point → voxel row
    point_mask: np.ndarray    # (N,) bool: which input points were kept (finite, in range)
    point_coords: np.ndarray  # (N_kept, 4) float32 [batch, x/vs, y/vs, z/vs] (for SPVCNN)
    point_features: np.ndarray  # (N_kept, C) float32

    @property
    def batch_size(self) -> int:
        return int(self.coords[-1, 0]) + 1 if len(self.coords) else 0

    @property
    def num_points(self) -> int:
        return int(self.inverse.shape[0])


def _rgb_columns(scan: Scan) -> np.ndarray | None:
    """(N, 3) float64 colours in [0, 1], or None when the scan has no colour."""
    for names in (("r", "g", "b"), ("red", "green", "blue")):
        if all(scan.has(n) for n in names):
            return np.stack([scan.column(n) for n in names], axis=1).astype(np.float64) / 255.0
    for name in ("rgb", "rgba"):
        if scan.has(name):
            packed = np.ascontiguousarray(scan.column(name)).view(np.uint32)
            rgb = np.stack([(packed >> 16) & 255, (packed >> 8) & 255, packed & 255], axis=1)
            return rgb.astype(np.float64) / 255.0
    return None


def _available(scan: Scan) -> list[str]:
    has_rgb = _rgb_columns(scan) is not None
    return list(scan.fields) + [f for f in SPECIAL_FEATURES if f != "rgb" or has_rgb]


def _point_features(scan: Scan, names: Sequence[str], rel_xyz: np.ndarray | None) -> np.ndarray:
    """(N, C) float64 per-point features in the configured order."""
    cols: list[np.ndarray] = []
    n = len(scan)
    for name in names:
        if name == "xyz":
            cols.append(rel_xyz)
        elif name == "ones":
            cols.append(np.ones((n, 1)))
        elif name == "rgb":
            rgb = _rgb_columns(scan)
            if rgb is None:
                raise InvalidPointCloudError(
                    f"feature 'rgb' asked for but the scan has no colour fields; available: {_available(scan)}")
            cols.append(rgb)
        elif scan.has(name):
            cols.append(scan.column(name).astype(np.float64)[:, None])
        else:
            raise InvalidPointCloudError(
                f"unknown feature '{name}'; available for this scan: {_available(scan)}")
    return np.concatenate(cols, axis=1) if cols else np.zeros((n, 0))


def _in_range(scan: Scan, cfg: VoxelConfig) -> np.ndarray:
    """(N,) bool: finite x, y, z inside ``point_range`` (``min <= p < max``).

    One float32 column at a time: ``x >= lo`` (lo a float64 bound) holds exactly when
    ``x >= lo32``, lo32 the smallest float32 not below lo (likewise ``x < hi``), so the
    float32 comparisons decide as the float64 ones would, without a float64 copy.
    """
    xyz = scan.xyz
    keep = np.ones(len(scan), dtype=bool)
    with np.errstate(invalid="ignore"):
        for a in range(3):
            col = xyz[:, a]
            if cfg.point_range is None:
                keep &= np.isfinite(col)
                continue
            lo, hi = _float32_ceil(cfg.point_range[a]), _float32_ceil(cfg.point_range[a + 3])
            keep &= col >= lo
            keep &= col < hi
    return keep


def _float32_ceil(value: float) -> np.float32:
    """The smallest float32 >= ``value`` (a float64; beyond float32's range: ±inf's neighbour)."""
    with np.errstate(over="ignore"):
        f = np.float32(value)
        return np.nextafter(f, np.float32(np.inf)) if float(f) < value else f


def _sorted_voxels(grid: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(unique voxel coordinates (M, 3) int64 in lexicographic x, y, z order, inverse (K,)).

    What ``np.unique(rows, axis=0, return_inverse=True)`` gives, computed cheaply: each
    axis is offset by its minimum and packed into its own bit field of one int64 key (x
    highest, so key order is lexicographic order); when the point index fits in the free low
    bits, one value sort of ``key << bits | index`` replaces the slower argsort.
    """
    k = len(grid)
    if k == 0:
        return np.zeros((0, 3), np.int64), np.zeros(0, np.int64)
    cols = [grid[:, a].astype(np.int64) for a in range(3)]   # per column: axis reductions
    lo = [int(c.min()) for c in cols]                         # of (K, 3) arrays are slow
    bits = [(int(c.max()) - m).bit_length() for c, m in zip(cols, lo)]
    key = cols[0] - lo[0]
    for a in (1, 2):
        key <<= bits[a]
        key |= cols[a] - lo[a]
    ib = (k - 1).bit_length()
    if sum(bits) + ib <= 63:
        packed = key << ib
        packed |= np.arange(k, dtype=np.int64)
        packed.sort()
        perm = packed & ((1 << ib) - 1)
        packed >>= ib
        first = np.empty(k, dtype=bool)
        first[0] = True
        np.not_equal(packed[1:], packed[:-1], out=first[1:])
        inverse = np.empty(k, dtype=np.int64)
        inverse[perm] = np.cumsum(first) - 1
        ukeys = packed[first]
    else:   # a huge index range: the general sort
        ukeys, inverse = np.unique(key, return_inverse=True)
        inverse = inverse.reshape(-1)
    coords = np.empty((len(ukeys), 3), np.int64)
    coords[:, 2] = (ukeys & ((1 << bits[2]) - 1)) + lo[2]
    coords[:, 1] = ((ukeys >> bits[2]) & ((1 << bits[1]) - 1)) + lo[1]
    coords[:, 0] = (ukeys >> (bits[1] + bits[2])) + lo[0]
    return coords, inverse


def _voxelize_one(scan: Scan, cfg: VoxelConfig, b: int):
    vs = cfg.voxel_size_xyz
    keep = _in_range(scan, cfg)
    # np.compress: boolean row indexing of an (N, C) array is several times slower
    sub = scan if keep.all() else Scan(np.compress(keep, scan.points, axis=0), scan.fields)
    xyz = sub.xyz
    pcoords = np.empty((len(sub), 4), np.float32)   # [b, float32 voxel-unit coordinates]
    pcoords[:, 0] = b
    with np.errstate(invalid="ignore", over="ignore"):
        for a in range(3):   # p / voxel_size in float64 (buffered, no float64 copy), rounded once
            np.divide(xyz[:, a], vs[a], out=pcoords[:, a + 1], dtype=np.float64, casting="same_kind")
        grid = np.floor(pcoords[:, 1:])
        rel = None
        if "xyz" in cfg.features:
            rel = xyz.astype(np.float64) - (grid.astype(np.float64) + 0.5) * vs
    feats = _point_features(sub, cfg.features, rel)   # raises on unknown names
    ok = np.all(np.isfinite(feats), axis=1) if feats.shape[1] else np.ones(len(sub), bool)
    if not ok.all():   # NaN / inf in a used feature column
        keep[np.flatnonzero(keep)[~ok]] = False
        pcoords, grid, feats, xyz = (np.compress(ok, x, axis=0) for x in (pcoords, grid, feats, xyz))
    if len(grid) and max(-grid.min(), grid.max()) >= _AXIS_LIMIT - 1:
        raise InvalidPointCloudError(
            f"scan {b}: voxel coordinates exceed ±{_AXIS_LIMIT - 1} voxels (max |p| = "
            f"{np.abs(xyz).max():.1f} m); set voxel.point_range to crop far points")
    ucoords, inverse = _sorted_voxels(grid)
    m = len(ucoords)
    counts = np.maximum(np.bincount(inverse, minlength=m), 1).astype(np.float64)
    vfeats = np.empty((m, feats.shape[1]), np.float32)
    for c in range(feats.shape[1]):
        vfeats[:, c] = np.bincount(inverse, weights=feats[:, c], minlength=m) / counts
    coords = np.empty((m, 4), np.int32)
    coords[:, 0] = b
    coords[:, 1:] = ucoords
    return coords, vfeats, inverse, keep, pcoords, feats.astype(np.float32)


def voxelize(scans: Sequence[Scan] | Scan, cfg: VoxelConfig) -> Voxels:
    """Quantise ``scans`` (batch index = list position) into sorted unique voxels.

    Raises ``EmptyPointCloudError`` when a scan has no finite, in-range point left (a batch
    with a silently missing scan would shift every later batch index), and
    ``InvalidPointCloudError`` for an unknown feature name.
    """
    if isinstance(scans, Scan):
        scans = [scans]
    scans = list(scans)
    if not scans:
        raise EmptyPointCloudError("voxelize() got no scans")
    for i, s in enumerate(scans):
        if not isinstance(s, Scan):
            raise InvalidPointCloudError(f"scan {i} is a {type(s).__name__}, expected clip2scene_core.Scan")
    parts = [_voxelize_one(s, cfg, b) for b, s in enumerate(scans)]
    for b, (coords, *_rest) in enumerate(parts):
        if len(coords) == 0:
            n = len(scans[b])
            raise EmptyPointCloudError(
                f"scan {b}: no valid point left out of {n} (non-finite or outside point_range "
                f"{cfg.point_range})")
    if len(parts) == 1:   # one scan (the node): nothing to concatenate or offset
        return Voxels(*parts[0])
    offsets = np.cumsum([0] + [len(p[0]) for p in parts[:-1]])
    return Voxels(
        coords=np.concatenate([p[0] for p in parts]),
        features=np.concatenate([p[1] for p in parts]),
        inverse=np.concatenate([p[2] + o for p, o in zip(parts, offsets)]),
        point_mask=np.concatenate([p[3] for p in parts]),
        point_coords=np.concatenate([p[4] for p in parts]),
        point_features=np.concatenate([p[5] for p in parts]),
    )
